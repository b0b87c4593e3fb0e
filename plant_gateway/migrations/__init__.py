"""Alembic migrations for the audit log, packaged with the gateway and run from code.

``upgrade``/``downgrade``/``current`` build an Alembic ``Config`` in code (no alembic.ini).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "plant_gateway_alembic_version"  # never the backend's alembic_version


def sqlalchemy_url(dsn: str) -> str:
    """A libpq/asyncpg DSN as a SQLAlchemy URL using the psycopg2 driver."""
    for prefix in ("postgresql+asyncpg://", "postgres://", "postgresql://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg2://" + dsn[len(prefix):]
    return dsn


def alembic_config(dsn: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["url"] = sqlalchemy_url(dsn)
    return cfg


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision)


def current(dsn: str) -> str | None:
    engine = create_engine(sqlalchemy_url(dsn))
    try:
        with engine.connect() as conn:
            options = {"version_table": VERSION_TABLE}
            return MigrationContext.configure(conn, opts=options).get_current_revision()
    finally:
        engine.dispose()
