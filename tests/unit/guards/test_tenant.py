"""Unit tests of the tenant guard (plant_gateway.guards.tenant): binding to the caller's customer.

The bind helpers, the step on the deployed default rules, and the guard switched off.
"""

from __future__ import annotations

import json

import pytest

from plant_gateway.backends.flags import DefaultFlags
from plant_gateway.context import Identity
from plant_gateway.counters import create as create_counters
from plant_gateway.deps import Dependencies
from plant_gateway.forwarding.headers import upstream_request_headers
from plant_gateway.guards import tenant
from plant_gateway.problems import Problem
from plant_gateway.settings import Settings, TenantRule
from tests.unit.scope_support import SETTINGS, ctx_for


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
