"""The small interfaces the steps talk to; each has an in-process and a real-service backend.

Every backend is also a ``Dependency``: started once, closed once, and checked by ``/ready``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.counters.ops import CounterOp


@dataclass(slots=True)
class DependencyStatus:
    """One line of ``/ready``: never carries a secret or a URL with credentials."""

    name: str
    ok: bool
    required: bool = True
    detail: str = ""
    latency_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "up" if self.ok else "down", "required": self.required}
        if self.detail:
            out["detail"] = self.detail
        if self.latency_ms is not None:
            out["latency_ms"] = round(self.latency_ms, 2)
        return out


@runtime_checkable
class Dependency(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self) -> DependencyStatus: ...


class DependencyError(Exception):
    """A guarding dependency failed (unreachable, timed out): the request is denied."""


# --- counters: revocation, rate limits, trial quota, budget --------------------------------


@dataclass(slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float = 0.0


@dataclass(slots=True)
class BudgetDecision:
    allowed: bool
    alert_level: str
    platform_spent: float
    platform_limit: float
    agent_spent: float | None = None
    agent_limit: float | None = None
    customer_spent: float | None = None
    customer_limit: float | None = None
    retry_after_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Counters(Dependency, Protocol):
    """Shared state for the guards. Methods raise ``DependencyError`` when the store is down."""

    async def is_revoked(self, jti: str) -> bool: ...

    async def revoke(self, jti: str, ttl_s: int) -> None: ...

    async def token_version(self, user_id: str) -> int | None: ...

    async def bump_token_version(self, user_id: str) -> int: ...

    async def auth_state(self, jti: str | None, user_id: str | None) -> tuple[bool, int | None]:
        """(revoked, current token_version) in one round trip; either key may be skipped."""
        ...

    async def rate_limit(self, key: str, limit: int, period_s: float, burst: int) -> RateDecision:
        """One GCRA step for ``key`` (a principal or an IP); consumes one request if allowed."""
        ...

    async def daily_quota(self, key: str, limit: int, now: float | None = None) -> RateDecision:
        """Count one unit against ``key`` for the UTC day of ``now`` (default: the clock's
        now) unless ``limit`` is reached."""
        ...

    async def budget_charge(self, request: BudgetRequest) -> BudgetDecision:
        """Atomically check all budgets of ``request`` and charge them all, or none."""
        ...

    async def budget_adjust(self, charge: BudgetCharge, delta_usd: float) -> None:
        """Add ``delta_usd`` (may be negative) to the counters a previous charge touched."""
        ...

    async def release_quota(self, key: str, now: float) -> None:
        """Give back one unit a ``daily_quota(key, limit, now)`` call counted (refunds)."""
        ...

    async def approval_consume(self, approval_id: str, ttl_s: int) -> bool:
        """Mark a Governor approval used, atomically across instances: True for its first use
        only. The mark lives ``ttl_s`` seconds (past the approval's own expiry)."""
        ...

    async def approval_release(self, approval_id: str) -> None:
        """Undo an ``approval_consume`` whose request was refused after all (refunds)."""
        ...

    async def execute(self, ops: Sequence[CounterOp]) -> list[Any]:
        """Run ``ops`` (typed, ``plant_gateway.counters.ops``) in ONE round trip (Redis: one
        non-transactional pipeline).

        Each result is what the op's method would return, or the ``DependencyError`` it
        would raise (a failed round trip fails every op); ``execute`` itself never raises.
        """
        ...


@dataclass(slots=True)
class BudgetRequest:
    """What one request costs and which budgets it counts against (limits in USD)."""

    cost_usd: float
    platform_limit: float
    agent_id: str | None = None
    agent_limit: float | None = None
    customer_id: str | None = None
    customer_limit: float | None = None
    thresholds: tuple[float, float, float] = (0.80, 0.95, 1.00)
    privileged: bool = False  # Governor or designated critical agent: passes the >= high rule
    override: bool = False  # Governor: passes even a critical budget


@dataclass(slots=True)
class BudgetCharge:
    """The counters one request was charged on (to settle the real cost later)."""

    day: str
    month: str
    agent_id: str | None
    customer_id: str | None
    cost_usd: float


# --- policy ---------------------------------------------------------------------------------


class PolicyEngine(Dependency, Protocol):
    """Evaluates the policy entry point for one input document.

    Returns the decision document (``allow``, ``kind``, ``reason``, ``required_permission``,
    ``redirect``, ``target_backend``, ``obligations``...) or raises ``DependencyError`` on an
    engine error, a timeout or an undefined decision.
    """

    async def decide(self, policy_input: dict[str, Any]) -> dict[str, Any]: ...


# --- Governor approvals: the platform's records ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """An approval the platform minted, as its approvals API answers it."""

    approval_id: str
    action: str
    agent_id: str | None = None
    customer_id: str | None = None
    expires_ns: int | None = None  # None: the platform set no expiry

    def as_input(self) -> dict[str, Any]:
        """``input.approval`` for the policy (policies/governor.rego judges it)."""
        return {"id": self.approval_id, "verified": True, "action": self.action,
                "agent_id": self.agent_id, "customer_id": self.customer_id,
                "expires_ns": self.expires_ns}


@dataclass(frozen=True, slots=True)
class NotVerified:
    """The platform does not vouch for the id: ``unknown`` (404) or ``refused`` (the caller's
    token may not read approvals: 401/403)."""

    reason: str


class Approvals(Dependency, Protocol):
    """Looks an approval id up on the platform, with the caller's own Authorization header.

    Raises ``DependencyError`` when the platform does not answer (the request is refused, 503).
    """

    async def lookup(
        self, approval_id: str, authorization: str | None
    ) -> ApprovalRecord | NotVerified: ...


# --- feature flags -------------------------------------------------------------------------


class Flags(Dependency, Protocol):
    """In-memory flag evaluation for a request context (never a network call per request)."""

    def enabled(self, flag: str, ctx: RequestContext) -> bool: ...

    def value(self, flag: str, ctx: RequestContext, default: Any) -> Any: ...


# --- audit ---------------------------------------------------------------------------------


class RowSink(Protocol):
    """Where the recorder hands finished rows (lines, see ``audit/schema``): never blocks."""

    def submit(self, row: bytes) -> None: ...


class AuditSink(Dependency, RowSink, Protocol):
    """A ``RowSink`` that persists the rows in the background.

    ``refusing`` is True while it cannot secure new rows and requests must be refused
    (``AUDIT_ON_LOSS=refuse``); the request path reads it once per request.
    """

    refusing: bool
