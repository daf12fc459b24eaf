-- migrations_bootstrap --
-- wsctl's own schema and history table; never in public (Supabase exposes public to anon).
CREATE SCHEMA IF NOT EXISTS wsctl;
REVOKE ALL ON SCHEMA wsctl FROM PUBLIC;
CREATE TABLE IF NOT EXISTS wsctl.schema_migrations (
    version      integer PRIMARY KEY,
    name         text NOT NULL,
    checksum     text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    duration_ms  integer NOT NULL
);
REVOKE ALL ON wsctl.schema_migrations FROM PUBLIC;

-- migrations_table_exists --
-- Whether the history table is there at all (a database wsctl never migrated has none).
SELECT to_regclass('wsctl.schema_migrations') IS NOT NULL;

-- migrations_applied --
-- The history, oldest first.
SELECT version, name, checksum, applied_at, duration_ms
FROM wsctl.schema_migrations
ORDER BY version;

-- migrations_record --
-- One history row, written in the same transaction as the migration itself.
INSERT INTO wsctl.schema_migrations (version, name, checksum, duration_ms)
VALUES (%s, %s, %s, %s);

-- migrations_try_lock --
-- Session advisory lock polled by `wsctl migrate` (never the blocking form: see migrations.py).
SELECT pg_try_advisory_lock(%s);

-- migrations_unlock --
-- Released when the run ends (also released by closing the session).
SELECT pg_advisory_unlock(%s);

-- index_validity --
-- An index left INVALID by a failed CREATE INDEX CONCURRENTLY is rebuilt on the next run.
SELECT i.indisvalid
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %s AND n.nspname = ANY(current_schemas(false));

-- drop_index_concurrently --
-- The index name is composed as an identifier.
DROP INDEX CONCURRENTLY IF EXISTS {};

-- migrations_set_lock_timeout --
-- Session-wide (migrate needs a direct or session connection anyway): a DDL statement
-- queued behind a long transaction would otherwise block every reader of its table.
SELECT set_config('lock_timeout', %s, false);
