"""No-loss audit tests through real gateway processes: N requests answered -> exactly N rows.

Runs against a PostgreSQL server (DATABASE_URL of the gateway) and the gateway's own embedded
PostgreSQL (DATABASE_URL unset); outages use a dedicated server the test stops and starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from plant_gateway import migrations
from plant_gateway.audit.embedded_postgres import EmbeddedPostgres
from plant_gateway.audit.schema import from_wire
from tests.fixtures.postgres import ControlledPostgres, create_database, drop_database
from tests.fixtures.processes import Proc, free_port, mint_token, start_gateway

GUARDS = "auth,tenant,audit"
MAX_BODY = 4096
BASE_ENV = {
    "PLANT_GUARDS": GUARDS,
    "MAX_BODY_BYTES": str(MAX_BODY),
    "AUDIT_FLUSH_INTERVAL_S": "0.05",
    "UPSTREAM_RETRIES": "0",
    "UPSTREAM_CONNECT_TIMEOUT_S": "1",
}
TOKEN = mint_token(user_id="5f0c1f5e-2d7e-4a44-9b7b-0a8c3e3f1e11")
KINDS = ("allowed", "no_token", "bad_token", "too_large", "framing", "upstream_500", "post_body")
EXPECTED = {"allowed": 200, "no_token": 401, "bad_token": 401, "too_large": 413,
            "framing": 400, "upstream_500": 500, "post_body": 200, "dead_backend": 503}


# --- where the rows go -----------------------------------------------------------------------
@dataclass
class Target:
    """How a gateway is pointed at PostgreSQL, and how the test reads the table."""

    kind: str
    env: dict[str, str | None]
    state_dir: Path
    dsn: Callable[[], str]
    spool_dirs: list[Path] = field(default_factory=list)


@pytest.fixture(params=["server", "embedded"])
def target(request: pytest.FixtureRequest, postgres_dsn: str) -> Iterator[Target]:
    state = Path(tempfile.mkdtemp(prefix="pgw-audit-e2e-"))
    if request.param == "server":
        dsn = create_database(postgres_dsn, "pgw_audit_e2e")
        migrations.upgrade(dsn)  # the gateway's real migrations
        yield Target("server", {"DATABASE_URL": dsn, "PLANT_STATE_DIR": str(state)}, state,
                     lambda: dsn)
        drop_database(dsn)
    else:
        pgdata = state / "pgdata"
        yield Target("embedded", {"DATABASE_URL": None, "PLANT_STATE_DIR": str(state)}, state,
                     lambda: EmbeddedPostgres(pgdata).dsn())
        _stop_embedded(pgdata)
    shutil.rmtree(state, ignore_errors=True)


def _stop_embedded(pgdata: Path) -> None:
    if pgdata.exists():
        with contextlib.suppress(Exception):  # already stopped
            EmbeddedPostgres(pgdata).stop(force=True)


def _gateway(target: Target, backend: Proc | None = None, backend_url: str | None = None) -> Proc:
    return start_gateway({**BASE_ENV, **target.env}, backend=backend, backend_url=backend_url)


# --- the client ------------------------------------------------------------------------------
@dataclass
class Load:
    """Correlation ids sent, and the status each answered request got."""

    sent: dict[str, str] = field(default_factory=dict)  # cid -> kind
    answered: dict[str, int] = field(default_factory=dict)  # cid -> status
    refused: int = 0


async def _raw(port: int, head: bytes, body: bytes = b"") -> int:
    """One request on its own connection, bytes as given; the status line's code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionResetError("closed without an answer")
        return int(line.split()[1])
    finally:
        writer.close()


