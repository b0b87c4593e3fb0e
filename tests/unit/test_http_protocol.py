"""Wire behaviour of ``CorkedHttpToolsProtocol`` (plant_gateway.http_protocol) on a real uvicorn.

Each test starts ``uvicorn.Server`` in its own uvloop event loop on a free port and talks raw
HTTP/1.1 over ``asyncio.open_connection``, so the exact bytes are visible. Every wire test is
parametrized over the gateway's class and uvicorn's stock ``HttpToolsProtocol`` with the same
expected bytes: the trimmed protocol must behave exactly like the one it replaces.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import uvicorn
import uvloop

from plant_gateway.cli.serve import HTTP_PROTOCOL
from plant_gateway.http_protocol import ClientLimits, CorkedHttpToolsProtocol

STOCK_PROTOCOL = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
PROTOCOLS = pytest.mark.parametrize("protocol", [HTTP_PROTOCOL, STOCK_PROTOCOL],
                                    ids=["corked", "stock"])
KEEP_ALIVE = 1  # seconds, the server's keep-alive timeout
WAIT = 5.0  # generous upper bound for anything the server must do on its own

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")

SERVER = b"server: uvicorn\r\n"  # the one default header (date_header is off)


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@asynccontextmanager
async def serving(app: App, protocol: str) -> AsyncIterator[int]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=protocol, loop="uvloop", lifespan="off",
        timeout_keep_alive=KEEP_ALIVE, log_config=None, access_log=False, date_header=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
        sock: socket.socket = server.servers[0].sockets[0]
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT + 5)


@asynccontextmanager
async def connected(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> bytes:
    """One response's raw bytes, framed by its content-length or chunked encoding."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").lower().split("\r\n")
    status = int(lines[0].split()[1])
    fields = dict(line.split(": ", 1) for line in lines[1:] if line)
    if head_request or status in (204, 304):
        return head
    if "content-length" in fields:
        body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), WAIT)
        return head + body
    assert fields.get("transfer-encoding") == "chunked", head
    raw = b""
    while True:
        size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)
        size = int(size_line, 16)
        raw += size_line + await asyncio.wait_for(reader.readexactly(size + 2), WAIT)
        if size == 0:
            return head + raw


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; a TimeoutError if it does not within WAIT."""
    return await asyncio.wait_for(reader.read(), WAIT)


def get(path: str = "/", version: str = "1.1", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nhost: test\r\n\r\n".encode()


def ok(body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return (b"HTTP/1.1 200 OK\r\n" + SERVER + b"content-length: %d\r\n" % len(body)
            + b"content-type: " + content_type + b"\r\n\r\n" + body)


# --- apps ------------------------------------------------------------------------------------


async def echo_path(scope: Scope, receive: Receive, send: Send) -> None:
    """200 with the path as body; ``/slow`` sleeps longer than the keep-alive timeout first."""
    if scope["path"] == "/slow":
        await asyncio.sleep(KEEP_ALIVE * 1.5)
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"Content-Length", str(len(body)).encode()), (b"Content-Type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def responding(status: int, headers: list[tuple[bytes, bytes]], *parts: bytes) -> App:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


# --- keep-alive --------------------------------------------------------------------------------


@PROTOCOLS
def test_idle_keep_alive_connection_is_closed_after_timeout(protocol: str) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        async with serving(echo_path, protocol) as port, connected(port) as (reader, writer):
            writer.write(get("/a"))
            response = await read_response(reader)
            return response, await read_to_eof(reader)

    response, rest = run(scenario())
    assert response == ok(b"/a")
    assert rest == b""


@PROTOCOLS
def test_busy_connection_outlives_timeout_then_closes_when_idle(protocol: str) -> None:
    async def scenario() -> tuple[list[bytes], bytes]:
        async with serving(echo_path, protocol) as port, connected(port) as (reader, writer):
            responses = []
            for i in range(9):  # ≈ 2.7 s of requests every 0.3 s: longer than the 1 s timeout
                writer.write(get(f"/r{i}"))
                responses.append(await read_response(reader))
                await asyncio.sleep(0.3)
            return responses, await read_to_eof(reader)

    responses, rest = run(scenario())
    assert responses == [ok(f"/r{i}".encode()) for i in range(9)]
    assert rest == b""  # the timer is re-armed after the busy period


@PROTOCOLS
def test_request_running_past_timeout_is_not_cut_off(protocol: str) -> None:
    """The timer armed by the first response fires while ``/slow`` runs: it must not close."""

    async def scenario() -> tuple[bytes, bytes, bytes]:
        async with serving(echo_path, protocol) as port, connected(port) as (reader, writer):
            writer.write(get("/fast"))
            first = await read_response(reader)
            writer.write(get("/slow"))
            second = await read_response(reader)
            return first, second, await read_to_eof(reader)

    first, second, rest = run(scenario())
    assert (first, second, rest) == (ok(b"/fast"), ok(b"/slow"), b"")


# --- framing -----------------------------------------------------------------------------------


@PROTOCOLS
def test_pipelined_requests_get_responses_in_order(protocol: str) -> None:
    async def scenario() -> list[bytes]:
        async with serving(echo_path, protocol) as port, connected(port) as (reader, writer):
            writer.write(get("/slow") + get("/second") + get("/third"))
            return [await read_response(reader) for _ in range(3)]

    assert run(scenario()) == [ok(b"/slow"), ok(b"/second"), ok(b"/third")]


@PROTOCOLS
def test_content_length_response(protocol: str) -> None:
    app = responding(200, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")],
                     b"hel", b"lo")

    async def scenario() -> list[bytes]:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get() + get())
            return [await read_response(reader), await read_response(reader)]

    expected = (b"HTTP/1.1 200 OK\r\n" + SERVER
                + b"content-type: text/plain\r\ncontent-length: 5\r\n\r\nhello")
    assert run(scenario()) == [expected, expected]


@PROTOCOLS
def test_chunked_response_when_app_gives_no_length(protocol: str) -> None:
    app = responding(201, [(b"x-kind", b"stream")], b"hel", b"", b"lo world")

    async def scenario() -> list[bytes]:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get())
            first = await read_response(reader)
            writer.write(get())  # the connection is still usable: the framing ended right
            return [first, await read_response(reader)]

    expected = (b"HTTP/1.1 201 Created\r\n" + SERVER
                + b"x-kind: stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"3\r\nhel\r\n8\r\nlo world\r\n0\r\n\r\n")
    assert run(scenario()) == [expected, expected]


@PROTOCOLS
def test_large_and_small_body_writes_keep_their_order(protocol: str) -> None:
    parts = [b"a" * 10, b"b" * 40_000, b"c" * 7, b"d" * 20_000, b"e" * 3]
    length = str(sum(map(len, parts))).encode()
    app = responding(200, [(b"content-length", length)], *parts)

    async def scenario() -> bytes:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get())
            return await read_response(reader)

    response = run(scenario())
    assert response == (b"HTTP/1.1 200 OK\r\n" + SERVER + b"content-length: " + length
                        + b"\r\n\r\n" + b"".join(parts))


@PROTOCOLS
@pytest.mark.parametrize("headers", [[(b"content-length", b"5")], []], ids=["length", "none"])
def test_head_response_has_no_body(protocol: str, headers: list[tuple[bytes, bytes]]) -> None:
    app = responding(200, headers, b"hello")

    async def scenario() -> list[bytes]:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get(method="HEAD"))
            head = await read_response(reader, head_request=True)
            writer.write(get(method="HEAD"))  # no stray body bytes before the next response
            return [head, await read_response(reader, head_request=True)]

    length = b"content-length: 5\r\n" if headers else b""
    expected = b"HTTP/1.1 200 OK\r\n" + SERVER + length + b"\r\n"
    assert run(scenario()) == [expected, expected]


@PROTOCOLS
def test_no_content_response_is_not_chunked(protocol: str) -> None:
    app = responding(204, [])

    async def scenario() -> list[bytes]:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get() + get())
            return [await read_response(reader), await read_response(reader)]

    expected = b"HTTP/1.1 204 No Content\r\n" + SERVER + b"\r\n"
    assert run(scenario()) == [expected, expected]


# --- connection close ---------------------------------------------------------------------------


@PROTOCOLS
@pytest.mark.parametrize("value", [b"close", b"Keep-Alive, Close"])
def test_connection_close_from_app_closes_after_response(protocol: str, value: bytes) -> None:
    app = responding(200, [(b"Connection", value), (b"content-length", b"2")], b"ok")

    async def scenario() -> bytes:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get())
            return await read_to_eof(reader)

    assert run(scenario()) == (b"HTTP/1.1 200 OK\r\n" + SERVER + b"connection: " + value
                               + b"\r\ncontent-length: 2\r\n\r\nok")


@PROTOCOLS
def test_http_1_0_request_gets_connection_closed(protocol: str) -> None:
    async def scenario() -> bytes:
        async with serving(echo_path, protocol) as port, connected(port) as (reader, writer):
            writer.write(get("/old", version="1.0"))
            return await read_to_eof(reader)

    assert run(scenario()) == (b"HTTP/1.1 200 OK\r\n" + SERVER
                               + b"content-length: 4\r\ncontent-type: text/plain\r\n"
                               + b"connection: close\r\n\r\n/old")


# --- invalid responses -------------------------------------------------------------------------


@PROTOCOLS
@pytest.mark.parametrize(("header", "error"), [
    ((b"x-ok", b"fine\r\nx-injected: yes"), "Invalid HTTP header value."),
    ((b"x-ok", b"fine\nx-injected: yes"), "Invalid HTTP header value."),
    ((b"x-ok", b"fine\x00x-injected"), "Invalid HTTP header value."),
    ((b"x-injected bad", b"yes"), "Invalid HTTP header name."),
    ((b"x-injected:", b"yes"), "Invalid HTTP header name."),
], ids=["crlf-value", "lf-value", "nul-value", "space-name", "colon-name"])
def test_invalid_header_is_never_sent(protocol: str, header: tuple[bytes, bytes], error: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    app = responding(200, [(b"content-length", b"2"), header], b"ok")

    async def scenario() -> bytes:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get())
            return await read_to_eof(reader)

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        received = run(scenario())
    assert b"x-injected" not in received
    assert received == b""  # the head was refused before anything was written: just closed
    errors = [r for r in caplog.records if r.name == "uvicorn.error" and r.exc_info]
    assert [str(r.exc_info[1]) for r in errors if r.exc_info] == [error]


@PROTOCOLS
def test_tab_and_obs_text_in_header_value_are_sent(protocol: str) -> None:
    app = responding(200, [(b"x-v", b"a\tb \xe9"), (b"content-length", b"0")])

    async def scenario() -> bytes:
        async with serving(app, protocol) as port, connected(port) as (reader, writer):
            writer.write(get())
            return await read_response(reader)

    assert run(scenario()) == (b"HTTP/1.1 200 OK\r\n" + SERVER
                               + b"x-v: a\tb \xe9\r\ncontent-length: 0\r\n\r\n")


async def body_without_start(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.body", "body": b"oops"})


@PROTOCOLS
def test_body_without_start_gets_500_and_close(protocol: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> bytes:
        async with serving(body_without_start, protocol) as port, \
                connected(port) as (reader, writer):
            writer.write(get())
            return await read_to_eof(reader)

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        received = run(scenario())
    assert received == (b"HTTP/1.1 500 Internal Server Error\r\n" + SERVER
                        + b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n"
                        + b"connection: close\r\n\r\nInternal Server Error")
    errors = [r for r in caplog.records if r.name == "uvicorn.error" and r.exc_info]
    assert len(errors) == 1
    assert isinstance(errors[0].exc_info and errors[0].exc_info[1], RuntimeError)
    assert "http.response.start" in str(errors[0].exc_info and errors[0].exc_info[1])


def test_serve_config_resolves_to_the_corked_protocol() -> None:
    config = uvicorn.Config(echo_path, http=HTTP_PROTOCOL, lifespan="off", log_config=None)
    config.load()
    assert config.http_protocol_class is CorkedHttpToolsProtocol


# --- client bounds and the client link (the gateway's protocol only) ----------------------------


class LimitedApp:
    """An app with ``client_limits`` (as GatewayApp has): the protocol applies them."""

    def __init__(self, app: App, limits: ClientLimits) -> None:
        self.app = app
        self.client_limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def test_the_app_learns_when_its_client_goes_away() -> None:
    """``on_disconnect`` set by the app is called once when the client leaves mid-request."""
    called: list[str] = []
    registered = asyncio.Event()

    async def waiting(scope: Scope, receive: Receive, send: Send) -> None:
        link = scope["extensions"]["plant.client"]
        assert not link.disconnected and link.body_ready()  # no body: its end is there
        link.on_disconnect = lambda gone: called.append("gone" if gone is link else "?")
        registered.set()
        await asyncio.sleep(WAIT)

    async def scenario() -> None:
        async with serving(waiting, HTTP_PROTOCOL) as port:
            async with connected(port) as (_, writer):
                writer.write(get())
                await asyncio.wait_for(registered.wait(), WAIT)
            for _ in range(100):
                if called:
                    return
                await asyncio.sleep(0.02)

    run(scenario())
    assert called == ["gone"]


def test_abort_cuts_a_response_without_an_app_error(caplog: pytest.LogCaptureFixture) -> None:
    async def cut(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        scope["extensions"]["plant.client"].abort()

    async def scenario() -> bytes:
        async with serving(cut, HTTP_PROTOCOL) as port, connected(port) as (reader, writer):
            writer.write(get())
            return await read_to_eof(reader)

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        received = run(scenario())
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\n12345")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_head_trickling_behind_a_running_request_gets_408_after_its_answer() -> None:
    """The header timeout of a pipelined head counts from its first byte and never cuts into
    the answer before it: that answer arrives whole, then the 408."""
    app = LimitedApp(echo_path, ClientLimits(header_s=0.5, keepalive_s=KEEP_ALIVE))

    async def scenario() -> tuple[bytes, bytes]:
        async with serving(app, HTTP_PROTOCOL) as port, connected(port) as (reader, writer):
            writer.write(get("/slow") + b"GET /next HTTP/1.1\r\nhost: test\r\n")
            return await read_response(reader), await read_to_eof(reader)

    first, rest = run(scenario())
    assert first == ok(b"/slow")
    assert rest.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close\r\n" in rest
