"""The in-process batch fast path (``execute_now``) answers exactly as ``execute`` does.

Two ``MemoryCounters`` on the same fixed clock get the same op sequences, one through the
coroutine path and one through the plain one; every result and every stored counter must be
equal. Also pins the GCRA derived fields and the cached rate-limit header strings.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from plant_gateway.backends.base import BudgetRequest, RateDecision
from plant_gateway.counters import (
    AuthStateOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
)
from plant_gateway.counters.common import Gcra, day_ttl, month_ttl, utc_day, utc_month
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.guards.rate_limit import rate_headers
from plant_gateway.settings import Settings

NOW = 1_764_000_000.25


def memory() -> MemoryCounters:
    return MemoryCounters(Settings(plant_backend_url="http://127.0.0.1:9"), clock=lambda: NOW)


def ops() -> list[CounterOp]:
    tight = BudgetRequest(
        cost_usd=0.4, platform_limit=100.0, agent_id="a1", agent_limit=1.0,
        customer_id="c1", customer_limit=50.0,
    )
    return [
        AuthStateOp("jti-1", "user-1"),
        RateLimitOp("user:1", 10, 60.0, 1),
        DailyQuotaOp("trial:1", 2, None),
        BudgetChargeOp(tight),
    ]


@pytest.mark.parametrize("rounds", [1, 4])
def test_execute_now_matches_execute(rounds: int) -> None:
    slow, fast = memory(), memory()
    for _ in range(rounds):  # later rounds hit the rate limit, the quota and the agent budget
        expected: list[Any] = asyncio.run(slow.execute(ops()))
        got = fast.execute_now(ops())
        assert [repr(r) for r in got] == [repr(r) for r in expected]
    assert fast._data == slow._data
    if rounds > 1:
        assert isinstance(got[1], RateDecision) and not got[1].allowed
        assert got[3].allowed is False and got[3].extra["reason"] == "agent"


def test_stored_counters_and_expiry() -> None:
    fast = memory()
    results = fast.execute_now(ops())
    day, month = utc_day(NOW), utc_month(NOW)
    rate = results[1]
    assert fast._data == {
        "rl:user:1": (int(NOW * 1_000_000) + 6_000_000, NOW + (rate.reset_s + 1)),
        f"q:trial:1:{day}": (1, NOW + day_ttl(NOW)),
        f"b:platform:{month}": (400_000, NOW + month_ttl(NOW)),
        f"b:agent:a1:{day}": (400_000, NOW + day_ttl(NOW)),
        f"b:customer:c1:{month}": (400_000, NOW + month_ttl(NOW)),
    }
    assert results[0] == (False, None)
    assert (rate.allowed, rate.remaining, rate.reset_s) == (True, 1, 6.0)
    budget = results[3]
    assert (budget.alert_level, budget.agent_spent, budget.platform_spent) == (
        "normal", 0.4, 0.4,
    )


def test_gcra_derived_fields() -> None:
    for limit, period, burst in [(10, 60.0, 1), (3, 1.0, 0), (10**9, 3600.0, 10**6), (7, 0.5, 3)]:
        gcra = Gcra(limit, period, burst)
        interval = max(1, round(period * 1_000_000 / limit))
        assert (gcra.interval, gcra.window) == (interval, (burst + 1) * interval)
        assert gcra == Gcra(limit, period, burst)
        assert repr(gcra) == f"Gcra(limit={limit}, period_s={period}, burst={burst})"


def test_rate_headers_per_limit() -> None:
    first = rate_headers(RateDecision(True, 10, 4, 2.5), 60.0)
    second = rate_headers(RateDecision(False, 20, 0, 9.0, 1.2), 60.0)
    assert first == [
        ("ratelimit-limit", "10"), ("ratelimit-remaining", "4"),
        ("ratelimit-reset", "3"), ("ratelimit-policy", "10;w=60"),
    ]
    assert second == [
        ("ratelimit-limit", "20"), ("ratelimit-remaining", "0"),
        ("ratelimit-reset", "2"), ("ratelimit-policy", "20;w=60"),
    ]
