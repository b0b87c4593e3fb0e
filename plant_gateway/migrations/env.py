"""Alembic environment: online migrations only, serialised by a PostgreSQL advisory lock.

The URL comes from ``config.attributes["url"]`` (set by ``plant_gateway.migrations``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, text

from plant_gateway.migrations import VERSION_TABLE

MIGRATION_LOCK = 7_402_118_733  # advisory lock key: one migration at a time per database
OUR_REVISIONS = ("0001_audit_log",)  # revisions an older release recorded in alembic_version


def move_version_row(connection: Connection) -> None:
    """Releases before the own version table wrote ours into ``alembic_version``: move it."""
    if connection.execute(text("SELECT to_regclass(:t)"), {"t": VERSION_TABLE}).scalar():
        return
    if not connection.execute(text("SELECT to_regclass('alembic_version')")).scalar():
        return
    found = connection.execute(
        text("SELECT version_num FROM alembic_version WHERE version_num = ANY(:ours)"),
        {"ours": list(OUR_REVISIONS)},
    ).scalar()
    if found is None:
        return  # the backend's chain (or another tool's): never touched
    connection.execute(text(
        f"CREATE TABLE {VERSION_TABLE} (version_num varchar(32) NOT NULL "
        f"CONSTRAINT {VERSION_TABLE}_pkc PRIMARY KEY)"
    ))
    connection.execute(text(f"INSERT INTO {VERSION_TABLE} VALUES (:v)"), {"v": found})
    connection.execute(text("DELETE FROM alembic_version WHERE version_num = :v"), {"v": found})
    if not connection.execute(text("SELECT count(*) FROM alembic_version")).scalar():
        connection.execute(text("DROP TABLE alembic_version"))


def run_migrations_online() -> None:
    url = context.config.attributes["url"]
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                transaction_per_migration=False,
                version_table=VERSION_TABLE,
            )
            with context.begin_transaction():
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
                move_version_row(connection)
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
run_migrations_online()
