"""The audit sink: rows queued in memory, written to PostgreSQL in COPY batches, spooled on outage.

``submit`` never blocks. A background writer batches by size or interval; when the database is
unreachable, batches go to the disk spool (``spool``), which a second task replays, oldest
first, on a connection of its own, all the time (new rows keep going straight to the table; the
hash chains are ordered by ``seq``, not by arrival). Rows that can never be inserted are
quarantined to a dead-letter file, never retried forever.

Never a silent drop: when the database is down and the spool cannot take rows (full disk, I/O
error, ``AUDIT_SPOOL_MAX_BYTES``), batches stay queued in memory; once the queue is full too the
sink sets ``refusing`` and the request path answers 503 ``audit-unavailable`` (``AUDIT_ON_LOSS=
refuse``, the default) instead of serving requests without rows; with ``serve`` they are served
and their rows counted in ``plant_audit_rows_lost_total``. Every such state is logged once when
it starts and once when it ends, shown in ``/ready`` and in the metrics, and left by itself.
The writer and replay tasks are supervised: an unexpected error is logged and the task restarts.

Rows are written as the writer role, which may only INSERT (migration 0002). Retention (the
hourly ``gateway_audit_maintain``: partitions ahead, expired ones dropped) runs on a separate
connection as the DSN's own login, never as the writer: the embedded server's owner, or the
``DATABASE_URL`` login when that is the owner or a member of ``plant_audit_maintainer``. When
``DATABASE_URL`` logs in as the writer itself, the gateway cannot run retention and says so
once; pg_cron (scheduled by migration 0001) or ``plant-gateway audit retention`` with the
owner's URL does it instead.

Chain checkpoints (``checkpoints``): the writer task records where each chain stands
between batches, and close() ends each chain with a close mark after its last row (into the
spool, after the rows, when they wait there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from plant_gateway import events
from plant_gateway.audit import metrics as m
from plant_gateway.audit import spool_redis
from plant_gateway.audit.checkpoints import MARK_PREFIX, Checkpointer, Mark, insert
from plant_gateway.audit.schema import (
    INSERT_COLUMNS_SQL,
    MAINTAINER_ROLE,
    NAMES,
    TABLE,
    WRITER_ROLE,
    from_wire,
    upgrade_line,
)
from plant_gateway.audit.spool import Spool, SpoolFull
from plant_gateway.backends.base import DependencyStatus

if TYPE_CHECKING:
    from plant_gateway.audit.embedded_postgres import EmbeddedPostgres
    from plant_gateway.settings import Settings

log = logging.getLogger("plant_gateway.audit")

STAGE = "audit_lines"
# A line is "<canonical JSON array>\t<row hash>\n": COPY takes it as CSV with tab delimiters
# and a quote character JSON never contains unescaped (orjson writes U+0001 as \u0001), so no
# byte of it is reinterpreted; the INSERT splits the array into the columns.
STAGE_DDL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (doc jsonb, row_hash text) ON COMMIT DELETE ROWS"
)
COPY_OPTIONS: dict[str, Any] = {"format": "csv", "delimiter": "\t", "quote": "\x01"}
COLS_SQL = ", ".join(f'"{name}"' for name in NAMES)
# The plain INSERT is the normal path; ON CONFLICT DO NOTHING (a speculative insertion per row,
# ~10 % more server CPU) is used only to retry a batch that hit a duplicate (a spool replay of
# rows whose first commit was not acknowledged).
INSERT_SQL = f"INSERT INTO {TABLE} ({COLS_SQL}) SELECT {INSERT_COLUMNS_SQL} FROM {STAGE}"
DEDUP_INSERT_SQL = INSERT_SQL + " ON CONFLICT DO NOTHING"
MAINTENANCE_LOCK = 7_402_118_735
MAINTENANCE_EVERY_S = 3600.0
RETENTION_RETRY_S = 60.0  # retention failed (database down at start): not an hour later
MAINTAIN_SQL = "SELECT gateway_audit_maintain($1, $2)"
CAN_MAINTAIN_SQL = (
    "SELECT has_function_privilege('gateway_audit_maintain(integer, integer)', 'EXECUTE')"
)
AHEAD_DAYS = 7  # daily partitions created ahead of time
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0
SCHEMA_MISSING = "audit table missing: run `plant-gateway db upgrade` on this database"
CANCEL_WAIT_S = 0.2  # for a cancelled background task to end, at close
CLOSE_RESERVE_S = 0.5  # of the close budget: spool what is left, close the connections
REPLAY_BATCHES = 20  # batches per replay turn (the spool file is re-read from the offset)
ORPHAN_BATCHES = 200  # per orphaned spool per scan; a longer one is scanned again at once
ORPHAN_SCAN_S = 30.0  # spools of exited processes sharing the state directory
STALL_MIN_S = 0.05
# SQLSTATE classes that say "the database or its setup is the problem", never the row
OUTAGE_CLASSES = ("08", "28", "3D", "53", "55", "57", "58", "XX", "42501", "42P01", "42883")


class Outage(Exception):
    """The database cannot take rows right now (unreachable, shutting down, misconfigured)."""


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.DataError | ValueError | TypeError):
        return False  # a value asyncpg could not encode: the row is the problem
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return any(state.startswith(prefix) for prefix in OUTAGE_CLASSES)
    return True  # connection errors, timeouts, interface errors


class RowQueue:
    """A bounded FIFO of lines (see ``schema``) with the ``asyncio.Queue`` methods the
    sink uses, on a deque (the writer is the only consumer and never waits on it)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.rows: deque[bytes] = deque()

    def qsize(self) -> int:
        return len(self.rows)

    def empty(self) -> bool:
        return not self.rows

    def full(self) -> bool:
        return len(self.rows) >= self.maxsize

    def put_nowait(self, row: bytes) -> None:
        if len(self.rows) >= self.maxsize:
            raise asyncio.QueueFull
        self.rows.append(row)

    def get_nowait(self) -> bytes:
        try:
            return self.rows.popleft()
        except IndexError:
            raise asyncio.QueueEmpty from None

    def take(self, limit: int) -> list[bytes]:
        """Up to ``limit`` rows, oldest first."""
        rows = self.rows
        if len(rows) <= limit:
            batch = list(rows)
            rows.clear()
            return batch
        return [rows.popleft() for _ in range(limit)]


