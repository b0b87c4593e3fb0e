"""Behavioural suite of the counters backends: the same tests against in-process, real Redis
and a real local Redis Cluster (3 primaries, ``REDIS_CLUSTER=true``).

Exact limits under concurrency, UTC day/month rollover with an injected clock, budgets charged
exactly once, revocation shared by instances.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from plant_gateway.backends.base import BudgetRequest
from plant_gateway.counters import ApprovalConsumeOp
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.counters.redis import RedisCounters
from plant_gateway.settings import Settings


class FakeClock:
    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when.timestamp()


def make_settings(
    redis_url: str | None, prefix: str, cluster: bool = False, **extra: Any
) -> Settings:
    return Settings(
        plant_backend_url="http://127.0.0.1:9",
        redis_url=redis_url,
        redis_cluster=cluster,
        redis_key_prefix=prefix,
        revoked_prefix=f"{prefix}revoked_access:",
        token_version_prefix=f"{prefix}token_version:",
        **extra,
    )


Factory = Callable[[], MemoryCounters | RedisCounters]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2025, 3, 14, 12, 0, tzinfo=UTC))


@pytest.fixture(params=["memory", "redis", "cluster"])
async def instances(
    request: pytest.FixtureRequest, redis_prefix: str, clock: FakeClock
) -> AsyncIterator[Factory]:
    """A factory of counter instances sharing one store (one process for memory)."""
    created: list[MemoryCounters | RedisCounters] = []
    if request.param == "memory":
        shared = MemoryCounters(make_settings(None, redis_prefix), clock=clock)
        created.append(shared)

        def factory() -> MemoryCounters | RedisCounters:
            return shared
    else:
        cluster = request.param == "cluster"
        url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
        settings = make_settings(url, redis_prefix, cluster=cluster)

        def factory() -> MemoryCounters | RedisCounters:
            counters = RedisCounters(settings, url, clock=clock)
            created.append(counters)
            return counters

    yield factory
    for counters in created:
        await counters.close()


async def test_exactly_n_of_n_plus_k_concurrent_pass(instances: Factory) -> None:
    a, b = instances(), instances()
    await a.start()
    n, k = 25, 15
    calls = [(a if i % 2 else b).rate_limit("user:u1", n, 3600, n - 1) for i in range(n + k)]
    results = await asyncio.gather(*calls)
    assert sum(r.allowed for r in results) == n
    denied = [r for r in results if not r.allowed]
    assert all(r.retry_after_s > 0 and r.remaining == 0 for r in denied)


async def test_rate_limit_refills_with_time(instances: Factory, clock: FakeClock) -> None:
    c = instances()
    assert [(await c.rate_limit("ip:1.2.3.4", 60, 60, 1)).allowed for _ in range(3)] == [
        True, True, False,
    ]
    clock.now += 1.0  # one emission interval
    assert (await c.rate_limit("ip:1.2.3.4", 60, 60, 1)).allowed
    assert not (await c.rate_limit("ip:1.2.3.4", 60, 60, 1)).allowed
    assert (await c.rate_limit("ip:5.6.7.8", 60, 60, 1)).allowed  # other principal


async def test_quota_exact_under_concurrency(instances: Factory) -> None:
    a, b = instances(), instances()
    results = await asyncio.gather(
        *((a if i % 2 else b).daily_quota("trial:u", 10) for i in range(30))
    )
    assert sum(r.allowed for r in results) == 10


@pytest.mark.parametrize(
    ("start", "after"),
    [
        (datetime(2024, 12, 31, 23, 59, 58, tzinfo=UTC), datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC)),
        (datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC), datetime(2024, 3, 1, 0, 0, 1, tzinfo=UTC)),
        (datetime(2025, 4, 30, 23, 59, 58, tzinfo=UTC), datetime(2025, 5, 1, 0, 0, 1, tzinfo=UTC)),
    ],
)
async def test_quota_rolls_over_at_utc_midnight(
    instances: Factory, clock: FakeClock, start: datetime, after: datetime
) -> None:
    clock.set(start)
    c = instances()
    assert (await c.daily_quota("trial:roll", 1)).allowed
    denied = await c.daily_quota("trial:roll", 1)
    assert not denied.allowed
    assert denied.reset_s == pytest.approx(2.0)  # the next midnight, across month/year ends
    clock.set(after)
    assert (await c.daily_quota("trial:roll", 1)).allowed


def budget(cost: float = 0.01, **kw: object) -> BudgetRequest:
    base: dict[str, object] = {
        "cost_usd": cost, "platform_limit": 100.0, "agent_id": "agent-1", "agent_limit": 1.0,
    }
    base.update(kw)
    return BudgetRequest(**base)  # type: ignore[arg-type]


async def test_budget_charged_exactly_once_under_concurrency(instances: Factory) -> None:
    a, b = instances(), instances()
    results = await asyncio.gather(
        *((a if i % 2 else b).budget_charge(budget(0.01, agent_limit=0.25)) for i in range(60))
    )
    assert sum(r.allowed for r in results) == 25
    final = await a.budget_charge(budget(0.0, agent_limit=0.25))
    assert final.agent_spent == pytest.approx(0.25)
    assert final.platform_spent == pytest.approx(0.25)


async def test_budget_alert_levels_and_high_rule(instances: Factory) -> None:
    c = instances()
    first = await c.budget_charge(budget(79.0, agent_id=None, agent_limit=None))
    assert first.allowed and first.alert_level == "normal"
    warn = await c.budget_charge(budget(1.0, agent_id=None, agent_limit=None))
    assert warn.alert_level == "warning"
    high = await c.budget_charge(budget(15.5, agent_id="gov", agent_limit=None))
    assert high.allowed and high.alert_level == "high"
    denied = await c.budget_charge(budget(0.01, agent_id="worker", agent_limit=5.0))
    assert not denied.allowed and denied.extra["reason"] == "platform-high"
    critical_agent = await c.budget_charge(budget(0.01, privileged=True))
    assert critical_agent.allowed
    over = await c.budget_charge(budget(10.0, privileged=True, agent_limit=50.0))
    assert not over.allowed and over.alert_level == "critical"
    assert over.extra["reason"] == "platform"
    governor = await c.budget_charge(budget(10.0, privileged=True, override=True))
    assert governor.allowed and governor.alert_level == "critical"


async def test_budget_rolls_over_by_day_and_month(instances: Factory, clock: FakeClock) -> None:
    clock.set(datetime(2025, 1, 31, 23, 0, tzinfo=UTC))
    c = instances()
    assert (await c.budget_charge(budget(1.0))).allowed
    agent_full = await c.budget_charge(budget(0.01))
    assert not agent_full.allowed and agent_full.extra["reason"] == "agent"
    clock.set(datetime(2025, 2, 1, 0, 1, tzinfo=UTC))
    fresh = await c.budget_charge(budget(0.5))
    assert fresh.allowed
    assert fresh.agent_spent == pytest.approx(0.5)
    assert fresh.platform_spent == pytest.approx(0.5)  # new month too


async def test_budget_adjust_charges_the_difference(instances: Factory) -> None:
    c = instances()
    charged = await c.budget_charge(budget(0.001, customer_id="c1", customer_limit=10.0))
    charge = charged.extra["charge"]
    await c.budget_adjust(charge, 0.004)
    after = await c.budget_charge(budget(0.0, customer_id="c1", customer_limit=10.0))
    assert after.platform_spent == pytest.approx(0.005)
    assert after.agent_spent == pytest.approx(0.005)
    assert after.customer_spent == pytest.approx(0.005)


async def test_revocation_and_token_version_visible_to_all_instances(instances: Factory) -> None:
    a, b = instances(), instances()
    assert await b.auth_state("jti-1", "user-1") == (False, None)
    await a.revoke("jti-1", 60)
    assert await a.bump_token_version("user-1") == 1
    assert await b.bump_token_version("user-1") == 2
    assert await b.is_revoked("jti-1")
    assert await b.auth_state("jti-1", "user-1") == (True, 2)
    assert await b.auth_state("jti-2", None) == (False, None)


async def test_an_approval_is_consumed_once_across_instances(instances: Factory) -> None:
    a, b = instances(), instances()
    results = await asyncio.gather(
        *((a if i % 2 else b).approval_consume("APR-once", 600) for i in range(20))
    )
    assert sorted(results) == [False] * 19 + [True]
    assert await b.approval_consume("APR-other", 600)  # ids are independent
    [batched] = await a.execute([ApprovalConsumeOp("APR-once", 600)])
    assert batched is False


async def test_a_released_approval_can_be_used_again(instances: Factory) -> None:
    a, b = instances(), instances()
    assert await a.approval_consume("APR-refused", 600)
    await b.approval_release("APR-refused")
    assert await b.approval_consume("APR-refused", 600)
    assert not await a.approval_consume("APR-refused", 600)


async def test_a_consumed_approval_is_kept_for_its_ttl(
    instances: Factory, clock: FakeClock
) -> None:
    c = instances()
    assert await c.approval_consume("APR-ttl", 120)
    if isinstance(c, RedisCounters):  # Redis expires keys on its own clock: read the TTL
        ttl = await c.client.ttl(c.approval_key("APR-ttl"))
        assert 0 < ttl <= 120
        return
    clock.now += 119
    assert not await c.approval_consume("APR-ttl", 120)
    clock.now += 2
    assert await c.approval_consume("APR-ttl", 120)
