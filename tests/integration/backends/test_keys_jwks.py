"""JWKS key source against a real local HTTP server: rotation, bogus-kid floods, outages.

The server counts its requests, so "no fetch storm" is asserted on fetches, never on time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web

from plant_gateway.backends.keys import JwksKeySource, create
from plant_gateway.counters import create as create_counters
from plant_gateway.guards.auth import AuthConfig, AuthStep
from tests.unit.auth_support import (
    claims,
    context,
    ec_key,
    forge_hs256,
    mint,
    public_pem,
    rsa_key,
    settings,
)

RSA_A, RSA_B, EC_C = rsa_key(), rsa_key(), ec_key()


def jwk(private: Any, kid: str, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg != "ES256" else jwt.algorithms.ECAlgorithm
    doc = json.loads(algorithm.to_jwk(private.public_key()))
    doc["kid"] = kid
    if alg:
        doc["alg"] = alg
    doc.update(extra)
    return doc


@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    status: int = 200
    delay_s: float = 0.0
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.Response(status=self.status, text="broken")
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    srv = JwksServer(keys=[jwk(RSA_A, "kid-a", "RS256")])
    await srv.start()
    yield srv
    await srv.stop()


async def started_step(
    srv: JwksServer, **overrides: Any
) -> tuple[AuthStep, JwksKeySource]:
    base: dict[str, Any] = {
        "jwt_secret": None, "jwt_jwks_url": srv.url, "jwks_refresh_s": 3600,
        "jwks_min_refetch_s": 60,
    }
    base.update(overrides)
    cfg = settings(**base)
    keys = create(cfg)
    assert isinstance(keys, JwksKeySource)
    await keys.start()
    return AuthStep(AuthConfig.from_settings(cfg), keys, create_counters(cfg)), keys


async def outcome(step: AuthStep, token: str) -> str:
    problem = await step.run(context(token))
    return "ok" if problem is None else problem.kind


async def test_valid_kid_verifies_and_wrong_kid_is_invalid(server: JwksServer) -> None:
    step, keys = await started_step(server)
    try:
        assert await outcome(step, mint(RSA_A, "RS256", kid="kid-a")) == "ok"
        assert await outcome(step, mint(RSA_A, "RS256", kid="kid-unknown")) == "invalid-token"
        assert await outcome(step, mint(RSA_B, "RS256", kid="kid-a")) == "invalid-token"
        assert await outcome(step, mint(RSA_A, "RS256")) == "invalid-token"  # no kid at all
        assert (await keys.check()).ok
    finally:
        await keys.close()


async def test_hs256_token_naming_a_jwks_kid_is_rejected(server: JwksServer) -> None:
    step, keys = await started_step(server)
    try:
        public = public_pem(RSA_A).encode()
        header = {"alg": "HS256", "typ": "JWT", "kid": "kid-a"}
        assert await outcome(step, forge_hs256(public, claims(), header)) == "invalid-token"
    finally:
        await keys.close()


async def test_declared_jwk_alg_binds_the_key(server: JwksServer) -> None:
    server.keys = [jwk(RSA_A, "kid-a", "RS256"), jwk(EC_C, "kid-c", "ES256"),
                   {"kty": "oct", "kid": "kid-oct", "k": "c2VjcmV0"}]
    step, keys = await started_step(server)
    try:
        assert await outcome(step, mint(RSA_A, "RS512", kid="kid-a")) == "invalid-token"
        assert await outcome(step, mint(EC_C, "ES256", kid="kid-c")) == "ok"
        token = forge_hs256(b"secret", claims(), {"alg": "HS256", "kid": "kid-oct"})
        assert await outcome(step, token) == "invalid-token"
    finally:
        await keys.close()


async def test_rotation_new_kid_is_fetched_and_withdrawn_kid_stops_verifying(
    server: JwksServer,
) -> None:
    step, keys = await started_step(server, jwks_min_refetch_s=0)
    try:
        old = mint(RSA_A, "RS256", kid="kid-a")
        assert await outcome(step, old) == "ok"
        server.keys = [jwk(RSA_B, "kid-b", "RS256")]
        assert await outcome(step, mint(RSA_B, "RS256", kid="kid-b")) == "ok"
        assert server.requests == 2
        # kid-a was withdrawn: its cached verification is dropped, not trusted until exp
        assert await outcome(step, old) == "invalid-token"
    finally:
        await keys.close()


async def test_background_refresh_picks_up_new_keys(server: JwksServer) -> None:
    step, keys = await started_step(server, jwks_refresh_s=0.05)
    try:
        server.keys.append(jwk(RSA_B, "kid-b", "RS256"))
        for _ in range(200):
            if server.requests >= 2:
                break
            await asyncio.sleep(0.02)
        assert server.requests >= 2
        await asyncio.sleep(0.05)
        before = server.requests
        assert await outcome(step, mint(RSA_B, "RS256", kid="kid-b")) == "ok"
        assert server.requests - before <= 1  # found by the refresher, not a miss
    finally:
        await keys.close()


async def test_bogus_kid_flood_causes_no_fetch_storm(server: JwksServer) -> None:
    step, keys = await started_step(server, jwks_min_refetch_s=60)
    try:
        assert server.requests == 1
        tokens = [mint(RSA_A, "RS256", kid=f"bogus-{i}") for i in range(300)]
        results = await asyncio.gather(*(outcome(step, t) for t in tokens))
        assert set(results) == {"invalid-token"}
        assert server.requests == 1  # the start-up fetch was < 60 s ago: no refetch at all
        assert await outcome(step, mint(RSA_A, "RS256", kid="kid-a")) == "ok"
    finally:
        await keys.close()


async def test_bogus_kid_flood_after_interval_costs_one_fetch(server: JwksServer) -> None:
    step, keys = await started_step(server, jwks_min_refetch_s=0.2)
    try:
        await asyncio.sleep(0.25)
        server.delay_s = 0.1  # keep the refetch in flight while the flood arrives
        tokens = [mint(RSA_A, "RS256", kid=f"bogus-{i}") for i in range(200)]
        results = await asyncio.gather(*(outcome(step, t) for t in tokens))
        assert set(results) == {"invalid-token"}
        assert server.requests == 2
    finally:
        await keys.close()


async def test_start_up_burst_shares_one_fetch(server: JwksServer) -> None:
    cfg = settings(jwt_secret=None, jwt_jwks_url=server.url, jwks_min_refetch_s=0)
    keys = create(cfg)
    step = AuthStep(AuthConfig.from_settings(cfg), keys, create_counters(cfg))
    server.delay_s = 0.1
    try:
        # requests arrive before start() finished: they all wait on the same fetch
        results = await asyncio.gather(
            keys.start(), *(outcome(step, mint(RSA_A, "RS256", kid="kid-a")) for _ in range(100))
        )
        assert set(results[1:]) == {"ok"}
        assert server.requests == 1
    finally:
        await keys.close()


async def test_jwks_down_at_start_denies_and_is_not_ready(server: JwksServer) -> None:
    server.status = 503
    step, keys = await started_step(server, jwks_min_refetch_s=60)
    try:
        problem = await step.run(context(mint(RSA_A, "RS256", kid="kid-a")))
        assert problem is not None
        assert (problem.status, problem.kind) == (503, "dependency-unavailable")
        status = await keys.check()
        assert not status.ok and "HTTP 503" in status.detail and server.url not in status.detail
        assert server.requests == 1
    finally:
        await keys.close()


async def test_jwks_server_gone_denies_once_keys_are_stale(server: JwksServer) -> None:
    step, keys = await started_step(server, jwks_max_stale_s=0.3, jwks_min_refetch_s=0)
    try:
        token = mint(RSA_A, "RS256", kid="kid-a")
        assert await outcome(step, token) == "ok"
        await server.stop()
        await asyncio.sleep(0.35)
        fresh = mint(RSA_A, "RS256", kid="kid-a")
        assert await outcome(step, fresh) == "dependency-unavailable"
        assert not (await keys.check()).ok
    finally:
        await keys.close()


async def test_garbage_jwks_documents_keep_denying(server: JwksServer) -> None:
    server.keys = "not-a-list"  # type: ignore[assignment]
    step, keys = await started_step(server)
    try:
        assert await outcome(step, mint(RSA_A, "RS256", kid="kid-a")) == "dependency-unavailable"
        assert "no keys array" in (await keys.check()).detail
    finally:
        await keys.close()
