"""The one registry of the request path: every step in order, each guard declared by its module.

The pipeline, the ``PLANT_GUARDS`` names, the guards a deployment runs and which guards batch
their counter ops are all derived from ``PIPELINE``; adding a guard is one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plant_gateway.guards import auth, budget, ip_access, policy, rate_limit, tenant, trial_quota
from plant_gateway.pipeline import counter_batch, ingress, routes
from plant_gateway.pipeline.step import GuardSpec, Phase, PlumbingSpec

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.pipeline.step import Step
    from plant_gateway.settings import Settings

# In request order (README → Architecture map); phases never go back (test_registry).
PIPELINE: tuple[GuardSpec[Any] | PlumbingSpec, ...] = (
    ingress.STEP,
    routes.STEP,
    ip_access.GUARD,
    auth.GUARD,
    rate_limit.GUARD,
    policy.GUARD,
    trial_quota.GUARD,
    budget.GUARD,
    counter_batch.STEP,  # the batched guards' counter ops: one round trip
    tenant.GUARD,
)
# Guards of the LOG phase: not steps, the app runs them after every answer (the audit recorder).
LOG_GUARDS = ("audit",)

GUARDS: tuple[GuardSpec[Any], ...] = tuple(s for s in PIPELINE if isinstance(s, GuardSpec))
PLUMBING = frozenset(s.name for s in PIPELINE if isinstance(s, PlumbingSpec))


def switches() -> tuple[str, ...]:
    """Every ``PLANT_GUARDS`` name, in pipeline order."""
    names = [g.switched_by for g in GUARDS] + list(LOG_GUARDS)
    return tuple(dict.fromkeys(names))


def default_switches() -> tuple[str, ...]:
    """The ``PLANT_GUARDS`` default: every switch but the opt-in guards'."""
    opt_in = {g.switched_by for g in GUARDS if not g.default_on}
    return tuple(name for name in switches() if name not in opt_in)


def sections() -> tuple[type[Any], ...]:
    """The settings sections guards declare themselves (``GuardSettings``)."""
    return tuple(g.section for g in GUARDS if g.section is not None)


def build_pipeline(settings: Settings, deps: Dependencies) -> list[Step]:
    """The steps of these settings, in order; a guard switched off is not in the list at all."""
    built: list[tuple[GuardSpec[Any] | PlumbingSpec, Any]] = []
    for spec in PIPELINE:
        if isinstance(spec, GuardSpec):
            step = spec.create(settings, deps)
        else:
            step = spec.build(settings, deps)
        if step is not None:
            built.append((spec, step))
    batched = [step for spec, step in built if isinstance(spec, GuardSpec) and spec.batched]
    for step in batched:
        step.batched = True  # they enqueue; the counter batch step runs the round trip
    return [
        step for spec, step in built
        if batched or not (isinstance(spec, PlumbingSpec) and spec.with_batched_guards)
    ]


def phases_in_order() -> bool:
    """True when no step of ``PIPELINE`` is in an earlier phase than the one before it."""
    order = [spec.phase for spec in PIPELINE]
    return order == sorted(order) and Phase.LOG not in order
