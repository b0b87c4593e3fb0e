"""uvicorn's httptools protocol with corked writes: small writes of one loop turn go out together.

uvicorn writes a response head and its body separately (two send() calls); corked, a small
response is one write on the socket. Large writes are never delayed or copied.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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

    def handle_websocket_upgrade(self) -> None:
        corked = self.transport
        if isinstance(corked, CorkedTransport):
            corked.flush()
            self.transport = corked.real
        super().handle_websocket_upgrade()
