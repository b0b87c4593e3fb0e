# ruff: noqa: B008  (typer declares options as argument defaults)
"""``plant-gateway audit``: query and tail the audit log under an RLS identity, verify hash chains,
run retention.

Reads go through the reader role with ``app.*`` settings chosen by ``--as-user``,
``--as-customer-admin`` or ``--as-admin`` (one is required); RLS decides what each identity
sees. A database without the audit schema, or one that does not answer, is one line and exit
1. ``retention`` runs as the URL's own login, which must be the owner or a member of
``plant_audit_maintainer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import typer

from plant_gateway.backends.audit_postgres import AHEAD_DAYS, MAINTAIN_SQL
from plant_gateway.backends.audit_schema import (
    GENESIS,
    MAINTAINER_ROLE,
    NAMES,
    READER_ROLE,
    TABLE,
    from_db,
    row_hash,
)
from plant_gateway.cli.common import fail, sub_app, usage_fail
from plant_gateway.cli.db import STATE_OPTION, URL_OPTION, database, database_errors, where

audit_app = sub_app("Query, tail and verify the audit log.")
T = TypeVar("T")

SUMMARY = ("timestamp", "correlation_id", "http_method", "endpoint", "status_code",
           "user_id", "customer_id", "error_type", "total_latency_ms")


# --- reader connection ------------------------------------------------------------------------
class NoAuditSchema(Exception):
    """The database has no audit table or reader role: ``plant-gateway db upgrade`` is missing."""


async def reader(
    dsn: str, user: str | None = None, customer_admin: str | None = None, admin: bool = False
) -> asyncpg.Connection:
    """A connection as the reader role with the RLS identity set (nothing set: sees nothing)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await _check_schema(conn)
    except BaseException:
        await conn.close()
        raise
    if await conn.fetchval("SELECT current_user") != READER_ROLE:
        await conn.execute(f"SET ROLE {READER_ROLE}")
    settings = {
        "app.is_admin": "true" if admin else "",
        "app.current_user_id": user or "",
        "app.current_customer_id": customer_admin or "",
        "app.is_customer_admin": "true" if customer_admin else "",
    }
    for name, value in settings.items():
        await conn.execute("SELECT set_config($1, $2, false)", name, value)
    return conn


async def _check_schema(conn: asyncpg.Connection) -> None:
    ready = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $2)",
        TABLE, READER_ROLE,
    )
    if not ready:
        raise NoAuditSchema(f"no audit schema ({TABLE}, role {READER_ROLE})")


