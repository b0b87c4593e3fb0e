"""Three gateway processes sharing one Redis: exact rate limits and budgets charged once.

Real processes over HTTP (demo backend, ``plant-gateway serve``), the machine's Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import redis

from tests.fixtures.processes import Proc

N, K = 12, 9


def limits_env(redis_url: str, prefix: str) -> dict[str, str | None]:
    tiers = {t: {"limit": N, "period_s": 3600, "burst": N - 1}
             for t in ("trial", "paid", "governor", "enterprise", "anonymous")}
    return {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "RATE_TIERS": json.dumps(tiers),
        "COST_PER_REQUEST_USD": "0.002",
        "PLANT_GUARDS": "auth,rate_limit,budget,tenant",
    }


async def burst(urls: list[str], token: str, total: int) -> list[int]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            url = f"{urls[i % len(urls)]}/api/v1/agents"
            async with session.get(url, headers=headers) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one(i) for i in range(total))))


def test_three_gateways_share_exact_limits_and_budget(
    redis_url: str, redis_prefix: str, backend: Proc, gateway_factory: Callable[..., Proc],
    mint: Callable[..., str],
) -> None:
    env = limits_env(redis_url, redis_prefix)
    gateways = [gateway_factory(env=env, backend=backend) for _ in range(3)]
    jti = f"{redis_prefix}jti"
    token = mint(user_id="e2e-user-1", roles=["admin"], agent_id="agent-e2e", jti=jti)
    statuses = asyncio.run(burst([g.url for g in gateways], token, N + K))
    details: Any = [g.output()[-2000:] for g in gateways] if statuses.count(200) != N else ""
    assert statuses.count(200) == N, (statuses, details)
    assert statuses.count(429) == K
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    platform = client.keys(f"{redis_prefix}{{budget}}:platform:*")
    agent = client.keys(f"{redis_prefix}{{budget}}:agent:agent-e2e:*")
    assert len(platform) == 1 and len(agent) == 1
    assert int(client.get(platform[0]) or 0) == N * 2000  # µUSD: once per forwarded request
    assert int(client.get(agent[0]) or 0) == N * 2000
    client.set(f"revoked_access:{jti}", "1", ex=60)  # as the backend writes it
    try:
        assert asyncio.run(burst([g.url for g in gateways], token, 3)) == [401, 401, 401]
    finally:
        client.delete(f"revoked_access:{jti}")
        client.close()


def test_workers_without_redis_share_one_embedded_store(
    backend: Proc, gateway_factory: Callable[..., Proc], mint: Callable[..., str], tmp_path: Any,
) -> None:
    """`serve --workers 2` without REDIS_URL: limits still hold exactly (not per worker)."""
    env = limits_env("", "")
    env.update({"REDIS_URL": None, "REDIS_KEY_PREFIX": None, "PLANT_STATE_DIR": str(tmp_path)})
    gateway = gateway_factory(env=env, backend=backend, args=["--workers", "2"])
    token = mint(user_id="e2e-workers-1", roles=["admin"], agent_id="agent-workers")
    statuses = asyncio.run(burst([gateway.url], token, N + K))
    assert statuses.count(200) == N, (statuses, gateway.output()[-2000:])
    assert statuses.count(429) == K
