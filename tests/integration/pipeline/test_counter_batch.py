"""The guards' counter ops batched into one round trip (pipeline/counter_batch.py) on both backends.

Round trips counted on the wire, error precedence across a refusing step in between, refunds
of a refused request's quota/budget charges, and the fail modes when the batch cannot run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from plant_gateway.backends.approvals import StaticApprovals
from plant_gateway.backends.base import ApprovalRecord, BudgetRequest, Counters
from plant_gateway.backends.keys import create as create_keys
from plant_gateway.backends.policy_local import LocalPolicyEngine
from plant_gateway.context import Identity, RequestContext
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.counters.redis import RedisCounters
from plant_gateway.guards.auth import AuthConfig, AuthStep
from plant_gateway.guards.budget import BudgetConfig, BudgetStep
from plant_gateway.guards.policy import PolicyConfig, PolicyStep
from plant_gateway.guards.rate_limit import RateLimitConfig, RateLimitStep
from plant_gateway.guards.trial_quota import TrialQuotaConfig, TrialQuotaStep
from plant_gateway.pipeline.counter_batch import CounterBatchStep, flush_on_refusal
from plant_gateway.pipeline.step import Step
from plant_gateway.problems import Problem
from plant_gateway.settings import RateTier, Settings
from tests.fixtures.redis import RedisServer
from tests.unit.auth_support import SECRET, context, mint

COST = 0.004
TRIAL_CLAIMS: dict[str, Any] = {"roles": ["user"], "trial_mode": True, "agent_id": "agent-b",
                "trial_expires_at": "2099-01-01T00:00:00+00:00"}


def settings_for(url: str | None, prefix: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "plant_backend_url": "http://127.0.0.1:9",
        "jwt_secret": SECRET,
        "redis_url": url,
        "redis_key_prefix": prefix,
        "revoked_prefix": f"{prefix}revoked_access:",
        "token_version_prefix": f"{prefix}token_version:",
        "rate_tiers": {t: RateTier(limit=3, period_s=3600, burst=2)
                       for t in ("trial", "paid", "governor", "enterprise", "anonymous")},
        "trial_daily_tasks": 10,
        "cost_per_request_usd": COST,
        "redis_timeout_s": 0.3,
    }
    base.update(kw)
    return Settings(**base)


class Deny:
    """A refusing step between the batched guards (as policy is in the real pipeline)."""

    name = "policy"

    async def run(self, ctx: RequestContext) -> Problem | None:
        return Problem(403, "permission-denied", "denied by the test")


def chain(counters: Counters, *middle: Any) -> list[Step]:
    """auth, rate_limit, [middle], trial_quota, budget, counter batch — as build_pipeline sets
    them up: the guards enqueue, the last step runs the batch."""
    s: Settings = counters.settings  # type: ignore[attr-defined]
    steps: list[Any] = [
        AuthStep(AuthConfig.from_settings(s), create_keys(s), counters),
        RateLimitStep(RateLimitConfig.from_settings(s), counters),
        *middle,
        TrialQuotaStep(TrialQuotaConfig.from_settings(s), counters),
        BudgetStep(BudgetConfig.from_settings(s), counters),
        CounterBatchStep(counters),
    ]
    batch_them(steps)
    return steps


def batch_them(steps: list[Any]) -> None:
    """What the registry does when the pipeline has a counter batch: the guards enqueue."""
    for step in steps:
        if hasattr(step, "batched"):
            step.batched = True


async def run_chain(steps: list[Step], ctx: RequestContext) -> Problem | None:
    """What GatewayApp.run_pipeline does before forwarding."""
    for step in steps:
        problem = await step.run(ctx)
        if problem is not None:
            return await flush_on_refusal(ctx, problem)
    return None


def task_ctx(token: str) -> RequestContext:
    ctx = context(token, path="/api/v1/agents/a-1/execute", method="POST")
    ctx.resource, ctx.action = "agents", "execute"
    return ctx


async def spent(counters: Counters, agent: str = "agent-b") -> tuple[float, int]:
    """(agent's budget spent, trial tasks counted today) read through the public interface."""
    probe = BudgetRequest(cost_usd=0.0, platform_limit=1e9, agent_id=agent, agent_limit=1e9)
    decision = await counters.budget_charge(probe)
    quota = await counters.daily_quota("trial:u-batch", 1000)  # counts one more: a probe
    return decision.agent_spent or 0.0, 1000 - quota.remaining - 1


@pytest.fixture(params=["memory", "redis", "cluster"])
async def counters(
    request: pytest.FixtureRequest, redis_prefix: str
) -> AsyncIterator[Counters]:
    fixture = {"redis": "redis_url", "cluster": "redis_cluster_url"}.get(request.param)
    url = request.getfixturevalue(fixture) if fixture else None
    s = settings_for(url, redis_prefix, redis_cluster=request.param == "cluster")
    made: Any = RedisCounters(s, url) if url else MemoryCounters(s)
    await made.start()
    yield made
    await made.close()


async def test_refused_request_refunds_quota_and_budget(counters: Counters) -> None:
    steps = chain(counters)
    token = mint(user_id="u-batch", **TRIAL_CLAIMS)
    outcomes = [await run_chain(steps, task_ctx(token)) for _ in range(4)]
    assert [o is None for o in outcomes] == [True, True, True, False]
    assert outcomes[-1] is not None and outcomes[-1].kind == "rate-limited"
    agent_spent, tasks = await spent(counters)
    assert agent_spent == pytest.approx(3 * COST)  # the rate-limited request was refunded
    assert tasks == 3


async def test_revoked_token_precedes_a_later_refusal_and_is_not_charged(
    counters: Counters,
) -> None:
    token = mint(user_id="u-batch", jti="jti-batch", **TRIAL_CLAIMS)
    denied = chain(counters, Deny())
    problem = await run_chain(denied, task_ctx(token))
    assert problem is not None and problem.status == 403  # a valid token: policy's answer
    await counters.revoke("jti-batch", 3600)
    problem = await run_chain(denied, task_ctx(token))
    assert problem is not None and (problem.status, problem.kind) == (401, "token-revoked")
    problem = await run_chain(chain(counters), task_ctx(token))
    assert problem is not None and problem.kind == "token-revoked"
    assert await spent(counters) == (0.0, 0)  # quota and budget of the revoked request refunded


async def test_token_version_mismatch_and_valid_chain_sets_headers(counters: Counters) -> None:
    steps = chain(counters)
    ctx = task_ctx(mint(user_id="u-batch", token_version=0, **TRIAL_CLAIMS))
    assert await run_chain(steps, ctx) is None
    headers = dict(ctx.extra_response_headers)
    assert headers["ratelimit-limit"] == "3" and headers["x-budget-alert-level"] == "normal"
    assert ctx.scratch.get("budget") is not None  # the charge after() settles
    await counters.bump_token_version("u-batch")
    problem = await run_chain(steps, task_ctx(mint(user_id="u-batch", **TRIAL_CLAIMS)))
    assert problem is not None and problem.kind == "token-version-mismatch"


class CountingConnection(Connection):
    """A real connection that counts the requests it writes: one per round trip."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


async def test_full_chain_costs_one_redis_round_trip(redis_url: str, redis_prefix: str) -> None:
    s = settings_for(redis_url, redis_prefix)
    counters = RedisCounters(s, redis_url)
    assert isinstance(counters.client, Redis)
    counters.client.connection_pool.connection_class = CountingConnection
    assert counters.channel is not None  # standalone Redis: the batch goes down the RESP channel
    await counters.start()
    try:
        steps = chain(counters)
        token = mint(user_id="u-batch", jti="jti-rt", **TRIAL_CLAIMS)
        assert await run_chain(steps, task_ctx(token)) is None  # warm: connection handshake
        CountingConnection.writes = 0
        trips = counters.channel.round_trips
        ctx = task_ctx(token)
        assert await run_chain(steps, ctx) is None
        assert ctx.identity is not None and ctx.scratch.get("budget") is not None
        assert counters.channel.round_trips - trips == 1  # revocation+version, rate, quota, budget
        assert await run_chain(steps, task_ctx(token)) is None
        assert counters.channel.round_trips - trips == 2
        problem = await run_chain(steps, task_ctx(token))  # rate-limited: + one refund trip
        assert problem is not None and problem.kind == "rate-limited"
        assert counters.channel.round_trips - trips == 4
        assert CountingConnection.writes == 0  # nothing else went through redis-py's pool
    finally:
        await counters.close()


@pytest.mark.parametrize(("rate_mode", "budget_mode"), [("open", "closed"), ("open", "open")])
async def test_failed_batch_keeps_each_guards_fail_mode(
    redis_server: RedisServer, redis_prefix: str, rate_mode: str, budget_mode: str
) -> None:
    s = settings_for(redis_server.url, redis_prefix, rate_limit_fail_mode=rate_mode,
                     budget_fail_mode=budget_mode)
    counters = RedisCounters(s, redis_server.url)
    await counters.start()
    try:
        token = mint(user_id="u-batch", **TRIAL_CLAIMS)
        assert await run_chain(chain(counters), task_ctx(token)) is None
        redis_server.stop()
        problem = await run_chain(chain(counters), task_ctx(token))  # auth: always closed
        assert problem is not None and problem.status == 503
        ctx = task_ctx(token)  # the same request past auth: rate, quota, budget in the batch
        ctx.identity = Identity(user_id="u-batch", roles=["user"], agent_id="agent-b",
                                trial_mode=True)
        problem = await run_chain(chain(counters)[1:], ctx)
        if budget_mode == "closed":
            assert problem is not None and problem.status == 503
            assert "budget" in problem.detail
        else:
            assert problem is None
        redis_server.start()
        started = time.monotonic()
        while await run_chain(chain(counters), task_ctx(token)) is not None:
            assert time.monotonic() - started < 5, "no recovery without a restart"
    finally:
        await counters.close()


# --- Governor approvals: consumed in the batch, released when the request is refused ----------


@pytest.fixture(scope="module")
def engine() -> LocalPolicyEngine:
    return LocalPolicyEngine(settings_for(None, ""), watch=False)


def approval_chain(
    counters: Counters, engine: LocalPolicyEngine, approvals: StaticApprovals
) -> list[Step]:
    s: Settings = counters.settings  # type: ignore[attr-defined]
    policy = PolicyStep(
        PolicyConfig.from_settings(s), engine, None, counters=counters, approvals=approvals
    )
    return chain(counters, policy)


def export_ctx(token: str, approval_id: str) -> RequestContext:
    ctx = context(token, path="/api/v1/audit/export")
    ctx.authorization = ctx.headers["authorization"]
    ctx.headers["x-approval-id"] = approval_id
    return ctx


def platform(approval_id: str) -> StaticApprovals:
    expires = time.time_ns() + 3600 * 10**9
    return StaticApprovals({approval_id: ApprovalRecord(approval_id, "export_data",
                                                        expires_ns=expires)})


async def test_an_approval_lets_one_request_through_across_instances(
    counters: Counters, engine: LocalPolicyEngine, redis_prefix: str
) -> None:
    approval_id = f"APR-{redis_prefix.strip(':')}"
    first = approval_chain(counters, engine, platform(approval_id))
    second_instance: Any = counters
    if isinstance(counters, RedisCounters):  # another gateway on the same Redis
        second_instance = RedisCounters(counters.settings, counters.settings.effective_redis_url
                                        or "")
        await second_instance.start()
    try:
        second = approval_chain(second_instance, engine, platform(approval_id))
        admin = mint(user_id="u-pp-admin", roles=["admin"], governor_agent_id=None)
        assert await run_chain(first, export_ctx(admin, approval_id)) is None
        again = export_ctx(admin, approval_id)
        problem = await run_chain(second, again)
        assert problem is not None and (problem.status, problem.kind) == (
            409, "approval-already-used")
        assert again.policy_decision is not None
        assert again.policy_decision["approval"]["consumed"] is False
    finally:
        if second_instance is not counters:
            await second_instance.close()


async def test_a_request_refused_by_the_budget_does_not_use_its_approval(
    counters: Counters, engine: LocalPolicyEngine, redis_prefix: str
) -> None:
    approval_id = f"APR-budget-{redis_prefix.strip(':')}"
    s: Settings = counters.settings  # type: ignore[attr-defined]
    broke = s.model_copy(update={"platform_monthly_budget_usd": COST / 2})
    steps = approval_chain(counters, engine, platform(approval_id))
    # every charge is over the platform budget
    steps[-2] = BudgetStep(BudgetConfig.from_settings(broke), counters)
    batch_them(steps)
    admin = mint(user_id="u-pp-admin-2", roles=["admin"])
    refused = export_ctx(admin, approval_id)
    problem = await run_chain(steps, refused)
    assert problem is not None and problem.kind == "budget-exceeded"
    assert refused.policy_decision is not None
    assert refused.policy_decision["approval"]["released"] is True
    assert await run_chain(approval_chain(counters, engine, platform(approval_id)),
                           export_ctx(admin, approval_id)) is None  # still usable once
