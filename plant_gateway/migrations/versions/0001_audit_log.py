# ruff: noqa: E501
"""Audit log: partitioned gateway_audit_logs, RLS policies, roles, retention function.

Revision 0001. Idempotent DDL (IF NOT EXISTS / guarded DO blocks) so a re-run is harmless.
"""

from __future__ import annotations

from alembic import op

from plant_gateway.migrations import adopt

revision = "0001_audit_log"
down_revision = None
branch_labels = None
depends_on = None

WRITER = "plant_audit_writer"
READER = "plant_audit_reader"

TABLE = """
CREATE TABLE IF NOT EXISTS gateway_audit_logs (
    id                      uuid NOT NULL,
    correlation_id          uuid NOT NULL,
    causation_id            uuid,
    "timestamp"             timestamptz NOT NULL,
    gateway_type            varchar(10) NOT NULL,
    request_id              uuid,
    http_method             varchar(16),
    endpoint                text,
    query_params            jsonb,
    request_headers         jsonb,
    request_body            jsonb,
    user_id                 uuid,
    customer_id             text,
    email                   text,
    roles                   text[],
    trial_mode              boolean,
    opa_policies_evaluated  text[],
    opa_decisions           jsonb,
    opa_latency_ms          double precision,
    status_code             integer NOT NULL,
    response_headers        jsonb,
    response_body           jsonb,
    error_type              text,
    error_message           text,
    total_latency_ms        double precision NOT NULL,
    plant_latency_ms        double precision,
    action                  text,
    resource                text,
    resource_id             text,
    -- beyond the documented columns: the raw user id as the token gave it (user_id is NULL when it is no UUID)
    user_ref                text,
    -- tamper evidence: one hash chain per gateway instance
    instance_id             text NOT NULL,
    seq                     bigint NOT NULL,
    prev_hash               char(64) NOT NULL,
    row_hash                char(64) NOT NULL,
    CONSTRAINT gateway_audit_logs_pkey PRIMARY KEY (id, "timestamp"),
    CONSTRAINT ck_gateway_audit_status CHECK (status_code BETWEEN 100 AND 599),
    CONSTRAINT ck_gateway_audit_latency CHECK (total_latency_ms >= 0),
    CONSTRAINT ck_gateway_audit_type CHECK (gateway_type IN ('CP', 'PP', 'PLANT')),
    CONSTRAINT ck_gateway_audit_seq CHECK (seq >= 1)
) PARTITION BY RANGE ("timestamp")
"""

INDEXES = [
    "CREATE INDEX IF NOT EXISTS idx_gal_correlation_id ON gateway_audit_logs (correlation_id)",
    "CREATE INDEX IF NOT EXISTS idx_gal_causation_id ON gateway_audit_logs (causation_id)"
    " WHERE causation_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS idx_gal_user_id ON gateway_audit_logs (user_id)",
    "CREATE INDEX IF NOT EXISTS idx_gal_customer_id ON gateway_audit_logs (customer_id)"
    " WHERE customer_id IS NOT NULL",
    'CREATE INDEX IF NOT EXISTS idx_gal_timestamp ON gateway_audit_logs ("timestamp" DESC)',
    "CREATE INDEX IF NOT EXISTS idx_gal_status_error ON gateway_audit_logs"
    " (status_code, error_type) WHERE status_code >= 400",
    "CREATE INDEX IF NOT EXISTS idx_gal_opa_decisions ON gateway_audit_logs USING gin (opa_decisions)",
    "CREATE INDEX IF NOT EXISTS idx_gal_gateway_type ON gateway_audit_logs (gateway_type)",
    "CREATE INDEX IF NOT EXISTS idx_gal_action_resource ON gateway_audit_logs (action, resource)",
    'CREATE INDEX IF NOT EXISTS idx_gal_user_timestamp ON gateway_audit_logs (user_id, "timestamp" DESC)',
    "CREATE INDEX IF NOT EXISTS idx_gal_customer_timestamp ON gateway_audit_logs"
    ' (customer_id, "timestamp" DESC) WHERE customer_id IS NOT NULL',
    # not one of the twelve documented indexes: lets `audit verify` walk each chain in order
    "CREATE INDEX IF NOT EXISTS idx_gal_chain ON gateway_audit_logs (instance_id, seq)",
]

FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION gateway_audit_setting_uuid(name text) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
DECLARE raw text := nullif(current_setting(name, true), '');
BEGIN
    IF raw IS NULL THEN RETURN NULL; END IF;
    RETURN raw::uuid;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN NULL;
END $$;

-- Creates daily partitions from yesterday to `ahead_days` ahead and drops the ones wholly
-- older than `retention_days`. Rows that landed in the default partition for a day that gets
-- its own partition are moved into it. Returns the number of partitions dropped.
CREATE OR REPLACE FUNCTION gateway_audit_maintain(retention_days integer, ahead_days integer DEFAULT 7)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    day date;
    part text;
    cutoff date := (now() AT TIME ZONE 'UTC')::date - retention_days;
    dropped integer := 0;
    rec record;
BEGIN
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

