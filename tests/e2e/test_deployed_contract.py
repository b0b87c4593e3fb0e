"""Drop-in contract: our gateway given exactly the deployed Cloud Run environment.

The variable set is the deployed Terraform's (HS secret in both ``JWT_SECRET`` and
``JWT_PUBLIC_KEY``, ``OPA_URL`` to an OPA serving the deployed packages, a SQLAlchemy-style
``DATABASE_URL`` to a Plant database whose backend chain created the audit table, ID tokens to
the backend, ``K_SERVICE`` set by Cloud Run). A recording backend shows exactly what each client
flow delivers; every answered request is counted in the audit table.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from plant_gateway import migrations
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.processes import (
    JWT_SECRET,
    Proc,
    free_port,
    mint_token,
    start_backend,
    start_gateway,
)
from tests.integration.audit.test_adoption import BACKEND_007
from tests.integration.opa_server import OpaServer

SERVICE_KEY = "cp-registration-key-for-tests-0123456789"
ID_TOKEN = "header.eyJleHAiOjQxMDI0NDQ4MDB9.signature"  # exp far ahead
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deployed_opa"
CUSTOMER = str(uuid.uuid4())


@pytest.fixture(scope="module")
async def metadata_server() -> AsyncIterator[str]:
    """Cloud Run's metadata server: hands out the ID token the backend and OPA expect."""

    async def identity(request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        return web.Response(text=ID_TOKEN)

    app = web.Application()
    app.router.add_get(
        "/computeMetadata/v1/instance/service-accounts/default/identity", identity
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture(scope="module")
def plant_db(postgres_dsn: str) -> Iterator[str]:
    """A Plant database at the backend's revision 007, then our migrations."""
    dsn = create_database(postgres_dsn)

    async def prepare() -> None:
        conn = await asyncpg.connect(dsn)
        await conn.execute(BACKEND_007)
        await conn.close()

    asyncio.run(prepare())
    migrations.upgrade(dsn)
    yield dsn
    drop_database(dsn)


@pytest.fixture(scope="module")
def backend() -> Iterator[Proc]:
    """The Plant backend as deployed: IAM lets in only the gateway's ID token."""
    proc = start_backend("production", args=("--iam-token", ID_TOKEN))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def deployed_opa() -> Iterator[OpaServer]:
    server = OpaServer(FIXTURES, token=ID_TOKEN)  # IAM-protected like the deployed OPA
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(backend: Proc, metadata_server: str, plant_db: str, deployed_opa: OpaServer,
       redis_url: str) -> Iterator[Proc]:
    scheme, rest = plant_db.split("://", 1)
    deployed: dict[str, str | None] = {
        # env_vars of the deployed Terraform
        "ENVIRONMENT": "demo",
        "PLANT_BACKEND_URL": backend.url,
        "PLANT_BACKEND_USE_ID_TOKEN": "true",
        "PLANT_BACKEND_AUDIENCE": backend.url,
        "LOG_LEVEL": "info",
        "DEBUG_VERBOSE": "false",
        "OPA_URL": deployed_opa.url,
        "OPA_SERVICE_URL": deployed_opa.url,
        "CLOUD_SQL_CONNECTION_NAME": "waooaw:asia-south1:plant-sql-demo",
        "JWT_ISSUER": "waooaw.com",
        "JWT_ALGORITHM": "HS256",
        # its secrets
        "DATABASE_URL": f"postgresql+asyncpg://{rest}",
        "JWT_SECRET": JWT_SECRET,
        "JWT_PUBLIC_KEY": JWT_SECRET,
        "CP_REGISTRATION_KEY": SERVICE_KEY,
        "REDIS_URL": redis_url,
        # what Cloud Run itself sets, and where this machine's metadata server is
        "K_SERVICE": "waooaw-plant-gateway-demo",
        "GCE_METADATA_HOST": metadata_server,
    }
    proc = start_gateway(deployed, backend=backend)
    yield proc
    proc.stop()


def cp_user(**claims: Any) -> str:
    return mint_token(roles=["user"], customer_id=CUSTOMER, **claims)


async def call(gw: Proc, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, gw.url + path, **kwargs) as r:
        body = await r.json(content_type=None)
        return r.status, body, r.headers


def received(body: dict[str, Any]) -> dict[str, str]:
    """The headers the backend received (lower-case names)."""
    return {k.lower(): v for k, v in body["headers"]}


async def test_starts_and_reports_ready_without_revealing_urls(gw: Proc, backend: Proc) -> None:
    status, body, _ = await call(gw, "GET", "/health")
    assert status == 200 and body["status"] == "healthy"
    status, body, _ = await call(gw, "GET", "/api/health")
    assert status == 200 and backend.url not in str(body)
    async with aiohttp.ClientSession() as s:
        pages = {"/docs": "SwaggerUIBundle", "/redoc": "<redoc spec-url=\"/openapi.json\"",
                 "/docs/oauth2-redirect": "swaggerUIRedirectOauth2"}
        for page, marker in pages.items():  # the gateway's own pages, no token needed
            async with s.get(gw.url + page) as r:
                assert r.status == 200 and r.content_type == "text/html", page
                assert marker in await r.text(), page
    assert "HS shared secret" in gw.output() or "same HS secret" in gw.output()


async def test_cp_backend_customer_calls_use_the_service_key(gw: Proc) -> None:
    key = {"X-CP-Registration-Key": SERVICE_KEY}
    status, body, _ = await call(gw, "POST", "/api/v1/customers", json={"email": "a@b.c"},
                                 headers=key)
    assert status == 200 and body["path"] == "/api/v1/customers"
    sent = received(body)
    assert sent["x-cp-registration-key"] == SERVICE_KEY  # the backend may check it too
    assert sent["authorization"] == f"Bearer {ID_TOKEN}"  # the backend's IAM wants an ID token
    assert "x-original-authorization" not in sent
    status, _, _ = await call(gw, "GET", "/api/v1/customers/lookup?email=a@b.c", headers=key)
    assert status == 200
    status, body, _ = await call(gw, "GET", "/api/v1/customers/lookup?email=a@b.c",
                                 headers={"Authorization": f"Bearer {cp_user()}"})
    assert status == 401 and body["type"].endswith("/invalid-service-key")
    for _ in range(60):  # the CP backend is not throttled after ~50 quick calls
        status, _, _ = await call(gw, "POST", "/api/v1/otp/sessions", json={}, headers=key)
        assert status == 200


async def test_mobile_fcm_token_uses_the_users_jwt(gw: Proc) -> None:
    token = cp_user()
    status, body, _ = await call(gw, "POST", "/api/v1/customers/fcm-token", json={"t": "x"},
                                 headers={"Authorization": f"Bearer {token}"})
    assert status == 200
    assert received(body)["x-original-authorization"] == f"Bearer {token}"


async def test_logout_with_an_expired_token_reaches_the_backend(gw: Proc) -> None:
    past = int(time.time()) - 7200
    expired = cp_user(iat=past, exp=past + 900)
    status, body, _ = await call(gw, "POST", "/api/v1/auth/logout",
                                 headers={"Authorization": f"Bearer {expired}"})
    assert status == 200 and body["path"] == "/api/v1/auth/logout"
    assert received(body)["x-original-authorization"] == f"Bearer {expired}"


async def test_audit_events_carry_their_own_service_key(gw: Proc) -> None:
    status, body, _ = await call(gw, "POST", "/api/v1/audit/events", json={"e": 1},
                                 headers={"X-Audit-Service-Key": "audit-key"})
    assert status == 200 and received(body)["x-audit-service-key"] == "audit-key"


async def test_tenant_routes_bind_the_tokens_customer(gw: Proc) -> None:
    auth = {"Authorization": f"Bearer {cp_user()}"}
    other = str(uuid.uuid4())
    status, body, _ = await call(gw, "GET", f"/api/v1/invoices?customer_id={other}",
                                 headers=auth)
    assert status == 200 and body["query"] == f"customer_id={CUSTOMER}"
    status, body, _ = await call(
        gw, "GET", f"/api/v1/payments/subscriptions/by-customer/{other}", headers=auth
    )
    assert body["path"] == f"/api/v1/payments/subscriptions/by-customer/{CUSTOMER}"
    status, body, _ = await call(gw, "POST", "/api/v1/hired-agents/h-1/finalize",
                                 json={"customer_id": other}, headers=auth)
    assert status == 200 and CUSTOMER in body["body"] and other not in body["body"]


async def test_cp_token_without_customer_is_enriched_through_iam(gw: Proc) -> None:
    """CP access tokens carry no customer_id: the gateway asks the backend (with its ID token,
    the caller's token in X-Original-Authorization) and binds the answer."""
    cp = mint_token(roles=["user"], token_type="access")
    status, body, _ = await call(gw, "GET", "/api/v1/receipts?customer_id=someone-else",
                                 headers={"Authorization": f"Bearer {cp}"})
    assert status == 200 and body["query"] == "customer_id=cust-demo-1"


async def test_pp_admin_without_customer_reaches_unbound_routes(gw: Proc) -> None:
    admin = mint_token(roles=["admin"], iss="waooaw.com")
    status, body, _ = await call(gw, "GET", "/api/v1/hired-agents?customer_id=c-9",
                                 headers={"Authorization": f"Bearer {admin}"})
    assert status == 200 and body["query"] == "customer_id=c-9"


async def test_client_ip_behind_googles_load_balancer(gw: Proc) -> None:
    forwarded = "6.6.6.6, 203.0.113.9, 34.117.1.1"  # client-sent, client, load balancer
    status, body, _ = await call(gw, "GET", "/api/v1/agents",
                                 headers={"Authorization": f"Bearer {cp_user()}",
                                          "X-Forwarded-For": forwarded})
    assert status == 200 and received(body)["x-forwarded-for"] == "203.0.113.9"


async def test_no_made_up_price_refuses_traffic(gw: Proc) -> None:
    auth = {"Authorization": f"Bearer {cp_user(agent_id='agent-7')}"}
    for _ in range(30):
        status, _, headers = await call(gw, "GET", "/api/v1/agents", headers=auth)
        assert status == 200
    assert headers["X-Platform-Utilization"] == "0.00"


async def test_every_request_has_one_audit_row(gw: Proc, plant_db: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for cid in ids:
        await call(gw, "GET", "/api/v1/agents", headers={
            "Authorization": f"Bearer {cp_user()}", "X-Correlation-ID": cid})
    await call(gw, "GET", "/api/v1/agents", headers={"X-Correlation-ID": ids[0]})  # a 401
    conn = await asyncpg.connect(plant_db)
    try:
        await conn.execute("SET app.is_admin = 'true'")
        for _ in range(50):
            rows = await conn.fetch(
                "SELECT correlation_id::text AS c, status_code FROM gateway_audit_logs "
                "WHERE correlation_id = ANY($1::uuid[])", ids)
            if len(rows) == 6:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert sorted(r["status_code"] for r in rows) == [200] * 5 + [401]
