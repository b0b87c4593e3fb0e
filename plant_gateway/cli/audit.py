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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import typer

from plant_gateway.audit import checkpoints as cp
from plant_gateway.audit.schema import (
    GENESIS,
    MAINTAINER_ROLE,
    NAMES,
    READER_ROLE,
    TABLE,
    from_db,
    row_hash,
)
from plant_gateway.audit.sink import AHEAD_DAYS, MAINTAIN_SQL
from plant_gateway.cli.common import fail, sub_app, usage_fail
from plant_gateway.cli.db import STATE_OPTION, URL_OPTION, database, database_errors, where
from plant_gateway.migrations.adopt import LEGACY_INSTANCE

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
# kinds that mean the log was changed (exit 1); the others describe how a chain ended
TAMPER = frozenset({"edited", "forged", "deleted", "truncated", "rehashed", "mac-invalid",
                    "unsigned"})
LIVE_SLACK_S = 1.0  # clock skew between a gateway and the database


@dataclass
class Finding:
    kind: str  # TAMPER, or closed | unclosed | live | unchecked (a chain's state)
    instance_id: str
    seq: int | None
    row_id: str | None
    detail: str

    @property
    def tamper(self) -> bool:
        return self.kind in TAMPER

    def __str__(self) -> str:
        where = f"{self.instance_id} seq {self.seq}" if self.seq is not None else self.instance_id
        rid = f" id {self.row_id}" if self.row_id else ""
        label = "NO CHECKPOINTS" if self.kind == "unchecked" else self.kind.upper()
        return f"{label}: {where}{rid}: {self.detail}"


@dataclass
class Report:
    """What ``audit verify`` found: ``findings`` are changes to the log (exit 1), ``chains``
    one state line per chain, ``notes`` what could not be checked and why."""

    checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    chains: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Marks:
    """The checkpoint table's content: marks by chain, and when revision 0003 ran."""

    by_chain: dict[str, list[cp.Mark]] = field(default_factory=dict)
    installed: datetime | None = None
    present: bool = False


async def verify(conn: asyncpg.Connection, since: datetime | None = None) -> tuple[int, list]:
    """Walk every chain; return (rows checked, changes found)."""
    report = await audit_report(conn, since)
    return report.checked, report.findings


async def audit_report(
    conn: asyncpg.Connection, since: datetime | None = None, keys: list[bytes] | None = None
) -> Report:
    """Walk every chain and compare its end with its checkpoints (``audit/checkpoints``)."""
    rows = await _chain_rows(conn, since)
    anchored = since is not None
    report = Report(checked=len(rows))
    chains: dict[str, list[dict[str, Any]]] = {}
    for record in rows:
        row = from_db(record)
        chains.setdefault(row["instance_id"], []).append(row)
    marks = await _marks(conn)
    now = await conn.fetchval("SELECT now()")
    for inst, chain in chains.items():
        found = _check_chain(chain, anchored=anchored)
        state, at_end = _check_end(chain, marks.by_chain.get(inst, []), marks, keys, now,
                                   anchored)
        named = {f.seq for f in found}
        report.chains.append(state)
        report.findings += found + [f for f in at_end if f.kind != "forged" or f.seq not in named]
    if not anchored:
        report.findings += await _vanished(conn, marks, set(chains))
    report.notes = _notes(marks, set(chains), keys)
    return report


async def _chain_rows(conn: asyncpg.Connection, since: datetime | None) -> list[Any]:
    cols = ", ".join(f'"{n}"' for n in NAMES)
    if since is None:
        return list(await conn.fetch(f"SELECT {cols} FROM {TABLE} ORDER BY instance_id, seq, id"))
    return list(await conn.fetch(
        f'WITH starts AS (SELECT instance_id, min(seq) AS s FROM {TABLE} '
        f'WHERE "timestamp" >= $1 GROUP BY instance_id) '
        f"SELECT {', '.join('t.' + c for c in cols.split(', '))} FROM {TABLE} t "
        f"JOIN starts USING (instance_id) WHERE t.seq >= starts.s "
        f"ORDER BY t.instance_id, t.seq, t.id",
        since,
    ))


