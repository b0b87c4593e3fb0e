"""Bad input over real HTTP: deep JSON, bad Host headers, TRACE/TRACK, secrets in bodies.

A real gateway (auth, tenant binding, audit on PostgreSQL) in front of a raw TCP backend that
records every request line it gets. Each refusal must be a 4xx problem (never a 500), must not
reach the backend, and must leave exactly one audit row, like every gateway-made error.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from plant_gateway import migrations
from tests.fixtures.loopback import LoopbackServer
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.processes import Proc, mint_token, start_gateway

TOKEN = mint_token(customer_id="cust-A")
DEEP_ARRAY = b"[" * 2000 + b"]" * 2000


class RecordingBackend(LoopbackServer):
    """Answers 200 to every request and records its request line (method and target)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[bytes] = []

    def saw(self, marker: str) -> bool:
        return any(marker.encode() in line for line in self.lines)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.lines.append(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)  # until the gateway hangs up
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, object]:
        assert self.headers.get("content-type") == "application/problem+json", self
        doc: dict[str, object] = json.loads(self.body)
        return doc


@pytest.fixture(scope="module")
async def backend_rec() -> AsyncIterator[RecordingBackend]:
    backend = RecordingBackend()
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="module")
def audit_dsn(postgres_dsn: str) -> Iterator[str]:
    dsn = create_database(postgres_dsn, "pgw_bad_input")
    migrations.upgrade(dsn)
    yield dsn
    drop_database(dsn)


@pytest.fixture(scope="module")
def gw(backend_rec: RecordingBackend, audit_dsn: str) -> Iterator[Proc]:
    env: dict[str, str | None] = {
        "PLANT_GUARDS": "auth,tenant,audit", "CUSTOMER_ENRICHMENT": "false",
        "DATABASE_URL": audit_dsn, "AUDIT_FLUSH_INTERVAL_S": "0.05", "UPSTREAM_RETRIES": "0",
    }
    proc = start_gateway(env, backend_url=f"http://127.0.0.1:{backend_rec.port}")
    yield proc
    proc.stop()


async def send(gw: Proc, head: str, body: bytes = b"") -> Answer:
    """One request on its own connection, exactly these bytes; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)  # the gateway closes: Connection: close
    finally:
        writer.close()
    top, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *fields = top.decode("latin-1").split("\r\n")
    headers = {}
    for field in fields:
        name, _, value = field.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, payload)


def request(method: str, target: str, cid: str, host: str | None = "127.0.0.1",
            version: str = "1.1", extra: str = "") -> str:
    host_line = "" if host is None else f"Host: {host}\r\n"
    return (f"{method} {target} HTTP/{version}\r\n{host_line}X-Correlation-ID: {cid}\r\n"
            f"Authorization: Bearer {TOKEN}\r\n{extra}Connection: close\r\n\r\n")


async def audit_rows(dsn: str, cid: str) -> list[asyncpg.Record]:
    """The rows with this correlation id, once the first one arrived (or after ~10 s)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            rows = await conn.fetch(
                "SELECT status_code, error_type, http_method, request_body::text AS body "
                "FROM gateway_audit_logs WHERE correlation_id = $1::uuid", cid,
            )
            if rows:
                await asyncio.sleep(0.2)  # a duplicate would be in the same or the next flush
                return await conn.fetch(
                    "SELECT status_code, error_type, http_method, request_body::text AS body "
                    "FROM gateway_audit_logs WHERE correlation_id = $1::uuid", cid,
                )
            await asyncio.sleep(0.1)
        return []
    finally:
        await conn.close()


async def test_a_normal_request_reaches_the_backend_and_is_audited(
    gw: Proc, backend_rec: RecordingBackend, audit_dsn: str
) -> None:
    """The control: the checks below can see a request that does get through."""
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    answer = await send(gw, request("GET", f"/api/v1/agents/{marker}", cid))
    assert answer.status == 200, gw.output()[-2000:]
    assert backend_rec.saw(marker)
    assert [(r["status_code"], r["error_type"]) for r in await audit_rows(audit_dsn, cid)] == [
        (200, None)]


# each under the 8 KiB audit body cap, so the row shows why the body was not parsed
@pytest.mark.parametrize("body", [DEEP_ARRAY, b'{"customer_id": "x", "items": ' + DEEP_ARRAY + b"}",
                                  b'{"a":' * 1300 + b"1" + b"}" * 1300])
