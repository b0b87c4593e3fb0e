"""The audit row: column list, wire form (JSON-safe dict), database record and hash chain.

One canonical form is hashed when the row is built and recomputed from the stored row by
``audit verify``; both sides go through ``canonical`` so the stored row round-trips exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

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


def _norm(value: Any) -> Any:
    """Normalise a JSON value so it survives a jsonb round trip unchanged."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {str(k).replace("\x00", "\ufffd"): _norm(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    return value


def _canon_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in UUIDS:
        return str(value).lower()
    if name == "timestamp":
        ts = value if isinstance(value, datetime) else datetime.fromisoformat(value)
        return ts.astimezone(UTC).isoformat(timespec="microseconds")
    if name in JSONB:
        return _norm(json.loads(value) if isinstance(value, str) else value)
    if isinstance(value, float):
        return _norm(value)
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    if isinstance(value, str):
        return value.rstrip(" ") if name == "prev_hash" else value
    return value


def normalise(row: dict[str, Any]) -> dict[str, Any]:
    """Normalise the jsonb values in place (done once, before hashing and queueing)."""
    for name in JSONB:
        if row.get(name) is not None:
            row[name] = _norm(row[name])
    return row


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes the row hash covers: every column but row_hash, in table order."""
    values = [_canon_value(name, row.get(name)) for name in HASHED]
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def row_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


def to_record(row: dict[str, Any]) -> tuple[Any, ...]:
    """Wire row (JSON-safe dict) -> tuple for COPY; raises ValueError/TypeError on bad data."""
    out: list[Any] = []
    for name, kind in COLUMNS:
        value = row.get(name)
        if value is None:
            out.append(None)
        elif kind == "uuid":
            out.append(value if isinstance(value, uuid.UUID) else uuid.UUID(value))
        elif kind == "timestamptz":
            out.append(datetime.fromisoformat(value) if isinstance(value, str) else value)
        elif kind == "jsonb":
            out.append(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
        elif kind in ("integer", "bigint"):
            out.append(int(value))
        elif kind == "double precision":
            out.append(float(value))
        elif kind == "boolean":
            out.append(bool(value))
        elif kind == "text[]":
            out.append([str(v) for v in value])
        else:
            out.append(str(value))
    return tuple(out)


def from_db(record: Any) -> dict[str, Any]:
    """A fetched asyncpg record (jsonb as text) as a dict comparable through ``canonical``."""
    return {name: record[name] for name in NAMES}
