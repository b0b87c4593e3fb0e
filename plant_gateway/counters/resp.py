"""A lean RESP channel for the standalone counters hot batch: one socket, pipelined, hiredis.

Why not redis-py's ``Pipeline`` for this one path (``bench/counters_bench.py``, same session, 32
concurrent requesters on uvloop, gateway CPU per request batch of 5 commands): the Pipeline
costs ≈190 µs with redis-py's Python RESP3 parser and ≈150 µs with hiredis installed — pipeline
objects, a pool checkout, per-command encoding, a timeout context and a coroutine per reply.
This channel costs a few tens of µs: the batch is packed by ``hiredis.pack_command``, written
with one ``transport.write`` and its replies are parsed by ``hiredis.Reader`` as they arrive.

Every batch of every request goes down ONE connection (Redis answers in order): a FIFO of
waiters gets the replies, each batch its own ``count`` of them. Losing the connection fails
every waiting batch with ``ConnectionError``; the next batch reconnects. A batch whose first
reply is late by ``timeout`` seconds fails every waiting batch with ``TimeoutError`` and drops
the connection (the replies of a stuck connection can no longer be matched). A cancelled
waiter still consumes its replies, so the order stays right. Nothing is retried here: a batch
that reached Redis may have been applied, and its ops are not idempotent.

Backpressure: while Redis does not read (stuck, paused, SIGSTOPped) the batches would pile up
in the transport's write buffer and the FIFO until the timeout, each request waiting all of it.
Past ``MAX_UNSENT_BYTES`` unsent or ``MAX_WAITING_BATCHES`` unanswered, a new batch fails at
once with ``ConnectionError`` (the guards deny with a 503, as for an outage); the batches
already sent keep waiting for their replies or their timeout.

Used only for a plain TCP or unix-socket Redis (no TLS, no Cluster); every other command, and
every other deployment, stays on redis-py (``counters.redis``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[Any]

# The transport buffers bytes only once the kernel's socket buffer (MBs on loopback or a LAN) is
# full, i.e. Redis has stopped reading; 1 MiB more is thousands of batches. Writes resume below
# a quarter of it (asyncio's pause_writing / resume_writing high and low water marks).
MAX_UNSENT_BYTES = 1 << 20
# A healthy Redis answers in well under a millisecond: unanswered batches ≈ request rate ×
# round trip, tens at thousands of requests/s. 4096 means Redis is not answering, and each new
# batch would only wait for the timeout (and hold its request's memory) before failing anyway.
MAX_WAITING_BATCHES = 4096


@dataclass(frozen=True, slots=True)
class RespAddress:
    """Where and how to connect: host/port or a unix socket path, then AUTH and SELECT."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None

    def handshake(self) -> list[Command]:
        commands: list[Command] = []
        if self.password is not None:
            who = [self.username] if self.username else []
            commands.append(("AUTH", *who, self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def pack(commands: Sequence[Command]) -> bytes:
    return b"".join([hiredis.pack_command(tuple(command)) for command in commands])


def as_reply(reply: Any) -> Any:
    """hiredis gives every error reply as ``ResponseError``; NOSCRIPT must be told apart."""
    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply)[len("NOSCRIPT ") :])
    return reply


class _Waiter:
    __slots__ = ("count", "deadline", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, deadline: float) -> None:
        self.future = future
        self.count = count
        self.deadline = deadline
        self.replies: list[Any] = []