async def _marks(conn: asyncpg.Connection) -> Marks:
    out = Marks()
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", cp.TABLE):
        return out
    out.present = True
    records = await conn.fetch(
        f"SELECT {', '.join(cp.COLUMNS)} FROM {cp.TABLE} ORDER BY instance_id, seq, at")
    for record in records:
        if record["kind"] == "installed":
            out.installed = min(out.installed or record["at"], record["at"])
            continue
        mark = cp.Mark.from_record(record)
        out.by_chain.setdefault(mark.instance_id, []).append(mark)
    return out


def _check_end(
    chain: list[dict[str, Any]], marks: list[cp.Mark], table: Marks, keys: list[bytes] | None,
    now: datetime, anchored: bool,
) -> tuple[Finding, list[Finding]]:
    """The chain's state (closed, live, unclosed, unchecked) and what its checkpoints show
    changed: a tail cut short, a re-hashed row, a checkpoint failing its MAC."""
    inst = chain[0]["instance_id"]
    by_seq: dict[int, dict[str, Any]] = {}
    for row in chain:
        by_seq.setdefault(row["seq"], row)
    first, last = chain[0]["seq"], max(by_seq)
    if not marks:
        return _unchecked(inst, chain[0], table, anchored), []
    found: list[Finding] = []
    if keys:
        signed = [m for m in marks if m.mac]
        bad = [m for m in signed if not m.mac_matches(keys)]
        if bad:
            found.append(Finding("mac-invalid", inst, bad[-1].seq, None,
                                 f"{len(bad)} checkpoint(s) fail their MAC (written or changed "
                                 "without the key, or made with another AUDIT_CHAIN_KEY)"))
        if signed and len(signed) < len(marks):
            found.append(Finding("unsigned", inst, None, None,
                                 f"{len(marks) - len(signed)} checkpoint(s) without a MAC beside "
                                 "signed ones (a MAC removed to rewrite them)"))
        rejected = {id(m) for m in bad}
        marks = [m for m in marks if id(m) not in rejected]
        if not marks:
            return Finding("unchecked", inst, None, None, "no checkpoint passes its MAC: the "
                           "chain's end cannot be checked"), found
    beyond = [m for m in marks if m.seq > last
              and not (m.kind == "close" and m.seq - last <= m.rows_lost)]
    if beyond:
        top = max(beyond, key=lambda m: (m.seq, m.kind == "close"))
        found.append(Finding("truncated", inst, last + 1, None,
                             f"the {top.kind} mark of {_when(top.at)} names seq {top.seq} but "
                             f"the chain ends at seq {last}: rows {last + 1}..{top.seq} were "
                             "deleted from its tail"))
    seen: set[int] = set()
    for mark in marks:
        at_seq = by_seq.get(mark.seq)
        if at_seq is None or mark.seq in seen or mark.seq < first:
            continue
        row = at_seq
        seen.add(mark.seq)
        if row["row_hash"].strip() != mark.row_hash:
            found.append(Finding("rehashed", inst, mark.seq, str(row["id"]),
                                 f"row hash differs from the {mark.kind} mark of "
                                 f"{_when(mark.at)}: the row was changed and its hash "
                                 "recomputed, or replaced"))
    return _state(inst, by_seq[last], marks, now, found), found


def _state(inst: str, last_row: dict[str, Any], marks: list[cp.Mark], now: datetime,
           found: list[Finding]) -> Finding:
    last = last_row["seq"]
    closes = [m for m in marks if m.kind == "close"]
    if closes:
        close = max(closes, key=lambda m: m.seq)
        if close.seq < last:
            found.append(Finding("forged", inst, close.seq + 1, None,
                                 f"rows {close.seq + 1}..{last} follow the chain's clean close "
                                 f"at seq {close.seq}"))
        lost = close.seq - last if last < close.seq <= last + close.rows_lost else 0
        extra = f"; its last {lost} row(s) were counted lost by the gateway" if lost else ""
        return Finding("closed", inst, None, None,
                       f"closed cleanly at seq {close.seq} ({_when(close.at)}){extra}")
    newest = max(marks, key=lambda m: m.at)
    checkpoint = max(marks, key=lambda m: m.seq)
    age = (now - newest.at).total_seconds()
    uncovered = max(0, last - checkpoint.seq)
    if age <= 2 * newest.heartbeat_s + LIVE_SLACK_S:
        return Finding("live", inst, None, None,
                       f"no clean close yet: still running (last checkpoint {age:.0f} s ago); "
                       f"last seq {last}")
    return Finding("unclosed", inst, None, None,
                   f"ended without a clean close (crashed or killed): last seq {last} "
                   f"({_when(last_row['timestamp'])}); last checkpoint at seq {checkpoint.seq} "
                   f"({_when(newest.at)}), {uncovered} row(s) after it not covered; at most "
                   f"{newest.max_unwritten} more row(s) lost (rows held only in memory)")


