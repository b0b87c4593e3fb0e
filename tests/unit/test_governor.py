"""Governor approvals in the policy step: the approval id from a header or a JSON body field
(hostile input included), the platform's record judged by the real bundle, single use.

The policy is the repository's bundle compiled in-process; the platform is ``StaticApprovals``
(the HTTP backend has its own tests); counters are the in-process backend.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from plant_gateway import governor
from plant_gateway.backends.approvals import StaticApprovals
from plant_gateway.backends.base import ApprovalRecord, BudgetRequest
from plant_gateway.backends.policy_local import LocalPolicyEngine
from plant_gateway.context import Identity, RequestContext
from plant_gateway.counters import ApprovalConsumeOp, ApprovalReleaseOp, BudgetChargeOp, RateLimitOp
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.guards.policy import PolicyConfig, PolicyStep
from plant_gateway.pipeline.counter_batch import resolve_in_order
from plant_gateway.pipeline.ingress import BodySource
from plant_gateway.problems import Problem
from plant_gateway.settings import Settings

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXPORT = ("GET", "/api/v1/audit/export")
HOUR_NS = 3600 * 10**9


def make_settings(**extra: Any) -> Settings:
    return Settings(plant_backend_url="http://127.0.0.1:9", policy_dir=POLICIES,
                    max_body_bytes=4096, max_json_depth=8, **extra)


@pytest.fixture(scope="module")
def engine() -> LocalPolicyEngine:
    return LocalPolicyEngine(make_settings(), watch=False)


def pp_admin() -> Identity:
    """A PP admin token as the platform mints it: admin, no governor_agent_id."""
    return Identity(user_id="google-sub-1", subject="google-sub-1", email="ops@waooaw.com",
                    roles=["admin"], governor_agent_id=None)


def make_ctx(method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None, identity: Identity | None = None) -> RequestContext:
    all_headers = {"authorization": "Bearer pp-admin-token", **(headers or {})}
    ctx = RequestContext(request_id="r", correlation_id="c", method=method, path=path,
                         query_string="", headers=all_headers, client_ip="127.0.0.1",
                         identity=identity or pp_admin(), upstream_path=path)
    ctx.authorization = all_headers["authorization"]
    chunks = [body] if body is not None else []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0) if chunks else b"",
                "more_body": False}

    ctx.scratch["body_source"] = BodySource(receive, 4096, body is not None)
    return ctx


def record(approval_id: str = "APR-1", **fields: Any) -> ApprovalRecord:
    base: dict[str, Any] = {"action": "export_data", "agent_id": "agent-1",
                            "customer_id": "cust-1", "expires_ns": time.time_ns() + HOUR_NS}
    base.update(fields)
    return ApprovalRecord(approval_id, **base)


class World:
    """A policy step wired like ``build`` does, with the platform's records and counters."""

    def __init__(self, engine: LocalPolicyEngine, *records: ApprovalRecord,
                 platform: bool = True, flags: Any = None) -> None:
        self.settings = make_settings()
        self.approvals = StaticApprovals({r.approval_id: r for r in records})
        self.counters = MemoryCounters(self.settings)
        self.step = PolicyStep(PolicyConfig.from_settings(self.settings), engine, flags,
                               counters=self.counters,
                               approvals=self.approvals if platform else None)

    async def run(self, ctx: RequestContext) -> Problem | None:
        return await self.step.run(ctx)


def note(ctx: RequestContext) -> dict[str, Any]:
    assert ctx.policy_decision is not None
    found: dict[str, Any] = ctx.policy_decision["approval"]
    return found


# --- the id from a header -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-approval-id", "x-governor-approval-id"])
def test_either_header_names_the_approval(name: str) -> None:
    ctx = make_ctx(*EXPORT, {name: " APR-abc_DEF-123 "})
    assert governor.header_id(ctx) == "APR-abc_DEF-123"


def test_x_approval_id_wins_over_the_older_header() -> None:
    ctx = make_ctx(*EXPORT, {"x-approval-id": "APR-new", "x-governor-approval-id": "APR-old"})
    assert governor.header_id(ctx) == "APR-new"


@pytest.mark.parametrize("value", [
    "A" * 129, "APR-\x01x", "APR 1", "APR-1/../admin", "..", ".hidden", "APR-%2e%2e", "",
    "APR-ü", "-APR",
])
def test_a_malformed_header_id_is_a_400(value: str) -> None:
    ctx = make_ctx(*EXPORT, {"x-approval-id": value})
    problem = governor.header_id(ctx)
    assert isinstance(problem, Problem) and (problem.status, problem.kind) == (400, "bad-request")
    assert ctx.error_type == "invalid-approval-id"


