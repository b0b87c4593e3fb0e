"""Chain checkpoints and ``audit verify``'s view of a chain's end, against real PostgreSQL:
a clean close, a truncated tail, a re-hashed last row, a crashed (or live) instance, a close
mark that must travel through the spool, chains older than the checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from plant_gateway import migrations
from plant_gateway.audit.checkpoints import TABLE as MARKS
from plant_gateway.audit.checkpoints import Mark
from plant_gateway.audit.recorder import AuditRecorder
from plant_gateway.audit.schema import from_db, row_hash
from plant_gateway.audit.sink import PostgresAuditSink
from plant_gateway.cli import app
from plant_gateway.cli.audit import Report, audit_report, reader
from tests.fixtures.postgres import create_database, drop_database, with_user
from tests.integration.audit.support import context, fetch, settings, started_sink

KEY = "chain-key-" + "0123456789abcdef" * 3
WRITER = "plant_audit_writer"


async def report(dsn: str, keys: list[str] | None = None) -> Report:
    conn = await reader(dsn, admin=True)
    try:
        return await audit_report(conn, keys=[k.encode() for k in keys or []])
    finally:
        await conn.close()


async def cli_verify(dsn: str, env: dict[str, str] | None = None) -> Result:
    """``plant-gateway audit verify`` (in a thread: it runs its own event loop)."""
    def invoke() -> Result:
        return CliRunner().invoke(app, ["audit", "verify", "--database-url", dsn], env=env)

    return await asyncio.to_thread(invoke)


def mine(rep: Report, inst: str) -> tuple[list[str], list[tuple[str, int | None]]]:
    """The chain's state kinds and its findings as (kind, seq)."""
    return ([c.kind for c in rep.chains if c.instance_id == inst],
            [(f.kind, f.seq) for f in rep.findings if f.instance_id == inst])


async def closed_chain(dsn: str, tmp_path: Path, rows: int = 20, **extra: Any) -> str:
    sink, recorder = await started_sink(dsn, tmp_path, **extra)
    for _ in range(rows):
        recorder.record(context())
    await sink.close()
    return recorder.instance_id


