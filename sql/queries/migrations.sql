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
-- Transaction advisory lock polled by `wsctl migrate` on its lock connection, in a transaction
-- kept open for the run (never the blocking form, never a session lock: see migrations.py).
SELECT pg_catalog.pg_try_advisory_xact_lock(%s);

-- migrations_lock_transaction_settings --
-- The lock connection's transaction lasts the whole run: no idle or statement timeout ends it.
SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', '0', true),
       pg_catalog.set_config('statement_timeout', '0', true);

-- migrations_cancel_lock_waiter --
-- The watchdog of a statement that cannot run in a transaction (CREATE INDEX CONCURRENTLY):
-- cancel it once it has waited for a lock longer than the DDL lock timeout (PostgreSQL 14+).
SELECT pg_catalog.pg_cancel_backend(a.pid) AS cancelled
FROM pg_catalog.pg_stat_activity a
JOIN pg_catalog.pg_locks l ON l.pid = a.pid AND NOT l.granted
WHERE a.datname = pg_catalog.current_database()
  AND a.state = 'active'
  AND a.query = %(query)s
  AND l.waitstart < pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => %(timeout_s)s)
LIMIT 1;

-- index_validity --
-- An index left INVALID by a failed CREATE INDEX CONCURRENTLY is rebuilt on the next run.
-- Schema-qualified catalog lookups: found whatever the search_path (even pg_catalog alone);
-- an index built on an unqualified table name is looked for along the search_path.
SELECT i.indisvalid, n.nspname
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %(name)s
  AND (n.nspname = %(schema)s
       OR (%(schema)s IS NULL AND n.nspname = ANY(pg_catalog.current_schemas(false))))
ORDER BY pg_catalog.array_position(pg_catalog.current_schemas(false), n.nspname::text)
LIMIT 1;

-- drop_index_concurrently --
-- The index name is composed as an identifier.
DROP INDEX CONCURRENTLY IF EXISTS {};
