"""Unit tests of the route classification step (plant_gateway.pipeline.routes).

Hostile paths, public-route rewrites, brute-force routes and the service-key routes.
"""

from __future__ import annotations

import pytest

from plant_gateway.pipeline import routes
from plant_gateway.settings import Settings
from tests.unit.scope_support import SETTINGS, ctx_for


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