def _unchecked(inst: str, first_row: dict[str, Any], table: Marks, anchored: bool) -> Finding:
    """Why a chain has no checkpoints; never a change: adopted, older, or retention."""
    if inst == LEGACY_INSTANCE:
        why = "adopted from the deployed gateway's table by migration 0001"
    elif not table.present:
        why = "the database has no checkpoint table (run `plant-gateway db upgrade`)"
    elif table.installed is not None and first_row["timestamp"] < table.installed:
        why = f"written before checkpoints were installed ({_when(table.installed)})"
    elif first_row["seq"] > 1 and not anchored:
        why = "dropped by retention with the chain's first rows"
    else:
        why = "written by a gateway without checkpoints, or they were removed"
    return Finding("unchecked", inst, None, None,
                   f"no checkpoints ({why}): a truncated or re-hashed tail cannot be detected")


async def _vanished(conn: asyncpg.Connection, marks: Marks, walked: set[str]) -> list[Finding]:
    """Chains with checkpoints but no row left: deleted, unless retention dropped them (their
    rows are older than every row the table still holds)."""
    gone = {inst: ms for inst, ms in marks.by_chain.items() if inst not in walked}
    if not gone:
        return []
    oldest = await conn.fetchval(f'SELECT min("timestamp") FROM {TABLE}')
    out = []
    for inst, ms in sorted(gone.items()):
        top = max(ms, key=lambda m: m.seq)
        if top.seq == 0 or top.row_ts is None:
            continue
        if oldest is None or top.row_ts >= oldest - timedelta(seconds=1):
            out.append(Finding("truncated", inst, 1, None,
                               f"the {top.kind} mark of {_when(top.at)} names seq {top.seq} "
                               "but the table holds no row of this chain: all deleted"))
    return out


def _notes(marks: Marks, walked: set[str], keys: list[bytes] | None) -> list[str]:
    if not marks.present:
        return ["no checkpoint table (database before revision 0003): truncated tails and "
                "unclean closes cannot be detected; run `plant-gateway db upgrade`"]
    ours = [ms for inst, ms in marks.by_chain.items() if inst in walked]
    unsigned = sum(1 for ms in ours if not any(m.mac for m in ms))
    notes = []
    if unsigned:
        notes.append(f"{unsigned} chain(s) have unsigned checkpoints (the gateway ran without "
                     "AUDIT_CHAIN_KEY): a tail edit that also rewrites the checkpoint table "
                     "cannot be detected")
    if not keys and len(ours) > unsigned:
        notes.append("checkpoint MACs not checked: give the gateway's AUDIT_CHAIN_KEY "
                     "(--chain-key or the environment); until then a tail edit that also "
                     "rewrites the checkpoint table cannot be detected")
    return notes


def _when(ts: datetime | None) -> str:
    return "?" if ts is None else ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    chain_key: list[str] | None = typer.Option(
        None, "--chain-key", envvar="AUDIT_CHAIN_KEY", show_envvar=True,
        help="the gateways' AUDIT_CHAIN_KEY: check the checkpoints' MACs (repeat for an old "
             "key after a rotation)"),
    database_url: str | None = URL_OPTION,
    state_dir: Path = STATE_OPTION,
) -> None:
    """Walk every instance's hash chain: name each edited, deleted or forged row and each gap,
    and compare each chain's end with its checkpoints (closed cleanly, still running, ended
    without a clean close, truncated or re-hashed tail). Exit 1 when the log was changed."""
    keys = [k.strip().encode() for k in chain_key or () if k.strip()]

    async def run(dsn: str) -> Report:
        conn = await reader(dsn, admin=True)
        try:
            return await audit_report(conn, since, keys)
        finally:
            await conn.close()

    report = _read(database_url, state_dir, run)
    for line in report.chains + report.findings:
        typer.echo(str(line))
    for note in report.notes:
        typer.echo(f"NOTE: {note}")
    typer.echo(f"{report.checked} rows checked, {len(report.chains)} chain(s), "
               f"{len(report.findings)} problem(s)")
    raise typer.Exit(1 if report.findings else 0)


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
