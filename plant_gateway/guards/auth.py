"""Authentication step: verify the bearer JWT and fill ``ctx.identity``.

Signature and claims are checked once per token (cached by digest until ``exp``); revocation
and ``token_version`` are checked on every request (in the pipeline as an op of the request's one
counters round trip, see ``pipeline/counter_batch.py``); every store outage denies (503).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jwt
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    InvalidSignatureError,
    PyJWTError,
)

from plant_gateway.backends.base import DependencyError
from plant_gateway.backends.enrichment import CustomerEnricher, EnrichmentRejected
from plant_gateway.backends.keys import KeyLookupError, KeySource
from plant_gateway.context import Identity, RequestContext
from plant_gateway.counters import AuthStateOp
from plant_gateway.forwarding import IdTokenSource
from plant_gateway.pipeline.counter_batch import CounterGuard, submit
from plant_gateway.pipeline.identity import copy_identity, remember_cached
from plant_gateway.pipeline.step import GuardSpec, Phase
from plant_gateway.problems import Problem, unauthorized, unavailable
from plant_gateway.routing import RoutePattern, RouteSet, for_methods

if TYPE_CHECKING:
    from plant_gateway.backends.base import Counters
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 8192
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
REQUIRED_REGISTERED = ["exp", "iat", "iss", "sub"]


def token_digest(token: str) -> str:
    """SHA-256 hex digest of the raw token: the cache key and the revocation id without ``jti``."""
    return hashlib.sha256(token.encode()).hexdigest()


def revocation_id(identity: Identity) -> str | None:
    """What ``revoke`` must be called with for this token: its ``jti``, else its digest."""
    return identity.jti or identity.token_digest


@dataclass(frozen=True, slots=True)
class EnrichmentConfig:
    """Where a token without ``customer_id`` gets its customer (``CUSTOMER_ENRICHMENT``)."""

    backend_url: str
    audience: str
    use_id_token: bool
    timeout_s: float


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """The ``JWT_*`` checks, and the customer enrichment of tenant-bound routes."""

    algorithms: frozenset[str]
    issuers: tuple[str, ...]
    audience: str | None
    leeway_s: float
    max_lifetime_s: int
    claims_cache_size: int
    # tenant-binding routes (``TENANT_RULES``, when the tenant guard is on): they need a customer
    customer_routes: tuple[RoutePattern, ...] = ()
    enrichment: EnrichmentConfig | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthConfig:
        rules = settings.tenant_rules if settings.guard_on("tenant") else []
        enrichment = None
        if settings.customer_enrichment and rules:
            enrichment = EnrichmentConfig(
                backend_url=settings.plant_backend_url,
                audience=settings.plant_backend_audience or settings.plant_backend_url,
                use_id_token=settings.plant_backend_use_id_token,
                timeout_s=settings.enrichment_timeout_s,
            )
        return cls(
            algorithms=frozenset(a for a in settings.jwt_algorithms if a.lower() != "none"),
            issuers=tuple(settings.jwt_issuers),
            audience=settings.jwt_audience,
            leeway_s=settings.jwt_leeway_s,
            max_lifetime_s=settings.jwt_max_lifetime_s,
            claims_cache_size=settings.jwt_claims_cache_size,
            customer_routes=tuple(for_methods(r.path, r.methods) for r in rules),
            enrichment=enrichment,
        )


class ClaimsProblem(Exception):
    """A verified token whose claims break the contract: ``invalid-token``."""


@dataclass(slots=True)
class _Verified:
    identity: Identity
    token_version: int
    exp: int
    generation: int


class ClaimsCache:
    """Bounded LRU of verified tokens keyed by digest; an entry dies with its token."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, _Verified] = OrderedDict()

    def get(self, digest: str) -> _Verified | None:
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def put(self, digest: str, entry: _Verified) -> None:
        if self.size <= 0:
            return
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


