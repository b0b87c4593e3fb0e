"""Chain checkpoints: where each hash chain stood, kept outside the audit table, keyed by a MAC.

A hash chain shows an edit in its middle, but not a shortened tail (delete the last rows) nor a
last row edited with its hash recomputed: nothing follows them. So the writer task records,
every ``AUDIT_CHECKPOINT_INTERVAL_S`` (or ``AUDIT_CHECKPOINT_ROWS`` rows), the last stored
row of each chain -- ``(instance_id, seq, row_hash)`` -- as a *mark* in
``gateway_audit_checkpoints`` (migration 0003; the writer may only INSERT there too), and a
``close`` mark at a graceful shutdown after the last row. ``audit verify`` compares: a mark
beyond the chain's last row is a truncated tail, a mark whose hash differs from the row's is a
re-hashed row, a chain without a ``close`` mark ended without a clean close (crashed, or still
running when its last mark is recent).

Each mark carries an HMAC-SHA256 under a key derived per chain from ``AUDIT_CHAIN_KEY``, so
rewriting the marks to match edited rows needs the secret, which the database never holds.
Without the setting the marks are unsigned: truncation and re-hashing are still caught unless
the marks are rewritten too, and ``audit verify`` says so.

Marks are taken from rows already committed (``committed``: the sink's COPY succeeded), never
from the request path. A ``close`` mark that cannot reach the table goes to the disk spool as a
line starting with ``MARK_PREFIX``, after the chain's spooled rows; the replay writes it after
them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from plant_gateway.audit.schema import GENESIS, load_json

TABLE = "gateway_audit_checkpoints"
MARK_PREFIX = b"!"  # a spool line holding a mark (rows start with "[" or "{")
KINDS = ("checkpoint", "close", "installed")
HEARTBEAT_FACTOR = 6  # an idle chain is marked every 6 intervals: a live instance stays recent
KEY_CONTEXT = b"plant-gateway audit chain key v1\x00"
COLUMNS = ("kind", "instance_id", "seq", "row_hash", "row_ts", "at", "max_unwritten",
           "heartbeat_s", "rows_lost", "mac")
INSERT_SQL = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], "
    "$5::timestamptz[], $6::timestamptz[], $7::integer[], $8::float8[], $9::bigint[], "
    "$10::text[])"
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
_HASH_TAIL = 68  # ',"' + 64 hex digits + '"]': the end of a row's canonical array
_LINE_TAIL = 66  # '\t' + row hash + '\n'


@dataclass(slots=True)
class Mark:
    """One checkpoint or close record (see the module docstring)."""

    kind: str
    instance_id: str
    seq: int
    row_hash: str
    row_ts: datetime | None  # the named row's timestamp: retention drops the mark with it
    at: datetime  # when the gateway wrote it (liveness)
    max_unwritten: int = 0  # rows that may sit in memory only: the loss bound of a SIGKILL
    heartbeat_s: float = 0.0  # a live chain is marked at least this often
    rows_lost: int = 0  # rows the sink counted lost since start (plant_audit_rows_lost_total)
    mac: str | None = None

    def signed_bytes(self) -> bytes:
        """What the MAC covers: every field but the MAC, timestamps in microseconds."""
        return orjson.dumps([
            self.kind, self.instance_id, self.seq, self.row_hash.strip(),
            _micros(self.row_ts), _micros(self.at), self.max_unwritten,
            round(self.heartbeat_s, 3), self.rows_lost,
        ])

    def sign(self, secret: bytes | None) -> Mark:
        self.mac = None if not secret else mac(chain_key(secret, self.instance_id),
                                                 self.signed_bytes())
        return self

    def mac_matches(self, secrets: list[bytes]) -> bool:
        if self.mac is None:
            return False
        data = self.signed_bytes()
        return any(hmac.compare_digest(self.mac.strip(), mac(chain_key(s, self.instance_id), data))
                   for s in secrets)

    def to_line(self) -> bytes:
        """The spool form: ``!`` and a JSON array, one line."""
        values = [getattr(self, name) for name in COLUMNS]
        return MARK_PREFIX + orjson.dumps(values) + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Mark:
        values = orjson.loads(line[len(MARK_PREFIX):])
        doc = dict(zip(COLUMNS, values, strict=True))
        for name in ("row_ts", "at"):
            if doc[name] is not None:
                doc[name] = datetime.fromisoformat(doc[name])
        return cls(**doc)

    def args(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in COLUMNS)

    @classmethod
    def from_record(cls, record: Any) -> Mark:
        doc = {name: record[name] for name in COLUMNS}
        doc["row_hash"] = str(doc["row_hash"]).strip()
        doc["mac"] = None if doc["mac"] is None else str(doc["mac"]).strip()
        doc["max_unwritten"] = doc["max_unwritten"] or 0
        doc["heartbeat_s"] = float(doc["heartbeat_s"] or 0.0)
        doc["rows_lost"] = doc["rows_lost"] or 0
        return cls(**doc)


def chain_key(secret: bytes, instance_id: str) -> bytes:
    """The chain's own key: a leaked one (a dump of one instance's memory is no more than the
    secret itself, but a key printed in a debug session) signs no other chain."""
    return hmac.new(secret, KEY_CONTEXT + instance_id.encode(), hashlib.sha256).digest()


def mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _micros(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    return (ts - EPOCH) // MICROSECOND


async def insert(conn: Any, marks: list[Mark]) -> None:
    """One INSERT for all marks (the writer role's only right on the table)."""
    columns = list(zip(*(m.args() for m in marks), strict=True))
    await conn.execute(INSERT_SQL, *[list(c) for c in columns])


def chain_of(line: bytes) -> bytes:
    """The chain column of a row line as its JSON bytes, found from the end (no parse): the
    array ends ``,"<instance>",<seq>,"<prev_hash>"]``. Inside a JSON string a quote is always
    escaped, so the nearest ``,"`` before the instance's closing quote opens it."""
    end = len(line) - _LINE_TAIL - _HASH_TAIL  # the comma before prev_hash
    comma = line.rfind(b",", 0, end)  # the one before seq
    return line[line.rfind(b',"', 0, comma - 1) + 1:comma]


def seq_of(line: bytes) -> int:
    end = len(line) - _LINE_TAIL - _HASH_TAIL
    return int(line[line.rfind(b",", 0, end) + 1:end])


@dataclass(slots=True)
class ChainState:
    line: bytes  # the chain's last stored row (highest seq)
    seq: int
    marked_seq: int = -1  # the seq of its last mark (-1: never marked)


class Checkpointer:
    """Which rows are stored, and when the chains are due for a mark (the writer asks)."""

    def __init__(self, secret: bytes | None, interval_s: float, rows: int,
                 max_unwritten: int) -> None:
        self.secret = secret
        self.interval_s = interval_s
        self.heartbeat_s = interval_s * HEARTBEAT_FACTOR
        self.rows = rows
        self.max_unwritten = max_unwritten
        self.chains: dict[bytes, ChainState] = {}
        self.own: set[bytes] = set()  # chains this process writes (others: replayed orphans)
        self.since_mark = 0  # rows stored since the last marks
        self.marked_at = 0.0  # monotonic
        self.new_chain = False

    def register(self, instance_id: str) -> None:
        """A chain of this process: marked even when idle (a heartbeat). A chain only replayed
        from an exited process's spool is marked when its rows are stored, never kept alive."""
        self.own.add(orjson.dumps(instance_id))

    def committed(self, lines: list[bytes]) -> None:
        """Rows the table now holds (a COPY committed): each chain's highest seq is kept."""
        chains = self.chains
        tail = _LINE_TAIL + _HASH_TAIL
        for line in lines:  # ``chain_of`` and ``seq_of`` inlined: ~1 µs a row, in the writer
            end = len(line) - tail
            comma = line.rfind(b",", 0, end)
            key = line[line.rfind(b',"', 0, comma - 1) + 1:comma]
            seq = int(line[comma + 1:end])
            state = chains.get(key)
            if state is None:
                chains[key] = ChainState(line, seq)
                self.new_chain = True
            elif seq > state.seq:
                state.line, state.seq = line, seq
        self.since_mark += len(lines)

    def due(self) -> bool:
        """A new chain at once (a crash before its first mark would hide it); rows stored since
        the last marks after the interval or ``rows`` rows; any chain after the heartbeat."""
        if not self.chains:
            return False
        if self.new_chain or self.since_mark >= self.rows:
            return True
        waited = time.monotonic() - self.marked_at
        if self.since_mark > 0 and waited >= self.interval_s:
            return True
        return waited >= self.heartbeat_s and any(key in self.chains for key in self.own)

    def marks(self, rows_lost: int) -> list[Mark]:
        """A checkpoint mark per chain that moved, or is this process's own, and the counters
        reset (a failed write waits for the next interval rather than retrying at every batch)."""
        now = datetime.now(UTC)
        out = [self.mark("checkpoint", state.line, now, rows_lost)
               for key, state in self.chains.items()
               if state.seq != state.marked_seq or key in self.own]
        for state in self.chains.values():
            state.marked_seq = state.seq
        self.since_mark = 0
        self.marked_at = time.monotonic()
        self.new_chain = False
        return out

    def mark(self, kind: str, line: bytes, at: datetime, rows_lost: int) -> Mark:
        content = line[:len(line) - _LINE_TAIL]
        values = load_json(content)
        return Mark(
            kind=kind, instance_id=values[-3], seq=values[-2],
            row_hash=line[len(line) - _LINE_TAIL + 1:-1].decode(),
            row_ts=datetime.fromisoformat(values[3]), at=at,
            max_unwritten=self.max_unwritten, heartbeat_s=self.heartbeat_s,
            rows_lost=rows_lost,
        ).sign(self.secret)

    def close_mark(self, instance_id: str, seq: int, row_hash: str, rows_lost: int) -> Mark:
        """The close mark of a chain whose last row is ``seq``: the stored row's timestamp if
        the table holds it, else now (the row is spooled or lost)."""
        now = datetime.now(UTC)
        state = self.chains.get(orjson.dumps(instance_id))
        if state is not None and state.seq == seq:
            return self.mark("close", state.line, now, rows_lost)
        return Mark("close", instance_id, seq, row_hash or GENESIS, now, now,
                    self.max_unwritten, self.heartbeat_s, rows_lost).sign(self.secret)

    def stored_through(self, instance_id: str) -> int:
        state = self.chains.get(orjson.dumps(instance_id))
        return state.seq if state is not None else 0
