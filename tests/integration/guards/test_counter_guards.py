"""The rate-limit, trial-quota and budget steps on both backends, and a Redis outage mid-test.

Checks problems, headers, tiers, fail modes and recovery without a restart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from plant_gateway.context import Identity, RequestContext
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.counters.redis import RedisCounters
from plant_gateway.deps import Dependencies
from plant_gateway.guards import budget, rate_limit, trial_quota
from plant_gateway.settings import RateTier, Settings
from tests.fixtures.redis import RedisServer
from tests.integration.counters.test_redis import FakeClock


def settings_for(url: str | None, prefix: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "plant_backend_url": "http://127.0.0.1:9",
        "redis_url": url,
        "redis_key_prefix": prefix,
        "rate_tiers": {
            "trial": RateTier(limit=3, period_s=3600, burst=2),
            "paid": RateTier(limit=5, period_s=3600, burst=4),
            "governor": RateTier(limit=8, period_s=3600, burst=7),
            "enterprise": RateTier(limit=8, period_s=3600, burst=7),
            "anonymous": RateTier(limit=2, period_s=60, burst=1),
            "service": RateTier(limit=3, period_s=3600, burst=2),
        },
        "brute_force_limit_per_min": 2,
        "redis_timeout_s": 0.2,
    }
    base.update(kw)
    return Settings(**base)


def ctx_for(
    identity: Identity | None = None, path: str = "/api/v1/agents", **kw: Any
) -> RequestContext:
    ctx = RequestContext(
        request_id="r", correlation_id="c", method="POST", path=path, query_string="",
        headers={}, client_ip="10.0.0.7",
    )
    ctx.identity = identity
    for key, value in kw.items():
        setattr(ctx, key, value)
    return ctx


class FixedFlags:
    def __init__(self, off: set[str] | None = None, values: dict[str, Any] | None = None) -> None:
        self.off = off or set()
        self.values = values or {}

    def enabled(self, flag: str, ctx: RequestContext) -> bool:
        return flag not in self.off

    def value(self, flag: str, ctx: RequestContext, default: Any) -> Any:
        return self.values.get(flag, default)


@pytest.fixture(params=["memory", "redis"])
async def make_deps(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Any]:
    made: list[Any] = []
    clock = FakeClock(datetime(2025, 12, 31, 20, 0, tzinfo=UTC))

    def factory(flags: Any = None, **kw: Any) -> Dependencies:
        url = request.getfixturevalue("redis_url") if request.param == "redis" else None
        s = settings_for(url, redis_prefix, **kw)
        counters: Any = RedisCounters(s, url, clock) if url else MemoryCounters(s, clock)
        made.append(counters)
        return Dependencies(settings=s, counters=counters, flags=flags)

    yield factory
    for counters in made:
        await counters.close()


USER = Identity(user_id="u-1", roles=["user"], customer_id="cust-1", agent_id="agent-9")
TRIAL = Identity(user_id="u-2", roles=["user"], trial_mode=True)
GOVERNOR = Identity(user_id="u-3", roles=["admin"], governor_agent_id="gov-1")


async def test_tiers_limits_and_headers(make_deps: Any) -> None:
    step = rate_limit.GUARD.create(make_deps().settings, make_deps())
    assert step is not None
    deps = make_deps()
    config = rate_limit.RateLimitConfig.from_settings(deps.settings)
    step = rate_limit.RateLimitStep(config, deps.counters)
    outcomes = [await step.run(ctx_for(USER)) for _ in range(6)]
    assert [o is None for o in outcomes] == [True] * 5 + [False]
    problem = outcomes[-1]
    assert problem is not None and problem.status == 429 and problem.kind == "rate-limited"
    names = dict(problem.headers)
    assert int(names["retry-after"]) >= 1 and names["ratelimit-limit"] == "5"
    assert names["ratelimit-remaining"] == "0" and "ratelimit-reset" in names
    ok = ctx_for(GOVERNOR)
    assert await step.run(ok) is None
    assert dict(ok.extra_response_headers)["ratelimit-limit"] == "8"
    assert rate_limit.tier_of(TRIAL) == "trial"
    assert rate_limit.tier_of(Identity(user_id="e", roles=["enterprise"])) == "enterprise"


async def test_anonymous_and_brute_force_per_ip(make_deps: Any) -> None:
    deps = make_deps()
    config = rate_limit.RateLimitConfig.from_settings(deps.settings)
    step = rate_limit.RateLimitStep(config, deps.counters)
    results = [await step.run(ctx_for(None, brute_force_route=True)) for _ in range(3)]
    assert [r is None for r in results] == [True, True, False]
    assert [await step.run(ctx_for(None)) is None for _ in range(3)] == [True, True, False]
    other_ip = ctx_for(None)
    other_ip.client_ip = "10.0.0.8"
    assert await step.run(other_ip) is None


async def test_flag_off_and_guard_off(make_deps: Any) -> None:
    deps = make_deps(flags=FixedFlags(off={"enable_rate_limiting"}))
    step = rate_limit.GUARD.create(deps.settings, deps)
    assert step is not None
    assert all([await step.run(ctx_for(USER)) is None for _ in range(10)])
    off = make_deps(guards=["auth", "policy"])
    assert rate_limit.GUARD.create(off.settings, off) is None
    assert trial_quota.GUARD.create(off.settings, off) is None
    assert budget.GUARD.create(off.settings, off) is None


async def test_trial_quota_counts_tasks_only(make_deps: Any) -> None:
    deps = make_deps(trial_daily_tasks=2)
    step = trial_quota.GUARD.create(deps.settings, deps)
    assert step is not None
    task = {"resource": "agents", "action": "execute"}
    assert await step.run(ctx_for(TRIAL, **task)) is None
    assert await step.run(ctx_for(TRIAL, resource="agents", action="read")) is None
    assert await step.run(ctx_for(USER, **task)) is None  # paid users are not counted
    marked = ctx_for(TRIAL, resource="reports", action="create",
                     policy_decision={"allow": True, "obligations": ["count_trial_task"]})
    assert await step.run(marked) is None
    problem = await step.run(ctx_for(TRIAL, **task))
    assert problem is not None and problem.status == 429
    assert problem.kind == "trial-limit-exceeded"
    assert problem.extra["reset_at"] == "2026-01-01T00:00:00Z"  # year end
    assert dict(problem.headers)["retry-after"] == str(4 * 3600)


async def test_budget_step_headers_402_and_settlement(make_deps: Any) -> None:
    deps = make_deps(agent_daily_budget_usd=0.01, cost_per_request_usd=0.004)
    step = budget.GUARD.create(deps.settings, deps)
    assert step is not None
    ctx = ctx_for(USER)
    assert await step.run(ctx) is None
    headers = dict(ctx.extra_response_headers)
    assert headers["x-budget-alert-level"] == "normal"
    assert headers["x-agent-utilization"] == "40.00"
    ctx.upstream_cost_usd = 0.007  # the backend said it cost more: charge the difference
    await step.after(ctx)
    problem = await step.run(ctx_for(USER))
    assert problem is not None and problem.status == 402 and problem.kind == "budget-exceeded"
    assert problem.extra["agent_budget"]["spent_usd"] == pytest.approx(0.007)
    assert problem.extra["platform_budget"]["limit_usd"] == 100.0
    assert dict(problem.headers)["retry-after"] == str(4 * 3600)
    assert await step.run(ctx_for(None)) is None  # anonymous calls are not charged


async def test_service_key_callers_have_their_own_tier_per_calling_address(
    make_deps: Any,
) -> None:
    deps = make_deps()
    step = rate_limit.GUARD.create(deps.settings, deps)
    assert step is not None
    service = Identity(subject="cp-registration", service_account="cp-registration",
                       roles=["service"])
    for _ in range(3):  # burst 2: three at once
        assert await step.run(ctx_for(service, client_ip="10.1.0.1")) is None
    problem = await step.run(ctx_for(service, client_ip="10.1.0.1"))
    assert problem is not None and problem.extra["tier"] == "service"
    assert await step.run(ctx_for(service, client_ip="10.1.0.2")) is None  # another caller
    assert await step.run(ctx_for(USER, client_ip="10.1.0.1")) is None  # users unaffected


async def test_no_flat_price_by_default_only_reported_cost_is_charged(make_deps: Any) -> None:
    """Without budget settings no request is refused on a made-up price (issue: the whole
    platform got 402 after ~95k calls); real cost the backend reports still counts."""
    deps = make_deps(platform_monthly_budget_usd=0.01)
    step = budget.GUARD.create(deps.settings, deps)
    assert step is not None
    for _ in range(200):
        ctx = ctx_for(USER)
        assert await step.run(ctx) is None
    assert dict(ctx.extra_response_headers)["x-platform-utilization"] == "0.00"
    ctx.upstream_cost_usd = 0.012  # an LLM call the backend metered
    await step.after(ctx)
    problem = await step.run(ctx_for(USER))
    assert problem is not None and problem.kind == "budget-exceeded"


def envelope(correlation_id: str, cost: str, ts: int, secret: bytes = b"m" * 32) -> dict:
    """An envelope signed as the platform's AI services sign it (written out here on purpose,
    independently of plant_gateway.metering)."""
    import base64
    import hashlib
    import hmac

    message = f"{ts}|{correlation_id}|120|80|gpt-x|0|{float(cost):.6f}".encode()
    mac = hmac.new(secret, message, hashlib.sha256).digest()
    return {
        "x-metering-timestamp": str(ts), "x-metering-tokens-in": "120",
        "x-metering-tokens-out": "80", "x-metering-model": "gpt-x",
        "x-metering-cache-hit": "0", "x-metering-cost-usd": cost,
        "x-metering-signature": base64.urlsafe_b64encode(mac).decode().rstrip("="),
    }


async def test_verified_metering_envelope_is_charged_before_forwarding(make_deps: Any) -> None:
    deps = make_deps(agent_daily_budget_usd=0.01, metering_envelope_secret="m" * 32)
    step = budget.GUARD.create(deps.settings, deps)
    assert step is not None
    now = int(step.clock())
    signed = ctx_for(USER, headers=envelope("c", "0.004", now))
    assert await step.run(signed) is None
    assert dict(signed.extra_response_headers)["x-agent-utilization"] == "40.00"
    forged = {**envelope("c", "0.004", now), "x-metering-cost-usd": "0.000001"}
    stale = envelope("c", "0.004", now - 3600)
    other_request = envelope("another-correlation-id", "0.004", now)
    wrong_key = envelope("c", "0.004", now, secret=b"k" * 32)
    for headers in (forged, stale, other_request, wrong_key):
        ctx = ctx_for(USER, headers=headers)
        assert await step.run(ctx) is None
        assert dict(ctx.extra_response_headers)["x-agent-utilization"] == "40.00"  # not charged
    assert await step.run(ctx_for(USER, headers=envelope("c", "0.005", now))) is None
    problem = await step.run(ctx_for(USER, headers=envelope("c", "0.002", now)))
    assert problem is not None and problem.extra["exceeded"] == "agent"


async def test_budget_thresholds_from_flag(make_deps: Any) -> None:
    flags = FixedFlags(values={"budget_alert_thresholds": [0.1, 0.2, 1.0]})
    deps = make_deps(flags=flags, cost_per_request_usd=0.15, platform_monthly_budget_usd=1.0)
    step = budget.GUARD.create(deps.settings, deps)
    assert step is not None
    first = ctx_for(GOVERNOR)
    assert await step.run(first) is None
    assert dict(first.extra_response_headers)["x-budget-alert-level"] == "warning"
    assert await step.run(ctx_for(USER)) is None  # platform at 15 %, below "high" (20 %)
    denied = await step.run(ctx_for(USER))  # platform at 30 % >= high: only privileged pass
    assert denied is not None and denied.extra["exceeded"] == "platform-high"
    assert await step.run(ctx_for(GOVERNOR)) is None


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_outage_fail_mode_then_recovery(
    redis_server: RedisServer, redis_prefix: str, mode: str
) -> None:
    s = settings_for(redis_server.url, redis_prefix, rate_limit_fail_mode=mode,
                     budget_fail_mode=mode)
    counters = RedisCounters(s, redis_server.url)
    await counters.start()
    deps = Dependencies(settings=s, counters=counters, flags=None)  # type: ignore[arg-type]
    rl, bg = rate_limit.GUARD.create(s, deps), budget.GUARD.create(s, deps)
    assert rl is not None and bg is not None
    try:
        assert await rl.run(ctx_for(USER)) is None
        assert (await counters.check()).ok
        redis_server.stop()
        for step in (rl, bg):
            problem = await step.run(ctx_for(USER))
            if mode == "closed":
                assert problem is not None and problem.status == 503
                assert problem.kind == "dependency-unavailable"
            else:
                assert problem is None
        assert not (await counters.check()).ok
        redis_server.start()  # empty Redis: scripts are gone too (NOSCRIPT path)
        ok = ctx_for(USER)
        assert await rl.run(ok) is None and await bg.run(ok) is None
        assert dict(ok.extra_response_headers)["ratelimit-remaining"] == "4"
        assert (await counters.check()).ok
    finally:
        await counters.close()
