"""No loss across a database outage and a shutdown, on a dedicated embedded PostgreSQL.

Counting at the sink level: rows submitted == rows in the table (+ rows left in the spool).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from plant_gateway import migrations
from tests.fixtures.postgres import ControlledPostgres, create_database, drop_database
from tests.integration.audit.support import context, count_ids, started_sink

N = 3000


async def test_database_outage_mid_load_loses_and_duplicates_nothing(
    controlled_pg: ControlledPostgres, tmp_path: Path
) -> None:
    sink, recorder = await started_sink(controlled_pg.admin_dsn, tmp_path)
    ids: list[str] = []

    async def load(count: int) -> None:
        for i in range(count):
            ctx = context(status=200)
            ids.append(ctx.correlation_id)
            recorder.record(ctx)
            if i % 50 == 0:
                await asyncio.sleep(0.005)

    await load(N // 3)
    await asyncio.to_thread(controlled_pg.stop)
    await load(N // 3)  # database down: rows go to the spool
    assert sink.stats["spooled"] > 0
    await asyncio.to_thread(controlled_pg.start)
    await load(N - 2 * (N // 3))
    for _ in range(200):  # the writer replays the spool once the database is back
        if sink.spool is not None and sink.spool.pending == 0 and sink.queue.empty():
            break
        await asyncio.sleep(0.05)
    await sink.close()
    assert sink.stats["replayed"] > 0
    assert sink.stats["lost"] == 0 and sink.stats["dead"] == 0
    assert await count_ids(controlled_pg.admin_dsn, ids) == (N, N)


async def test_shutdown_during_outage_keeps_every_row_on_disk(
    controlled_pg: ControlledPostgres, tmp_path: Path
) -> None:
    sink, recorder = await started_sink(controlled_pg.admin_dsn, tmp_path)
    ids: list[str] = []
    for i in range(N):
        if i == N // 2:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(controlled_pg.stop)
        ctx = context(status=200)
        ids.append(ctx.correlation_id)
        recorder.record(ctx)
    await sink.close()  # mid-load, database down: queue goes to the spool
    lines = sink.spool_path.read_text().splitlines() if sink.spool_path.exists() else []
    spooled = [line for line in lines if not line.startswith("!")]
    assert lines[-1].startswith("!")  # the chain's close mark, after its rows
    await asyncio.to_thread(controlled_pg.start)
    in_table, distinct = await count_ids(controlled_pg.admin_dsn, ids)
    assert in_table == distinct
    assert in_table + len(spooled) == N
    assert len(spooled) > 0
    # a restarted gateway on the same state directory replays the orphaned spool in order
    sink2, _ = await started_sink(controlled_pg.admin_dsn, tmp_path)
    await sink2._replay_orphans()
    await sink2.close()
    assert await count_ids(controlled_pg.admin_dsn, ids) == (N, N)


async def test_unmigrated_database_is_reported_and_loses_nothing(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """DATABASE_URL pointing at a database nobody migrated: /ready says what to run, the rows
    wait in the spool, and after `db upgrade` they arrive exactly once."""
    dsn = create_database(postgres_dsn, "pgw_unmigrated")
    try:
        sink, recorder = await started_sink(dsn, tmp_path)
        try:
            status = await sink.check()
            assert not status.ok and "plant-gateway db upgrade" in status.detail
            ctx = context(status=200)
            recorder.record(ctx)
            for _ in range(50):  # the writer's COPY fails on the missing table: spooled
                if sink.spool is not None and sink.spool.pending:
                    break
                await asyncio.sleep(0.1)
            assert sink.spool is not None and sink.spool.pending == 1
            await asyncio.to_thread(migrations.upgrade, dsn)
            for _ in range(100):
                if (await count_ids(dsn, [ctx.correlation_id]))[0] == 1:
                    break
                await asyncio.sleep(0.2)
            assert await count_ids(dsn, [ctx.correlation_id]) == (1, 1)
            assert (await sink.check()).ok
        finally:
            await sink.close()
    finally:
        drop_database(dsn)


async def test_close_with_a_hung_database_mid_write_ends_within_its_budget(
    controlled_pg: ControlledPostgres, tmp_path: Path
) -> None:
    """SIGSTOPped PostgreSQL while a batch is being written (connection open, nothing answers):
    close() gives up on the write at its deadline, spools the batch and returns within the
    flush budget; a ROLLBACK or a graceful close on the hung connection must not hold it.
    Cloud Run SIGKILLs 10 s after SIGTERM, so an unbounded wait here loses every queued row."""
    sink, recorder = await started_sink(controlled_pg.admin_dsn, tmp_path)
    ids: list[str] = []

    def load(count: int) -> None:
        for _ in range(count):
            ctx = context(status=200)
            ids.append(ctx.correlation_id)
            recorder.record(ctx)

    load(100)
    for _ in range(100):  # the writer's connection is open and idle
        if sink.stats["written"] == 100:
            break
        await asyncio.sleep(0.05)
    with controlled_pg.frozen():
        load(300)
        await asyncio.sleep(1.0)  # the writer is inside COPY on the hung connection
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(sink.close(), sink.close_budget_s + 5)
        took = asyncio.get_running_loop().time() - started
    assert took < sink.close_budget_s + 0.5
    lines = sink.spool_path.read_text().splitlines() if sink.spool_path.exists() else []
    spooled = [line for line in lines if not line.startswith("!")]  # not the close mark
    assert sink.stats["lost"] == 0
    in_table, _ = await count_ids(controlled_pg.admin_dsn, ids)
    assert in_table + len(spooled) == len(ids)