class Channel:
    """One connection to the table and its outage state. The writer (new rows) and the replay
    (spooled rows) have one each: asyncpg runs one operation per connection at a time, and a
    replay sharing the writer's connection failed with "another operation is in progress"."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: asyncpg.Connection | None = None
        self.lock = asyncio.Lock()
        self.retry_at = 0.0
        self.retry_s = RETRY_MIN_S

    def ready(self) -> bool:
        """Whether to try the database now (not while backing off after an outage)."""
        return time.monotonic() >= self.retry_at

    def wait_s(self) -> float:
        return max(0.0, self.retry_at - time.monotonic())


class PostgresAuditSink:
    """The one audit sink (see module docstring). ``stats`` mirrors the metrics per instance;
    ``refusing`` is the flag the request path reads (``pipeline/ingress.py``)."""

    name = "audit"

    def __init__(
        self, settings: Settings, dsn: str | None, embedded: EmbeddedPostgres | None = None
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        # retention's login: never the writer's SET ROLE (see the module docstring)
        self.maintenance_dsn = dsn
        self.embedded = embedded
        self.batch_size = settings.audit_batch_size
        self.interval = settings.audit_flush_interval_s
        self.queue = RowQueue(settings.audit_queue_max)
        self.on_loss = settings.audit_on_loss
        self.spool_max = settings.audit_spool_max_bytes
        m.QUEUE_CAPACITY.set(settings.audit_queue_max)
        m.SPOOL_CAPACITY.set(self.spool_max)
        # the last 1/16 of the cap is kept for rows written while rows cannot be secured (the
        # refusals): ~4 MiB, a few thousand refusal rows, at the default cap
        self.headroom = self.spool_max // 16
        self.close_budget_s = settings.audit_flush_s
        # rows the queue takes past AUDIT_QUEUE_MAX when even the spool's headroom is gone:
        # room for the requests in flight when the sink starts refusing
        self.slack = max(self.batch_size, settings.audit_queue_max // 10)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.instance_id)
        self.spool_dir = Path(settings.state_dir) / "audit-spool"
        self.spool_path = self.spool_dir / f"{safe}-{os.getpid()}.jsonl"
        self.dead_path = Path(settings.state_dir) / "audit-deadletter.jsonl"
        self.stats = {"written": 0, "spooled": 0, "replayed": 0, "lost": 0, "dead": 0}
        key = settings.audit_chain_key
        # rows a SIGKILL can take: the queue, its slack and the batch being written
        self.checkpoints = Checkpointer(
            key.get_secret_value().encode() if key is not None else None,
            settings.audit_checkpoint_interval_s, settings.audit_checkpoint_rows,
            settings.audit_queue_max + self.slack + self.batch_size,
        )
        self.chains: list[Any] = []  # the recorders writing here: closed by close()
        self.spool: Spool | None = None
        self.writer = Channel("writer")
        self.replayer = Channel("replay")
        self._probe: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._wakeup = asyncio.Event()  # set when a full batch is queued, or on close
        self._spooled = asyncio.Event()  # set when rows reach the spool: wakes the replay
        self.refusing = False  # read on every request: a plain attribute, kept current here
        self.spool_error = ""  # why the spool refused its last ordinary append ("": it did not)
        self.conditions: dict[str, str] = {}  # degraded states now, each logged when it starts
        self._last_failure = ""  # the last task failure logged (a repeat is only counted)
        self._retention_note = ""  # why retention was last skipped (logged when it changes)
        self.health = events.dependency("audit_database")  # one line per outage and recovery
        # the deployment's Redis as the first spool (it outlives the instance), or None; the
        # replayer's name is unique even if PLANT_INSTANCE_ID and the pid (1 in a container)
        # repeat across instances
        self.redis_spool = spool_redis.create(
            settings, f"{safe}-{os.getpid()}-{uuid.uuid4().hex[:8]}", self._set_condition
        )

    # --- Dependency ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.embedded is not None:
            await asyncio.to_thread(self._start_embedded)
        try:
            self._open_spool()
        except Exception as exc:  # noqa: BLE001 - retried when rows need the spool
            self._spool_failed(exc)
        m.SPOOL_WRITABLE.set(0 if self.spool_error else 1)
        m.REFUSING.set(0)
        self._tasks = [
            asyncio.create_task(self._supervise("writer", self._run), name="audit-writer"),
            asyncio.create_task(self._supervise("replay", self._replay), name="audit-replay"),
            asyncio.create_task(self._maintenance(), name="audit-retention"),
        ]

    def _start_embedded(self) -> None:
        from plant_gateway import migrations

        assert self.embedded is not None
        self.embedded.start()
        migrations.upgrade(self.embedded.dsn())
        self.maintenance_dsn = self.embedded.dsn()  # the owner
        self.dsn = self.embedded.dsn(user=WRITER_ROLE)

    async def close(self) -> None:
        """Flush within ``audit_flush_s`` (the end of ``SHUTDOWN_GRACE_S``): the queue to the
        table, else to the spool; the spool replayed while time is left (on Cloud Run it dies
        with the instance). What remains stays on disk for the next start, or is counted lost."""
        deadline = time.monotonic() + self.close_budget_s
        self._closing = True
        self._wakeup.set()
        self._spooled.set()
        writer, replay, maintenance = self._tasks or (None, None, None)
        await _finish(maintenance, 0.0)
        await _finish(writer, deadline - CLOSE_RESERVE_S)
        await _finish(replay, deadline - CLOSE_RESERVE_S)
        leftover = self._drain_queue()
        if leftover and await self._close_to_redis(leftover, deadline):
            leftover = []
        if leftover and not self._spool_rows(leftover, reserved=True):
            self._lose(len(leftover))
        await self._close_chains(deadline)
        await self._close_redis(deadline)
        await self._close_connections(deadline)
        if self.spool is not None:
            self.spool.close(remove_if_empty=True)
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def _close_to_redis(self, rows: list[bytes], deadline: float) -> bool:
        """At close, rows the table did not take to the Redis spool (it survives the instance;
        the disk spool does not on Cloud Run), within the budget."""
        if self.redis_spool is None:
            return False
        left = deadline - time.monotonic() - CLOSE_RESERVE_S / 2
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.redis_spool.push(rows, now=True), max(0.05, left))
        return False  # a push cut short may have landed: replayed twice, deduplicated

    async def _close_redis(self, deadline: float) -> None:
        """Disk-spooled rows the replay could not store move to Redis while time is left, then
        the Redis spool gives back its replay state (unconfirmed batch, lease)."""
        if self.redis_spool is None:
            return
        await self._disk_to_redis(deadline - CLOSE_RESERVE_S / 2, now=True)
        with contextlib.suppress(TimeoutError):
            left = deadline - time.monotonic()
            await asyncio.wait_for(self.redis_spool.close(), max(0.05, left))

    async def _disk_to_redis(self, until: float, now: bool = False) -> None:
        """This instance's disk-spooled rows into Redis while the database cannot take them
        (they went to disk while Redis could not take them): on Cloud Run the disk is the
        instance's memory and dies with it, Redis does not."""
        spool, redis_spool = self.spool, self.redis_spool
        if spool is None or redis_spool is None or not spool.pending \
                or not (now or redis_spool.writable()):
            return
        before = spool.pending
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(redis_spool.adopt(spool, until, now),
                                       max(0.05, until - time.monotonic()))
        finally:
            m.SPOOL_PENDING.dec(before - spool.pending)
        self._reclaim(spool)

    async def _close_connections(self, deadline: float) -> None:
        conns = [c for c in (self.writer.conn, self.replayer.conn, self._probe) if c is not None]
        self.writer.conn = self.replayer.conn = self._probe = None
        for conn in conns:
            try:
                await asyncio.wait_for(conn.close(), max(0.05, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a hung server: drop the socket
                conn.terminate()

    async def check(self) -> DependencyStatus:
        started = time.perf_counter()
        try:
            if self._probe is None or self._probe.is_closed():
                self._probe = await self._connect()
            migrated = await self._probe.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", TABLE, timeout=1.0
            )
            ok, detail = bool(migrated), "" if migrated else SCHEMA_MISSING
        except Exception as exc:  # noqa: BLE001 - any failure means "down"
            self._probe = None
            ok, detail = False, f"database unreachable ({type(exc).__name__})"
        notes = [detail] if detail else []
        pending = self.spool.pending if self.spool else 0
        if pending:
            notes.append(f"{pending} rows spooled to disk")
        if self.spool_error:
            notes.append(f"disk spool cannot take rows ({self.spool_error})")
        redis_error = ""
        if self.redis_spool is not None:
            notes.extend(self.redis_spool.notes())
            redis_error = self.redis_spool.error
        if "secure" in self.conditions:
            notes.append(self.conditions["secure"])
        if self.stats["lost"]:
            notes.append(f"{self.stats['lost']} rows lost since start")
        # A database outage alone does not take the gateway out of service (the spool keeps
        # the rows); refusing requests does.
        return DependencyStatus(
            name="postgres_audit",
            ok=ok and not self.spool_error and not redis_error and "secure" not in self.conditions,
            required=self.refusing,
            detail="; ".join(notes),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    def register_chain(self, recorder: Any) -> None:
        """A recorder (``instance_id``, ``seq``, ``prev_hash``) whose chain close() ends with a
        close mark (``checkpoints``)."""
        self.chains.append(recorder)
        self.checkpoints.register(recorder.instance_id)

    # --- the request path ---------------------------------------------------------------------
    def submit(self, row: bytes) -> None:
        """Queue a finished row (a line, see ``schema``); never blocks, never raises.
        A full queue spills to disk."""
        rows = self.queue.rows
        if not self._closing and len(rows) < self.queue.maxsize:
            rows.append(row)
            if len(rows) == self.batch_size:
                self._wakeup.set()
            return
        self._overflow(row)

    def _overflow(self, row: bytes) -> None:
        """A row the queue cannot take (full, or closing). It belongs to a request already
        answered (refused or, at the moment the sink starts refusing, in flight), so it may
        use what is kept back: the spool's headroom, then the queue's slack; else it is
        counted lost. A failed ordinary append is what starts the refusals."""
        if not (self._spool_rows([row], clears=False)
                or self._spool_rows([row], reserved=True) or self._into_slack(row)):
            self._lose(1)
        self._update_refusing()

    def _into_slack(self, row: bytes) -> bool:
        rows = self.queue.rows
        if self._closing or len(rows) >= self.queue.maxsize + self.slack:
            return False
        rows.append(row)
        return True

    def _update_refusing(self) -> None:
        """Rows cannot be secured once the queue is full and the spool refuses them too; that
        ends when the spool takes rows again or the queue has room for a tenth of it (not one
        row: refusals would flicker on and off while the writer catches up)."""
        queued, limit = len(self.queue.rows), self.queue.maxsize
        if "secure" in self.conditions:
            limit -= max(1, limit // 10)
        stuck = bool(self.spool_error) and queued >= limit
        if stuck:
            what = ("requests refused with 503 audit-unavailable" if self.on_loss == "refuse"
                    else "requests served without their rows (AUDIT_ON_LOSS=serve)")
            self._set_condition("secure", f"rows cannot be secured (queue full, spool: "
                                          f"{self.spool_error}): {what}")
        else:
            self._set_condition("secure", None)
            self._set_condition("loss", None)
        self.refusing = stuck and self.on_loss == "refuse"
        m.REFUSING.set(1 if self.refusing else 0)

    def _lose(self, count: int) -> None:
        m.ROWS_LOST.inc(count)
        self.stats["lost"] += count
        self._set_condition("loss", f"{self.stats['lost']} rows lost since start: neither the "
                                    "database, the queue nor the spool could take them")

    def _set_condition(self, name: str, detail: str | None) -> None:
        """A degraded state: logged once when it starts and once when it ends."""
        before = self.conditions.get(name)
        if detail is None:
            if before is not None:
                del self.conditions[name]
                log.info("audit: recovered: %s", before)
        else:
            self.conditions[name] = detail
            if before is None:  # losing rows is an error; the rest is degraded, not failing
                level = logging.ERROR if name in ("secure", "loss") else logging.WARNING
                log.log(level, "audit: %s", detail)

    # --- writer ----------------------------------------------------------------------------
    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a background task for the sink's life: an unexpected error is logged (once per
        kind) and counted, and the task starts again. The writer dying took every later row."""
        while True:
            try:
                await body()
                return
            except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen I/O error
                m.TASK_RESTARTS.inc()
                failure = f"{name}: {type(exc).__name__}: {exc}"
                if failure != self._last_failure:
                    log.exception("audit: the %s task failed; restarting it", name)
                self._last_failure = failure
                if self._closing:
                    return
                await asyncio.sleep(RETRY_MIN_S)

    async def _run(self) -> None:
        """The writer: queue -> table; on an outage -> spool; when the spool cannot take them
        either, the rows stay queued (and a full queue makes the sink refuse requests)."""
        while not (self._closing and self.queue.empty()):
            batch = await self._collect()
            stored = await self._handle(batch) if batch else True
            self._update_refusing()
            if self.checkpoints.due() and self.writer.ready():
                await self._mark_chains()
            if not stored:
                if self._closing:
                    return  # close() spools what is left, or counts it
                await asyncio.sleep(min(RETRY_MAX_S, max(STALL_MIN_S, self.writer.wait_s())))

    async def _collect(self) -> list[bytes]:
        """The next batch: ``batch_size`` rows as soon as they are queued, else what the
        interval gathered. One wait per batch (never one per row: that cost the request path
        a timer and a task per request)."""
        if self.queue.qsize() < self.batch_size and not self._closing:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.interval)
        batch = self.queue.take(self.batch_size)
        m.QUEUE_DEPTH.set(self.queue.qsize())
        return batch

    async def _handle(self, batch: list[bytes]) -> bool:
        """Write the batch, else spool it, else put it back at the head of the queue (False)."""
        try:
            if self.writer.ready():
                with contextlib.suppress(Outage):
                    await self._write(self.writer, batch)
                    return True
            if self.redis_spool is not None and await self.redis_spool.push(batch):
                return True
            if self._spool_rows(batch):
                return True
        except BaseException:  # cancelled by close()'s deadline, or a bug: the rows stay queued
            self._hold(batch)
            raise
        self._hold(batch)
        return False

    def _hold(self, batch: list[bytes]) -> None:
        self.queue.rows.extendleft(reversed(batch))
        m.QUEUE_DEPTH.set(self.queue.qsize())

    def _drain_queue(self) -> list[bytes]:
        rows = self.queue.take(len(self.queue.rows))
        m.QUEUE_DEPTH.set(0)
        return rows

    # --- database ------------------------------------------------------------------------
    async def _connect(self) -> asyncpg.Connection:
        if self.dsn is None:
            raise Outage("no database configured")
        conn = await asyncpg.connect(
            self.dsn,
            timeout=3.0,
            command_timeout=15.0,
            server_settings={
                "app.service_account": "gateway",
                "application_name": "plant-gateway-audit",
            },
        )
        if await conn.fetchval("SELECT current_user") != WRITER_ROLE:
            try:
                await conn.execute(f"SET ROLE {WRITER_ROLE}")
            except asyncpg.PostgresError as exc:
                log.warning("audit: cannot SET ROLE %s (%s); writing as the DSN user",
                            WRITER_ROLE, exc.sqlstate)
        return conn

    async def _conn(self, channel: Channel) -> asyncpg.Connection:
        if channel.conn is None or channel.conn.is_closed():
            conn = await self._connect()
            try:
                await conn.execute(STAGE_DDL)
            except BaseException:
                conn.terminate()
                raise
            channel.conn = conn
        return channel.conn

    async def _write(self, channel: Channel, rows: list[bytes]) -> int:
        """Write lines on the channel's connection; quarantine bad ones; raise Outage if the
        database cannot take them."""
        if not rows:
            return 0
        async with channel.lock:
            return await self._copy(channel, rows, dedup=False)

    async def _copy(self, channel: Channel, rows: list[bytes], dedup: bool) -> int:
        started = time.perf_counter()
        try:
            conn = await self._conn(channel)
            async with conn.transaction():
                # a memoryview: asyncpg would take plain bytes for a file path
                data = memoryview(b"".join(rows))
                await conn.copy_to_table(STAGE, source=data, **COPY_OPTIONS)
                await conn.execute(DEDUP_INSERT_SQL if dedup else INSERT_SQL)
        except asyncio.CancelledError:
            self._drop_conn(channel)  # mid-COPY: the connection's state is unknown
            raise
        except Exception as exc:
            if not dedup and isinstance(exc, asyncpg.UniqueViolationError):
                return await self._copy(channel, rows, dedup=True)
            if _is_outage(exc):
                self._mark_outage(channel, exc)
                raise Outage(str(exc)) from exc
            return await self._bisect(channel, rows, exc)
        m.WRITE_LATENCY.observe(time.perf_counter() - started)
        self.checkpoints.committed(rows)
        self._channel_up(channel)
        m.ROWS_WRITTEN.inc(len(rows))
        self.stats["written"] += len(rows)
        return len(rows)

    async def _bisect(self, channel: Channel, rows: list[bytes], exc: Exception) -> int:
        """A batch was refused for its data: split it until the bad rows are isolated."""
        if len(rows) == 1:
            self._dead_letter(_readable(rows[0]), f"{type(exc).__name__}: {exc}")
            return 0
        half = len(rows) // 2
        written = await self._copy(channel, rows[:half], dedup=True)
        return written + await self._copy(channel, rows[half:], dedup=True)

    def _mark_outage(self, channel: Channel, exc: BaseException) -> None:
        hint = f" ({SCHEMA_MISSING})" if isinstance(exc, asyncpg.UndefinedTableError) else ""
        where = "the disk spool" if self.redis_spool is None else "the Redis spool"
        self._set_condition("database", f"database unavailable ({type(exc).__name__}){hint}; "
                                        f"rows go to {where}")
        self.health.down(f"{type(exc).__name__}{hint}; spooling audit rows to {where}")
        m.DATABASE_UP.set(0)
        self._drop_conn(channel)
        channel.retry_at = time.monotonic() + channel.retry_s
        channel.retry_s = min(RETRY_MAX_S, channel.retry_s * 2)

    def _channel_up(self, channel: Channel) -> None:
        channel.retry_s = RETRY_MIN_S
        self.health.up()
        m.DATABASE_UP.set(1)
        self._set_condition("database", None)

    @staticmethod
    def _drop_conn(channel: Channel) -> None:
        if channel.conn is not None:
            with contextlib.suppress(Exception):
                channel.conn.terminate()
        channel.conn = None

    # --- spool and dead letters ------------------------------------------------------------------
    def _open_spool(self) -> Spool:
        if self.spool is None:
            self.spool = Spool(self.spool_path, self.spool_max, self.headroom)
            self.spool.make_reserve()
            m.SPOOL_PENDING.inc(self.spool.pending)
            m.SPOOL_BYTES.set(self.spool.used)
        return self.spool

    def _spool_rows(self, rows: list[bytes], reserved: bool = False, clears: bool = True) -> bool:
        """Append rows to the disk spool; False (the reason kept in ``spool_error``) if it
        cannot take them. ``reserved`` rows may use the headroom. One row squeezed into the
        last free bytes (``clears=False``) does not mean the spool is writable again."""
        if not rows:
            return True
        try:
            spool = self._open_spool()
            spool.append(rows, reserved)
        except Exception as exc:  # noqa: BLE001 - full, a failing disk, or a bug: never raised
            self._spool_failed(exc)
            return False
        if clears and not reserved:
            self._spool_ok()
        m.ROWS_SPOOLED.inc(len(rows))
        m.SPOOL_PENDING.inc(len(rows))
        m.SPOOL_BYTES.set(spool.used)
        self.stats["spooled"] += len(rows)
        self._spooled.set()
        return True

    def _spool_failed(self, exc: BaseException) -> None:
        if isinstance(exc, SpoolFull):
            reason = str(exc)
        elif isinstance(exc, OSError) and exc.errno:
            reason = os.strerror(exc.errno)
        else:
            reason = type(exc).__name__
        self.spool_error = reason
        m.SPOOL_WRITABLE.set(0)
        self._set_condition("spool", f"disk spool cannot take rows ({reason}); rows wait in "
                                     "memory until the database or the spool takes them")

    def _spool_ok(self) -> None:
        if self.spool_error:
            self.spool_error = ""
            m.SPOOL_WRITABLE.set(1)
            self._set_condition("spool", None)

    def _dead_letter(self, row: Any, reason: str) -> None:
        log.error("audit: row quarantined to %s: %s", self.dead_path, reason[:200])
        entry = {"reason": reason[:1000], "row": row, "at": time.time()}
        try:
            self.dead_path.parent.mkdir(parents=True, exist_ok=True)
            with self.dead_path.open("a") as fh:
                fh.write(json.dumps(entry, default=str) + "\n")
        except OSError:
            self._lose(1)
        m.ROWS_DEAD.inc()
        self.stats["dead"] += 1

    # --- replay ------------------------------------------------------------------------------
    async def _replay(self) -> None:
        """Spooled rows -> table, oldest first, on the replay's own connection, for as long as
        the sink runs (and during close while time is left); orphaned spools too."""
        await self._touch(self.replayer)
        orphans_at = time.monotonic()
        while not (self._closing and not (self.replayer.ready() and self._pending())):
            moved = False
            if self.replayer.ready():
                moved = await self._replay_own()
                moved = await self._replay_redis() or moved
                if not (self._closing or self.replayer.ready()):  # the database is down
                    await self._disk_to_redis(time.monotonic() + 1.0)
                if not self._closing and self.replayer.ready() \
                        and time.monotonic() >= orphans_at:
                    more = await self._replay_orphans()
                    orphans_at = time.monotonic() + (0.0 if more else ORPHAN_SCAN_S)
                    moved = moved or more
            if not moved:
                if self._closing:
                    return  # no backoff waits within the close budget: the rows stay on disk
                await self._wait_for_rows(orphans_at)

    def _pending(self) -> int:
        return self.spool.pending if self.spool is not None else 0

    async def _wait_for_rows(self, orphans_at: float) -> None:
        """Until rows are spooled or, never before the backoff ends, rows are waiting (own
        spool) or the next orphan scan is due."""
        self._spooled.clear()
        due = 0.0 if self._pending() else orphans_at - time.monotonic()
        if self.redis_spool is not None:
            due = min(due, self.redis_spool.due_in())
        timeout = max(STALL_MIN_S, self.replayer.wait_s(), due)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._spooled.wait(), timeout)

    async def _touch(self, channel: Channel) -> None:
        """Connect now: ``/ready`` and the metrics know the database's state from the start."""
        async with channel.lock:
            try:
                await self._conn(channel)
            except Exception as exc:
                if not _is_outage(exc):
                    raise
                self._mark_outage(channel, exc)
            else:
                self._channel_up(channel)

    async def _replay_own(self) -> bool:
        spool = self.spool
        if spool is None:
            return False
        moved = await self._drain_spool(spool, REPLAY_BATCHES) if spool.pending else False
        try:
            if spool.reset_if_drained():
                m.SPOOL_BYTES.set(0)
                self._set_condition("offset", None)
                self._spool_ok()  # its space is back; the next failing append would say so
                log.info("audit: spool replayed: every spooled row is in the table")
        except OSError as exc:
            self._offset_failed(exc)
        return moved

    async def _drain_spool(self, spool: Spool, max_batches: int) -> bool:
        """Up to ``max_batches`` batches from the spool's offset into the table; True if any."""
        moved = False
        for _ in range(max_batches):
            lines, new_offset = spool.read(self.batch_size)
            if not lines:
                break
            written = await self._write_replayed(lines)
            if written is None:
                break
            try:
                spool.advance(new_offset, len(lines))
                self._set_condition("offset", None)
            except OSError as exc:
                self._offset_failed(exc)
            self._reclaim(spool)
            if spool is self.spool:
                m.SPOOL_PENDING.dec(len(lines))
            m.ROWS_REPLAYED.inc(written)
            self.stats["replayed"] += written
            moved = True
        return moved

    async def _replay_redis(self) -> bool:
        """Rows of the shared Redis spool (any instance's, a gone one's too) into the table on
        the replay's connection, when due; never while closing (a live instance does it)."""
        redis_spool = self.redis_spool
        if redis_spool is None or self._closing or redis_spool.due_in() > 0 \
                or not self.replayer.ready():  # the database just failed this turn
            return False
        return await redis_spool.replay(self._write_replayed, REPLAY_BATCHES)

    async def _write_replayed(self, lines: list[bytes]) -> int | None:
        """Spooled lines (disk or Redis) into the table on the replay's connection: the rows,
        then the chain marks after the rows they name; unparseable lines to the dead letters.
        None if the database cannot take them."""
        rows: list[bytes] = []
        marks: list[Mark] = []
        for line in lines:
            try:
                if line.startswith(MARK_PREFIX):
                    marks.append(Mark.from_line(line))
                else:
                    rows.append(upgrade_line(line))
            except (ValueError, TypeError, KeyError):
                self._dead_letter({"raw": line.decode(errors="replace")}, "unparseable")
        try:
            written = await self._write(self.replayer, rows)
            if marks:  # after the rows they name
                await self._store_marks(self.replayer, marks, quarantine=True)
        except Outage:
            return None
        return written

    def _reclaim(self, spool: Spool) -> None:
        """Replayed rows' blocks back to the disk while the replay goes on (rows that keep
        arriving would otherwise fill it behind the replay)."""
        try:
            if spool.reclaim() and spool is self.spool:
                m.SPOOL_BYTES.set(spool.used)
                self._spool_ok()  # space is back; the next failing append would say so
        except OSError as exc:  # nothing lost: the space comes back when the file is emptied
            self._set_condition("reclaim", f"cannot free replayed spool space ({exc.strerror})")

    def _offset_failed(self, exc: OSError) -> None:
        """The read offset could not be saved: nothing is lost (it moves on in memory); a
        restart may resend rows, which the writer's ON CONFLICT retry absorbs."""
        why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        self._set_condition("offset", f"cannot save the spool's read offset ({why}); a restart "
                                      "may resend stored rows (deduplicated)")

    async def _replay_orphans(self) -> bool:
        """Replay spools of exited processes (a restart, another worker); True if one still
        has rows after its turn (too long for one turn, or the database went away)."""
        more = False
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            if path == self.spool_path:
                continue
            orphan = Spool.try_claim(path)
            if orphan is None:
                continue  # a live process owns it
            try:
                await self._drain_spool(orphan, ORPHAN_BATCHES)
                more = more or bool(orphan.pending)  # rescanned once the backoff allows
            finally:
                orphan.close(remove_if_empty=True)
        return more

    # --- chain checkpoints (checkpoints.py) -----------------------------------------------------
    async def _mark_chains(self) -> None:
        """Periodic checkpoints, written by the writer task between batches."""
        marks = self.checkpoints.marks(self.stats["lost"])
        if not marks:
            return
        with contextlib.suppress(Outage):  # the next batch finds it; the next interval marks
            await self._store_marks(self.writer, marks)

    async def _store_marks(self, channel: Channel, marks: list[Mark],
                           quarantine: bool = False) -> None:
        """Insert marks on the channel's connection; raise Outage when the database cannot
        take them. A database without the checkpoint table (not upgraded to 0003) is said once
        and rows keep flowing; spooled marks (``quarantine``) then go to the dead-letter file,
        so a close mark never blocks the replay."""
        async with channel.lock:
            try:
                await insert(await self._conn(channel), marks)
            except asyncio.CancelledError:
                self._drop_conn(channel)
                raise
            except asyncpg.UndefinedTableError:
                self._set_condition("checkpoint", "chain checkpoint table missing: run `plant-"
                                                  "gateway db upgrade` (revision 0003)")
                for mark in marks if quarantine else ():
                    self._dead_letter(mark.to_line().decode(), "no checkpoint table")
                return
            except Exception as exc:
                if _is_outage(exc):
                    self._mark_outage(channel, exc)
                    raise Outage(str(exc)) from exc
                self._set_condition("checkpoint", f"chain checkpoints refused "
                                                  f"({type(exc).__name__}: {exc})")
                return
        self._set_condition("checkpoint", None)

    async def _close_chains(self, deadline: float) -> None:
        """A close mark per chain after its last row: into the table when no row waits in the
        spool, else appended to the spool after the rows (the replay writes it after them)."""
        lost = self.stats["lost"]
        marks = [self.checkpoints.close_mark(r.instance_id, r.seq, r.prev_hash, lost)
                 for r in self.chains if r.seq]
        if not marks:
            return
        for mark in marks:  # a witness outside the database: the request log's sink
            log.info("audit: chain %s closed at seq %d (row hash %s)",
                     mark.instance_id, mark.seq, mark.row_hash)
        # a writer cancelled mid-write (hung database) dropped its connection: no new one now
        if not self._pending() and self.writer.ready() and self.writer.conn is not None:
            with contextlib.suppress(Outage, TimeoutError):
                await asyncio.wait_for(self._store_marks(self.writer, marks),
                                       max(0.05, deadline - time.monotonic()))
                return
        lines = [mark.to_line() for mark in marks]
        # after the chain's rows: at the tail of the Redis spool (rows moved there from the disk
        # spool afterwards go to its head: they are older), else at the end of the disk spool
        if await self._close_to_redis(lines, deadline):
            return
        if not self._spool_rows(lines, reserved=True):
            log.error("audit: the close marks of %d chain(s) could not be stored", len(marks))

    # --- retention ---------------------------------------------------------------------------
    async def _maintenance(self) -> None:
        """Retention a second after start, then hourly; a failure is retried a minute later."""
        await asyncio.sleep(1.0)
        while not self._closing:
            delay = MAINTENANCE_EVERY_S
            try:
                await self.run_retention()
                self._set_condition("retention", None)
            except Exception as exc:  # noqa: BLE001 - retried
                self._set_condition("retention", f"retention failed ({type(exc).__name__}); "
                                                 "retried every minute")
                delay = RETENTION_RETRY_S
            await asyncio.sleep(delay)

    async def run_retention(self) -> int | None:
        """Create partitions ahead and drop expired ones, unless pg_cron or a peer does it, or
        this login may not (then None, and one warning saying what to do instead)."""
        if self.maintenance_dsn is None:
            return None
        conn = await asyncpg.connect(
            self.maintenance_dsn, timeout=3.0, command_timeout=60.0,
            server_settings={"application_name": "plant-gateway-audit-retention"},
        )
        try:
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron')"
            ):
                return None
            refusal = await _retention_refusal(conn)
            if refusal:
                self._skip_retention(refusal)
                return None
            async with conn.transaction():
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1)", MAINTENANCE_LOCK
                ):
                    return None
                dropped = await conn.fetchval(
                    MAINTAIN_SQL, self.settings.audit_retention_days, AHEAD_DAYS
                )
            self._retention_note = ""
            return int(dropped)
        finally:
            await conn.close()

    def _skip_retention(self, why: str) -> None:
        if why != self._retention_note:
            log.warning("audit: retention not run by this gateway: %s; pg_cron or "
                        "`plant-gateway audit retention` with the owner's URL must do it", why)
        self._retention_note = why


