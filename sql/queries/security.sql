-- security_api_roles --
-- The Data API's role names: the wsctl.anon_role / wsctl.authenticated_role settings
-- (e.g. ALTER DATABASE ... SET wsctl.anon_role = 'anon_staging'), else Supabase's own.
SELECT coalesce(nullif(current_setting('wsctl.anon_role', true), ''), 'anon') AS anon,
       coalesce(nullif(current_setting('wsctl.authenticated_role', true), ''), 'authenticated')
           AS authenticated;

-- security_existing_roles --
-- Which of the given role names exist (an absent API role is not a Supabase database).
SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY(%s::text[]) ORDER BY rolname;

-- security_missing_tables --
-- The pipeline tables not there yet (the runner asks while 0001 is pending).
SELECT t.name
FROM unnest(%s::text[]) AS t(name)
WHERE to_regclass(pg_catalog.quote_ident('public') || '.' || pg_catalog.quote_ident(t.name)) IS NULL
ORDER BY t.name;

-- security_revoke_table --
-- Table and role are composed as identifiers (the role may be PUBLIC: composed as a keyword).
REVOKE ALL ON TABLE {} FROM {};

-- security_created_tables_ensure --
-- The same table as migration 0010 creates: the runner writes it in 0001's transaction,
-- before 0010 has run on a fresh database.
CREATE TABLE IF NOT EXISTS wsctl.created_tables (
    table_name  text PRIMARY KEY,
    migration   integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON wsctl.created_tables FROM PUBLIC;

-- security_record_created --
-- One row per pipeline table `wsctl migrate` created itself.
INSERT INTO wsctl.created_tables (table_name, migration)
SELECT unnest(%s::text[]), %s
ON CONFLICT (table_name) DO NOTHING;

-- security_created_list --
-- The pipeline tables wsctl created (none when the table is absent: migrated before 0010).
SELECT table_name FROM wsctl.created_tables ORDER BY table_name;

-- security_wsctl_objects --
-- wsctl's schema and everything in it that carries privileges, each with its owner and
-- who holds what (a NULL ACL read as the default one: a function's grants PUBLIC EXECUTE).
-- identity is server-quoted SQL, ready to compose; kind is the GRANT/REVOKE object word.
WITH objs AS (
    SELECT 'SCHEMA' AS kind, pg_catalog.quote_ident(n.nspname) AS identity, n.nspowner AS owner,
           coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner)) AS acl
    FROM pg_catalog.pg_namespace n WHERE n.nspname = 'wsctl'
    UNION ALL
    SELECT CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
           pg_catalog.format('%I.%I', n.nspname, c.relname), c.relowner,
           coalesce(c.relacl, pg_catalog.acldefault((CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::"char",
                                                    c.relowner))
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'wsctl' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    UNION ALL
    SELECT 'ROUTINE',
           pg_catalog.format('%I.%I(%s)', n.nspname, p.proname,
                             pg_catalog.pg_get_function_identity_arguments(p.oid)),
           p.proowner, coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'wsctl'
)
SELECT o.kind, o.identity, pg_catalog.pg_get_userbyid(o.owner) AS owner,
       coalesce(array_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                        ELSE pg_catalog.pg_get_userbyid(a.grantee) END)
                    FILTER (WHERE a.grantee <> o.owner), '{}') AS grantees
FROM objs o LEFT JOIN LATERAL pg_catalog.aclexplode(o.acl) a ON true
GROUP BY o.kind, o.identity, o.owner
ORDER BY o.kind, o.identity;

-- security_revoke_object --
-- kind, object (server-quoted) and role composed: REVOKE ALL ON TABLE wsctl.x FROM anon.
REVOKE ALL ON {} {} FROM {};

-- security_grant_object --
-- kind, privileges, object and role composed: GRANT EXECUTE ON ROUTINE wsctl.f(uuid) TO worker.
GRANT {} ON {} {} TO {};

