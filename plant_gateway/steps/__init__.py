"""The guards of the request path, one module each.

A step has a ``name`` and ``async def run(ctx) -> Problem | None``; it may also have
``async def after(ctx)`` which runs once the upstream answered (or a problem was sent).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from plant_gateway.context import RequestContext
from plant_gateway.problems import Problem


@runtime_checkable
class Step(Protocol):
    name: str

    async def run(self, ctx: RequestContext) -> Problem | None: ...


@runtime_checkable
class AfterStep(Protocol):
    """A step that also wants to see the outcome (budget settlement, audit)."""

    name: str

    async def after(self, ctx: RequestContext) -> None: ...
