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
