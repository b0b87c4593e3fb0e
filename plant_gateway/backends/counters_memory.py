"""In-process counters: the embedded default for one worker process (no Redis).

Same semantics as the Redis backend; each method runs without an ``await`` in between its
read and its write, so on one event loop every check-and-update is atomic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from plant_gateway.backends.base import (
    BudgetCharge,
    BudgetDecision,
    BudgetRequest,
    CounterOp,
    DependencyError,
    DependencyStatus,
    RateDecision,
)
from plant_gateway.backends.counters import (
    GRACE_S,
    Clock,
    Gcra,
    alert_level,
    budget_verdict,
    day_ttl,
    month_ttl,
    next_utc_midnight,
    next_utc_month,
    to_micro,
    utc_day,
    utc_month,
)

if TYPE_CHECKING:
    from plant_gateway.settings import Settings


class UtcWindows:
    """The UTC day/month key strings and next boundaries, recomputed only when a boundary passes.

    Valid for ``start <= now < end`` (one UTC day), so an injected clock may jump either way.
    """

    __slots__ = ("day", "month", "midnight", "month_end", "start", "end")

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.day = self.month = ""
        self.midnight = self.month_end = 0.0

    def at(self, now: float) -> UtcWindows:
        if not self.start <= now < self.end:
            day_start = datetime.fromtimestamp(now, UTC).replace(
                hour=0, minute=0, second=0, microsecond=0
            )
            self.day, self.month = utc_day(now), utc_month(now)
            self.midnight = next_utc_midnight(now).timestamp()
            self.month_end = next_utc_month(now).timestamp()
            self.start, self.end = day_start.timestamp(), self.midnight
        return self

    def day_ttl(self, now: float) -> int:
        """``counters.day_ttl(now)`` without date arithmetic."""
        return int(self.midnight - now) + GRACE_S

    def month_ttl(self, now: float) -> int:
        return int(self.month_end - now) + GRACE_S


class MemoryCounters:
    """Dict of key -> (value, expires_at); expired entries are dropped when read or swept."""

    name = "counters"

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or time.time
        self._data: dict[str, tuple[int, float | None]] = {}
        self._ops = 0
        self._windows = UtcWindows()
        self._gcra: dict[tuple[int, float, int], Gcra] = {}

    # --- Dependency ---------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()

    async def check(self) -> DependencyStatus:
        return DependencyStatus(self.name, ok=True, detail="in-process (single instance)")

    # --- storage ------------------------------------------------------------------------
    def _get(self, key: str, now: float | None = None) -> int | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= (self.clock() if now is None else now):
            del self._data[key]
            return None
        return value

    def _set(self, key: str, value: int, ttl_s: float | None, now: float | None = None) -> None:
        if ttl_s is None:
            self._data[key] = (value, None)
        else:
            self._data[key] = (value, (self.clock() if now is None else now) + ttl_s)
        self._ops += 1
        if self._ops % 10_000 == 0:
            self._sweep()

    def _incr(self, key: str, by: int, ttl_s: float, now: float | None = None) -> int:
        value = (self._get(key, now) or 0) + by
        self._set(key, value, ttl_s, now)
        return value

    def _sweep(self) -> None:
        now = self.clock()
        for key in [k for k, (_, exp) in self._data.items() if exp is not None and exp <= now]:
            del self._data[key]

    # --- revocation and session invalidation -----------------------------------------------
    async def is_revoked(self, jti: str) -> bool:
        return self._get(self.settings.revoked_prefix + jti) is not None

    async def revoke(self, jti: str, ttl_s: int) -> None:
        self._set(self.settings.revoked_prefix + jti, 1, max(1, ttl_s))

    async def token_version(self, user_id: str) -> int | None:
        return self._get(self.settings.token_version_prefix + user_id)

    async def bump_token_version(self, user_id: str) -> int:
        key = self.settings.token_version_prefix + user_id
        value = (self._get(key) or 0) + 1
        self._set(key, value, None)
        return value

    async def auth_state(self, jti: str | None, user_id: str | None) -> tuple[bool, int | None]:
        # is_revoked / token_version inlined: no coroutine per lookup on every request
        now = self.clock()
        revoked = False
        if jti:
            revoked = self._get(self.settings.revoked_prefix + jti, now) is not None
        version = self._get(self.settings.token_version_prefix + user_id, now) if user_id else None
        return revoked, version

    # --- rate limit and quota -------------------------------------------------------------
    async def rate_limit(self, key: str, limit: int, period_s: float, burst: int) -> RateDecision:
        gcra = self._gcra.get((limit, period_s, burst))
        if gcra is None:
            if len(self._gcra) >= 1024:
                self._gcra.clear()
            gcra = self._gcra[(limit, period_s, burst)] = Gcra(limit, period_s, burst)
        now = self.clock()
        now_us = int(now * 1_000_000)
        full_key = f"rl:{key}"
        allowed, tat, remaining, reset_s, retry = gcra.step(self._get(full_key, now), now_us)
        if allowed:
            self._set(full_key, tat, reset_s + 1, now)
        return RateDecision(allowed, limit, remaining, reset_s, retry)

    async def daily_quota(self, key: str, limit: int, now: float | None = None) -> RateDecision:
        now = self.clock() if now is None else now
        windows = self._windows.at(now)
        full_key = f"q:{key}:{windows.day}"
        used = self._get(full_key) or 0
        reset_s = windows.midnight - now
        if used >= limit:
            return RateDecision(False, limit, 0, reset_s, reset_s)
        used = self._incr(full_key, 1, windows.day_ttl(now))
        return RateDecision(True, limit, limit - used, reset_s)

    # --- budget ---------------------------------------------------------------------------
    def _budget_keys(
        self, day: str, month: str, agent: str | None, customer: str | None
    ) -> list[str]:
        keys = [f"b:platform:{month}"]
        keys.append(f"b:agent:{agent}:{day}" if agent else "")
        keys.append(f"b:customer:{customer}:{month}" if customer else "")
        return keys

    async def budget_charge(self, request: BudgetRequest) -> BudgetDecision:
        now = self.clock()
        windows = self._windows.at(now)
        day, month = windows.day, windows.month
        keys = self._budget_keys(day, month, request.agent_id, request.customer_id)
        spent = [self._get(k, now) or 0 if k else 0 for k in keys]
        allowed, reason = budget_verdict(request, *spent)
        if allowed:
            cost = to_micro(request.cost_usd)
            month_s = windows.month_ttl(now)
            ttls = (month_s, windows.day_ttl(now), month_s)
            spent = [
                self._incr(k, cost, t, now) if k else 0 for k, t in zip(keys, ttls, strict=True)
            ]
        charge = BudgetCharge(day, month, request.agent_id, request.customer_id, request.cost_usd)
        return make_budget_decision(request, allowed, reason, spent, charge if allowed else None)

    async def budget_adjust(self, charge: BudgetCharge, delta_usd: float) -> None:
        now = self.clock()
        keys = self._budget_keys(charge.day, charge.month, charge.agent_id, charge.customer_id)
        delta = to_micro(delta_usd)
        ttls = (month_ttl(now), day_ttl(now), month_ttl(now))
        for key, ttl in zip(keys, ttls, strict=True):
            if key:
                self._incr(key, delta, ttl)

    async def release_quota(self, key: str, now: float) -> None:
        full_key = f"q:{key}:{utc_day(now)}"
        used = self._get(full_key)
        if used:
            self._set(full_key, used - 1, day_ttl(now))

    # --- batches ----------------------------------------------------------------------------
    async def execute(self, ops: Sequence[CounterOp]) -> list[Any]:
        """In process there is no round trip: run the ops one after another."""
        results: list[Any] = []
        for op in ops:
            try:
                results.append(await getattr(self, op.kind)(*op.args))
            except DependencyError as exc:
                results.append(exc)
        return results


def make_budget_decision(
    request: BudgetRequest,
    allowed: bool,
    reason: str,
    spent_micro: list[int],
    charge: BudgetCharge | None,
) -> BudgetDecision:
    """Build the decision both backends return from micro-dollars spent (after any charge)."""
    platform, agent, customer = (s / 1_000_000 for s in spent_micro)
    has_agent = request.agent_id is not None and request.agent_limit is not None
    has_customer = request.customer_id is not None and request.customer_limit is not None
    utils = [platform / request.platform_limit]
    if has_agent:
        utils.append(agent / request.agent_limit)  # type: ignore[operator]
    if has_customer:
        utils.append(customer / request.customer_limit)  # type: ignore[operator]
    level = "critical" if reason and reason != "platform-high" else alert_level(
        max(utils), request.thresholds
    )
    return BudgetDecision(
        allowed=allowed,
        alert_level=level,
        platform_spent=platform,
        platform_limit=request.platform_limit,
        agent_spent=agent if has_agent else None,
        agent_limit=request.agent_limit if has_agent else None,
        customer_spent=customer if has_customer else None,
        customer_limit=request.customer_limit if has_customer else None,
        extra={"reason": reason, "charge": charge},
    )
