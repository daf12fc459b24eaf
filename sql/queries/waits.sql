-- waits_strong_locks_held --
-- After a lock timeout: the tables of this database another session holds in a mode that
-- blocks writes or reads (what the statement most likely waited for), schema-qualified.
SELECT DISTINCT format('%I.%I', n.nspname, c.relname) AS relation
FROM pg_catalog.pg_locks l
JOIN pg_catalog.pg_class c ON c.oid = l.relation
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE l.locktype = 'relation'
  AND l.granted
  AND l.pid <> pg_catalog.pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
  AND l.mode IN ('AccessExclusiveLock', 'ExclusiveLock', 'ShareRowExclusiveLock', 'ShareLock')
  AND c.relkind IN ('r', 'p', 'm');
