"""Counters for the guards: revocation, rate limits, trial quota, budgets, approvals.

``create(settings)`` picks the backend (imported lazily); the typed ops and shared names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plant_gateway.counters.common import Clock, next_utc_midnight, next_utc_month
from plant_gateway.counters.embedded import redis_server_binary, start_embedded_redis
from plant_gateway.counters.ops import (
    ApprovalConsumeOp,
    ApprovalReleaseOp,
    AuthStateOp,
    BudgetAdjustOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
    ReleaseQuotaOp,
    call,
)
from plant_gateway.settings import SettingsError

if TYPE_CHECKING:
    from plant_gateway.backends.base import Counters
    from plant_gateway.settings import Settings

__all__ = [
    "ApprovalConsumeOp",
    "ApprovalReleaseOp",
    "AuthStateOp",
    "BudgetAdjustOp",
    "BudgetChargeOp",
    "Clock",
    "CounterOp",
    "DailyQuotaOp",
    "RateLimitOp",
    "ReleaseQuotaOp",
    "call",
    "create",
    "next_utc_midnight",
    "next_utc_month",
    "redis_server_binary",
    "start_embedded_redis",
]


def create(settings: Settings, clock: Clock | None = None) -> Counters:
    """The Redis backend when a Redis URL is configured, else the in-process one.

    With ``WORKERS`` > 1 and no Redis, per-process counters would not be limits (the deployed
    gateway's were), so the gateway uses an embedded ``redis-server`` shared by all workers:
    ``plant-gateway serve`` calls ``start_embedded_redis`` in the parent process and hands its
    unix-socket URL to the workers as ``REDIS_URL``. Called directly with ``workers > 1`` and
    no Redis, ``create`` refuses with a clear ``SettingsError`` instead of guessing. Both
    backends are imported here only, when chosen: ``redis`` pulls in redis-py and hiredis.
    """
    url = settings.effective_redis_url
    if url:
        from plant_gateway.counters.redis import RedisCounters

        return RedisCounters(settings, url, clock=clock)
    if settings.workers > 1:
        raise SettingsError(
            "REDIS_URL: WORKERS > 1 needs shared counters; set REDIS_URL (or REDIS_HOST), or "
            "start with `plant-gateway serve`, which runs an embedded Redis for its workers"
        )
    from plant_gateway.counters.memory import MemoryCounters

    return MemoryCounters(settings, clock=clock)
