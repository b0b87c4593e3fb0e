"""Unit tests for the core steps: ingress, routes, tenant binding.

Pure functions and steps on a RequestContext built from an ASGI scope; no network.
"""

from __future__ import annotations

import json

import pytest

from plant_gateway import routing
from plant_gateway.backends.flags import DefaultFlags
from plant_gateway.context import Identity
from plant_gateway.counters import create as create_counters
from plant_gateway.deps import Dependencies
from plant_gateway.forwarding.headers import upstream_request_headers
from plant_gateway.guards import tenant
from plant_gateway.pipeline import ingress, routes
from plant_gateway.problems import Problem
from plant_gateway.settings import Settings, TenantRule

SETTINGS = Settings(plant_backend_url="http://backend:9000", guards=["tenant"],
                    cp_registration_key="k" * 20, trusted_proxy_hops=1)


def scope(path: str = "/api/v1/x", headers: list[tuple[bytes, bytes]] | None = None,
          method: str = "GET", raw_path: bytes | None = None, qs: bytes = b"") -> dict:
    headers = headers or []
    if not any(name == b"host" for name, _ in headers):  # as every HTTP/1.1 client sends it
        headers = [(b"host", b"gateway.test"), *headers]
    return {"type": "http", "http_version": "1.1", "method": method, "path": path,
            "raw_path": raw_path or path.encode(), "query_string": qs, "headers": headers,
            "client": ("10.0.0.9", 5555), "scheme": "http"}


def ctx_for(**kwargs):
    return ingress.context_from_scope(scope(**kwargs), SETTINGS)


# --- ingress ---------------------------------------------------------------------------------

def test_correlation_id_valid_uuid_kept_else_minted() -> None:
    cid = "3F2B8C1E-8A4E-4A8E-9C1D-1F2E3D4C5B6A"
    assert ctx_for(headers=[(b"x-correlation-id", cid.encode())]).correlation_id == cid.lower()
    minted = ctx_for(headers=[(b"x-correlation-id", b"not-a-uuid")]).correlation_id
    assert minted != "not-a-uuid" and ingress.parse_uuid(minted) == minted


def test_causation_from_causation_or_request_id() -> None:
    a, b = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
    assert ctx_for(headers=[(b"x-request-id", b.encode())]).causation_id == b
    both = [(b"x-causation-id", a.encode()), (b"x-request-id", b.encode())]
    assert ctx_for(headers=both).causation_id == a
    assert ctx_for(headers=[(b"x-causation-id", b"junk")]).causation_id is None


