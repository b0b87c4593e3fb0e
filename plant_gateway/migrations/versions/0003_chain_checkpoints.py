# ruff: noqa: E501
"""Chain checkpoints outside the audit table (issue 14): ``gateway_audit_checkpoints``.

Revision 0003. The gateway records where each hash chain stood (instance, seq, row hash) every
few seconds and when it closes cleanly (``audit/checkpoints``), so ``audit verify``
sees a truncated or re-hashed tail and a chain that ended without a clean close. Privileges
follow 0002: the writer may only INSERT (no SELECT, UPDATE, DELETE or TRUNCATE), the reader
only SELECT. An ``installed`` row remembers when this revision ran: chains that started
before it have no checkpoints and are said to, not flagged.

``gateway_audit_maintain`` also deletes the checkpoints that name rows older than the
retention (they go with their rows). Idempotent; the downgrade drops the table and restores
0002's function.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

WRITER = "plant_audit_writer"
READER = "plant_audit_reader"
TABLE = "gateway_audit_checkpoints"

DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    kind           varchar(10) NOT NULL,
    instance_id    text NOT NULL,
    seq            bigint NOT NULL,
    row_hash       char(64) NOT NULL,
    row_ts         timestamptz,
    at             timestamptz NOT NULL DEFAULT now(),
    max_unwritten  integer,
    heartbeat_s    double precision,
    rows_lost      bigint,
    mac            char(64),
    CONSTRAINT ck_gateway_audit_checkpoint_kind CHECK (kind IN ('checkpoint', 'close', 'installed')),
    CONSTRAINT ck_gateway_audit_checkpoint_seq CHECK (seq >= 0)
);
CREATE INDEX IF NOT EXISTS idx_gac_chain ON {TABLE} (instance_id, seq);
CREATE INDEX IF NOT EXISTS idx_gac_row_ts ON {TABLE} (row_ts);
INSERT INTO {TABLE} (kind, instance_id, seq, row_hash)
SELECT 'installed', '', 0, repeat('0', 64)
WHERE NOT EXISTS (SELECT 1 FROM {TABLE} WHERE kind = 'installed');
REVOKE ALL ON {TABLE} FROM PUBLIC, {WRITER}, {READER};
GRANT INSERT ON {TABLE} TO {WRITER};
GRANT SELECT ON {TABLE} TO {READER};
"""

# 0002's function, plus: checkpoints naming rows older than the cutoff go with those rows.
FUNCTION = r"""
CREATE OR REPLACE FUNCTION gateway_audit_maintain(retention_days integer, ahead_days integer DEFAULT 7)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    day date;
    cutoff date;
    dropped integer := 0;
    rec record;
BEGIN
    IF retention_days IS NULL OR retention_days < 1 THEN
        RAISE EXCEPTION 'audit retention refused: retention_days must be at least 1, got %', retention_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF ahead_days IS NULL OR ahead_days < 0 OR ahead_days > 366 THEN
        RAISE EXCEPTION 'audit retention refused: ahead_days must be 0..366, got %', ahead_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    cutoff := (now() AT TIME ZONE 'UTC')::date - retention_days;
    PERFORM pg_advisory_xact_lock(7402118734);
    FOR day IN SELECT generate_series((now() AT TIME ZONE 'UTC')::date - 1,
                                      (now() AT TIME ZONE 'UTC')::date + ahead_days, '1 day')::date
    LOOP
        PERFORM gateway_audit_ensure_partition(day);
    END LOOP;
    FOR rec IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'public.gateway_audit_logs'::regclass
          AND c.relname ~ '^gateway_audit_logs_p[0-9]{8}$'
          AND to_date(substring(c.relname from '[0-9]{8}$'), 'YYYYMMDD') + 1 <= cutoff
    LOOP
        EXECUTE format('DROP TABLE public.%I', rec.relname);
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM gateway_audit_logs_default WHERE "timestamp" < cutoff::timestamp AT TIME ZONE 'UTC';
    DELETE FROM gateway_audit_checkpoints WHERE row_ts < cutoff::timestamp AT TIME ZONE 'UTC';
    RETURN dropped;
END $$;
"""


def _revision_0002() -> ModuleType:
    return importlib.import_module("plant_gateway.migrations.versions.0002_retention_least_privilege")


def upgrade() -> None:
    op.execute(DDL)
    op.execute(FUNCTION)


def downgrade() -> None:
    op.execute(_revision_0002().FUNCTION)  # 0002's function, as it was (grants unchanged)
    op.execute(f"DROP TABLE IF EXISTS {TABLE}")
