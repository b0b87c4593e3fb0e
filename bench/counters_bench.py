"""Added latency of the shared-state guards (revocation, rate limit, trial quota, budget).

Same run: the real steps (auth with a cached token, rate_limit, trial_quota, budget, admit) on
in-process counters vs Redis on loopback — batched as in the pipeline (one round trip) and
unbatched (one per guard) — the same five commands as a redis-py ``Pipeline`` (what the batch
used to cost), and the hot ``{budget}`` slot. The CPU table is what matters for throughput:
gateway process CPU µs per op with 32 concurrent requesters on one uvloop loop.
``python -m bench.counters_bench [-n 5000] [-c 32] [--loop uvloop|asyncio]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import redis

from plant_gateway.backends.base import BudgetRequest
from plant_gateway.context import Identity, RequestContext
from plant_gateway.counters import (
    AuthStateOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
)
from plant_gateway.counters.common import Gcra, day_ttl, utc_day, utc_month
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.counters.redis import SCRIPTS, RedisCounters, budget_args
from plant_gateway.deps import Dependencies
from plant_gateway.guards import auth, budget, rate_limit, trial_quota
from plant_gateway.pipeline import counter_batch
from plant_gateway.settings import RateTier, Settings

TRIAL = Identity(user_id="bench-user", roles=["user"], trial_mode=True, agent_id="agent-1")


def settings_for(url: str | None) -> Settings:
    huge = RateTier(limit=10**9, period_s=3600, burst=10**6)
    return Settings(
        plant_backend_url="http://127.0.0.1:9",
        jwt_secret="bench-secret-0123456789abcdef0123456789abcdef",
        redis_url=url,
        redis_key_prefix=f"bench{uuid.uuid4().hex[:8]}:",
        rate_tiers={"trial": huge, "paid": huge, "anonymous": huge},
        trial_daily_tasks=10**9,
        agent_daily_budget_usd=10**9,
        platform_monthly_budget_usd=10**12,
    )


def context() -> RequestContext:
    ctx = RequestContext("r", "c", "POST", "/api/v1/tasks", "", {}, "127.0.0.1")
    ctx.identity, ctx.resource, ctx.action = TRIAL, "tasks", "create"
    return ctx


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    for _ in range(min(200, n)):
        await fn()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - started) * 1e6)
    return out


def bearer(s: Settings) -> str:
    """An HS256 trial token for the bench user (verified once, then served from the cache)."""
    assert s.jwt_secret is not None
    now = int(time.time())
    claims = {"user_id": "bench-user", "sub": "bench-user", "email": "b@example.com",
              "roles": ["user"], "iat": now, "exp": now + 3600, "iss": s.jwt_issuers[0],
              "jti": "jti-bench", "trial_mode": True, "agent_id": "agent-1",
              "trial_expires_at": "2099-01-01T00:00:00+00:00"}
    return "Bearer " + jwt.encode(claims, s.jwt_secret.get_secret_value(), algorithm="HS256")


def guard_chain(counters: Any, s: Settings, batched: bool) -> Callable[[], Awaitable[None]]:
    """The real steps auth, rate_limit, trial_quota, budget (+ the counter batch, which runs them).

    ``batched``: as ``build_pipeline`` sets them (one round trip); else each step awaits its
    own op (one round trip per guard, the pre-batching path).
    """
    deps = Dependencies(settings=s, counters=counters, flags=None)  # type: ignore[arg-type]
    steps: list[Any] = [m.GUARD.create(s, deps) for m in (auth, rate_limit, trial_quota, budget)]
    for step in steps:
        step.batched = batched
    steps.append(counter_batch.build(s, deps))
    header = bearer(s)

    async def run() -> None:
        ctx = context()
        ctx.headers["authorization"] = header
        for step in steps:
            assert await step.run(ctx) is None

    return run


def pipelined(counters: RedisCounters, s: Settings) -> Callable[[], Awaitable[None]]:
    """All four guards' Redis work as one redis-py Pipeline (the batch's path before the
    RESP channel; still the path on a Cluster or TLS)."""
    gcra = Gcra(10**9, 3600, 10**6)
    request = BudgetRequest(0.001, 10**12, "agent-1", 10**9)

    async def run() -> None:
        now = time.time()
        pipe = counters.client.pipeline(transaction=False)
        pipe.exists(f"{s.revoked_prefix}jti-bench")
        pipe.get(f"{s.token_version_prefix}bench-user")
        rl = [counters.rate_key("user:bench-user")]
        pipe.evalsha(SCRIPTS["rate"].sha, 1, *rl, int(now * 1e6), gcra.interval, gcra.window)
        quota_key = f"{counters.prefix}q:{{trial:bench-user}}:{utc_day(now)}"
        pipe.evalsha(SCRIPTS["quota"].sha, 1, quota_key, 10**9, day_ttl(now))
        keys = counters.budget_keys(utc_day(now), utc_month(now), "agent-1", None)
        pipe.evalsha(SCRIPTS["budget"].sha, 3, *keys, *budget_args(request, now))
        await pipe.execute()

    return run


async def hot_slot(counters: RedisCounters, concurrency: int, seconds: float) -> float:
    """Budget check-and-charge per second on the one ``{budget}`` slot, many agents at once."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        request = BudgetRequest(0.001, 10**12, f"agent-{i}", 10**9)
        while time.perf_counter() < stop:
            await counters.budget_charge(request)
            done += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / seconds


