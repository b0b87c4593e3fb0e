"""Ingress: turn an ASGI scope into a RequestContext and refuse bad framing before any work.

Request/correlation/causation ids, W3C ``traceparent``, client IP through trusted proxy hops,
body limit (413), duplicated or conflicting framing headers and a bad ``Host`` (400), and the
methods that only echo or tunnel (``TRACE``, ``TRACK``, ``CONNECT``: 405). First of all, a
request whose audit row could not be secured is refused (503 ``audit-unavailable``, see
``audit/sink.py``): one attribute read while the audit sink is healthy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from plant_gateway.context import RequestContext
from plant_gateway.problems import Problem, audit_unavailable

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

MAX_HEADER_VALUE = 8192
SINGLE_HEADERS = (b"content-length", b"host", b"transfer-encoding")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_POOL_SIZE = 4096
# TRACE/TRACK echo the request (headers with cookies and tokens included: cross-site tracing);
# CONNECT would make the gateway a tunnel. None is forwarded.
REFUSED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Host = uri-host [":" port] (RFC 9110 §7.2): a DNS name or IPv4 address, or an IPv6 literal
# in brackets. Percent-encoded and sub-delim characters, legal in a reg-name, name no real host.
_HOST = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._~-]+))(?::([0-9]*))?")
_BLANK_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
MAX_HOST = 261  # a 253-character DNS name and ":65535", or a bracketed IPv6 address and port


class _RandomPool:
    """os.urandom bytes fetched 4 KiB at a time (one syscall per ~100 requests), each used once.

    Ids are not secrets, but they stay CSPRNG bytes; the pool is dropped in a forked child.
    """

    __slots__ = ("data", "pos")

    def __init__(self) -> None:
        self.data, self.pos = b"", 0

    def reset(self) -> None:
        self.data, self.pos = b"", 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        if pos + n > len(self.data):
            self.data, pos = os.urandom(_POOL_SIZE), 0
        self.pos = pos + n
        return self.data[pos : pos + n]


_POOL = _RandomPool()
os.register_at_fork(after_in_child=_POOL.reset)
_urandom = _POOL.take
# version nibble 4 and RFC 4122 variant bits of a 128-bit integer (what uuid.uuid4() sets)
_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_uuid4() -> str:
    """A random UUID v4 in canonical form: uuid.uuid4() without building a UUID object."""
    h = "%032x" % (int.from_bytes(_urandom(16)) & _V4_CLEAR | _V4_SET)  # noqa: UP031 - fastest
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_uuid(value: str | None) -> str | None:
    """The canonical form of a UUID, or None when ``value`` is not one."""
    if not value or len(value) > 64:
        return None
    if len(value) == 36 and _CANONICAL_UUID.fullmatch(value):
        return value  # already canonical (the common case): no UUID object needed
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        return None


def new_traceparent(trace_id: str | None = None, flags: str = "01") -> str:
    if trace_id is None:
        ids = _urandom(24).hex()
        return f"00-{ids[:32]}-{ids[32:]}-{flags}"
    return f"00-{trace_id}-{_urandom(8).hex()}-{flags}"


def propagate_traceparent(value: str | None) -> str:
    """Keep a valid caller trace id (new span id for our hop); mint a fresh trace otherwise."""
    match = _TRACEPARENT.match(value.strip().lower()) if value else None
    if match:
        version, trace_id, parent_id, flags, rest = match.groups()
        valid = (
            version != "ff"
            and (version != "00" or rest is None)
            and trace_id != "0" * 32
            and parent_id != "0" * 16
        )
        if valid:
            return new_traceparent(trace_id, flags)
    return new_traceparent()


def client_ip(peer: str, forwarded_for: str | None, trusted_hops: int) -> str:
    """The client address: with N trusted proxies, the N-th X-Forwarded-For entry from the right.

    The leftmost entries are whatever the client sent, so they are never trusted beyond that.
    """
    if trusted_hops <= 0 or not forwarded_for:
        return peer
    entries = [e.strip() for e in forwarded_for.split(",") if e.strip()]
    if len(entries) < trusted_hops:
        return peer
    return entries[-trusted_hops]


RUN_APP_SUFFIX = ".run.app"


def trusted_hops(settings: Settings, host: str) -> int:
    """How many X-Forwarded-For entries, counted from the right, were added by our own proxies.

    ``TRUSTED_PROXY_HOPS`` decides when set. Left unset on Cloud Run (``K_SERVICE``), the
    request came either through Google's external load balancer, which appends the client and
    then its own address (2), or straight to the service's ``*.run.app`` URL, where Cloud Run's
    front end appends only the client (1). Cloud Run routes by host, so a ``run.app`` host is
    the only way to arrive directly; through the load balancer a client naming such a host
    gets the load balancer's address, never one it chose.
    """
    hops = settings.trusted_proxy_hops
    if hops is not None:
        return hops
    if settings.cloud_run_service is None:
        return 0
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return 1 if name.lower().endswith(RUN_APP_SUFFIX) else 2


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        text = value.decode("latin-1")
        if name in out:
            out[name] = f"{out[name]}, {text}"
        else:
            out[name] = text
    return out


def context_from_scope(scope: MutableMapping[str, Any], settings: Settings) -> RequestContext:
    """Build the request's context from an ASGI http or websocket scope (never raises)."""
    raw = list(scope.get("headers") or ())
    headers = _headers(raw)
    get = headers.get
    peer = (scope.get("client") or ("0.0.0.0", 0))[0]
    hops = trusted_hops(settings, get("host", ""))
    scheme = scope.get("scheme", "http")
    if hops > 0 and get("x-forwarded-proto"):
        scheme = headers["x-forwarded-proto"].split(",")[-1].strip() or scheme
    is_ws = scope["type"] == "websocket"
    path = scope["path"]
    cid = get("x-correlation-id")
    causation = get("x-causation-id")
    if causation is not None:
        causation = parse_uuid(causation)
    if causation is None and "x-request-id" in headers:
        causation = parse_uuid(headers["x-request-id"])
    ctx = RequestContext(
        request_id=new_uuid4(),
        correlation_id=(parse_uuid(cid) if cid else None) or new_uuid4(),
        method="GET" if is_ws else scope["method"],
        path=path,
        query_string=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        client_ip=client_ip(peer, get("x-forwarded-for"), hops) if hops > 0 else peer,
        scheme=scheme,
        host=get("host", ""),
        causation_id=causation,
        traceparent=propagate_traceparent(get("traceparent")),
        tracestate=get("tracestate"),
        raw_headers=raw,
        is_websocket=is_ws,
        http_version=scope.get("http_version", "1.1"),
    )
    ctx.upstream_path = path
    ctx.authorization = get("authorization")
    raw_path = scope.get("raw_path")
    ctx.scratch["raw_path"] = raw_path.decode("latin-1") if raw_path else path
    ctx.scratch["peer_ip"] = peer
    return ctx


