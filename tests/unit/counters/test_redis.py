"""Redis Cluster key layout: every Lua script's keys hash to one slot, whatever the ids are.

Each op the Redis counters can plan is planned with awkward prefixes and ids (braces included)
and the slots of its EVALSHA keys are computed with redis-py's ``key_slot``.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from plant_gateway.backends.base import BudgetCharge, BudgetRequest
from plant_gateway.counters import (
    ApprovalConsumeOp,
    ApprovalReleaseOp,
    AuthStateOp,
    BudgetAdjustOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
    ReleaseQuotaOp,
)
from plant_gateway.counters.redis import RedisCounters, script_slots
from plant_gateway.settings import Settings, SettingsError

PREFIXES = ["", "gw:", "a{b}:", "x{", "}{", "{budget}:"]
PRINCIPALS = ["user:u1", "ip:::1", "bf:10.0.0.1", "user:{evil}", "user:}{", ""]
AGENTS: list[str | None] = ["agent-1", "{x}", "}", None]
CUSTOMERS: list[str | None] = ["c1", "}{", None]
NOW = 1_741_953_600.0  # 2025-03-14 12:00 UTC


def counters(prefix: str) -> RedisCounters:
    s = Settings(plant_backend_url="http://127.0.0.1:9", redis_key_prefix=prefix,
                 redis_url="redis://127.0.0.1:9/0")
    return RedisCounters(s, "redis://127.0.0.1:9/0", clock=lambda: NOW)


def sample_ops() -> dict[str, list[CounterOp]]:
    """At least one op of every kind the backend plans (checked against its ``_plan_*``)."""
    budgets = [
        BudgetRequest(0.01, 100.0, agent, 1.0 if agent else None, customer,
                      5.0 if customer else None)
        for agent, customer in itertools.product(AGENTS, CUSTOMERS)
    ]
    charges = [BudgetCharge("20250314", "202503", a, c, 0.01)
               for a, c in itertools.product(AGENTS, CUSTOMERS)]
    return {
        "auth_state": [AuthStateOp("jti-1", "user-1")],
        "rate_limit": [RateLimitOp(p, 100, 3600, 10) for p in PRINCIPALS],
        "daily_quota": [DailyQuotaOp(p, 10, NOW) for p in PRINCIPALS],
        "release_quota": [ReleaseQuotaOp(p, NOW) for p in PRINCIPALS],
        "budget_charge": [BudgetChargeOp(b) for b in budgets],
        "budget_adjust": [BudgetAdjustOp(c, 0.002) for c in charges],
        "approval_consume": [ApprovalConsumeOp("APR-x", 60)],
        "approval_release": [ApprovalReleaseOp("APR-x")],
    }


def evalsha_commands(backend: RedisCounters, op: CounterOp) -> list[tuple[Any, ...]]:
    commands, _ = backend._plan(op)
    return [c for c in commands if c[0] == "EVALSHA"]


def test_samples_cover_every_planned_op() -> None:
    planned = {name.removeprefix("_plan_") for name in dir(RedisCounters)
               if name.startswith("_plan_")}
    assert planned == set(sample_ops())


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_script_touches_exactly_one_slot(prefix: str) -> None:
    backend = counters(prefix)
    checked = 0
    for kind, kind_ops in sample_ops().items():
        for op in kind_ops:
            for command in evalsha_commands(backend, op):
                assert int(command[2]) >= 1, (kind, command)
                assert len(script_slots(command)) == 1, (kind, command)
                checked += 1
    ops = sample_ops()
    plain = ("auth_state", "approval_consume", "approval_release")  # plain commands, no script
    assert checked == sum(len(ops[k]) for k in ops if k not in plain)  # one script per op


@pytest.mark.parametrize("prefix", PREFIXES)
def test_all_budget_keys_share_the_one_budget_slot(prefix: str) -> None:
    backend = counters(prefix)
    ops = sample_ops()
    slots = {
        slot
        for op in ops["budget_charge"] + ops["budget_adjust"]
        for command in evalsha_commands(backend, op)
        for slot in script_slots(command)
    }
    assert len(slots) == 1  # platform, every agent and customer: one slot (the hot one)


def test_principals_spread_over_slots() -> None:
    backend = counters("gw:")
    slots = {
        slot
        for i in range(200)
        for command in evalsha_commands(backend, RateLimitOp(f"user:{i}", 1, 1, 0))
        for slot in script_slots(command)
    }
    assert len(slots) > 150  # per-principal tags: rate limits scale out with the cluster


@pytest.mark.parametrize("url", ["unix:///tmp/counters.sock", "redis://127.0.0.1:6379/2"])
def test_cluster_mode_refuses_urls_a_cluster_cannot_serve(url: str) -> None:
    s = Settings(plant_backend_url="http://127.0.0.1:9", redis_url=url, redis_cluster=True)
    with pytest.raises(SettingsError, match="REDIS_CLUSTER"):
        RedisCounters(s, url)
