"""Least privilege on the audit log (migration 0002) against real PostgreSQL.

The writer role can only INSERT: it cannot run retention, drop or detach partitions, delete,
update or truncate. Retention under one day is refused; retention runs as the owner or a member
of ``plant_audit_maintainer`` (the gateway's hourly job, the CLI) and still drops old partitions.
Runs on the default server and on the embedded one (``pg_admin_dsn`` is parametrised).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from plant_gateway import migrations
from plant_gateway.audit.sink import PostgresAuditSink
from plant_gateway.cli import app
from tests.fixtures.postgres import create_database, drop_database, with_user
from tests.integration.audit.support import settings

WRITER = "plant_audit_writer"
MAINTAINER = "plant_audit_maintainer"
INSERT = (
    'INSERT INTO gateway_audit_logs (id, correlation_id, "timestamp", gateway_type, status_code, '
    "total_latency_ms, instance_id, seq, prev_hash, row_hash) VALUES (gen_random_uuid(), "
    "gen_random_uuid(), now() - make_interval(days => $1), 'PLANT', 200, 1, $2, 1, "
    "repeat('0', 64), repeat('0', 64))"
)


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON "
                            "c.oid = i.inhrelid WHERE i.inhparent = 'gateway_audit_logs'::regclass")
    return {r["relname"] for r in rows}


async def _count(conn: asyncpg.Connection, instance: str) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM gateway_audit_logs WHERE instance_id = $1", instance))


async def _old_partition_with_a_row(admin: asyncpg.Connection, instance: str) -> str:
    """A partition 100 days back holding one row of ``instance``; its name."""
    await admin.execute("SELECT gateway_audit_ensure_partition(current_date - 100)")
    await admin.execute("SET app.service_account = 'gateway'")
    await admin.execute(INSERT, 100, instance)
    day = await admin.fetchval("SELECT to_char(current_date - 100, 'YYYYMMDD')")
    return f"gateway_audit_logs_p{day}"


@pytest.fixture
async def admin(audit_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(audit_db)
    yield conn
    await conn.close()


@pytest.fixture
async def writer(audit_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection that logs in as the writer role, as a gateway with its own login does."""
    conn = await asyncpg.connect(with_user(audit_db, WRITER),
                                 server_settings={"app.service_account": "gateway"})
    yield conn
    await conn.close()


@pytest.fixture
def maintainer_login(audit_db: str) -> Iterator[str]:
    """A login granted plant_audit_maintainer (roles are cluster-wide: dropped afterwards)."""
    name = f"pgw_maint_{uuid.uuid4().hex[:10]}"
    _admin_sql(audit_db, f"CREATE ROLE {name} LOGIN; GRANT {MAINTAINER} TO {name}")
    yield name
    _admin_sql(audit_db, f"DROP OWNED BY {name}; DROP ROLE {name}")


def _admin_sql(dsn: str, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


# --- the writer --------------------------------------------------------------------------------

async def test_writer_holds_insert_and_nothing_else(admin: asyncpg.Connection) -> None:
    table = {priv: await admin.fetchval(
        "SELECT has_table_privilege($1, 'gateway_audit_logs', $2)", WRITER, priv)
        for priv in ("INSERT", "SELECT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")}
    assert table == {"INSERT": True, "SELECT": False, "UPDATE": False, "DELETE": False,
                     "TRUNCATE": False, "REFERENCES": False, "TRIGGER": False}
    for function in ("gateway_audit_maintain(integer, integer)",
                     "gateway_audit_ensure_partition(date)"):
        assert not await admin.fetchval(
            "SELECT has_function_privilege($1, $2, 'EXECUTE')", WRITER, function), function
    for part in await _partitions(admin):
        assert not await admin.fetchval(
            "SELECT has_table_privilege($1, $2, 'INSERT,SELECT,UPDATE,DELETE,TRUNCATE')",
            WRITER, part), part
    assert await admin.fetchval(
        "SELECT has_function_privilege($1, 'gateway_audit_maintain(integer, integer)', "
        "'EXECUTE')", MAINTAINER)


@pytest.mark.parametrize("sql", [
    "SELECT gateway_audit_maintain(-1, 7)",
    "SELECT gateway_audit_maintain(90, 7)",
    "SELECT gateway_audit_ensure_partition(current_date + 400)",
    "DROP TABLE {part}",
    "ALTER TABLE gateway_audit_logs DETACH PARTITION {part}",
    "DELETE FROM gateway_audit_logs",
    "DELETE FROM {part}",
    "DELETE FROM gateway_audit_logs_default",
    "UPDATE gateway_audit_logs SET status_code = 204",
    "TRUNCATE gateway_audit_logs",
    "TRUNCATE {part}",
])
async def test_writer_cannot_erase_or_change_the_log(
    admin: asyncpg.Connection, writer: asyncpg.Connection, sql: str
) -> None:
    instance = f"lp-{uuid.uuid4().hex[:8]}"
    await writer.execute(INSERT, 0, instance)  # the one thing it may do
    part = await admin.fetchval(
        "SELECT 'gateway_audit_logs_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")
    before = await _partitions(admin)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await writer.execute(sql.format(part=part))
    assert await _partitions(admin) == before
    assert await _count(admin, instance) == 1


# --- the retention function ----------------------------------------------------------------------

@pytest.mark.parametrize(("days", "ahead"), [(0, 7), (-1, 7), (-36500, 7), (None, 7),
                                             (90, -1), (90, 367)])
async def test_retention_under_one_day_or_odd_ahead_is_refused(
    admin: asyncpg.Connection, days: int | None, ahead: int
) -> None:
    instance = f"lp-{uuid.uuid4().hex[:8]}"
    await _old_partition_with_a_row(admin, instance)
    await admin.execute("SET app.service_account = 'gateway'")
    await admin.execute(INSERT, 0, instance)
    before = await _partitions(admin)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="audit retention refused"):
        await admin.fetchval("SELECT gateway_audit_maintain($1, $2)", days, ahead)
    assert await _partitions(admin) == before
    assert await _count(admin, instance) == 2


