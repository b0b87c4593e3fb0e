"""The audit sink through outages it must survive by itself, on a dedicated embedded PostgreSQL
that the tests stop and start.

Counting at the sink level: rows recorded == rows in the table + rows counted lost, by
correlation id. Continuous replay (own spool and a previous process's), a spool at its cap
with the database down (refuse, or serve and count), and tasks that fail and restart.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from plant_gateway.audit.recorder import AuditRecorder
from plant_gateway.audit.sink import PostgresAuditSink
from plant_gateway.audit.spool import Spool
from tests.fixtures.postgres import ControlledPostgres
from tests.integration.audit.support import count_ids, fetch, record, started_sink, until

# a 64 KiB spool (the smallest cap) holds ~90 rows of these contexts; a short queue
SMALL = {"audit_spool_max_bytes": 65536, "audit_queue_max": 100, "audit_batch_size": 50}


def settled(sink: PostgresAuditSink) -> bool:
    return sink.queue.empty() and sink._pending() == 0


async def test_replay_runs_continuously_in_order_on_its_own_connection(
    controlled_pg: ControlledPostgres, tmp_path: Path
) -> None:
    """1,000 rows spooled; the database stays down past the replay's first attempts; once it
    is back the spool drains, oldest first, while new rows keep flowing: no restart."""
    sink, recorder = await started_sink(controlled_pg.admin_dsn, tmp_path)
    ids: list[str] = []
    try:
        record(recorder, ids, 100)
        assert await until(lambda: sink.stats["written"] == 100)
        await asyncio.to_thread(controlled_pg.stop)
        record(recorder, ids, 1000)  # seq 101..1100: every one to the spool
        assert await until(lambda: sink._pending() == 1000)
        # the replay tried and backed off twice (0.5 s, then 1 s) while the database was down
        assert await until(lambda: sink.replayer.retry_s >= 2.0)
        assert sink.stats["replayed"] == 0 and "database" in sink.conditions
        await asyncio.to_thread(controlled_pg.start)
        flowing = 0
        while sink._pending() and flowing < 3000:  # new rows while the replay drains
            record(recorder, ids, 10)
            flowing += 10
            await asyncio.sleep(0.01)
        assert flowing > 0  # the spool was not drained before new rows were taken
        record(recorder, ids, 100)
        assert await until(lambda: settled(sink))
        assert sink.spool is not None and sink.spool.size == 0  # drained, file emptied
        writer, replay = sink.writer.conn, sink.replayer.conn
        assert writer is not None and replay is not None
        assert writer.get_server_pid() != replay.get_server_pid()
        assert set(sink.conditions) <= {"retention"}  # retried a minute after it failed
    finally:
        await sink.close()
    assert await count_ids(controlled_pg.admin_dsn, ids) == (len(ids), len(ids))
    assert sink.stats["replayed"] == 1000 and sink.stats["lost"] == sink.stats["dead"] == 0
    # replayed in spool order: one transaction per batch, so xmin grows with seq
    rows = await fetch(controlled_pg.admin_dsn,
                       "SELECT xmin::text::bigint AS x FROM gateway_audit_logs "
                       "WHERE instance_id = $1 AND seq BETWEEN 101 AND 1100 ORDER BY seq",
                       recorder.instance_id)
    xmins = [r["x"] for r in rows]
    assert len(xmins) == 1000 and xmins == sorted(xmins)


async def test_a_previous_process_spool_drains_when_the_database_returns_late(
    controlled_pg: ControlledPostgres, tmp_path: Path
) -> None:
    """Deployed-gateway defect: a spool left by a restart was replayed about a second after
    start and then hourly; with the database still down then, its rows waited an hour."""
    sink, recorder = await started_sink(controlled_pg.admin_dsn, tmp_path)
    ids: list[str] = []
    await asyncio.to_thread(controlled_pg.stop)
    record(recorder, ids, 1000)
    await sink.close()  # the process ends: its spool stays on disk
    left = list((tmp_path / "audit-spool").glob("*.jsonl"))
    assert len(left) == 1
    successor, _ = await started_sink(controlled_pg.admin_dsn, tmp_path)
    try:
        assert await until(lambda: successor.replayer.retry_s >= 2.0)  # tried, database down
        assert left[0].exists()
        await asyncio.to_thread(controlled_pg.start)
        assert await until(lambda: not left[0].exists())  # replayed, then removed
    finally:
        await successor.close()
    assert successor.stats["replayed"] == 1000
    assert await count_ids(controlled_pg.admin_dsn, ids) == (1000, 1000)


@pytest.mark.parametrize("on_loss", ["refuse", "serve"])
async def test_a_full_spool_with_the_database_down_refuses_or_counts_then_recovers(
    controlled_pg: ControlledPostgres, tmp_path: Path, on_loss: str
) -> None:
    """Database down, spool at its cap, queue full: ``refusing`` (or, ``serve``, rows counted
    lost), ``/ready`` and the metrics say so; the database back, the sink recovers by itself
    and every row not counted lost is in the table exactly once."""
    sink, recorder = await started_sink(controlled_pg.admin_dsn, tmp_path,
                                        audit_on_loss=on_loss, **SMALL)
    ids: list[str] = []
    try:
        await asyncio.to_thread(controlled_pg.stop)
        for _ in range(200):  # one row per request, the writer running in between
            record(recorder, ids, 5)
            await asyncio.sleep(0.01)
            if "secure" in sink.conditions:
                break
        assert "secure" in sink.conditions and sink.refusing == (on_loss == "refuse")
        assert sink.spool_error and sink.stats["lost"] == 0  # nothing lost yet
        # the rows of refused requests (or, serving, of served ones) go into the headroom,
        # then are counted lost
        record(recorder, ids, 200)
        lost = sink.stats["lost"]
        assert 0 < lost < 200
        status = await sink.check()
        assert not status.ok and status.required == (on_loss == "refuse")
        assert f"{lost} rows lost" in status.detail and "cannot be secured" in status.detail
        assert len(sink.queue.rows) + sink._pending() + lost == len(ids)
        await asyncio.to_thread(controlled_pg.start)
        assert await until(lambda: not sink.refusing and "secure" not in sink.conditions)
        record(recorder, ids, 100)  # served and written again
        assert await until(lambda: settled(sink))
        assert (await sink.check()).ok
    finally:
        await sink.close()
    in_table, distinct = await count_ids(controlled_pg.admin_dsn, ids)
    assert in_table == distinct == len(ids) - lost
    assert sink.stats["lost"] == lost and sink.stats["dead"] == 0


async def test_a_failing_writer_or_replay_restarts_and_loses_nothing(
    audit_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unforeseen error in either task (here an EIO reading the spool, a bug in the write)
    is logged and the task starts again; the rows it held are written afterwards."""
    failures = {"read": 2, "copy": 2}
    real_read, real_copy = Spool.read, PostgresAuditSink._copy

    def flaky_read(self: Spool, limit: int) -> tuple[list[bytes], int]:
        if failures["read"]:
            failures["read"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self, limit)

    async def flaky_copy(self: PostgresAuditSink, *args: object, **kw: object) -> int:
        if failures["copy"]:
            failures["copy"] -= 1
            raise RuntimeError("a bug in the writer")
        return await real_copy(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Spool, "read", flaky_read)
    monkeypatch.setattr(PostgresAuditSink, "_copy", flaky_copy)
    sink, recorder = await started_sink(audit_db, tmp_path)
    ids: list[str] = []
    try:
        record(recorder, ids, 300)  # the writer fails on these twice, then writes them
        captured = Captured()
        record(AuditRecorder(recorder.settings, captured), ids, 50)
        assert sink._spool_rows(captured.rows)  # spooled, as during an outage
        assert await until(lambda: settled(sink) and sink.stats["replayed"] == 50)
    finally:
        await sink.close()
    assert failures == {"read": 0, "copy": 0}
    assert await count_ids(audit_db, ids) == (350, 350)


class Captured:
    """A RowSink that keeps the lines (to spool them by hand)."""

    def __init__(self) -> None:
        self.rows: list[bytes] = []

    def submit(self, row: bytes) -> None:
        self.rows.append(row)