def bearer_token(header: str) -> str | None:
    """The token of ``Bearer <token>`` (scheme and length checked, not yet its shape)."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return token


def parse_bearer(header: str) -> str | None:
    """The token of ``Bearer <token>`` if it has the shape of a compact JWS, else None."""
    token = bearer_token(header)
    return token if token is not None and TOKEN_SHAPE.fullmatch(token) else None


def _text(claims: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise ClaimsProblem(f"missing claim {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ClaimsProblem(f"claim {name} must be a string")
    text = str(value).strip()
    if not text and required:
        raise ClaimsProblem(f"claim {name} is empty")
    return text or None


def _roles(claims: dict[str, Any]) -> list[str]:
    roles = claims.get("roles")
    if not isinstance(roles, list) or not roles:
        raise ClaimsProblem("claim roles must be a non-empty list")
    if not all(isinstance(role, str) and role.strip() for role in roles):
        raise ClaimsProblem("claim roles must hold non-empty strings")
    return [role.strip() for role in roles]


def _trial(claims: dict[str, Any]) -> tuple[bool, str | None]:
    trial_mode = claims.get("trial_mode", False)
    if trial_mode is None:
        trial_mode = False
    if not isinstance(trial_mode, bool):
        raise ClaimsProblem("claim trial_mode must be a boolean")
    expires = claims.get("trial_expires_at")
    if expires is None:
        if trial_mode:
            raise ClaimsProblem("trial token without trial_expires_at")
        return False, None
    if not isinstance(expires, str):
        raise ClaimsProblem("claim trial_expires_at must be an ISO 8601 string")
    try:
        datetime.fromisoformat(expires)
    except ValueError:
        raise ClaimsProblem("claim trial_expires_at is not ISO 8601") from None
    return trial_mode, expires


def _version(claims: dict[str, Any]) -> int:
    version = claims.get("token_version", 0)
    if version is None:
        return 0
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ClaimsProblem("claim token_version must be a non-negative integer")
    return version


def identity_from_claims(
    claims: dict[str, Any], digest: str, max_lifetime_s: int
) -> tuple[Identity, int]:
    """The caller described by already signature-checked claims, and its token_version."""
    token_type = claims.get("token_type")
    if token_type is not None and token_type != "access":
        raise ClaimsProblem("only access tokens are accepted")
    exp, iat = int(claims["exp"]), int(claims["iat"])
    if exp - iat > max_lifetime_s:
        raise ClaimsProblem("token lifetime exceeds the maximum")
    if exp <= iat:
        raise ClaimsProblem("token expires before it was issued")
    trial_mode, trial_expires_at = _trial(claims)
    identity = Identity(
        user_id=_text(claims, "user_id", required=True),
        subject=_text(claims, "sub", required=True),
        email=_text(claims, "email", required=True),
        roles=_roles(claims),
        customer_id=_text(claims, "customer_id"),
        governor_agent_id=_text(claims, "governor_agent_id"),
        agent_id=_text(claims, "agent_id"),
        trial_mode=trial_mode,
        trial_expires_at=trial_expires_at,
        jti=_text(claims, "jti"),
        token_digest=digest,
        token_exp=exp,
        issuer=_text(claims, "iss", required=True),
        claims=claims,
    )
    return identity, _version(claims)


class AuthStep(CounterGuard):
    """Bearer JWT verification with a per-token claims cache and per-request state checks.

    Customer enrichment runs only where a customer is needed: on requests matching a
    tenant-binding rule (``TENANT_RULES``, when the tenant guard is on), for tokens without
    ``customer_id``. Elsewhere a customer-less token (e.g. a partner-platform admin) passes
    without a backend call; an answer already cached for the token is reused on every route.
    """

    name = "auth"

    def __init__(
        self,
        config: AuthConfig,
        keys: KeySource,
        counters: Counters,
        enricher: CustomerEnricher | None = None,
    ) -> None:
        super().__init__(counters)
        self.config = config
        self.keys = keys
        self.enricher = enricher
        self.cache = ClaimsCache(config.claims_cache_size)
        self.signature_checks = 0
        self.cache_hits = 0
        self._allowed = config.algorithms
        self._issuers = list(config.issuers)
        self._leeway = config.leeway_s
        self._tenant_routes = RouteSet(list(config.customer_routes))

    async def run(self, ctx: RequestContext) -> Problem | None:
        if ctx.is_public or ctx.service_key_route:
            return None
        header = ctx.headers.get("authorization")
        if header is None:
            return unauthorized("unauthorized", "an Authorization: Bearer token is required")
        token = bearer_token(header)
        if token is None:
            return unauthorized("invalid-token-format", "expected Authorization: Bearer <JWT>")
        digest = token_digest(token)
        verified = self._cached(digest)
        if verified is None:
            # a cached digest is a token that already passed the shape check: only new ones
            if TOKEN_SHAPE.fullmatch(token) is None:
                return unauthorized("invalid-token-format", "expected Authorization: Bearer <JWT>")
            verified = await self._verified(token, digest)
        if isinstance(verified, Problem):
            return verified
        problem = await self._check_state(ctx, verified)
        if problem is not None:
            return problem
        identity = await self._enrich(ctx, verified.identity, token)
        if isinstance(identity, Problem):
            return identity
        if identity is verified.identity:  # not enriched: a copy of the cached one
            identity = copy_identity(identity)
            remember_cached(ctx, identity, verified.identity)
        ctx.identity = identity
        ctx.authorization = header
        return None

    # --- signature and claims (cached per token) ---------------------------------------------
    def _cached(self, digest: str) -> _Verified | Problem | None:
        """The cache's answer for a token (verified, or expired), None when it must be checked."""
        entry = self.cache.get(digest)
        if entry is not None and entry.generation == self.keys.generation:
            if entry.exp + self._leeway <= time.time():
                self.cache.drop(digest)
                return unauthorized("token-expired", "the token has expired")
            self.cache_hits += 1
            return entry
        return None

    async def _verified(self, token: str, digest: str) -> _Verified | Problem:
        cached = self._cached(digest)
        if cached is not None:
            return cached
        result = await self._verify(token, digest)
        if isinstance(result, _Verified):
            self.cache.put(digest, result)
        return result

    async def _verify(self, token: str, digest: str) -> _Verified | Problem:
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            return unauthorized("invalid-token-format", "the token header cannot be decoded")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            return unauthorized("invalid-token", "the token's algorithm is not accepted")
        generation = self.keys.generation
        try:
            key = await self.keys.key_for(header)
        except KeyLookupError as exc:
            return unauthorized("invalid-token", f"no trusted key for this token: {exc}")
        except DependencyError:
            return unavailable("keys", "the token signing keys are unavailable")
        try:
            claims = self._decode(token, key.key, list(key.algorithms))
            identity, version = identity_from_claims(
                claims, digest, self.config.max_lifetime_s
            )
        except ExpiredSignatureError:
            return unauthorized("token-expired", "the token has expired")
        except InvalidSignatureError:
            return unauthorized("invalid-token", "the token signature is invalid")
        except DecodeError:
            return unauthorized("invalid-token-format", "the token cannot be decoded")
        except (PyJWTError, ClaimsProblem) as exc:
            return unauthorized("invalid-token", _safe_reason(exc))
        return _Verified(identity, version, int(claims["exp"]), generation)

    def _decode(self, token: str, key: Any, algorithms: list[str]) -> dict[str, Any]:
        self.signature_checks += 1
        audience = self.config.audience
        return jwt.decode(
            token,
            key,
            algorithms=algorithms,
            issuer=self._issuers,
            audience=audience,
            leeway=self._leeway,
            options={"require": REQUIRED_REGISTERED, "verify_aud": audience is not None},
        )

    # --- revocation and session version (every request) ---------------------------------------
    async def _check_state(self, ctx: RequestContext, verified: _Verified) -> Problem | None:
        identity = verified.identity
        op = AuthStateOp(revocation_id(identity), identity.user_id)

        def resolve(result: Any) -> Problem | None:
            return state_problem(result, verified.token_version)

        return await submit(ctx, self.counters, op, resolve, self.batched)

    # --- customer enrichment -------------------------------------------------------------------
    def needs_customer(self, ctx: RequestContext) -> bool:
        """True when a tenant-binding rule applies to this request (it needs a customer id)."""
        path = ctx.upstream_path or ctx.path
        return bool(self._tenant_routes) and self._tenant_routes(path, ctx.method)

    async def _enrich(
        self, ctx: RequestContext, identity: Identity, token: str
    ) -> Identity | Problem:
        """``identity``, or a copy of it with the customer filled in by the enricher."""
        enricher = self.enricher
        if enricher is None or identity.customer_id or identity.token_digest is None:
            return identity
        digest = identity.token_digest
        known = enricher.cached(digest)
        if known is None and not self.needs_customer(ctx):
            return identity
        try:
            found = known or await enricher.lookup(token, digest, identity.token_exp or 0)
        except EnrichmentRejected:
            return unauthorized("invalid-token", "the backend does not recognise this token")
        except DependencyError:
            return unavailable("enrichment", "the customer lookup is unavailable")
        return replace(
            identity, roles=list(identity.roles), customer_id=found.customer_id,
            email=found.email or identity.email,
        )


