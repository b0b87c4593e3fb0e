"""The audit sink: rows queued in memory, written to PostgreSQL in COPY batches, spooled on outage.

``submit`` never blocks. A background writer batches by size or interval; when the database is
unreachable, batches go to an append-only spool file and are replayed in order when it returns;
rows that can never be inserted are quarantined to a dead-letter file, never retried forever.

Rows are written as the writer role, which may only INSERT (migration 0002). Retention (the
hourly ``gateway_audit_maintain``: partitions ahead, expired ones dropped) runs on a separate
connection as the DSN's own login, never as the writer: the embedded server's owner, or the
``DATABASE_URL`` login when that is the owner or a member of ``plant_audit_maintainer``. When
``DATABASE_URL`` logs in as the writer itself, the gateway cannot run retention and says so
once; pg_cron (scheduled by migration 0001) or ``plant-gateway audit retention`` with the
owner's URL does it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import asyncpg

from plant_gateway import events
from plant_gateway.backends import audit_metrics as m
from plant_gateway.backends.audit_schema import (
    INSERT_COLUMNS_SQL,
    MAINTAINER_ROLE,
    NAMES,
    TABLE,
    WRITER_ROLE,
    from_wire,
    upgrade_line,
)
from plant_gateway.backends.base import DependencyStatus

if TYPE_CHECKING:
    from plant_gateway.backends.embedded_postgres import EmbeddedPostgres
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
MAINTAIN_SQL = "SELECT gateway_audit_maintain($1, $2)"
CAN_MAINTAIN_SQL = (
    "SELECT has_function_privilege('gateway_audit_maintain(integer, integer)', 'EXECUTE')"
)
AHEAD_DAYS = 7  # daily partitions created ahead of time
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0
SCHEMA_MISSING = "audit table missing: run `plant-gateway db upgrade` on this database"
CLOSE_DEADLINE_S = 10.0
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
    """A bounded FIFO of lines (see ``audit_schema``) with the ``asyncio.Queue`` methods the
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


class Spool:
    """An append-only JSON-lines file with a persisted read offset; held under an flock."""

    def __init__(self, path: Path, lock: bool = True) -> None:
        self.path = path
        self.offset_path = path.with_suffix(".offset")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = path.open("ab")
        if lock:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.offset = int(self.offset_path.read_text() or 0) if self.offset_path.exists() else 0
        self.pending = self._count_pending()

    @classmethod
    def try_claim(cls, path: Path) -> Spool | None:
        try:
            return cls(path)
        except BlockingIOError:
            return None

    def _count_pending(self) -> int:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            return sum(1 for _ in fh)

    def append(self, rows: list[bytes]) -> None:
        self._fh.write(b"".join(rows))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.pending += len(rows)

    def read(self, limit: int) -> tuple[list[bytes], int]:
        """Up to ``limit`` lines from the offset and the offset after them."""
        lines: list[bytes] = []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            while len(lines) < limit:
                line = fh.readline()
                if not line.endswith(b"\n"):
                    break  # EOF (or a torn last line, read again later)
                lines.append(line)
            return lines, fh.tell() if lines else self.offset

    def advance(self, new_offset: int, rows: int) -> None:
        self.pending = max(0, self.pending - rows)
        if self.pending == 0 and new_offset >= self.path.stat().st_size:
            self._fh.truncate(0)
            new_offset = 0
        self.offset = new_offset
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(new_offset))
        tmp.replace(self.offset_path)

    def close(self, remove_if_empty: bool = False) -> None:
        empty = self.pending == 0
        self._fh.close()
        if remove_if_empty and empty:
            self.path.unlink(missing_ok=True)
            self.offset_path.unlink(missing_ok=True)


