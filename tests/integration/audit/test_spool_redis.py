"""The Redis audit spool with a real Redis the test owns (its own port) and a dedicated embedded
PostgreSQL the test stops and starts.

Counting by correlation id: rows recorded == rows in the table (each exactly once). A Cloud Run
instance that is gone for good is a sink closed with its state directory deleted; another
instance (another sink, another state directory, the same Redis) replays its rows.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from plant_gateway.audit.checkpoints import MARK_PREFIX
from plant_gateway.audit.recorder import AuditRecorder
from plant_gateway.audit.sink import PostgresAuditSink
from plant_gateway.audit.spool_redis import TAG
from plant_gateway.metrics import REGISTRY
from tests.fixtures.postgres import ControlledPostgres
from tests.fixtures.redis import RedisServer
from tests.integration.audit.support import count_ids, fetch, record, started_sink, until


def redis_lines(server: RedisServer) -> list[bytes]:
    """The shared spool's lines: waiting, or taken by a replayer and not confirmed (read from
    the lists themselves, with a client of the test's own)."""
    with redis.Redis.from_url(server.url) as client:
        lists = [f"{TAG}:rows", *client.keys(f"{TAG}:processing:*")]
        return [line for key in lists for line in client.lrange(key, 0, -1)]  # type: ignore[union-attr]


def in_redis(server: RedisServer) -> int:
    """Rows in the shared spool (a chain's close mark, spooled after its rows, is no row)."""
    return sum(1 for line in redis_lines(server) if not line.startswith(MARK_PREFIX))


def size_counts(server: RedisServer) -> dict[bytes, bytes]:
    """The caps' counts (rows, bytes), without the spool's epoch."""
    with redis.Redis.from_url(server.url) as client:
        counts: dict[bytes, bytes] = client.hgetall(f"{TAG}:size")  # type: ignore[assignment]
    counts.pop(b"epoch", None)
    return counts


def redis_keys(server: RedisServer) -> set[str]:
    with redis.Redis.from_url(server.url, decode_responses=True) as client:
        return set(client.keys("*"))


async def instance(pg: ControlledPostgres, state: Path, server: RedisServer,
                   **extra: Any) -> tuple[PostgresAuditSink, AuditRecorder]:
    return await started_sink(pg.admin_dsn, state, redis_url=server.url, **extra)


