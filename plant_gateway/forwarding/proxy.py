"""Forwarding: one connection pool per upstream, streaming both ways, header hygiene.

HTTP requests go through the lean client of ``upstream_client`` (the request head is built as
bytes straight from the client's raw headers); WebSockets, the ID-token fetch and health checks
use an aiohttp session. Timeouts, idempotent retries on connection failure, a circuit breaker per
upstream, and the 502/503/504 problems.

Bounded: a request holds an upstream connection only while it is forwarded, and that ends when
its client goes away (the upstream exchange is aborted: the backend sees the disconnect), at
the request deadline (REQUEST_DEADLINE_S), or when a slow body times out (408); waiting for a
pooled connection is bounded too (UPSTREAM_POOL_TIMEOUT_S, 503).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from plant_gateway import events, masking, metrics
from plant_gateway.backends.base import DependencyStatus
from plant_gateway.problems import Problem
from plant_gateway.steps.ingress import (
    BodySource,
    BodyTimeout,
    BodyTooLarge,
    body_timeout,
    client_gone,
    read_body,
    too_large,
)
from plant_gateway.forwarding.client import (
    ConnectError,
    Disconnected,
    InvalidHeader,
    PoolTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    check_head,
    pool_for_url,
)

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.settings import Settings

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
log = logging.getLogger("plant_gateway.proxy")

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
     "proxy-connection", "proxy-authenticate", "proxy-authorization"}
)
# client headers the gateway owns: dropped before its own values are added (no spoofing)
OWNED_PREFIXES = ("x-gateway", "x-user-", "x-debug-", "x-forwarded-")
OWNED = frozenset(
    {"authorization", "x-original-authorization", "x-customer-id", "x-correlation-id",
     "x-request-id", "x-causation-id", "traceparent", "tracestate", "host", "content-length",
     "forwarded", "x-real-ip", "x-target-backend", "expect"}
)
# upstream response headers the gateway replaces with its own
RESPONSE_OWNED = frozenset({"x-correlation-id", "x-request-id", "x-target-backend", "server"})
_DROP = HOP_BY_HOP | OWNED  # client header names never forwarded as such
_DROP_PREFIXES = (*OWNED_PREFIXES, "proxy-")
_DROP_PREFIXES_WS = (*_DROP_PREFIXES, "sec-websocket-")
_RESPONSE_DROP = HOP_BY_HOP | RESPONSE_OWNED
_RESPONSE_DROP_PREFIXES = ("proxy-", "access-control-", "x-debug-")
_URL_CACHE_LIMIT = 1024  # upstream URLs built per (path, query): bounded count and key size
_URL_CACHE_KEY_MAX = 512
_DROP_B = frozenset(name.encode() for name in _DROP)
_DROP_PREFIXES_B = tuple(prefix.encode() for prefix in _DROP_PREFIXES)
_DROP_PREFIXES_WS_B = tuple(prefix.encode() for prefix in _DROP_PREFIXES_WS)
_RESPONSE_DROP_B = frozenset(name.encode() for name in _RESPONSE_DROP)
_RESPONSE_DROP_PREFIXES_B = tuple(prefix.encode() for prefix in _RESPONSE_DROP_PREFIXES)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})  # list no other header: nothing to drop
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what aiohttp refuses in a header (not tab)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when bodiless
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
SMALL_BODY = 64 * 1024  # responses up to this size (with a Content-Length) are sent in one piece
# request bodies up to this size (with a Content-Length) are read whole before an upstream
# connection is taken, as nginx buffers them: a client trickling its body then holds only its
# own connection, never a pooled one (larger or chunked bodies stream, bounded by the body
# timeout). 64 KiB x the 250 concurrent requests of an instance is 16 MiB at most.
BUFFERED_BODY = 64 * 1024
CLIENT_GONE, DEADLINE = "client-disconnected", "deadline-exceeded"  # why a forward was stopped
SAFE_PATH = "/:@!$&'()*+,;=-._~"
# GCE_METADATA_HOST: the variable Google's client libraries honour (an emulator, or tests)
METADATA_URL = (
    f"http://{os.environ.get('GCE_METADATA_HOST') or 'metadata.google.internal'}"
    "/computeMetadata/v1/instance/service-accounts/default/identity"
)


def _listed(value: bytes) -> set[bytes]:
    """The header names a ``Connection`` header value lists (lowercase)."""
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def upstream_header_fields(ctx: RequestContext, settings: Settings) -> list[tuple[bytes, bytes]]:
    """The headers sent upstream: client headers minus hop-by-hop and owned ones, plus ours.

    Client headers stay the bytes the client sent (no decode/encode); ours are UTF-8.
    """
    raw = ctx.raw_headers
    drop: frozenset[bytes] | set[bytes] = _DROP_B
    for key, value in raw:
        if key.lower() == b"connection":
            drop = drop | _listed(value)
    prefixes = _DROP_PREFIXES_WS_B if ctx.is_websocket else _DROP_PREFIXES_B
    out = [
        (name, value) for name, value in ((k.lower(), v) for k, v in raw)
        if name not in drop and not name.startswith(prefixes)
    ]
    if ctx.authorization:
        out.append((b"X-Original-Authorization", ctx.authorization.encode("latin-1", "replace")))
    out += [
        (b"X-Gateway", b"plant-gateway"),
        (b"X-Gateway-Type", settings.gateway_type.encode()),
        (b"X-Correlation-ID", ctx.correlation_id.encode()),
        (b"X-Request-ID", ctx.request_id.encode()),
        (b"X-Causation-ID", ctx.request_id.encode()),
        (b"X-Forwarded-For", ctx.client_ip.encode()),
        (b"X-Forwarded-Proto", ctx.scheme.encode()),
        (b"X-Forwarded-Host", ctx.host.encode("latin-1", "replace")),
    ]
    if ctx.traceparent:
        out.append((b"traceparent", ctx.traceparent.encode()))
    if ctx.tracestate:
        out.append((b"tracestate", ctx.tracestate.encode("latin-1", "replace")))
    ident = ctx.identity
    if ident is not None:
        if ident.user_id:
            out.append((b"X-User-ID", ident.user_id.encode()))
        if ident.customer_id:
            out.append((b"X-Customer-ID", ident.customer_id.encode()))
        if ident.roles:
            out.append((b"X-User-Roles", ",".join(ident.roles).encode()))
    if ctx.body is not None:
        out.append((b"Content-Length", b"%d" % len(ctx.body)))
    elif ctx.content_length is not None:
        out.append((b"Content-Length", b"%d" % ctx.content_length))
    return out


def encoded_header_fields(ctx: RequestContext, settings: Settings) -> list[tuple[bytes, bytes]]:
    """``upstream_header_fields``; InvalidHeader when a value cannot be UTF-8 (a lone surrogate
    from a ``\\ud800`` escape in a token claim)."""
    try:
        return upstream_header_fields(ctx, settings)
    except UnicodeEncodeError:
        raise InvalidHeader("a header value is not valid text") from None


def invalid_header(ctx: RequestContext) -> Problem:
    ctx.error_type = "invalid-header"
    return Problem(400, "bad-request", "a header value cannot be forwarded (CR/LF/NUL)")


def upstream_request_headers(ctx: RequestContext, settings: Settings) -> list[tuple[str, str]]:
    """``upstream_header_fields`` as text (WebSocket handshakes through aiohttp)."""
    return text_fields(upstream_header_fields(ctx, settings))


def text_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header fields as the text aiohttp writes back as the same bytes; InvalidHeader if none can.

    aiohttp encodes header text as UTF-8, so the bytes are decoded as UTF-8 (latin-1 would send
    UTF-8 values double-encoded). A field that is not UTF-8, or holds a control character
    (CR, LF and NUL among them, which aiohttp refuses too), cannot be sent byte for byte.
    """
    out = []
    for name, value in fields:
        try:
            field = (name.decode(), value.decode())
        except UnicodeDecodeError:
            raise InvalidHeader("a header is not UTF-8: it cannot be forwarded as sent") from None
        if _CONTROL.search(field[0]) or _CONTROL.search(field[1]):
            raise InvalidHeader("a control character (CR, LF, NUL...) in a header")
        out.append(field)
    return out


