"""What a step of the request path is, and how a guard declares itself to the registry.

A step has a ``name`` and ``async def run(ctx) -> Problem | None``; it may also have
``async def after(ctx)`` which runs once the upstream answered (or a problem was sent).
A guard module exposes one ``GuardSpec``: its name, switch, phase, typed config and builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from plant_gateway.context import RequestContext
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings


@runtime_checkable
class Step(Protocol):
    name: str

    async def run(self, ctx: RequestContext) -> Problem | None: ...


@runtime_checkable
class AfterStep(Protocol):
    """A step that also wants to see the outcome (budget settlement)."""

    name: str

    async def after(self, ctx: RequestContext) -> None: ...


class Phase(IntEnum):
    """Where in the request path a step runs; the registry lists steps in phase order."""

    INGRESS = 0  # plumbing: framing, ids, route classification
    ACCESS = 1  # guards that admit or refuse the caller (before the counters round trip)
    ADMIT = 2  # plumbing: the batched counter ops of the ACCESS guards, one round trip
    REWRITE = 3  # guards that change the request before it is forwarded (tenant binding)
    LOG = 4  # after the answer, never a step in the list (the audit recorder)


ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True, slots=True)
class GuardSpec(Generic[ConfigT]):
    """One guard, as the registry knows it (the unit a Kong plugin or an Envoy filter is).

    ``switch``: the ``PLANT_GUARDS`` entry that turns it on (trial quota rides on
    ``rate_limit``'s). ``config`` reads the guard's settings once, at start-up; ``build``
    returns the step, or None when the guard has nothing to do (no rules configured).
    ``batched``: its counter ops ride in the request's one round trip (``counter_batch``).
    ``default_on``: in the default ``PLANT_GUARDS`` (an opt-in guard is not).
    ``section``: the guard's own ``GuardSettings``, read and checked with the other settings.
    """

    name: str
    phase: Phase
    config: Callable[[Settings], ConfigT]
    build: Callable[[ConfigT, Dependencies], Any]
    switch: str = ""
    batched: bool = False
    default_on: bool = True
    # a guard's own settings section (``GuardSettings``), when it declares its variables itself
    section: type[Any] | None = None

    @property
    def switched_by(self) -> str:
        return self.switch or self.name

    def create(self, settings: Settings, deps: Dependencies) -> Any:
        """The guard's step for these settings, or None (switched off or nothing to do)."""
        if not settings.guard_on(self.switched_by):
            return None
        return self.build(self.config(settings), deps)


@dataclass(frozen=True, slots=True)
class PlumbingSpec:
    """A step every request needs whatever the guards (ingress, routes, the counter batch).

    ``build`` reads what it needs from the settings once; ``with_batched_guards``: only in a
    pipeline that has a ``batched`` guard.
    """

    name: str
    phase: Phase
    build: Callable[[Settings, Dependencies], Any]
    with_batched_guards: bool = False


def flag_on(flags: Any, name: str, ctx: RequestContext) -> bool:
    """Per-request feature flag; a guard with no flags backend stays on."""
    if flags is None:
        return True
    return bool(flags.enabled(name, ctx))