@pytest.mark.parametrize("bad", [None, "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
                                 "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])
def test_traceparent_invalid_gets_a_fresh_trace(bad: str | None) -> None:
    out = ingress.propagate_traceparent(bad)
    assert ingress._TRACEPARENT.match(out) and "0" * 32 not in out


def test_traceparent_valid_keeps_trace_id_new_span() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    out = ingress.propagate_traceparent(tp)
    assert out.startswith("00-0af7651916cd43dd8448eb211c80319c-") and out.endswith("-01")
    assert "b7ad6b7169203331" not in out


ON_CLOUD_RUN = Settings(plant_backend_url="http://backend:9000", K_SERVICE="plant-gateway")


@pytest.mark.parametrize(
    ("host", "forwarded_for", "client"),
    [
        # through Google's load balancer: "<client-sent>, <client>, <load balancer>"
        ("api.waooaw.com", "6.6.6.6, 203.0.113.7, 34.1.2.3", "203.0.113.7"),
        ("api.waooaw.com", "203.0.113.7, 34.1.2.3", "203.0.113.7"),
        # straight to the run.app URL: Cloud Run's front end appends only the client
        ("gw-abc-uc.a.run.app", "6.6.6.6, 203.0.113.7", "203.0.113.7"),
        ("GW-ABC-UC.A.RUN.APP:443", "203.0.113.7", "203.0.113.7"),
        # fewer entries than Google adds: not from Google's front end, the peer it is
        ("api.waooaw.com", "6.6.6.6", "10.0.0.9"),
    ],
)
def test_client_ip_on_cloud_run_by_default(host: str, forwarded_for: str, client: str) -> None:
    headers = [(b"host", host.encode()), (b"x-forwarded-for", forwarded_for.encode())]
    ctx = ingress.context_from_scope(scope(headers=headers), ON_CLOUD_RUN)
    assert ctx.client_ip == client


def test_client_ip_off_cloud_run_is_the_peer_unless_hops_are_configured() -> None:
    headers = [(b"host", b"api.waooaw.com"), (b"x-forwarded-for", b"6.6.6.6, 203.0.113.7")]
    plain = Settings(plant_backend_url="http://backend:9000")
    assert ingress.context_from_scope(scope(headers=headers), plain).client_ip == "10.0.0.9"
    pinned = Settings(plant_backend_url="http://b:9000", K_SERVICE="gw", TRUSTED_PROXY_HOPS=0)
    assert ingress.context_from_scope(scope(headers=headers), pinned).client_ip == "10.0.0.9"


def test_client_ip_never_the_spoofable_first_entry() -> None:
    assert ingress.client_ip("10.0.0.1", "6.6.6.6, 1.2.3.4", 1) == "1.2.3.4"
    assert ingress.client_ip("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", 2) == "1.2.3.4"
    assert ingress.client_ip("10.0.0.1", "6.6.6.6", 0) == "10.0.0.1"
    assert ingress.client_ip("10.0.0.1", "1.2.3.4", 2) == "10.0.0.1"  # fewer entries than hops


@pytest.mark.parametrize(
    ("headers", "status"),
    [([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], 400),
     ([(b"content-length", b"3"), (b"content-length", b"3")], 400),
     ([(b"host", b"a"), (b"host", b"b")], 400),
     ([(b"transfer-encoding", b"gzip")], 400),
     ([(b"content-length", b"-1")], 400),
     ([(b"x-big", b"v" * 9000)], 400),
     ([(b"content-length", str(SETTINGS.max_body_bytes + 1).encode())], 413),
     ([(b"content-length", b"10")], None)],
)
async def test_ingress_framing(headers, status) -> None:
    problem = await ingress.IngressStep(SETTINGS.max_body_bytes).run(ctx_for(headers=headers))
    assert (problem.status if problem else None) == status


async def test_body_source_enforces_limit_while_streaming() -> None:
    messages = [{"type": "http.request", "body": b"a" * 6, "more_body": True},
                {"type": "http.request", "body": b"a" * 6, "more_body": False}]

    async def receive():
        return messages.pop(0)

    with pytest.raises(ingress.BodyTooLarge):
        await ingress.BodySource(receive, 10, True).read()


# --- routes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [("/api/v1/auth/login", "/api/v1/auth/login", True),
     ("/api/v1/auth/login", "/api/v1/auth/login/x", False),
     ("/api/v1/auth/login", "/x/api/v1/auth/login", False),
     ("/docs", "/api/v1/agents/docs", False),
     ("/api/v1/auth/otp/*", "/api/v1/auth/otp/send", True),
     ("/api/v1/auth/otp/*", "/api/v1/auth/otp", True),
     ("/api/v1/auth/otp/*", "/api/v1/auth/otpx", False),
     ("/api/v1/otp/sessions*", "/api/v1/otp/sessions/1", True)],
)
def test_match_route_exact_or_anchored_prefix_never_suffix(pattern, path, expected) -> None:
    assert routing.match_route(pattern, path) is expected


@pytest.mark.parametrize(
    ("path", "raw"),
    [("/a/../b", "/a/../b"), ("/a/../b", "/a/%2e%2e/b"), ("/a/b", "/a%2Fb"), ("/a\x00", "/a%00"),
     ("/a//b", "/a//b"), ("/a/./b", "/a/./b"), ("/a\\b", "/a%5cb"), ("a", "a"),
     ("/a/%2e%2e", "/a/%252e%252e")],
)
def test_hostile_paths(path: str, raw: str) -> None:
    assert routes.hostile_path(path, raw) is not None


def test_normal_path_is_fine() -> None:
    assert routes.hostile_path("/api/v1/a b", "/api/v1/a%20b") is None


async def test_routes_step_public_rewrite_and_brute_force() -> None:
    step = routes.RoutesStep(SETTINGS)
    ctx = ctx_for(path="/auth/google/verify")
    assert await step.run(ctx) is None
    assert ctx.upstream_path == "/api/v1/auth/google/verify" and ctx.is_public
    ctx = ctx_for(path="/api/v1/auth/login")
    await step.run(ctx)
    assert ctx.brute_force_route and ctx.is_public
    ctx = ctx_for(path="/api/v1/agents/docs")
    await step.run(ctx)
    assert not ctx.is_public


