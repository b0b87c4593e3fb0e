"""Dependencies: the backends the steps talk to, created once from settings.

``create_dependencies`` picks in-process or real-service backends; ``start``/``close`` run them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plant_gateway.backends.base import AuditSink, Counters, Dependency, Flags, PolicyEngine
    from plant_gateway.settings import Settings


@dataclass
class Dependencies:
    settings: Settings
    counters: Counters
    flags: Flags
    policy: PolicyEngine | None = None
    keys: Any = None  # plant_gateway.backends.keys.KeySource
    audit_sink: AuditSink | None = None
    extra: list[Dependency] = field(default_factory=list)

    def all(self) -> list[Dependency]:
        items: list[Any] = [self.counters, self.flags, self.policy, self.keys, self.audit_sink]
        return [d for d in items if d is not None] + list(self.extra)


def _optional_backend(module_name: str, settings: Settings) -> Any:
    """``plant_gateway.backends.<name>.create(settings)``; None while the module is unwritten."""
    import importlib

    full = f"plant_gateway.backends.{module_name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return None
        raise
    return module.create(settings)


async def create_dependencies(settings: Settings) -> Dependencies:
    """Choose every backend from settings (in-process unless a service URL is configured).

    Guards switched off in settings get no backend; nothing is started here (see ``start_all``).
    """
    counters = _optional_backend("counters", settings)
    flags = _optional_backend("flags", settings)
    policy = _optional_backend("policy", settings) if settings.guard_on("policy") else None
    keys = _optional_backend("keys", settings) if settings.guard_on("auth") else None
    audit = _optional_backend("audit_postgres", settings) if settings.guard_on("audit") else None
    return Dependencies(
        settings=settings, counters=counters, flags=flags, policy=policy, keys=keys,
        audit_sink=audit,
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
