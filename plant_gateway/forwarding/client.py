"""A lean pooled HTTP/1.1 client for the forwarding hot path (asyncio.Protocol + httptools).

Why hand-written: on this machine aiohttp's client cost ~75 µs of CPU per forwarded request
(≈120 µs with it vs ≈45 µs with a protocol + ``httptools.HttpResponseParser``; wrk, nginx backend,
measured) and was the dominant cost of forwarding. This client does only what the proxy needs:
the caller builds the request head as bytes, the pool reuses keep-alive connections LIFO, and the
response body is read whole or streamed with read-side flow control. aiohttp stays for WebSockets,
health checks and the metadata server.

Errors: ``ConnectError`` (nothing reached the backend), ``Disconnected`` (the connection closed
before any response byte: a stale pooled connection, retryable for idempotent requests),
``BadResponse`` (malformed HTTP), ``ConnectionLost`` (closed mid-response), ``TimeoutError`` (no
bytes for ``read_timeout`` while waiting), ``InvalidHeader`` (CR/LF/NUL in the request head),
``PoolTimeout`` (every connection stayed busy for ``pool_timeout``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools

HIGH_WATER = 256 * 1024  # unconsumed response bytes that pause reading from the upstream
NO_BODY_STATUS = (204, 304)


class UpstreamError(Exception):
    """Any failure of the upstream exchange (other than a timeout)."""


class ConnectError(UpstreamError):
    """The connection could not be opened: nothing reached the backend."""


class Disconnected(UpstreamError):
    """The connection closed before any byte of the response (e.g. a stale pooled one)."""

    def __init__(self, message: str, reused: bool = False) -> None:
        super().__init__(message)
        self.reused = reused


class BadResponse(UpstreamError):
    """The upstream sent something that is not a valid HTTP/1.1 response."""


class ConnectionLost(UpstreamError):
    """The connection closed in the middle of the response."""


class PoolTimeout(UpstreamError):
    """No connection of the pool came free within ``pool_timeout``: nothing reached the backend."""


class InvalidHeader(UpstreamError, ValueError):
    """A header name or value would break the request head (CR, LF or NUL)."""


def check_head(head: bytes, lines: int) -> None:
    """Refuse header injection: exactly ``lines`` CRLF-terminated lines, no bare CR/LF, no NUL."""
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
        raise InvalidHeader("CR, LF or NUL in the request head")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries at most one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: UpstreamResponse | None = None
        self.closed = False
        self.counted = True  # holds one of the pool's slots until forgotten
        self.reused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # --- transport events -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # unsolicited bytes on an idle connection: never reuse it
            self.close()
            return
        self.last_activity = self.loop.time()
        exchange.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionLost("connection lost while sending"))
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            if exchange.until_eof and exchange.head_done and exc is None:
                exchange.finish()  # a body delimited by a clean end of the connection
            elif not exchange.got_bytes:
                exchange.fail(Disconnected("the backend closed the connection", self.reused))
            else:
                exchange.fail(ConnectionLost("the backend closed the connection mid-response"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        _wake(self.drain_waiter)

    async def drain(self, exchange: UpstreamResponse) -> None:
        """Wait while the transport's write buffer is full, the backend has not answered yet
        and the read timeout (a backend that reads nothing) has not passed."""
        if self.closed:
            raise ConnectionLost("connection lost while sending")
        if self.write_paused and not exchange.head_done:
            self.drain_waiter = self.loop.create_future()
            exchange.waiting = True
            self.last_activity = self.loop.time()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None
                exchange.waiting = False

    # --- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.exchange is None:
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): wait for the final one
            exchange.headers = []
            exchange.interim = True
            return
        exchange.on_head(status, self.parser.should_keep_alive())
        self._wake_drain()  # an early answer: stop sending the request body
        if exchange.head_only:  # HEAD: httptools would wait for a body that never comes
            self.exchange = None
            exchange.finish()
            self.close()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.feed(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.interim:
            exchange.interim = False
            return
        self.exchange = None
        reusable = exchange.keep_alive and exchange.request_sent
        exchange.finish()
        if reusable:
            if exchange.paused:
                self.transport.resume_reading()  # type: ignore[union-attr]
            self.pool.release(self)
        else:
            self.close()

    # --- exchange management ----------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        exchange = self.exchange
        self.exchange = None
        self.close()
        if exchange is not None:
            exchange.fail(exc)

    def close(self) -> None:
        """Close for good (never reused); frees the pool slot at once."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.pool.forget(self)

    def abort(self) -> None:
        exchange = self.exchange
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        self.pool.forget(self)
        if exchange is not None and not exchange.done:
            exchange.fail(ConnectionLost("the exchange was abandoned"))

    def begin(self, head_only: bool) -> UpstreamResponse:
        exchange = UpstreamResponse(self, head_only)
        self.exchange = exchange
        self.last_activity = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.last_activity + self.pool.read_timeout, self._tick)
        return exchange

    def _tick(self) -> None:
        """The lazily rescheduled read timer: one wake-up per timeout period, not per read."""
        self.timer = None
        exchange = self.exchange
        if exchange is None or self.closed:
            return  # idle: re-armed by the next exchange
        now = self.loop.time()
        timeout = self.pool.read_timeout
        if exchange.waiting and now - self.last_activity >= timeout:
            self.exchange = None
            self.abort()
            exchange.fail(TimeoutError("no bytes from the backend within the read timeout"))
            return
        base = self.last_activity if exchange.waiting else now
        self.timer = self.loop.call_at(max(base + timeout, now + 0.001), self._tick)


