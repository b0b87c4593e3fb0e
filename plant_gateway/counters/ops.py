"""The typed counters ops: one small frozen dataclass per ``Counters`` method a batch runs.

The guards build them, ``Counters.execute`` runs a list of them in one round trip, and ``call``
runs one through its ``Counters`` method; dispatch is by type (a ``match``), never by a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, assert_never

if TYPE_CHECKING:
    from plant_gateway.backends.base import BudgetCharge, BudgetRequest, Counters


@dataclass(slots=True, frozen=True)
class AuthStateOp:
    """``Counters.auth_state``: revocation of ``jti`` and the ``token_version`` of ``user_id``."""

    kind: ClassVar[str] = "auth_state"  # the op's name in logs and the request log
    jti: str | None
    user_id: str | None


@dataclass(slots=True, frozen=True)
class RateLimitOp:
    """``Counters.rate_limit``: one GCRA step for ``key``."""

    kind: ClassVar[str] = "rate_limit"
    key: str
    limit: int
    period_s: float
    burst: int


@dataclass(slots=True, frozen=True)
class DailyQuotaOp:
    """``Counters.daily_quota``: one unit against ``key`` for the UTC day of ``now``."""

    kind: ClassVar[str] = "daily_quota"
    key: str
    limit: int
    now: float | None = None


@dataclass(slots=True, frozen=True)
class ReleaseQuotaOp:
    """``Counters.release_quota``: give back one unit a ``DailyQuotaOp`` counted."""

    kind: ClassVar[str] = "release_quota"
    key: str
    now: float


@dataclass(slots=True, frozen=True)
class BudgetChargeOp:
    """``Counters.budget_charge``: check and charge every budget of ``request``, or none."""

    kind: ClassVar[str] = "budget_charge"
    request: BudgetRequest


@dataclass(slots=True, frozen=True)
class BudgetAdjustOp:
    """``Counters.budget_adjust``: add ``delta_usd`` to the counters ``charge`` touched."""

    kind: ClassVar[str] = "budget_adjust"
    charge: BudgetCharge
    delta_usd: float


@dataclass(slots=True, frozen=True)
class ApprovalConsumeOp:
    """``Counters.approval_consume``: mark a Governor approval used (True on first use only)."""

    kind: ClassVar[str] = "approval_consume"
    approval_id: str
    ttl_s: int


@dataclass(slots=True, frozen=True)
class ApprovalReleaseOp:
    """``Counters.approval_release``: undo an ``ApprovalConsumeOp`` (a refused request)."""

    kind: ClassVar[str] = "approval_release"
    approval_id: str


CounterOp: TypeAlias = (
    AuthStateOp
    | RateLimitOp
    | DailyQuotaOp
    | ReleaseQuotaOp
    | BudgetChargeOp
    | BudgetAdjustOp
    | ApprovalConsumeOp
    | ApprovalReleaseOp
)


async def call(counters: Counters, op: CounterOp) -> Any:
    """Run ``op`` alone through its ``Counters`` method (raises what the method raises)."""
    match op:
        case AuthStateOp():
            return await counters.auth_state(op.jti, op.user_id)
        case RateLimitOp():
            return await counters.rate_limit(op.key, op.limit, op.period_s, op.burst)
        case DailyQuotaOp():
            return await counters.daily_quota(op.key, op.limit, op.now)
        case BudgetChargeOp():
            return await counters.budget_charge(op.request)
        case BudgetAdjustOp():
            return await counters.budget_adjust(op.charge, op.delta_usd)
        case ReleaseQuotaOp():
            return await counters.release_quota(op.key, op.now)
        case ApprovalConsumeOp():
            return await counters.approval_consume(op.approval_id, op.ttl_s)
        case ApprovalReleaseOp():
            return await counters.approval_release(op.approval_id)
        case _:
            assert_never(op)
