"""The counter batch: the counter operations of the guards of one request, run in ONE round trip.

Auth (revocation, ``token_version``), rate limit, trial quota and budget do not await the
counters store themselves: each *enqueues* its ``CounterOp`` on the request's ``CounterBatch``
(``ctx.scratch[BATCH]``) with a *resolver* that turns the op's result into ``Problem | None``.
The ``counter_batch`` step, after the access guards, runs the batch with ``Counters.execute``
(Redis: one pipeline) and resolves the results in step order, so the first refusal in order
wins (auth → rate limit → quota → budget), as if the steps had run one by one. When a step in
between refuses (policy 403, a 503), the app calls ``flush_on_refusal``: the pending ops run
and an earlier refusal (a revoked token → 401) takes precedence over the later one.

Side effects of refused requests: ops of one batch run unconditionally (their keys live in
different hash slots, so no script can see another's verdict); a quota unit or a budget charge
taken by an op *after* the refusing one is refunded in one more round trip (only on that rare
path). Rate-limit units consumed before a later refusal stay consumed, as they did before. A
Governor approval (``approval_consume``, enqueued by the policy step) is only used by a request
that gets through: it is released whenever the request is refused, before or after its op.

Steps built outside a pipeline with a ``counter_batch`` step (unit tests, tools) are not
``batched``: they run their op at once, one round trip each, with the same resolver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from plant_gateway.backends.base import (
    BudgetCharge,
    BudgetDecision,
    DependencyError,
    RateDecision,
)
from plant_gateway.context import RequestContext
from plant_gateway.counters import (
    ApprovalConsumeOp,
    ApprovalReleaseOp,
    BudgetAdjustOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    ReleaseQuotaOp,
    call,
)
from plant_gateway.pipeline.step import Phase, PlumbingSpec
from plant_gateway.problems import Problem, unavailable

if TYPE_CHECKING:
    from plant_gateway.backends.base import Counters
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

log = logging.getLogger(__name__)

BATCH = "counter_batch"  # the request's batch in ``ctx.scratch``
COUNTER_BATCH = "counter_batch"  # the step's name
# the guard that enqueued each kind of op: the request log names it when its op refused
GUARD_OF_OP = {"auth_state": "auth", "rate_limit": "rate_limit", "daily_quota": "trial_quota",
               "budget_charge": "budget", "approval_consume": "policy"}
# A resolver gets the op's result, the DependencyError of a failed store, or (a store bug)
# another exception, and answers with the request's refusal or None.
Resolver = Callable[[Any], Problem | None]


class CounterBatch:
    """The pending ops of one request, in step order, with their resolvers."""

    __slots__ = ("counters", "pending", "refused_by")

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.pending: list[tuple[CounterOp, Resolver]] = []
        self.refused_by: str | None = None  # the guard whose op refused (GUARD_OF_OP)

    def add(self, op: CounterOp, resolve: Resolver) -> None:
        self.pending.append((op, resolve))

    async def flush(self, refused: bool = False) -> Problem | None:
        """Run every pending op in one round trip; the first refusal in order, or None.

        ``refused``: a step refused the request anyway (``flush_on_refusal``), so nothing is
        kept that only a request that gets through may take (an approval).
        """
        pending, self.pending = self.pending, []
        if not pending:
            return None
        results = await execute(self.counters, [op for op, _ in pending])
        problem, refunds = self.resolve(pending, results, refused)
        if refunds:
            await refund(self.counters, refunds)
        return problem

    def flush_now(self) -> tuple[Problem | None, list[CounterOp | None]] | None:
        """``flush`` without a coroutine when the store is in process (``execute_now``):
        (refusal, refunds still to run); None when the store needs a round trip."""
        run_now = getattr(self.counters, "execute_now", None)
        if run_now is None:
            return None
        pending, self.pending = self.pending, []
        ops = [op for op, _ in pending]
        try:
            results = run_now(ops)
        except Exception as exc:  # noqa: BLE001 - handed to the resolvers, see execute()
            results = failed(ops, exc)
        return self.resolve(pending, results)

    def resolve(
        self, pending: list[tuple[CounterOp, Resolver]], results: list[Any],
        refused: bool = False,
    ) -> tuple[Problem | None, list[CounterOp | None]]:
        """``resolve_in_order``, remembering which guard's op refused."""
        problem, refunds, stop = _resolve(pending, results, refused)
        if problem is not None:
            self.refused_by = GUARD_OF_OP.get(pending[stop][0].kind, COUNTER_BATCH)
        return problem, refunds


def resolve_in_order(
    pending: list[tuple[CounterOp, Resolver]], results: list[Any], refused: bool = False
) -> tuple[Problem | None, list[CounterOp | None]]:
    """The first refusal of ``pending`` in order, and the refunds it calls for: what the ops
    after it took, and approvals consumed before it. ``refused``: the request is refused
    anyway (another step), so approvals consumed by any op are released."""
    problem, refunds, _ = _resolve(pending, results, refused)
    return problem, refunds


