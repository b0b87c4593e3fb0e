"""uvicorn's httptools protocol, trimmed for a proxy's hot path and bounded against abuse.

Three changes, each measured on the forwarding benchmark (bench/), everything else is uvicorn:

- Corked writes: uvicorn writes a response head and its body separately (two send() calls);
  corked, a small response is one write on the socket. Large writes are never delayed or copied.
- One lazy timer per connection for every client timeout (below), instead of uvicorn's
  keep-alive timer armed after every response and cancelled when the next request arrives.
- A leaner response head: header names and values are checked with one regex search each over
  the whole head instead of two searches per header.

Client bounds (``ClientLimits``, from the CLIENT_*_TIMEOUT_S and MAX_CONNECTIONS settings): a
new connection that sends nothing is closed after the idle timeout; a request head must be
complete within the header timeout of its first byte (else 408 and close: slowloris); an idle
connection between requests is closed after the keep-alive timeout. Past MAX_CONNECTIONS a new
connection closes the longest-idle one that runs no request, or, when all are busy, gets a 503
and is closed. None of these has a request yet, so they are counted in
``plant_gateway_client_connections_closed_total``, not audited.

The protocol is also the client link of its requests (``forwarding.ClientLink``, in the scope as
``scope["extensions"]["plant.client"]``, one dict per connection): ``disconnected``,
``on_disconnect`` (called once when the client goes away; the proxy then aborts its upstream
exchange), ``task`` (the running request's), ``body_ready`` and ``abort``. Per connection, not
per request: uvicorn runs a connection's requests one at a time, and a per-request link in the
scope would make every request a reference cycle for the GC.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from plant_gateway import metrics
from plant_gateway.pipeline.ingress import new_uuid4
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.settings import Settings

CORK_MAX = 16 * 1024  # writes up to this size wait for the end of the loop turn
# connection phases: new (no byte yet), reading a request head, a request running, between two
IDLE, HEAD, BUSY, KEPT = 0, 1, 2, 3
EXPIRED = ("idle_timeout", "header_timeout", "", "keepalive_timeout")  # metric reason per phase
LINGER_S = 1.0  # a refused connection reads (and drops) what the client still sends, so the
LINGER_MAX = 256  # kernel does not reset it before the client read the 503; at most this many
_lingering = 0


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """A worker's bounds on client connections; ``None`` switches one off."""

    idle_s: float | None = None  # a new connection without a byte
    header_s: float | None = None  # a request head, from its first byte
    keepalive_s: float | None = None  # between two requests
    max_connections: int | None = None
    problem_base: str = "https://waooaw.com"

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientLimits:
        return cls(settings.client_idle_timeout_s, settings.client_header_timeout_s,
                   settings.client_keepalive_timeout_s, settings.max_connections,
                   settings.problem_type_base)

    def by_phase(self) -> tuple[float | None, float | None, None, float | None]:
        return (self.idle_s, self.header_s, None, self.keepalive_s)

    def tick(self) -> float | None:
        """The longest the connection timer sleeps: half the shortest limit, so a phase that
        begins while it sleeps is checked at most that late (and then to the exact moment)."""
        limits = [limit for limit in self.by_phase() if limit is not None]
        return min(limits) / 2 if limits else None


def problem_response(limits: ClientLimits, problem: Problem) -> bytes:
    """A whole ``Connection: close`` problem+json response, for answers without a request."""
    body = problem.render(base=limits.problem_base, instance="/", correlation_id=new_uuid4())
    head = [STATUS_LINE[problem.status],
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body), b"cache-control: no-store\r\n"]
    head += [b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in problem.headers]
    return b"".join([*head, b"connection: close\r\n\r\n", body])


def _client_limits(app: Any) -> ClientLimits | None:
    """The app's ``client_limits``, also through uvicorn's middleware (each keeps ``.app``)."""
    for _ in range(8):
        limits = getattr(app, "client_limits", None)
        if isinstance(limits, ClientLimits):
            return limits
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _closed(reason: str) -> None:
    metrics.child(metrics.CLIENT_CLOSED, reason).inc()


