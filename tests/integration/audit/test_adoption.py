"""Installing our audit schema in the Plant database, where the backend's chain made its own.

The database is prepared as the Plant backend's Alembic chain leaves it at revision
``007_gateway_audit_logs`` (its default ``alembic_version`` table, a plain audit table with the
backend's columns, indexes and RLS policies, and rows the deployed gateway wrote). Our upgrade
must keep those rows, chain them, and leave the backend's chain exactly as it was.
"""

from __future__ import annotations

import asyncpg

from plant_gateway import migrations
from plant_gateway.cli.audit import audit_report, verify
from plant_gateway.migrations.adopt import LEGACY, LEGACY_INSTANCE
from tests.fixtures.postgres import create_database, drop_database

HEAD = "0003"  # our newest revision

# The deployed table as the backend's revision 007 defines it (restated here, not copied).
BACKEND_007 = """
CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY);
INSERT INTO alembic_version VALUES ('007_gateway_audit_logs');
CREATE TABLE gateway_audit_logs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    correlation_id uuid NOT NULL, causation_id uuid,
    "timestamp" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    gateway_type varchar(10) NOT NULL, request_id varchar(100) NOT NULL,
    http_method varchar(10) NOT NULL, endpoint varchar(500) NOT NULL,
    query_params jsonb, request_headers jsonb, request_body jsonb,
    user_id uuid NOT NULL, customer_id uuid, email varchar(255), roles varchar[],
    trial_mode boolean NOT NULL DEFAULT false,
    opa_policies_evaluated varchar[], opa_decisions jsonb, opa_latency_ms integer,
    status_code integer, response_headers jsonb, response_body jsonb,
    error_type varchar(100), error_message text,
    total_latency_ms integer NOT NULL, plant_latency_ms integer,
    action varchar(100), resource varchar(100), resource_id uuid,
    CONSTRAINT valid_gateway_type CHECK (gateway_type IN ('CP', 'PP')),
    CONSTRAINT valid_status_code CHECK (status_code >= 100 AND status_code < 600),
    CONSTRAINT valid_latency CHECK (total_latency_ms >= 0)
);
CREATE INDEX idx_audit_correlation_id ON gateway_audit_logs (correlation_id);
CREATE INDEX idx_audit_user_timestamp ON gateway_audit_logs (user_id, "timestamp" DESC);
CREATE INDEX idx_audit_opa_decisions ON gateway_audit_logs USING gin (opa_decisions);
ALTER TABLE gateway_audit_logs ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all_access ON gateway_audit_logs FOR ALL
    USING (current_setting('app.is_admin', true)::boolean = true);
CREATE POLICY system_insert_logs ON gateway_audit_logs FOR INSERT
    WITH CHECK (current_setting('app.service_account', true) IN ('gateway', 'opa'));
INSERT INTO gateway_audit_logs (correlation_id, "timestamp", gateway_type, request_id,
    http_method, endpoint, query_params, request_headers, user_id, customer_id, roles,
    opa_decisions, opa_latency_ms, status_code, total_latency_ms, resource_id)
SELECT gen_random_uuid(), now() - make_interval(mins => n), 'CP',
       CASE WHEN n % 2 = 0 THEN gen_random_uuid()::text ELSE 'req-' || n END,
       'GET', '/api/v1/agents/' || n, jsonb_build_object('page', n),
       '{"x-correlation-id": "abc"}', gen_random_uuid(), gen_random_uuid(),
       ARRAY['user'], '{"rbac_pp": {"allow": true}}', 3, 200, 17 + n, gen_random_uuid()
FROM generate_series(1, 25) AS n;
-- a row the deployed gateway wrote without a response status: it cannot enter our table
INSERT INTO gateway_audit_logs (correlation_id, gateway_type, request_id, http_method,
    endpoint, user_id, status_code, total_latency_ms)
VALUES (gen_random_uuid(), 'PP', 'r', 'POST', '/api/v1/x', gen_random_uuid(), NULL, 1);
"""


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def test_upgrade_adopts_the_backends_table_and_leaves_its_chain_alone(
    pg_admin_dsn: str,
) -> None:
    dsn = create_database(pg_admin_dsn)
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute(BACKEND_007)
        await conn.close()

        migrations.upgrade(dsn)

        assert migrations.current(dsn) == HEAD
        backend = await _fetch(dsn, "SELECT version_num FROM alembic_version")
        assert [r["version_num"] for r in backend] == ["007_gateway_audit_logs"]
        kept = await _fetch(dsn, f"SELECT count(*) AS n FROM {LEGACY}")
        assert kept[0]["n"] == 26  # every legacy row is still there
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SET app.is_admin = 'true'")
            adopted = await conn.fetch(
                "SELECT seq, request_id, user_ref, opa_decisions::text AS d, endpoint "
                "FROM gateway_audit_logs WHERE instance_id = $1 ORDER BY seq", LEGACY_INSTANCE,
            )
            assert [r["seq"] for r in adopted] == list(range(1, 26))
            assert all(r["user_ref"] and '"rbac_pp"' in r["d"] for r in adopted)
            # varchar request ids that are no UUID cannot be kept in our uuid column
            assert sum(r["request_id"] is None for r in adopted) == 13
            checked, findings = await verify(conn)
            assert checked == 25 and findings == []
            report = await audit_report(conn)  # no checkpoints, and never taken for tampering
            assert [str(c) for c in report.chains] == [
                f"NO CHECKPOINTS: {LEGACY_INSTANCE}: no checkpoints (adopted from the deployed "
                "gateway's table by migration 0001): a truncated or re-hashed tail cannot be "
                "detected"]
            migrations.upgrade(dsn)  # a second run adopts nothing twice
            checked, _ = await verify(conn)
            assert checked == 25
            # the chain covers the adopted rows: an edit is caught
            await conn.execute(
                "UPDATE gateway_audit_logs SET endpoint = '/forged' WHERE seq = 5 "
                "AND instance_id = $1", LEGACY_INSTANCE,
            )
            _, findings = await verify(conn)
            assert findings and LEGACY_INSTANCE in str(findings[0])
        finally:
            await conn.close()
        kind = "SELECT relkind::text AS k FROM pg_class WHERE relname = 'gateway_audit_logs'"
        assert (await _fetch(dsn, kind))[0]["k"] == "p"

        migrations.downgrade(dsn)  # the backend gets its table back, rows and all
        assert (await _fetch(dsn, kind))[0]["k"] == "r"
        assert (await _fetch(dsn, "SELECT count(*) AS n FROM gateway_audit_logs"))[0]["n"] == 26
        assert [r["version_num"] for r in await _fetch(
            dsn, "SELECT version_num FROM alembic_version")] == ["007_gateway_audit_logs"]
    finally:
        drop_database(dsn)


async def test_an_older_release_version_row_moves_to_our_table(pg_admin_dsn: str) -> None:
    """Our first release recorded its revision in alembic_version; it moves out of the way."""
    dsn = create_database(pg_admin_dsn)
    try:
        migrations.upgrade(dsn)
        conn = await asyncpg.connect(dsn)
        await conn.execute(
            "DROP TABLE plant_gateway_alembic_version; "
            "CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY); "
            "INSERT INTO alembic_version VALUES ('0001_audit_log')"
        )
        await conn.close()
        assert migrations.current(dsn) is None
        migrations.upgrade(dsn)
        assert migrations.current(dsn) == HEAD
        gone = await _fetch(dsn, "SELECT to_regclass('alembic_version') AS t")
        assert gone[0]["t"] is None
    finally:
        drop_database(dsn)
