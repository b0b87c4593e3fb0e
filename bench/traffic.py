"""The traffic sent to every scenario: pre-minted HS256 tokens and a request mix.

Kinds: ``ok`` (allowed read), ``bad_token`` (signature by another key → 401), ``policy_deny``
(viewer creating a resource → 403), ``rate_limited`` (trial users on a 1-request tier → 429).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field

import jwt

DEV_SECRET = "bench-dev-secret-0123456789abcdef-not-for-production"
WRONG_SECRET = "bench-wrong-secret-0123456789abcdef-never-accepted!!"
ISSUER = "waooaw.com"
KINDS = ("ok", "bad_token", "policy_deny", "rate_limited")
# Expected status per kind through the full chain (the baselines answer 200 or Envoy's 401).
EXPECTED_STATUS = {"ok": 200, "bad_token": 401, "policy_deny": 403, "rate_limited": 429}


@dataclass(frozen=True)
class Mix:
    """Shares of denied requests (the rest are allowed) and the number of distinct users."""

    bad_token: float = 0.0
    policy_deny: float = 0.0
    rate_limited: float = 0.0
    users: int = 100

    @property
    def ok(self) -> float:
        return max(0.0, 1.0 - self.bad_token - self.policy_deny - self.rate_limited)

    @property
    def denied(self) -> float:
        return 1.0 - self.ok

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k):.0%}" for k in KINDS[1:] if getattr(self, k)]
        return f"{self.users} users; " + (", ".join(parts) if parts else "all requests allowed")


def parse_mix(text: str, users: int) -> Mix:
    """``"bad_token=0.05,policy_deny=0.05,rate_limited=0.05"``, or the preset ``realistic``."""
    if text in ("", "none", "allowed"):
        return Mix(users=users)
    if text == "realistic":
        return Mix(bad_token=0.05, policy_deny=0.05, rate_limited=0.05, users=users)
    shares: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in KINDS[1:]:
            raise ValueError(f"--mix: unknown kind {name!r}; known: {', '.join(KINDS[1:])}")
        shares[name] = float(value)
    if sum(shares.values()) > 1.0 or any(v < 0 for v in shares.values()):
        raise ValueError("--mix: shares must be ≥ 0 and add up to at most 1")
    return Mix(users=users, **shares)


def _claims(index: int, roles: list[str], trial: bool) -> dict[str, object]:
    now = int(time.time())
    user = uuid.UUID(int=(0xBE << 120) | index)
    customer = uuid.UUID(int=(0xC0 << 120) | index)
    claims: dict[str, object] = {
        "sub": str(user), "user_id": str(user), "customer_id": str(customer),
        "email": f"bench-user-{index}@example.com", "roles": roles,
        "iat": now - 5, "exp": now + 6 * 3600, "iss": ISSUER,
        "jti": uuid.uuid4().hex, "token_type": "access",
    }
    if trial:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 7 * 86400))
        claims.update(trial_mode=True, trial_expires_at=expires)
    return claims


def mint(index: int, roles: list[str], trial: bool = False, secret: str = DEV_SECRET) -> str:
    return jwt.encode(_claims(index, roles, trial), secret, algorithm="HS256",
                      headers={"kid": "bench"})


@dataclass
class Request:
    kind: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None


def _request(kind: str, user: int, rng: random.Random) -> Request:
    item = rng.randrange(1, 1_000_000)
    if kind == "ok":
        token = mint(user, ["developer"])
        return Request(kind, "GET", f"/api/v1/agents/{item}", _auth(token))
    if kind == "bad_token":
        token = mint(user, ["developer"], secret=WRONG_SECRET)
        return Request(kind, "GET", f"/api/v1/agents/{item}", _auth(token))
    if kind == "policy_deny":
        token = mint(user, ["viewer"])
        headers = {**_auth(token), "Content-Type": "application/json"}
        return Request(kind, "POST", "/api/v1/documents", headers, json.dumps({"n": item}))
    token = mint(1_000_000 + user, ["developer"], trial=True)
    return Request(kind, "GET", f"/api/v1/agents/{item}", _auth(token))


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def build_requests(mix: Mix, count: int = 1000, seed: int = 7) -> list[Request]:
    """``count`` requests in a shuffled, deterministic order matching the mix shares."""
    rng = random.Random(seed)
    count = max(count, mix.users)
    kinds: list[str] = []
    for kind in KINDS[1:]:
        kinds += [kind] * round(getattr(mix, kind) * count)
    kinds += ["ok"] * (count - len(kinds))
    rng.shuffle(kinds)
    tokens_cache: dict[tuple[str, int], Request] = {}
    out: list[Request] = []
    for position, kind in enumerate(kinds):
        user = position % mix.users
        template = tokens_cache.get((kind, user))
        if template is None:
            template = tokens_cache[(kind, user)] = _request(kind, user, rng)
        out.append(_request_like(template, rng))
    return out


def _request_like(template: Request, rng: random.Random) -> Request:
    """Same caller, fresh resource id (so per-path caches do not short-circuit)."""
    if template.method != "GET":
        return template
    return Request(template.kind, "GET", f"/api/v1/agents/{rng.randrange(1, 1_000_000)}",
                   template.headers, None)


def expected_denied_share(mix: Mix, scenario_kind: str) -> float:
    """Share of non-2xx answers the scenario should give for this mix."""
    if scenario_kind.startswith("gateway-full"):
        return mix.denied
    if scenario_kind == "envoy":
        return mix.bad_token
    return 0.0
