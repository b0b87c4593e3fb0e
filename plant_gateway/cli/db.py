# ruff: noqa: B008  (typer declares options as argument defaults)
"""``plant-gateway db``: run the packaged Alembic migrations (upgrade, downgrade, current).

Uses DATABASE_URL when set, otherwise the embedded PostgreSQL in ``PLANT_STATE_DIR/pgdata``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from plant_gateway.settings import libpq_dsn

db_app = typer.Typer(help="Audit database migrations.", no_args_is_help=True)

URL_OPTION = typer.Option(
    None, "--database-url", envvar="DATABASE_URL", help="PostgreSQL URL (default: embedded)",
    show_default=False,
)
STATE_OPTION = typer.Option(
    Path(".plant-gateway"), "--state-dir", envvar="PLANT_STATE_DIR",
    help="State directory of the embedded PostgreSQL",
)


@contextmanager
def database(url: str | None, state_dir: Path) -> Iterator[str]:
    """An admin DSN: ``url``, or the embedded server (started if needed, left as found)."""
    if url:
        yield libpq_dsn(url)
        return
    from plant_gateway.backends.embedded_postgres import EmbeddedPostgres

    server = EmbeddedPostgres(state_dir / "pgdata")
    server.start()
    try:
        yield server.dsn()
    finally:
        server.stop()


@db_app.command()
def upgrade(
    revision: str = typer.Argument("head"),
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Migrate the audit schema up (idempotent: safe to run twice)."""
    from plant_gateway import migrations

    with database(database_url, state_dir) as dsn:
        migrations.upgrade(dsn, revision)
        typer.echo(f"database at revision {migrations.current(dsn)}")


@db_app.command()
def downgrade(
    revision: str = typer.Argument("base"),
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Migrate the audit schema down (default: base, which drops the audit table)."""
    from plant_gateway import migrations

    with database(database_url, state_dir) as dsn:
        migrations.downgrade(dsn, revision)
        typer.echo(f"database at revision {migrations.current(dsn)}")


@db_app.command()
def current(database_url: str | None = URL_OPTION, state_dir: Path = STATE_OPTION) -> None:
    """Print the current migration revision."""
    from plant_gateway import migrations

    with database(database_url, state_dir) as dsn:
        typer.echo(migrations.current(dsn) or "base (no audit schema)")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
