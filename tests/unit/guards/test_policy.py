"""Policy step: input derivation, decision application, the local engine's cache and reload.

Decisions come from the real bundle compiled in-process (no mock engine).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from plant_gateway.backends.base import DependencyError
from plant_gateway.backends.policy_local import LocalPolicyEngine, input_digest
from plant_gateway.context import Identity, RequestContext
from plant_gateway.guards.policy import (
    GUARD,
    PolicyConfig,
    PolicyStep,
    build_input,
    derive_action,
    iso_to_ns,
    split_path,
)
from plant_gateway.settings import Settings

POLICIES = Path(__file__).resolve().parents[3] / "policies"
HOUR = 3600


def make_settings(policy_dir: Path = POLICIES, **extra: Any) -> Settings:
    return Settings(plant_backend_url="http://127.0.0.1:9", policy_dir=policy_dir,
                    approval_ui_url="https://approve.example/ui", **extra)


@pytest.fixture(scope="module")
def engine() -> LocalPolicyEngine:
    return LocalPolicyEngine(make_settings(), watch=False)


def iso(offset_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset_s))


def ident(roles: list[str], **claims: Any) -> Identity:
    return Identity(user_id="3f1c1a8e-0000-4000-8000-000000000001", subject="u", email="u@x.io",
                    roles=roles, **claims)


def make_ctx(method: str, path: str, identity: Identity | None, **headers: str) -> RequestContext:
    return RequestContext(request_id="r", correlation_id="c", method=method, path=path,
                          query_string="", headers=headers, client_ip="127.0.0.1",
                          identity=identity)


class Flags:
    def __init__(self, off: set[str]) -> None:
        self.off = off

    def enabled(self, flag: str, ctx: RequestContext) -> bool:
        return flag not in self.off


class BrokenEngine:
    async def decide(self, policy_input: dict[str, Any]) -> dict[str, Any]:
        raise DependencyError("boom")


# --- derivation --------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "expected"), [
    ("/api/v1/agents", ("agents", None, None, "/api/v1/agents")),
    ("/api/v1/agents/42", ("agents", "42", None, "/api/v1/agents/{id}")),
    ("/api/v1/agents/a1b2/execute", ("agents", "a1b2", "execute", "/api/v1/agents/{id}/execute")),
    ("/api/v1/agents/my-agent", ("agents", "my-agent", None, "/api/v1/agents/{id}")),
    ("/api/v1/subscriptions/by-customer/cust_9",
     ("subscriptions", "cust_9", None, "/api/v1/subscriptions/by-customer/{id}")),
    ("/api/v1/platform-config", ("platform_config", None, None, "/api/v1/platform-config")),
    ("/api/v2/Tasks/7?x=1", ("tasks", "7", None, "/api/v2/Tasks/{id}")),
    ("/api/v1/customers/export", ("customers", None, "export", "/api/v1/customers/export")),
    ("/api/v1", ("", None, None, "/api/v1")),
])
def test_split_path(path: str, expected: tuple[Any, ...]) -> None:
    assert split_path(path) == expected


@pytest.mark.parametrize(("method", "path", "action"), [
    ("GET", "/api/v1/agents/1", "read"),
    ("HEAD", "/api/v1/agents/1", "read"),
    ("POST", "/api/v1/tasks", "create"),
    ("PUT", "/api/v1/tasks/1", "update"),
    ("PATCH", "/api/v1/tasks/1", "update"),
    ("DELETE", "/api/v1/tasks/1", "delete"),
    ("POST", "/api/v1/agents/1/execute", "execute"),
    ("POST", "/api/v1/agents/1/approve", "approve"),
    ("POST", "/api/v1/agents/1/deploy", "deploy"),
    ("DELETE", "/api/v1/agents/1", "delete_agent"),
    ("DELETE", "/api/v1/customers/1", "delete_customer"),
    ("PUT", "/api/v1/billing/1", "update_billing"),
    ("POST", "/api/v1/billing", "update_billing"),
    ("GET", "/api/v1/billing", "read"),
    ("PATCH", "/api/v1/subscriptions/9", "change_subscription"),
    ("POST", "/api/v1/subscriptions/9/cancel", "change_subscription"),
    ("GET", "/api/v1/subscriptions/9", "read"),
    ("GET", "/api/v1/customers/1/export", "export_data"),
    ("POST", "/api/v1/exports", "export_data"),
])
def test_derive_action(method: str, path: str, action: str) -> None:
    resource, _, verb, _ = split_path(path)
    assert derive_action(method, resource, verb) == action


def test_iso_to_ns() -> None:
    assert iso_to_ns("1970-01-01T00:00:01Z") == 1_000_000_000
    assert iso_to_ns("1970-01-01T01:00:01+01:00") == 1_000_000_000
    assert iso_to_ns("1970-01-01T00:00:01") == 1_000_000_000
    assert iso_to_ns("not a date") is None
    assert iso_to_ns(None) is None
    assert iso_to_ns(True) is None


def test_input_is_stable_across_requests_and_tokens() -> None:
    gateway_type = make_settings().gateway_type
    a = build_input(make_ctx("GET", "/api/v1/agents/1", ident(["user"], jti="a")), gateway_type,
                    None)
    b = build_input(make_ctx("GET", "/api/v1/agents/2", ident(["user"], jti="b")), gateway_type,
                    None)
    assert a["path"] == b["path"] == "/api/v1/agents/{id}"
    assert input_digest(a) == input_digest(b)
    assert a["flags"] == {"rbac": True, "trial_mode": True, "governor_approval": True,
                          "sandbox_routing": True}
    c = build_input(make_ctx("GET", "/api/v1/agents/1", ident(["admin"])), gateway_type, None)
    assert input_digest(a) != input_digest(c)


def test_decision_key_tells_apart_values_that_compare_equal() -> None:
    """A cached decision is only reused for the very same input: True is not 1, "1" is not 1."""
    base = {"resource": "agents", "jwt": {"roles": ["user"], "trial_mode": True}}
    variants = [
        {"resource": "agents", "jwt": {"roles": ["user"], "trial_mode": 1}},
        {"resource": "agents", "jwt": {"roles": ["user"], "trial_mode": "True"}},
        {"resource": "agents", "jwt": {"roles": "user", "trial_mode": True}},
    ]
    keys = {input_digest(base), *(input_digest(v) for v in variants)}
    assert len(keys) == 4
    assert input_digest({**base, "now_ns": 1}) == input_digest({**base, "now_ns": 2})


def test_input_carries_flags_and_approval() -> None:
    ctx = make_ctx("DELETE", "/api/v1/agents/7", ident(["user"]))
    flags = Flags({"enable_rbac", "enable_sandbox_routing"})
    doc = build_input(ctx, make_settings().gateway_type, flags, approval_id="ap-1")
    assert doc["flags"] == {"rbac": False, "trial_mode": True, "governor_approval": True,
                            "sandbox_routing": False}
    assert doc["approval"] == {"id": "ap-1"}
    assert doc["resource_id"] == "7"  # the agent a record must name
    assert "approval" not in build_input(ctx, make_settings().gateway_type, None)
    assert (ctx.resource, ctx.action, ctx.resource_id) == ("agents", "delete_agent", "7")
    assert "jti" not in doc["jwt"] and doc["jwt"]["roles"] == ["user"]


# --- enforcement -------------------------------------------------------------------------


async def run(engine: Any, method: str, path: str, identity: Identity | None,
              flags: Any = None, **headers: str) -> tuple[Any, RequestContext]:
    ctx = make_ctx(method, path, identity, **headers)
    problem = await policy_step(engine, flags).run(ctx)
    return problem, ctx


async def test_allowed_fills_context(engine: LocalPolicyEngine) -> None:
    problem, ctx = await run(engine, "POST", "/api/v1/tasks", ident(["user"]))
    assert problem is None
    assert ctx.policy_decision is not None and ctx.policy_decision["allow"] is True
    assert "plant.gateway.rbac" in ctx.policies_evaluated
    assert ctx.policy_latency_ms is not None and ctx.target_backend == "production"
    assert (ctx.resource, ctx.action) == ("tasks", "create")


async def test_permission_denied(engine: LocalPolicyEngine) -> None:
    problem, ctx = await run(engine, "POST", "/api/v1/tasks", ident(["readonly"]))
    assert problem is not None and (problem.status, problem.kind) == (403, "permission-denied")
    assert problem.extra["required_permission"] == "tasks:create"
    assert ctx.policy_decision is not None and ctx.policy_decision["allow"] is False


async def test_unknown_role_and_no_identity_denied(engine: LocalPolicyEngine) -> None:
    for identity in (ident(["root"]), None):
        problem, _ = await run(engine, "GET", "/api/v1/agents", identity)
        assert problem is not None and problem.status == 403


async def test_trial_expired(engine: LocalPolicyEngine) -> None:
    identity = ident(["user"], trial_mode=True, trial_expires_at=iso(-60))
    problem, _ = await run(engine, "GET", "/api/v1/agents", identity)
    assert problem is not None and (problem.status, problem.kind) == (403, "trial-expired")


async def test_trial_routed_to_sandbox_and_blocked_from_billing(engine: LocalPolicyEngine) -> None:
    identity = ident(["user"], trial_mode=True, trial_expires_at=iso(HOUR))
    problem, ctx = await run(engine, "POST", "/api/v1/tasks", identity)
    assert problem is None and ctx.target_backend == "sandbox"
    assert ctx.policy_decision is not None
    assert ctx.policy_decision["obligations"]["count_trial_task"] is True
    for path in ("/api/v1/billing", "/api/v1/invoices/1", "/api/v1/subscriptions"):
        problem, _ = await run(engine, "GET", path, identity)
        assert problem is not None and problem.status == 403, path
    problem, _ = await run(engine, "GET", "/api/v1/invoices", identity,
                           Flags({"enable_trial_mode"}))
    assert problem is None


async def test_governor_redirect(engine: LocalPolicyEngine) -> None:
    identity = ident(["customer_admin"], agent_id="agent-5")
    problem, _ = await run(engine, "DELETE", "/api/v1/agents/agent-9", identity)
    assert problem is not None and problem.status == 307
    headers = dict(problem.headers)
    assert headers["location"].startswith("https://approve.example/ui?action=delete_agent")
    assert headers["x-governor-approval-required"] == "true"
    assert headers["x-governor-action"] == "delete_agent"
    assert headers["x-governor-agent-id"] == "agent-5"


async def test_governor_passes(engine: LocalPolicyEngine) -> None:
    identity = ident(["admin"], governor_agent_id="gov-1")
    problem, _ = await run(engine, "DELETE", "/api/v1/customers/3", identity)
    assert problem is None


async def test_engine_error_is_503_never_open() -> None:
    problem, ctx = await run(BrokenEngine(), "GET", "/api/v1/agents", ident(["admin"]))
    assert problem is not None and (problem.status, problem.kind) == (503, "policy-unavailable")
    problem, _ = await run(None, "GET", "/api/v1/agents", ident(["admin"]))
    assert problem is not None and problem.status == 503


async def test_public_route_skipped(engine: LocalPolicyEngine) -> None:
    ctx = make_ctx("POST", "/api/v1/auth/login", None)
    ctx.is_public = True
    assert await policy_step(engine).run(ctx) is None
    assert ctx.policy_decision is None


async def test_service_key_route_allowed(engine: LocalPolicyEngine) -> None:
    ctx = make_ctx("POST", "/api/v1/customers/register", Identity(
        subject="svc", service_account="svc", roles=["service"]))
    ctx.service_key_route = True
    assert await policy_step(engine).run(ctx) is None
    ctx = make_ctx("POST", "/api/v1/customers/register", ident(["service"]))
    assert await policy_step(engine).run(ctx) is not None


def test_build_none_when_guard_off() -> None:
    settings = make_settings(guards=["auth"])
    assert GUARD.create(settings, None) is None  # type: ignore[arg-type]


# --- engine: cache and reload ------------------------------------------------------------


def test_cache_hits_and_expires_with_trial(tmp_path: Path) -> None:
    engine = LocalPolicyEngine(make_settings(), watch=False)
    now = time.time_ns()
    doc = {"jwt": {"roles": ["user"], "trial_mode": True, "trial_expires_ns": now + 10**9},
           "resource": "agents", "action": "read", "now_ns": now}
    first = engine.decide_sync(doc)
    assert first["allow"] is True and engine.cache.misses == 1
    assert engine.decide_sync({**doc, "now_ns": now + 1}) is first
    assert engine.cache.hits == 1
    later = engine.decide_sync({**doc, "now_ns": now + 2 * 10**9})
    assert later["kind"] == "trial-expired"


def test_cache_is_bounded() -> None:
    engine = LocalPolicyEngine(make_settings(policy_cache_size=3), watch=False)
    for k in range(5):
        engine.decide_sync({"jwt": {"roles": ["user"], "user_id": str(k)},
                            "resource": "agents", "action": "read"})
    assert len(engine.cache.entries) == 3


async def test_reload_swaps_bundle_and_refuses_broken_one(tmp_path: Path) -> None:
    bundle = tmp_path / "policies"
    shutil.copytree(POLICIES, bundle, ignore=shutil.ignore_patterns("*_test.rego"))
    engine = LocalPolicyEngine(make_settings(bundle), watch=False)
    doc = {"jwt": {"roles": ["readonly"]}, "resource": "agents", "action": "create"}
    assert engine.decide_sync(doc)["allow"] is False
    data = (bundle / "data.json").read_text()
    (bundle / "data.json").write_text(data.replace('"create": 3', '"create": 7'))
    assert await engine.reload() is True
    assert engine.decide_sync(doc)["allow"] is True
    old = engine.revision
    (bundle / "rbac.rego").write_text("package plant.gateway.rbac\nallowed if {{\n")
    assert await engine.reload() is False
    assert engine.revision == old and engine.last_reload_error
    assert engine.decide_sync(doc)["allow"] is True


async def test_file_change_reloads(tmp_path: Path) -> None:
    bundle = tmp_path / "policies"
    shutil.copytree(POLICIES, bundle, ignore=shutil.ignore_patterns("*_test.rego"))
    engine = LocalPolicyEngine(make_settings(bundle))
    await engine.start()
    try:
        await asyncio.sleep(0.3)
        data = (bundle / "data.json").read_text()
        (bundle / "data.json").write_text(data.replace('"create": 3', '"create": 7'))
        for _ in range(100):
            if engine.reloads:
                break
            await asyncio.sleep(0.05)
        assert engine.reloads >= 1
        doc = {"jwt": {"roles": ["readonly"]}, "resource": "agents", "action": "create"}
        assert engine.decide_sync(doc)["allow"] is True
    finally:
        await engine.close()


# --- engine: input projection --------------------------------------------------------------


PROJECTION_CASES: list[dict[str, Any]] = [
    {"jwt": {"user_id": "u-1", "roles": ["user"], "email": "a@b", "trial_mode": True,
             "trial_expires_ns": 4_070_908_800 * 10**9, "agent_id": None},
     "resource": "agents", "action": "execute", "method": "POST", "path": "/x",
     "client": {"service_key": False, "service_account": None},
     "flags": {"rbac": True, "trial_mode": True, "governor_approval": True,
               "sandbox_routing": True}},
    {"jwt": {"user_id": "u-2", "roles": ["readonly"], "sub": "s"}, "resource": "agents",
     "action": "create", "flags": {"rbac": False, "trial_mode": True}},
    {"jwt": {"user_id": "u-3", "roles": ["customer_admin"], "agent_id": "ag-1"},
     "resource": "agents", "action": "delete_agent", "approval": {"id": "nope"}},
    {"jwt": {"roles": ["admin"], "governor_agent_id": "gov-1"}, "resource": "platform_config",
     "action": "manage", "gateway_type": "CP"},
    {"jwt": {}, "client": {"service_key": True}, "resource": "customers", "action": "create"},
    {"resource": "", "action": ""},
]


def test_projection_keeps_what_the_bundle_reads(engine: LocalPolicyEngine) -> None:
    projection = engine._compiled.projection
    assert projection is not None
    slim = projection.apply({**PROJECTION_CASES[0], "now_ns": 5})
    assert slim == {"jwt": {"user_id": "u-1", "roles": ["user"], "trial_mode": True,
                            "trial_expires_ns": 4_070_908_800 * 10**9},
                    "resource": "agents", "action": "execute",
                    "client": {"service_key": False}, "now_ns": 5}
    assert projection.apply(PROJECTION_CASES[1])["flags"] == {"rbac": False}


@pytest.mark.parametrize("doc", PROJECTION_CASES)
def test_projection_does_not_change_the_decision(engine: LocalPolicyEngine,
                                                 doc: dict[str, Any]) -> None:
    doc = {**doc, "now_ns": time.time_ns()}
    assert engine._compiled.evaluate(doc) == engine.decide_sync(doc)


def test_cached_decisions_follow_the_shared_jwt_document() -> None:
    """The decision key reuses each token's jwt repr: every token x request pair still gets
    its own decision, from the cache the second time."""
    engine = LocalPolicyEngine(make_settings(), watch=False)  # its own caches
    jwts = [case["jwt"] for case in PROJECTION_CASES if "jwt" in case]  # shared, as per token
    requests = [{k: v for k, v in case.items() if k != "jwt"} for case in PROJECTION_CASES]
    for _ in range(2):
        for jwt in jwts:
            for request in requests:
                doc = {"jwt": jwt, **request, "now_ns": time.time_ns()}
                assert engine.decide_sync(doc) == engine._compiled.evaluate(doc), doc
    projection = engine._compiled.projection
    assert projection is not None and len(projection.shared_reprs) == len(jwts)
    assert engine.cache.hits >= len(jwts) * len(requests)


def test_dynamic_input_read_turns_projection_off(tmp_path: Path) -> None:
    bundle = tmp_path / "policies"
    shutil.copytree(POLICIES, bundle, ignore=shutil.ignore_patterns("*_test.rego"))
    (bundle / "extra.rego").write_text(
        "package plant.gateway.extra\n\nimport rego.v1\n\nclaims := input.jwt\n\n"
        'whole := input.client\n\nemail := claims.email\n'
    )
    projection = LocalPolicyEngine(make_settings(bundle), watch=False)._compiled.projection
    assert projection is not None
    slim = projection.apply(PROJECTION_CASES[0])
    assert slim["jwt"]["email"] == "a@b"  # another alias of input.jwt: jwt kept whole
    assert slim["client"] == {"service_key": False, "service_account": None}
    (bundle / "extra.rego").write_text(
        "package plant.gateway.extra\n\nimport rego.v1\n\ndoc := input\n"
    )
    assert LocalPolicyEngine(make_settings(bundle), watch=False)._compiled.projection is None


def policy_step(engine: LocalPolicyEngine, flags: Any = None) -> PolicyStep:
    return PolicyStep(PolicyConfig.from_settings(make_settings()), engine, flags)