async def admin_exec(dsn: str, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET app.is_admin = 'true'")
        return str(await conn.execute(sql, *args))
    finally:
        await conn.close()


async def crash(sink: PostgresAuditSink) -> None:
    """What SIGKILL leaves: tasks gone, connections dropped, no close."""
    for task in sink._tasks:
        task.cancel()
    for task in sink._tasks:
        with contextlib.suppress(BaseException):
            await task
    for conn in (sink.writer.conn, sink.replayer.conn, sink._probe):
        if conn is not None:
            conn.terminate()
    if sink.spool is not None:
        sink.spool.close()


async def test_a_clean_close_is_ok_and_its_marks_are_signed(audit_db: str, tmp_path: Path) -> None:
    inst = await closed_chain(audit_db, tmp_path, audit_chain_key=KEY)
    rep = await report(audit_db, [KEY])
    assert mine(rep, inst) == (["closed"], [])
    line = next(str(c) for c in rep.chains if c.instance_id == inst)
    assert line.startswith(f"CLOSED: {inst}: closed cleanly at seq 20")
    marks = await fetch(audit_db, f"SELECT kind, seq, mac FROM {MARKS} WHERE instance_id = $1 "
                                  "ORDER BY at", inst)
    assert [m["kind"] for m in marks][-1] == "close" and marks[-1]["seq"] == 20
    assert "checkpoint" in {m["kind"] for m in marks}  # the first batch marks the new chain
    assert all(m["mac"] for m in marks)
    assert not [n for n in rep.notes if "MAC" in n]  # the key was given


async def test_deleting_the_last_row_is_a_truncated_tail(audit_db: str, tmp_path: Path) -> None:
    inst = await closed_chain(audit_db, tmp_path)
    assert await admin_exec(audit_db, "DELETE FROM gateway_audit_logs WHERE instance_id = $1 "
                                      "AND seq = 20", inst) == "DELETE 1"
    rep = await report(audit_db)
    _, found = mine(rep, inst)
    assert ("truncated", 20) in found  # the chain alone (seq 1..19) would look intact
    done = await cli_verify(audit_db)
    assert done.exit_code == 1
    assert f"TRUNCATED: {inst} seq 20: the close mark of" in done.output, done.output
    assert "names seq 20 but the chain ends at seq 19" in done.output
    assert "Traceback" not in done.output


async def test_an_edited_and_rehashed_last_row_is_caught_and_a_rewritten_mark_fails_its_mac(
    audit_db: str, tmp_path: Path
) -> None:
    inst = await closed_chain(audit_db, tmp_path, audit_chain_key=KEY)
    conn = await asyncpg.connect(audit_db)
    try:
        await conn.execute("SET app.is_admin = 'true'")
        last = from_db(await conn.fetchrow(
            "SELECT * FROM gateway_audit_logs WHERE instance_id = $1 AND seq = 20", inst))
        last["status_code"] = 403
        forged = row_hash(last)
        await conn.execute("UPDATE gateway_audit_logs SET status_code = 403, row_hash = $2 "
                           "WHERE instance_id = $1 AND seq = 20", inst, forged)
        rep = await report(audit_db, [KEY])
        assert ("rehashed", 20) in mine(rep, inst)[1]
        assert ("edited", 20) not in mine(rep, inst)[1]  # the chain alone sees nothing
        # the forger rewrites the marks too: without the key their MACs no longer match
        await conn.execute(f"UPDATE {MARKS} SET row_hash = $2 WHERE instance_id = $1 "
                           "AND seq = 20", inst, forged)
    finally:
        await conn.close()
    rep = await report(audit_db, [KEY])
    assert [k for k, _ in mine(rep, inst)[1]] == ["mac-invalid"]
    unkeyed = await report(audit_db)
    assert mine(unkeyed, inst)[1] == []  # exactly what the MAC is for, and verify says so
    assert any("MACs not checked" in n for n in unkeyed.notes)
    done = await cli_verify(audit_db, {"AUDIT_CHAIN_KEY": KEY})
    assert done.exit_code == 1 and f"MAC-INVALID: {inst} seq 20" in done.output


async def test_unsigned_marks_still_catch_truncation_and_verify_says_what_they_cannot(
    audit_db: str, tmp_path: Path
) -> None:
    inst = await closed_chain(audit_db, tmp_path)
    rep = await report(audit_db)
    assert mine(rep, inst) == (["closed"], [])
    assert any("unsigned checkpoints" in n and "cannot be detected" in n for n in rep.notes)


async def test_a_crashed_instance_is_named_with_its_last_seq_and_loss_bound(
    audit_db: str, tmp_path: Path
) -> None:
    sink, recorder = await started_sink(audit_db, tmp_path, audit_checkpoint_interval_s=0.1,
                                        audit_queue_max=300, audit_batch_size=50)
    for _ in range(40):
        recorder.record(context())
    await asyncio.sleep(0.4)  # written and marked
    live = await report(audit_db)
    assert mine(live, recorder.instance_id) == (["live"], [])
    await crash(sink)
    await asyncio.sleep(2 * 0.6 + 1.2)  # two heartbeats and the slack: no longer live
    rep = await report(audit_db)
    assert mine(rep, recorder.instance_id) == (["unclosed"], [])
    line = next(str(c) for c in rep.chains if c.instance_id == recorder.instance_id)
    assert "ended without a clean close" in line and "last seq 40 " in line
    assert "at most 400 more row(s) lost" in line  # queue 300 + slack 50 + batch 50
    assert not [f for f in rep.findings if f.instance_id == recorder.instance_id]


async def test_the_close_mark_travels_through_the_spool_when_the_database_is_down(
    audit_db: str, tmp_path: Path
) -> None:
    down = settings(tmp_path, database_url="postgresql://postgres@127.0.0.1:9/none")
    sink = PostgresAuditSink(down, "postgresql://postgres@127.0.0.1:9/none")
    await sink.start()
    recorder = AuditRecorder(down, sink)
    for _ in range(15):
        recorder.record(context())
    await sink.close()  # rows and then the close mark: into the spool
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "audit-spool").glob("*.jsonl"))
    assert spooled.count(b"\n") == 16 and spooled.splitlines()[-1].startswith(b"!")
    # a restarted gateway on the same disk replays the orphaned spool: rows, then the mark
    again, _ = await started_sink(audit_db, tmp_path)
    try:
        for _ in range(100):
            rows = await fetch(audit_db, f"SELECT kind FROM {MARKS} WHERE instance_id = $1",
                               recorder.instance_id)
            if rows:
                break
            await asyncio.sleep(0.1)
    finally:
        await again.close()
    rep = await report(audit_db)
    assert mine(rep, recorder.instance_id) == (["closed"], [])


async def test_chains_from_before_the_checkpoints_are_not_flagged(
    audit_db: str, tmp_path: Path
) -> None:
    sink, recorder = await started_sink(audit_db, tmp_path)
    before = datetime.now(UTC) - timedelta(days=2)
    for _ in range(3):
        ctx = context()
        ctx.timestamp = before
        recorder.record(ctx)
    await sink.close()
    # what an older release would have left: the rows, no marks
    await admin_exec(audit_db, f"DELETE FROM {MARKS} WHERE instance_id = $1",
                     recorder.instance_id)
    rep = await report(audit_db)
    states, found = mine(rep, recorder.instance_id)
    assert states == ["unchecked"] and found == []
    line = next(str(c) for c in rep.chains if c.instance_id == recorder.instance_id)
    assert "NO CHECKPOINTS" in line and "written before checkpoints were installed" in line