def request_head(
    method: str, target: bytes, host: bytes, fields: list[tuple[bytes, bytes]]
) -> bytes:
    """The HTTP/1.1 request head; InvalidHeader if any value would smuggle a CR, LF or NUL."""
    head = b"%b %b HTTP/1.1\r\nHost: %b\r\n%b\r\n" % (
        method.encode(), target, host, b"".join([b"%b: %b\r\n" % field for field in fields])
    )
    check_head(head, len(fields) + 3)
    return head


def response_fields(
    upstream: list[tuple[bytes, bytes]], ctx: RequestContext
) -> list[tuple[bytes, bytes]]:
    """Upstream response headers (lowercase names) minus hop-by-hop, CORS (the gateway owns it)
    and ids we set."""
    listed: set[bytes] | None = None
    out = []
    for name, value in upstream:
        if name in _RESPONSE_DROP_B or name.startswith(_RESPONSE_DROP_PREFIXES_B):
            if name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                listed = _listed(value) if listed is None else listed | _listed(value)
            continue
        out.append((name, value))
    if listed:
        out = [(name, value) for name, value in out if name not in listed]
    out.append((b"x-target-backend", ctx.target_backend.encode()))
    return out


def downstream_response_headers(
    upstream: list[tuple[str, str]], ctx: RequestContext
) -> list[tuple[bytes, bytes]]:
    """``response_fields`` for text headers."""
    return response_fields(
        [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in upstream], ctx
    )