def _filters(
    correlation_id: str | None = None, user: str | None = None, customer: str | None = None,
    status_min: int | None = None, since: datetime | None = None, until: datetime | None = None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []

    def add(sql: str, value: Any) -> None:
        args.append(value)
        clauses.append(sql.format(f"${len(args)}"))

    if correlation_id:
        add("correlation_id = {}::uuid", correlation_id)
    if user:
        add("(user_id::text = {0} OR user_ref = {0})", user)
    if customer:
        add("customer_id = {}", customer)
    if status_min is not None:
        add("status_code >= {}", status_min)
    if since:
        add('"timestamp" >= {}', since)
    if until:
        add('"timestamp" < {}', until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


async def query_rows(conn: asyncpg.Connection, limit: int = 50, **filters: Any) -> list[dict]:
    where, args = _filters(**filters)
    rows = await conn.fetch(
        f'SELECT * FROM {TABLE}{where} ORDER BY "timestamp" DESC LIMIT {int(limit)}', *args
    )
    return [dict(r) for r in rows]


# --- verification ------------------------------------------------------------------------------
@dataclass
class Finding:
    kind: str  # edited | forged | deleted | gap | duplicate
    instance_id: str
    seq: int | None
    row_id: str | None
    detail: str

    def __str__(self) -> str:
        where = f"{self.instance_id} seq {self.seq}" if self.seq is not None else self.instance_id
        rid = f" id {self.row_id}" if self.row_id else ""
        return f"{self.kind.upper()}: {where}{rid}: {self.detail}"


async def verify(conn: asyncpg.Connection, since: datetime | None = None) -> tuple[int, list]:
    """Walk every chain; return (rows checked, findings)."""
    cols = ", ".join(f'"{n}"' for n in NAMES)
    if since is None:
        rows = await conn.fetch(f"SELECT {cols} FROM {TABLE} ORDER BY instance_id, seq, id")
    else:
        rows = await conn.fetch(
            f'WITH starts AS (SELECT instance_id, min(seq) AS s FROM {TABLE} '
            f'WHERE "timestamp" >= $1 GROUP BY instance_id) '
            f"SELECT {', '.join('t.' + c for c in cols.split(', '))} FROM {TABLE} t "
            f"JOIN starts USING (instance_id) WHERE t.seq >= starts.s "
            f"ORDER BY t.instance_id, t.seq, t.id",
            since,
        )
    findings: list[Finding] = []
    chain: list[dict[str, Any]] = []
    for record in rows:
        row = from_db(record)
        if chain and chain[0]["instance_id"] != row["instance_id"]:
            findings += _check_chain(chain, anchored=since is not None)
            chain = []
        chain.append(row)
    if chain:
        findings += _check_chain(chain, anchored=since is not None)
    return len(rows), findings


def _check_chain(chain: list[dict[str, Any]], anchored: bool) -> list[Finding]:
    inst = chain[0]["instance_id"]
    out: list[Finding] = []
    valid = [row_hash(r) == r["row_hash"] for r in chain]
    linked_to: dict[str, int] = {}
    for i, r in enumerate(chain):
        linked_to.setdefault(r["prev_hash"], i)
    by_seq: dict[int, list[int]] = {}
    for i, r in enumerate(chain):
        by_seq.setdefault(r["seq"], []).append(i)
    for i, r in enumerate(chain):
        if not valid[i]:
            # content changed but the chain still points at its stored hash: edited in place
            successor = linked_to.get(r["row_hash"], i)
            edited = successor != i or (i == len(chain) - 1 and _links(chain, i))
            kind = "edited" if edited else "forged"
            out.append(Finding(kind, inst, r["seq"], str(r["id"]),
                               "row content does not match its hash"))
        elif len(by_seq[r["seq"]]) > 1 and linked_to.get(r["row_hash"], i) == i \
                and not _links(chain, i):
            out.append(Finding("forged", inst, r["seq"], str(r["id"]),
                               "duplicate sequence number outside the chain"))
    seqs = sorted(by_seq)
    first = seqs[0]
    if first != 1 and not anchored:
        out.append(Finding("deleted", inst, None, None,
                           f"seq 1..{first - 1} missing before the first row (deleted, or "
                           "dropped by retention)"))
    elif first == 1 and any(chain[i]["prev_hash"] != GENESIS for i in by_seq[1]):
        out.append(Finding("forged", inst, 1, str(chain[by_seq[1][0]]["id"]),
                           "first row does not start from the genesis hash"))
    for a, b in zip(seqs, seqs[1:], strict=False):
        if b != a + 1:
            out.append(Finding("deleted", inst, a + 1, None,
                               f"gap: seq {a + 1}..{b - 1} missing (between rows "
                               f"{chain[by_seq[a][0]]['id']} and {chain[by_seq[b][0]]['id']})"))
            continue
        previous = {chain[k]["row_hash"] for k in by_seq[a]}
        linked = any(chain[j]["prev_hash"] in previous for j in by_seq[b])
        all_valid = all(valid[j] for j in by_seq[b] + by_seq[a])
        if not linked and all_valid:
            out.append(Finding("forged", inst, b, str(chain[by_seq[b][0]]["id"]),
                               "does not link to the previous row"))
    return out


def _links(chain: list[dict[str, Any]], i: int) -> bool:
    return i > 0 and chain[i]["prev_hash"] == chain[i - 1]["row_hash"]


# --- commands ----------------------------------------------------------------------------------
def _print(rows: list[dict], as_json: bool, header: bool = True) -> None:
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, default=str))
        return
    if header:
        typer.echo("  ".join(SUMMARY))
    for row in rows:
        typer.echo("  ".join("-" if row.get(k) is None else str(row.get(k)) for k in SUMMARY))


def _identity(as_user: str | None, as_customer_admin: str | None, as_admin: bool) -> None:
    if not (as_user or as_customer_admin or as_admin):
        usage_fail("say whom to read as: --as-admin, --as-user ID or --as-customer-admin ID "
                   "(row-level security shows no rows to no one)")


def _read(
    database_url: str | None, state_dir: Path, work: Callable[[str], Coroutine[Any, Any, T]]
) -> T:
    """Run ``work(dsn)`` on the audit database; its failures as one line (exit 1)."""
    with database(database_url, state_dir) as dsn, database_errors(dsn):
        try:
            return asyncio.run(work(dsn))
        except NoAuditSchema as exc:
            fail(f"audit database {where(dsn)}: {exc}; run 'plant-gateway db upgrade' first")


