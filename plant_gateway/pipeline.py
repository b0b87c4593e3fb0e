"""The request path as data: the ordered list of steps, built once from settings.

Each step module exposes ``build(settings, deps) -> Step | None``; ``None`` means the step is
switched off in settings and is not in the pipeline at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings
    from plant_gateway.steps import Step

# Fixed order (README → Architecture map). Audit is not in the list: the app records every
# outcome in `finally`.
STEP_ORDER = (
    "ingress",
    "routes",
    "auth",
    "rate_limit",
    "policy",
    "trial_quota",
    "budget",
    "admit",  # runs the counter ops auth..budget enqueued: one round trip (steps/admit.py)
    "tenant",
)


def build_pipeline(settings: Settings, deps: Dependencies) -> list[Step]:
    steps: list[Step] = []
    for name in STEP_ORDER:
        module = importlib.import_module(f"plant_gateway.steps.{name}")
        step = module.build(settings, deps)
        if step is not None:
            steps.append(step)
    for step in steps:  # a step that configures the others of its pipeline (admit)
        bind = getattr(step, "bind", None)
        if bind is not None:
            bind(steps)
    return steps
