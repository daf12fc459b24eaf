-- set_local_timeouts --
-- Transaction-scoped timeouts: set_config(..., true) is SET LOCAL, safe behind a transaction pooler.
SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true);

-- database_exists --
-- Used by the embedded server and the test fixtures before CREATE DATABASE.
SELECT 1 FROM pg_database WHERE datname = %s;

-- create_database --
-- The name is an identifier composed with psycopg.sql, never formatted in by hand.
CREATE DATABASE {};

-- create_database_from_template --
-- Test fixtures: a fresh database per test, copied from a migrated template.
CREATE DATABASE {} TEMPLATE {};

-- drop_database --
-- Test fixtures and the demo; FORCE ends leftover connections (PostgreSQL 13+).
DROP DATABASE IF EXISTS {} WITH (FORCE);

-- server_version --
-- For doctor and diagnostics.
SELECT current_setting('server_version');