async def _one(session: aiohttp.ClientSession, gw: Proc, kind: str, cid: str) -> int:
    url = gw.url
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Correlation-ID": cid}
    if kind in ("allowed", "dead_backend"):
        path = f"/api/v1/agents/{uuid.uuid4().hex[:8]}"
        async with session.get(url + path, headers=auth) as r:
            return r.status
    if kind == "no_token":
        async with session.get(url + "/api/v1/agents", headers={"X-Correlation-ID": cid}) as r:
            return r.status
    if kind == "bad_token":
        headers = {"Authorization": "Bearer not.a.jwt", "X-Correlation-ID": cid}
        async with session.get(url + "/api/v1/agents", headers=headers) as r:
            return r.status
    if kind == "upstream_500":
        async with session.get(url + "/status/500", headers=auth) as r:
            return r.status
    if kind == "post_body":
        body = {"task": "summarise", "password": "hunter2-e2e", "n": 3}
        async with session.post(url + "/api/v1/tasks", json=body, headers=auth) as r:
            return r.status
    common = f"Host: 127.0.0.1\r\nX-Correlation-ID: {cid}\r\nAuthorization: Bearer {TOKEN}\r\n"
    if kind == "too_large":
        head = (f"POST /api/v1/tasks HTTP/1.1\r\n{common}Content-Type: application/json\r\n"
                f"Content-Length: {MAX_BODY * 2}\r\nConnection: close\r\n\r\n").encode()
        return await _raw(gw.port, head, b"x" * (MAX_BODY * 2))
    assert kind == "framing"
    # duplicated framing header, refused by the gateway's ingress (CL + TE together is already
    # refused by uvicorn's HTTP parser, before the application ever sees the request)
    head = (f"POST /api/v1/tasks HTTP/1.1\r\n{common}Host: evil.example\r\n"
            "Content-Length: 2\r\nConnection: close\r\n\r\n").encode()
    return await _raw(gw.port, head, b"{}")