AS_USER = typer.Option(None, "--as-user", metavar="ID", help="RLS: see as this user")
AS_CUSTOMER_ADMIN = typer.Option(None, "--as-customer-admin", metavar="ID",
                                 help="RLS: customer admin of this customer")
AS_ADMIN = typer.Option(False, "--as-admin", help="RLS: platform admin (sees every row)")
AS_JSON = typer.Option(False, "--json", help="one JSON document per row")


@audit_app.command()
def query(
    correlation_id: str | None = typer.Option(None, "--correlation-id"),
    user: str | None = typer.Option(None, "--user", help="user id"),
    customer: str | None = typer.Option(None, "--customer", help="customer id"),
    status_min: int | None = typer.Option(None, "--status-min", help="status >= this"),
    since: datetime | None = typer.Option(None, "--since"),
    until: datetime | None = typer.Option(None, "--until"),
    limit: int = typer.Option(50, "--limit", min=1),
    as_user: str | None = AS_USER,
    as_customer_admin: str | None = AS_CUSTOMER_ADMIN,
    as_admin: bool = AS_ADMIN,
    as_json: bool = AS_JSON,
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Rows matching the filters, newest first, as the chosen RLS identity sees them."""
    _identity(as_user, as_customer_admin, as_admin)

    async def run(dsn: str) -> list[dict]:
        conn = await reader(dsn, as_user, as_customer_admin, as_admin)
        try:
            return await query_rows(conn, limit, correlation_id=correlation_id, user=user,
                                    customer=customer, status_min=status_min, since=since,
                                    until=until)
        finally:
            await conn.close()

    rows = _read(database_url, state_dir, run)
    _print(rows, as_json)
    if not as_json and not rows:
        typer.echo("(no rows)", err=True)


@audit_app.command()
def tail(
    interval: float = typer.Option(1.0, "--interval", min=0.05, help="seconds between polls"),
    as_user: str | None = AS_USER,
    as_customer_admin: str | None = AS_CUSTOMER_ADMIN,
    as_admin: bool = AS_ADMIN,
    as_json: bool = AS_JSON,
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Follow new rows (Ctrl-C to stop)."""
    _identity(as_user, as_customer_admin, as_admin)

    async def run(dsn: str) -> None:
        conn = await reader(dsn, as_user, as_customer_admin, as_admin)
        last = await conn.fetchval(f'SELECT coalesce(max("timestamp"), now()) FROM {TABLE}')
        _print([], as_json)
        try:
            while True:
                rows = await conn.fetch(
                    f'SELECT * FROM {TABLE} WHERE "timestamp" > $1 ORDER BY "timestamp"', last
                )
                if rows:
                    last = rows[-1]["timestamp"]
                    _print([dict(r) for r in rows], as_json, header=False)
                await asyncio.sleep(interval)
        finally:
            await conn.close()

    with contextlib.suppress(KeyboardInterrupt):
        _read(database_url, state_dir, run)


@audit_app.command("verify")
def verify_cmd(
    since: datetime | None = typer.Option(None, "--since", help="only chains' rows from here"),
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Walk every instance's hash chain; name each edited, deleted or forged row and each gap."""

    async def run(dsn: str) -> tuple[int, list]:
        conn = await reader(dsn, admin=True)
        try:
            return await verify(conn, since)
        finally:
            await conn.close()

    checked, findings = _read(database_url, state_dir, run)
    for finding in findings:
        typer.echo(str(finding))
    typer.echo(f"{checked} rows checked, {len(findings)} problem(s)")
    raise typer.Exit(1 if findings else 0)


@audit_app.command()
def retention(
    days: int = typer.Option(90, "--days", envvar="AUDIT_RETENTION_DAYS",
                             help="keep this many days (at least 1)"),
    ahead: int = typer.Option(AHEAD_DAYS, "--ahead", help="daily partitions to create ahead"),
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Create partitions ahead and drop those older than --days (the gateway's hourly job)."""

    async def run(dsn: str) -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval(MAINTAIN_SQL, days, ahead))
        finally:
            await conn.close()

    with database(database_url, state_dir) as dsn:
        try:
            dropped = asyncio.run(run(dsn))
        except asyncpg.InvalidParameterValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except asyncpg.InsufficientPrivilegeError:
            typer.echo("error: permission denied: run it as the audit table's owner or a "
                       f"member of {MAINTAINER_ROLE}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"{dropped} partition(s) dropped; keeping {days} day(s), {ahead} ahead")


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