class _Refused(asyncio.Protocol):
    """A connection answered 503 at accept: drops what it reads, closed after ``LINGER_S``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        global _lingering
        _lingering += 1
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        global _lingering
        _lingering -= 1
        self.timer.cancel()


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
    """``HttpToolsProtocol`` writing through a ``CorkedTransport`` (WebSocket upgrades excepted),
    with the client bounds of ``ClientLimits`` (the app's ``client_limits``; without one, only
    uvicorn's keep-alive timeout applies)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = _client_limits(self.app) or ClientLimits(keepalive_s=self.timeout_keep_alive)
        self.limits = limits
        self.phase_limits = limits.by_phase()
        self.tick = limits.tick()
        # connections without a request running, longest idle first (shared by the worker's)
        evictable = getattr(self.server_state, "plant_evictable", None)
        if evictable is None:
            evictable = {}
            self.server_state.plant_evictable = evictable  # type: ignore[attr-defined]
            connections = self.connections
            metrics.CLIENT_CONNECTIONS.set_function(lambda: len(connections))
        self.evictable: dict[CorkedHttpToolsProtocol, None] = evictable
        self.watch_timer: asyncio.TimerHandle | None = None
        self.phase = IDLE
        self.phase_since: float | None = None  # None: not seen by the timer yet
        self.in_head = False  # a request head is being read
        # the client link (module docstring)
        self.extensions = {"plant.client": self}
        self.disconnected = False
        self.on_disconnect: Callable[[Any], None] | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap and not self._make_room():
            self._refuse()
            return
        now = self.loop.time()
        self.phase, self.phase_since = IDLE, now
        self.evictable[self] = None
        if self.tick is not None:
            self._arm(now)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.disconnected = True
        self.evictable.pop(self, None)
        if self.watch_timer is not None:
            self.watch_timer.cancel()
            self.watch_timer = None
        callback = self.on_disconnect
        if callback is not None:
            self.on_disconnect = None
            callback(self)  # the app stops forwarding: its upstream exchange is aborted

    # --- the client link -------------------------------------------------------------------------

    def body_ready(self) -> bool:
        """The next ``receive()`` returns at once (body bytes, its end, or the disconnect)."""
        cycle = self.cycle
        return bool(cycle.body) or not cycle.more_body or cycle.disconnected

    def abort(self) -> None:
        """Cut the connection mid-response: the client sees an incomplete answer. The cycle is
        marked disconnected first, so uvicorn does not log the unfinished response as an error."""
        self.cycle.disconnected = True
        self.cycle.keep_alive = False
        self.transport.close()

    # --- client timeouts: one lazy timer per connection ---------------------------------------
    # A request changes the phase with attribute writes only (no clock read, no timer): the
    # timer sleeps at most ``tick``; the first time it sees a phase it starts timing it, then it
    # closes the connection when the phase lasted its limit. So a limit is kept to within one
    # tick (half the shortest limit): a head timeout of 10 s closes after 10 to 15 s.

    def _arm(self, now: float) -> None:
        tick = self.tick
        assert tick is not None
        limit, since = self.phase_limits[self.phase], self.phase_since
        delay = tick if limit is None or since is None else min(tick, since + limit - now)
        self.watch_timer = self.loop.call_at(now + delay, self._watch)

    def _watch(self) -> None:
        self.watch_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        limit = self.phase_limits[self.phase]
        if limit is not None:
            since = self.phase_since
            if since is None:
                self.phase_since = now  # timed from here
            elif now >= since + limit:
                self._expire()
                return
        self._arm(now)

    def _expire(self) -> None:
        """The phase lasted too long: a started head gets its 408; the connection is closed."""
        phase = self.phase
        if phase == HEAD:
            problem = Problem(408, "request-timeout",
                              f"the request head did not arrive within {self.limits.header_s:g} s")
            self.transport.write(problem_response(self.limits, problem))
        _closed(EXPIRED[phase])
        self.transport.close()

    def _unset_keepalive_if_required(self) -> None:
        pass  # uvicorn's per-request keep-alive timer is replaced by the connection timer

    def on_message_begin(self) -> None:  # uvicorn's, inlined (one call less per request)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
            "extensions": self.extensions,  # type: ignore[typeddict-item]
        }
        self.in_head = True
        if self.phase != BUSY:  # a pipelined head is read while a request runs
            self.phase = HEAD
            self.phase_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.phase = HEAD if self.in_head else KEPT  # the next head may be coming already
        self.phase_since = None
        self.evictable[self] = None

    # --- the connection cap ---------------------------------------------------------------------

    def _make_room(self) -> bool:
        """Close the longest-idle connection that runs no request; False if every one does."""
        evictable = self.evictable
        while evictable:
            victim = next(iter(evictable))
            del evictable[victim]
            if not victim.transport.is_closing():
                _closed("evicted")
                victim.transport.close()
                return True
        return False

    def _refuse(self) -> None:
        """Every connection runs a request: this one gets a 503 and is closed."""
        self.connections.discard(self)
        _closed("over_capacity")
        problem = Problem(503, "overloaded", "the gateway is at its connection limit",
                          headers=[("retry-after", "1")])
        corked = self.transport
        assert isinstance(corked, CorkedTransport)
        corked.write(problem_response(self.limits, problem))
        corked.flush()
        transport = corked.real
        if _lingering >= LINGER_MAX or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.set_protocol(_Refused(transport))

    # --- the request cycle: uvicorn's, with LeanCycle ------------------------------------------

    def on_headers_complete(self) -> None:
        self.phase = BUSY
        self.in_head = False
        self.evictable.pop(self, None)
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

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """uvicorn's, keeping the task (``task`` of the client link: asyncio.current_task()
        costs ~0.3 µs under uvloop)."""
        if self.config.reset_contextvars:
            task = self.loop.create_task(cycle.run_asgi(app), context=contextvars.Context())
        else:
            task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        self.task = task

    def handle_websocket_upgrade(self) -> None:
        self.evictable.pop(self, None)
        if self.watch_timer is not None:  # the WebSocket protocol has its own timeouts
            self.watch_timer.cancel()
            self.watch_timer = None
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