class CircuitBreaker:
    """closed -> open after N consecutive failures -> half-open after reset_s (one probe)."""

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
    _GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

    def __init__(self, name: str, threshold: int, reset_s: float) -> None:
        self.name = name
        self.threshold = threshold
        self.reset_s = reset_s
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False
        self._export()

    def _export(self) -> None:
        metrics.CIRCUIT_STATE.labels(self.name).set(self._GAUGE[self.state])
        events.circuit(self, f"upstream {self.name}", self.state, failures=self.failures)

    def allow(self) -> bool:
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and time.monotonic() - self.opened_at >= self.reset_s:
            self.state = self.HALF_OPEN
            self.probing = False
            self._export()
        if self.state == self.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def retry_after(self) -> int:
        return max(1, int(self.reset_s - (time.monotonic() - self.opened_at)) + 1)

    def success(self) -> None:
        if self.state != self.CLOSED or self.failures:
            self.state, self.failures, self.probing = self.CLOSED, 0, False
            self._export()

    def failure(self) -> None:
        self.failures += 1
        if self.state == self.HALF_OPEN or self.failures >= self.threshold:
            if self.state != self.OPEN:
                metrics.CIRCUIT_OPENED.labels(self.name).inc()
            self.state, self.opened_at, self.probing = self.OPEN, time.monotonic(), False
            self._export()


class IdTokenSource:
    """Google ID tokens from the metadata server for an IAM-protected backend, cached to expiry."""

    def __init__(self, audience: str) -> None:
        self.audience = audience
        self.token: str | None = None
        self.expires = 0.0
        self._lock = asyncio.Lock()

    async def get(self, session: aiohttp.ClientSession) -> str:
        if self.token and time.time() < self.expires - 60:
            return self.token
        async with self._lock:
            if self.token and time.time() < self.expires - 60:
                return self.token
            timeout = aiohttp.ClientTimeout(total=3)
            async with session.get(
                METADATA_URL, params={"audience": self.audience}, timeout=timeout,
                headers={"Metadata-Flavor": "Google"},
            ) as resp:
                resp.raise_for_status()
                token = (await resp.text()).strip()
            self.token, self.expires = token, _jwt_exp(token)
            return token


