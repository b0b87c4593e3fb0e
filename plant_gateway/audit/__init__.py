"""The audit trail: one redacted, hash-chained row per request, written to PostgreSQL.

The public surface the app and deps use; the heavy modules (asyncpg, the recorder) load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plant_gateway.audit.sink import PostgresAuditSink
    from plant_gateway.context import RequestContext
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

__all__ = ["AuditOff", "build_recorder", "create_sink"]


class AuditOff:
    """The recorder when the audit guard is switched off in settings."""

    def record(self, ctx: RequestContext) -> None:
        return None


def build_recorder(settings: Settings, deps: Dependencies) -> Any:
    """The audit step's recorder (non-blocking ``record(ctx)``), or a no-op when audit is off."""
    if not settings.guard_on("audit"):
        return AuditOff()
    # imported here: the recorder pulls in the auth step and the row schema, which a gateway
    # without audit (and ``import plant_gateway.app`` itself) never needs
    from plant_gateway.audit import recorder

    return recorder.build(settings, deps) or AuditOff()


def create_sink(settings: Settings) -> PostgresAuditSink:
    """The sink on DATABASE_URL, or on an embedded server in ``state_dir/pgdata``."""
    # imported here: asyncpg loads only when audit is on
    from plant_gateway.audit import sink

    return sink.create(settings)