async def cpu_per_op(
    fn: Callable[[], Awaitable[Any]], concurrency: int, ops_per_worker: int
) -> tuple[float, float]:
    """(gateway CPU µs per op, ops/s) with ``concurrency`` requesters on one event loop.

    Process CPU time (user + system of this process only: Redis is another process) divided
    by the ops done: what one request's guards cost the gateway's single core.
    """

    async def worker() -> None:
        for _ in range(ops_per_worker):
            await fn()

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm: connections, caches
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    ops = concurrency * ops_per_worker
    return cpu / ops * 1e6, ops / wall


async def cpu_table(
    rows: list[tuple[str, Callable[[], Awaitable[Any]]]], concurrency: int, n: int
) -> None:
    print(f"\n{'CPU, ' + str(concurrency) + ' concurrent requesters':<42}"
          f"{'CPU µs/op':>10}{'ops/s':>10}")
    for name, fn in rows:
        cpu, rate = await cpu_per_op(fn, concurrency, max(1, n // concurrency))
        print(f"{name:<42}{cpu:>10.1f}{rate:>10.0f}")


def script_usec(url: str) -> dict[str, float]:
    info = redis.Redis.from_url(url).info("commandstats")
    return {k: v["usec_per_call"] for k, v in info.items() if k in ("cmdstat_evalsha",)}


def batch_only(counters: RedisCounters) -> Callable[[], Awaitable[Any]]:
    """The counters backend's ``execute`` of one request's ops, no steps around it."""
    request = BudgetRequest(0.001, 10**12, "agent-1", 10**9)
    ops: list[CounterOp] = [
        AuthStateOp("jti-bench", "bench-user"),
        RateLimitOp("user:bench-user", 10**9, 3600, 10**6),
        DailyQuotaOp("trial:bench-user", 10**9, None),
        BudgetChargeOp(request),
    ]

    async def run() -> None:
        for result in await counters.execute(ops):
            assert not isinstance(result, Exception), result

    return run


async def main(url: str, n: int, concurrency: int) -> None:
    rows: list[tuple[str, list[float]]] = []
    s_mem = settings_for(None)
    memory = MemoryCounters(s_mem)
    rows.append(("in-process, 4 guards, batched steps", await measure(
        guard_chain(memory, s_mem, True), n)))
    s_red = settings_for(url)
    red = RedisCounters(s_red, url)
    await red.start()
    chain = await measure(guard_chain(red, s_red, True), n)
    rows.append(("redis loopback, batched steps (1 RTT)", chain))
    chain = await measure(guard_chain(red, s_red, False), n)
    rows.append(("redis loopback, steps in turn (4 RTT)", chain))
    rows.append(("redis loopback, execute() of the batch", await measure(batch_only(red), n)))
    rows.append(("redis-py Pipeline, same 5 commands", await measure(pipelined(red, s_red), n)))
    ping = await measure(red.client.ping, n)
    await cpu_table([
        ("in-process, 4 guards, batched steps", guard_chain(memory, s_mem, True)),
        ("redis, 4 guards, batched steps", guard_chain(red, s_red, True)),
        ("redis, execute() of the 5-op batch", batch_only(red)),
        ("redis-py Pipeline, same 5 commands", pipelined(red, s_red)),
        ("redis, bare PING", red.client.ping),
    ], concurrency, n)
    rows.append(("redis loopback, bare PING (1 RTT)", ping))
    print(f"\n{'guards':<42}{'p50 µs':>10}{'p99 µs':>10}{'mean µs':>10}")
    for name, samples in rows:
        print(f"{name:<42}{pct(samples, .5):>10.0f}{pct(samples, .99):>10.0f}"
              f"{statistics.fmean(samples):>10.0f}")
    for conc in (1, 16, 64):
        rate = await hot_slot(red, conc, 2.0)
        print(f"hot {{budget}} slot, {conc:>2} concurrent agents: {rate:>8.0f} charges/s")
    rl_rate = await hot_slot_rate_limit(red, 64, 2.0)
    print(f"rate-limit script, 64 principals (spread slots): {rl_rate:>8.0f} checks/s")
    print(f"redis server time per EVALSHA: {script_usec(url)}")
    await red.close()


async def hot_slot_rate_limit(counters: RedisCounters, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await counters.rate_limit(f"user:{i}", 10**9, 3600, 10**6)
            done += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the gateway serves on uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.redis_url, args.n, args.concurrency))
    else:
        asyncio.run(main(args.redis_url, args.n, args.concurrency))
