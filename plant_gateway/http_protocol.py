"""uvicorn's httptools protocol, trimmed for a proxy's hot path.

Three changes, each measured on the forwarding benchmark (bench/), everything else is uvicorn:

- Corked writes: uvicorn writes a response head and its body separately (two send() calls);
  corked, a small response is one write on the socket. Large writes are never delayed or copied.
- A lazy keep-alive timer: uvicorn arms a new timer after every response and cancels it when
  the next request arrives; here one timer per idle period re-checks the last activity.
- A leaner response head: header names and values are checked with one regex search each over
  the whole head instead of two searches per header.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

CORK_MAX = 16 * 1024  # writes up to this size wait for the end of the loop turn


class CorkedTransport:
    """Delegates to the real transport; small writes are joined and flushed by ``call_soon``."""

    __slots__ = ("_transport", "_loop", "_pending", "_pending_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_size = 0

    @property
    def real(self) -> asyncio.Transport:
        return self._transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if size > CORK_MAX or self._pending_size + size > CORK_MAX:
            self.flush()
            self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data if isinstance(data, bytes) else bytes(data))
        self._pending_size += size

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending, self._pending_size = [], 0
        if self._transport.is_closing():
            return
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending, self._pending_size = [], 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._pending_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` writing through a ``CorkedTransport`` (WebSocket upgrades excepted)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        self.idle_since: float | None = None

    # --- keep-alive: one timer per idle period, not one per response -------------------------

    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None  # busy: a pending check finds this and does not close

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._check_keep_alive
            )

    def _check_keep_alive(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None:
            return  # a request is running; its response arms the next check
        left = self.idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._check_keep_alive)
        else:
            self.timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    # --- the request cycle: uvicorn's, with LeanCycle ------------------------------------------

    def on_headers_complete(self) -> None:
        http_version = self.parser.get_http_version()
        self.scope["method"] = self.parser.get_method().decode("ascii")
        if http_version != "1.1":
            self.scope["http_version"] = http_version
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        self.scope["path"] = self.root_path + path
        self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        self.scope["query_string"] = parsed_url.query or b""
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing_cycle = self.cycle
        self.cycle = LeanCycle(
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined requests wait for the response before them
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def handle_websocket_upgrade(self) -> None:
        corked = self.transport
        if isinstance(corked, CorkedTransport):
            corked.flush()
            self.transport = corked.real
        super().handle_websocket_upgrade()


# Any byte outside a token in a header name; any control byte but TAB in a value (RFC 9110).
BAD_NAME_RE = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
BAD_VALUE_RE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


class LeanCycle(RequestResponseCycle):
    """uvicorn's request/response cycle with a cheaper response head (same wire result)."""

    async def send(self, message: Any) -> None:
        if self.response_started or self.disconnected or self.flow.write_paused:
            await super().send(message)
            return
        if message["type"] != "http.response.start":
            raise RuntimeError(f"Expected 'http.response.start', but got {message['type']!r}.")
        self.response_started = True
        self.waiting_for_100_continue = False
        self.transport.write(self.response_head(message["status"], message.get("headers", ())))

    def response_head(self, status: int, app_headers: Any) -> bytes:
        names: list[bytes] = []
        values: list[bytes] = []
        content = [STATUS_LINE[status]]
        close_listed = False
        for name, value in (*self.default_headers, *app_headers):
            name = name.lower()
            names.append(name)
            values.append(value)
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and _lists_close(value):
                self.keep_alive = False
                close_listed = True
            content += (name, b": ", value, b"\r\n")
        if BAD_NAME_RE.search(b"a".join(names)):
            raise RuntimeError("Invalid HTTP header name.")
        if BAD_VALUE_RE.search(b" ".join(values)):
            raise RuntimeError("Invalid HTTP header value.")
        if not self.keep_alive and not close_listed:
            content.append(b"connection: close\r\n")
        bodiless = self.scope["method"] == "HEAD" or status in (204, 304)
        if self.chunked_encoding is None and not bodiless:
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)


def _lists_close(connection: bytes) -> bool:
    return b"close" in [token.strip() for token in connection.lower().split(b",")]
