"""Trial task quota: at most ``TRIAL_DAILY_TASKS`` tasks per trial user per UTC day.

A task is what the policy decision marks with the ``count_trial_task`` obligation; when the
decision carries no obligations at all, a create/execute call on ``agents``/``tasks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plant_gateway.backends.base import RateDecision
from plant_gateway.context import RequestContext
from plant_gateway.counters import DailyQuotaOp, next_utc_midnight
from plant_gateway.pipeline.counter_batch import CounterGuard, store_failure, submit
from plant_gateway.pipeline.identity import principal_of
from plant_gateway.pipeline.step import GuardSpec, Phase, flag_on
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.backends.base import Counters
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

ENABLE_TRIAL_MODE = "enable_trial_mode"
OBLIGATION = "count_trial_task"
TASK_RESOURCES = frozenset({"agents", "tasks"})
TASK_ACTIONS = frozenset({"create", "execute"})


@dataclass(frozen=True, slots=True)
class TrialQuotaConfig:
    """``TRIAL_DAILY_TASKS``; it fails like the rate limit (``RATE_LIMIT_FAIL_MODE``)."""

    daily_tasks: int
    fail_open: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> TrialQuotaConfig:
        return cls(settings.trial_daily_tasks, settings.rate_limit_fail_mode == "open")


def is_trial_task(ctx: RequestContext) -> bool:
    decision = ctx.policy_decision or {}
    obligations: Any = decision.get("obligations")
    if isinstance(obligations, dict):
        return bool(obligations.get(OBLIGATION))
    if isinstance(obligations, list | tuple | set | frozenset):
        return OBLIGATION in obligations
    return ctx.resource in TASK_RESOURCES and ctx.action in TASK_ACTIONS


class TrialQuotaStep(CounterGuard):
    name = "trial_quota"

    def __init__(self, config: TrialQuotaConfig, counters: Counters, flags: Any = None) -> None:
        super().__init__(counters, flags)
        self.config = config
        self.limit = config.daily_tasks

    async def run(self, ctx: RequestContext) -> Problem | None:
        identity = ctx.identity
        if identity is None or not identity.trial_mode or not is_trial_task(ctx):
            return None
        principal = principal_of(identity)
        if principal is None or not flag_on(self.flags, ENABLE_TRIAL_MODE, ctx):
            return None
        now = self.clock()  # fixes the UTC day, so a refund gives back the same day's unit
        op = DailyQuotaOp(f"trial:{principal}", self.limit, now)
        return await submit(ctx, self.counters, op, self.resolve, self.batched)

    def resolve(self, result: Any) -> Problem | None:
        """The outcome of this request's quota op (or of its failure)."""
        if isinstance(result, BaseException):
            return store_failure(result, "trial quota", self.config.fail_open)
        decision: RateDecision = result
        if decision.allowed:
            return None
        retry = max(1, math.ceil(decision.reset_s))
        reset_at = next_utc_midnight(self.clock()).isoformat().replace("+00:00", "Z")
        return Problem(
            429,
            "trial-limit-exceeded",
            f"Trial accounts may run {self.limit} tasks per UTC day; the quota resets at "
            f"{reset_at}.",
            extra={"limit": self.limit, "reset_at": reset_at, "retry_after": retry},
            headers=[
                ("retry-after", str(retry)),
                ("ratelimit-limit", str(self.limit)),
                ("ratelimit-remaining", "0"),
                ("ratelimit-reset", str(retry)),
            ],
        )


def build(config: TrialQuotaConfig, deps: Dependencies) -> TrialQuotaStep:
    return TrialQuotaStep(config, deps.counters, deps.flags)


# switched with the rate limit: a deployment that turns rate limiting off turns the quota off
GUARD = GuardSpec(
    name="trial_quota", switch="rate_limit", phase=Phase.ACCESS,
    config=TrialQuotaConfig.from_settings, build=build, batched=True,
)