-- security_grant_table --
-- privileges, table and role composed (the worker helpers' pipeline-table privileges).
GRANT {} ON TABLE {} TO {};

-- security_worker_roles --
-- Roles `wsctl secure grant-worker` recorded that still exist (none before migration 0010).
SELECT w.role_name
FROM wsctl.worker_roles w
JOIN pg_catalog.pg_roles r ON r.rolname = w.role_name
ORDER BY w.role_name;

-- security_worker_roles_exists --
-- Whether migration 0010's table is there (the runner also runs before it).
SELECT to_regclass('wsctl.worker_roles') IS NOT NULL;

-- security_record_worker --
-- Remember a worker role, so the runner grants it what later migrations create.
INSERT INTO wsctl.worker_roles (role_name) VALUES (%s)
ON CONFLICT (role_name) DO NOTHING;

-- security_direct_grants --
-- What the given grantees (role names, 'PUBLIC' for PUBLIC) hold directly on the given
-- public tables, table-wide and per column, and on wsctl's objects (see security_wsctl_objects).
WITH rels AS (
    SELECT c.oid, c.relname, c.relowner, c.relacl
    FROM unnest(%(tables)s::text[]) AS t(name)
    JOIN pg_catalog.pg_class c
      ON c.oid = to_regclass(pg_catalog.quote_ident('public') || '.' || pg_catalog.quote_ident(t.name))
), grants AS (
    SELECT 'TABLE' AS kind, pg_catalog.format('%%I.%%I', 'public', r.relname) AS identity,
           r.relname AS table_name, a.grantee, a.privilege_type AS privilege
    FROM rels r, pg_catalog.aclexplode(coalesce(r.relacl, pg_catalog.acldefault('r', r.relowner))) a
    UNION ALL
    SELECT 'TABLE', pg_catalog.format('%%I.%%I', 'public', r.relname), r.relname, a.grantee,
           a.privilege_type || '(' || pg_catalog.quote_ident(att.attname) || ')'
    FROM rels r
    JOIN pg_catalog.pg_attribute att ON att.attrelid = r.oid AND att.attacl IS NOT NULL
    CROSS JOIN LATERAL pg_catalog.aclexplode(att.attacl) a
)
SELECT kind, identity, table_name,
       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(grantee) END AS grantee,
       array_agg(privilege ORDER BY privilege) AS privileges
FROM grants
WHERE (CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(grantee) END)
      = ANY(%(grantees)s::text[])
GROUP BY kind, identity, table_name, grantee
ORDER BY identity, grantee;

-- security_role_reach --
-- What one role can do through the Data API on each given public table: its effective
-- privileges (PUBLIC and memberships included), whether row level security is on, and the
-- commands of the policies that apply to it (r select, a insert, w update, d delete, * all).
SELECT c.relname AS table_name,
       pg_catalog.has_schema_privilege(%(role)s, c.relnamespace, 'USAGE') AS schema_usage,
       c.relrowsecurity AS rls,
       r.rolbypassrls AS bypass_rls,
       pg_catalog.has_any_column_privilege(%(role)s, c.oid, 'SELECT') AS can_select,
       pg_catalog.has_any_column_privilege(%(role)s, c.oid, 'INSERT') AS can_insert,
       pg_catalog.has_any_column_privilege(%(role)s, c.oid, 'UPDATE') AS can_update,
       pg_catalog.has_table_privilege(%(role)s, c.oid, 'DELETE') AS can_delete,
       pg_catalog.has_table_privilege(%(role)s, c.oid, 'TRUNCATE') AS can_truncate,
       coalesce(array(
           SELECT DISTINCT p.polcmd::text FROM pg_catalog.pg_policy p
           WHERE p.polrelid = c.oid
             AND (p.polroles = '{0}'
                  OR EXISTS (SELECT 1 FROM unnest(p.polroles) pr(oid)
                             WHERE pg_catalog.pg_has_role(r.oid, pr.oid, 'USAGE')))
       ), '{}') AS policy_commands
FROM unnest(%(tables)s::text[]) AS t(name)
JOIN pg_catalog.pg_class c
  ON c.oid = to_regclass(pg_catalog.quote_ident('public') || '.' || pg_catalog.quote_ident(t.name))
CROSS JOIN pg_catalog.pg_roles r
WHERE r.rolname = %(role)s
ORDER BY c.relname;

-- security_role_wsctl_reach --
-- Whether one role may use schema wsctl, and then which of its tables and routines it may touch.
SELECT pg_catalog.has_schema_privilege(%(role)s, 'wsctl', 'USAGE') AS schema_usage,
       coalesce(array(
           SELECT pg_catalog.format('%%I.%%I', n.nspname, c.relname)
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'wsctl' AND c.relkind IN ('r', 'p', 'v', 'm')
             AND (pg_catalog.has_table_privilege(%(role)s, c.oid, 'SELECT')
                  OR pg_catalog.has_table_privilege(%(role)s, c.oid, 'INSERT')
                  OR pg_catalog.has_table_privilege(%(role)s, c.oid, 'UPDATE')
                  OR pg_catalog.has_table_privilege(%(role)s, c.oid, 'DELETE'))
           ORDER BY 1), '{}') AS tables,
       coalesce(array(
           SELECT p.oid::regprocedure::text
           FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'wsctl' AND pg_catalog.has_function_privilege(%(role)s, p.oid, 'EXECUTE')
           ORDER BY 1), '{}') AS routines;

-- security_created_tables_exists --
-- Whether migration 0010's record is there (a database migrated before it has none).
SELECT to_regclass('wsctl.created_tables') IS NOT NULL;

-- security_default_grantees --
-- Who default privileges give something to on what a role creates in wsctl (global entries
-- and IN SCHEMA wsctl ones), by object word: what the runner takes back from new objects.
SELECT pg_catalog.pg_get_userbyid(d.defaclrole) AS owner,
       CASE d.defaclobjtype WHEN 'r' THEN 'TABLE' WHEN 'S' THEN 'SEQUENCE'
                            WHEN 'f' THEN 'ROUTINE' WHEN 'n' THEN 'SCHEMA'
                            ELSE d.defaclobjtype::text END AS kind,
       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee) END
           AS grantee
FROM pg_catalog.pg_default_acl d
CROSS JOIN LATERAL pg_catalog.aclexplode(d.defaclacl) a
WHERE d.defaclnamespace = 0 OR d.defaclnamespace = to_regnamespace('wsctl');
