"""Header hygiene of forwarding: what goes upstream, what comes back, the request head.

Client headers the gateway owns or that are hop-by-hop never reach the backend; the backend's
hop-by-hop, CORS and id headers never reach the client.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from plant_gateway.forwarding.client import InvalidHeader, check_head
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.settings import Settings

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
_DROP_B = frozenset(name.encode() for name in _DROP)
_DROP_PREFIXES_B = tuple(prefix.encode() for prefix in _DROP_PREFIXES)
_DROP_PREFIXES_WS_B = tuple(prefix.encode() for prefix in _DROP_PREFIXES_WS)
_RESPONSE_DROP_B = frozenset(name.encode() for name in _RESPONSE_DROP)
_RESPONSE_DROP_PREFIXES_B = tuple(prefix.encode() for prefix in _RESPONSE_DROP_PREFIXES)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})  # list no other header: nothing to drop
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what aiohttp refuses in a header (not tab)


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