async def test_maintainer_member_runs_retention_and_old_partitions_go(
    audit_db: str, admin: asyncpg.Connection, maintainer_login: str
) -> None:
    instance = f"lp-{uuid.uuid4().hex[:8]}"
    old = await _old_partition_with_a_row(admin, instance)
    await admin.execute(INSERT, 0, instance)
    conn = await asyncpg.connect(with_user(audit_db, maintainer_login))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # maintains, cannot delete
            await conn.execute("DELETE FROM gateway_audit_logs")
        dropped = await conn.fetchval("SELECT gateway_audit_maintain(90, 7)")
    finally:
        await conn.close()
    assert dropped >= 1
    assert old not in await _partitions(admin)
    assert await _count(admin, instance) == 1  # today's row stays


# --- who runs it: the gateway's hourly job, the CLI ----------------------------------------------

async def test_gateway_job_runs_retention_as_the_owner_login(
    audit_db: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    old = await _old_partition_with_a_row(admin, f"lp-{uuid.uuid4().hex[:8]}")
    sink = PostgresAuditSink(settings(tmp_path, audit_retention_days=90), audit_db)
    assert (await sink.run_retention() or 0) >= 1
    assert old not in await _partitions(admin)


async def test_gateway_logged_in_as_the_writer_leaves_retention_alone(
    audit_db: str, admin: asyncpg.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = await _old_partition_with_a_row(admin, f"lp-{uuid.uuid4().hex[:8]}")
    sink = PostgresAuditSink(settings(tmp_path, audit_retention_days=90),
                             with_user(audit_db, WRITER))
    with caplog.at_level(logging.WARNING, logger="plant_gateway.audit"):
        assert await sink.run_retention() is None
        assert await sink.run_retention() is None
    assert old in await _partitions(admin)
    notes = [r.getMessage() for r in caplog.records if "retention not run" in r.getMessage()]
    assert len(notes) == 1 and "may only insert" in notes[0]


def test_cli_retention_refuses_zero_days_and_runs_with_valid_ones(audit_db: str) -> None:
    runner = CliRunner()
    refused = runner.invoke(app, ["audit", "retention", "--days", "0",
                                  "--database-url", audit_db])
    assert refused.exit_code == 2
    assert "retention_days must be at least 1, got 0" in refused.output
    as_writer = runner.invoke(app, ["audit", "retention", "--days", "90",
                                    "--database-url", with_user(audit_db, WRITER)])
    assert as_writer.exit_code == 1 and "permission denied" in as_writer.output
    done = runner.invoke(app, ["audit", "retention", "--days", "90", "--database-url", audit_db])
    assert done.exit_code == 0, done.output
    assert "partition(s) dropped; keeping 90 day(s), 7 ahead" in done.output


# --- the migration -------------------------------------------------------------------------------

async def test_downgrade_to_0001_and_upgrade_again(pg_admin_dsn: str) -> None:
    dsn = create_database(pg_admin_dsn)
    try:
        migrations.upgrade(dsn)
        assert migrations.current(dsn) == "0003"
        migrations.downgrade(dsn, "0001_audit_log")
        assert migrations.current(dsn) == "0001_audit_log"
        assert await _writer_may_maintain(dsn)  # 0001 as it was
        migrations.upgrade(dsn)
        migrations.upgrade(dsn)  # safe to run twice
        assert migrations.current(dsn) == "0003"
        assert not await _writer_may_maintain(dsn)
    finally:
        drop_database(dsn)


async def _writer_may_maintain(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval(
            "SELECT has_function_privilege($1, 'gateway_audit_maintain(integer, integer)', "
            "'EXECUTE')", WRITER))
    finally:
        await conn.close()
