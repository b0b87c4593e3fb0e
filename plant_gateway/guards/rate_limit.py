"""Rate limiting: per principal tier, per client IP on public and brute-force routes.

The algorithm is GCRA (generic cell rate algorithm), chosen over a sliding window because it is
exact with one small key per principal (a sliding-window log needs one entry per request —
10,000 entries for a governor — and the cheaper sliding-window *counter* is an approximation),
it spaces requests smoothly instead of letting a whole window's quota through at a boundary,
and its check-and-update is a handful of arithmetic in one Lua script. A tier of ``limit`` per
``period_s`` with ``burst`` admits at most ``burst + 1`` requests at once and ``limit`` per
period sustained. The state lives in the counters backend, so N gateways share one limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plant_gateway import metrics
from plant_gateway.backends.base import RateDecision
from plant_gateway.context import Identity, RequestContext
from plant_gateway.counters import RateLimitOp
from plant_gateway.memo import BoundedMemo
from plant_gateway.pipeline.counter_batch import CounterGuard, store_failure, submit
from plant_gateway.pipeline.identity import cached_identity, principal_of
from plant_gateway.pipeline.step import GuardSpec, Phase, flag_on
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.backends.base import Counters
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import RateTier, Settings

ENABLE_RATE_LIMITING = "enable_rate_limiting"
BRUTE_FORCE_PERIOD_S = 60.0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``RATE_LIMIT_*`` tiers, ``BRUTE_FORCE_LIMIT_PER_MIN`` and ``RATE_LIMIT_FAIL_MODE``."""

    tiers: Mapping[str, RateTier]
    brute_force_limit_per_min: int
    fail_open: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimitConfig:
        return cls(
            tiers=dict(settings.rate_tiers),
            brute_force_limit_per_min=settings.brute_force_limit_per_min,
            fail_open=settings.rate_limit_fail_mode == "open",
        )


def tier_of(identity: Identity) -> str:
    """trial_mode → trial; Governor → governor; ``enterprise`` role, ``tier`` or ``plan`` claim
    → enterprise; anyone else → paid."""
    if identity.trial_mode:
        return "trial"
    if identity.is_governor:
        return "governor"
    claims = identity.claims or {}
    if "enterprise" in identity.roles or "enterprise" in (claims.get("tier"), claims.get("plan")):
        return "enterprise"
    return "paid"


def rate_headers(decision: RateDecision, period_s: float) -> list[tuple[str, str]]:
    reset = decision.retry_after_s if decision.remaining == 0 else decision.reset_s
    fixed = _FIXED_RATE_HEADERS.data.get((decision.limit, period_s)) or _fixed_rate_headers(
        decision.limit, period_s
    )
    return [
        fixed[0],
        ("ratelimit-remaining", str(max(0, decision.remaining))),
        ("ratelimit-reset", str(max(0, math.ceil(reset)))),
        fixed[1],
    ]


_FIXED_RATE_HEADERS: BoundedMemo[tuple[int, float], tuple[tuple[str, str], tuple[str, str]]] = (
    BoundedMemo(1024)
)


def _fixed_rate_headers(
    limit: int, period_s: float
) -> tuple[tuple[str, str], tuple[str, str]]:
    """The limit and policy headers of a tier: formatted once per (limit, period)."""
    fixed = _FIXED_RATE_HEADERS.data.get((limit, period_s))
    if fixed is None:
        fixed = _FIXED_RATE_HEADERS.put((limit, period_s), (
            ("ratelimit-limit", str(limit)),
            ("ratelimit-policy", f"{limit};w={int(period_s)}"),
        ))
    return fixed


class RateLimitStep(CounterGuard):
    name = "rate_limit"

    def __init__(self, config: RateLimitConfig, counters: Counters, flags: Any = None) -> None:
        super().__init__(counters, flags)
        self.config = config
        self.tiers = config.tiers
        bf_limit = config.brute_force_limit_per_min
        self.brute_force = (bf_limit, BRUTE_FORCE_PERIOD_S, min(5, bf_limit - 1))
        self._limits: BoundedMemo[str, tuple[Identity, tuple[str, str, int, float, int]]] = (
            BoundedMemo(10_000)
        )

    def limit_for(self, ctx: RequestContext) -> tuple[str, str, int, float, int]:
        """(counter key, tier label, limit, period, burst) of this request."""
        if ctx.brute_force_route:
            return (f"bf:{ctx.client_ip}", "brute_force", *self.brute_force)
        identity = cached_identity(ctx)  # one object per verified token: limit worked out once
        digest = identity.token_digest if identity is not None else None
        if identity is None or digest is None:
            return self._limit_for(ctx)
        entry = self._limits.data.get(digest)
        if entry is not None and entry[0] is identity:
            return entry[1]
        limit = self._limit_for(ctx)
        self._limits.put(digest, (identity, limit))
        return limit

    def _limit_for(self, ctx: RequestContext) -> tuple[str, str, int, float, int]:
        principal = principal_of(ctx.identity) if ctx.identity else None
        if principal is None or ctx.identity is None:
            tier_name, key = "anonymous", f"ip:{ctx.client_ip}"
        elif ctx.identity.service_account:
            # one service key serves every instance of the platform's backends: a bucket per
            # calling address, so one busy caller cannot throttle the others
            tier_name = "service"
            key = f"svc:{ctx.identity.service_account}:{ctx.client_ip}"
        else:
            tier_name, key = tier_of(ctx.identity), f"user:{principal}"
        tier: RateTier | None = self.tiers.get(tier_name) or self.tiers.get("paid")
        if tier is None:
            raise LookupError(f"rate tier {tier_name!r} is not configured")
        return key, tier_name, tier.limit, float(tier.period_s), tier.burst

    async def run(self, ctx: RequestContext) -> Problem | None:
        if not flag_on(self.flags, ENABLE_RATE_LIMITING, ctx):
            return None
        key, tier, limit, period, burst = self.limit_for(ctx)
        op = RateLimitOp(key, limit, period, burst)

        def resolve(result: Any) -> Problem | None:
            return self.resolve(ctx, result, tier, limit, period)

        return await submit(ctx, self.counters, op, resolve, self.batched)

    def resolve(
        self, ctx: RequestContext, result: Any, tier: str, limit: int, period: float
    ) -> Problem | None:
        """The outcome of this request's rate-limit op (or of its failure)."""
        if isinstance(result, BaseException):
            return store_failure(result, "rate limit", self.config.fail_open)
        decision: RateDecision = result
        headers = rate_headers(decision, period)
        if decision.allowed:
            ctx.extra_response_headers.extend(headers)
            return None
        metrics.RATE_LIMITED.labels(tier=tier).inc()
        retry = max(1, math.ceil(decision.retry_after_s))
        return Problem(
            429,
            "rate-limited",
            f"Rate limit of {limit} requests per {int(period)} s exceeded; retry in {retry} s.",
            extra={"limit": limit, "period_s": int(period), "tier": tier, "retry_after": retry},
            headers=[("retry-after", str(retry)), *headers],
        )

def build(config: RateLimitConfig, deps: Dependencies) -> RateLimitStep:
    return RateLimitStep(config, deps.counters, deps.flags)


GUARD = GuardSpec(
    name="rate_limit", phase=Phase.ACCESS, config=RateLimitConfig.from_settings, build=build,
    batched=True,
)