async def test_service_key_checked_in_constant_time_and_closed_when_unset() -> None:
    step = routes.RoutesStep(SETTINGS)
    path = "/api/v1/customers/register"
    ok = ctx_for(path=path, headers=[(b"x-cp-registration-key", b"k" * 20)])
    assert await step.run(ok) is None and ok.service_key_route and ok.identity
    bad = ctx_for(path=path, headers=[(b"x-cp-registration-key", b"nope")])
    rejected = await step.run(bad)
    assert rejected is not None and rejected.status == 401 and not bad.service_key_route
    absent = ctx_for(path=path)  # a service-key route needs the key, as on the deployed gateway
    refused_without_key = await step.run(absent)
    assert refused_without_key is not None and refused_without_key.status == 401
    assert not absent.service_key_route and absent.identity is None
    closed = routes.RoutesStep(Settings(plant_backend_url="http://b", guards=[]))
    empty_key = ctx_for(path=path, headers=[(b"x-cp-registration-key", b"")])
    refused = await closed.run(empty_key)
    assert refused is not None and refused.status == 403


@pytest.mark.parametrize(
    ("method", "path", "needs_key"),
    [
        ("POST", "/api/v1/customers", True),  # the CP backend's customer upsert
        ("GET", "/api/v1/customers/lookup", True),
        ("GET", "/api/v1/customers/", True),
        ("POST", "/api/v1/customers/fcm-token", False),  # the mobile app, with its JWT
        ("POST", "/api/v1/customers/fcm-token/", False),
        ("POST", "/api/v1/otp/sessions", True),
        ("POST", "/api/v1/otp/sessions/abc/verify", True),
        ("POST", "/api/v1/notifications/events", True),
        ("GET", "/api/v1/notifications/events", False),  # only the POST is a service call
        ("GET", "/api/v1/customersx", False),
        ("GET", "/api/v1/hired-agents", False),
    ],
)
async def test_deployed_service_key_routes(method: str, path: str, needs_key: bool) -> None:
    step = routes.RoutesStep(SETTINGS)
    without = await step.run(ctx_for(path=path, method=method))
    assert (without is not None and without.status == 401) is needs_key
    keyed = ctx_for(path=path, method=method, headers=[(b"x-cp-registration-key", b"k" * 20)])
    assert await step.run(keyed) is None
    assert keyed.service_key_route is needs_key


@pytest.mark.parametrize(
    ("pattern", "method", "path", "expected"),
    [
        ("/api/v1/hired-agents/*/finalize", "POST", "/api/v1/hired-agents/h-1/finalize", True),
        ("/api/v1/hired-agents/*/finalize", "POST", "/api/v1/hired-agents/finalize", False),
        ("/api/v1/hired-agents/*/finalize", "POST", "/api/v1/hired-agents/a/b/finalize", False),
        ("/api/v1/hired-agents/*/finalize", "POST", "/x/api/v1/hired-agents/a/finalize", False),
        ("POST /api/v1/x", "POST", "/api/v1/x", True),
        ("POST /api/v1/x", "GET", "/api/v1/x", False),
        ("GET|PUT /api/v1/x/*", "PUT", "/api/v1/x/1", True),
        ("GET /api/v1/x", "HEAD", "/api/v1/x", True),  # a HEAD is a GET without the body
        ("/api/v1/x", "GET", "/api/v1/x/", True),  # one trailing slash tolerated
        ("/api/v1/x", "GET", "/api/v1/x//", False),
    ],
)
def test_route_patterns(pattern: str, method: str, path: str, expected: bool) -> None:
    assert routing.match_route(pattern, path, method) is expected


@pytest.mark.parametrize("bad", ["api/v1/x", "GE1 /x", "POST|/x", "/a*b/c", "/a/b c", "/x*y"])
def test_bad_route_patterns_stop_start_up(bad: str) -> None:
    with pytest.raises(ValueError, match="route"):
        Settings(plant_backend_url="http://b", public_routes=[bad])


# --- tenant ----------------------------------------------------------------------------------

def test_bind_helpers() -> None:
    query = tenant.bind_query("customer_id=b&x=1&customer_id=c", "customer_id", "a")
    assert query == "x=1&customer_id=a"
    path = tenant.bind_path("/api/v1/subscriptions/by-customer/b", 4, "a")
    assert path == "/api/v1/subscriptions/by-customer/a"
    assert tenant.bind_path("/api/v1/subscriptions/by-customer/", 4, "a") is None
    body = tenant.bind_body(b'{"customer_id":"b","n":1}', "customer_id", "a")
    assert body is not None and json.loads(body) == {"customer_id": "a", "n": 1}
    assert tenant.bind_body(b"[1]", "customer_id", "a") is None
    assert tenant.bind_body(b"{not json", "customer_id", "a") is None


