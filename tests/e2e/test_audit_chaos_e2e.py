"""Audit chaos through real gateway processes: a small spool file system, a stopped or hung
PostgreSQL, SIGTERM. Counted by correlation id: answered requests vs audit rows.

The small file system is real: the gateway runs in its own mount namespace (``unshare -m``)
with a 256 KiB tmpfs on its spool directory, so the kernel answers ENOSPC (skipped where the
runner cannot create one). PostgreSQL is a dedicated embedded server the test stops, starts,
or freezes with SIGSTOP (a hung database: connections open, nothing answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from plant_gateway.audit.checkpoints import MARK_PREFIX
from plant_gateway.audit.schema import from_wire
from tests.fixtures.postgres import ControlledPostgres
from tests.fixtures.processes import Proc, start_gateway

TMPFS = "256k"
ENV = {
    "PLANT_GUARDS": "audit",
    "AUDIT_QUEUE_MAX": "200",
    "AUDIT_BATCH_SIZE": "50",
    # above the tmpfs: the disk fills first (ENOSPC, not the cap); the reserve is 64 KiB
    "AUDIT_SPOOL_MAX_BYTES": str(1024 * 1024),
    "UPSTREAM_RETRIES": "0",
}
# mount the tmpfs on the spool directory ($1), then become the gateway
IN_NAMESPACE = 'mount -t tmpfs -o size=' + TMPFS + ' tmpfs "$1" && shift && exec "$@"'


@dataclass
class Load:
    answered: dict[str, tuple[int, str]] = field(default_factory=dict)  # cid -> status, kind
    failed: set[str] = field(default_factory=set)  # sent, no answer (connection closed)

    def count(self, status: int) -> int:
        return sum(1 for s, _ in self.answered.values() if s == status)


async def one(session: aiohttp.ClientSession, gw: Proc, load: Load, path: str = "/api/v1/x") -> int:
    cid = str(uuid.uuid4())
    try:
        async with session.get(gw.url + path, headers={"X-Correlation-ID": cid}) as resp:
            body = await resp.read()
            problem = resp.content_type == "application/problem+json"
            kind = json.loads(body)["type"].rsplit("/", 1)[-1] if problem else ""
            load.answered[cid] = (resp.status, kind)
            return resp.status
    except (aiohttp.ClientError, ConnectionError):
        load.failed.add(cid)
        return 0


async def send(gw: Proc, load: Load, stop: asyncio.Event, workers: int = 8,
               until_refused: int = 0, most: int = 4000) -> None:
    """Requests from ``workers`` clients until ``stop`` is set, ``until_refused`` answers were
    503s (when > 0), or ``most`` were sent."""
    left = most - len(load.answered) - len(load.failed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:

        async def client() -> None:
            nonlocal left
            while not stop.is_set() and left > 0:
                left -= 1
                await one(session, gw, load)
                if until_refused and load.count(503) >= until_refused:
                    stop.set()

        await asyncio.gather(*(client() for _ in range(workers)))


async def metrics(gw: Proc) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("plant_gateway_audit_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def ready(gw: Proc) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url + "/ready") as r:
        return r.status, (await r.json())["dependencies"]["postgres_audit"]


async def rows_by_cid(dsn: str, cids: list[str]) -> dict[str, list[asyncpg.Record]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT correlation_id::text AS cid, status_code, error_type FROM gateway_audit_logs "
            "WHERE correlation_id = ANY($1::uuid[])", cids)
    finally:
        await conn.close()
    out: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        out.setdefault(row["cid"], []).append(row)
    return out


async def wait_rows(dsn: str, cids: list[str], within_s: float = 30.0) -> dict[str, Any]:
    """Poll the table until every id has a row (or ``within_s`` passed); the rows by id."""
    deadline = time.monotonic() + within_s
    while True:
        rows = await rows_by_cid(dsn, cids)
        if len(rows) >= len(cids) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


async def wait_for(gw: Proc, check: Any, within_s: float = 30.0) -> dict[str, float]:
    """Poll /metrics until ``check(metrics)`` holds; the last metrics either way."""
    deadline = time.monotonic() + within_s
    while True:
        found = await metrics(gw)
        if check(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


def namespaces_available() -> bool:
    probe = subprocess.run(  # noqa: S603
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],  # noqa: S607
        capture_output=True, check=False,
    )
    return probe.returncode == 0


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    (tmp_path / "audit-spool").mkdir()
    return tmp_path


@pytest.fixture
def memory_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory in memory, as on Cloud Run (/dev/shm where the runner has it): the
    shutdown budget is about the database and the gateway, not a CI disk's fsync latency."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        (tmp_path / "audit-spool").mkdir()
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="pgw-chaos-", dir=shm))
    (path / "audit-spool").mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_full_spool_disk_refuses_then_recovers_by_itself(
    controlled_pg: ControlledPostgres, backend: Proc, state_dir: Path
) -> None:
    """PostgreSQL down, spool on a 256 KiB tmpfs: 2xx until the spool (ENOSPC) and the queue
    are full, then 503 audit-unavailable, /ready 503, the gauges say why. PostgreSQL back: the
    gateway recovers without a restart, the spool drains while requests flow, and every
    answered request has exactly one row, except refusals counted in rows_lost_total."""
    if not namespaces_available():
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    wrapper = ("unshare", "-m", "sh", "-c", IN_NAMESPACE, "sh", str(state_dir / "audit-spool"))
    env: dict[str, str | None] = {
        **ENV, "DATABASE_URL": controlled_pg.admin_dsn, "PLANT_STATE_DIR": str(state_dir)}
    gw = start_gateway(env, backend=backend, wrapper=wrapper)
    load = Load()
    try:
        await send(gw, load, asyncio.Event(), most=50)
        assert load.count(200) == 50
        await asyncio.to_thread(controlled_pg.stop)
        await send(gw, load, asyncio.Event(), until_refused=400)
        served_down = load.count(200) - 50
        assert served_down >= 200  # the queue (200) and the tmpfs spool took rows first
        assert {k for s, k in load.answered.values() if s == 503} == {"audit-unavailable"}
        status, audit = await ready(gw)
        assert status == 503 and audit["status"] == "down" and audit["required"]
        assert "No space left on device" in audit["detail"] and "refused" in audit["detail"]
        down = await metrics(gw)
        assert down["plant_gateway_audit_refusing"] == 1
        assert down["plant_gateway_audit_spool_writable"] == 0
        assert down["plant_gateway_audit_database_up"] == 0
        assert down["plant_gateway_audit_rows_lost_total"] > 0
        await asyncio.to_thread(controlled_pg.start)
        stop = asyncio.Event()
        flowing = asyncio.create_task(send(gw, load, stop, workers=4, most=100_000))
        up = await wait_for(gw, lambda m: m["plant_gateway_audit_refusing"] == 0
                            and m["plant_gateway_audit_spool_pending_rows"] == 0)
        stop.set()
        await flowing
        assert up["plant_gateway_audit_refusing"] == 0
        assert up["plant_gateway_audit_spool_pending_rows"] == 0
        assert up["plant_gateway_audit_rows_replayed_total"] > 0
        assert up["plant_gateway_audit_database_up"] == 1
        status, audit = await ready(gw)
        assert status == 200
        await send(gw, load, asyncio.Event(), most=len(load.answered) + 50)
        final = await wait_for(gw, lambda m: m["plant_gateway_audit_queue_depth"] == 0)
    finally:
        gw.stop()
    assert not load.failed
    rows = await rows_by_cid(controlled_pg.admin_dsn, list(load.answered))
    assert all(len(r) == 1 for r in rows.values()), "a request has two rows"
    missing = [cid for cid in load.answered if cid not in rows]
    assert all(load.answered[cid] == (503, "audit-unavailable") for cid in missing)
    assert len(missing) == final["plant_gateway_audit_rows_lost_total"]
    audited_refusals = [r[0] for c, r in rows.items() if load.answered[c][0] == 503]
    assert audited_refusals  # the reserve took some refusals' rows
    assert all(r["error_type"] == "audit-unavailable" for r in audited_refusals)
    assert load.count(200) == sum(1 for c in rows if load.answered[c][0] == 200)


# --- shutdown within the grace ---------------------------------------------------------------
def spooled_cids(state: Path) -> list[str]:
    out: list[str] = []
    for path in sorted((state / "audit-spool").glob("*.jsonl")):
        offset_path = path.with_suffix(".offset")
        offset = int(offset_path.read_text() or 0) if offset_path.exists() else 0
        with path.open("rb") as fh:
            fh.seek(offset)
            out += [str(from_wire(line)["correlation_id"]) for line in fh
                    if line.endswith(b"\n") and not line.startswith(MARK_PREFIX)]
    return out


def spooled_marks(state: Path) -> int:
    """Close marks waiting in the spools (``audit/checkpoints``)."""
    return sum(1 for path in (state / "audit-spool").glob("*.jsonl")
               for line in path.read_bytes().splitlines() if line.startswith(MARK_PREFIX))


async def test_sigterm_with_a_hung_database_and_a_slow_request_exits_within_the_grace(
    controlled_pg: ControlledPostgres, backend: Proc, memory_state_dir: Path
) -> None:
    """SHUTDOWN_GRACE_S=8: a request still running after 5 s is cancelled, the audit flush
    gets the last 3 s and spools what the hung database did not take; the process is gone
    before Cloud Run's SIGKILL (10 s). Every answered request's row is in the table or the
    spool, and a restarted gateway replays the spool."""
    env: dict[str, str | None] = {
        "PLANT_GUARDS": "audit", "DATABASE_URL": controlled_pg.admin_dsn,
        "PLANT_STATE_DIR": str(memory_state_dir), "UPSTREAM_READ_TIMEOUT_S": "60"}
    gw = start_gateway(env, backend=backend)
    load = Load()
    try:
        await send(gw, load, asyncio.Event(), most=100)
        with controlled_pg.frozen():
            await send(gw, load, asyncio.Event(), most=150)  # rows queue: COPY hangs
            async with aiohttp.ClientSession() as session:
                slow = asyncio.create_task(one(session, gw, load, "/slow?delay=30"))
                await asyncio.sleep(0.5)
                started = time.monotonic()
                gw.popen.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(gw.popen.wait, 10)  # Cloud Run's SIGKILL
                took = time.monotonic() - started
                code = gw.popen.returncode
                await slow
    finally:
        log = gw.output()
        gw.kill()
    # uvicorn ends a graceful stop by re-raising the signal it caught: -SIGTERM is a clean exit
    overrun = [line for line in log.splitlines() if "shutdown overran" in line]
    assert code in (0, -signal.SIGTERM), "\n".join(overrun) or log[-3000:]
    assert log.count("AUDIT_CHAIN_KEY is not set") == 1  # said once, at start
    assert took < 10, took
    answered = [c for c, (s, _) in load.answered.items() if s == 200]
    cut = [c for c, (s, _) in load.answered.items() if s != 200] + list(load.failed)
    assert len(answered) == 150 and len(cut) == 1  # the slow one: cancelled after 5 s
    in_table = await rows_by_cid(controlled_pg.admin_dsn, answered)
    spooled = spooled_cids(memory_state_dir)
    # usually the frozen database holds the last rows back and shutdown spools them; on a
    # loaded machine the freeze can land after the last COPY: then the table has them all
    assert spooled or set(in_table) >= set(answered), "rows neither in the table nor spooled"
    # a COMMIT the frozen server read before SIGSTOP but answered after it: that batch is in
    # the table and (unacknowledged) in the spool; the replay's ON CONFLICT absorbs it
    assert set(in_table) | set(spooled) >= set(answered)
    if spooled:  # the chain's close mark went after its rows
        assert spooled_marks(memory_state_dir) == 1
    again = start_gateway(env, backend=backend)
    try:
        rows = await wait_rows(controlled_pg.admin_dsn, answered)
    finally:
        again.stop()
    assert len(rows) == 150 and all(len(r) == 1 for r in rows.values())
    assert len((await rows_by_cid(controlled_pg.admin_dsn, cut)).get(cut[0], [])) <= 1
    # the close mark followed the rows (spooled, or written when the table had them all): the
    # chain is closed cleanly, not taken for a crash
    done = await asyncio.to_thread(audit_verify, controlled_pg.admin_dsn)
    assert done.returncode == 0, done.stdout
    assert len(re.findall(r"^CLOSED: .* closed cleanly at seq ", done.stdout, re.M)) == 1, \
        done.stdout
    assert "UNCLOSED" not in done.stdout and "LIVE" not in done.stdout


# --- SIGKILL: bounded loss, named by `audit verify` ------------------------------------------
CHAIN_KEY = "e2e-chain-key-" + "9" * 32
UNCLOSED = re.compile(r"^UNCLOSED: (\S+): ended without a clean close .*last seq (\d+) .*"
                      r"at most (\d+) more row\(s\) lost", re.MULTILINE)


async def paced(gw: Proc, load: Load, stop: asyncio.Event, rate: float = 250.0,
                workers: int = 8) -> None:
    """About ``rate`` requests a second from ``workers`` clients until ``stop`` is set."""
    gap = workers / rate
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def client() -> None:
            while not stop.is_set():
                started = time.monotonic()
                if not await one(session, gw, load):
                    return  # the gateway is gone
                await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))

        await asyncio.gather(*(client() for _ in range(workers)))


def audit_verify(dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "plant_gateway.cli", "audit", "verify", "--database-url", dsn],
        env={**env, "AUDIT_CHAIN_KEY": CHAIN_KEY}, capture_output=True, text=True, timeout=60,
        check=False,
    )


async def test_sigkill_under_load_loses_at_most_the_bound_audit_verify_reports(
    controlled_pg: ControlledPostgres, backend: Proc, state_dir: Path
) -> None:
    """A gateway SIGKILLed at 250 req/s: the rows it held in memory are gone, but no more than
    the bound `audit verify` reports for its chain, which it names as ended without a clean
    close, with the last sequence the table holds; nothing is reported as tampered."""
    env: dict[str, str | None] = {
        "PLANT_GUARDS": "audit", "DATABASE_URL": controlled_pg.admin_dsn,
        "PLANT_STATE_DIR": str(state_dir), "AUDIT_QUEUE_MAX": "400", "AUDIT_BATCH_SIZE": "50",
        "AUDIT_CHECKPOINT_INTERVAL_S": "0.2", "AUDIT_CHAIN_KEY": CHAIN_KEY}
    gw = start_gateway(env, backend=backend)
    load = Load()
    stop = asyncio.Event()
    try:
        sending = asyncio.create_task(paced(gw, load, stop))
        await asyncio.sleep(4.0)
        os.killpg(gw.popen.pid, signal.SIGKILL)  # the gateway and anything it started
        await asyncio.to_thread(gw.popen.wait, 10)
        stop.set()
        await sending
    finally:
        gw.kill()
    assert "AUDIT_CHAIN_KEY is not set" not in gw.output()
    answered = [cid for cid, (status, _) in load.answered.items() if status == 200]
    assert len(answered) > 500  # about 4 s at 250 req/s
    rows = await rows_by_cid(controlled_pg.admin_dsn, answered)
    lost = len(answered) - len(rows)
    chains = await fetch_chains(controlled_pg.admin_dsn)
    assert len(chains) == 1, chains
    (inst, last_seq), = chains.items()
    deadline = time.monotonic() + 20
    while True:  # "still running" until its last checkpoint is old (3.4 s here)
        done = await asyncio.to_thread(audit_verify, controlled_pg.admin_dsn)
        found = UNCLOSED.search(done.stdout)
        if found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert found, done.stdout + done.stderr
    assert done.returncode == 0, done.stdout  # a crash is no tampering
    assert found.group(1) == inst and int(found.group(2)) == last_seq
    bound = int(found.group(3))
    assert bound == 400 + 50 + 50  # queue + slack + the batch being written
    assert 0 <= lost <= bound, (lost, bound)
    assert "Traceback" not in done.stdout + done.stderr
    print(f"SIGKILL at 250 req/s: {len(answered)} answered 2xx, {lost} rows lost, "
          f"bound {bound}, last seq {last_seq}\n{done.stdout}")


async def fetch_chains(dsn: str) -> dict[str, int]:
    """instance_id -> highest seq in the table."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT instance_id, max(seq) AS s FROM gateway_audit_logs "
                                "GROUP BY instance_id")
    finally:
        await conn.close()
    return {r["instance_id"]: r["s"] for r in rows}
