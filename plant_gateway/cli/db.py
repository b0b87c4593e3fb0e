# ruff: noqa: B008  (typer declares options as argument defaults)
"""``plant-gateway db``: run the packaged Alembic migrations (upgrade, downgrade, current).

Uses DATABASE_URL when set, otherwise the embedded PostgreSQL in ``PLANT_STATE_DIR/pgdata``
(only ``db upgrade`` creates one). ``database`` and ``database_errors`` serve ``audit`` too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from plant_gateway.cli.common import config_fail, fail, one_line, redact_url, sub_app, usage_fail
from plant_gateway.settings import postgres_dsn

db_app = sub_app("Audit database migrations: upgrade, downgrade, current revision.")

URL_OPTION = typer.Option(
    None, "--database-url", envvar="DATABASE_URL", show_envvar=True, show_default=False,
    help="PostgreSQL URL (default: the embedded PostgreSQL in --state-dir)",
)
STATE_OPTION = typer.Option(
    Path(".plant-gateway"), "--state-dir", envvar="PLANT_STATE_DIR", show_envvar=True,
    help="State directory of the embedded PostgreSQL",
)


@contextmanager
def database(url: str | None, state_dir: Path, create: bool = False) -> Iterator[str]:
    """An admin DSN: ``url``, or the embedded server (started if needed, left as found).

    Without ``create`` a state directory with no embedded server is an error, not a new server.
    """
    if url:
        try:
            dsn = postgres_dsn(url.strip())
        except ValueError as exc:
            config_fail(f"DATABASE_URL: {exc}")
        yield dsn
        return
    pgdata = state_dir / "pgdata"
    if not create and not (pgdata / "PG_VERSION").is_file():
        config_fail(
            f"DATABASE_URL: not set, and PLANT_STATE_DIR {str(state_dir)!r} holds no embedded "
            "PostgreSQL; pass --database-url, or --state-dir of a gateway that ran"
        )
    from plant_gateway.audit.embedded_postgres import EmbeddedPostgres

    server = EmbeddedPostgres(pgdata)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - the wheel's failures have no common type
        fail(f"embedded PostgreSQL in {str(pgdata)!r} did not start: {one_line(str(exc))}")
    try:
        yield server.dsn()
    finally:
        server.stop()


@contextmanager
def database_errors(dsn: str) -> Iterator[None]:
    """Turn a database that does not answer (or refuses) into one line and exit code 1."""
    import asyncpg
    import sqlalchemy.exc
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        usage_fail(f"{exc} (revisions: {', '.join(revisions())}, head, base)")
    except sqlalchemy.exc.DBAPIError as exc:
        fail(f"audit database {where(dsn)}: {first_line(exc.orig or exc)}")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        fail(f"audit database {where(dsn)}: {first_line(exc) or type(exc).__name__}")


def where(dsn: str) -> str:
    """The database for a message: its URL without the password (the embedded one by name)."""
    return "(embedded PostgreSQL)" if "@/" in dsn and "host=" in dsn else redact_url(dsn)


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    from plant_gateway import migrations

    script = ScriptDirectory.from_config(migrations.alembic_config("postgresql://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


@db_app.command()
def upgrade(
    revision: str = typer.Argument("head", help="target revision"),
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Migrate the audit schema up (idempotent: safe to run twice)."""
    from plant_gateway import migrations

    with database(database_url, state_dir, create=True) as dsn, database_errors(dsn):
        migrations.upgrade(dsn, revision)
        typer.echo(f"database at revision {migrations.current(dsn)}")


@db_app.command()
def downgrade(
    revision: str = typer.Argument("base", help="target revision"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask: drop what it drops"),
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Migrate the audit schema down (base drops the audit table and every row in it)."""
    from plant_gateway import migrations

    with database(database_url, state_dir) as dsn, database_errors(dsn):
        now = migrations.current(dsn)
        if now is None:
            typer.echo("database at revision base (no audit schema): nothing to downgrade")
            return
        _confirm(f"Downgrade the audit schema of {where(dsn)} from {now} to {revision}? "
                 "Down to base this drops gateway_audit_logs and every audit row.", yes)
        migrations.downgrade(dsn, revision)
        typer.echo(f"database at revision {migrations.current(dsn) or 'base'}")


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        usage_fail("db downgrade drops audit data: pass --yes to confirm")
    if not typer.confirm(question, default=False):
        fail("db downgrade: not confirmed, nothing changed")


@db_app.command()
def current(database_url: str | None = URL_OPTION, state_dir: Path = STATE_OPTION) -> None:
    """Print the current migration revision."""
    from plant_gateway import migrations

    with database(database_url, state_dir) as dsn, database_errors(dsn):
        revision = migrations.current(dsn)
    typer.echo(revision or "base (no audit schema: 'plant-gateway db upgrade' creates it)")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
