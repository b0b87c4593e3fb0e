"""Hot ``{budget}`` slot on a Redis Cluster vs one standalone Redis (same redis-server binary).

Budget check-and-charge per second with 16/32/64 concurrent clients (spread over ``--procs``
load processes), the CPU share of the Redis process that owns the budget slot, and for contrast
the whole per-request batch (revocation, rate, quota, budget).
``python -m bench.counters_cluster_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import redis

from plant_gateway.backends.base import BudgetRequest
from plant_gateway.counters import (
    AuthStateOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
)
from plant_gateway.counters.redis import RedisCounters
from plant_gateway.settings import Settings


def settings_for(url: str, cluster: bool, prefix: str) -> Settings:
    return Settings(plant_backend_url="http://127.0.0.1:9", redis_url=url, redis_cluster=cluster,
                    redis_key_prefix=prefix, redis_timeout_s=2.0)


def ops_for(kind: str, worker: int, n: int) -> list[CounterOp]:
    budget = BudgetChargeOp(BudgetRequest(1e-6, 10**12, f"agent-{worker}", 10**9))
    if kind == "budget":
        return [budget]
    user = f"u{worker}-{n % 1000}"
    return [AuthStateOp(f"jti-{user}", user),
            RateLimitOp(f"user:{user}", 10**9, 3600, 10**6),
            DailyQuotaOp(f"trial:{user}", 10**9, None), budget]


async def load(url: str, cluster: bool, prefix: str, kind: str, conc: int, seconds: float,
               first: int) -> int:
    counters = RedisCounters(settings_for(url, cluster, prefix), url)
    await counters.start()
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < stop:
            results = await counters.execute(ops_for(kind, i, n))
            assert not any(isinstance(r, Exception) for r in results), results
            n += 1
            done += 1

    await asyncio.gather(*(worker(first + i) for i in range(conc)))
    await counters.close()
    return done


def load_process(args: tuple[str, bool, str, str, int, float, int]) -> int:
    return asyncio.run(load(*args))


async def latency(url: str, cluster: bool, kind: str, n: int) -> tuple[float, float]:
    """(p50, p99) µs of one batch, one client, sequential: the client + round-trip cost."""
    counters = RedisCounters(settings_for(url, cluster, f"lat{uuid.uuid4().hex[:6]}:"), url)
    await counters.start()
    samples = []
    for i in range(n + 200):
        started = time.perf_counter()
        await counters.execute(ops_for(kind, 0, i))
        samples.append((time.perf_counter() - started) * 1e6)
    await counters.close()
    ordered = sorted(samples[200:])
    return ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]


def evalsha_usec(port: int) -> float:
    with redis.Redis(port=port) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


def cpu_seconds(port: int) -> float:
    with redis.Redis(port=port) as client:
        info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def budget_port(url: str, cluster: bool, prefix: str) -> int:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    if not cluster:
        return port
    with redis.RedisCluster.from_url(url) as client:
        slot = client.keyslot(f"{prefix}{{budget}}:platform:x")
        return int(client.nodes_manager.get_node_from_slot(slot).port)


def run(pool: ProcessPoolExecutor, url: str, cluster: bool, kind: str, conc: int,
        seconds: float, procs: int) -> tuple[float, float]:
    """(requests/s, CPU share of the Redis process owning the budget slot)."""
    prefix = f"bench{uuid.uuid4().hex[:6]}:"
    hot = budget_port(url, cluster, prefix)
    share = conc // procs
    jobs = [(url, cluster, prefix, kind, share, seconds, p * share) for p in range(procs)]
    cpu0, t0 = cpu_seconds(hot), time.perf_counter()
    total = sum(pool.map(load_process, jobs))
    cpu1, t1 = cpu_seconds(hot), time.perf_counter()
    return total / seconds, (cpu1 - cpu0) / (t1 - t0)


def main(seconds: float, procs: int) -> None:
    from tests.fixtures.redis import RedisClusterProcesses, RedisServer

    standalone, cluster = RedisServer(), RedisClusterProcesses()
    standalone.start()
    cluster.start()
    try:
        print(f"{'target':<12}{'batch':<10}{'p50 µs':>8}{'p99 µs':>8}  (1 client, sequential)")
        for kind in ("budget", "request"):
            for name, url, is_cluster in (("standalone", standalone.url, False),
                                          ("cluster", cluster.url, True)):
                p50, p99 = asyncio.run(latency(url, is_cluster, kind, 3000))
                print(f"{name:<12}{kind:<10}{p50:>8.0f}{p99:>8.0f}")
        print(f"{'target':<12}{'batch':<10}{'clients':>8}{'req/s':>10}{'hot node CPU':>14}")
        with ProcessPoolExecutor(procs) as pool:
            for kind in ("budget", "request"):
                for conc in (16, 32, 64):
                    for name, url, is_cluster in (("standalone", standalone.url, False),
                                                  ("cluster", cluster.url, True)):
                        rate, cpu = run(pool, url, is_cluster, kind, conc, seconds, procs)
                        print(f"{name:<12}{kind:<10}{conc:>8}{rate:>10.0f}{cpu:>13.0%}")
        hot = budget_port(cluster.url, True, "")
        print(f"server µs per EVALSHA: standalone {evalsha_usec(standalone.port):.1f}, "
              f"cluster hot node {evalsha_usec(hot):.1f}")
    finally:
        cluster.stop()
        standalone.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=2, help="load-generating processes")
    args = parser.parse_args()
    main(args.seconds, args.procs)