def _resolve(
    pending: list[tuple[CounterOp, Resolver]], results: list[Any], refused: bool
) -> tuple[Problem | None, list[CounterOp | None], int]:
    """``resolve_in_order`` plus the index of the refusing op (``len(pending)`` if none)."""
    stop, problem = len(pending), None
    for i, ((_, resolve), result) in enumerate(zip(pending, results, strict=True)):
        problem = resolve(result)
        if problem is not None:
            stop = i
            break
    if problem is None and not refused:
        return None, [], stop
    refunds = [refund_op(op, res) for (op, _), res in zip(pending[stop + 1 :], results[stop + 1 :],
                                                         strict=True)]
    for (op, resolve), result in zip(pending[:stop], results[:stop], strict=True):
        if isinstance(op, ApprovalConsumeOp) and result is True:
            refunds.append(refund_op(op, result))
            undo = getattr(resolve, "refunded", None)
            if undo is not None:
                undo()  # the resolver already counted it as used: keep its account true
    return problem, refunds, stop


async def execute(counters: Counters, ops: list[CounterOp]) -> list[Any]:
    """``counters.execute(ops)``; a store that breaks unexpectedly fails every op (deny)."""
    try:
        return await counters.execute(ops)
    except Exception as exc:  # noqa: BLE001 - handed to the resolvers, which never admit on it
        return failed(ops, exc)


def failed(ops: list[CounterOp], exc: Exception) -> list[Any]:
    """The results of a batch whose store broke: the error for every op (the resolvers deny)."""
    if not isinstance(exc, DependencyError):
        log.exception("counters batch failed", exc_info=exc)
    return [exc for _ in ops]


async def submit(
    ctx: RequestContext, counters: Counters, op: CounterOp, resolve: Resolver, batched: bool
) -> Problem | None:
    """Enqueue ``op`` on the request's batch, or (not ``batched``) run it now and resolve it."""
    if batched:
        batch = ctx.scratch.get(BATCH)
        if batch is None:
            batch = ctx.scratch[BATCH] = CounterBatch(counters)
        batch.add(op, resolve)
        return None
    try:
        result = await call(counters, op)
    except Exception as exc:  # noqa: BLE001 - the resolver decides (DependencyError or a bug)
        if not isinstance(exc, DependencyError):
            log.exception("counters call failed", extra={"op": op.kind})
        result = exc
    return resolve(result)


async def flush_on_refusal(ctx: RequestContext, problem: Problem) -> Problem:
    """A step refused while ops are pending: run them; an earlier-order refusal wins."""
    batch: CounterBatch | None = ctx.scratch.pop(BATCH, None)
    if batch is None:
        return problem
    earlier = await batch.flush(refused=True)
    if earlier is not None:
        ctx.refused_by = batch.refused_by
    return earlier or problem


def refund_op(op: CounterOp, result: Any) -> CounterOp | None:
    """The op that gives back what ``op`` took, when the request was refused after all."""
    if isinstance(op, BudgetChargeOp) and isinstance(result, BudgetDecision) and result.allowed:
        charge = result.extra.get("charge")
        if isinstance(charge, BudgetCharge):
            return BudgetAdjustOp(charge, -charge.cost_usd)
    allowed_quota = isinstance(result, RateDecision) and result.allowed
    if isinstance(op, DailyQuotaOp) and allowed_quota and op.now is not None:
        return ReleaseQuotaOp(op.key, op.now)
    if isinstance(op, ApprovalConsumeOp) and result is True:
        return ApprovalReleaseOp(op.approval_id)
    return None


async def refund(counters: Counters, ops: list[CounterOp | None]) -> None:
    todo = [op for op in ops if op is not None]
    if not todo:
        return
    for result in await execute(counters, todo):
        if isinstance(result, Exception):
            log.warning("refund of a refused request failed: %s", result)


class CounterBatchStep:
    """Runs the request's counter batch: the guards' one round trip before forwarding.

    The registry puts it after the ACCESS guards when one of them is ``batched``; those guards
    enqueue from then on instead of awaiting the store themselves.
    """

    name = COUNTER_BATCH

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    async def run(self, ctx: RequestContext) -> Problem | None:
        batch: CounterBatch | None = ctx.scratch.pop(BATCH, None)
        if batch is None:
            return None
        outcome = batch.flush_now()
        if outcome is None:
            problem = await batch.flush()
        else:
            problem, refunds = outcome
            if refunds:
                await refund(self.counters, refunds)
        if problem is not None:
            ctx.refused_by = batch.refused_by
        return problem


class CounterGuard:
    """What every guard that decides with a counters op shares: its store, the store's clock,
    its feature flags, and ``batched`` (set by the registry when the pipeline has a counter
    batch step: the guard enqueues its op instead of awaiting the store itself)."""

    def __init__(self, counters: Counters, flags: Any = None) -> None:
        self.counters = counters
        self.flags = flags
        self.clock: Callable[[], float] = getattr(counters, "clock", time.time)
        self.batched = False


def store_failure(error: BaseException, what: str, fail_open: bool) -> Problem | None:
    """A guard's verdict when its counter op failed: None if it fails open, else a 503.

    Only an outage (``DependencyError``) may fail open; anything else is a store bug, already
    logged by ``execute``/``submit``, and denies like an outage — never admits, never a 500.
    """
    if fail_open and isinstance(error, DependencyError):
        return None
    return unavailable(
        "counters", f"The {what} store is unavailable; the request was not admitted."
    )


def build(settings: Settings, deps: Dependencies) -> CounterBatchStep:
    return CounterBatchStep(deps.counters)


STEP = PlumbingSpec(name=COUNTER_BATCH, phase=Phase.ADMIT, build=build, with_batched_guards=True)
