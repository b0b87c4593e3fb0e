"""The small interfaces the steps talk to; each has an in-process and a real-service backend.

Every backend is also a ``Dependency``: started once, closed once, and checked by ``/ready``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext


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


# --- policy ---------------------------------------------------------------------------------


class PolicyEngine(Dependency, Protocol):
    """Evaluates the policy entry point for one input document.

    Returns the decision document (``allow``, ``kind``, ``reason``, ``required_permission``,
    ``redirect``, ``target_backend``, ``obligations``...) or raises ``DependencyError`` on an
    engine error, a timeout or an undefined decision.
    """

    async def decide(self, policy_input: dict[str, Any]) -> dict[str, Any]: ...


# --- feature flags -------------------------------------------------------------------------


class Flags(Dependency, Protocol):
    """In-memory flag evaluation for a request context (never a network call per request)."""

    def enabled(self, flag: str, ctx: RequestContext) -> bool: ...

    def value(self, flag: str, ctx: RequestContext, default: Any) -> Any: ...


# --- audit ---------------------------------------------------------------------------------


class AuditSink(Dependency, Protocol):
    """Accepts finished rows without blocking; persists them in the background."""

    def submit(self, row: dict[str, Any]) -> None: ...