async def _finish(task: asyncio.Task[None] | None, until: float) -> None:
    """Let a task end by itself until ``until`` (monotonic), then cancel it. A task that does
    not end within ``CANCEL_WAIT_S`` of its cancellation is left behind: close() must keep its
    budget (the shutdown watchdog names such a task if the process then cannot exit)."""
    if task is None or task.done():
        return
    await asyncio.wait({task}, timeout=max(0.0, until - time.monotonic()))
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_WAIT_S)


async def _retention_refusal(conn: asyncpg.Connection) -> str:
    """Why this connection's login may not run retention, or "" when it may."""
    user = await conn.fetchval("SELECT current_user")
    if user == WRITER_ROLE:
        return f"DATABASE_URL logs in as {WRITER_ROLE}, which may only insert"
    if not await conn.fetchval(CAN_MAINTAIN_SQL):
        return f"{user} is neither the audit table's owner nor a member of {MAINTAINER_ROLE}"
    return ""


def _readable(line: bytes) -> Any:
    """A line as a dict row for the dead-letter file (the raw text if it does not parse)."""
    try:
        return from_wire(line)
    except (ValueError, TypeError, KeyError):
        return {"raw": line.decode(errors="replace")}


def create(settings: Settings) -> PostgresAuditSink:
    """The sink on DATABASE_URL, or on an embedded server in ``state_dir/pgdata``."""
    if settings.database_url is not None:
        return PostgresAuditSink(settings, settings.database_url.get_secret_value())
    from plant_gateway.audit.embedded_postgres import EmbeddedPostgres

    embedded = EmbeddedPostgres(Path(settings.state_dir) / "pgdata")
    return PostgresAuditSink(settings, None, embedded)