def test_the_longest_id_is_accepted() -> None:
    assert governor.header_id(make_ctx(*EXPORT, {"x-approval-id": "A" * 128})) == "A" * 128


# --- the id from a JSON body ------------------------------------------------------------------


JSON = {"content-type": "application/json"}


async def body_id(body: bytes, headers: dict[str, str] | None = None) -> Any:
    ctx = make_ctx("DELETE", "/api/v1/agents/agent-1", JSON if headers is None else headers, body)
    return await governor.body_id(ctx, max_depth=8), ctx


async def test_the_body_field_names_the_approval_and_the_body_is_kept() -> None:
    body = b'{"approval_id": "APR-body", "reason": "cleanup"}'
    found, ctx = await body_id(body)
    assert found == "APR-body"
    assert ctx.body == body  # forwarded as it came
    found, _ = await body_id(body, {"content-type": "application/merge-patch+json; charset=utf-8"})
    assert found == "APR-body"


@pytest.mark.parametrize(("body", "headers"), [
    (b'{"approval_id": "APR-1"}', {"content-type": "text/plain"}),  # not declared JSON
    (b'{"approval_id": "APR-1"}', {}),
    (b"approval_id=APR-1", {"content-type": "application/x-www-form-urlencoded"}),
    (b'{"approval_id": "APR-1"', JSON),  # not JSON
    (b"\xff\xfe{}", JSON),
    (b'["APR-1"]', JSON),  # not an object
    (b'{"data": {"approval_id": "APR-1"}}', JSON),  # not top-level
    (b'{"approval_id": null}', JSON),
    (b'{"approval_id": "APR-1", "deep": ' + b"[" * 20 + b"]" * 20 + b"}", JSON),  # > depth 8
    (b"", JSON),
])
async def test_a_body_that_names_no_approval_is_ignored(body: bytes,
                                                        headers: dict[str, str]) -> None:
    found, _ = await body_id(body, headers)
    assert found is None


async def test_the_body_is_not_read_unless_declared_json() -> None:
    _, ctx = await body_id(b'{"approval_id": "APR-1"}', {"content-type": "text/plain"})
    assert ctx.body is None


@pytest.mark.parametrize("value", ["A" * 129, "APR-\u0001", "APR-1\n", 7, True, ["APR-1"],
                                   {"id": "APR-1"}, "../x"])
async def test_a_malformed_body_id_is_a_400(value: Any) -> None:
    found, ctx = await body_id(json.dumps({"approval_id": value}).encode())
    assert isinstance(found, Problem) and found.status == 400
    assert ctx.error_type == "invalid-approval-id"


async def test_a_body_over_the_limit_is_a_413() -> None:
    found, _ = await body_id(b'{"approval_id": "APR-1", "pad": "' + b"x" * 5000 + b'"}')
    assert isinstance(found, Problem) and found.status == 413


# --- the policy step with the platform's records ---------------------------------------------


async def test_pp_admin_export_without_approval_is_redirected(engine: LocalPolicyEngine) -> None:
    world = World(engine, record())
    problem = await world.run(make_ctx(*EXPORT))
    assert problem is not None and (problem.status, problem.kind) == (
        307, "governor-approval-required")
    assert world.approvals.lookups == 0


async def test_a_verified_approval_passes_once(engine: LocalPolicyEngine) -> None:
    world = World(engine, record())
    ctx = make_ctx(*EXPORT, {"x-approval-id": "APR-1"})
    assert await world.run(ctx) is None
    assert note(ctx) == {"id": "APR-1", "source": "header", "verified": True, "consumed": True}
    assert ctx.policy_decision is not None and ctx.policy_decision["approval_used"] is True
    again = make_ctx(*EXPORT, {"x-approval-id": "APR-1"})
    problem = await world.run(again)
    assert problem is not None and (problem.status, problem.kind) == (409, "approval-already-used")
    assert problem.extra["approval_id"] == "APR-1"
    assert note(again)["consumed"] is False


async def test_an_approval_in_the_body_deletes_the_agent_it_names(
    engine: LocalPolicyEngine,
) -> None:
    world = World(engine, record(action="delete_agent"))
    body = b'{"approval_id": "APR-1"}'
    other = make_ctx("DELETE", "/api/v1/agents/agent-2", JSON, body)
    problem = await world.run(other)
    assert problem is not None and problem.status == 307  # the record names agent-1
    assert note(other)["verified"] is True and note(other)["consumed"] is None
    ctx = make_ctx("DELETE", "/api/v1/agents/agent-1", JSON, body)
    assert await world.run(ctx) is None
    assert note(ctx)["source"] == "body" and note(ctx)["consumed"] is True
    assert ctx.body == body


