"""The arithmetic both counters backends share: UTC windows and TTLs, GCRA and budget verdicts.

Written once here; ``memory`` and ``redis`` import it and never each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from plant_gateway.backends.base import BudgetDecision

if TYPE_CHECKING:
    from plant_gateway.backends.base import BudgetCharge, BudgetRequest

Clock = Callable[[], float]  # epoch seconds (time.time); injected in tests
MICRO = 1_000_000  # budgets are counted in integer micro-dollars: no float drift in Redis
GRACE_S = 86_400  # keys outlive their window by a day, then expire by themselves


# --- UTC windows ------------------------------------------------------------------------------


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")


def utc_month(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m")


def next_utc_midnight(now: float) -> datetime:
    """Start of the next UTC day; date arithmetic, so month and year ends are right."""
    today = datetime.fromtimestamp(now, UTC).date()
    return _midnight(today + timedelta(days=1))


def next_utc_month(now: float) -> datetime:
    today = datetime.fromtimestamp(now, UTC).date()
    if today.month == 12:
        return _midnight(date(today.year + 1, 1, 1))
    first = date(today.year, today.month + 1, 1)
    return _midnight(first)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


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
        """Seconds a key of the UTC day of ``now`` lives: to the day's end, plus a day."""
        return int(self.midnight - now) + GRACE_S

    def month_ttl(self, now: float) -> int:
        """Seconds a key of the UTC month of ``now`` lives: to the month's end, plus a day."""
        return int(self.month_end - now) + GRACE_S


# the day/month strings and boundaries, recomputed only when a UTC day passes (datetime
# arithmetic was a good part of planning a batch); the event loop is the only user
_WINDOWS = UtcWindows()


def calendar(now: float) -> UtcWindows:
    return _WINDOWS.at(now)


def day_ttl(now: float) -> int:
    """``UtcWindows.day_ttl`` of the shared calendar."""
    return calendar(now).day_ttl(now)


def month_ttl(now: float) -> int:
    """``UtcWindows.month_ttl`` of the shared calendar."""
    return calendar(now).month_ttl(now)


# --- GCRA ------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Gcra:
    """Generic cell rate algorithm parameters for ``limit`` per ``period_s`` plus ``burst``.

    One request is "emitted" every ``interval`` µs; ``burst`` extra requests may arrive at
    once (tolerance ``burst * interval``), so at most ``burst + 1`` pass instantly and the
    sustained rate is ``limit`` per period. Times are integer microseconds (exact in Lua too).
    """

    limit: int
    period_s: float
    burst: int
    # derived once (step runs on every request); not part of identity or repr
    interval: int = field(init=False, compare=False, repr=False)
    window: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        interval = max(1, round(self.period_s * 1_000_000 / self.limit))
        object.__setattr__(self, "interval", interval)
        # delay variation tolerance plus one interval: (burst + 1) * interval
        object.__setattr__(self, "window", (self.burst + 1) * interval)

    def step(self, tat: int | None, now_us: int) -> tuple[bool, int, int, float, float]:
        """(allowed, new_tat, remaining, reset_s, retry_after_s) for one request at ``now_us``."""
        tat = now_us if tat is None or tat < now_us else tat
        interval = self.interval
        new_tat = tat + interval
        allow_at = new_tat - self.window
        if allow_at > now_us:
            return False, tat, 0, (tat - now_us) / 1e6, (allow_at - now_us) / 1e6
        remaining = (now_us - allow_at) // interval
        return True, new_tat, int(remaining), (new_tat - now_us) / 1e6, 0.0


# --- budgets ---------------------------------------------------------------------------------


def to_micro(usd: float) -> int:
    return int(round(usd * MICRO))


def alert_level(utilization: float, thresholds: tuple[float, float, float]) -> str:
    """normal < warning ≤ high ≤ critical, at the three thresholds (default 80/95/100 %)."""
    warning, high, critical = thresholds
    if utilization >= critical:
        return "critical"
    if utilization >= high:
        return "high"
    if utilization >= warning:
        return "warning"
    return "normal"


def budget_verdict(
    request: BudgetRequest, platform: int, agent: int, customer: int
) -> tuple[bool, str]:
    """(allowed, reason) given the micro-dollars already spent; the Lua script mirrors this.

    Denied when the charge would take any budget past its critical threshold (unless the
    Governor overrides), or when the platform is at/over the high threshold and the caller is
    neither the Governor nor a designated critical agent.
    """
    # to_micro inlined: this runs on every charged request
    cost = int(round(request.cost_usd * MICRO))
    _, high, critical = request.thresholds
    platform_cap = int(round(request.platform_limit * MICRO))
    if not request.override:
        if platform + cost > platform_cap * critical:
            return False, "platform"
        limit = request.agent_limit
        if request.agent_id and limit is not None and agent + cost > to_micro(limit) * critical:
            return False, "agent"
        limit = request.customer_limit
        if (
            request.customer_id
            and limit is not None
            and customer + cost > to_micro(limit) * critical
        ):
            return False, "customer"
    if not request.privileged and platform >= platform_cap * high:
        return False, "platform-high"
    return True, ""


def make_budget_decision(
    request: BudgetRequest,
    allowed: bool,
    reason: str,
    spent_micro: list[int],
    charge: BudgetCharge | None,
) -> BudgetDecision:
    """Build the decision both backends return from micro-dollars spent (after any charge)."""
    platform_micro, agent_micro, customer_micro = spent_micro
    platform = platform_micro / 1_000_000
    agent = agent_micro / 1_000_000
    customer = customer_micro / 1_000_000
    agent_limit, customer_limit = request.agent_limit, request.customer_limit
    has_agent = request.agent_id is not None and agent_limit is not None
    has_customer = request.customer_id is not None and customer_limit is not None
    if reason and reason != "platform-high":
        level = "critical"
    else:
        utilization = platform / request.platform_limit
        if has_agent:
            utilization = max(utilization, agent / agent_limit)  # type: ignore[operator]
        if has_customer:
            utilization = max(utilization, customer / customer_limit)  # type: ignore[operator]
        level = alert_level(utilization, request.thresholds)
    return BudgetDecision(
        allowed,
        level,
        platform,
        request.platform_limit,
        agent if has_agent else None,
        agent_limit if has_agent else None,
        customer if has_customer else None,
        customer_limit if has_customer else None,
        0.0,
        {"reason": reason, "charge": charge},
    )
