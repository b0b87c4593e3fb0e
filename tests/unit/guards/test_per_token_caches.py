"""The per-token and per-day caches of the guard chain give the answers of the uncached code.

Identity copies, the policy ``jwt`` document, rate-limit tiers and the in-process UTC windows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from plant_gateway.backends.keys import create as create_keys
from plant_gateway.counters import create as create_counters
from plant_gateway.counters.common import (
    UtcWindows,
    day_ttl,
    month_ttl,
    next_utc_midnight,
    next_utc_month,
    utc_day,
)
from plant_gateway.guards.auth import AuthConfig, AuthStep
from plant_gateway.guards.policy import JwtInputCache, build_input, jwt_input
from plant_gateway.guards.rate_limit import RateLimitConfig, RateLimitStep
from plant_gateway.pipeline.identity import cached_identity, copy_identity
from tests.unit.auth_support import context, mint, settings


def make_auth() -> AuthStep:
    cfg = settings()
    return AuthStep(AuthConfig.from_settings(cfg), create_keys(cfg), create_counters(cfg))


async def test_cached_identity_is_the_pristine_one_only_for_untouched_copies() -> None:
    step = make_auth()
    token = mint()
    first, second = context(token), context(token)
    assert await step.run(first) is None and await step.run(second) is None
    cached = cached_identity(first)
    assert cached is not None and cached is cached_identity(second)
    assert first.identity is not cached and first.identity == cached
    first.identity = copy_identity(cached)  # a step that swaps the identity loses the cache
    assert cached_identity(first) is None


async def test_policy_jwt_document_follows_the_request_identity() -> None:
    step = make_auth()
    token = mint(roles=["user"])
    cfg = settings(guards=["auth", "policy"])
    docs = JwtInputCache()
    first = context(token)
    assert await step.run(first) is None
    doc = build_input(first, cfg.gateway_type, None, docs)["jwt"]
    assert doc == jwt_input(first.identity)
    assert first.identity is not None
    first.identity.roles.append("admin")  # tampering with a finished request's copy...
    second = context(token)
    assert await step.run(second) is None
    again = build_input(second, cfg.gateway_type, None, docs)["jwt"]
    assert again["roles"] == ["user"] and again == jwt_input(second.identity)  # ...never leaks


async def test_rate_limit_tier_per_token_matches_uncached() -> None:
    auth = make_auth()
    cfg = settings(guards=["auth", "rate_limit"])
    step = RateLimitStep(RateLimitConfig.from_settings(cfg), create_counters(cfg))
    for roles, trial in ((["user"], False), (["admin"], False), (["user"], True)):
        extra: dict[str, Any] = {}
        if trial:
            extra = {"trial_mode": True, "trial_expires_at": "2099-01-01T00:00:00Z"}
        token = mint(roles=roles, user_id=f"00000000-0000-4000-8000-00000000000{len(roles)}",
                     governor_agent_id="gov-1" if "admin" in roles else None, **extra)
        for _ in range(2):
            ctx = context(token)
            assert await auth.run(ctx) is None
            assert step.limit_for(ctx) == step._limit_for(ctx)


def test_utc_windows_match_the_date_arithmetic_across_boundaries() -> None:
    windows = UtcWindows()
    instants = [
        datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC).timestamp(),
        datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp(),
        datetime(2027, 2, 28, 12, 0, 0, tzinfo=UTC).timestamp(),
        datetime(2028, 2, 29, 23, 59, 59, tzinfo=UTC).timestamp(),
        datetime(2026, 12, 31, 0, 0, 1, tzinfo=UTC).timestamp(),  # the clock goes back
    ]
    for now in instants:
        w = windows.at(now)
        assert w.day == utc_day(now)
        assert w.month == datetime.fromtimestamp(now, UTC).strftime("%Y%m")
        assert w.midnight == next_utc_midnight(now).timestamp()
        assert w.month_end == next_utc_month(now).timestamp()
        assert w.day_ttl(now) == day_ttl(now) and w.month_ttl(now) == month_ttl(now)
