"""Authentication end to end: a real gateway process in front of the demo backend, over HTTP.

Every 401 kind with its challenge, PEM and JWKS keys, revocation in a real Redis, enrichment.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from tests.fixtures.processes import JWT_SECRET, Proc, free_port, start_gateway
from tests.integration.backends.test_keys_jwks import jwk
from tests.unit.auth_support import claims, forge_hs256, mint, public_pem, rsa_key, unsigned

ONLY_AUTH = {"PLANT_GUARDS": "auth,tenant"}
RSA = rsa_key()


def token(**overrides: Any) -> str:
    return mint(JWT_SECRET, **overrides)


async def get(
    gateway: Proc, path: str = "/api/v1/agents", auth: str | None = None, admin: bool = False
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": auth} if auth is not None else {}
    base = gateway.admin_url if admin else gateway.url  # the detailed /ready: admin listener
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + path, headers=headers) as response,
    ):
        body = await response.read()
        try:
            doc: Any = json.loads(body)
        except ValueError:
            doc = body
        return response.status, dict(response.headers), doc


@pytest.fixture(scope="module")
def redis_prefix_module() -> str:
    return f"e2eauth{uuid.uuid4().hex[:10]}:"


@pytest.fixture(scope="module")
def hs_gateway(
    backend: Proc, redis_url: str, redis_prefix_module: str
) -> Iterator[Proc]:
    env: dict[str, str | None] = {
        **ONLY_AUTH,
        "REDIS_URL": redis_url,
        "REVOKED_PREFIX": f"{redis_prefix_module}revoked_access:",
        "TOKEN_VERSION_PREFIX": f"{redis_prefix_module}token_version:",
    }
    proc = start_gateway(env, backend=backend)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def redis_client(redis_url: str, redis_prefix_module: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(f"{redis_prefix_module}*"))
    if keys:
        client.delete(*keys)
    client.close()


def assert_problem(status: int, headers: dict[str, str], doc: Any, kind: str) -> None:
    assert status == 401, doc
    assert doc["type"].endswith(f"/errors/{kind}"), doc
    assert headers["Content-Type"].startswith("application/problem+json")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert doc["correlation_id"] == headers["X-Correlation-ID"]


def _now() -> int:
    return int(time.time())


BAD_TOKENS: dict[str, Callable[[], str | None]] = {
    "no-header": lambda: None,
    "not-bearer": lambda: "Basic dXNlcjpwYXNz",
    "garbage": lambda: "Bearer not.a.jwt",
    "alg-none": lambda: f"Bearer {unsigned(claims())}",
    "wrong-secret": lambda: f"Bearer {mint('x' * 40)}",
    "expired": lambda: f"Bearer {token(iat=_now() - 7200, exp=_now() - 3600)}",
    "unknown-issuer": lambda: f"Bearer {token(iss='evil.example.com')}",
    "missing-roles": lambda: f"Bearer {token(roles=None)}",
    "empty-roles": lambda: f"Bearer {token(roles=[])}",
    "trial-without-expiry": lambda: f"Bearer {token(trial_mode=True)}",
    "lifetime-over-24h": lambda: f"Bearer {token(iat=_now(), exp=_now() + 24 * 3600 + 60)}",
    "refresh-token": lambda: f"Bearer {token(token_type='refresh')}",
}
EXPECTED = {
    "no-header": "unauthorized", "not-bearer": "invalid-token-format",
    "garbage": "invalid-token-format", "expired": "token-expired",
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_every_401_kind_over_http(hs_gateway: Proc, case: str) -> None:
    status, headers, doc = await get(hs_gateway, auth=BAD_TOKENS[case]())
    assert_problem(status, headers, doc, EXPECTED.get(case, "invalid-token"))


async def test_valid_token_reaches_backend_as_original_authorization(hs_gateway: Proc) -> None:
    good = token(customer_id="cust-7")
    status, _, doc = await get(hs_gateway, auth=f"Bearer {good}")
    assert status == 200, doc
    sent = {k.lower(): v for k, v in doc["headers"]}
    assert sent["x-original-authorization"] == f"Bearer {good}"
    assert "authorization" not in sent
    assert sent["x-customer-id"] == "cust-7"


async def test_revocation_and_version_written_by_the_backend(
    hs_gateway: Proc, redis_client: redis.Redis, redis_prefix_module: str
) -> None:
    user = str(uuid.uuid4())
    first = token(user_id=user, jti="e2e-jti-1")
    assert (await get(hs_gateway, auth=f"Bearer {first}"))[0] == 200
    redis_client.set(f"{redis_prefix_module}revoked_access:e2e-jti-1", "1", ex=120)
    assert_problem(*await get(hs_gateway, auth=f"Bearer {first}"), "token-revoked")
    second = token(user_id=user, token_version=1)
    assert (await get(hs_gateway, auth=f"Bearer {second}"))[0] == 200
    redis_client.set(f"{redis_prefix_module}token_version:{user}", "2", ex=120)
    assert_problem(*await get(hs_gateway, auth=f"Bearer {second}"), "token-version-mismatch")


async def test_enrichment_binds_the_backend_customer(hs_gateway: Proc) -> None:
    status, _, doc = await get(
        hs_gateway, "/api/v1/invoices?customer_id=someone-else", f"Bearer {token()}"
    )
    assert status == 200, doc
    assert doc["query"] == "customer_id=cust-demo-1"


async def test_enrichment_backend_down_is_503(gateway_factory: Callable[..., Proc]) -> None:
    gateway = gateway_factory(ONLY_AUTH, backend_url=f"http://127.0.0.1:{free_port()}")
    status, _, doc = await get(gateway, "/api/v1/invoices", f"Bearer {token()}")
    assert status == 503 and doc["type"].endswith("/errors/dependency-unavailable"), doc


async def test_pem_gateway_rejects_hs256_signed_with_its_public_key(
    gateway_factory: Callable[..., Proc], backend: Proc
) -> None:
    pem = public_pem(RSA)
    env = {**ONLY_AUTH, "JWT_SECRET": None, "JWT_PUBLIC_KEY": pem}
    gateway = gateway_factory(env, backend=backend)
    assert (await get(gateway, auth=f"Bearer {mint(RSA, 'RS256')}"))[0] == 200
    forged = forge_hs256(pem.encode(), claims())
    assert_problem(*await get(gateway, auth=f"Bearer {forged}"), "invalid-token")


@pytest.fixture
async def jwks_server() -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"keys": [jwk(RSA, "kid-1", "RS256")], "status": 200, "hits": 0}

    async def handle(request: web.Request) -> web.Response:
        state["hits"] += 1
        if state["status"] != 200:
            return web.Response(status=state["status"])
        return web.json_response({"keys": state["keys"]})

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state["url"] = f"http://127.0.0.1:{port}/jwks.json"
    yield state
    await runner.cleanup()


async def test_jwks_gateway_kid_rotation_flood_and_outage(
    gateway_factory: Callable[..., Proc], backend: Proc, jwks_server: dict[str, Any]
) -> None:
    env = {**ONLY_AUTH, "JWT_SECRET": None, "JWT_JWKS_URL": jwks_server["url"],
           "JWKS_MIN_REFETCH_S": "60", "JWKS_MAX_STALE_S": "600"}
    gateway = await asyncio.to_thread(gateway_factory, env, backend=backend)
    assert (await get(gateway, auth=f"Bearer {mint(RSA, 'RS256', kid='kid-1')}"))[0] == 200
    hits = jwks_server["hits"]
    flood = [get(gateway, auth=f"Bearer {mint(RSA, 'RS256', kid=f'nope-{i}')}") for i in range(50)]
    for result in await asyncio.gather(*flood):
        assert_problem(*result, "invalid-token")
    assert jwks_server["hits"] == hits  # no fetch storm
    status, _, ready = await get(gateway, "/ready", admin=True)
    assert ready["dependencies"]["jwt_keys"]["status"] == "up", ready


async def test_jwks_down_at_start_denies_and_is_not_ready(
    gateway_factory: Callable[..., Proc], backend: Proc, jwks_server: dict[str, Any]
) -> None:
    jwks_server["status"] = 500
    env = {**ONLY_AUTH, "JWT_SECRET": None, "JWT_JWKS_URL": jwks_server["url"]}
    gateway = await asyncio.to_thread(gateway_factory, env, backend=backend)
    status, _, doc = await get(gateway, auth=f"Bearer {mint(RSA, 'RS256', kid='kid-1')}")
    assert status == 503 and doc["type"].endswith("/errors/dependency-unavailable"), doc
    status, _, ready = await get(gateway, "/ready", admin=True)
    assert status == 503 and ready["dependencies"]["jwt_keys"]["status"] == "down", ready
    assert jwks_server["url"] not in json.dumps(ready)
