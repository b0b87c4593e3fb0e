"""Cloud Run's case through real gateway processes: two instances share a Redis (the test's own,
on its own port) and a PostgreSQL the test stops. Instance A answers requests while the
database is down, then is stopped (SIGTERM) and its state directory deleted, as Cloud Run does
with an instance and its in-memory file system; instance B, started afterwards on a directory
of its own, writes every row A answered for. Counted by correlation id: one row per answer.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis

from plant_gateway.audit.checkpoints import MARK_PREFIX
from plant_gateway.audit.spool_redis import TAG
from tests.e2e.test_audit_chaos_e2e import Load, metrics, ready, send, wait_rows
from tests.fixtures.postgres import ControlledPostgres
from tests.fixtures.processes import Proc, start_gateway
from tests.fixtures.redis import RedisServer


def waiting_in_redis(server: RedisServer) -> int:
    """Rows waiting in the shared spool (a chain's close mark is no row)."""
    with redis.Redis.from_url(server.url) as client:
        lists = [f"{TAG}:rows", *client.keys(f"{TAG}:processing:*")]
        lines = [line for key in lists for line in client.lrange(key, 0, -1)]  # type: ignore[union-attr]
    return sum(1 for line in lines if not line.startswith(MARK_PREFIX))


async def test_rows_answered_by_a_stopped_instance_are_written_by_another(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, backend: Proc
) -> None:
    env: dict[str, str | None] = {
        "PLANT_GUARDS": "audit", "DATABASE_URL": controlled_pg.admin_dsn,
        "REDIS_URL": redis_server.url, "UPSTREAM_RETRIES": "0",
    }
    state_a = Path(tempfile.mkdtemp(prefix="pg-state-a-"))
    gw_a = start_gateway({**env, "PLANT_STATE_DIR": str(state_a)}, backend=backend)
    load = Load()
    try:
        await send(gw_a, load, asyncio.Event(), most=50)
        await asyncio.to_thread(controlled_pg.stop)
        await send(gw_a, load, asyncio.Event(), most=1050)  # 1,000 answers, database down
        assert load.count(200) == 1050 and not load.failed
        status, audit = await ready(gw_a)  # the rows are secured: still serving
        assert status == 200 and "rows in the Redis spool" in audit["detail"]
        found = await metrics(gw_a)
        assert found["plant_gateway_audit_redis_spool_rows"] > 0
        assert found["plant_gateway_audit_rows_redis_spooled_total"] > 0
        assert found["plant_gateway_audit_spool_pending_rows"] == 0  # nothing on its disk
        gw_a.popen.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(gw_a.popen.wait, 10)  # Cloud Run's SIGKILL after 10 s
        except subprocess.TimeoutExpired:
            raise AssertionError(gw_a.output()[-3000:]) from None
    finally:
        gw_a.kill()
    shutil.rmtree(state_a)  # the instance and its memory file system are gone
    answered = [cid for cid, (status, _) in load.answered.items() if status == 200]
    # every row answered while the database was down is in Redis (a few of the first 50 may
    # have been queued still when it stopped)
    assert 1000 <= waiting_in_redis(redis_server) <= 1050

    await asyncio.to_thread(controlled_pg.start)
    gw_b = start_gateway(env, backend=backend)
    try:
        rows = await wait_rows(controlled_pg.admin_dsn, answered, within_s=60)
        # the replayer acknowledges a batch (drops its processing list) after the commit
        assert await until(lambda: waiting_in_redis(redis_server) == 0)
    finally:
        gw_b.stop()
    assert len(rows) == len(answered) == 1050
    assert all(len(r) == 1 for r in rows.values()), "a request has two rows"


async def test_a_killed_instance_loses_only_its_last_queued_rows(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, backend: Proc
) -> None:
    """SIGKILL mid-load with the database down: what the writer had pushed to Redis (every
    batch older than one flush interval, 50 ms) survives the instance and is written by the
    next one; only the rows still queued in memory are lost (``audit verify`` reports such a
    chain end). Measured here: 5 to 105 rows of ~800, depending on how busy the machine is."""
    env: dict[str, str | None] = {
        "PLANT_GUARDS": "audit", "DATABASE_URL": controlled_pg.admin_dsn,
        "REDIS_URL": redis_server.url, "UPSTREAM_RETRIES": "0",
    }
    gw_a = start_gateway(env, backend=backend)
    load = Load()
    try:
        await send(gw_a, load, asyncio.Event(), most=20)
        await asyncio.to_thread(controlled_pg.stop)
        stop = asyncio.Event()
        flowing = asyncio.create_task(send(gw_a, load, stop, most=100_000))
        assert await until(lambda: load.count(200) >= 800)
        gw_a.popen.send_signal(signal.SIGKILL)
        stop.set()
        await flowing
    finally:
        gw_a.kill()
    answered = [cid for cid, (status, _) in load.answered.items() if status == 200]
    await asyncio.to_thread(controlled_pg.start)
    gw_b = start_gateway(env, backend=backend)
    try:
        assert await until(lambda: waiting_in_redis(redis_server) == 0)
        rows = await wait_rows(controlled_pg.admin_dsn, answered, within_s=5)
    finally:
        gw_b.stop()
    assert all(len(r) == 1 for r in rows.values()), "a request has two rows"
    lost = [cid for cid in answered if cid not in rows]
    print(f"SIGKILL after {len(answered)} answers: {len(lost)} rows lost")  # noqa: T201
    # only the last answers' rows, still queued in memory: fewer than a batch (500, whose
    # arrival wakes the writer), and nothing older (8 clients answer a little out of order)
    assert len(lost) < 500
    assert set(lost) <= set(answered[-(len(lost) + 8):])


async def until(condition: Callable[[], bool], within_s: float = 60.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
