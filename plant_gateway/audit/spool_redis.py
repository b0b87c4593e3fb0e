"""The Redis audit spool: rows the database cannot take yet, kept in the deployment's Redis.

Why: on Cloud Run the disk spool (``spool``) lives in the instance's memory (it counts
against the 512 MiB limit) and vanishes when the instance is stopped, which Cloud Run does at
will. The deployment's Redis (Memorystore) outlives every instance, so during a PostgreSQL
outage the sink tiers its rows: queue -> PostgreSQL; on an outage -> this spool; if Redis cannot
take them (down, slow, at its cap) -> the disk spool; if neither -> the sink's refusal / loss
accounting. Rows any instance pushed here are replayed by whichever live instance holds the
replay lease, so an instance that is gone for good loses nothing it had spooled here.

Keys (``P`` = ``REDIS_KEY_PREFIX``; the ``{audit-spool}`` hash tag puts them in one Redis Cluster
slot, so each Lua script runs unchanged on a Cluster):

==========================================  =============================================  =====
key                                         value                                          TTL
==========================================  =============================================  =====
``P{audit-spool}:rows``                     LIST of lines (see ``schema``), oldest         none
                                            first
``P{audit-spool}:size``                     HASH ``rows``, ``bytes``: the lines in ``rows``   none
                                            and every ``processing`` list (the caps' count);
                                            ``epoch``: a token set by the first push
``P{audit-spool}:processing:<replayer>``    LIST: the batch a replayer took and has not     none
                                            confirmed yet
``P{audit-spool}:alive:<replayer>``         ``1`` while that replayer lives (heartbeat)     10 s
``P{audit-spool}:replayers``                SET of replayers that may hold a batch          none
``P{audit-spool}:lease``                    the replayer allowed to take batches now        10 s
==========================================  =============================================  =====

Delivery: at least once. A replayer (one at a time: the lease) moves up to a batch from the head
of ``rows`` into its own ``processing`` list in one script, writes it, then deletes it (ack).
A replayer whose heartbeat expired (SIGKILL, a stopped instance) has its batch put back at the
head of ``rows``, in order, by the next lease holder; a batch written just before its replayer
died is thus written twice, and the writer's ``ON CONFLICT DO NOTHING`` retry absorbs it (a
row's id and timestamp are the primary key). A failed write leaves the batch in
``processing``; the same replayer retries it before taking anything newer. A chain's close
mark (``checkpoints``) spooled after its rows is stored after them the same way.

Order: one list, pushed a whole batch at a time by each instance in its own order and replayed
from the head by one replayer at a time, so the rows of one hash chain (one instance) reach the
table in chain order. Not guaranteed: the order between rows that took different tiers (rows
that went to the disk spool while Redis was down, then rows pushed here again), and the order
after a lease expired while its holder was alive but stalled (its batch and the next one may be
written concurrently). The chains are verified by ``seq``, never by arrival, so neither affects
``audit verify``.

Caps (atomic, checked by the push script against ``size``): ``AUDIT_REDIS_SPOOL_MAX_ROWS`` rows
and ``AUDIT_REDIS_SPOOL_MAX_BYTES`` bytes of lines, waiting or being replayed; past either the
push is refused and the batch goes to the disk spool. The cap protects what shares this Redis:
the rate-limit, quota, budget and revocation keys, which must keep working through a database
outage. Measured on redis-server 7.0 (``INFO memory`` ``used_memory`` before and after pushing
20,000 rows through ``push``, batches of 500): rows of a GET without a body (lines of 519 B)
cost 560 B each, rows with a 2 KiB JSON body (2,527 B) 2,748 B: Redis adds ~8 % to the line
bytes. The defaults, 100,000 rows and 128 MiB of lines, therefore hold at most ~140 MiB of
Redis memory (53 MiB for 100,000 body-less rows): under 15 % of a 1 GB Memorystore, beside
the ~30 MiB that 100,000 active principals' rate-limit and quota keys take (measured the same
way). That is 17 minutes of an outage at 100 req/s of body-less requests from all instances
together (the byte cap binds first for rows over ~1.3 KiB). The keys carry no TTL, so
Memorystore's default ``volatile-lru`` never evicts a spooled row; an ``allkeys-*`` policy
could (README → Audit durability).

A Redis that loses its data (restarted without persistence, as a Memorystore Basic instance
does, or flushed) loses the rows it held: the next look at the spool finds a new ``epoch`` (or
none) and each instance logs an error and counts the rows it last saw waiting in
``plant_gateway_audit_redis_spool_vanished_rows_total`` (an estimate: rows replayed since its
last look are counted too); ``audit verify`` names the gaps they leave in the chains. Never
silent.

Failures: every Redis error or timeout makes the push fail (the batch goes to the disk spool)
and backs the spool off for 0.5 to 5 s, so a hung Redis costs one timeout per backoff, not one
per batch. States (unreachable, full) are reported through the sink's condition log: one line
when each starts and one when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from plant_gateway.metrics import REGISTRY
from plant_gateway.settings import SettingsError

if TYPE_CHECKING:
    from plant_gateway.audit.spool import Spool
    from plant_gateway.settings import Settings

log = logging.getLogger("plant_gateway.audit")

TAG = "{audit-spool}"
HEARTBEAT_TTL_MS = 10_000  # a replayer silent this long is dead: its batch goes back
POLL_S = 1.0  # how often a live instance looks for rows to replay (one round trip)
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0
CHUNK = 1000  # list elements per RPUSH/LPUSH inside a script (Lua's unpack has a stack limit)
ERRORS = (RedisError, RedisClusterException, OSError)

ROWS = Gauge(
    "plant_gateway_audit_redis_spool_rows",
    "Audit rows waiting in the shared Redis spool (all instances), as last seen",
    registry=REGISTRY,
)
WRITABLE = Gauge(
    "plant_gateway_audit_redis_spool_writable",
    "1 while the Redis spool takes rows (0: down or full)",
    registry=REGISTRY,
)
CAPACITY = Gauge(
    "plant_gateway_audit_redis_spool_capacity_rows",
    "Rows the Redis spool holds at most, all instances together (AUDIT_REDIS_SPOOL_MAX_ROWS)",
    registry=REGISTRY,
)
PUSHED = Counter(
    "plant_gateway_audit_rows_redis_spooled_total", "Audit rows pushed to the Redis spool",
    registry=REGISTRY,
)
REPLAYED = Counter(
    "plant_gateway_audit_rows_redis_replayed_total",
    "Audit rows replayed from the Redis spool into PostgreSQL (by this instance)",
    registry=REGISTRY,
)
VANISHED = Counter(
    "plant_gateway_audit_redis_spool_vanished_rows_total",
    "Rows the Redis spool held when Redis lost it (restarted empty or flushed), as last seen "
    "by this instance",
    registry=REGISTRY,
)
RECOVERED = Counter(
    "plant_gateway_audit_redis_spool_recovered_rows_total",
    "Rows of a dead replayer's unconfirmed batch put back into the Redis spool",
    registry=REGISTRY,
)

_PUSH_TEMPLATE = """
local n = #ARGV - 4
redis.call('HSETNX', KEYS[2], 'epoch', ARGV[4])
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local rows = tonumber(redis.call('HGET', KEYS[2], 'rows') or '0')
local used = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
if rows + n > tonumber(ARGV[1]) then return {0, rows, used, epoch} end
if used + tonumber(ARGV[3]) > tonumber(ARGV[2]) then return {-1, rows, used, epoch} end
%s
redis.call('HINCRBY', KEYS[2], 'rows', n)
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[3])
return {1, rows + n, used + tonumber(ARGV[3]), epoch}
"""
# KEYS: rows, size. ARGV: max rows, max bytes, bytes of the lines, a new epoch, line...
# (oldest first) -> {1 | 0 (row cap) | -1 (byte cap), rows, bytes, epoch}: rows and bytes
# spooled and unconfirmed; the epoch names this incarnation of the spool (see ``_seen``)
PUSH_LUA = _PUSH_TEMPLATE % f"""
for i = 5, #ARGV, {CHUNK} do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + {CHUNK} - 1, #ARGV)))
end"""
# the same, to the HEAD of the list in their order: older rows (this instance's disk spool)
UNSHIFT_LUA = _PUSH_TEMPLATE % "for i = #ARGV, 5, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end"

# KEYS: lease. ARGV: replayer, ttl ms -> 1 if this replayer holds the lease now
LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: replayer
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: rows, processing, alive, replayers, size. ARGV: count, replayer, ttl ms
# -> {rows spooled and unconfirmed, epoch or '', line...}: the batch: the unconfirmed one if
# there is one (a retry), else a new one
TAKE_LUA = """
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
redis.call('SADD', KEYS[4], ARGV[2])
if redis.call('LLEN', KEYS[2]) == 0 then
  local batch = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
  if #batch > 0 then
    redis.call('LTRIM', KEYS[1], #batch, -1)
    for i = 1, #batch, CHUNK do
      redis.call('RPUSH', KEYS[2], unpack(batch, i, math.min(i + CHUNK - 1, #batch)))
    end
  end
end
local out = redis.call('LRANGE', KEYS[2], 0, -1)
table.insert(out, 1, redis.call('HGET', KEYS[5], 'epoch') or '')
table.insert(out, 1, tonumber(redis.call('HGET', KEYS[5], 'rows') or '0'))
return out
""".replace("CHUNK", str(CHUNK))

# KEYS: processing, size -> rows confirmed (0 if the batch was recovered meanwhile)
ACK_LUA = """
local batch = redis.call('LRANGE', KEYS[1], 0, -1)
local size = 0
for _, line in ipairs(batch) do size = size + #line end
redis.call('DEL', KEYS[1])
for field, delta in pairs({rows = #batch, bytes = size}) do
  if redis.call('HINCRBY', KEYS[2], field, -delta) < 0 then
    redis.call('HSET', KEYS[2], field, 0)
  end
end
return #batch
"""

# KEYS: rows, processing, alive, replayers. ARGV: replayer, '1' to recover even if alive
# (its own batch, at close) -> rows put back at the head of ``rows``
RECOVER_LUA = """
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local batch = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #batch, 1, -1 do redis.call('LPUSH', KEYS[1], batch[i]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[1])
return #batch
"""

Condition = Callable[[str, str | None], None]  # the sink's state log (name, detail or None)
Write = Callable[[list[bytes]], Awaitable[int | None]]  # lines -> rows stored; None: outage


class RedisSpool:
    """The shared spool (see the module docstring). One per sink; ``stats`` counts rows."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        replayer: str,
        *,
        prefix: str = "",
        max_rows: int = 100_000,
        max_bytes: int = 128 * 1024 * 1024,
        batch_size: int = 500,
        condition: Condition | None = None,
    ) -> None:
        self.client = client
        self.replayer = replayer
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.condition: Condition = condition or (lambda name, detail: None)
        base = f"{prefix}{TAG}"
        self.rows_key, self.size_key = f"{base}:rows", f"{base}:size"
        self.lease_key, self.replayers_key = f"{base}:lease", f"{base}:replayers"
        self.alive_prefix, self.processing_prefix = f"{base}:alive:", f"{base}:processing:"
        self.processing_key = self.processing_prefix + replayer
        self.alive_key = self.alive_prefix + replayer
        self._push = client.register_script(PUSH_LUA)
        self._unshift = client.register_script(UNSHIFT_LUA)
        self._lease = client.register_script(LEASE_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._take = client.register_script(TAKE_LUA)
        self._ack = client.register_script(ACK_LUA)
        self._recover = client.register_script(RECOVER_LUA)
        self.stats = {"spooled": 0, "replayed": 0, "recovered": 0, "refused": 0, "vanished": 0}
        self.epoch: bytes | str | None = None  # the spool's incarnation last seen (see ``_seen``)
        self.pending = 0  # rows in ``rows`` (all instances), as last seen
        self.error = ""  # why the last push was refused ("": it was not)
        self.retry_at = 0.0
        self.retry_s = RETRY_MIN_S
        self.poll_at = 0.0  # next look for rows to replay
        self.heartbeat_ttl_ms = HEARTBEAT_TTL_MS  # tests shorten it (a dead replayer's batch)
        WRITABLE.set(1)
        CAPACITY.set(max_rows)

    # --- pushing ---------------------------------------------------------------------------
    def writable(self) -> bool:
        """Whether to try a push now (not while backing off after a failure)."""
        return time.monotonic() >= self.retry_at

    async def push(self, rows: list[bytes], *, older: bool = False, now: bool = False) -> bool:
        """Append ``rows`` atomically, or nothing (False: Redis is down, slow or at a cap).
        ``older`` rows (from this instance's disk spool) go to the head of the list; ``now``
        tries even while backing off (at close: there is no later)."""
        if not rows:
            return True
        if not (now or self.writable()):
            return False
        size = sum(len(row) for row in rows)
        script = self._unshift if older else self._push
        try:
            ok, pending, _, epoch = await script(
                keys=[self.rows_key, self.size_key],
                args=[self.max_rows, self.max_bytes, size, uuid.uuid4().hex, *rows],
            )
        except ERRORS as exc:
            self._failed(f"Redis unreachable ({type(exc).__name__})")
            return False
        self._seen(int(pending), epoch, before=len(rows) if ok == 1 else 0)
        if ok != 1:
            cap = (f"AUDIT_REDIS_SPOOL_MAX_ROWS={self.max_rows}" if ok == 0
                   else f"AUDIT_REDIS_SPOOL_MAX_BYTES={self.max_bytes}")
            self._failed(f"full: {cap}")
            return False
        self._ok()
        PUSHED.inc(len(rows))
        self.stats["spooled"] += len(rows)
        return True

    def _failed(self, reason: str) -> None:
        self.stats["refused"] += 1
        self.retry_at = time.monotonic() + self.retry_s
        self.retry_s = min(RETRY_MAX_S, self.retry_s * 2)
        if reason != self.error:
            self.error = reason
            WRITABLE.set(0)
            self.condition("redis_spool", f"Redis spool cannot take rows ({reason}); "
                                          "rows go to the disk spool")

    def _ok(self) -> None:
        self.retry_s = RETRY_MIN_S
        if self.error:
            self.error = ""
            WRITABLE.set(1)
            self.condition("redis_spool", None)

    # --- replaying ---------------------------------------------------------------------------
    def due_in(self) -> float:
        """Seconds until the next look for rows to replay."""
        return max(0.0, self.poll_at - time.monotonic())

    async def replay(self, write: Write, max_batches: int) -> bool:
        """Up to ``max_batches`` batches from the shared list into the table, if this replayer
        holds (or gets) the lease; True if any row moved. When ``write`` says the database
        cannot take them (None) the batch stays in this replayer's ``processing`` list, and
        the lease with it: the batch is retried first, before anything newer."""
        self.poll_at = time.monotonic() + POLL_S
        moved = False
        try:
            if not await self._lease(keys=[self.lease_key],
                                     args=[self.replayer, self.heartbeat_ttl_ms]):
                pending, epoch = await self.client.hmget(self.size_key, ["rows", "epoch"])
                self._seen(int(pending or 0), epoch)
                return False
            await self._recover_dead()
            for _ in range(max_batches):
                outcome = await self._replay_batch(write)
                if outcome is None:
                    break  # the database is down: keep the batch and the lease
                if outcome == 0:  # nothing left: another instance may hold the lease
                    await self._release(keys=[self.lease_key], args=[self.replayer])
                    break
                moved = True
        except ERRORS:  # the push path reports Redis's state; a hung Redis is polled less
            self.poll_at = time.monotonic() + RETRY_MAX_S
        if moved:
            self.poll_at = 0.0  # more may be waiting: the next turn at once
        return moved

    def _seen(self, pending: int, epoch: bytes | str | None, before: int = 0) -> None:
        """What the spool holds now. A new epoch (or none) while rows were waiting means Redis
        lost them (restarted empty: a Memorystore Basic instance keeps nothing across one;
        flushed): logged and counted, never silent; ``audit verify`` names the gaps in the
        chains. ``before``: rows this look itself added (a push)."""
        epoch = epoch or None
        if epoch != self.epoch:
            if self.epoch is not None and self.pending:
                self._vanished(self.pending)
            self.epoch = epoch
        elif self.pending and not pending - before:
            log.info("audit: Redis spool replayed: every row it held is in the table")
        self.pending = pending
        ROWS.set(pending)

    def _vanished(self, rows: int) -> None:
        VANISHED.inc(rows)
        self.stats["vanished"] += rows
        log.error("audit: the Redis spool lost the %d rows it held (Redis restarted empty or "
                  "was flushed); `plant-gateway audit verify` names the chains with gaps", rows)

    async def _replay_batch(self, write: Write) -> int | None:
        """One batch: the rows stored, 0 if there was none, None if the database is down."""
        reply = await self._take(
            keys=[self.rows_key, self.processing_key, self.alive_key, self.replayers_key,
                  self.size_key],
            args=[self.batch_size, self.replayer, self.heartbeat_ttl_ms],
        )
        lines: list[bytes] = list(reply[2:])
        if not lines:
            self._seen(int(reply[0]), reply[1])
            return 0
        async with self._heartbeat():
            written = await write(lines)
        if written is None:
            return None
        await self._ack(keys=[self.processing_key, self.size_key])
        REPLAYED.inc(written)
        self.stats["replayed"] += written
        self._seen(max(0, int(reply[0]) - len(lines)), reply[1])  # this batch is confirmed
        return len(lines)

    @contextlib.asynccontextmanager
    async def _heartbeat(self) -> Any:
        """Keep the heartbeat and the lease alive while a batch is being written (a write may
        wait for a slow database longer than their TTL)."""
        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_ttl_ms / 5000)
                with contextlib.suppress(*ERRORS):
                    await self.client.set(self.alive_key, b"1", px=self.heartbeat_ttl_ms)
                    await self._lease(keys=[self.lease_key],
                                      args=[self.replayer, self.heartbeat_ttl_ms])

        task = asyncio.create_task(beat(), name="audit-redis-heartbeat")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _recover_dead(self) -> int:
        """Put the unconfirmed batches of replayers whose heartbeat expired back at the head
        of the list (a script re-checks the heartbeat, so a live one keeps its batch)."""
        recovered = 0
        for raw in await self.client.smembers(self.replayers_key):
            other = raw.decode() if isinstance(raw, bytes) else str(raw)
            if other == self.replayer:
                continue
            recovered += await self._recover_one(other, force=False)
        return recovered

    async def _recover_one(self, replayer: str, force: bool) -> int:
        count = int(await self._recover(
            keys=[self.rows_key, self.processing_prefix + replayer,
                  self.alive_prefix + replayer, self.replayers_key],
            args=[replayer, "1" if force else "0"],
        ))
        if count:
            RECOVERED.inc(count)
            self.stats["recovered"] += count
            whose = "its own" if replayer == self.replayer else f"dead replayer {replayer}'s"
            log.warning("audit: Redis spool: %d rows of %s unconfirmed batch put back for "
                        "replay (rows already written are deduplicated)", count, whose)
        return count

    # --- the disk spool's rows -------------------------------------------------------------
    async def adopt(self, spool: Spool, until: float, now: bool = False) -> int:
        """Move this instance's disk-spool rows into Redis (they would die with the instance
        on Cloud Run), oldest first, to the head of the list, until ``until`` (monotonic);
        the rows moved. A crash between push and offset resends rows (deduplicated). ``now``:
        see ``push``."""
        moved = 0
        while time.monotonic() < until and spool.pending:
            lines, offset = spool.read(self.batch_size)
            if not lines or not await self.push(lines, older=True, now=now):
                break
            moved += len(lines)
            with contextlib.suppress(OSError):
                spool.advance(offset, len(lines))
        return moved

    # --- life ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Give back this replayer's unconfirmed batch (a close may cancel a write midway),
        its heartbeat and the lease; then close the connections."""
        with contextlib.suppress(*ERRORS):
            await self._recover_one(self.replayer, force=True)
            await self.client.delete(self.alive_key)
            await self._release(keys=[self.lease_key], args=[self.replayer])
        with contextlib.suppress(*ERRORS):
            await self.client.aclose()

    def notes(self) -> list[str]:
        """For ``/ready``: what the Redis spool holds and whether it takes rows."""
        notes = [f"{self.pending} rows in the Redis spool"] if self.pending else []
        if self.stats["vanished"]:
            notes.append(f"{self.stats['vanished']} rows lost with the Redis spool since start "
                         "(Redis restarted empty or was flushed)")
        if self.error:
            notes.append(f"Redis spool cannot take rows ({self.error})")
        return notes


def enabled(settings: Settings) -> str | None:
    """The Redis URL to spool to, or None. ``auto``: a real Redis only (REDIS_URL/REDIS_HOST,
    not the embedded one ``serve`` starts, which lives and dies with the instance)."""
    from plant_gateway.banner import embedded_redis

    mode, url = settings.audit_redis_spool, settings.effective_redis_url
    if mode == "off":
        return None
    if mode == "on" and not url:
        raise SettingsError("AUDIT_REDIS_SPOOL=on needs REDIS_URL (or REDIS_HOST)")
    if not url or (mode == "auto" and embedded_redis(url, settings.state_dir)):
        return None
    return url


def create(settings: Settings, replayer: str, condition: Condition) -> RedisSpool | None:
    """The Redis spool of a sink, or None when it is not enabled (see ``enabled``)."""
    url = enabled(settings)
    if url is None:
        return None
    options: dict[str, Any] = {
        # one timeout for a push of a whole batch (hundreds of KB): a little above a round trip
        "socket_timeout": max(1.0, settings.redis_timeout_s),
        "socket_connect_timeout": settings.redis_timeout_s,
        "decode_responses": False,  # lines are bytes, kept as they are
    }
    client: aioredis.Redis | RedisCluster
    if settings.redis_cluster:
        try:
            client = RedisCluster.from_url(url, **options)
        except RedisClusterException as exc:
            raise SettingsError(f"REDIS_CLUSTER: {exc}") from None
    else:
        client = aioredis.from_url(url, **options)
    return RedisSpool(
        client, replayer, prefix=settings.redis_key_prefix,
        max_rows=settings.audit_redis_spool_max_rows,
        max_bytes=settings.audit_redis_spool_max_bytes,
        batch_size=settings.audit_batch_size, condition=condition,
    )
