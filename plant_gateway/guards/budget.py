"""Budget guard: agent daily, platform monthly and optional customer monthly caps.

Check-and-charge is one atomic backend op before forwarding (in the pipeline it rides in the
request's one counters round trip, see ``pipeline/counter_batch.py``); ``after`` settles the
real cost the backend reported in ``COST_RESPONSE_HEADER`` by charging only the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plant_gateway import metering, metrics
from plant_gateway.backends.base import (
    BudgetCharge,
    BudgetDecision,
    BudgetRequest,
    DependencyError,
)
from plant_gateway.context import RequestContext
from plant_gateway.counters import BudgetChargeOp, next_utc_midnight, next_utc_month
from plant_gateway.pipeline.counter_batch import CounterGuard, store_failure, submit
from plant_gateway.pipeline.step import GuardSpec, Phase, flag_on
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.backends.base import Counters
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

ENABLE_BUDGET_ENFORCEMENT = "enable_budget_enforcement"
THRESHOLDS_FLAG = "budget_alert_thresholds"
DEFAULT_THRESHOLDS = (0.80, 0.95, 1.00)


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """The ``*_BUDGET_USD`` caps, prices, alert thresholds, metering and ``BUDGET_FAIL_MODE``."""

    platform_monthly_usd: float
    agent_daily_usd: float
    customer_monthly_usd: float | None
    cost_per_request_usd: float
    thresholds: tuple[float, float, float]
    critical_agents: frozenset[str]
    metering_secret: bytes
    metering_ttl_s: float
    fail_open: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetConfig:
        secret = settings.metering_envelope_secret
        return cls(
            platform_monthly_usd=settings.platform_monthly_budget_usd,
            agent_daily_usd=settings.agent_daily_budget_usd,
            customer_monthly_usd=settings.customer_monthly_budget_usd,
            cost_per_request_usd=settings.cost_per_request_usd,
            thresholds=valid_thresholds(settings.budget_alert_thresholds) or DEFAULT_THRESHOLDS,
            critical_agents=frozenset(settings.critical_agents),
            metering_secret=secret.get_secret_value().encode() if secret else b"",
            metering_ttl_s=settings.metering_envelope_ttl_s,
            fail_open=settings.budget_fail_mode == "open",
        )


def valid_thresholds(value: Any) -> tuple[float, float, float] | None:
    """Three ascending positive fractions (warning, high, critical), else None."""
    if not isinstance(value, list | tuple) or len(value) != 3:
        return None
    try:
        warning, high, critical = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not 0 < warning <= high <= critical <= 10:
        return None
    return warning, high, critical


def percent(spent: float | None, limit: float | None) -> str:
    if spent is None or not limit:
        return "0.00"
    return f"{100.0 * spent / limit:.2f}"


class BudgetStep(CounterGuard):
    name = "budget"

    def __init__(self, config: BudgetConfig, counters: Counters, flags: Any = None) -> None:
        super().__init__(counters, flags)
        self.config = config
        self.default_thresholds = config.thresholds
        self.critical_agents = config.critical_agents
        self.metering_secret = config.metering_secret
        self._last_flag: tuple[Any, tuple[float, float, float]] | None = None

    def thresholds(self, ctx: RequestContext) -> tuple[float, float, float]:
        if self.flags is None:
            return self.default_thresholds
        value = self.flags.value(THRESHOLDS_FLAG, ctx, list(self.default_thresholds))
        last = self._last_flag  # the flag rarely changes: parse a value once
        if last is not None and type(value) is list and last[0] == value:
            return last[1]
        parsed = valid_thresholds(value) or self.default_thresholds
        if type(value) is list:
            self._last_flag = (list(value), parsed)
        return parsed

    def request_for(self, ctx: RequestContext) -> BudgetRequest | None:
        identity = ctx.identity
        if identity is None:
            return None  # public routes are rate limited per IP, not charged
        c = self.config
        agent = identity.agent_id or identity.governor_agent_id
        return BudgetRequest(
            cost_usd=self.cost_of(ctx),
            platform_limit=c.platform_monthly_usd,
            agent_id=agent,
            agent_limit=c.agent_daily_usd if agent else None,
            customer_id=identity.customer_id if c.customer_monthly_usd else None,
            customer_limit=c.customer_monthly_usd,
            thresholds=self.thresholds(ctx),
            privileged=identity.is_governor or (agent in self.critical_agents),
            override=identity.is_governor,
        )

    def cost_of(self, ctx: RequestContext) -> float:
        """The verified metering envelope's cost, else the (opt-in, default 0) flat price."""
        if self.metering_secret and metering.SIGNATURE in ctx.headers:
            cost = metering.verified_cost(
                ctx.headers, ctx.correlation_id, self.metering_secret,
                self.config.metering_ttl_s, self.clock(),
            )
            if cost is not None:
                return cost
        return self.config.cost_per_request_usd

    async def run(self, ctx: RequestContext) -> Problem | None:
        request = self.request_for(ctx)
        if request is None or not flag_on(self.flags, ENABLE_BUDGET_ENFORCEMENT, ctx):
            return None
        op = BudgetChargeOp(request)

        def resolve(result: Any) -> Problem | None:
            return self.resolve(ctx, result)

        return await submit(ctx, self.counters, op, resolve, self.batched)

    def resolve(self, ctx: RequestContext, result: Any) -> Problem | None:
        """The outcome of this request's check-and-charge (or of its failure)."""
        if isinstance(result, BaseException):
            return store_failure(result, "budget", self.config.fail_open)
        decision: BudgetDecision = result
        record(decision)
        headers = budget_headers(decision)
        if decision.allowed:
            ctx.scratch[self.name] = decision.extra.get("charge")
            ctx.extra_response_headers.extend(headers)
            return None
        return self.exceeded(decision, headers)

    def exceeded(self, decision: BudgetDecision, headers: list[tuple[str, str]]) -> Problem:
        reason = str(decision.extra.get("reason") or "platform")
        metrics.BUDGET_REJECTED.labels(scope=reason).inc()
        now = self.clock()
        resets = next_utc_midnight(now) if reason == "agent" else next_utc_month(now)
        retry = max(1, math.ceil(resets.timestamp() - now))
        detail = {
            "platform-high": "The platform budget is nearly spent; only the Governor and "
            "critical agents may proceed.",
            "agent": "The agent's daily budget is exhausted.",
            "customer": "The customer's monthly budget is exhausted.",
        }.get(reason, "The platform's monthly budget is exhausted.")
        body = {
            "alert_level": decision.alert_level,
            "exceeded": reason,
            "resets_at": resets.isoformat().replace("+00:00", "Z"),
            "platform_budget": _budget(decision.platform_spent, decision.platform_limit, "month"),
            "agent_budget": _budget(decision.agent_spent, decision.agent_limit, "day"),
        }
        if decision.customer_limit is not None:
            body["customer_budget"] = _budget(
                decision.customer_spent, decision.customer_limit, "month"
            )
        return Problem(
            402, "budget-exceeded", detail, extra=body,
            headers=[("retry-after", str(retry)), *headers],
        )

    async def after(self, ctx: RequestContext) -> None:
        charge = ctx.scratch.get(self.name)
        if not isinstance(charge, BudgetCharge) or ctx.upstream_cost_usd is None:
            return
        actual = ctx.upstream_cost_usd
        if not math.isfinite(actual) or actual < 0:
            return
        delta = actual - charge.cost_usd
        if abs(delta) < 1e-7:
            return
        try:
            await self.counters.budget_adjust(charge, delta)
        except DependencyError:
            return  # the estimate stands; nothing to undo on the response already sent
        charge.cost_usd = actual