@pytest.mark.parametrize(("approval_id", "fields"), [
    ("APR-unknown", {}),  # the platform does not know it (404)
    ("APR-1", {"action": "delete_agent"}),  # minted for another action
    ("APR-1", {"expires_ns": time.time_ns() - 1}),  # expired
])
async def test_an_approval_that_does_not_fit_is_redirected(
    engine: LocalPolicyEngine, approval_id: str, fields: dict[str, Any]
) -> None:
    world = World(engine, record(**fields))
    ctx = make_ctx(*EXPORT, {"x-approval-id": approval_id})
    problem = await world.run(ctx)
    assert problem is not None and problem.status == 307
    assert note(ctx)["consumed"] is None
    assert await world.counters.approval_consume(approval_id, 60)  # never marked used


async def test_approvals_api_down_is_a_503_and_nothing_is_used(
    engine: LocalPolicyEngine,
) -> None:
    world = World(engine, record())
    world.approvals.down = True
    ctx = make_ctx(*EXPORT, {"x-approval-id": "APR-1"})
    problem = await world.run(ctx)
    assert problem is not None and (problem.status, problem.kind) == (503, "approvals-unavailable")
    assert "APR-1" in (ctx.error_message or "")
    assert note(ctx)["verified"] is None
    assert await world.counters.approval_consume("APR-1", 60)


async def test_without_approvals_url_only_static_data_counts(engine: LocalPolicyEngine) -> None:
    world = World(engine, record(), platform=False)
    problem = await world.run(make_ctx(*EXPORT, {"x-approval-id": "APR-1"}))
    assert problem is not None and problem.status == 307
    assert world.approvals.lookups == 0


async def test_the_governor_and_ordinary_requests_never_look_up(
    engine: LocalPolicyEngine,
) -> None:
    world = World(engine, record())
    governor_id = Identity(user_id="g", roles=["admin"], governor_agent_id="gov-1")
    ctx = make_ctx(*EXPORT, {"x-approval-id": "APR-1"}, identity=governor_id)
    assert await world.run(ctx) is None
    assert await world.run(make_ctx("GET", "/api/v1/agents", {"x-approval-id": "APR-1"})) is None
    assert world.approvals.lookups == 0
    assert await world.counters.approval_consume("APR-1", 60)  # not used by either


async def test_governor_flag_off_needs_no_approval(engine: LocalPolicyEngine) -> None:
    class Off:
        def enabled(self, flag: str, ctx: RequestContext) -> bool:
            return flag != "enable_governor_approval"

    world = World(engine, record(), flags=Off())
    assert await world.run(make_ctx(*EXPORT, {"x-approval-id": "APR-1"})) is None
    assert world.approvals.lookups == 0


# --- single use in the counter batch ---------------------------------------------------------


def test_an_approval_is_released_when_a_later_guard_refuses() -> None:
    found = {"id": "APR-1", "consumed": None}
    refuse = Problem(402, "budget-exceeded", "over")
    pending: list[Any] = [
        (ApprovalConsumeOp("APR-1", 60), governor.ConsumeResolver("APR-1", found)),
        (BudgetChargeOp(BudgetRequest(0.01, 100.0)), lambda result: refuse),
    ]
    problem, refunds = resolve_in_order(pending, [True, None])
    assert problem is refuse
    assert ApprovalReleaseOp("APR-1") in refunds
    assert found == {"id": "APR-1", "consumed": False, "released": True}


def test_an_approval_after_a_refusal_is_released_unseen() -> None:
    found = {"id": "APR-1", "consumed": None}
    refuse = Problem(429, "rate-limited", "slow down")
    pending: list[Any] = [
        (RateLimitOp("user:u1", 10, 60.0, 0), lambda result: refuse),
        (ApprovalConsumeOp("APR-1", 60), governor.ConsumeResolver("APR-1", found)),
    ]
    problem, refunds = resolve_in_order(pending, [None, True])
    assert problem is refuse and refunds == [ApprovalReleaseOp("APR-1")]
    assert found["consumed"] is None


def test_a_request_refused_by_another_step_releases_its_approval() -> None:
    found = {"id": "APR-1", "consumed": None}
    pending: list[Any] = [
        (ApprovalConsumeOp("APR-1", 60), governor.ConsumeResolver("APR-1", found)),
    ]
    assert resolve_in_order(pending, [True]) == (None, [])
    problem, refunds = resolve_in_order(pending, [True], refused=True)
    assert problem is None and refunds == [ApprovalReleaseOp("APR-1")]


@pytest.mark.parametrize(("expires_in_s", "ttl"), [(60, 60 + 86_400), (None, 366 * 86_400)])
def test_the_used_mark_outlives_the_approval(expires_in_s: int | None, ttl: int) -> None:
    now = time.time_ns()
    expires = None if expires_in_s is None else now + expires_in_s * 10**9
    assert governor.consume_ttl(expires, now) == ttl
