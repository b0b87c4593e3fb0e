"""Dependencies: the backends the steps talk to, created once from settings.

``create_dependencies`` picks in-process or real-service backends; ``start``/``close`` run them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plant_gateway.backends.base import (
        Approvals,
        AuditSink,
        Counters,
        Dependency,
        Flags,
        PolicyEngine,
    )
    from plant_gateway.settings import Settings


@dataclass
class Dependencies:
    settings: Settings
    counters: Counters
    flags: Flags
    policy: PolicyEngine | None = None
    keys: Any = None  # plant_gateway.backends.keys.KeySource
    audit_sink: AuditSink | None = None
    approvals: Approvals | None = None  # APPROVALS_URL: the platform's Governor approvals
    # backends a guard made for itself at build time (the customer enricher): closed with these
    guard_backends: list[Dependency] = field(default_factory=list)

    def all(self) -> list[Dependency]:
        items: list[Any] = [
            self.counters, self.flags, self.policy, self.keys, self.audit_sink, self.approvals,
        ]
        return [d for d in items if d is not None] + list(self.guard_backends)


async def create_dependencies(settings: Settings) -> Dependencies:
    """Choose every backend from settings (in-process unless a service URL is configured).

    Guards switched off in settings get no backend; nothing is started here (see ``start_all``).
    """
    from plant_gateway import counters
    from plant_gateway.audit import create_sink
    from plant_gateway.backends import approvals, flags, keys, policy

    return Dependencies(
        settings=settings,
        counters=counters.create(settings),
        flags=flags.create(settings),
        policy=policy.create(settings) if settings.guard_on("policy") else None,
        keys=keys.create(settings) if settings.guard_on("auth") else None,
        audit_sink=create_sink(settings) if settings.guard_on("audit") else None,
        approvals=approvals.create(settings) if settings.guard_on("policy") else None,
    )


async def start_all(deps: Dependencies) -> None:
    """Start every dependency in order; a failure stops start-up (close what was started)."""
    started: list[Dependency] = []
    try:
        for dep in deps.all():
            await dep.start()
            started.append(dep)
    except BaseException:
        for dep in reversed(started):
            await dep.close()
        raise


async def close_all(deps: Dependencies) -> None:
    for dep in reversed(deps.all()):
        try:
            await dep.close()
        except Exception:  # noqa: BLE001 - closing must go on for the others
            import logging

            logging.getLogger("plant_gateway.deps").exception("closing %s failed", dep.name)