CREATE OR REPLACE FUNCTION gateway_audit_ensure_partition(day date) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    part text := 'gateway_audit_logs_p' || to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass('public.' || part) IS NOT NULL THEN RETURN; END IF;
    IF EXISTS (SELECT 1 FROM gateway_audit_logs_default WHERE "timestamp" >= lo AND "timestamp" < hi) THEN
        EXECUTE format('CREATE TABLE public.%I (LIKE gateway_audit_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
        EXECUTE format('WITH moved AS (DELETE FROM gateway_audit_logs_default WHERE "timestamp" >= %L AND "timestamp" < %L RETURNING *) INSERT INTO public.%I SELECT * FROM moved', lo, hi, part);
        EXECUTE format('ALTER TABLE gateway_audit_logs ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    ELSE
        EXECUTE format('CREATE TABLE public.%I PARTITION OF gateway_audit_logs FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    END IF;
END $$;
"""

POLICIES = r"""
ALTER TABLE gateway_audit_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE gateway_audit_logs FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS admin_all_access ON gateway_audit_logs;
CREATE POLICY admin_all_access ON gateway_audit_logs FOR SELECT
    USING (current_setting('app.is_admin', true) = 'true');
DROP POLICY IF EXISTS user_own_logs ON gateway_audit_logs;
CREATE POLICY user_own_logs ON gateway_audit_logs FOR SELECT
    USING (user_id = gateway_audit_setting_uuid('app.current_user_id')
           OR (user_id IS NULL AND user_ref IS NOT NULL
               AND user_ref = nullif(current_setting('app.current_user_id', true), '')));
DROP POLICY IF EXISTS customer_admin_logs ON gateway_audit_logs;
CREATE POLICY customer_admin_logs ON gateway_audit_logs FOR SELECT
    USING (current_setting('app.is_customer_admin', true) = 'true'
           AND customer_id = nullif(current_setting('app.current_customer_id', true), ''));
DROP POLICY IF EXISTS system_insert_logs ON gateway_audit_logs;
CREATE POLICY system_insert_logs ON gateway_audit_logs FOR INSERT
    WITH CHECK (current_setting('app.service_account', true) IN ('gateway', 'opa'));
"""

ROLES = f"""
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{WRITER}') THEN
        CREATE ROLE {WRITER} LOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READER}') THEN
        CREATE ROLE {READER} LOGIN NOINHERIT;
    END IF;
END $$;
DO $$ BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO {WRITER}, {READER}', current_database());
END $$;
GRANT USAGE ON SCHEMA public TO {WRITER}, {READER};
REVOKE ALL ON gateway_audit_logs FROM PUBLIC;
GRANT INSERT ON gateway_audit_logs TO {WRITER};
GRANT SELECT ON gateway_audit_logs TO {READER};
REVOKE ALL ON FUNCTION gateway_audit_maintain(integer, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION gateway_audit_ensure_partition(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION gateway_audit_maintain(integer, integer) TO {WRITER};
"""

PG_CRON = r"""
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        PERFORM cron.schedule('gateway-audit-retention', '17 * * * *',
                              'SELECT gateway_audit_maintain(90, 7)');
    END IF;
END $$;
"""


def upgrade() -> None:
    conn = op.get_bind()
    if adopt.legacy_table_present(conn):  # the Plant database: the backend's 007 table
        adopt.set_aside(conn)
    op.execute(TABLE)
    op.execute(
        "CREATE TABLE IF NOT EXISTS gateway_audit_logs_default "
        "PARTITION OF gateway_audit_logs DEFAULT"
    )
    for statement in INDEXES:
        op.execute(statement)
    op.execute(FUNCTIONS)
    op.execute(POLICIES)
    op.execute(ROLES)
    adopt.import_rows(conn)
    op.execute("SELECT gateway_audit_maintain(90, 7)")
    op.execute(PG_CRON)


def downgrade() -> None:
    op.execute(
        """
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
                PERFORM cron.unschedule(jobid) FROM cron.job WHERE jobname = 'gateway-audit-retention';
            END IF;
        END $$;
        """
    )
    op.execute("DROP TABLE IF EXISTS gateway_audit_logs CASCADE")
    adopt.restore(op.get_bind())
    op.execute("DROP FUNCTION IF EXISTS gateway_audit_maintain(integer, integer)")
    op.execute("DROP FUNCTION IF EXISTS gateway_audit_ensure_partition(date)")
    op.execute("DROP FUNCTION IF EXISTS gateway_audit_setting_uuid(text)")
    # Roles are cluster-wide: drop them only when no other database still grants them anything.
    op.execute(
        f"""
        DO $$ BEGIN
            IF (SELECT count(*) FROM pg_roles WHERE rolname IN ('{WRITER}', '{READER}')) = 2 THEN
                EXECUTE format('REVOKE ALL ON DATABASE %I FROM {WRITER}, {READER}',
                               current_database());
                REVOKE ALL ON SCHEMA public FROM {WRITER}, {READER};
            END IF;
            BEGIN
                DROP ROLE IF EXISTS {WRITER};
                DROP ROLE IF EXISTS {READER};
            EXCEPTION WHEN dependent_objects_still_exist THEN
                NULL;
            END;
        END $$;
        """
    )
