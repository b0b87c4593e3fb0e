"""Adopting the deployed gateway's ``gateway_audit_logs`` (Plant backend migration 007).

The Plant database already holds a plain (unpartitioned) ``gateway_audit_logs`` created by the
backend's own Alembic chain. Our first revision renames it to ``gateway_audit_logs_007`` (rows,
indexes and policies untouched; its primary-key index renamed so ours can take the name), then
creates our partitioned table and copies every legacy row that fits our constraints into it as
one hash chain of its own (instance ``deployed-gateway-007``), so ``audit verify`` covers the
adopted rows from that moment on. The renamed table is kept: rows that do not fit (no status
code) stay readable there, and an operator drops it once satisfied. The backend's pg_cron job
that bulk-DELETEd old rows is unscheduled: retention is our partition drop.
Our versions live in ``plant_gateway_alembic_version``; the backend's chain in its
``alembic_version`` is never changed (``env.py`` only moves a row an older release of ours put
there).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from plant_gateway.audit.schema import (
    GENESIS,
    INSERT_COLUMNS_SQL,
    canonical,
    dump_json,
    load_json,
    row_hash,
)

LEGACY = "gateway_audit_logs_007"
LEGACY_INSTANCE = "deployed-gateway-007"
BACKEND_CRON_JOB = "gateway_audit_logs_cleanup"
BATCH = 1000

_IS_PLAIN_TABLE = text(
    "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relname = :name"
)

_SELECT_LEGACY = text(f"""
SELECT id::text AS id, correlation_id::text AS correlation_id, causation_id::text AS causation_id,
       "timestamp", gateway_type, request_id::text AS request_id, http_method, endpoint,
       query_params::text AS query_params, request_headers::text AS request_headers,
       request_body::text AS request_body, user_id::text AS user_id,
       customer_id::text AS customer_id, email, roles::text[] AS roles, trial_mode,
       opa_policies_evaluated::text[] AS opa_policies_evaluated,
       opa_decisions::text AS opa_decisions, opa_latency_ms::float8 AS opa_latency_ms,
       status_code, response_headers::text AS response_headers,
       response_body::text AS response_body, error_type, error_message,
       total_latency_ms::float8 AS total_latency_ms, plant_latency_ms::float8 AS plant_latency_ms,
       action, resource, resource_id::text AS resource_id
FROM {LEGACY} WHERE status_code BETWEEN 100 AND 599 AND correlation_id IS NOT NULL
ORDER BY "timestamp", id
""")

_INSERT = text(
    f"INSERT INTO gateway_audit_logs SELECT {INSERT_COLUMNS_SQL} "
    "FROM (SELECT CAST(:doc AS jsonb) AS doc, CAST(:row_hash AS text) AS row_hash) AS staged"
)


def legacy_table_present(conn: Connection) -> bool:
    """True when ``gateway_audit_logs`` is the backend's plain table, not our partitioned one."""
    kind = conn.execute(_IS_PLAIN_TABLE, {"name": "gateway_audit_logs"}).scalar()
    return kind == "r"


def set_aside(conn: Connection) -> None:
    """Rename the backend's table (and its primary-key index) out of our way."""
    conn.execute(text(f"ALTER TABLE gateway_audit_logs RENAME TO {LEGACY}"))
    conn.execute(text(
        "DO $$ BEGIN IF to_regclass('gateway_audit_logs_pkey') IS NOT NULL THEN "
        f"ALTER INDEX gateway_audit_logs_pkey RENAME TO {LEGACY}_pkey; END IF; END $$"
    ))
    conn.execute(text(f"REVOKE ALL ON {LEGACY} FROM PUBLIC"))
    conn.execute(text(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN "
        f"PERFORM cron.unschedule(jobid) FROM cron.job WHERE jobname = '{BACKEND_CRON_JOB}'; "
        "END IF; END $$"
    ))


def _uuid_text(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


def _row(record: Any, seq: int, prev_hash: str) -> dict[str, Any]:
    row = dict(record._mapping)
    for name in ("query_params", "request_headers", "request_body", "opa_decisions",
                 "response_headers", "response_body"):
        if row[name] is not None:
            row[name] = dump_json(load_json(row[name]))
    row["request_id"] = _uuid_text(row["request_id"])  # legacy ids are varchar(100)
    row["user_ref"] = row["user_id"]
    row.update(instance_id=LEGACY_INSTANCE, seq=seq, prev_hash=prev_hash)
    row["row_hash"] = row_hash(row)
    return row


def import_rows(conn: Connection) -> int:
    """Copy the legacy rows into our table as one hash chain; the number copied."""
    if conn.execute(_IS_PLAIN_TABLE, {"name": LEGACY}).scalar() != "r":
        return 0
    done = conn.execute(
        text("SELECT count(*) FROM gateway_audit_logs WHERE instance_id = :i"),
        {"i": LEGACY_INSTANCE},
    ).scalar()
    if done:
        return 0  # adopted before (a re-run after a partial downgrade)
    conn.execute(text("SET LOCAL app.service_account = 'gateway'"))  # the insert policy
    prev, count, batch = GENESIS, 0, []
    for record in conn.execute(_SELECT_LEGACY):
        count += 1
        row = _row(record, count, prev)
        prev = row["row_hash"]
        batch.append({"doc": canonical(row).decode(), "row_hash": row["row_hash"]})
        if len(batch) >= BATCH:
            conn.execute(_INSERT, batch)
            batch = []
    if batch:
        conn.execute(_INSERT, batch)
    return count


def restore(conn: Connection) -> None:
    """Downgrade: give the backend its table back under its own name."""
    if conn.execute(_IS_PLAIN_TABLE, {"name": LEGACY}).scalar() != "r":
        return
    conn.execute(text(f"ALTER TABLE {LEGACY} RENAME TO gateway_audit_logs"))
    conn.execute(text(
        f"DO $$ BEGIN IF to_regclass('{LEGACY}_pkey') IS NOT NULL THEN "
        f"ALTER INDEX {LEGACY}_pkey RENAME TO gateway_audit_logs_pkey; END IF; END $$"
    ))
