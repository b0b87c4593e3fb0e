"""Dependencies failing under load, through real processes, counted by correlation id.

A gateway with auth, rate limits and audit, its own Redis and its own PostgreSQL (never the
machine's): Redis killed, restarted, then frozen (SIGSTOP) and thawed; PostgreSQL SIGKILLed
(a crash, not a shutdown) and started again. What a user of the gateway must see:
- while Redis is gone or hung, every request is refused 503 (fail closed, never served
  unchecked) within the Redis timeout plus a small slack — no hang;
- answers return to 200 by themselves once Redis is back, without restarting the gateway;
- every answered request, 200 or 503, has exactly one audit row, through the database crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest

from tests.fixtures.postgres import ControlledPostgres
from tests.fixtures.processes import Proc, mint_token, start_gateway
from tests.fixtures.redis import RedisServer

REDIS_TIMEOUT_S = 0.5
SLACK_S = 1.5  # a loaded 2-core runner: scheduling, the client, the audit of the refusal
TOKEN = mint_token(user_id="7d1c8a52-0a43-4a6e-9a53-4c8f1f6a2b10", roles=["admin"])
TIERS = {t: {"limit": 1_000_000, "period_s": 3600, "burst": 100_000}
         for t in ("trial", "paid", "governor", "enterprise", "anonymous", "service")}


@dataclass
class Load:
    answered: dict[str, int] = field(default_factory=dict)  # correlation id -> status
    slowest_s: float = 0.0

    def statuses(self, cids: list[str]) -> list[int]:
        return [self.answered[c] for c in cids]


async def send(gw: Proc, load: Load, count: int, workers: int = 8) -> list[str]:
    """``count`` GETs from ``workers`` clients; the correlation ids sent, in order."""
    cids = [str(uuid.uuid4()) for _ in range(count)]
    queue = list(reversed(cids))
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            while queue:
                cid = queue.pop()
                started = time.monotonic()
                headers = {"Authorization": f"Bearer {TOKEN}", "X-Correlation-ID": cid}
                async with session.get(gw.url + "/api/v1/agents", headers=headers) as resp:
                    await resp.read()
                    load.answered[cid] = resp.status
                load.slowest_s = max(load.slowest_s, time.monotonic() - started)

        await asyncio.gather(*(client() for _ in range(workers)))
    return cids


async def until_served(gw: Proc, load: Load, within_s: float = 15.0) -> float:
    """Seconds until a request is served (200) again; every try is counted in ``load``."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if (await send(gw, load, 1, workers=1)) and list(load.answered.values())[-1] == 200:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"not served again within {within_s} s")


async def rows_by_cid(dsn: str, cids: list[str], within_s: float = 30.0) -> dict[str, list[int]]:
    """Audit rows' statuses per correlation id, once every id has one (or the time is up)."""
    deadline = time.monotonic() + within_s
    while True:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT correlation_id::text AS cid, status_code FROM gateway_audit_logs "
                "WHERE correlation_id = ANY($1::uuid[])", cids)
        finally:
            await conn.close()
        found: dict[str, list[int]] = {}
        for row in rows:
            found.setdefault(row["cid"], []).append(row["status_code"])
        if len(found) >= len(cids) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.3)


@contextlib.contextmanager
def frozen(redis: RedisServer) -> Iterator[None]:
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def test_redis_and_postgres_failing_under_load(
    redis: RedisServer, controlled_pg: ControlledPostgres, backend: Proc
) -> None:
    gw = start_gateway({
        "PLANT_GUARDS": "auth,rate_limit,audit", "REDIS_URL": redis.url,
        "REDIS_TIMEOUT_S": str(REDIS_TIMEOUT_S), "RATE_TIERS": json.dumps(TIERS),
        "DATABASE_URL": controlled_pg.admin_dsn, "AUDIT_FLUSH_INTERVAL_S": "0.05",
        "UPSTREAM_RETRIES": "0",
    }, backend=backend)
    load = Load()
    recovery: dict[str, float] = {}
    try:
        healthy = await send(gw, load, 100)
        assert load.statuses(healthy) == [200] * 100

        await asyncio.to_thread(redis.stop)  # SIGKILL: connections reset
        load.slowest_s = 0.0
        killed = await send(gw, load, 100)
        assert load.statuses(killed) == [503] * 100
        assert load.slowest_s < REDIS_TIMEOUT_S + SLACK_S
        await asyncio.to_thread(redis.start)  # same port, empty: the scripts load again
        recovery["redis restarted"] = await until_served(gw, load)

        with frozen(redis):  # connections open, nothing answers
            load.slowest_s = 0.0
            hung = await send(gw, load, 40)
            assert load.statuses(hung) == [503] * 40
            assert load.slowest_s < REDIS_TIMEOUT_S + SLACK_S, load.slowest_s
        recovery["redis thawed"] = await until_served(gw, load)

        during_crash = await send(gw, load, 50)
        await asyncio.to_thread(controlled_pg.kill)  # the audit database crashes mid-load
        during_crash += await send(gw, load, 150)  # rows go to the spool meanwhile
        assert load.statuses(during_crash) == [200] * 200
        await asyncio.to_thread(controlled_pg.start)  # crash recovery, then the replay
        restarted = time.monotonic()
        after = await send(gw, load, 50)
        assert load.statuses(after) == [200] * 50
        answered = list(load.answered)
        rows = await rows_by_cid(controlled_pg.admin_dsn, answered)  # the spool replayed
        recovery["audit rows replayed"] = time.monotonic() - restarted
    finally:
        gw.stop()
    missing = [c for c in answered if c not in rows]
    doubled = [c for c, statuses in rows.items() if len(statuses) > 1]
    assert not missing and not doubled, (len(missing), len(doubled), gw.output()[-3000:])
    assert all(rows[c] == [s] for c, s in load.answered.items())  # the status answered
    assert all(seconds < 15 for seconds in recovery.values()), recovery
    print("recovery (s):", {k: round(v, 2) for k, v in recovery.items()})
