"""Ingress: turn an ASGI scope into a RequestContext and refuse bad framing before any work.

Request/correlation/causation ids, W3C ``traceparent``, client IP through trusted proxy hops,
body limit (413) and duplicated or conflicting framing headers (400).
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from plant_gateway.context import RequestContext
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

MAX_HEADER_VALUE = 8192
SINGLE_HEADERS = (b"content-length", b"host", b"transfer-encoding")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_uuid(value: str | None) -> str | None:
    """The canonical form of a UUID, or None when ``value`` is not one."""
    if not value or len(value) > 64:
        return None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        return None


def new_traceparent(trace_id: str | None = None, flags: str = "01") -> str:
    return f"00-{trace_id or secrets.token_hex(16)}-{secrets.token_hex(8)}-{flags}"


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


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        text = value.decode("latin-1")
        out[name] = f"{out[name]}, {text}" if name in out else text
    return out


def context_from_scope(scope: MutableMapping[str, Any], settings: Settings) -> RequestContext:
    """Build the request's context from an ASGI http or websocket scope (never raises)."""
    raw = list(scope.get("headers") or [])
    headers = _headers(raw)
    peer = (scope.get("client") or ("0.0.0.0", 0))[0]
    forwarded_for = headers.get("x-forwarded-for")
    scheme = scope.get("scheme", "http")
    if settings.trusted_proxy_hops > 0 and headers.get("x-forwarded-proto"):
        scheme = headers["x-forwarded-proto"].split(",")[-1].strip() or scheme
    is_ws = scope["type"] == "websocket"
    ctx = RequestContext(
        request_id=str(uuid.uuid4()),
        correlation_id=parse_uuid(headers.get("x-correlation-id")) or str(uuid.uuid4()),
        method="GET" if is_ws else scope["method"],
        path=scope["path"],
        query_string=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        client_ip=client_ip(peer, forwarded_for, settings.trusted_proxy_hops),
        scheme=scheme,
        host=headers.get("host", ""),
        causation_id=parse_uuid(headers.get("x-causation-id"))
        or parse_uuid(headers.get("x-request-id")),
        traceparent=propagate_traceparent(headers.get("traceparent")),
        tracestate=headers.get("tracestate"),
        raw_headers=raw,
        is_websocket=is_ws,
    )
    ctx.upstream_path = ctx.path
    ctx.authorization = headers.get("authorization")
    ctx.scratch["raw_path"] = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    ctx.scratch["peer_ip"] = peer
    return ctx


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


class BodySource:
    """The request body, read once from ASGI ``receive``: streamed, or buffered on demand."""

    def __init__(self, receive: Receive, max_bytes: int, has_body: bool) -> None:
        self._receive = receive
        self.max_bytes = max_bytes
        self.has_body = has_body
        self.received = 0
        self.disconnected = False

    async def chunks(self) -> Any:
        """Yield body chunks as they arrive; raise BodyTooLarge past the limit."""
        if not self.has_body:
            return
        more = True
        while more:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise ConnectionResetError("client disconnected while sending the body")
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            self.received += len(chunk)
            if self.received > self.max_bytes:
                raise BodyTooLarge()
            if chunk:
                yield chunk
        self.has_body = False

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


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
    return ctx.body


class IngressStep:
    name = "ingress"

    def __init__(self, settings: Settings) -> None:
        self.max_body = settings.max_body_bytes

    async def run(self, ctx: RequestContext) -> Problem | None:
        return framing_problem(ctx, self.max_body)


def build(settings: Settings, deps: Dependencies) -> IngressStep:
    return IngressStep(settings)
