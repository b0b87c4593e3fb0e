"""In-process counters: the embedded default for one worker process (no Redis).

Same semantics as the Redis backend; each method runs without an ``await`` in between its
read and its write, so on one event loop every check-and-update is atomic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, assert_never

from plant_gateway.backends.base import (
    BudgetCharge,
    BudgetDecision,
    BudgetRequest,
    DependencyError,
    DependencyStatus,
    RateDecision,
)
from plant_gateway.counters.common import (
    MICRO,
    Clock,
    Gcra,
    UtcWindows,
    budget_verdict,
    day_ttl,
    make_budget_decision,
    month_ttl,
    to_micro,
    utc_day,
)
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
)
from plant_gateway.memo import BoundedMemo

if TYPE_CHECKING:
    from plant_gateway.settings import Settings

_GCRA_MEMO_LIMIT = 1024  # distinct (limit, period, burst) triples: configured, so few in practice


class MemoryCounters:
    """Dict of key -> (value, expires_at); expired entries are dropped when read or swept."""

    name = "counters"

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or time.time
        self._data: dict[str, tuple[int, float | None]] = {}
        self._ops = 0
        self._windows = UtcWindows()
        self._gcra: BoundedMemo[tuple[int, float, int], Gcra] = BoundedMemo(_GCRA_MEMO_LIMIT)

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
        expires = item[1]
        if expires is not None and expires <= (self.clock() if now is None else now):
            del self._data[key]
            return None
        return item[0]

    def _set(self, key: str, value: int, ttl_s: float | None, now: float | None = None) -> None:
        if ttl_s is None:
            self._data[key] = (value, None)
        else:
            self._data[key] = (value, (self.clock() if now is None else now) + ttl_s)
        self._ops += 1
        if self._ops % 10_000 == 0:
            self._sweep()

    def _live(self, key: str, now: float) -> int:
        """``_get(key, now) or 0``: the hot paths' read of a counter that expires."""
        item = self._data.get(key)
        if item is None:
            return 0
        expires = item[1]
        if expires is not None and expires <= now:
            del self._data[key]
            return 0
        return item[0]

    def _put(self, key: str, value: int, expires_at: float) -> None:
        """``_set`` with the expiry instant worked out by the caller."""
        self._data[key] = (value, expires_at)
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
        return self._auth_state(jti, user_id)

    def _auth_state(self, jti: str | None, user_id: str | None) -> tuple[bool, int | None]:
        # is_revoked / token_version inlined: no coroutine per lookup on every request
        # a miss (the usual answer) needs no _get call: only a hit can have expired
        now = self.clock()
        data, settings = self._data, self.settings
        revoked = False
        if jti:
            key = settings.revoked_prefix + jti
            revoked = key in data and self._get(key, now) is not None
        version = None
        if user_id:
            key = settings.token_version_prefix + user_id
            version = self._get(key, now) if key in data else None
        return revoked, version

    # --- rate limit and quota -------------------------------------------------------------
    async def rate_limit(self, key: str, limit: int, period_s: float, burst: int) -> RateDecision:
        return self._rate_limit(key, limit, period_s, burst)

    def _rate_limit(self, key: str, limit: int, period_s: float, burst: int) -> RateDecision:
        gcra = self._gcra.data.get((limit, period_s, burst))
        if gcra is None:
            gcra = self._gcra.put((limit, period_s, burst), Gcra(limit, period_s, burst))
        now = self.clock()
        full_key = "rl:" + key
        allowed, tat, remaining, reset_s, retry = gcra.step(
            self._live(full_key, now), int(now * 1_000_000)
        )
        if allowed:
            self._put(full_key, tat, now + (reset_s + 1))
        return RateDecision(allowed, limit, remaining, reset_s, retry)

    async def daily_quota(self, key: str, limit: int, now: float | None = None) -> RateDecision:
        return self._daily_quota(key, limit, now)

    def _daily_quota(self, key: str, limit: int, now: float | None = None) -> RateDecision:
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
        return self._budget_charge(request)

    def _budget_charge(self, request: BudgetRequest) -> BudgetDecision:
        now = self.clock()
        windows = self._windows.at(now)
        day, month = windows.day, windows.month
        agent, customer = request.agent_id, request.customer_id
        platform_key = f"b:platform:{month}"
        agent_key = f"b:agent:{agent}:{day}" if agent else ""
        customer_key = f"b:customer:{customer}:{month}" if customer else ""
        live = self._live
        platform = live(platform_key, now)
        agent_spent = live(agent_key, now) if agent_key else 0
        customer_spent = live(customer_key, now) if customer_key else 0
        allowed, reason = budget_verdict(request, platform, agent_spent, customer_spent)
        charge = None
        if allowed:
            cost = int(round(request.cost_usd * MICRO))  # to_micro, inlined
            month_end = now + windows.month_ttl(now)
            platform += cost
            self._put(platform_key, platform, month_end)
            if agent_key:
                agent_spent += cost
                self._put(agent_key, agent_spent, now + windows.day_ttl(now))
            if customer_key:
                customer_spent += cost
                self._put(customer_key, customer_spent, month_end)
            charge = BudgetCharge(day, month, agent, customer, request.cost_usd)
        return make_budget_decision(
            request, allowed, reason, [platform, agent_spent, customer_spent], charge
        )

    async def budget_adjust(self, charge: BudgetCharge, delta_usd: float) -> None:
        self._budget_adjust(charge, delta_usd)

    def _budget_adjust(self, charge: BudgetCharge, delta_usd: float) -> None:
        now = self.clock()
        keys = self._budget_keys(charge.day, charge.month, charge.agent_id, charge.customer_id)
        delta = to_micro(delta_usd)
        ttls = (month_ttl(now), day_ttl(now), month_ttl(now))
        for key, ttl in zip(keys, ttls, strict=True):
            if key:
                self._incr(key, delta, ttl)

    async def release_quota(self, key: str, now: float) -> None:
        self._release_quota(key, now)

    def _release_quota(self, key: str, now: float) -> None:
        full_key = f"q:{key}:{utc_day(now)}"
        used = self._get(full_key)
        if used:
            self._set(full_key, used - 1, day_ttl(now))

    # --- Governor approvals: single use ---------------------------------------------------
    async def approval_consume(self, approval_id: str, ttl_s: int) -> bool:
        return self._approval_consume(approval_id, ttl_s)

    def _approval_consume(self, approval_id: str, ttl_s: int) -> bool:
        key = "ap:" + approval_id
        if self._get(key) is not None:
            return False
        self._set(key, 1, max(1, ttl_s))
        return True

    async def approval_release(self, approval_id: str) -> None:
        self._approval_release(approval_id)

    def _approval_release(self, approval_id: str) -> None:
        self._data.pop("ap:" + approval_id, None)

    # --- batches ----------------------------------------------------------------------------
    async def execute(self, ops: Sequence[CounterOp]) -> list[Any]:
        """In process there is no round trip: run the ops one after another."""
        return self.execute_now(ops)

    def execute_now(self, ops: Sequence[CounterOp]) -> list[Any]:
        """``execute`` without a coroutine; the admit step calls it on every request when the
        store is in process."""
        results: list[Any] = []
        for op in ops:
            try:
                results.append(self._run(op))
            except DependencyError as exc:
                results.append(exc)
        return results

    def _run(self, op: CounterOp) -> Any:
        """The result of ``op``'s method, by the op's type (the most frequent first)."""
        match op:
            case AuthStateOp():
                return self._auth_state(op.jti, op.user_id)
            case RateLimitOp():
                return self._rate_limit(op.key, op.limit, op.period_s, op.burst)
            case DailyQuotaOp():
                return self._daily_quota(op.key, op.limit, op.now)
            case BudgetChargeOp():
                return self._budget_charge(op.request)
            case BudgetAdjustOp():
                return self._budget_adjust(op.charge, op.delta_usd)
            case ReleaseQuotaOp():
                return self._release_quota(op.key, op.now)
            case ApprovalConsumeOp():
                return self._approval_consume(op.approval_id, op.ttl_s)
            case ApprovalReleaseOp():
                return self._approval_release(op.approval_id)
            case _:
                assert_never(op)
