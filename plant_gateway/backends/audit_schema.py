"""The audit row: column list, row form, database record and hash chain.

A row is a dict in database-ready form: uuids as lowercase strings, ``timestamp`` a datetime,
every jsonb value already serialised once (canonical JSON text, sorted keys, see ``dump_json``).
The writer passes it to COPY as is, the hash covers the very same text, and ``audit verify``
re-derives that text from the stored jsonb (``from_db``), so both sides hash the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import orjson

GENESIS = "0" * 64
TABLE = "gateway_audit_logs"
WRITER_ROLE = "plant_audit_writer"
READER_ROLE = "plant_audit_reader"

# (column, PostgreSQL type) in table order; row_hash is last and not part of the hash.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "uuid"),
    ("correlation_id", "uuid"),
    ("causation_id", "uuid"),
    ("timestamp", "timestamptz"),
    ("gateway_type", "varchar(10)"),
    ("request_id", "uuid"),
    ("http_method", "varchar(16)"),
    ("endpoint", "text"),
    ("query_params", "jsonb"),
    ("request_headers", "jsonb"),
    ("request_body", "jsonb"),
    ("user_id", "uuid"),
    ("customer_id", "text"),
    ("email", "text"),
    ("roles", "text[]"),
    ("trial_mode", "boolean"),
    ("opa_policies_evaluated", "text[]"),
    ("opa_decisions", "jsonb"),
    ("opa_latency_ms", "double precision"),
    ("status_code", "integer"),
    ("response_headers", "jsonb"),
    ("response_body", "jsonb"),
    ("error_type", "text"),
    ("error_message", "text"),
    ("total_latency_ms", "double precision"),
    ("plant_latency_ms", "double precision"),
    ("action", "text"),
    ("resource", "text"),
    ("resource_id", "text"),
    ("user_ref", "text"),
    ("instance_id", "text"),
    ("seq", "bigint"),
    ("prev_hash", "char(64)"),
    ("row_hash", "char(64)"),
)
NAMES = tuple(name for name, _ in COLUMNS)
HASHED = NAMES[:-1]
JSONB = frozenset(name for name, kind in COLUMNS if kind == "jsonb")
UUIDS = frozenset(name for name, kind in COLUMNS if kind == "uuid")
FLOATS = frozenset(name for name, kind in COLUMNS if kind == "double precision")
ARRAYS = frozenset(name for name, kind in COLUMNS if kind == "text[]")
_ARRAY_AT = tuple(i for i, name in enumerate(NAMES) if name in ARRAYS)
_JSONB_AT = tuple(i for i, name in enumerate(HASHED) if name in JSONB)
_TS_AT = HASHED.index("timestamp")
_GET_HASHED = itemgetter(*HASHED)
_GET_ALL = itemgetter(*NAMES)
# Output that a jsonb round trip would not reproduce byte for byte: exponent floats (PostgreSQL
# prints numerics in plain notation), negative zero, NUL (jsonb refuses it). Matches inside
# strings are false alarms that only cost the slow path.
_RISKY = re.compile(rb"(?:^|[:\[,])-?\d+(?:\.\d+)?e|(?:^|[:\[,])-0\.0(?!\d)|\\u0000")
_LONG_INT = re.compile(r"\d{16}")


def _norm(value: Any) -> Any:
    """Normalise a JSON value so it survives a jsonb round trip unchanged (the slow path)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean(str(k)): _norm(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    if value is None or isinstance(value, bool | int):
        return value
    return _clean(str(value))


def _clean(text: str) -> str:
    text = text.replace("\x00", "\ufffd")
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates
        text = text.encode("utf-8", "replace").decode()
    return text


def dump_json(value: Any) -> str | None:
    """The canonical jsonb text of a value (sorted keys, compact); None stays None.

    Fast path: one orjson call. Values a jsonb round trip would change go through ``_norm``.
    """
    if value is None:
        return None
    try:
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        if _RISKY.search(out) is None:
            return out.decode()
    except (TypeError, orjson.JSONEncodeError):
        pass
    value = _norm(value)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:  # integers beyond 64 bits
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def load_json(text: str | bytes) -> Any:
    """Parse JSON keeping long integers exact (orjson turns them into floats)."""
    probe = text if isinstance(text, str) else text.decode("utf-8", "replace")
    if _LONG_INT.search(probe):
        return json.loads(text)
    return orjson.loads(text)


def iso(ts: datetime | str) -> str:
    value = ts if isinstance(ts, datetime) else datetime.fromisoformat(ts)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _hashed_ts(ts: Any) -> Any:
    """The timestamp as ``iso`` writes it. A UTC datetime with microseconds is handed to orjson
    as is: it prints exactly that text (``...:SS.ffffff+00:00``) without a Python call."""
    if type(ts) is datetime and ts.tzinfo is UTC and ts.microsecond:
        return ts
    return iso(ts)


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes the row hash covers: every column but row_hash, in table order.

    jsonb values enter as their (already canonical) text, embedded verbatim.
    """
    try:
        values = list(_GET_HASHED(row))
    except KeyError:
        values = [row.get(name) for name in HASHED]
    values[_TS_AT] = _hashed_ts(values[_TS_AT])
    for i in _JSONB_AT:
        if values[i] is not None:
            values[i] = orjson.Fragment(values[i])
    return orjson.dumps(values)


def row_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


def to_record(row: dict[str, Any]) -> list[Any]:
    """Row -> record for COPY: text[] values as PostgreSQL array text (the staging table has
    text columns there, the INSERT casts them: half the client encoding cost of binary arrays);
    everything else as is, asyncpg validates the types."""
    try:
        record = list(_GET_ALL(row))
    except KeyError:
        record = [row.get(name) for name in NAMES]
    for i in _ARRAY_AT:
        if record[i] is not None:
            record[i] = array_literal(record[i])
    return record


def array_literal(value: Any) -> Any:
    """A list of strings as a PostgreSQL array literal (every element quoted). Anything else
    is returned unchanged, so asyncpg refuses it and the row is quarantined, as before."""
    if type(value) is not list and type(value) is not tuple:
        return value
    try:
        body = '","'.join(value)
    except TypeError:  # NULL or non-text elements
        return _slow_array_literal(value)
    if '"' in body or "\\" in body:
        return _slow_array_literal(value)
    return '{"' + body + '"}' if value else "{}"


def _slow_array_literal(value: list[Any] | tuple[Any, ...]) -> Any:
    parts = []
    for item in value:
        if item is None:
            parts.append("NULL")
        elif type(item) is str:
            parts.append('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            return value
    return "{" + ",".join(parts) + "}"


def to_wire(row: dict[str, Any]) -> bytes:
    """One spool line (JSON, the timestamp as ISO 8601)."""
    return orjson.dumps(row)


def from_wire(line: bytes) -> dict[str, Any]:
    """A spool line back to a row; older spools with jsonb as objects are serialised here."""
    row: dict[str, Any] = orjson.loads(line)
    ts = row.get("timestamp")
    if isinstance(ts, str):
        row["timestamp"] = datetime.fromisoformat(ts)
    for name in JSONB:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            row[name] = dump_json(value)
    return row


def from_db(record: Any) -> dict[str, Any]:
    """A fetched record (jsonb as text) in row form, so ``row_hash`` gives the stored hash."""
    row = {name: record[name] for name in NAMES}
    for name in UUIDS:
        if row[name] is not None:
            row[name] = str(row[name])
    for name in JSONB:
        if row[name] is not None:
            row[name] = dump_json(load_json(row[name]))
    for name in FLOATS:
        if row[name] is not None:
            row[name] = float(row[name])
    if row["prev_hash"] is not None:
        row["prev_hash"] = row["prev_hash"].rstrip(" ")
    return row