async def test_deep_json_on_a_body_bound_route_is_a_400_and_never_forwarded(
    gw: Proc, backend_rec: RecordingBackend, audit_dsn: str, body: bytes
) -> None:
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    head = request("POST", f"/api/v1/hired-agents/{marker}/finalize", cid,
                   extra=f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    answer = await send(gw, head, body)
    assert answer.status == 400, gw.output()[-2000:]
    problem = answer.problem()
    assert problem["type"] == "https://waooaw.com/errors/bad-request"
    assert problem["detail"] == "the JSON body nests deeper than 64 levels"
    assert problem["correlation_id"] == cid
    assert not backend_rec.saw(marker)
    rows = await audit_rows(audit_dsn, cid)
    assert [(r["status_code"], r["error_type"]) for r in rows] == [(400, "invalid-body")]
    assert json.loads(rows[0]["body"]) == {"_omitted": "too_deep", "_size": len(body)}


@pytest.mark.parametrize(("host", "version", "detail"), [
    (None, "1.1", "the Host header is required"),
    ("", "1.1", "the Host header is empty"),
    ("api.example.com evil.example", "1.1", "spaces or control characters in the Host header"),
    ("api.example.com\tx", "1.1", "spaces or control characters in the Host header"),
    ("api.example.com:99999", "1.1", "invalid port in the Host header"),
    ("api.example.com:8o", "1.1", "the Host header is not a host name or address"),
    ("", "1.0", "the Host header is empty"),
])
async def test_bad_host_is_a_400_and_never_forwarded(
    gw: Proc, backend_rec: RecordingBackend, audit_dsn: str, host: str | None, version: str,
    detail: str,
) -> None:
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    answer = await send(gw, request("GET", f"/api/v1/agents/{marker}", cid, host, version))
    assert answer.status == 400, gw.output()[-2000:]
    assert answer.problem()["detail"] == detail
    assert not backend_rec.saw(marker)
    rows = await audit_rows(audit_dsn, cid)
    assert [(r["status_code"], r["error_type"]) for r in rows] == [(400, "invalid-host")]


async def test_http_1_0_without_host_is_still_served(
    gw: Proc, backend_rec: RecordingBackend
) -> None:
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    answer = await send(gw, request("GET", f"/api/v1/agents/{marker}", cid, None, "1.0"))
    assert answer.status == 200
    assert backend_rec.saw(marker)


async def test_a_control_byte_in_host_is_refused_by_the_http_parser(
    gw: Proc, backend_rec: RecordingBackend
) -> None:
    """httptools refuses it before the application runs: a 400 with no row to correlate."""
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    answer = await send(gw, request("GET", f"/api/v1/agents/{marker}", cid, "a\x01b"))
    assert answer.status == 400
    assert not backend_rec.saw(marker)


@pytest.mark.parametrize("path", ["/api/v1/agents/{m}", "/health?{m}"])
async def test_trace_is_405_with_allow_never_forwarded_and_audited(
    gw: Proc, backend_rec: RecordingBackend, audit_dsn: str, path: str
) -> None:
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    answer = await send(gw, request("TRACE", path.format(m=marker), cid))
    assert answer.status == 405, gw.output()[-2000:]
    assert answer.headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert answer.problem()["type"] == "https://waooaw.com/errors/method-not-allowed"
    assert not backend_rec.saw(marker)
    rows = await audit_rows(audit_dsn, cid)
    assert [(r["status_code"], r["error_type"], r["http_method"]) for r in rows] == [
        (405, "method-not-allowed", "TRACE")]


async def test_track_is_refused_by_the_http_parser(
    gw: Proc, backend_rec: RecordingBackend
) -> None:
    """llhttp does not know TRACK: a 400 before the application (which would answer 405)."""
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    answer = await send(gw, request("TRACK", f"/api/v1/agents/{marker}", cid))
    assert answer.status in (400, 405)
    assert not backend_rec.saw(marker)


async def test_pass_and_pw_are_masked_in_the_audit_row(
    gw: Proc, backend_rec: RecordingBackend, audit_dsn: str
) -> None:
    marker, cid = uuid.uuid4().hex, str(uuid.uuid4())
    body = json.dumps({"user": "alice", "pass": "hunter2", "PW": "hunter3",
                       "nested": {"client_secret": "s", "otp_code": "123456"}}).encode()
    head = request("POST", f"/api/v1/tasks/{marker}", cid,
                   extra=f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    assert (await send(gw, head, body)).status == 200
    rows = await audit_rows(audit_dsn, cid)
    assert len(rows) == 1
    assert json.loads(rows[0]["body"]) == {
        "user": "alice", "pass": "***", "PW": "***",
        "nested": {"client_secret": "***", "otp_code": "***"}}