async def send_load(gw: Proc, load: Load, n: int, kinds: tuple[str, ...] = KINDS,
                    concurrency: int = 16, stop_when_refused: bool = False) -> None:
    """Send ``n`` requests, ``concurrency`` at a time, each on a fresh connection."""
    queue = itertools.islice(itertools.cycle(kinds), n)
    connector = aiohttp.TCPConnector(force_close=True, limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for kind in queue:
                cid = str(uuid.uuid4())
                load.sent[cid] = kind
                try:
                    load.answered[cid] = await _one(session, gw, kind, cid)
                except (aiohttp.ClientConnectionError, ConnectionError, OSError):
                    load.refused += 1
                    if stop_when_refused:
                        return

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def until_answered(load: Load, count: int) -> None:
    """Poll (the load runs in another task) until ``count`` requests were answered."""
    while len(load.answered) < count:  # noqa: ASYNC110 - plain polling of a counter
        await asyncio.sleep(0.02)


# --- reading the log -------------------------------------------------------------------------
async def rows_for(dsn: str, cids: list[str]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT id, correlation_id::text AS cid, status_code, user_id, endpoint, "
            "request_headers::text AS headers, request_body::text AS body "
            "FROM gateway_audit_logs WHERE correlation_id = ANY($1::uuid[])", cids,
        )
    finally:
        await conn.close()


async def wait_rows(dsn: str, cids: list[str], expected: int, within_s: float = 20.0) -> list:
    deadline = time.monotonic() + within_s
    while True:
        rows = await rows_for(dsn, cids)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


def spooled_cids(state_dir: Path) -> list[str]:
    """Correlation ids of rows still in spool files (past each file's replay offset)."""
    out: list[str] = []
    for path in sorted((state_dir / "audit-spool").glob("*.jsonl")):
        offset_path = path.with_suffix(".offset")
        offset = int(offset_path.read_text() or 0) if offset_path.exists() else 0
        with path.open("rb") as fh:
            fh.seek(offset)
            out += [str(from_wire(line)["correlation_id"]) for line in fh
                    if line.endswith(b"\n") and not line.startswith(b"!")]  # "!": a close mark
    return out


def assert_one_row_each(rows: list, load: Load) -> None:
    by_cid: dict[str, list] = {}
    for r in rows:
        by_cid.setdefault(r["cid"], []).append(r)
    dupes = {c: len(v) for c, v in by_cid.items() if len(v) > 1}
    assert not dupes, f"duplicated rows: {dupes}"
    missing = set(load.answered) - set(by_cid)
    assert not missing, f"{len(missing)} answered requests have no row, e.g. {list(missing)[:3]}"
    extra = set(by_cid) - set(load.answered)
    assert not extra, f"rows for requests never answered: {list(extra)[:3]}"
    for cid, status in load.answered.items():
        assert by_cid[cid][0]["status_code"] == status, (load.sent[cid], status)


# --- the tests -------------------------------------------------------------------------------
async def test_every_answered_request_is_exactly_one_row(target: Target, backend: Proc) -> None:
    """Mixed outcomes (allowed, 401 x2, 413, 400, upstream 500, dead backend 503) -> N rows."""
    gw = _gateway(target, backend)
    dead = _gateway(target, backend_url=f"http://127.0.0.1:{free_port()}")
    try:
        load = Load()
        await send_load(gw, load, 280)
        await send_load(dead, load, 20, kinds=("dead_backend",))
        assert load.refused == 0
        for cid, status in load.answered.items():
            assert status == EXPECTED[load.sent[cid]], (load.sent[cid], status)
        probes = await _probes(gw)
        rows = await wait_rows(target.dsn(), list(load.answered) + probes, len(load.answered))
    finally:
        gw.stop()
        dead.stop()
    assert len(load.answered) == 300
    assert_one_row_each(rows, load)  # also: no row for the probe routes' correlation ids
    by_cid = {r["cid"]: r for r in rows}
    unauth = [by_cid[c] for c, k in load.sent.items() if k in ("no_token", "bad_token")]
    assert unauth and all(r["status_code"] == 401 and r["user_id"] is None for r in unauth)
    allowed = [by_cid[c] for c, k in load.sent.items() if k == "allowed"]
    assert all(str(r["user_id"]) == "5f0c1f5e-2d7e-4a44-9b7b-0a8c3e3f1e11" for r in allowed)
    posted = [by_cid[c] for c, k in load.sent.items() if k == "post_body"]
    assert all(json.loads(r["body"])["password"] == "***" for r in posted)
    assert all(TOKEN not in (r["headers"] or "") for r in rows)


async def _probes(gw: Proc) -> list[str]:
    """Hit /health and /ready on both listeners and /metrics on the admin one (404 on the
    public one) with fresh correlation ids; return the ids."""
    cids = []
    probes = [(gw.url, "/health"), (gw.url, "/ready"), (gw.url, "/metrics"),
              (gw.admin_url, "/ready"), (gw.admin_url, "/metrics")]
    async with aiohttp.ClientSession() as session:
        for base, path in probes * 3:
            cid = str(uuid.uuid4())
            cids.append(cid)
            async with session.get(base + path, headers={"X-Correlation-ID": cid}) as r:
                assert r.status in ((404,) if base == gw.url and path == "/metrics" else (200, 503))
    return cids


async def test_sigterm_mid_load_rows_plus_spool_equal_answers(
    target: Target, backend: Proc
) -> None:
    """Graceful stop under load: table + spool == answered; after a restart, table alone."""
    gw = _gateway(target, backend)
    load = Load()
    task = asyncio.create_task(send_load(gw, load, 100_000, concurrency=12,
                                         stop_when_refused=True))
    await until_answered(load, 150)
    await asyncio.to_thread(gw.stop, 20.0)
    await asyncio.wait_for(task, 30)
    assert gw.popen.returncode is not None and load.refused > 0
    answered = list(load.answered)
    assert len(answered) >= 150
    spooled = spooled_cids(target.state_dir)
    if target.kind == "embedded":  # the gateway stopped its server on the way out
        server = EmbeddedPostgres(target.state_dir / "pgdata")
        await asyncio.to_thread(server.start)
        try:
            in_table = await rows_for(server.dsn(), answered)
        finally:
            await asyncio.to_thread(server.stop, True)
    else:
        in_table = await rows_for(target.dsn(), answered)
    cids = [r["cid"] for r in in_table] + spooled
    assert len(cids) == len(set(cids)), "a row is both in the table and in the spool"
    assert sorted(cids) == sorted(answered)
    # a restarted gateway on the same state directory replays what was spooled
    gw2 = _gateway(target, backend)
    try:
        rows = await wait_rows(target.dsn(), answered, len(answered))
    finally:
        gw2.stop()
    assert_one_row_each(rows, load)


async def test_database_outage_mid_load_still_exactly_n_rows(
    controlled_pg: ControlledPostgres, backend: Proc, tmp_path: Path
) -> None:
    """PostgreSQL stopped and started under load: every row arrives once, none duplicated."""
    env: dict[str, str | None] = {
        "DATABASE_URL": controlled_pg.admin_dsn, "PLANT_STATE_DIR": str(tmp_path)
    }
    target = Target("controlled", env, tmp_path, lambda: controlled_pg.admin_dsn)
    gw = _gateway(target, backend)
    load = Load()
    try:
        await send_load(gw, load, 140)
        await asyncio.to_thread(controlled_pg.stop)
        await send_load(gw, load, 140)  # database down: answers keep coming, rows go to disk
        assert len(spooled_cids(tmp_path)) > 0
        await asyncio.to_thread(controlled_pg.start)
        await send_load(gw, load, 140)
        assert load.refused == 0 and len(load.answered) == 420
        rows = await wait_rows(controlled_pg.admin_dsn, list(load.answered), 420)
        assert_one_row_each(rows, load)
        await asyncio.sleep(0.5)  # a late duplicate from the replay would show up now
        assert len(await rows_for(controlled_pg.admin_dsn, list(load.answered))) == 420
        metrics = await _metrics(gw)
    finally:
        gw.stop()
    assert metrics.get("plant_gateway_audit_rows_lost_total") == 0.0
    assert metrics.get("plant_gateway_audit_rows_replayed_total", 0.0) > 0


async def _metrics(gw: Proc) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("plant_gateway_audit_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_sigterm_during_outage_spools_then_restart_replays(
    controlled_pg: ControlledPostgres, backend: Proc, tmp_path: Path
) -> None:
    """Database down, then SIGTERM under load: the answered rows are in table + spool, and a
    gateway restarted on the same state directory replays the spool: exactly one row each."""
    env: dict[str, str | None] = {
        "DATABASE_URL": controlled_pg.admin_dsn, "PLANT_STATE_DIR": str(tmp_path)
    }
    target = Target("controlled", env, tmp_path, lambda: controlled_pg.admin_dsn)
    gw = _gateway(target, backend)
    load = Load()
    await send_load(gw, load, 70)
    await asyncio.to_thread(controlled_pg.stop)
    task = asyncio.create_task(send_load(gw, load, 100_000, concurrency=12,
                                         stop_when_refused=True))
    await until_answered(load, 200)
    await asyncio.to_thread(gw.stop, 20.0)
    await asyncio.wait_for(task, 30)
    answered = list(load.answered)
    spooled = spooled_cids(tmp_path)
    assert len(spooled) > 0
    await asyncio.to_thread(controlled_pg.start)
    in_table = [r["cid"] for r in await rows_for(controlled_pg.admin_dsn, answered)]
    assert sorted(in_table + spooled) == sorted(answered)
    gw2 = _gateway(target, backend)
    try:
        rows = await wait_rows(controlled_pg.admin_dsn, answered, len(answered))
    finally:
        gw2.stop()
    assert_one_row_each(rows, load)