def method_problem(method: str) -> Problem | None:
    """405 (with ``Allow``) for the methods the gateway never forwards."""
    if method not in REFUSED_METHODS:
        return None
    return Problem(405, "method-not-allowed", f"the gateway does not accept {method} requests",
                   headers=[("allow", ALLOWED_METHODS)])


def host_problem(host: str | None, http_version: str) -> str | None:
    """Why a ``Host`` header is refused (RFC 9112 §3.2), or None."""
    if host is None:
        return "the Host header is required" if http_version == "1.1" else None
    if not host:
        return "the Host header is empty"
    if len(host) > MAX_HOST:
        return "the Host header is too long"
    return _host_value_problem(host)


@lru_cache(maxsize=1024)  # a gateway sees few distinct hosts; MAX_HOST bounds the memo's size
def _host_value_problem(host: str) -> str | None:
    if _BLANK_OR_CONTROL.search(host):
        return "spaces or control characters in the Host header"
    match = _HOST.fullmatch(host)
    if match is None:
        return "the Host header is not a host name or address"
    ipv6, _, port = match.groups()
    if ipv6 is not None and not _is_ipv6(ipv6):
        return "the Host header is not a host name or address"
    if port is not None and not (port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535):
        return "invalid port in the Host header"
    return None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def framing_problem(ctx: RequestContext, max_body: int) -> Problem | None:
    """400 for duplicated/conflicting framing or oversized headers, 413 for a declared big body."""
    counts: dict[bytes, int] = {}
    for key, value in ctx.raw_headers:
        name = key.lower()
        if name in SINGLE_HEADERS:
            counts[name] = counts.get(name, 0) + 1
        if len(value) > MAX_HEADER_VALUE:
            return Problem(400, "bad-request", f"header {name.decode('latin-1')!r} is too large")
    for name, count in counts.items():
        if count > 1:
            return Problem(400, "bad-request", f"duplicated {name.decode()} header")
    reason = host_problem(ctx.headers.get("host"), ctx.http_version)
    if reason is not None:
        ctx.error_type = "invalid-host"  # like "invalid-header": a 400 whose cause is audited
        return Problem(400, "bad-request", reason)
    cl = ctx.headers.get("content-length")
    te = ctx.headers.get("transfer-encoding")
    if cl is not None and te is not None:
        return Problem(400, "bad-request", "both Content-Length and Transfer-Encoding are set")
    if te is not None and te.strip().lower() != "chunked":
        return Problem(400, "bad-request", "unsupported Transfer-Encoding")
    if cl is not None:
        if not cl.strip().isdigit():
            return Problem(400, "bad-request", "invalid Content-Length")
        ctx.content_length = int(cl)
        if ctx.content_length > max_body:
            return too_large(max_body)
    return None