def _jwt_exp(token: str) -> float:
    try:
        payload = token.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(doc["exp"])
    except (IndexError, ValueError, KeyError):
        return time.time() + 300


class Upstream:
    """One backend: its own connection pool and circuit breaker."""

    def __init__(self, name: str, base_url: str, settings: Settings) -> None:
        self.name = name
        self.base = URL(base_url)
        self.settings = settings
        self.breaker = CircuitBreaker(
            name, settings.breaker_failure_threshold, settings.breaker_reset_s
        )
        self.session: aiohttp.ClientSession | None = None  # websockets, checks, ID tokens
        self.pool: UpstreamPool | None = None  # HTTP forwarding
        port = self.base.port
        host = self.base.raw_host or ""
        if ":" in host:
            host = f"[{host}]"
        self.host_header = (host if self.base.is_default_port() else f"{host}:{port}").encode()
        self._base_path = self.base.raw_path.rstrip("/")
        self._targets: dict[tuple[str, str], bytes] = {}
        self.id_tokens = (
            IdTokenSource(settings.plant_backend_audience or base_url)
            if settings.plant_backend_use_id_token else None
        )
        self._origin = str(self.base.origin())
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_read_timeout_s,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.upstream_pool_size, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=self.timeout, cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.pool = pool_for_url(
            self.base, limit=self.settings.upstream_pool_size,
            connect_timeout=self.settings.upstream_connect_timeout_s,
            read_timeout=self.settings.upstream_read_timeout_s,
            pool_timeout=self.settings.upstream_pool_timeout_s,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.session is not None:
            await self.session.close()

    def target(self, path: str, query: str) -> bytes:
        """The request target (percent-encoded path and query) as bytes, like ``url``."""
        key = (path, query)
        found = self._targets.get(key)
        if found is None:
            text = self._base_path + quote(path, safe=SAFE_PATH)
            found = (f"{text}?{query}" if query else text or "/").encode("latin-1", "replace")
            if len(path) + len(query) <= _URL_CACHE_KEY_MAX:
                if len(self._targets) >= _URL_CACHE_LIMIT:
                    self._targets.clear()
                self._targets[key] = found
        return found

    def url(self, path: str, query: str) -> URL:
        """``target`` as an absolute URL (aiohttp: WebSockets, the OpenAPI fetch)."""
        return URL(self._origin + self.target(path, query).decode("latin-1"), encoded=True)

    async def auth_field(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode()) for k, v in await self.auth_header()]

    async def auth_header(self) -> list[tuple[str, str]]:
        if self.id_tokens is None or self.session is None:
            return []
        return [("Authorization", f"Bearer {await self.id_tokens.get(self.session)}")]

    async def check(self) -> DependencyStatus:
        """Reachable means: any HTTP answer within the connect timeout."""
        assert self.session is not None
        started = time.perf_counter()
        try:
            timeout = aiohttp.ClientTimeout(total=min(3.0, self.settings.upstream_read_timeout_s))
            async with self.session.get(self.base.with_path("/"), timeout=timeout) as resp:
                await resp.release()
            ok, detail = True, f"circuit {self.breaker.state}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, detail = False, f"unreachable ({type(exc).__name__})"
        latency = (time.perf_counter() - started) * 1000
        return DependencyStatus(f"upstream_{self.name}", ok, True, detail, latency)


class ResponseStarted(Exception):
    """The upstream failed after the response head was sent: the connection must be aborted."""


class ClientLink(Protocol):
    """What the HTTP server tells about a request's client (``http_protocol``'s protocol, in
    the ASGI scope as ``scope["extensions"]["plant.client"]``)."""

    disconnected: bool
    on_disconnect: Callable[[Any], None] | None  # called with the link when the client goes
    task: asyncio.Task[None] | None  # the running request's
    def body_ready(self) -> bool: ...

    def abort(self) -> None: ...  # cut the connection mid-response


