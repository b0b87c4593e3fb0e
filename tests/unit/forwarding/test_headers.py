"""Header hygiene of forwarding (plant_gateway.forwarding.headers): what goes up, what comes back.

Pure functions on a RequestContext built from an ASGI scope; no network.
"""

from __future__ import annotations

import pytest

from plant_gateway.context import Identity, RequestContext
from plant_gateway.forwarding.client import InvalidHeader
from plant_gateway.forwarding.headers import (
    downstream_response_headers,
    response_fields,
    text_fields,
    upstream_request_headers,
)
from plant_gateway.pipeline import ingress
from plant_gateway.settings import Settings

SETTINGS = Settings(plant_backend_url="http://backend:9000", trusted_proxy_hops=1)


def ctx_for(headers: list[tuple[bytes, bytes]]) -> RequestContext:
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/api/v1/x",
             "raw_path": b"/api/v1/x", "query_string": b"",
             "headers": [(b"host", b"gateway.test"), *headers],
             "client": ("10.0.0.9", 5555), "scheme": "http"}
    return ingress.context_from_scope(scope, SETTINGS)


def test_upstream_headers_strip_spoofing_and_hop_by_hop() -> None:
    raw = [(b"authorization", b"Bearer t"), (b"x-gateway", b"evil"), (b"x-gateway-type", b"PP"),
           (b"x-user-id", b"attacker"), (b"x-customer-id", b"c"), (b"x-debug-trace", b"1"),
           (b"x-original-authorization", b"Bearer stolen"), (b"connection", b"keep-alive, x-drop"),
           (b"x-drop", b"1"), (b"keep-alive", b"5"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
           (b"proxy-authorization", b"p"), (b"x-keep", b"yes"), (b"x-forwarded-for", b"6.6.6.6")]
    ctx = ctx_for(headers=raw)
    ctx.identity = Identity(user_id="u1", customer_id="cust-A", roles=["viewer", "analyst"])
    out = upstream_request_headers(ctx, SETTINGS)
    names = [k.lower() for k, _ in out]
    values = dict((k.lower(), v) for k, v in out)
    for gone in ("authorization", "x-debug-trace", "connection", "x-drop", "keep-alive", "te",
                 "upgrade", "proxy-authorization"):
        assert gone not in names
    assert names.count("x-gateway") == 1 and values["x-gateway"] == "plant-gateway"
    assert values["x-original-authorization"] == "Bearer t"
    assert values["x-user-id"] == "u1" and values["x-customer-id"] == "cust-A"
    assert values["x-user-roles"] == "viewer,analyst" and values["x-keep"] == "yes"
    assert values["x-forwarded-for"] == "6.6.6.6"  # one trusted hop: the proxy's view of the client
    assert values["x-correlation-id"] == ctx.correlation_id


def test_downstream_headers_drop_hop_by_hop_cors_and_debug() -> None:
    ctx = ctx_for([])
    out = dict(downstream_response_headers(
        [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked"), ("Connection", "close"),
         ("Access-Control-Allow-Origin", "*"), ("X-Debug-Internal-Url", "http://10.0.0.1"),
         ("X-Correlation-ID", "other")], ctx))
    assert out[b"content-encoding"] == b"gzip"
    assert b"transfer-encoding" not in out and b"connection" not in out
    assert b"access-control-allow-origin" not in out and b"x-debug-internal-url" not in out
    assert b"x-correlation-id" not in out and out[b"x-target-backend"] == b"production"


def test_response_headers_listed_in_connection_are_dropped() -> None:
    out = response_fields(
        [(b"connection", b"close, x-hop"), (b"x-hop", b"1"), (b"x-kept", b"2")], ctx_for([]))
    names = [name for name, _ in out]
    assert b"x-hop" not in names and b"connection" not in names and b"x-kept" in names


def test_text_fields_keep_utf8_and_refuse_what_cannot_be_sent_as_is() -> None:
    assert text_fields([(b"x-name", "Jos\u00e9".encode())]) == [("x-name", "Jos\u00e9")]
    with pytest.raises(InvalidHeader):
        text_fields([(b"x-name", b"\xff")])  # not UTF-8: aiohttp would send other bytes
    with pytest.raises(InvalidHeader):
        text_fields([(b"x-name", b"a\rb")])
