"""The authentication step against the in-process counters: every 401 kind, caching, state.

Tokens are HS256 here (shared secret); PEM and JWKS keys have their own test files.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from plant_gateway.backends.base import DependencyError
from plant_gateway.backends.keys import create as create_keys
from plant_gateway.counters import create as create_counters
from plant_gateway.deps import Dependencies
from plant_gateway.guards import auth
from plant_gateway.guards.auth import AuthConfig, AuthStep, token_digest
from plant_gateway.problems import Problem
from tests.unit.auth_support import DROP, claims, context, mint, settings, unsigned


def make_step(**overrides: Any) -> AuthStep:
    cfg = settings(**overrides)
    return AuthStep(AuthConfig.from_settings(cfg), create_keys(cfg), create_counters(cfg))


def assert_401(problem: Problem | None, kind: str) -> None:
    assert problem is not None, f"expected {kind}, the token was accepted"
    assert (problem.status, problem.kind) == (401, kind), problem.detail
    challenge = dict(problem.headers)["www-authenticate"]
    assert challenge.startswith("Bearer ")


async def run(step: AuthStep, token: str | None = None, **kw: Any) -> Problem | None:
    return await step.run(context(token, **kw))


# --- happy path -----------------------------------------------------------------------------


async def test_valid_token_fills_identity_and_forwardable_authorization() -> None:
    step = make_step()
    token = mint(customer_id="cust-9", governor_agent_id="gov-1", agent_id="ag-2", roles=["admin"])
    ctx = context(token)
    assert await step.run(ctx) is None
    ident = ctx.identity
    assert ident is not None
    assert ident.user_id == "11111111-1111-4111-8111-111111111111"
    assert (ident.email, ident.roles, ident.customer_id) == ("ada@example.com", ["admin"], "cust-9")
    assert ident.is_governor and ident.agent_id == "ag-2" and ident.issuer == "waooaw.com"
    assert ident.token_digest == token_digest(token) and ident.trial_mode is False
    assert ctx.authorization == f"Bearer {token}"


async def test_public_and_service_key_routes_are_skipped() -> None:
    step = make_step()
    ctx = context(None)
    ctx.is_public = True
    assert await step.run(ctx) is None and ctx.identity is None
    ctx = context(None)
    ctx.service_key_route = True
    assert await step.run(ctx) is None


def test_build_returns_none_when_auth_guard_is_off() -> None:
    cfg = settings(guards=["rate_limit", "audit"])
    deps = Dependencies(settings=cfg, counters=create_counters(cfg), flags=None)  # type: ignore[arg-type]
    assert auth.GUARD.create(cfg, deps) is None
    cfg = settings()
    deps = Dependencies(settings=cfg, counters=create_counters(cfg), flags=None)  # type: ignore[arg-type]
    assert isinstance(auth.GUARD.create(cfg, deps), AuthStep)


# --- header and format ----------------------------------------------------------------------


async def test_missing_header_is_unauthorized() -> None:
    assert_401(await run(make_step()), "unauthorized")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-jwt", "Bearer a.b", "Bearer a.b.c.d",
     "Bearer a b.c", "Bearer !!.??.**", "Bearer " + "a" * 9000 + ".b.c"],
)
async def test_malformed_header_is_invalid_token_format(header: str) -> None:
    assert_401(await run(make_step(), authorization=header), "invalid-token-format")


async def test_undecodable_segments_are_invalid_token_format() -> None:
    assert_401(await run(make_step(), "aaaa.bbbb.cccc"), "invalid-token-format")


# --- algorithms ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_rejected(alg: str) -> None:
    assert_401(await run(make_step(), unsigned(claims(), alg)), "invalid-token")


async def test_algorithm_outside_allow_list_is_rejected() -> None:
    step = make_step(jwt_algorithms=["HS256"])
    assert_401(await run(step, mint("k" * 64, "HS512")), "invalid-token")


async def test_wrong_secret_is_invalid_token() -> None:
    token = mint("another-secret-that-is-long-enough-012345")
    assert_401(await run(make_step(), token), "invalid-token")


# --- registered claims -----------------------------------------------------------------------


async def test_expired_token() -> None:
    now = int(time.time())
    token = mint(iat=now - 7200, exp=now - 3600)
    assert_401(await run(make_step(), token), "token-expired")


async def test_leeway_accepts_a_token_just_expired() -> None:
    now = int(time.time())
    token = mint(iat=now - 600, exp=now - 5)
    assert await run(make_step(jwt_leeway_s=60), token) is None
    assert_401(await run(make_step(jwt_leeway_s=0), token), "token-expired")


async def test_token_issued_in_the_future_is_invalid() -> None:
    now = int(time.time())
    assert_401(await run(make_step(), mint(iat=now + 600, exp=now + 1200)), "invalid-token")


async def test_unknown_issuer_is_invalid() -> None:
    assert_401(await run(make_step(), mint(iss="evil.example.com")), "invalid-token")
    assert await run(make_step(), mint(iss="pp.waooaw.com")) is None


async def test_issuer_allow_list_is_not_substring_matched() -> None:
    step = make_step(jwt_issuers=["cp.waooaw.com"])
    assert_401(await run(step, mint(iss="waooaw.com")), "invalid-token")


async def test_lifetime_over_24h_is_invalid() -> None:
    now = int(time.time())
    assert_401(await run(make_step(), mint(iat=now, exp=now + 24 * 3600 + 1)), "invalid-token")
    assert await run(make_step(), mint(iat=now, exp=now + 24 * 3600)) is None


async def test_audience_when_configured() -> None:
    step = make_step(jwt_audience="plant-api")
    assert_401(await run(step, mint()), "invalid-token")
    assert_401(await run(step, mint(aud="other")), "invalid-token")
    assert await run(step, mint(aud="plant-api")) is None


async def test_audience_ignored_when_not_configured() -> None:
    assert await run(make_step(), mint(aud="anything")) is None


@pytest.mark.parametrize("claim", ["user_id", "email", "roles", "iat", "exp", "iss", "sub"])
async def test_missing_required_claim_is_invalid(claim: str) -> None:
    overrides: dict[str, Any] = {claim: DROP}
    assert_401(await run(make_step(), mint(**overrides)), "invalid-token")


@pytest.mark.parametrize("roles", [[], "admin", [""], [1], None])
async def test_roles_must_be_a_non_empty_list_of_names(roles: Any) -> None:
    assert_401(await run(make_step(), mint(roles=roles)), "invalid-token")


# --- conditional claims ----------------------------------------------------------------------


async def test_trial_mode_without_trial_expires_at_is_invalid() -> None:
    assert_401(await run(make_step(), mint(trial_mode=True)), "invalid-token")


async def test_trial_expires_at_must_be_iso8601() -> None:
    token = mint(trial_mode=True, trial_expires_at="next tuesday")
    assert_401(await run(make_step(), token), "invalid-token")


async def test_trial_mode_must_be_boolean() -> None:
    token = mint(trial_mode="yes", trial_expires_at="2030-01-01T00:00:00Z")
    assert_401(await run(make_step(), token), "invalid-token")


async def test_trial_token_with_expiry_is_accepted() -> None:
    ctx = context(mint(trial_mode=True, trial_expires_at="2030-01-01T00:00:00Z"))
    assert await make_step().run(ctx) is None
    assert ctx.identity is not None and ctx.identity.trial_mode is True
    assert ctx.identity.trial_expires_at == "2030-01-01T00:00:00Z"


@pytest.mark.parametrize("token_type", ["refresh", "id", "Refresh", ""])
async def test_regression_refresh_token_is_not_an_access_token(token_type: str) -> None:
    """Deployed-gateway defect: it accepted refresh tokens as access tokens."""
    assert_401(await run(make_step(), mint(token_type=token_type)), "invalid-token")


async def test_explicit_access_token_type_is_accepted() -> None:
    assert await run(make_step(), mint(token_type="access")) is None


@pytest.mark.parametrize("version", [-1, "2", 1.5, True])
async def test_token_version_must_be_a_non_negative_integer(version: Any) -> None:
    assert_401(await run(make_step(), mint(token_version=version)), "invalid-token")


# --- revocation and session version ----------------------------------------------------------


async def test_revoked_jti_is_refused_even_when_claims_are_cached() -> None:
    step = make_step()
    token = mint(jti="jti-revoke-me")
    assert await run(step, token) is None
    await step.counters.revoke("jti-revoke-me", 3600)
    assert_401(await run(step, token), "token-revoked")
    assert step.signature_checks == 1  # the second request was a cache hit, yet still refused


async def test_token_without_jti_is_revoked_by_digest() -> None:
    step = make_step()
    token = mint(jti=DROP)
    assert await run(step, token) is None
    await step.counters.revoke(token_digest(token), 3600)
    assert_401(await run(step, token), "token-revoked")


async def test_lower_token_version_is_refused() -> None:
    step = make_step()
    user = "22222222-2222-4222-8222-222222222222"
    for _ in range(2):
        await step.counters.bump_token_version(user)
    assert_401(await run(step, mint(user_id=user, token_version=1)), "token-version-mismatch")
    assert_401(await run(step, mint(user_id=user)), "token-version-mismatch")
    assert await run(step, mint(user_id=user, token_version=2)) is None
    assert await run(step, mint(user_id=user, token_version=3)) is None


class BrokenCounters:
    """The in-process backend in a failing state: its store raises like an unreachable Redis."""

    name = "counters"

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def auth_state(self, jti: str | None, user_id: str | None) -> tuple[bool, int | None]:
        raise self.error


@pytest.mark.parametrize("error", [DependencyError("redis down"), ConnectionError("reset")])
async def test_regression_revocation_store_error_fails_closed(error: Exception) -> None:
    """Deployed-gateway defect: it let tokens through when the revocation lookup failed."""
    cfg = settings()
    step = AuthStep(AuthConfig.from_settings(cfg), create_keys(cfg), BrokenCounters(error))  # type: ignore[arg-type]
    problem = await run(step, mint())
    assert problem is not None and (problem.status, problem.kind) == (503, "dependency-unavailable")
    # and a cached token does not bypass the store either
    step.counters = create_counters(cfg)
    token = mint()
    assert await run(step, token) is None
    step.counters = BrokenCounters(error)  # type: ignore[assignment]
    problem = await run(step, token)
    assert problem is not None and problem.status == 503


# --- claims cache ----------------------------------------------------------------------------


async def test_repeated_token_costs_one_signature_check() -> None:
    step = make_step()
    token = mint()
    for _ in range(5):
        assert await run(step, token) is None
    assert (step.signature_checks, step.cache_hits) == (1, 4)
    assert await run(step, mint()) is None
    assert step.signature_checks == 2


async def test_invalid_tokens_are_not_cached() -> None:
    step = make_step()
    token = mint(roles=[])
    for _ in range(3):
        assert_401(await run(step, token), "invalid-token")
    assert step.signature_checks == 3 and len(step.cache) == 0


async def test_cached_entry_expires_with_the_token() -> None:
    step = make_step(jwt_leeway_s=0)
    token = mint()
    assert await run(step, token) is None
    entry = step.cache.get(token_digest(token))
    assert entry is not None
    entry.exp = int(time.time()) - 1  # the token's exp has passed since it was cached
    assert_401(await run(step, token), "token-expired")
    assert len(step.cache) == 0 and step.signature_checks == 1


async def test_claims_cache_is_bounded() -> None:
    step = make_step(jwt_claims_cache_size=3)
    for _ in range(10):
        assert await run(step, mint()) is None
    assert len(step.cache) == 3


async def test_cached_identity_is_copied_per_request() -> None:
    step = make_step()
    token = mint()
    first = context(token)
    assert await step.run(first) is None
    assert first.identity is not None
    first.identity.roles.append("admin")
    first.identity.customer_id = "tampered"
    second = context(token)
    assert await step.run(second) is None
    assert second.identity is not None
    assert second.identity.roles == ["user"] and second.identity.customer_id is None