class Deadlines:
    """The forwards in progress (their tasks, oldest first, with their deadlines) and one timer
    for the oldest one's deadline; ``stop`` cancels a task while it forwards, never elsewhere.

    Every request has the same deadline after its arrival, so the oldest is due first: one
    timer wakes per deadline period, not one armed and cancelled per request. A forward that
    began late (slow steps) may be stopped up to that lateness after its due. Deadlines are on
    the ``time.perf_counter`` clock of ``RequestContext.started``.
    """

    def __init__(self) -> None:
        self.running: dict[asyncio.Task[Any], float] = {}
        self.stopped: dict[asyncio.Task[Any], str] = {}  # why, until the task has handled it
        self.timer: asyncio.TimerHandle | None = None

    def stop(self, task: asyncio.Task[Any] | None, reason: str) -> None:
        """Cancel ``task`` if it is forwarding (and was not stopped already)."""
        if task in self.running and task not in self.stopped:
            assert task is not None
            self.stopped[task] = reason
            task.cancel()

    def client_gone(self, client: ClientLink) -> None:
        """A client link's ``on_disconnect``: stops its running request if it is forwarding."""
        self.stop(client.task, CLIENT_GONE)

    def arm(self) -> None:
        """The timer, for the deadline of the oldest forward not stopped yet."""
        for task, deadline in self.running.items():
            if task not in self.stopped:
                loop = asyncio.get_running_loop()
                due = max(deadline - time.perf_counter(), 0.0)
                self.timer = loop.call_at(loop.time() + due, self._expire)
                return

    def _expire(self) -> None:
        self.timer = None
        now = time.perf_counter()
        for task, deadline in list(self.running.items()):
            if deadline > now:
                break
            self.stop(task, DEADLINE)
        self.arm()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Proxy:
    """Forwards requests to the upstream that sandbox routing chose (``ctx.target_backend``)."""

    name = "upstream"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cost_header = settings.cost_response_header.lower().encode("latin-1")
        self.deadline_s = settings.request_deadline_s
        self.deadlines = Deadlines()
        self._client_gone = self.deadlines.client_gone  # bound once, set on every link
        production = Upstream("production", settings.plant_backend_url, settings)
        self.upstreams = {"production": production}
        if settings.plant_sandbox_url and settings.plant_sandbox_url != settings.plant_backend_url:
            self.upstreams["sandbox"] = Upstream("sandbox", settings.plant_sandbox_url, settings)

    def upstream(self, target: str) -> Upstream:
        return self.upstreams.get(target) or self.upstreams["production"]

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        self.deadlines.close()
        for upstream in self.upstreams.values():
            await upstream.close()

    async def checks(self) -> list[DependencyStatus]:
        return list(await asyncio.gather(*(u.check() for u in self.upstreams.values())))

    async def forward(
        self, ctx: RequestContext, body: BodySource, send: Send, extra: list[tuple[bytes, bytes]],
        client: ClientLink | None = None,
    ) -> Problem | None:
        """Send the request upstream and stream the answer back; a Problem if nothing was sent.

        Stopped (the upstream exchange aborted, its connection freed) when ``client`` goes away
        or at the request deadline: the task is cancelled while inside this function only.
        One function, no inner coroutine: it runs for every request.
        """
        if client is not None and client.disconnected:
            return client_gone(ctx)  # gone during the steps: the backend never sees it
        upstream = self.upstream(ctx.target_backend)
        if not upstream.breaker.allow():
            return _unavailable(upstream, "circuit open")
        task = client.task if client is not None else asyncio.current_task()
        assert task is not None
        deadlines = self.deadlines
        running = deadlines.running
        running[task] = ctx.started + self.deadline_s
        if deadlines.timer is None:
            deadlines.arm()
        if client is not None:
            client.on_disconnect = self._client_gone  # a no-op once this forward is over
        try:
            if ctx.body is None and body.has_body and ctx.content_length is not None \
                    and ctx.content_length <= BUFFERED_BODY:
                read = await read_body(ctx)  # before any upstream connection is taken
                if isinstance(read, Problem):
                    return read
            try:
                fields = encoded_header_fields(ctx, self.settings)
            except InvalidHeader:
                return invalid_header(ctx)
            if upstream.id_tokens is not None:
                problem = await self._id_token(upstream, fields)
                if problem is not None:
                    return problem
            chunked = ctx.body is None and body.has_body and ctx.content_length is None
            if chunked:
                fields.append((b"Transfer-Encoding", b"chunked"))
            elif ctx.body is None and not body.has_body and ctx.content_length is None \
                    and ctx.method in BODY_METHODS:
                fields.append((b"Content-Length", b"0"))
            target = upstream.target(ctx.upstream_path, ctx.query_string)
            try:
                head = request_head(ctx.method, target, upstream.host_header, fields)
            except InvalidHeader:
                return invalid_header(ctx)
            started = time.perf_counter()
            resp, problem = await self._send(upstream, ctx, body, head, chunked)
            if problem is not None:
                return problem
            assert resp is not None
            # observed per route with the request's other timings (app.finish)
            ctx.upstream_latency_ms = (time.perf_counter() - started) * 1000
            return await self._relay(upstream, ctx, resp, send, extra)
        except asyncio.CancelledError:
            reason = deadlines.stopped.pop(task, None)
            if reason is None or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown)
            return self._stopped(ctx, reason, getattr(send, "started", True))
        finally:
            del running[task]  # disarmed: nothing after this may be cancelled by a stop

    async def _id_token(self, upstream: Upstream, fields: list[tuple[bytes, bytes]]
                        ) -> Problem | None:
        """Add the backend's ID token to ``fields``; a 503 when none can be had."""
        try:
            fields += await upstream.auth_field()
        except (aiohttp.ClientError, TimeoutError):
            upstream.breaker.failure()
            return Problem(503, "upstream-unavailable", "could not obtain a backend identity token")
        return None

    def _stopped(self, ctx: RequestContext, reason: str, started: bool) -> Problem | None:
        """The forward was stopped: the problem to answer, if the answer has not started."""
        upstream = self.upstream(ctx.target_backend)
        _count(upstream, "client_gone" if reason == CLIENT_GONE else "deadline")
        if reason == CLIENT_GONE:
            if not started:
                return client_gone(ctx)
            ctx.error_type = CLIENT_GONE  # the row keeps the status that was being sent
            return None
        ctx.error_type = DEADLINE
        if started:
            raise ResponseStarted("the request deadline passed while streaming")
        return Problem(504, "gateway-timeout",
                       f"the request did not complete within {self.deadline_s:g} s")

    async def _send(
        self, upstream: Upstream, ctx: RequestContext, body: BodySource, head: bytes,
        chunked: bool,
    ) -> tuple[UpstreamResponse | None, Problem | None]:
        assert upstream.pool is not None
        replayable = ctx.body is not None or not body.has_body
        retries = self.settings.upstream_retries if ctx.method in IDEMPOTENT and replayable else 0
        head_only = ctx.method == "HEAD"
        fresh = False
        for attempt in range(retries + 1):
            data: Any = ctx.body
            if data is None and body.has_body:
                data = body.chunks()
            try:
                resp = await upstream.pool.request(
                    head, data, chunked=chunked, head_only=head_only, fresh=fresh
                )
            except (ConnectError, Disconnected) as exc:
                if attempt < retries and body.received <= body.max_bytes:
                    # nothing reached the backend (or a stale pooled connection): safe to retry
                    _count(upstream, "retry")
                    stale = isinstance(exc, Disconnected) and exc.reused
                    fresh = stale
                    if not stale:
                        await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                return None, self._failed(upstream, ctx, body, exc)
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised if unknown
                return None, self._failed(upstream, ctx, body, exc)
            upstream.breaker.success()
            return resp, None
        raise AssertionError("unreachable")

    def _failed(
        self, upstream: Upstream, ctx: RequestContext, body: BodySource, exc: Exception
    ) -> Problem:
        """Map a failed upstream call to its problem and feed the circuit breaker."""
        if body.received > body.max_bytes or isinstance(exc, BodyTooLarge):
            return too_large(body.max_bytes)
        if body.timed_out or isinstance(exc, BodyTimeout):
            return body_timeout(body.timeout or 0.0)  # the client's slowness, not the backend's
        if body.disconnected:
            return client_gone(ctx)
        if isinstance(exc, PoolTimeout):
            _count(upstream, "pool_timeout")  # our own saturation: the breaker is not fed
            return Problem(
                503, "upstream-unavailable",
                f"no connection to the backend came free within "
                f"{self.settings.upstream_pool_timeout_s:g} s",
                headers=[("retry-after", "1")],
            )
        if isinstance(exc, ConnectError):
            _count(upstream, "connect")
            upstream.breaker.failure()
            return _unavailable(upstream, "connection failed")
        if isinstance(exc, TimeoutError):
            _count(upstream, "timeout")
            upstream.breaker.failure()
            return Problem(504, "gateway-timeout", "the backend did not answer in time")
        if isinstance(exc, UpstreamError | ValueError):
            return self._bad_gateway(upstream, exc)
        raise exc

    def _bad_gateway(self, upstream: Upstream, exc: Exception) -> Problem:
        _count(upstream, "bad_gateway", type(exc).__name__)
        upstream.breaker.failure()
        return Problem(502, "bad-gateway", "the backend gave an invalid response")

    async def _relay(
        self, upstream: Upstream, ctx: RequestContext, resp: UpstreamResponse,
        send: Send, extra: list[tuple[bytes, bytes]],
    ) -> Problem | None:
        """Stream the response back; a Problem only when nothing was sent yet."""
        ctx.status_code = resp.status
        upstream_headers = resp.headers
        ctx.response_headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream_headers
        ]
        _cost(ctx, resp, self._cost_header)
        headers = response_fields(upstream_headers, ctx) + extra
        fields = masking.fields_to_mask(ctx)
        if fields and ctx.method != "HEAD" and masking.is_json(_text(resp, b"content-type")):
            return await self._relay_masked(upstream, ctx, resp, send, headers, fields)
        start = {"type": "http.response.start", "status": resp.status, "headers": headers}
        length = resp.content_length
        if ctx.method != "HEAD" and length is not None and 0 < length <= SMALL_BODY:
            # small and of known size: read it before the head, then head and body back to back
            # (one write on the wire), and a broken body is still a clean 502/504, not an abort
            try:
                body = await resp.read()
            except (TimeoutError, UpstreamError) as exc:
                return self._read_failed(upstream, exc)
            finally:
                resp.release()
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return None
        try:
            await send(start)
            if ctx.method != "HEAD":
                while (chunk := await resp.read_chunk()) is not None:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (UpstreamError, TimeoutError) as exc:
            _count(upstream, "stream")
            ctx.error_type = "upstream-stream-error"
            raise ResponseStarted(type(exc).__name__) from exc
        finally:
            resp.release()
        return None

    def _read_failed(self, upstream: Upstream, exc: Exception) -> Problem:
        """Reading a whole (small or masked) body failed before anything was sent."""
        if isinstance(exc, TimeoutError):
            _count(upstream, "timeout")
            upstream.breaker.failure()
            return Problem(504, "gateway-timeout", "the backend did not answer in time")
        return self._bad_gateway(upstream, exc)

    async def _relay_masked(
        self, upstream: Upstream, ctx: RequestContext, resp: UpstreamResponse,
        send: Send, headers: list[tuple[bytes, bytes]], fields: frozenset[str],
    ) -> Problem | None:
        """Policy obligation ``mask_fields``: read the JSON body whole (up to
        POLICY_MASK_MAX_BYTES), mask it, then send it; never stream it unmasked (502 instead)."""
        limit = self.settings.policy_mask_max_bytes
        try:
            if resp.status == 206:
                raise masking.Unmaskable("a partial JSON body (206) cannot be masked")
            if resp.content_length is not None and resp.content_length > limit:
                raise masking.Unmaskable(f"the JSON body exceeds {limit} bytes")
            raw = await masking.read_capped(resp.chunks(), limit)
            encoding = _text(resp, b"content-encoding")
            body = masking.mask_body(masking.decode(raw, encoding, limit), fields,
                                     self.settings.max_json_depth)
        except masking.Unmaskable as exc:
            ctx.error_type = "mask-refused"
            return masking.refused(str(exc))
        except (TimeoutError, UpstreamError) as exc:
            return self._read_failed(upstream, exc)
        finally:
            resp.release()
        out = masking.masked_headers(headers, len(body))
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return None

    async def websocket(
        self, ctx: RequestContext, receive: Receive, send: Send
    ) -> Problem | None:
        """Bridge an accepted-to-be ASGI websocket with the upstream's websocket."""
        upstream = self.upstream(ctx.target_backend)
        if not upstream.breaker.allow():
            return _unavailable(upstream, "circuit open")
        assert upstream.session is not None
        try:
            fields = encoded_header_fields(ctx, self.settings) + await upstream.auth_field()
            headers = text_fields([f for f in fields if f[0].lower() != b"content-length"])
        except (aiohttp.ClientError, TimeoutError):
            upstream.breaker.failure()
            return Problem(503, "upstream-unavailable", "could not obtain a backend identity token")
        except InvalidHeader as exc:
            ctx.error_type = "invalid-header"  # as on the HTTP path
            return Problem(400, "bad-request", f"a header value cannot be forwarded: {exc}")
        protocols = [
            p.strip() for p in ctx.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
        ]
        try:
            ws = await upstream.session.ws_connect(
                upstream.url(ctx.upstream_path, ctx.query_string), headers=headers,
                protocols=protocols, autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            ctx.status_code = exc.status
            return Problem(502, "bad-gateway", f"the backend refused the websocket ({exc.status})")
        except aiohttp.ClientConnectorError:
            upstream.breaker.failure()
            return _unavailable(upstream, "connection failed")
        except (aiohttp.ClientError, TimeoutError):
            upstream.breaker.failure()
            return Problem(504, "gateway-timeout", "the backend did not accept the websocket")
        upstream.breaker.success()
        ctx.status_code = 101
        await send({"type": "websocket.accept", "subprotocol": ws.protocol})
        await _bridge(ws, receive, send)
        return None


async def _bridge(ws: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await ws.close()
                return
            if message.get("text") is not None:
                await ws.send_str(message["text"])
            elif message.get("bytes") is not None:
                await ws.send_bytes(message["bytes"])

    async def upstream_to_client() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
        code = ws.close_code or 1000
        await send({"type": "websocket.close", "code": code if code != 1006 else 1011})

    tasks = [
        asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close()


def _unavailable(upstream: Upstream, why: str) -> Problem:
    retry = upstream.breaker.retry_after() if upstream.breaker.state == "open" else 1
    return Problem(
        503, "upstream-unavailable", f"the backend is unavailable: {why}",
        headers=[("retry-after", str(retry))],
    )


def _count(upstream: Upstream, kind: str, error: str = "") -> None:
    metrics.UPSTREAM_ERRORS.labels(upstream.name, kind).inc()
    events.upstream_failure(upstream.name, kind, error)  # one line per kind per 10 s at most


def _text(resp: UpstreamResponse, name: bytes) -> str | None:
    value = resp.header(name)
    return None if value is None else value.decode("latin-1")


def _cost(ctx: RequestContext, resp: UpstreamResponse, header: bytes) -> None:
    value = resp.header(header)
    if value is None:
        return
    try:
        cost = float(value)
    except ValueError:
        return
    if cost >= 0:
        ctx.upstream_cost_usd = cost