async def test_the_writer_may_only_insert_marks(audit_db: str, tmp_path: Path) -> None:
    await closed_chain(audit_db, tmp_path, rows=2)
    conn = await asyncpg.connect(with_user(audit_db, WRITER))
    try:
        for sql in (f"SELECT count(*) FROM {MARKS}", f"UPDATE {MARKS} SET seq = 1",
                    f"DELETE FROM {MARKS}", f"TRUNCATE {MARKS}"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    finally:
        await conn.close()


def test_migration_0003_down_and_up(pg_admin_dsn: str) -> None:
    dsn = create_database(pg_admin_dsn)
    try:
        migrations.upgrade(dsn)
        assert migrations.current(dsn) == "0003"
        migrations.downgrade(dsn, "0002")
        assert migrations.current(dsn) == "0002"
        assert asyncio.run(fetch(dsn, "SELECT to_regclass($1) AS t", MARKS))[0]["t"] is None
        migrations.upgrade(dsn)
        migrations.upgrade(dsn)
        installed = asyncio.run(fetch(dsn, f"SELECT count(*) AS n FROM {MARKS} "
                                           "WHERE kind = 'installed'"))
        assert installed[0]["n"] == 1
    finally:
        drop_database(dsn)


async def test_retention_drops_marks_with_their_rows(audit_db: str) -> None:
    old = datetime.now(UTC) - timedelta(days=40)
    mark = Mark("close", "retired-chain", 5, "a" * 64, old, old)
    conn = await asyncpg.connect(audit_db)
    try:
        await conn.execute(f"INSERT INTO {MARKS} (kind, instance_id, seq, row_hash, row_ts, at) "
                           "VALUES ($1, $2, $3, $4, $5, $6)", *mark.args()[:6])
        await conn.fetchval("SELECT gateway_audit_maintain(30, 1)")
        left = await conn.fetchval(f"SELECT count(*) FROM {MARKS} WHERE instance_id = $1",
                                   "retired-chain")
        installed = await conn.fetchval(f"SELECT count(*) FROM {MARKS} WHERE kind = 'installed'")
    finally:
        await conn.close()
    assert left == 0 and installed == 1


async def test_a_row_appended_after_the_close_is_caught_even_when_it_links(
    audit_db: str, tmp_path: Path
) -> None:
    inst = await closed_chain(audit_db, tmp_path, rows=5)
    conn = await asyncpg.connect(audit_db)
    try:
        await conn.execute("SET app.is_admin = 'true'")
        last = from_db(await conn.fetchrow(
            "SELECT * FROM gateway_audit_logs WHERE instance_id = $1 AND seq = 5", inst))
        extra = dict(last, id="0b5f9a4e-2222-4c2d-8e3f-222233334444", seq=6,
                     prev_hash=last["row_hash"])
        extra["row_hash"] = row_hash(extra)  # a well-formed continuation of the chain
        cols = ", ".join(f'"{k}"' for k in extra)
        args = ", ".join(f"${i}" for i in range(1, len(extra) + 1))
        await conn.execute(f"INSERT INTO gateway_audit_logs ({cols}) VALUES ({args})",
                           *[_db_value(k, v) for k, v in extra.items()])
    finally:
        await conn.close()
    rep = await report(audit_db)
    assert mine(rep, inst) == (["closed"], [("forged", 6)])


def _db_value(name: str, value: Any) -> Any:
    import json
    import uuid

    if value is None:
        return None
    if name in ("id", "correlation_id", "causation_id", "request_id", "user_id"):
        return uuid.UUID(str(value))
    if name in ("query_params", "request_headers", "request_body", "opa_decisions",
                "response_headers", "response_body"):
        return json.dumps(json.loads(value))
    return value


async def test_a_database_without_the_checkpoint_table_keeps_taking_rows(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    dsn = create_database(pg_admin_dsn)
    try:
        migrations.upgrade(dsn, "0002")
        sink, recorder = await started_sink(dsn, tmp_path)
        for _ in range(10):
            recorder.record(context())
        await asyncio.sleep(0.3)
        assert "checkpoint" in sink.conditions  # said once: run db upgrade
        await sink.close()
        assert sink.stats["written"] == 10 and sink.stats["dead"] == 0
        rep = await report(dsn)
        assert mine(rep, recorder.instance_id) == (["unchecked"], [])
        assert any("no checkpoint table" in n for n in rep.notes)
    finally:
        drop_database(dsn)
