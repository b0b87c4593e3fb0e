# ruff: noqa: E501
"""Least privilege for the audit log (issue 14): the writer can only INSERT; retention runs as
the owner or the maintenance role and refuses a retention under one day.

Revision 0002. Under 0001 the writer role could execute ``gateway_audit_maintain``, a SECURITY
DEFINER function that trusted its ``retention_days``: called with -1 it dropped every partition,
so whoever held the gateway's credentials could erase the audit log. Now:

- ``gateway_audit_maintain`` raises SQLSTATE 22023 for ``retention_days`` under 1 (or NULL) and
  ``ahead_days`` outside 0..366, before it creates or drops anything;
- EXECUTE on it is revoked from the writer and PUBLIC and granted to ``plant_audit_maintainer``
  (NOLOGIN): grant that role to the login that runs retention; the owner can always run it.
  It stays SECURITY DEFINER so such a login needs no ownership of the partitions it drops;
- the writer holds exactly INSERT on ``gateway_audit_logs`` and nothing on its partitions or
  on the partition function (any other grant an operator may have added is revoked).

Idempotent like 0001; the downgrade restores 0001's function and grants.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from alembic import op

revision = "0002"
down_revision = "0001_audit_log"
branch_labels = None
depends_on = None

WRITER = "plant_audit_writer"
MAINTAINER = "plant_audit_maintainer"
MAINTAIN = "gateway_audit_maintain(integer, integer)"

# 0001's function with its arguments checked first; the rest is unchanged.
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
    RETURN dropped;
END $$;
"""

PRIVILEGES = f"""
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{MAINTAINER}') THEN
        CREATE ROLE {MAINTAINER} NOLOGIN;
    END IF;
END $$;
REVOKE ALL ON FUNCTION {MAINTAIN} FROM PUBLIC, {WRITER};
GRANT EXECUTE ON FUNCTION {MAINTAIN} TO {MAINTAINER};
REVOKE ALL ON FUNCTION gateway_audit_ensure_partition(date) FROM PUBLIC, {WRITER};
REVOKE ALL ON gateway_audit_logs FROM PUBLIC, {WRITER};
GRANT INSERT ON gateway_audit_logs TO {WRITER};
DO $$
DECLARE part text;
BEGIN
    FOR part IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'public.gateway_audit_logs'::regclass
    LOOP
        EXECUTE format('REVOKE ALL ON public.%I FROM PUBLIC, {WRITER}', part);
    END LOOP;
END $$;
"""


def _revision_0001() -> ModuleType:
    return importlib.import_module("plant_gateway.migrations.versions.0001_audit_log")


def upgrade() -> None:
    op.execute(FUNCTION)
    op.execute(PRIVILEGES)


def downgrade() -> None:
    op.execute(_revision_0001().FUNCTIONS)  # 0001's functions, as they were
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{MAINTAINER}') THEN
                REVOKE ALL ON FUNCTION {MAINTAIN} FROM {MAINTAINER};
            END IF;
        END $$;
        GRANT EXECUTE ON FUNCTION {MAINTAIN} TO {WRITER};
        DO $$ BEGIN
            DROP ROLE IF EXISTS {MAINTAINER};
        EXCEPTION WHEN dependent_objects_still_exist THEN
            NULL;  -- still granted something in another database of the cluster
        END $$;
        """
    )