async def test_tenant_step_needs_a_customer_and_rewrites_body_length() -> None:
    rule = TenantRule(path="/api/v1/payments*", location="body", methods=["POST"])
    step = tenant.TenantStep([rule])
    ctx = ctx_for(path="/api/v1/payments", method="POST")
    problem = await step.run(ctx)
    assert isinstance(problem, Problem) and problem.status == 401
    ctx.identity = Identity(user_id="u", customer_id="cust-A")
    ctx.body = b'{"customer_id":"cust-B-longer"}'
    assert await step.run(ctx) is None
    assert ctx.body_rewritten and json.loads(ctx.body)["customer_id"] == "cust-A"
    headers = dict(upstream_request_headers(ctx, SETTINGS))
    assert headers["Content-Length"] == str(len(ctx.body))


MINE, THEIRS = "cust-mine", "cust-theirs"


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "expect_path", "expect_query", "expect_body"),
    [
        ("GET", "/api/v1/invoices", f"customer_id={THEIRS}", None, None, True, False),
        ("GET", "/api/v1/invoices/inv-1/pdf", "", None, None, True, False),
        ("GET", "/api/v1/receipts", f"customer_id={THEIRS}", None, None, True, False),
        ("GET", "/api/v1/trial-status", "", None, None, True, False),
        ("GET", "/api/v1/hired-agents/by-subscription/s-1", "", None, None, True, False),
        ("POST", "/api/v1/payments/subscriptions/s-1/cancel", f"customer_id={THEIRS}", None,
         None, True, False),
        ("GET", f"/api/v1/payments/subscriptions/by-customer/{THEIRS}", "", None,
         f"/api/v1/payments/subscriptions/by-customer/{MINE}", False, False),
        ("POST", "/api/v1/payments/coupon/checkout", "", {"customer_id": THEIRS}, None, False,
         True),
        ("POST", "/api/v1/payments/razorpay/order", "", {"customer_id": THEIRS}, None, False,
         True),
        ("POST", "/api/v1/payments/razorpay/confirm", "", {}, None, False, True),
        ("PUT", "/api/v1/hired-agents/draft", "", {"customer_id": THEIRS}, None, False, True),
        ("POST", "/api/v1/hired-agents/h-1/finalize", "", {"customer_id": THEIRS}, None, False,
         True),
    ],
)
async def test_every_deployed_tenant_route_is_bound_to_the_callers_customer(
    method: str, path: str, query: str, body: dict | None, expect_path: str | None,
    expect_query: bool, expect_body: bool,
) -> None:
    step = tenant.TenantStep(list(SETTINGS.tenant_rules))  # the deployed defaults
    assert step is not None
    anonymous = ctx_for(path=path, method=method, qs=query.encode())
    refused = await step.run(anonymous)
    assert refused is not None and refused.status == 401  # no customer in the token: refused
    ctx = ctx_for(path=path, method=method, qs=query.encode())
    ctx.identity = Identity(user_id="u", customer_id=MINE)
    if body is not None:
        ctx.body = json.dumps(body).encode()
    assert await step.run(ctx) is None
    assert ctx.upstream_path == (expect_path or path)
    assert (f"customer_id={MINE}" in ctx.query_string) is expect_query
    assert THEIRS not in ctx.query_string
    if expect_body:
        assert json.loads(ctx.body or b"")["customer_id"] == MINE


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/v1/invoices"), ("GET", "/api/v1/hired-agents"),
     ("DELETE", "/api/v1/hired-agents/h-1"), ("GET", "/api/v1/payments/coupon/checkout")],
)
async def test_routes_the_deployed_gateway_leaves_unbound(method: str, path: str) -> None:
    step = tenant.TenantStep(list(SETTINGS.tenant_rules))  # the deployed defaults
    assert step is not None
    ctx = ctx_for(path=path, method=method, qs=f"customer_id={THEIRS}".encode())
    assert await step.run(ctx) is None and ctx.query_string == f"customer_id={THEIRS}"


def test_tenant_build_off_when_guard_off() -> None:
    off = Settings(plant_backend_url="http://b", guards=[])
    deps = Dependencies(settings=off, counters=create_counters(off), flags=DefaultFlags(off))
    assert tenant.GUARD.create(off, deps) is None


def test_problem_document_shape() -> None:
    doc = json.loads(Problem(413, "payload-too-large", "too big").render(
        base="https://waooaw.com", instance="/x", correlation_id="c"))
    assert doc == {"type": "https://waooaw.com/errors/payload-too-large",
                   "title": "Payload Too Large", "status": 413, "detail": "too big",
                   "instance": "/x", "correlation_id": "c"}
