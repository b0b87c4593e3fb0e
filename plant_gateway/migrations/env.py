"""Alembic environment: online migrations only, serialised by a PostgreSQL advisory lock.

The URL comes from ``config.attributes["url"]`` (set by ``plant_gateway.migrations``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

MIGRATION_LOCK = 7_402_118_733  # advisory lock key: one migration at a time per database


def run_migrations_online() -> None:
    url = context.config.attributes["url"]
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, transaction_per_migration=False)
            with context.begin_transaction():
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
run_migrations_online()
