"""The audit row: column list, row forms, database record and hash chain.

A row travels as one *line*: its canonical bytes (a JSON array of every column but row_hash,
in table order, see ``canonical``), a tab, the row hash, a newline. The recorder builds that
array once, hashes it and queues the line; the writer COPYs lines as they are (CSV with a quote
character JSON never contains) into a staging table and PostgreSQL splits the array into the
columns (``INSERT_COLUMNS_SQL``); the spool stores the same lines. So the gateway process
serialises each row exactly once, and the bytes hashed are the bytes written.

The dict form (``row``) is for tools, tests and ``audit verify``: uuids as lowercase strings,
``timestamp`` a datetime, every jsonb value as its canonical text (sorted keys, see
``dump_json``); ``canonical(row)`` gives the same bytes as the line, and ``from_db`` re-derives
them from the stored columns.
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
# may run gateway_audit_maintain (retention); granted to a login by the operator (migration 0002)
MAINTAINER_ROLE = "plant_audit_maintainer"

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
_JSONB_AT = tuple(i for i, name in enumerate(HASHED) if name in JSONB)
_TS_AT = HASHED.index("timestamp")
_GET_HASHED = itemgetter(*HASHED)
# Output that a jsonb round trip would not reproduce byte for byte: exponent floats (PostgreSQL
# prints numerics in plain notation), negative zero, NUL (jsonb refuses it). Matches inside
# strings are false alarms that only cost the slow path.
_RISKY = re.compile(rb"(?:^|[:\[,])-?\d+(?:\.\d+)?e|(?:^|[:\[,])-0\.0(?!\d)|\\u0000")
_LONG_INT = re.compile(r"\d{16}")
# every ``_RISKY`` match holds a digit then "e", "-0.0" or "\u0000": three C-level scans rule
# the regex (ten times their cost) out for almost every value
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_SIXTEEN_ZEROS = b"0" * 16


def _risky(out: bytes) -> bool:
    if b"0e" not in out.translate(_DIGITS_AS_ZERO) and b"-0.0" not in out \
            and b"\\u0000" not in out:
        return False
    return _RISKY.search(out) is not None


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
        if not _risky(out):
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
    if isinstance(text, bytes) and text.isascii():  # digits are ASCII digits: no decoding
        long_int = _SIXTEEN_ZEROS in text.translate(_DIGITS_AS_ZERO)
    else:
        probe = text if isinstance(text, str) else text.decode("utf-8", "replace")
        long_int = _LONG_INT.search(probe) is not None
    if long_int:
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


def _server_value(index: int, kind: str) -> str:
    """SQL taking column ``index`` out of the staged array ``doc`` (jsonb). Text columns are
    not cast (the INSERT's assignment cast refuses over-long varchar values, a cast would
    truncate); text[] goes through jsonb_array_elements_text (JSON escapes are not array
    literal escapes)."""
    if kind == "jsonb":
        return f"nullif(doc->{index}, 'null')"
    if kind == "text[]":
        return (f"CASE WHEN jsonb_typeof(doc->{index}) = 'array' THEN "
                f"ARRAY(SELECT jsonb_array_elements_text(doc->{index})) END")
    if kind in ("uuid", "timestamptz", "boolean", "integer", "bigint", "double precision"):
        return f"(doc->>{index})::{kind}"
    return f"doc->>{index}"


# The staging table's SELECT list, in NAMES order (row_hash is the second staged column).
INSERT_COLUMNS_SQL = ", ".join(
    [_server_value(i, kind) for i, (_, kind) in enumerate(COLUMNS[:-1])] + ["row_hash"]
)
TAB, NEWLINE = b"\t", b"\n"


def to_line(row: dict[str, Any]) -> bytes:
    """A dict row (with its row_hash) as a line, the form the sink queues, COPYs and spools."""
    return b"".join((canonical(row), TAB, str(row["row_hash"]).encode(), NEWLINE))


def split_line(line: bytes) -> tuple[bytes, str]:
    """A line's canonical bytes and row hash."""
    content, _, digest = line.rstrip(NEWLINE).rpartition(TAB)
    return content, digest.decode()


def from_line(line: bytes) -> dict[str, Any]:
    """A line back to a dict row (jsonb values as canonical text, the timestamp a datetime)."""
    content, digest = split_line(line)
    row = from_content(content)
    row["row_hash"] = digest
    return row


def from_content(content: bytes) -> dict[str, Any]:
    """Canonical bytes back to a dict row without row_hash."""
    values = load_json(content)
    if type(values) is not list or len(values) != len(HASHED):
        raise ValueError("not an audit line")
    row = dict(zip(HASHED, values, strict=True))
    for name in JSONB:
        if row[name] is not None:
            row[name] = dump_json(row[name])
    row["timestamp"] = datetime.fromisoformat(row["timestamp"])
    return row


def upgrade_line(line: bytes) -> bytes:
    """A spool line as a line: older spools hold one JSON object per row."""
    return to_line(from_wire(line)) if line.startswith(b"{") else line


def from_wire(line: bytes) -> dict[str, Any]:
    """A spool line (this version's lines, or an older spool's JSON objects) as a dict row."""
    if not line.startswith(b"{"):
        return from_line(line)
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