def too_large(max_body: int) -> Problem:
    return Problem(
        413, "payload-too-large", f"request body exceeds {max_body} bytes",
        extra={"max_body_bytes": max_body},
    )


class BodyTooLarge(Exception):
    """The streamed request body went over the limit."""


class BodyTimeout(Exception):
    """The client took longer than the body timeout to send its body (not a TimeoutError: an
    upstream timeout is the backend's fault, this one the client's)."""


def body_timeout(seconds: float) -> Problem:
    """408; the connection is closed after it (the rest of the body may still be coming)."""
    return Problem(
        408, "request-timeout", f"the request body did not arrive within {seconds:g} s",
        headers=[("connection", "close")],
    )


class BodySource:
    """The request body, read once from ASGI ``receive``: streamed, or buffered on demand.

    ``timeout``: the seconds the body may keep the gateway waiting in all (BodyTimeout past
    them); time spent elsewhere (a slow backend reading it) is not the client's and not
    counted. ``ready``: true when the server already holds the next message (no timer then).
    """

    def __init__(
        self, receive: Receive, max_bytes: int, has_body: bool, sample_cap: int = 0,
        timeout: float | None = None, ready: Callable[[], bool] | None = None,
    ) -> None:
        self._receive = receive
        self.max_bytes = max_bytes
        self.has_body = has_body
        self.received = 0
        self.disconnected = False
        self.timeout = timeout
        self.timeout_left = timeout
        self.timed_out = False
        self._ready = ready
        # the first ``sample_cap`` bytes, kept for the audit row (None once the body is bigger)
        self.sample_cap = sample_cap
        self.sample: bytearray | None = bytearray() if sample_cap > 0 else None

    async def chunks(self) -> Any:
        """Yield body chunks as they arrive; raise BodyTooLarge past the limit."""
        while self.has_body:
            chunk = self._take(await self._next())
            if chunk:
                yield chunk

    async def read(self) -> bytes:
        """The whole body (a loop, not ``chunks()``: no async generator on the hot path)."""
        parts = []
        while self.has_body:
            parts.append(self._take(await self._next()))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _take(self, message: MutableMapping[str, Any]) -> bytes:
        """One ``http.request`` message's bytes, counted; the last one ends ``has_body``."""
        if message["type"] == "http.disconnect":
            self.disconnected = True
            raise ConnectionResetError("client disconnected while sending the body")
        chunk: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            self.has_body = False
        self.received += len(chunk)
        if self.sample is not None:
            if self.received <= self.sample_cap:
                self.sample += chunk
            else:
                self.sample = None
        if self.received > self.max_bytes:
            raise BodyTooLarge()
        return chunk

    def _next(self) -> Awaitable[MutableMapping[str, Any]]:
        """``receive()``; bounded by what is left of the body timeout when it has to wait (a
        plain function: the common case adds no coroutine of its own)."""
        ready = self._ready
        if self.timeout_left is None or (ready is not None and ready()):
            return self._receive()
        return self._timed_receive()

    async def _timed_receive(self) -> MutableMapping[str, Any]:
        left = self.timeout_left or 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                return await self._receive()
        except TimeoutError:
            self.timed_out = True
            raise BodyTimeout() from None
        finally:
            self.timeout_left = left - (loop.time() - started)


async def read_body(ctx: RequestContext) -> bytes | Problem:
    """For steps that must see the body (tenant binding): buffer it once into ``ctx.body``."""
    if ctx.body is not None:
        return ctx.body
    source: BodySource | None = ctx.scratch.get("body_source")
    if source is None:
        ctx.body = b""
        return ctx.body
    try:
        ctx.body = await source.read()
    except BodyTooLarge:
        return too_large(source.max_bytes)
    except BodyTimeout:
        return body_timeout(source.timeout or 0.0)
    except ConnectionResetError:  # the client went away while sending it
        return client_gone(ctx)
    return ctx.body


class _NoAuditSink:
    refusing = False


def client_gone(ctx: RequestContext) -> Problem:
    """The client went away before its answer: nothing can be sent; the audit row says 499."""
    ctx.error_type = "client-disconnected"
    return Problem(499, "client-disconnected", "the client closed the connection")


class IngressStep:
    name = "ingress"

    def __init__(self, settings: Settings, audit: Any = None) -> None:
        self.max_body = settings.max_body_bytes
        # anything with a ``refusing`` flag (the audit sink); without one, never refused
        self.audit = audit if hasattr(audit, "refusing") else _NoAuditSink()

    async def run(self, ctx: RequestContext) -> Problem | None:
        if self.audit.refusing:  # no request without its row (AUDIT_ON_LOSS=refuse)
            return audit_unavailable()
        return method_problem(ctx.method) or framing_problem(ctx, self.max_body)


def build(settings: Settings, deps: Dependencies) -> IngressStep:
    return IngressStep(settings, deps.audit_sink)
