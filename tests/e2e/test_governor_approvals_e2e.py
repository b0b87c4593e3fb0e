"""Governor approvals end to end: a real gateway process (Redis counters, audit on PostgreSQL),
the demo backend, and a stand-in PP approvals API that mints and answers approvals.

A PP admin (roles ["admin"], ``governor_agent_id: null``) exports the audit log
(``GET /api/v1/audit/export``, action export_data): redirected without an approval, forwarded
with one the platform minted, refused when it is used again; unknown or wrong-action approvals
are redirected and an approvals API that is down is a 503. Each audit row says what happened.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest

from plant_gateway import migrations
from tests.fixtures.approvals_api import ApprovalsApi
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.processes import JWT_SECRET, Proc, start_gateway

EXPORT = "/api/v1/audit/export"
APPROVAL_UI = "https://pp.test/approvals"


def pp_admin_token() -> str:
    """A PP admin access token with the platform's claims (Google ``sub``, nulls included)."""
    now = int(time.time())
    claims = {"user_id": "108234567890123456789", "sub": "108234567890123456789",
              "email": "ops@waooaw.com", "roles": ["admin"], "customer_id": None,
              "governor_agent_id": None, "trial_mode": False, "trial_expires_at": None,
              "iss": "waooaw.com", "iat": now, "exp": now + 3600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


ADMIN = {"Authorization": f"Bearer {pp_admin_token()}"}


@pytest.fixture(scope="module")
async def approvals_api() -> AsyncIterator[ApprovalsApi]:
    api = ApprovalsApi()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture(scope="module")
def audit_dsn(postgres_dsn: str) -> Iterator[str]:
    dsn = create_database(postgres_dsn, "pgw_governor")
    migrations.upgrade(dsn)
    yield dsn
    drop_database(dsn)


@pytest.fixture(scope="module")
def gw(backend: Proc, approvals_api: ApprovalsApi, audit_dsn: str,
       redis_url: str) -> Iterator[Proc]:
    proc = start_gateway({
        "APPROVALS_URL": approvals_api.url,
        "APPROVALS_TIMEOUT_S": "1",
        "APPROVAL_UI_URL": APPROVAL_UI,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"t{uuid.uuid4().hex[:12]}:",  # this module's keys only
        "DATABASE_URL": audit_dsn,
        "AUDIT_FLUSH_INTERVAL_S": "0.05",
        "CUSTOMER_ENRICHMENT": "false",
    }, backend=backend)
    yield proc
    proc.stop()


async def call(gw: Proc, method: str, path: str, headers: dict[str, str] | None = None,
               body: Any = None) -> tuple[int, dict[str, str], Any, str]:
    """(status, headers, JSON body, correlation id) of one request."""
    cid = str(uuid.uuid4())
    all_headers = {**ADMIN, "X-Correlation-ID": cid, **(headers or {})}
    async with aiohttp.ClientSession() as session, session.request(
        method, gw.url + path, headers=all_headers, json=body, allow_redirects=False
    ) as resp:
        doc = await resp.json(content_type=None)
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, doc, cid


async def mint(api: ApprovalsApi, action: str, agent_id: str = "agent-1") -> str:
    """Mint an approval as a PP admin does: POST /api/pp/approvals with the admin's token."""
    body = {"customer_id": "cust-1", "agent_id": agent_id, "action": action,
            "purpose": "compliance export", "expires_in_seconds": 600}
    async with aiohttp.ClientSession() as session, session.post(
        api.url, json=body, headers=ADMIN
    ) as resp:
        assert resp.status == 200
        doc = await resp.json()
    approval_id: str = doc["approval_id"]
    assert approval_id.startswith("APR-")
    return approval_id


async def audit_row(dsn: str, cid: str) -> asyncpg.Record:
    """The one audit row of a request (waits for the writer's flush)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET app.is_admin = 'true'")
        for _ in range(100):
            rows = await conn.fetch(
                "SELECT status_code, error_type, error_message, opa_decisions::text AS decision "
                "FROM gateway_audit_logs WHERE correlation_id = $1::uuid", cid)
            if rows:
                assert len(rows) == 1
                return rows[0]
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    raise AssertionError(f"no audit row for {cid}")


async def approval_of(dsn: str, cid: str) -> dict[str, Any]:
    row = await audit_row(dsn, cid)
    decision: dict[str, Any] = json.loads(row["decision"])
    found: dict[str, Any] = decision["approval"]
    return found


async def test_export_without_approval_is_redirected(gw: Proc, audit_dsn: str) -> None:
    status, headers, _, cid = await call(gw, "GET", EXPORT)
    assert status == 307
    assert headers["location"].startswith(f"{APPROVAL_UI}?action=export_data")
    assert headers["x-governor-action"] == "export_data"
    assert (await audit_row(audit_dsn, cid))["status_code"] == 307


async def test_a_minted_approval_exports_once(gw: Proc, approvals_api: ApprovalsApi,
                                              audit_dsn: str) -> None:
    approval_id = await mint(approvals_api, "export_data")
    status, _, body, cid = await call(gw, "GET", EXPORT, {"X-Approval-ID": approval_id})
    assert status == 200, body
    assert body["backend"] == "production" and body["path"] == EXPORT
    forwarded = dict((k.lower(), v) for k, v in body["headers"])
    assert forwarded["x-approval-id"] == approval_id
    # the gateway asked the platform with the PP admin's own token
    assert (approval_id, ADMIN["Authorization"]) in approvals_api.lookups
    assert await approval_of(audit_dsn, cid) == {
        "id": approval_id, "source": "header", "verified": True, "consumed": True}

    status, _, problem, cid = await call(gw, "GET", EXPORT, {"X-Approval-ID": approval_id})
    assert status == 409
    assert problem["type"].endswith("/errors/approval-already-used")
    assert problem["approval_id"] == approval_id
    row = await audit_row(audit_dsn, cid)
    assert (row["status_code"], row["error_type"]) == (409, "approval-already-used")
    assert (await approval_of(audit_dsn, cid))["consumed"] is False


async def test_an_approval_in_the_body_deletes_its_agent(
    gw: Proc, approvals_api: ApprovalsApi, audit_dsn: str
) -> None:
    approval_id = await mint(approvals_api, "delete_agent", agent_id="agent-42")
    payload = {"approval_id": approval_id, "reason": "retired"}
    status, _, _, _ = await call(gw, "DELETE", "/api/v1/agents/agent-43", body=payload)
    assert status == 307  # minted for agent-42
    status, _, body, cid = await call(gw, "DELETE", "/api/v1/agents/agent-42", body=payload)
    assert status == 200 and json.loads(body["body"]) == payload  # forwarded as sent
    found = await approval_of(audit_dsn, cid)
    assert (found["source"], found["verified"], found["consumed"]) == ("body", True, True)


async def test_unknown_and_wrong_action_approvals_are_redirected(
    gw: Proc, approvals_api: ApprovalsApi, audit_dsn: str
) -> None:
    status, _, _, cid = await call(gw, "GET", EXPORT, {"X-Approval-ID": "APR-neverminted"})
    assert status == 307
    assert (await approval_of(audit_dsn, cid))["verified"] is False
    wrong = await mint(approvals_api, "delete_agent")
    status, _, _, cid = await call(gw, "GET", EXPORT, {"X-Approval-ID": wrong})
    assert status == 307
    found = await approval_of(audit_dsn, cid)
    assert (found["verified"], found["consumed"]) == (True, None)


async def test_a_malformed_approval_id_is_a_400(gw: Proc, audit_dsn: str) -> None:
    status, _, problem, cid = await call(gw, "GET", EXPORT, {"X-Approval-ID": "A" * 300})
    assert status == 400 and problem["type"].endswith("/errors/bad-request")
    assert (await audit_row(audit_dsn, cid))["error_type"] == "invalid-approval-id"


async def test_approvals_api_down_is_a_503(
    gw: Proc, approvals_api: ApprovalsApi, audit_dsn: str
) -> None:
    approval_id = await mint(approvals_api, "export_data")
    await approvals_api.stop()
    try:
        status, headers, problem, cid = await call(gw, "GET", EXPORT,
                                                   {"X-Approval-ID": approval_id})
    finally:
        await approvals_api.start()
    assert status == 503 and problem["type"].endswith("/errors/approvals-unavailable")
    assert "retry-after" in headers
    row = await audit_row(audit_dsn, cid)
    assert row["error_type"] == "approvals-unavailable"
    assert approval_id in row["error_message"]
    status, _, _, _ = await call(gw, "GET", EXPORT, {"X-Approval-ID": approval_id})
    assert status == 200  # not used by the refused request