def record(decision: BudgetDecision) -> None:
    """The platform's utilisation and the alert level, for the budget alerts (two stores)."""
    if decision.platform_limit:
        metrics.BUDGET_UTILIZATION_VALUE.value = decision.platform_spent / decision.platform_limit
    if decision.alert_level != "normal":
        metrics.BUDGET_ALERTS.labels(decision.alert_level).inc()


def _budget(spent: float | None, limit: float | None, period: str) -> dict[str, Any] | None:
    if limit is None:
        return None
    used = spent or 0.0
    return {
        "spent_usd": round(used, 6),
        "limit_usd": limit,
        "utilization": round(used / limit, 4) if limit else None,
        "period": period,
    }


def budget_headers(decision: BudgetDecision) -> list[tuple[str, str]]:
    headers = [
        ("x-budget-alert-level", decision.alert_level),
        ("x-platform-utilization", percent(decision.platform_spent, decision.platform_limit)),
    ]
    if decision.agent_limit is not None:
        headers.append(("x-agent-utilization", percent(decision.agent_spent, decision.agent_limit)))
    return headers


def build(config: BudgetConfig, deps: Dependencies) -> BudgetStep:
    return BudgetStep(config, deps.counters, deps.flags)


GUARD = GuardSpec(
    name="budget", phase=Phase.ACCESS, config=BudgetConfig.from_settings, build=build,
    batched=True,
)
