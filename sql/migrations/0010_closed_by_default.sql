-- What the Data API may reach (issue 12). wsctl's own schema is reachable by no
-- role but its owner and the roles granted explicitly (`wsctl secure
-- grant-worker ROLE`), whatever default privileges say; the pipeline tables in
-- public are left as they are here (an adopted database's grants are the
-- operator's: `wsctl secure` changes them when asked).

-- The pipeline tables `wsctl migrate` itself created (they did not exist when
-- 0001 ran): the runner writes these rows in 0001's own transaction, since no
-- later migration can tell a created table from an adopted one. Absent rows:
-- adopted, or migrated before this table existed.
CREATE TABLE IF NOT EXISTS wsctl.created_tables (
    table_name  text PRIMARY KEY,
    migration   integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Roles given what the worker helpers need (`wsctl secure grant-worker`): the
-- runner grants them the same on wsctl objects later migrations create.
CREATE TABLE IF NOT EXISTS wsctl.worker_roles (
    role_name   text PRIMARY KEY,
    granted_at  timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON wsctl.created_tables, wsctl.worker_roles FROM PUBLIC;

-- Objects created before this migration may carry what default privileges
-- granted (Supabase: ALTER DEFAULT PRIVILEGES ... GRANT ALL ON TABLES, FUNCTIONS,
-- SCHEMAS TO anon, authenticated without IN SCHEMA). Take it back from PUBLIC
-- and the API roles (names from the wsctl.anon_role / wsctl.authenticated_role
-- settings, default anon and authenticated) that exist.
DO $$
DECLARE
    r text;
BEGIN
    REVOKE ALL ON SCHEMA wsctl FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA wsctl FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA wsctl FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA wsctl FROM PUBLIC;
    FOREACH r IN ARRAY ARRAY[
        coalesce(nullif(current_setting('wsctl.anon_role', true), ''), 'anon'),
        coalesce(nullif(current_setting('wsctl.authenticated_role', true), ''), 'authenticated')]
    LOOP
        CONTINUE WHEN to_regrole(quote_ident(r)) IS NULL;
        EXECUTE format('REVOKE ALL ON SCHEMA wsctl FROM %I', r);
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA wsctl FROM %I', r);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA wsctl FROM %I', r);
        EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA wsctl FROM %I', r);
    END LOOP;
END
$$;
