"""The forwarding client (plant_gateway.forwarding.client) against real local servers.

Two kinds of server on real sockets: an aiohttp.web app (well-behaved HTTP) and a scripted raw
asyncio server (stale connections, interim responses, malformed answers). The proxy-level
behaviour (retry on a stale connection, 502, refused header injection) goes through ``Proxy``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from plant_gateway.context import Identity
from plant_gateway.forwarding import Proxy
from plant_gateway.forwarding.client import (
    HIGH_WATER,
    BadResponse,
    ConnectionLost,
    Disconnected,
    InvalidHeader,
    PoolTimeout,
    UpstreamPool,
)
from plant_gateway.forwarding.headers import request_head
from plant_gateway.pipeline.ingress import BodySource, context_from_scope
from plant_gateway.settings import Settings

BIG = 8 * 1024 * 1024
BIG_BLOCK = bytes(range(256)) * 256  # 64 KiB


# --- servers ----------------------------------------------------------------------------------

class WebBackend:
    """An aiohttp.web backend that records, per request, the client port (= the connection)."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _seen(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.ports.append(peer[1] if peer else -1)

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.read()
        return web.json_response({"method": request.method, "length": len(body),
                                  "te": request.headers.get("Transfer-Encoding"),
                                  "sha": hashlib.sha256(body).hexdigest()})

    async def sized(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=b"x" * 100)  # HEAD: Content-Length 100, no body

    async def slow(self, request: web.Request) -> web.Response:
        self._seen(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(float(request.query.get("delay", "0.05")))
        self.in_flight -= 1
        return web.Response(text="slow")

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
        await resp.write_eof()
        return resp

    async def big(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse()
        resp.content_length = BIG
        await resp.prepare(request)
        for _ in range(BIG // len(BIG_BLOCK)):
            await resp.write(BIG_BLOCK)
        await resp.write_eof()
        return resp

    async def no_content(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_route("*", "/sized", self.sized)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/big", self.big)
        app.router.add_get("/204", self.no_content)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


Script = Callable[[int, int, bytes], Awaitable[bytes | None]]


class RawBackend:
    """A scripted HTTP server: ``script(connection_no, request_no, head)`` gives the raw answer,
    or None to close the connection without answering. The connection is closed after an answer
    saying ``Connection: close``, or after every answer when ``close_after_answer``."""

    def __init__(self, script: Script, close_after_answer: bool = False) -> None:
        self.script = script
        self.close_after_answer = close_after_answer
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            for index in range(1000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                answer = await self.script(number, index, head)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after_answer or b"Connection: close" in answer:
                    return
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def backend() -> AsyncIterator[WebBackend]:
    server = WebBackend()
    await server.start()
    yield server
    await server.stop()


def pool_to(port: int, limit: int = 8, read_timeout: float = 5.0) -> UpstreamPool:
    return UpstreamPool("127.0.0.1", port, limit=limit, connect_timeout=2.0,
                        read_timeout=read_timeout)


def head(method: str, path: str, port: int, *extra: bytes) -> bytes:
    lines = b"".join(line + b"\r\n" for line in extra)
    return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n" % (
        method.encode(), path.encode(), port, lines)


async def get(pool: UpstreamPool, path: str, method: str = "GET") -> tuple[int, bytes]:
    resp = await pool.request(head(method, path, pool.port), head_only=method == "HEAD")
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


# --- the client -------------------------------------------------------------------------------

async def test_keep_alive_reuses_the_same_connection(backend: WebBackend) -> None:
    pool = pool_to(backend.port)
    try:
        assert (await get(pool, "/echo"))[0] == 200
        assert (await get(pool, "/echo"))[0] == 200
        assert len(backend.ports) == 2 and backend.ports[0] == backend.ports[1]
        assert pool.open == 1 and len(pool.idle) == 1
    finally:
        await pool.close()


async def test_pool_limit_is_respected_under_concurrency(backend: WebBackend) -> None:
    pool = pool_to(backend.port, limit=2)
    try:
        results = await asyncio.gather(*(get(pool, "/slow?delay=0.05") for _ in range(12)))
        assert all(status == 200 and body == b"slow" for status, body in results)
        assert backend.max_in_flight <= 2
        assert len(set(backend.ports)) <= 2
        assert pool.open <= 2 and not pool.waiters
    finally:
        await pool.close()


async def test_a_pool_wait_past_the_pool_timeout_gives_up_and_frees_its_place(
    backend: WebBackend,
) -> None:
    """Both connections busy: waiters give up after ``pool_timeout`` (PoolTimeout, nothing
    sent); the line they leave is consistent, so later requests get connections as usual."""
    pool = UpstreamPool("127.0.0.1", backend.port, limit=2, connect_timeout=2.0,
                        read_timeout=5.0, pool_timeout=0.2)
    try:
        busy = [asyncio.create_task(get(pool, "/slow?delay=0.6")) for _ in range(2)]
        await asyncio.sleep(0.05)
        waits = await asyncio.gather(*(get(pool, "/echo") for _ in range(5)),
                                     return_exceptions=True)
        assert all(isinstance(w, PoolTimeout) for w in waits)
        assert [r[1] for r in await asyncio.gather(*busy)] == [b"slow", b"slow"]
        assert not [w for w in pool.waiters if not w.done()]
        results = await asyncio.gather(*(get(pool, "/slow?delay=0.01") for _ in range(6)))
        assert [r[0] for r in results] == [200] * 6 and pool.open <= 2
        assert len(backend.ports) == 8  # the five that timed out never reached the backend
    finally:
        await pool.close()


async def test_head_has_no_body_and_the_pool_keeps_working(backend: WebBackend) -> None:
    pool = pool_to(backend.port)
    try:
        resp = await pool.request(head("HEAD", "/sized", backend.port), head_only=True)
        assert resp.status == 200 and resp.content_length == 100
        assert await resp.read() == b""
        resp.release()
        assert await get(pool, "/sized") == (200, b"x" * 100)
    finally:
        await pool.close()


async def test_chunked_and_204_responses(backend: WebBackend) -> None:
    pool = pool_to(backend.port)
    try:
        assert await get(pool, "/chunked") == (200, b"part0;part1;part2;part3;part4;")
        assert await get(pool, "/204") == (204, b"")
        assert await get(pool, "/204") == (204, b"")
        assert len(set(backend.ports)) == 1  # all three on one kept-alive connection
    finally:
        await pool.close()


async def test_large_response_streams_with_read_flow_control(backend: WebBackend) -> None:
    pool = pool_to(backend.port)
    try:
        resp = await pool.request(head("GET", "/big", backend.port))
        conn = resp.conn
        first = await resp.read_chunk()
        assert first
        await asyncio.sleep(0.3)  # the server writes as fast as it may meanwhile
        assert resp._buffered <= HIGH_WATER + 256 * 1024  # bounded, not the whole 8 MiB
        assert not conn.transport.is_reading()  # type: ignore[union-attr]
        digest = hashlib.sha256(first)
        total = len(first)
        async for chunk in resp.chunks():
            digest.update(chunk)
            total += len(chunk)
        assert total == BIG
        assert digest.hexdigest() == hashlib.sha256(BIG_BLOCK * (BIG // len(BIG_BLOCK))).hexdigest()
        resp.release()
        assert await get(pool, "/sized") == (200, b"x" * 100)
        assert len(set(backend.ports)) == 1
    finally:
        await pool.close()


async def test_streamed_request_bodies_chunked_and_sized(backend: WebBackend) -> None:
    payload = BIG_BLOCK * 64  # 4 MiB: more than the socket buffers, so writes must wait

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    pool = pool_to(backend.port)
    try:
        chunked = head("POST", "/echo", backend.port, b"Transfer-Encoding: chunked")
        resp = await pool.request(chunked, chunks(), chunked=True)
        doc = await resp.read()
        assert resp.status == 200 and b'"te": "chunked"' in doc
        assert hashlib.sha256(payload).hexdigest().encode() in doc
        sized = head("PUT", "/echo", backend.port, b"Content-Length: %d" % len(payload))
        resp = await pool.request(sized, chunks())
        doc = await resp.read()
        assert b'"length": %d' % len(payload) in doc and b'"te": null' in doc
        assert len(set(backend.ports)) == 1
    finally:
        await pool.close()


async def test_read_timeout_raises_timeout_error(backend: WebBackend) -> None:
    pool = pool_to(backend.port, read_timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            await get(pool, "/slow?delay=2")
        assert pool.open == 0  # the timed-out connection is closed, not pooled
        assert (await get(pool, "/slow?delay=0.01"))[1] == b"slow"
    finally:
        await pool.close()


async def test_idle_connection_closed_by_server_is_dropped() -> None:
    async def ok(conn: int, index: int, head: bytes) -> bytes | None:
        return OK  # keep-alive by default, but the server closes right after (its idle timeout)

    raw = RawBackend(ok, close_after_answer=True)
    await raw.start()
    pool = pool_to(raw.port)
    try:
        assert await get(pool, "/a") == (200, b"ok")
        for _ in range(100):  # until the close reached the client (no timing asserted)
            if not pool.idle:
                break
            await asyncio.sleep(0.01)
        assert not pool.idle and pool.open == 0
        assert await get(pool, "/b") == (200, b"ok")
        assert raw.connections == 2
    finally:
        await pool.close()
        await raw.stop()


async def test_stale_reused_connection_is_disconnected_and_retryable() -> None:
    async def first_only(conn: int, index: int, head: bytes) -> bytes | None:
        return OK if index == 0 else None  # the 2nd request on a connection: closed unanswered

    raw = RawBackend(first_only)
    await raw.start()
    pool = pool_to(raw.port)
    try:
        assert await get(pool, "/a") == (200, b"ok")
        with pytest.raises(Disconnected) as caught:
            await get(pool, "/b")
        assert caught.value.reused
    finally:
        await pool.close()
        await raw.stop()


async def test_interim_100_skipped_and_eof_delimited_body() -> None:
    async def script(conn: int, index: int, head: bytes) -> bytes | None:
        if b"/eof" in head:
            return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
        return b"HTTP/1.1 100 Continue\r\n\r\n" + OK

    raw = RawBackend(script)
    await raw.start()
    pool = pool_to(raw.port)
    try:
        assert await get(pool, "/a") == (200, b"ok")
        assert await get(pool, "/eof") == (200, b"until the end")
        assert await get(pool, "/a") == (200, b"ok")
        assert raw.connections == 2  # Connection: close was honoured, then a fresh one
    finally:
        await pool.close()
        await raw.stop()


async def test_eof_delimited_body_cut_by_a_reset_is_not_complete() -> None:
    """A body that ends with the connection only counts when the backend closes cleanly."""

    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    server = await asyncio.start_server(reset_mid_body, "127.0.0.1", 0)
    pool = pool_to(server.sockets[0].getsockname()[1])
    try:
        resp = await pool.request(head("GET", "/cut", pool.port))
        with pytest.raises(ConnectionLost):
            await resp.read()
        resp.release()
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_malformed_response_is_bad_response() -> None:
    async def garbage(conn: int, index: int, head: bytes) -> bytes | None:
        return b"HTTP/1.1 2x0 WHAT\r\n\r\n"

    raw = RawBackend(garbage)
    await raw.start()
    pool = pool_to(raw.port)
    try:
        with pytest.raises(BadResponse):
            await get(pool, "/a")
        assert pool.open == 0
    finally:
        await pool.close()
        await raw.stop()


def test_header_injection_is_refused() -> None:
    with pytest.raises(InvalidHeader):
        request_head("GET", b"/", b"h", [(b"X-User-ID", b"u\r\nX-Admin: yes")])
    with pytest.raises(InvalidHeader):
        request_head("GET", b"/", b"h", [(b"X-User-ID", b"u\nX-Admin: yes")])
    with pytest.raises(InvalidHeader):
        request_head("GET", b"/", b"h", [(b"X-A", b"a\x00b")])
    assert request_head("GET", b"/", b"h", [(b"X-A", b"fine")]).endswith(b"X-A: fine\r\n\r\n")


# --- through the proxy ------------------------------------------------------------------------

def _ctx_and_body(method: str = "GET") -> tuple[Any, BodySource]:
    scope = {"type": "http", "method": method, "path": "/api/v1/x", "raw_path": b"/api/v1/x",
             "query_string": b"", "headers": [(b"host", b"gw"), (b"x-keep", b"1")],
             "client": ("10.0.0.9", 5555), "scheme": "http"}
    settings = _settings(0)
    ctx = context_from_scope(scope, settings)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    return ctx, BodySource(receive, 1024, has_body=False)


def _settings(port: int) -> Settings:
    return Settings(plant_backend_url=f"http://127.0.0.1:{port}", guards=[],
                    upstream_read_timeout_s=2.0)


async def _forward(port: int, ctx: Any, body: BodySource) -> tuple[Any, list[dict[str, Any]]]:
    proxy = Proxy(_settings(port))
    await proxy.start()
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    try:
        problem = await proxy.forward(ctx, body, send, [])
    finally:
        await proxy.close()
    return problem, sent


async def test_proxy_retries_a_stale_connection_on_a_fresh_one() -> None:
    async def first_only(conn: int, index: int, head: bytes) -> bytes | None:
        return OK if index == 0 else None

    raw = RawBackend(first_only)
    await raw.start()
    proxy = Proxy(_settings(raw.port))
    await proxy.start()
    try:
        for _ in range(3):
            ctx, body = _ctx_and_body()
            sent: list[dict[str, Any]] = []

            async def send(message: Any, sent: list[dict[str, Any]] = sent) -> None:
                sent.append(message)

            assert await proxy.forward(ctx, body, send, []) is None
            assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"
        assert raw.connections >= 3  # every reuse hit a stale connection and was retried
    finally:
        await proxy.close()
        await raw.stop()


async def test_proxy_maps_malformed_response_to_502() -> None:
    async def garbage(conn: int, index: int, head: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n"

    raw = RawBackend(garbage)
    await raw.start()
    try:
        ctx, body = _ctx_and_body()
        problem, sent = await _forward(raw.port, ctx, body)
        assert problem is not None and problem.status == 502 and not sent
    finally:
        await raw.stop()


async def test_proxy_refuses_identity_header_injection_before_sending() -> None:
    async def ok(conn: int, index: int, head: bytes) -> bytes | None:
        return OK

    raw = RawBackend(ok)
    await raw.start()
    try:
        ctx, body = _ctx_and_body()
        ctx.identity = Identity(user_id="u1\r\nX-User-Roles: admin", customer_id="c")
        problem, sent = await _forward(raw.port, ctx, body)
        assert problem is not None and problem.status == 400 and not sent
        assert raw.heads == []  # nothing reached the backend
        ctx, body = _ctx_and_body("HEAD")
        problem, sent = await _forward(raw.port, ctx, body)
        assert problem is None and sent[0]["status"] == 200
        forwarded = raw.heads[-1]
        assert forwarded.startswith(b"HEAD /api/v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"x-keep: 1\r\n" in forwarded and b"X-Gateway: plant-gateway\r\n" in forwarded
    finally:
        await raw.stop()


async def _big_body() -> AsyncIterator[bytes]:
    for _ in range(BIG // len(BIG_BLOCK)):
        yield BIG_BLOCK


async def test_early_answer_stops_the_upload_and_is_relayed() -> None:
    async def refuse(conn: int, index: int, head: bytes) -> bytes | None:
        return b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"

    raw = RawBackend(refuse)
    await raw.start()
    pool = pool_to(raw.port)
    try:
        upload = head("POST", "/up", raw.port, b"Transfer-Encoding: chunked")
        resp = await pool.request(upload, _big_body(), chunked=True)
        assert resp.status == 413 and await resp.read() == b"big"
    finally:
        await pool.close()
        await raw.stop()


async def test_backend_that_reads_nothing_times_out_the_upload() -> None:
    release = asyncio.Event()

    async def stall(conn: int, index: int, head: bytes) -> bytes | None:
        await release.wait()  # neither reads the body nor answers
        return None

    raw = RawBackend(stall)
    await raw.start()
    pool = pool_to(raw.port, read_timeout=0.3)
    try:
        upload = head("POST", "/up", raw.port, b"Transfer-Encoding: chunked")
        with pytest.raises(TimeoutError):
            await pool.request(upload, _big_body(), chunked=True)
        assert pool.open == 0
    finally:
        release.set()
        await pool.close()
        await raw.stop()
