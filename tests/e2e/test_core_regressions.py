"""Regression tests for the deployed gateway's defects in the core's scope.

A real gateway with authentication and tenant binding on, in front of the demo backend.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from tests.fixtures.processes import ROOT, Proc, mint_token, start_gateway

SERVICE_KEY = "registration-key-0123456789"


@pytest.fixture(scope="module")
def gw(backend: Proc) -> Iterator[Proc]:
    proc = start_gateway(
        {"PLANT_GUARDS": "auth,tenant", "CUSTOMER_ENRICHMENT": "false",
         "CP_REGISTRATION_KEY": SERVICE_KEY},
        backend=backend,
    )
    yield proc
    proc.stop()


@pytest.mark.parametrize(
    "path",
    ["/api/v1/agents/docs", "/api/v1/secret/health", "/docs/x", "/health/x", "/ready/anything",
     "/api/v1/auth/loginx", "/x/api/v1/auth/login",
     "/api/v1/agents/register/extra/openapi.json"],
)
async def test_no_suffix_or_unhandled_public_path_skips_auth(gw: Proc, path: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(gw.url + path) as r:
        assert r.status == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.headers["X-Correlation-ID"]


async def test_configured_public_route_passes_without_token(gw: Proc) -> None:
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/api/v1/auth/login", json={}) as r:
        assert r.status == 200
        assert (await r.json())["path"] == "/api/v1/auth/login"
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/auth/google/verify") as r:
        assert (await r.json())["path"] == "/api/v1/auth/google/verify"  # configured rewrite


async def test_body_rewrite_sends_a_true_content_length(gw: Proc) -> None:
    token = mint_token(customer_id="cust-A")
    body = b'{"customer_id": "cust-B-much-longer-than-A", "amount": 5}'
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/api/v1/payments/coupon/checkout", data=body, headers=headers) as r,
    ):
        assert r.status == 200
        doc = await r.json()
    sent = {k.lower(): v for k, v in doc["headers"]}
    assert '"customer_id":"cust-A"' in doc["body"]
    assert int(sent["content-length"]) == doc["body_length"] == len(doc["body"].encode())


async def test_query_and_path_tenant_binding_and_no_customer_is_401(gw: Proc) -> None:
    token = mint_token(customer_id="cust-A")
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/api/v1/invoices?customer_id=cust-B&x=1", headers=auth) as r:
            assert (await r.json())["query"] == "x=1&customer_id=cust-A"
        by_customer = "/api/v1/payments/subscriptions/by-customer/"
        async with s.get(gw.url + by_customer + "cust-B", headers=auth) as r:
            assert (await r.json())["path"] == by_customer + "cust-A"
        no_customer = {"Authorization": f"Bearer {mint_token()}"}
        async with s.get(gw.url + "/api/v1/invoices?customer_id=cust-B", headers=no_customer) as r:
            assert r.status == 401


async def test_identity_headers_come_from_the_token_only(gw: Proc) -> None:
    token = mint_token(user_id="11111111-1111-1111-1111-111111111111", roles=["viewer"],
                       customer_id="cust-A")
    headers = {"Authorization": f"Bearer {token}", "X-User-ID": "attacker", "X-Gateway": "evil",
               "X-Customer-ID": "cust-B", "X-User-Roles": "admin"}
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/api/v1/x", headers=headers) as r:
        doc = await r.json()
    sent: dict[str, list[str]] = {}
    for key, value in doc["headers"]:
        sent.setdefault(key.lower(), []).append(value)
    assert sent["x-user-id"] == ["11111111-1111-1111-1111-111111111111"]
    assert sent["x-customer-id"] == ["cust-A"]
    assert sent["x-user-roles"] == ["viewer"]
    assert sent["x-gateway"] == ["plant-gateway"]


async def test_service_key_routes_need_the_right_key(gw: Proc) -> None:
    url = gw.url + "/api/v1/customers/register"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, headers={"X-CP-Registration-Key": SERVICE_KEY}) as r:
            assert r.status == 200
        async with s.post(url, headers={"X-CP-Registration-Key": "wrong"}) as r:
            assert r.status == 401
        async with s.post(url) as r:
            assert r.status == 401
        token = {"Authorization": f"Bearer {mint_token()}"}
        async with s.post(url, headers=token) as r:
            assert r.status == 401  # a JWT does not open a service-key route (as deployed)


async def test_service_key_routes_closed_when_key_unset(backend: Proc, gateway_factory) -> None:
    gw = gateway_factory({"PLANT_GUARDS": "auth", "CUSTOMER_ENRICHMENT": "false"}, backend=backend)
    async with aiohttp.ClientSession() as s:
        headers = {"X-CP-Registration-Key": ""}
        async with s.post(gw.url + "/api/v1/customers/register", headers=headers) as r:
            assert r.status == 403
        async with s.post(gw.url + "/api/v1/customers/register") as r:
            assert r.status == 403  # no key configured: closed, with or without a key


def test_bad_setting_stops_startup_with_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "PLANT_BACKEND_URL": "ftp://nope", "JWT_SECRET": "x" * 40}
    out = subprocess.run(
        [sys.executable, "-m", "plant_gateway.cli", "serve"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "config error: PLANT_BACKEND_URL: must be an http:// or https:// URL"
    ]


def test_cors_star_is_refused_at_startup() -> None:
    env = {"PATH": "/usr/bin:/bin", "PLANT_BACKEND_URL": "http://127.0.0.1:9",
           "JWT_SECRET": "x" * 40, "CORS_ORIGINS": "*"}
    out = subprocess.run(
        [sys.executable, "-m", "plant_gateway.cli", "serve"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode == 2 and "CORS_ORIGINS" in out.stderr
