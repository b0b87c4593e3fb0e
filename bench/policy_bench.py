"""Policy decision latency: in-process cold (cache miss) and warm (cache hit), and remote OPA.

Run: ``.venv/bin/python bench/policy_bench.py [--n 5000]``; prints a Markdown table (one run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plant_gateway.backends.policy_local import LocalPolicyEngine  # noqa: E402
from plant_gateway.backends.policy_remote import RemotePolicyEngine  # noqa: E402
from plant_gateway.context import Identity, RequestContext  # noqa: E402
from plant_gateway.guards.policy import build_input  # noqa: E402
from plant_gateway.settings import Settings  # noqa: E402


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, samples_s: list[float]) -> str:
    us = [s * 1e6 for s in samples_s]
    return (f"| {name} | {len(us)} | {statistics.median(us):.1f} | {pct(us, 0.99):.1f} |")


def sample_input(settings: Settings, user: int) -> dict[str, Any]:
    identity = Identity(user_id=f"user-{user}", subject=f"user-{user}", email="u@example.com",
                        roles=["user"], customer_id="cust-1", trial_mode=True,
                        trial_expires_at="2099-01-01T00:00:00Z")
    ctx = RequestContext(request_id="r", correlation_id="c", method="POST",
                         path=f"/api/v1/agents/agent-{user}/execute", query_string="",
                         headers={}, client_ip="127.0.0.1", identity=identity)
    return build_input(ctx, settings.gateway_type, None)


def bench_local(settings: Settings, n: int) -> list[str]:
    engine = LocalPolicyEngine(settings, watch=False)
    inputs = [sample_input(settings, k) for k in range(n)]
    cold = []
    for doc in inputs:  # every input is new: compiled-bundle evaluation + digest + insert
        t = time.perf_counter()
        engine.decide_sync(doc)
        cold.append(time.perf_counter() - t)
    warm = []
    for doc in inputs:  # same inputs again, fresh clock: cache hits
        doc = {**doc, "now_ns": time.time_ns()}
        t = time.perf_counter()
        engine.decide_sync(doc)
        warm.append(time.perf_counter() - t)
    step = []
    for k in range(n):  # the step's whole share: build the input, then a cache hit
        t = time.perf_counter()
        engine.decide_sync(sample_input(settings, k))
        step.append(time.perf_counter() - t)
    assert engine.cache.hits >= 2 * n, engine.cache.hits
    return [row("in-process, cold (cache miss)", cold),
            row("in-process, warm (cache hit)", warm),
            row("in-process, warm incl. input building", step)]


async def bench_remote(settings: Settings, n: int) -> list[str]:
    from tests.integration.opa_server import OpaServer

    server = OpaServer()
    try:
        remote = RemotePolicyEngine(settings.model_copy(update={"opa_service_url": server.url}))
        await remote.start()
        doc = sample_input(settings, 1)
        for _ in range(50):
            await remote.decide(doc)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            await remote.decide(doc)
            samples.append(time.perf_counter() - t)
        await remote.close()
    finally:
        server.stop()
    return [row("remote OPA (test server, loopback)", samples)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--remote-n", type=int, default=1000)
    args = parser.parse_args()
    settings = Settings(plant_backend_url="http://127.0.0.1:9", policy_cache_size=2 * args.n)
    lines = ["| decision | n | p50 µs | p99 µs |", "|---|---:|---:|---:|"]
    lines += bench_local(settings, args.n)
    lines += asyncio.run(bench_remote(settings, args.remote_n))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