class RespProtocol(asyncio.Protocol):
    """One Redis connection: writes batches, hands the replies to the waiters in order."""

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.reader = hiredis.Reader(replyError=ResponseError, encoding="utf-8")
        self.waiters: deque[_Waiter] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = True  # until connection_made
        self.paused = False  # the transport's write buffer is over MAX_UNSENT_BYTES
        self.timer: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(MAX_UNSENT_BYTES, MAX_UNSENT_BYTES // 4)
        self.lost = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        try:
            reply = self.reader.gets()
            while reply is not False:
                waiter = waiters[0]
                waiter.replies.append(as_reply(reply))
                if len(waiter.replies) == waiter.count:
                    waiters.popleft()
                    if not waiter.future.done():  # a cancelled requester
                        waiter.future.set_result(waiter.replies)
                reply = self.reader.gets()
        except (hiredis.ProtocolError, IndexError):  # garbage, or a reply nobody asked for
            self._fail(ConnectionError("redis: protocol error"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("Connection lost" if exc is None else f"Connection lost: {exc}"))

    # --- requests ---------------------------------------------------------------------------
    def request(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write one packed batch of ``count`` commands; the future gets its ``count`` replies."""
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        if self.lost or self.paused or len(self.waiters) >= MAX_WAITING_BATCHES:
            future.set_exception(self._refusal())
            return future
        waiter = _Waiter(future, count, self.loop.time() + self.timeout)
        self.waiters.append(waiter)
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(payload)
        if self.timer is None:
            self.timer = self.loop.call_at(waiter.deadline, self._check_deadline)
        return future

    def _refusal(self) -> ConnectionError:
        if self.lost:
            return ConnectionError("Connection closed")
        if self.paused:
            return ConnectionError("redis: not reading, write buffer full")
        return ConnectionError(f"redis: not answering, {len(self.waiters)} batches waiting")

    def _flush(self) -> None:
        """One write (one syscall) for all the batches enqueued in this turn of the loop.

        Concurrent requests reach ``admit`` in the same turn, and a ``send`` per batch was the
        largest single cost left; the replies are read in as few ``data_received`` calls too.
        """
        outbox, self.outbox = self.outbox, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(outbox))

    def _check_deadline(self) -> None:
        """One timer per connection, not one per batch: only the oldest waiter can be late."""
        self.timer = None
        if not self.waiters:
            return
        oldest = self.waiters[0].deadline
        if oldest <= self.loop.time():
            self._fail(RedisTimeoutError("Timeout reading from redis"))
        else:
            self.timer = self.loop.call_at(oldest, self._check_deadline)

    def _fail(self, error: Exception) -> None:
        self.lost = True
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.future.done():  # one exception object each: each gets its traceback
                waiter.future.set_exception(type(error)(*error.args))
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._fail(ConnectionError("Connection closed by the gateway"))


class RespChannel:
    """The hot batch's connection: connects on first use and again after a loss."""

    loop = staticmethod(asyncio.get_running_loop)  # a connection serves only its own loop

    def __init__(self, address: RespAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.protocol: RespProtocol | None = None
        self.connecting: asyncio.Task[RespProtocol] | None = None
        self.round_trips = 0  # batches written (tests count them)

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        """The replies of ``commands`` (error replies as exception objects), one round trip."""
        if not commands:
            return []
        protocol = self.protocol
        if protocol is None or protocol.lost or protocol.loop is not self.loop():
            protocol = await self._connected()
        self.round_trips += 1
        return await protocol.request(pack(commands), len(commands))

    async def connect(self) -> None:
        """Open the connection now (start-up), not in the first requests' round trip."""
        if self.protocol is None or self.protocol.lost:
            await self._connected()

    async def close(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        protocol, self.protocol = self.protocol, None
        if protocol is not None and protocol.loop is self.loop():
            protocol.close()  # one of another, closed loop went with that loop

    async def _connected(self) -> RespProtocol:
        """Concurrent batches share one connection attempt; a failed one is tried anew next."""
        stale = self.connecting is not None and self.connecting.get_loop() is not self.loop()
        if self.connecting is None or stale:  # a task of another, closed loop: start anew
            self.connecting = asyncio.ensure_future(self._connect())
        task = self.connecting
        try:
            self.protocol = await asyncio.shield(task)
            return self.protocol
        finally:
            if self.connecting is task and task.done():
                self.connecting = None

    async def _connect(self) -> RespProtocol:
        loop = asyncio.get_running_loop()
        address = self.address
        try:
            async with asyncio.timeout(self.timeout):
                if address.path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: RespProtocol(self.timeout), address.path
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: RespProtocol(self.timeout), address.host, address.port
                    )
        except TimeoutError as exc:  # the builtin one, from asyncio.timeout
            raise RedisTimeoutError("Timeout connecting to redis") from exc
        except OSError as exc:
            raise ConnectionError(f"Error connecting to redis: {exc}") from exc
        await self._handshake(protocol)
        return protocol

    async def _handshake(self, protocol: RespProtocol) -> None:
        commands = self.address.handshake()
        if not commands:
            return
        for reply in await protocol.request(pack(commands), len(commands)):
            if isinstance(reply, ResponseError):
                protocol.close()
                raise AuthenticationError(str(reply))

