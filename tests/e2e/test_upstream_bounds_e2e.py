"""Upstream pool exhaustion cannot stop forwarding (issue 14, item 5), proven by counting.

One gateway with a pool of 10 upstream connections in front of the misbehaving backend
(``tests/fixtures/misbehaving_backend.py``, which counts its connections and every disconnect)
and a fresh audit database. Disconnected stream readers and slow request bodies, three times
the pool each, leave healthy requests answered; a pool wait past its timeout is a 503, a slow
body a 408, the deadline a 504 or a cut stream, a client gone a 499, each with exactly one row.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from plant_gateway import migrations
from tests.e2e.wire import (
    Answer,
    audit_rows,
    eventually,
    get_json,
    head,
    open_conn,
    read_answer,
    request,
)
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.processes import Proc, start_gateway, start_misbehaving_backend

POOL = 10
BODY_TIMEOUT_S = 1.5
DEADLINE_S = 4.0


@dataclass
class Setup:
    gateway: Proc
    backend: Proc
    dsn: str

    def stats(self) -> dict:
        return dict(get_json(self.backend.url + "/stats"))


@pytest.fixture(scope="module")
def setup(postgres_dsn: str) -> Iterator[Setup]:
    dsn = create_database(postgres_dsn, "pgw_bounds_e2e")
    migrations.upgrade(dsn)
    backend = start_misbehaving_backend()
    gateway = start_gateway({
        "PLANT_GUARDS": "audit", "DATABASE_URL": dsn, "AUDIT_FLUSH_INTERVAL_S": "0.05",
        "UPSTREAM_POOL_SIZE": str(POOL), "UPSTREAM_POOL_TIMEOUT_S": "1",
        "UPSTREAM_RETRIES": "0", "REQUEST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "REQUEST_DEADLINE_S": str(DEADLINE_S),
    }, backend_url=backend.url)
    try:
        yield Setup(gateway, backend, dsn)
    finally:
        gateway.stop()
        backend.stop()
        drop_database(dsn)


def cid() -> str:
    return str(uuid.uuid4())


async def healthy(setup: Setup, n: int) -> list[int]:
    """``n`` plain GETs, one after another, each on its own connection."""
    statuses = []
    for _ in range(n):
        answer = await request(setup.gateway.port, head("GET", "/fast", extra="Connection: close"))
        statuses.append(answer.status)
    return statuses


async def stream_then_leave(port: int, request_id: str) -> bytes:
    """Start a streamed answer, read its head and first event, then disconnect."""
    reader, writer = await open_conn(port)
    writer.write(head("GET", "/stream", request_id))
    first = await asyncio.wait_for(reader.readuntil(b"data: 0"), 10)
    writer.close()
    return first


async def test_disconnected_stream_readers_do_not_hold_the_pool(setup: Setup) -> None:
    """Three rounds of a pool's worth of readers that leave mid-stream: the backend sees every
    one go, and healthy requests after each round are answered (the relay used to keep
    reading, so ten of them froze a pool of ten)."""
    before = setup.stats()["streams_aborted"]
    readers = []
    for _ in range(3):
        ids = [cid() for _ in range(POOL)]
        heads = await asyncio.gather(*(stream_then_leave(setup.gateway.port, i) for i in ids))
        assert all(h.startswith(b"HTTP/1.1 200") for h in heads)
        assert await eventually(lambda: setup.stats()["streams_open"] == 0)
        assert await healthy(setup, 2 * POOL) == [200] * (2 * POOL)
        readers += ids
    assert setup.stats()["streams_aborted"] - before == 3 * POOL
    rows = await audit_rows(setup.dsn, readers, len(readers))
    assert sorted(r["cid"] for r in rows) == sorted(readers)  # exactly one row each
    assert {(r["status_code"], r["error_type"]) for r in rows} == {(200, "client-disconnected")}


async def slow_body(port: int, request_id: str, length: int, first: int) -> Answer:
    """A POST that sends ``first`` of its ``length`` body bytes, then nothing."""
    reader, writer = await open_conn(port)
    writer.write(head("POST", "/api/v1/upload", request_id, length=length) + b"x" * first)
    try:
        return await read_answer(reader)
    finally:
        writer.close()


async def test_slow_bodies_hold_no_pool_connection_and_get_408(setup: Setup) -> None:
    """Three pools' worth of stalled small bodies: healthy requests are answered while they
    wait (they hold no upstream connection), then each gets a 408 and one audit row. A stalled
    large body, streamed to the backend, is cut there too."""
    small = [cid() for _ in range(3 * POOL)]
    large = cid()
    before = setup.stats()["bodies_aborted"]
    port = setup.gateway.port
    slow = [asyncio.create_task(slow_body(port, i, 1000, 100)) for i in small]
    slow.append(asyncio.create_task(slow_body(port, large, 200_000, 70_000)))
    await asyncio.sleep(0.2)  # every head is in
    assert await healthy(setup, 2 * POOL) == [200] * (2 * POOL)
    assert not any(task.done() for task in slow)  # still waiting for their bodies meanwhile
    answers = await asyncio.gather(*slow)
    assert {a.status for a in answers} == {408}
    assert answers[0].json()["type"].endswith("/errors/request-timeout")
    assert {a.headers.get("connection") for a in answers} == {"close"}
    assert await eventually(lambda: setup.stats()["bodies_aborted"] - before == 1)
    rows = await audit_rows(setup.dsn, [*small, large], len(small) + 1)
    assert sorted(r["cid"] for r in rows) == sorted([*small, large])
    assert {(r["status_code"], r["error_type"]) for r in rows} == {(408, "request-timeout")}


async def test_a_pool_wait_past_its_timeout_is_503_and_audited(setup: Setup) -> None:
    """Every pooled connection held by a slow answer: the next request waits 1 s, gets a 503
    with Retry-After and one audit row; once they are answered, forwarding goes on."""
    port = setup.gateway.port
    holds = [asyncio.create_task(request(port, head("GET", "/hold?s=2.5")))
             for _ in range(POOL)]
    assert await eventually(lambda: setup.stats()["open"] >= POOL + 1)  # + the /stats one
    refused_id = cid()
    refused = await request(port, head("GET", "/fast", refused_id))
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["type"].endswith("/errors/upstream-unavailable")
    assert {a.status for a in await asyncio.gather(*holds)} == {200}
    assert await healthy(setup, 3) == [200] * 3
    rows = await audit_rows(setup.dsn, [refused_id], 1)
    assert [(r["status_code"], r["error_type"]) for r in rows] == [(503, "upstream-unavailable")]


async def test_the_deadline_ends_a_slow_answer_and_an_endless_stream(setup: Setup) -> None:
    """At REQUEST_DEADLINE_S a backend still thinking gives a 504, an endless stream is cut
    (the client sees it incomplete); the backend sees both go; one row each."""
    before = setup.stats()
    slow_id, stream_id = cid(), cid()
    port = setup.gateway.port
    slow = asyncio.create_task(request(port, head("GET", "/hold?s=30", slow_id)))
    stream = asyncio.create_task(request(port, head("GET", "/stream", stream_id)))
    answer, cut = await asyncio.gather(slow, stream)
    assert answer.status == 504
    assert answer.json()["type"].endswith("/errors/gateway-timeout")
    assert cut.status == 200 and not cut.complete and b"data: 3" in cut.body
    gone = ("holds_aborted", "streams_aborted")
    assert await eventually(
        lambda: [setup.stats()[k] - before[k] for k in gone] == [1, 1], within=3
    )
    rows = await audit_rows(setup.dsn, [slow_id, stream_id], 2)
    by_cid = {r["cid"]: (r["status_code"], r["error_type"]) for r in rows}
    assert by_cid == {slow_id: (504, "deadline-exceeded"), stream_id: (200, "deadline-exceeded")}


async def test_a_client_gone_while_the_backend_thinks_frees_its_connection(setup: Setup) -> None:
    """The client leaves before any answer: the upstream exchange is aborted at once (the
    backend sees it go) and the row says 499."""
    before = setup.stats()
    gone_id = cid()
    _, writer = await open_conn(setup.gateway.port)
    writer.write(head("GET", "/hold?s=30", gone_id))
    held = before["requests"].get("GET /hold", 0)
    assert await eventually(lambda: setup.stats()["requests"].get("GET /hold", 0) > held)
    writer.close()
    aborted = before["holds_aborted"]
    assert await eventually(lambda: setup.stats()["holds_aborted"] - aborted == 1, within=3)
    rows = await audit_rows(setup.dsn, [gone_id], 1)
    assert [(r["status_code"], r["error_type"]) for r in rows] == [(499, "client-disconnected")]