class PostgresAuditSink:
    """The one audit sink (see module docstring). ``stats`` mirrors the metrics per instance."""

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
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.instance_id)
        self.spool_dir = Path(settings.state_dir) / "audit-spool"
        self.spool_path = self.spool_dir / f"{safe}-{os.getpid()}.jsonl"
        self.dead_path = Path(settings.state_dir) / "audit-deadletter.jsonl"
        self.stats = {"written": 0, "spooled": 0, "replayed": 0, "dropped": 0, "dead": 0}
        self.spool: Spool | None = None
        self._conn: asyncpg.Connection | None = None
        self._probe: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._maint_task: asyncio.Task[None] | None = None
        self._closing = False
        self._wakeup = asyncio.Event()  # set when a full batch is queued, or on close
        self._retry_at = 0.0
        self._retry_s = RETRY_MIN_S
        self._last_error = ""
        self._retention_note = ""  # why retention was last skipped (logged when it changes)
        self.health = events.dependency("audit_database")  # one line per outage and recovery

    # --- Dependency ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.embedded is not None:
            await asyncio.to_thread(self._start_embedded)
        self.spool = Spool(self.spool_path)
        m.SPOOL_PENDING.inc(self.spool.pending)
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        self._maint_task = asyncio.create_task(self._maintenance(), name="audit-retention")

    def _start_embedded(self) -> None:
        from plant_gateway import migrations

        assert self.embedded is not None
        self.embedded.start()
        migrations.upgrade(self.embedded.dsn())
        self.maintenance_dsn = self.embedded.dsn()  # the owner
        self.dsn = self.embedded.dsn(user=WRITER_ROLE)

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._maint_task is not None:
            self._maint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maint_task
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_DEADLINE_S)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._spool_rows(self._drain_queue())
        for conn in (self._conn, self._probe):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
        self._conn = self._probe = None
        if self.spool is not None:
            self.spool.close(remove_if_empty=True)
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

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
        pending = self.spool.pending if self.spool else 0
        if pending:
            detail = (detail + "; " if detail else "") + f"{pending} rows spooled to disk"
        # The spool keeps every row while the database is down, so an outage alone does not take
        # the gateway out of service: required only if the spool is unusable too.
        return DependencyStatus(
            name="postgres_audit",
            ok=ok,
            required=self.spool is None,
            detail=detail,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    # --- the request path ---------------------------------------------------------------------
    def submit(self, row: bytes) -> None:
        """Queue a finished row (a line, see ``audit_schema``); never blocks, never raises.
        A full queue spills to disk."""
        rows = self.queue.rows
        if not self._closing and len(rows) < self.queue.maxsize:
            rows.append(row)
            if len(rows) == self.batch_size:
                self._wakeup.set()
            return
        self._spool_rows([row])

    # --- writer loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                await self._handle(batch)
            if self.spool is not None and self.spool.pending and time.monotonic() >= self._retry_at:
                await self._drain_spool(self.spool, max_batches=20)
            if self._closing and self.queue.empty():
                break
        if self.spool is not None and self.spool.pending:
            await self._drain_spool(self.spool, max_batches=1000)

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

    async def _handle(self, batch: list[bytes]) -> None:
        if self.spool is not None and self.spool.pending:
            self._spool_rows(batch)  # keep order: older spooled rows go first
            return
        try:
            await self._write(batch)
        except Outage:
            self._spool_rows(batch)
        except asyncio.CancelledError:
            self._spool_rows(batch)
            raise

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

    async def _writer(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
            await self._conn.execute(STAGE_DDL)
        return self._conn

    async def _write(self, rows: list[bytes], dedup: bool = False) -> int:
        """Write lines; quarantine bad ones; raise Outage if the database cannot take them."""
        if not rows:
            return 0
        started = time.perf_counter()
        try:
            conn = await self._writer()
            async with conn.transaction():
                # a memoryview: asyncpg would take plain bytes for a file path
                data = memoryview(b"".join(rows))
                await conn.copy_to_table(STAGE, source=data, **COPY_OPTIONS)
                await conn.execute(DEDUP_INSERT_SQL if dedup else INSERT_SQL)
        except Exception as exc:
            if not dedup and isinstance(exc, asyncpg.UniqueViolationError):
                return await self._write(rows, dedup=True)
            if _is_outage(exc):
                await self._mark_outage(exc)
                raise Outage(str(exc)) from exc
            return await self._bisect(rows, exc)
        m.WRITE_LATENCY.observe(time.perf_counter() - started)
        self._retry_s = RETRY_MIN_S
        self.health.up()
        m.ROWS_WRITTEN.inc(len(rows))
        self.stats["written"] += len(rows)
        return len(rows)

    async def _bisect(self, rows: list[bytes], exc: Exception) -> int:
        """A batch was refused for its data: split it until the bad rows are isolated."""
        if len(rows) == 1:
            self._dead_letter(_readable(rows[0]), f"{type(exc).__name__}: {exc}")
            return 0
        half = len(rows) // 2
        written = await self._write(rows[:half], dedup=True)
        return written + await self._write(rows[half:], dedup=True)

    async def _mark_outage(self, exc: BaseException) -> None:
        self._last_error = type(exc).__name__
        hint = f" ({SCHEMA_MISSING})" if isinstance(exc, asyncpg.UndefinedTableError) else ""
        self.health.down(f"{self._last_error}{hint}; spooling audit rows to disk")
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.terminate()
        self._conn = None
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)

    # --- spool and dead letters ------------------------------------------------------------------
    def _spool_rows(self, rows: list[bytes]) -> None:
        if not rows:
            return
        try:
            if self.spool is None:
                self.spool = Spool(self.spool_path)
            self.spool.append(rows)
        except Exception:  # noqa: BLE001 - last resort: count the loss loudly
            log.exception("audit: %d rows could be neither written nor spooled", len(rows))
            m.ROWS_DROPPED.inc(len(rows))
            self.stats["dropped"] += len(rows)
            return
        m.ROWS_SPOOLED.inc(len(rows))
        m.SPOOL_PENDING.inc(len(rows))
        self.stats["spooled"] += len(rows)

    async def _drain_spool(self, spool: Spool, max_batches: int) -> None:
        for _ in range(max_batches):
            lines, new_offset = spool.read(self.batch_size)
            if not lines:
                return
            rows: list[bytes] = []
            for line in lines:
                try:
                    rows.append(upgrade_line(line))
                except (ValueError, TypeError, KeyError):
                    self._dead_letter({"raw": line.decode(errors="replace")}, "unparseable")
            try:
                written = await self._write(rows)
            except Outage:
                return
            spool.advance(new_offset, len(lines))
            m.SPOOL_PENDING.dec(len(lines))
            m.ROWS_REPLAYED.inc(written)
            self.stats["replayed"] += written

    def _dead_letter(self, row: Any, reason: str) -> None:
        log.error("audit: row quarantined to %s: %s", self.dead_path, reason[:200])
        entry = {"reason": reason[:1000], "row": row, "at": time.time()}
        try:
            self.dead_path.parent.mkdir(parents=True, exist_ok=True)
            with self.dead_path.open("a") as fh:
                fh.write(json.dumps(entry, default=str) + "\n")
        except OSError:
            m.ROWS_DROPPED.inc()
            self.stats["dropped"] += 1
        m.ROWS_DEAD.inc()
        self.stats["dead"] += 1

    # --- orphaned spools and retention ------------------------------------------------------------
    async def _replay_orphans(self) -> None:
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            if path == self.spool_path:
                continue
            orphan = Spool.try_claim(path)
            if orphan is None:
                continue  # a live process owns it
            try:
                await self._drain_spool(orphan, max_batches=10_000)
            finally:
                orphan.close(remove_if_empty=True)

    async def _maintenance(self) -> None:
        await asyncio.sleep(1.0)
        while not self._closing:
            try:
                await self._replay_orphans()
                await self.run_retention()
            except Exception as exc:  # noqa: BLE001 - retried at the next tick
                log.warning("audit: maintenance failed: %s", type(exc).__name__)
            await asyncio.sleep(MAINTENANCE_EVERY_S)

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
    from plant_gateway.backends.embedded_postgres import EmbeddedPostgres

    embedded = EmbeddedPostgres(Path(settings.state_dir) / "pgdata")
    return PostgresAuditSink(settings, None, embedded)