class UpstreamResponse:
    """The response of one exchange: status and headers, then the body read or streamed."""

    __slots__ = (
        "conn", "head_only", "status", "headers", "content_length", "keep_alive", "until_eof",
        "request_sent", "got_bytes", "head_done", "interim", "done", "error", "waiting",
        "paused", "_chunks", "_buffered", "_waiter",
    )

    def __init__(self, conn: _Connection, head_only: bool) -> None:
        self.conn = conn
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # lowercase names, as received
        self.content_length: int | None = None
        self.keep_alive = False
        self.until_eof = False
        self.request_sent = False
        self.got_bytes = False
        self.head_done = False
        self.interim = False
        self.done = False
        self.error: BaseException | None = None
        self.waiting = False
        self.paused = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None

    # --- fed by the connection ----------------------------------------------------------------
    def on_head(self, status: int, keep_alive: bool) -> None:
        self.status = status
        chunked = False
        for name, value in self.headers:
            if name == b"content-length":
                if value.strip().isdigit():
                    self.content_length = int(value)
            elif name == b"connection":
                if b"close" in value.lower():
                    keep_alive = False
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        self.keep_alive = keep_alive
        no_body = self.head_only or status in NO_BODY_STATUS
        self.until_eof = not no_body and not chunked and self.content_length is None
        self.head_done = True
        self._wake()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.conn.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.error = exc
            self.done = True
        self._wake()

    def _wake(self) -> None:
        _wake(self._waiter)

    async def _wait(self) -> None:
        self.waiting = True
        self.conn.last_activity = self.conn.loop.time()
        self._waiter = self.conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
            self.waiting = False

    # --- used by the caller -------------------------------------------------------------------
    async def wait_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` in lowercase)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read_chunk(self) -> bytes | None:
        """All body bytes buffered so far (waiting for some), or None at the end of the body."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            await self._wait()
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self.paused:
            self.paused = False
            if self.conn.exchange is self and not self.conn.closed:
                self.conn.transport.resume_reading()  # type: ignore[union-attr]
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.read_chunk()
            if chunk is None:
                return
            yield chunk

    async def read(self) -> bytes:
        if self.done and self.error is None:  # the common case: all of it came with the head
            data = b"".join(self._chunks)
            self._chunks.clear()
            return data
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: a connection still carrying it is closed, never reused."""
        if not self.done and self.conn.exchange is self:
            self.conn.abort()
        self.done = True


class UpstreamPool:
    """Keep-alive connections to one ``host:port``: idle ones reused LIFO, at most ``limit`` open,
    waiters served first come, first served."""

    def __init__(
        self, host: str, port: int, *, limit: int, connect_timeout: float, read_timeout: float,
        pool_timeout: float | None = None, ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_timeout = pool_timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self.connections: set[_Connection] = set()
        self.closing = False

    async def acquire(self, fresh: bool = False) -> _Connection:
        """A connection: the most recently used idle one (unless ``fresh``), a new one while
        under the limit, else the next one released or freed, in arrival order."""
        idle = self.idle
        while idle and not fresh:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        if self.open < self.limit and not self.waiters:
            return await self._connect()
        return await self._wait_for_connection()

    async def _wait_for_connection(self) -> _Connection:
        """Wait in line for a released connection or a freed slot: PoolTimeout past
        ``pool_timeout`` (a waiter cancelled by the timeout passes on what it was handed)."""
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.pool_timeout):
                conn = await waiter
        except (TimeoutError, asyncio.CancelledError) as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise PoolTimeout(f"no connection free within {self.pool_timeout} s") from None
            raise
        if conn is not None:
            conn.reused = True
            return conn
        return await self._connect(reserved=True)

    def _abandon(self, waiter: asyncio.Future[_Connection | None]) -> None:
        """A waiter gave up (timeout, cancellation): pass on whatever it was handed meanwhile."""
        if not waiter.done():
            waiter.cancel()  # skipped by release() and _wake_one()
        elif not waiter.cancelled():
            handed = waiter.result()
            if handed is not None:
                self.release(handed)
            else:
                self._slot_freed()  # give the reserved slot to the next waiter

    async def _connect(self, reserved: bool = False) -> _Connection:
        if not reserved:
            self.open += 1
        if self.closing:
            self._slot_freed()
            raise ConnectError("the pool is closed")
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl_context,
                    server_hostname=self.server_hostname if self.ssl_context else None,
                )
        except TimeoutError:
            self._slot_freed()
            raise
        except OSError as exc:
            self._slot_freed()
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            self._slot_freed()
            raise
        self.connections.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        """A connection whose exchange completed with keep-alive: to a waiter, or idle."""
        if conn.closed or self.closing:
            conn.close()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """The connection is closed: drop it from the pool and free its slot (once)."""
        if not conn.counted:
            return
        conn.counted = False
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self.open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        """A slot is free: reserve it for the first waiter still waiting (it connects)."""
        if self.open >= self.limit:
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.open += 1
                waiter.set_result(None)
                return

    async def request(
        self, head: bytes, body: bytes | AsyncIterator[bytes] | None = None, *,
        chunked: bool = False, head_only: bool = False, fresh: bool = False,
    ) -> UpstreamResponse:
        """Send one request (``head`` ends with the blank line) and wait for the response head.

        ``body``: bytes (the head carries its Content-Length) or an async iterator of chunks,
        sent as is (Content-Length in the head) or with chunked framing when ``chunked``.
        ``fresh``: not on an idle connection (a retry after a stale one).
        """
        conn = await self.acquire(fresh)
        exchange = conn.begin(head_only)
        transport = conn.transport
        assert transport is not None
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
            else:
                transport.write(head)
                await _send_body(conn, exchange, body, chunked)
            exchange.request_sent = True
            await exchange.wait_head()
        except BaseException:
            exchange.release()
            raise
        return exchange

    async def close(self) -> None:
        """Close every connection (idle or busy) and refuse new ones."""
        self.closing = True
        for conn in list(self.connections):
            conn.close()
        self.idle.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("the pool is closed"))
        await asyncio.sleep(0)  # let the transports run connection_lost


def _wake(waiter: asyncio.Future[None] | None) -> None:
    """Wake whoever awaits ``waiter`` (if anyone still does)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _send_body(
    conn: _Connection, exchange: UpstreamResponse, body: AsyncIterator[bytes], chunked: bool
) -> None:
    transport = conn.transport
    assert transport is not None
    try:
        async for chunk in body:
            if exchange.head_done or exchange.done or conn.closed:  # answered or gone early
                break
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            await conn.drain(exchange)
        else:
            if chunked and not conn.closed:
                transport.write(b"0\r\n\r\n")
            return
    except ConnectionLost:
        if exchange.head_done:
            pass  # the answer came before the connection closed: relay it
        elif exchange.error is not None:
            raise exchange.error from None  # e.g. the read timeout
        else:
            raise
    exchange.keep_alive = False  # the request was cut short: never reuse the connection


def pool_for_url(url: Any, *, limit: int, connect_timeout: float, read_timeout: float,
                 pool_timeout: float | None = None) -> UpstreamPool:
    """A pool for a yarl URL (http or https)."""
    secure = url.scheme == "https"
    context = ssl.create_default_context() if secure else None
    host = url.raw_host or "localhost"
    return UpstreamPool(
        host, url.port or (443 if secure else 80), limit=limit, connect_timeout=connect_timeout,
        read_timeout=read_timeout, pool_timeout=pool_timeout, ssl_context=context,
        server_hostname=host,
    )
