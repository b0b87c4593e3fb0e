"""The audit schema against real PostgreSQL: migrations, indexes and constraints, RLS, retention.

Runs on the default server and on the embedded one (``pg_admin_dsn`` is parametrised).
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from plant_gateway import migrations
from plant_gateway.cli.audit import query_rows, reader
from tests.fixtures.postgres import create_database, drop_database

SPEC_COLUMNS = {
    "id": "uuid", "correlation_id": "uuid", "causation_id": "uuid",
    "timestamp": "timestamp with time zone", "gateway_type": "character varying",
    "request_id": "uuid", "http_method": "character varying", "endpoint": "text",
    "query_params": "jsonb", "request_headers": "jsonb", "request_body": "jsonb",
    "user_id": "uuid", "customer_id": "text", "email": "text", "roles": "ARRAY",
    "trial_mode": "boolean", "opa_policies_evaluated": "ARRAY", "opa_decisions": "jsonb",
    "opa_latency_ms": "double precision", "status_code": "integer", "response_headers": "jsonb",
    "response_body": "jsonb", "error_type": "text", "error_message": "text",
    "total_latency_ms": "double precision", "plant_latency_ms": "double precision",
    "action": "text", "resource": "text", "resource_id": "text",
}
SPEC_INDEXES = {
    "gateway_audit_logs_pkey": "(id, \"timestamp\")",
    "idx_gal_correlation_id": "(correlation_id)",
    "idx_gal_causation_id": "WHERE (causation_id IS NOT NULL)",
    "idx_gal_user_id": "(user_id)",
    "idx_gal_customer_id": "WHERE (customer_id IS NOT NULL)",
    "idx_gal_timestamp": "(\"timestamp\" DESC)",
    "idx_gal_status_error": "WHERE (status_code >= 400)",
    "idx_gal_opa_decisions": "USING gin (opa_decisions)",
    "idx_gal_gateway_type": "(gateway_type)",
    "idx_gal_action_resource": "(action, resource)",
    "idx_gal_user_timestamp": "(user_id, \"timestamp\" DESC)",
    "idx_gal_customer_timestamp": "(customer_id, \"timestamp\" DESC) WHERE",
}
POLICIES = {"admin_all_access", "user_own_logs", "customer_admin_logs", "system_insert_logs"}


def test_migrations_up_down_up_and_twice(pg_admin_dsn: str) -> None:
    dsn = create_database(pg_admin_dsn)
    try:
        migrations.upgrade(dsn)
        migrations.upgrade(dsn)  # safe to run twice
        assert migrations.current(dsn) == "0003"
        migrations.downgrade(dsn)
        assert migrations.current(dsn) is None
        migrations.upgrade(dsn)
        assert migrations.current(dsn) == "0003"
    finally:
        drop_database(dsn)


async def test_schema_matches_spec(audit_db: str) -> None:
    conn = await asyncpg.connect(audit_db)
    try:
        cols = {r["column_name"]: (r["data_type"], r["is_nullable"]) for r in await conn.fetch(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'gateway_audit_logs'")}
        for name, kind in SPEC_COLUMNS.items():
            assert cols[name][0] == kind, name
        assert cols["correlation_id"][1] == "NO" and cols["timestamp"][1] == "NO"
        assert cols["user_id"][1] == "YES"
        indexes = {r["indexname"]: r["indexdef"] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'gateway_audit_logs'")}
        for name, fragment in SPEC_INDEXES.items():
            assert fragment in indexes[name], (name, indexes.get(name))
        assert len(SPEC_INDEXES) == 12
        policies = {r["polname"] for r in await conn.fetch(
            "SELECT polname FROM pg_policy WHERE polrelid = 'gateway_audit_logs'::regclass")}
        assert policies == POLICIES
        rls = await conn.fetchrow(
            "SELECT relrowsecurity, relforcerowsecurity, relkind::text AS relkind FROM pg_class "
            "WHERE oid = 'gateway_audit_logs'::regclass")
        assert rls["relrowsecurity"] and rls["relforcerowsecurity"] and rls["relkind"] == "p"
        checks = " ".join(r["def"] for r in await conn.fetch(
            "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conrelid = 'gateway_audit_logs'::regclass AND contype = 'c'"))
        assert "status_code >= 100" in checks and "status_code <= 599" in checks
        assert "total_latency_ms >= " in checks and "'PLANT'" in checks
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(_insert_sql(), uuid.uuid4(), None, None, 99)
    finally:
        await conn.close()


def _insert_sql() -> str:
    return (
        "INSERT INTO gateway_audit_logs (id, correlation_id, \"timestamp\", gateway_type, "
        "status_code, total_latency_ms, instance_id, seq, prev_hash, row_hash, user_id, "
        "customer_id) VALUES ($1, gen_random_uuid(), now(), 'PLANT', $4, 1, 'rls-test', 1, "
        "repeat('0', 64), repeat('0', 64), $2, $3)"
    )


async def _writer(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, server_settings={"app.service_account": "gateway"})
    await conn.execute("SET ROLE plant_audit_writer")
    return conn


async def test_row_level_security(audit_db: str) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    cust = f"cust-{uuid.uuid4().hex[:6]}"
    writer = await _writer(audit_db)
    try:
        ids = {}
        for who, user, customer in (("a", alice, cust), ("b", bob, cust), ("c", None, "other")):
            ids[who] = uuid.uuid4()
            await writer.execute(_insert_sql(), ids[who], user and uuid.UUID(user), customer, 200)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.fetch("SELECT * FROM gateway_audit_logs")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.execute("DELETE FROM gateway_audit_logs")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.execute("UPDATE gateway_audit_logs SET status_code = 200")
        await writer.execute("SELECT set_config('app.service_account', 'someone', false)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # RLS: not a service account
            await writer.execute(_insert_sql(), uuid.uuid4(), None, None, 200)
    finally:
        await writer.close()

    async def seen(**identity: object) -> set:
        conn = await reader(audit_db, **identity)  # type: ignore[arg-type]
        try:
            return {r["id"] for r in await query_rows(conn, limit=1000)}
        finally:
            await conn.close()

    assert await seen(user=alice) == {ids["a"]}
    assert await seen(customer_admin=cust) == {ids["a"], ids["b"]}
    assert {ids["a"], ids["b"], ids["c"]} <= await seen(admin=True)
    assert await seen() == set()


async def test_retention_drops_expired_partition_keeps_fresh(audit_db: str) -> None:
    conn = await asyncpg.connect(audit_db)
    try:
        await conn.execute("SELECT gateway_audit_ensure_partition(current_date - 100)")
        old = await conn.fetchval("SELECT to_char(current_date - 100, 'YYYYMMDD')")
        await conn.execute("SET app.service_account = 'gateway'")
        await conn.execute(
            "INSERT INTO gateway_audit_logs (id, correlation_id, \"timestamp\", gateway_type, "
            "status_code, total_latency_ms, instance_id, seq, prev_hash, row_hash) VALUES "
            "(gen_random_uuid(), gen_random_uuid(), now() - interval '100 days', 'CP', 200, 1, "
            "'ret', 1, repeat('0', 64), repeat('0', 64)), (gen_random_uuid(), gen_random_uuid(), "
            "now(), 'PP', 200, 1, 'ret', 2, repeat('0', 64), repeat('0', 64))")
        parts = await _partitions(conn)
        assert f"gateway_audit_logs_p{old}" in parts
        dropped = await conn.fetchval("SELECT gateway_audit_maintain(90, 7)")
        assert dropped >= 1
        parts = await _partitions(conn)
        assert f"gateway_audit_logs_p{old}" not in parts
        today = await conn.fetchval("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")
        ahead = await conn.fetchval("SELECT to_char(current_date + 7, 'YYYYMMDD')")
        assert f"gateway_audit_logs_p{today}" in parts and f"gateway_audit_logs_p{ahead}" in parts
        assert await conn.fetchval(
            "SELECT count(*) FROM gateway_audit_logs WHERE instance_id = 'ret'") == 1
    finally:
        await conn.close()


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON "
                            "c.oid = i.inhrelid WHERE i.inhparent = 'gateway_audit_logs'::regclass")
    return {r["relname"] for r in rows}
