"""The IP allow/deny guard in a real gateway: the client address through a trusted proxy hop,
the 403 problem a refused caller gets, and one audit row per request saying why."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from plant_gateway import migrations
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.processes import Proc, start_gateway

RULES = [{"routes": ["/api/v1/admin/*"], "allow": ["10.0.0.0/8"], "deny": ["10.66.0.0/16"]}]
# (X-Forwarded-For as the load balancer passes it on, expected status); one trusted hop: the
# client is the rightmost entry, whatever the caller put in front of it
CALLS = [
    ("/api/v1/admin/users", "10.1.2.3", 200),
    ("/api/v1/admin/users", "10.66.0.7", 403),  # deny wins over allow
    ("/api/v1/admin/users", "192.168.1.1", 403),
    ("/api/v1/admin/users", "10.1.2.3, 192.168.1.1", 403),  # a spoofed first entry is ignored
    ("/api/v1/agents", "192.168.1.1", 200),  # no rule for this route
]


@pytest.fixture
def audit_dsn(postgres_dsn: str) -> Iterator[str]:
    dsn = create_database(postgres_dsn, "pgw_ip_access_e2e")
    migrations.upgrade(dsn)
    yield dsn
    drop_database(dsn)


@pytest.fixture
def gateway(backend: Proc, audit_dsn: str) -> Iterator[Proc]:
    proc = start_gateway({
        "PLANT_GUARDS": "ip_access,audit", "IP_ACCESS_RULES": json.dumps(RULES),
        "TRUSTED_PROXY_HOPS": "1", "DATABASE_URL": audit_dsn, "AUDIT_FLUSH_INTERVAL_S": "0.05",
    }, backend=backend)
    yield proc
    proc.stop()


def call(url: str, forwarded_for: str, cid: str) -> tuple[int, dict[str, object] | None]:
    request = urllib.request.Request(url, headers={
        "X-Forwarded-For": forwarded_for, "X-Correlation-ID": cid,
    })
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, None
    except urllib.error.HTTPError as err:
        assert err.headers["content-type"] == "application/problem+json"
        return err.code, json.loads(err.read())


async def audit_rows(dsn: str, cids: list[str], expected: int) -> list[asyncpg.Record]:
    deadline = time.monotonic() + 20
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT correlation_id::text AS cid, status_code, error_type "
                "FROM gateway_audit_logs WHERE correlation_id = ANY($1::uuid[])", cids)
            if len(rows) >= expected or time.monotonic() > deadline:
                return list(rows)
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def test_refused_by_network_and_audited(gateway: Proc, audit_dsn: str) -> None:
    cids = [str(uuid.uuid4()) for _ in CALLS]
    for (path, forwarded_for, expected), cid in zip(CALLS, cids, strict=True):
        status, problem = call(gateway.url + path, forwarded_for, cid)
        assert status == expected, (path, forwarded_for)
        if expected == 403:
            assert problem is not None and str(problem["type"]).endswith("/errors/forbidden")
            assert problem["correlation_id"] == cid
            assert forwarded_for.split(",")[-1].strip() not in json.dumps(problem)
    rows = {r["cid"]: r for r in asyncio.run(audit_rows(audit_dsn, cids, len(CALLS)))}
    assert len(rows) == len(CALLS)  # one row per request, refused or not
    for (_, _, expected), cid in zip(CALLS, cids, strict=True):
        row = rows[cid]
        assert row["status_code"] == expected
        assert row["error_type"] == ("ip-not-allowed" if expected == 403 else None)
