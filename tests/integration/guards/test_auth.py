"""Revocation and session invalidation through the real Redis counters backend.

Keys are written as the Plant backend writes them; a Redis outage must deny (the deployed
gateway let tokens through).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from plant_gateway.backends.keys import create as create_keys
from plant_gateway.counters import create as create_counters
from plant_gateway.guards.auth import AuthConfig, AuthStep, token_digest
from tests.fixtures.redis import RedisServer, free_port
from tests.unit.auth_support import DROP, context, mint, settings


async def make_step(url: str, prefix: str = "") -> AuthStep:
    cfg = settings(
        redis_url=url,
        revoked_prefix=f"{prefix}revoked_access:",
        token_version_prefix=f"{prefix}token_version:",
    )
    counters = create_counters(cfg)
    await counters.start()
    return AuthStep(AuthConfig.from_settings(cfg), create_keys(cfg), counters)


async def outcome(step: AuthStep, token: str) -> str:
    problem = await step.run(context(token))
    return "ok" if problem is None else f"{problem.status} {problem.kind}"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Any]:
    conn = aioredis.Redis.from_url(redis_url)
    yield conn
    await conn.aclose()


async def test_backend_written_revocation_and_version_keys_are_honoured(
    redis_url: str, redis_prefix: str, client: Any
) -> None:
    step = await make_step(redis_url, redis_prefix)
    try:
        user = "33333333-3333-4333-8333-333333333333"
        token = mint(user_id=user, jti="jti-r1", token_version=1)
        assert await outcome(step, token) == "ok"
        await client.set(f"{redis_prefix}revoked_access:jti-r1", "1", ex=60)
        assert await outcome(step, token) == "401 token-revoked"

        other = mint(user_id=user, token_version=1)
        assert await outcome(step, other) == "ok"
        await client.set(f"{redis_prefix}token_version:{user}", "2")
        assert await outcome(step, other) == "401 token-version-mismatch"
        assert await outcome(step, mint(user_id=user, token_version=2)) == "ok"

        no_jti = mint(user_id="u-nojti", jti=DROP)
        await step.counters.revoke(token_digest(no_jti), 60)
        assert await outcome(step, no_jti) == "401 token-revoked"
    finally:
        await client.delete(
            f"{redis_prefix}revoked_access:jti-r1", f"{redis_prefix}token_version:{user}",
            f"{redis_prefix}revoked_access:{token_digest(no_jti)}",
        )
        await step.counters.close()


async def test_regression_revocation_fails_closed_when_redis_dies(
    redis_server: RedisServer,
) -> None:
    """Deployed-gateway defect: a Redis error in the revocation lookup let the token through."""
    step = await make_step(redis_server.url)
    try:
        token = mint()
        assert await outcome(step, token) == "ok"
        redis_server.stop()
        assert await outcome(step, token) == "503 dependency-unavailable"  # cached claims too
        assert await outcome(step, mint()) == "503 dependency-unavailable"
        redis_server.start()
        assert await outcome(step, token) == "ok"
    finally:
        await step.counters.close()


async def test_regression_revocation_fails_closed_on_a_closed_port() -> None:
    step = await make_step(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert await outcome(step, mint()) == "503 dependency-unavailable"
    finally:
        await step.counters.close()
