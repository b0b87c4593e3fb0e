"""Hostile input that must be a 4xx, never a 500: deep JSON, bad Host headers, TRACE/TRACK.

Steps and helpers on contexts built from ASGI scopes; the HTTP path (status, no backend call,
one audit row) is covered end to end in tests/e2e/test_bad_input_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from plant_gateway import json_limits, masking
from plant_gateway.audit.recorder import body_json
from plant_gateway.backends.keys import create as create_keys
from plant_gateway.context import Identity, RequestContext
from plant_gateway.counters import create as create_counters
from plant_gateway.guards import tenant
from plant_gateway.guards.auth import AuthConfig, AuthStep
from plant_gateway.pipeline import ingress
from plant_gateway.settings import Settings, TenantRule
from tests.unit.auth_support import SECRET, context
from tests.unit.auth_support import settings as auth_settings

SETTINGS = Settings(plant_backend_url="http://backend:9000", guards=["tenant"])
DEEP_ARRAY = b"[" * 2000 + b"]" * 2000
DEEP_OBJECT = b'{"a":' * 2000 + b"1" + b"}" * 2000


def ctx_for(headers: list[tuple[bytes, bytes]], method: str = "GET", version: str = "1.1",
            path: str = "/api/v1/x") -> RequestContext:
    scope = {"type": "http", "http_version": version, "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": headers,
             "client": ("10.0.0.9", 5555), "scheme": "http"}
    return ingress.context_from_scope(scope, SETTINGS)


# --- JSON nesting ------------------------------------------------------------------------------

@pytest.mark.parametrize(("doc", "limit", "deep"), [
    (b"[]", 1, False), (b"[[]]", 1, True), (b'{"a":{"b":[1]}}', 3, False),
    (b'{"a":{"b":[1]}}', 2, True), (b'["[[[[", "{{{{"]', 1, False),
    (b'{"k\\"[[[": [["x"]]}', 3, False), (b'{"k\\"[[[": [["x"]]}', 2, True),
    (b'"just a string"', 1, False), (DEEP_ARRAY, 64, True), (DEEP_OBJECT, 64, True),
])
def test_depth_is_counted_outside_strings(doc: bytes, limit: int, deep: bool) -> None:
    assert json_limits.too_deep(doc, limit) is deep


@pytest.mark.parametrize("body", [DEEP_ARRAY, DEEP_OBJECT, b'{"x":' + DEEP_ARRAY + b"}"])
async def test_deep_body_on_a_tenant_bound_route_is_a_400_not_a_recursion_error(
    body: bytes
) -> None:
    rule = TenantRule(path="/api/v1/payments*", location="body", methods=["POST"])
    step = tenant.TenantStep([rule], max_json_depth=64)
    ctx = ctx_for([(b"host", b"gw")], method="POST", path="/api/v1/payments")
    ctx.identity = Identity(user_id="u", customer_id="cust-A")
    ctx.body = body
    problem = await step.run(ctx)
    assert problem is not None and (problem.status, problem.kind) == (400, "bad-request")
    assert "deeper than 64 levels" in problem.detail
    assert ctx.error_type == "invalid-body"


async def test_body_within_the_limit_is_still_bound() -> None:
    rule = TenantRule(path="/api/v1/payments*", location="body", methods=["POST"])
    step = tenant.TenantStep([rule], max_json_depth=4)
    ctx = ctx_for([(b"host", b"gw")], method="POST", path="/api/v1/payments")
    ctx.identity = Identity(user_id="u", customer_id="cust-A")
    ctx.body = b'{"customer_id": "x", "n": 12345678901234567890, "a": [[[1]]]}'
    assert await step.run(ctx) is None
    assert json.loads(ctx.body) == {
        "customer_id": "cust-A", "n": 12345678901234567890, "a": [[[1]]]}


def test_audit_notes_a_deep_body_instead_of_parsing_it() -> None:
    # a long integer sends the audit parser down json.loads, which recursed past the limit
    body = b'{"n": 12345678901234567890, "x": ' + DEEP_ARRAY + b"}"
    assert body_json(body, 1 << 20, (), 64) == {"_omitted": "too_deep", "_size": len(body)}
    assert body_json(b'{"pw": "x", "a": [[1]]}', 1 << 20, (), 64) == {"pw": "***", "a": [[1]]}


def test_a_deep_backend_answer_is_refused_not_masked_into_a_500() -> None:
    with pytest.raises(masking.Unmaskable, match="deeper than 64"):
        masking.mask_body(b'{"email": "a", "x": ' + b"[" * 900 + b"]" * 900 + b"}",
                          frozenset({"email"}), 64)
    assert masking.mask_body(b'{"email": "a"}', frozenset({"email"}), 64) == b'{"email":"***"}'


# --- Host --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "version", "detail"), [
    ([], "1.1", "the Host header is required"),
    ([(b"host", b"")], "1.1", "the Host header is empty"),
    ([(b"host", b"")], "1.0", "the Host header is empty"),
    ([(b"host", b"a b")], "1.1", "spaces or control characters in the Host header"),
    ([(b"host", b"a\tb")], "1.1", "spaces or control characters in the Host header"),
    ([(b"host", b"a\x01b")], "1.1", "spaces or control characters in the Host header"),
    ([(b"host", b"a:99999")], "1.1", "invalid port in the Host header"),
    ([(b"host", b"a:0")], "1.1", "invalid port in the Host header"),
    ([(b"host", b"a:")], "1.1", "invalid port in the Host header"),
    ([(b"host", b"a:80x")], "1.1", "the Host header is not a host name or address"),
    ([(b"host", b"a/b")], "1.1", "the Host header is not a host name or address"),
    ([(b"host", b"user@a")], "1.1", "the Host header is not a host name or address"),
    ([(b"host", b"[::1")], "1.1", "the Host header is not a host name or address"),
    ([(b"host", b"[zz::1]")], "1.1", "the Host header is not a host name or address"),
    ([(b"host", b"a" * 300)], "1.1", "the Host header is too long"),
])
async def test_bad_host_is_a_400(
    headers: list[tuple[bytes, bytes]], version: str, detail: str
) -> None:
    ctx = ctx_for(headers, version=version)
    problem = await ingress.IngressStep(SETTINGS.max_body_bytes).run(ctx)
    assert problem is not None and (problem.status, problem.detail) == (400, detail)
    assert ctx.error_type == "invalid-host"


@pytest.mark.parametrize(("headers", "version"), [
    ([], "1.0"), ([(b"host", b"api.waooaw.com")], "1.1"), ([(b"host", b"127.0.0.1:8000")], "1.1"),
    ([(b"host", b"[::1]:443")], "1.1"), ([(b"host", b"[2001:db8::7]")], "1.1"),
    ([(b"host", b"Plant-GW.example_internal:65535")], "1.1"),
])
async def test_good_host_passes(headers: list[tuple[bytes, bytes]], version: str) -> None:
    ctx = ctx_for(headers, version=version)
    assert await ingress.IngressStep(SETTINGS.max_body_bytes).run(ctx) is None


# --- methods -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["TRACE", "TRACK", "CONNECT"])
async def test_trace_track_connect_are_405_with_allow(method: str) -> None:
    ctx = ctx_for([(b"host", b"gw")], method=method)
    problem = await ingress.IngressStep(SETTINGS.max_body_bytes).run(ctx)
    assert problem is not None and (problem.status, problem.kind) == (405, "method-not-allowed")
    allow = dict(problem.headers)["allow"]
    assert "GET" in allow and "TRACE" not in allow and "TRACK" not in allow


# --- tokens ------------------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def deep_token(where: str) -> str:
    """A token whose header, or whose correctly signed payload, is a 2,000-deep JSON array."""
    head = DEEP_ARRAY if where == "header" else b'{"alg":"HS256","typ":"JWT"}'
    body = DEEP_ARRAY if where == "payload" else b"{}"
    signing_input = f"{_b64(head)}.{_b64(body)}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.mark.parametrize("where", ["header", "payload"])
async def test_deeply_nested_token_is_a_401_not_a_500(where: str) -> None:
    """PyJWT turns its json.loads RecursionError into DecodeError (since 2.x): keep it so."""
    cfg = auth_settings()
    step = AuthStep(AuthConfig.from_settings(cfg), create_keys(cfg), create_counters(cfg))
    problem = await step.run(context(deep_token(where)))
    assert problem is not None and (problem.status, problem.kind) == (401, "invalid-token-format")