async def test_rows_of_an_instance_gone_for_good_are_replayed_by_another_exactly_once(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Database down: instance A's rows go to Redis (its queue too, pushed at close), A is
    closed and its state directory deleted; B, started later on its own directory, writes
    every one of A's rows exactly once, in chain order, once the database is back."""
    state_a, state_b = tmp_path / "a", tmp_path / "b"
    sink_a, recorder_a = await instance(controlled_pg, state_a, redis_server)
    ids: list[str] = []
    record(recorder_a, ids, 100)
    assert await until(lambda: sink_a.stats["written"] == 100)
    await asyncio.to_thread(controlled_pg.stop)
    record(recorder_a, ids, 1000)  # seq 101..1100
    assert await until(lambda: sink_a.redis_spool is not None
                       and sink_a.redis_spool.stats["spooled"] >= 500)
    status = await sink_a.check()
    assert "rows in the Redis spool" in status.detail
    assert sink_a.redis_spool is not None and sink_a.redis_spool.pending > 0
    gauge = REGISTRY.get_sample_value("plant_gateway_audit_redis_spool_rows")
    assert gauge == sink_a.redis_spool.pending
    record(recorder_a, ids, 200)  # queued when close() starts: pushed to Redis at close
    started = time.monotonic()
    await sink_a.close()
    assert time.monotonic() - started < sink_a.close_budget_s + 0.5
    assert sink_a.stats["lost"] == 0 and sink_a.stats["spooled"] == 0  # nothing on disk
    assert in_redis(redis_server) == 1200
    assert redis_lines(redis_server)[-1].startswith(MARK_PREFIX)  # A's close mark, after them
    shutil.rmtree(state_a)  # the instance is gone, and its memory file system with it

    await asyncio.to_thread(controlled_pg.start)
    sink_b, _ = await instance(controlled_pg, state_b, redis_server)
    try:
        assert await until(lambda: in_redis(redis_server) == 0
                           and sink_b.redis_spool is not None
                           and sink_b.redis_spool.pending == 0)
    finally:
        await sink_b.close()
    assert sink_b.redis_spool is not None and sink_b.redis_spool.stats["replayed"] == 1200
    assert await count_ids(controlled_pg.admin_dsn, ids) == (1300, 1300)
    rows = await fetch(controlled_pg.admin_dsn,
                       "SELECT xmin::text::bigint AS x FROM gateway_audit_logs "
                       "WHERE instance_id = $1 AND seq > 100 ORDER BY seq",
                       recorder_a.instance_id)
    xmins = [r["x"] for r in rows]  # one transaction per batch: xmin grows with seq
    assert len(xmins) == 1200 and xmins == sorted(xmins)
    closes = await fetch(controlled_pg.admin_dsn,
                         "SELECT seq FROM gateway_audit_checkpoints "
                         "WHERE instance_id = $1 AND kind = 'close'", recorder_a.instance_id)
    assert [r["seq"] for r in closes] == [1300]  # A's chain ends cleanly, replayed by B
    # nothing left behind but the counts, back at zero
    assert redis_keys(redis_server) <= {f"{TAG}:size", f"{TAG}:replayers"}
    assert size_counts(redis_server) == {b"rows": b"0", b"bytes": b"0"}


async def test_redis_down_too_sends_rows_to_the_disk_spool_and_back(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Database and Redis down: rows go to the disk spool, /ready says why; Redis back, new
    rows go to Redis again and the disk rows follow them there; database back, every row is
    in the table once."""
    sink, recorder = await instance(controlled_pg, tmp_path, redis_server)
    ids: list[str] = []
    # the disk gauge is per process (other tests' sinks count in it too)
    on_disk_before = REGISTRY.get_sample_value("plant_gateway_audit_spool_pending_rows")
    try:
        await asyncio.to_thread(controlled_pg.stop)
        await asyncio.to_thread(redis_server.stop)
        record(recorder, ids, 500)
        assert await until(lambda: sink._pending() == 500)
        spool = sink.redis_spool
        assert spool is not None and "Redis unreachable" in spool.error
        assert "redis_spool" in sink.conditions
        status = await sink.check()
        assert not status.ok and "Redis spool cannot take rows" in status.detail
        assert not status.required  # the disk spool still secures the rows: still serving
        assert REGISTRY.get_sample_value("plant_gateway_audit_redis_spool_writable") == 0

        await asyncio.to_thread(redis_server.start)  # an empty Redis (no persistence)
        back = time.monotonic()
        while not spool.stats["spooled"] and time.monotonic() - back < 10:
            record(recorder, ids, 20)  # to disk until the push backoff (<= 5 s) ends
            await asyncio.sleep(0.1)
        assert spool.stats["spooled"] and not spool.error
        assert "redis_spool" not in sink.conditions
        assert await until(lambda: sink.queue.empty())
        assert sink._pending() + in_redis(redis_server) == len(ids)
        assert in_redis(redis_server) == spool.stats["spooled"]
        # the database still down, the disk rows (which die with a Cloud Run instance) move
        # to Redis too, without a close
        assert await until(lambda: sink._pending() == 0 and in_redis(redis_server) == len(ids))
        assert REGISTRY.get_sample_value("plant_gateway_audit_spool_pending_rows") == on_disk_before

        await asyncio.to_thread(controlled_pg.start)
        assert await until(lambda: sink._pending() == 0 and in_redis(redis_server) == 0)
    finally:
        await sink.close()
    assert sink.stats["lost"] == 0
    assert await count_ids(controlled_pg.admin_dsn, ids) == (len(ids), len(ids))


async def test_the_redis_cap_sends_the_rest_to_the_disk_spool(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path
) -> None:
    """AUDIT_REDIS_SPOOL_MAX_ROWS reached: Redis holds exactly what fits in whole batches, the
    rest goes to disk; the rate-limit keys sharing the Redis are untouched; nothing lost."""
    sink, recorder = await instance(controlled_pg, tmp_path, redis_server,
                                    audit_redis_spool_max_rows=450, audit_batch_size=100)
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("rl:{user:42}", "1765000000123456")  # a counter the spool must not evict
    ids: list[str] = []
    try:
        await asyncio.to_thread(controlled_pg.stop)
        for _ in range(10):  # one batch at a time: 100 rows per push
            record(recorder, ids, 100)
            assert await until(lambda: sink.queue.empty())
        spool = sink.redis_spool
        assert spool is not None
        assert in_redis(redis_server) == 400  # a fifth batch would pass 450
        assert sink._pending() == 600
        assert "AUDIT_REDIS_SPOOL_MAX_ROWS=450" in spool.error
        assert "AUDIT_REDIS_SPOOL_MAX_ROWS=450" in (await sink.check()).detail
        with redis.Redis.from_url(redis_server.url) as client:
            assert client.get("rl:{user:42}") == b"1765000000123456"
        await asyncio.to_thread(controlled_pg.start)
        assert await until(lambda: sink._pending() == 0 and in_redis(redis_server) == 0)
    finally:
        await sink.close()
    assert sink.stats["lost"] == 0
    assert await count_ids(controlled_pg.admin_dsn, ids) == (1000, 1000)


async def test_a_replayer_killed_mid_batch_has_its_batch_recovered_by_another(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Replayer A takes a batch from Redis and dies while writing it (its task stops, no
    cleanup: a SIGKILL). Once A's heartbeat expires, B puts A's batch back and writes every
    row exactly once (rows A might have committed are deduplicated)."""
    sink_a, recorder_a = await instance(controlled_pg, tmp_path / "a", redis_server,
                                        audit_batch_size=100)
    ids: list[str] = []
    await asyncio.to_thread(controlled_pg.stop)
    record(recorder_a, ids, 600)
    assert await until(lambda: in_redis(redis_server) == 600)
    spool_a = sink_a.redis_spool
    assert spool_a is not None
    spool_a.heartbeat_ttl_ms = 500
    # A's own replay task stops (the sink's tasks die with the process)
    for task in sink_a._tasks:
        task.cancel()
    await asyncio.gather(*sink_a._tasks, return_exceptions=True)
    await asyncio.to_thread(controlled_pg.start)

    writing = asyncio.Event()

    async def hangs(lines: list[bytes]) -> int | None:
        writing.set()
        await asyncio.Event().wait()  # the process is killed inside the write
        return None

    replay_a = asyncio.create_task(spool_a.replay(hangs, 1))
    await asyncio.wait_for(writing.wait(), 10)
    replay_a.cancel()  # dead: A's batch stays in its processing list, its heartbeat lapses
    await asyncio.gather(replay_a, return_exceptions=True)
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.llen(f"{TAG}:processing:{spool_a.replayer}") == 100
        assert client.llen(f"{TAG}:rows") == 500

    sink_b, _ = await instance(controlled_pg, tmp_path / "b", redis_server)
    try:
        assert await until(lambda: sink_b.redis_spool is not None
                           and sink_b.redis_spool.stats["replayed"] == 600)
        assert sink_b.redis_spool is not None and sink_b.redis_spool.stats["recovered"] == 100
        assert await count_ids(controlled_pg.admin_dsn, ids) == (600, 600)
    finally:
        await sink_b.close()
        await spool_a.client.aclose()  # what a killed process leaves: nothing else closed
        await sink_a._close_connections(time.monotonic() + 1)
        if sink_a.spool is not None:
            sink_a.spool.close()
    assert redis_keys(redis_server) <= {f"{TAG}:size", f"{TAG}:replayers"}
    assert size_counts(redis_server) == {b"rows": b"0", b"bytes": b"0"}


async def test_disk_spooled_rows_move_to_redis_at_close_when_the_database_is_down(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Rows that went to the disk spool while Redis was down would die with the instance:
    with the database still down at close and Redis back, close() moves them to Redis."""
    sink, recorder = await instance(controlled_pg, tmp_path, redis_server)
    ids: list[str] = []
    await asyncio.to_thread(controlled_pg.stop)
    await asyncio.to_thread(redis_server.stop)
    record(recorder, ids, 400)
    assert await until(lambda: sink._pending() == 400)
    await asyncio.to_thread(redis_server.start)
    await sink.close()
    assert sink.stats["lost"] == 0
    assert in_redis(redis_server) == 400
    assert not list((tmp_path / "audit-spool").glob("*.jsonl"))  # nothing left on disk
    await asyncio.to_thread(controlled_pg.start)
    successor, _ = await instance(controlled_pg, tmp_path / "next", redis_server)
    try:
        assert await until(lambda: in_redis(redis_server) == 0
                           and successor.redis_spool is not None
                           and successor.redis_spool.pending == 0)
    finally:
        await successor.close()
    assert await count_ids(controlled_pg.admin_dsn, ids) == (400, 400)


@pytest.mark.parametrize("mode", ["off"])
async def test_the_redis_spool_can_be_switched_off(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path, mode: str
) -> None:
    sink, recorder = await instance(controlled_pg, tmp_path, redis_server,
                                    audit_redis_spool=mode)
    ids: list[str] = []
    try:
        assert sink.redis_spool is None
        await asyncio.to_thread(controlled_pg.stop)
        record(recorder, ids, 50)
        assert await until(lambda: sink._pending() == 50)
        assert in_redis(redis_server) == 0
    finally:
        await sink.close()


async def test_a_hung_redis_costs_one_timeout_per_backoff_and_close_keeps_its_budget(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis SIGSTOPped (connections open, nothing answers) with the database down: batches go
    to the disk spool after one timeout, not one per batch; close() returns within its budget
    with every row on disk."""
    sink, recorder = await instance(controlled_pg, tmp_path, redis_server)
    ids: list[str] = []
    assert redis_server.proc is not None
    try:
        await asyncio.to_thread(controlled_pg.stop)
        record(recorder, ids, 10)  # Redis answers: these are pushed
        assert await until(lambda: in_redis(redis_server) == 10)
        redis_server.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        for _ in range(20):  # 2,000 rows in 20 batches over ~2 s
            record(recorder, ids, 100)
            await asyncio.sleep(0.1)
        assert await until(lambda: sink._pending() == 2000, within_s=10)
        assert time.monotonic() - started < 6  # a timeout per batch would take 20 s or more
        assert sink.redis_spool is not None and "Redis unreachable" in sink.redis_spool.error
        record(recorder, ids, 300)
        started = time.monotonic()
        await sink.close()
        assert time.monotonic() - started < sink.close_budget_s + 0.5
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert sink.stats["lost"] == 0 and sink._pending() >= 2000
    # everything comes back: the next process replays the disk spool it left and Redis
    await asyncio.to_thread(controlled_pg.start)
    successor, _ = await instance(controlled_pg, tmp_path, redis_server)
    try:
        assert await until(lambda: in_redis(redis_server) == 0
                           and not sink.spool_path.exists())  # the orphan: replayed, removed
    finally:
        await successor.close()
    assert await count_ids(controlled_pg.admin_dsn, ids) == (2310, 2310)


async def test_rows_lost_with_a_restarted_redis_are_counted_and_reported(
    controlled_pg: ControlledPostgres, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A Redis without persistence (Memorystore Basic) restarts while it holds rows: the sink
    sees the spool's new epoch, logs and counts the rows it last saw waiting, /ready says so;
    rows spooled afterwards are written as usual."""
    sink, recorder = await instance(controlled_pg, tmp_path, redis_server)
    ids: list[str] = []
    try:
        await asyncio.to_thread(controlled_pg.stop)
        record(recorder, ids, 300)
        assert await until(lambda: in_redis(redis_server) == 300)
        spool = sink.redis_spool
        assert spool is not None and spool.pending == 300 and spool.stats["vanished"] == 0
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)  # empty
        later: list[str] = []
        while not spool.stats["vanished"] and len(later) < 2000:
            record(recorder, later, 20)  # pushes resume on the new Redis after the backoff
            await asyncio.sleep(0.1)
        assert spool.stats["vanished"] == 300
        assert "300 rows lost with the Redis spool" in (await sink.check()).detail
        await asyncio.to_thread(controlled_pg.start)
        assert await until(lambda: sink.queue.empty() and sink._pending() == 0
                           and in_redis(redis_server) == 0)
    finally:
        await sink.close()
    assert await count_ids(controlled_pg.admin_dsn, ids) == (0, 0)
    assert await count_ids(controlled_pg.admin_dsn, later) == (len(later), len(later))