def state_problem(result: Any, token_version: int) -> Problem | None:
    """The verdict on ``auth_state``'s (revoked, current version); every store failure denies."""
    if isinstance(result, BaseException):
        if not isinstance(result, DependencyError):  # a store bug must deny, never admit
            log.error("revocation check failed: %s", type(result).__name__)
        return unavailable("counters", "the token revocation store is unavailable")
    revoked, current = result
    if revoked:
        return unauthorized("token-revoked", "the token has been revoked")
    if current is not None and token_version < current:
        return unauthorized("token-version-mismatch", "the session has been invalidated")
    return None


def _safe_reason(exc: Exception) -> str:
    """A short, caller-safe reason (PyJWT and claim messages name claims, never secrets)."""
    text = str(exc) or type(exc).__name__
    return text[:120]


def build(config: AuthConfig, deps: Dependencies) -> AuthStep:
    keys = deps.keys
    if keys is None:
        from plant_gateway.backends.keys import create

        keys = deps.keys = create(deps.settings)
    enricher = None
    found = config.enrichment
    if found is not None:
        enricher = CustomerEnricher(
            found.backend_url,
            timeout_s=found.timeout_s,
            cache_size=config.claims_cache_size,
            id_token=IdTokenSource(found.audience) if found.use_id_token else None,
        )
        deps.guard_backends.append(enricher)
    return AuthStep(config, keys, deps.counters, enricher)


GUARD = GuardSpec(
    name="auth", phase=Phase.ACCESS, config=AuthConfig.from_settings, build=build, batched=True,
)
