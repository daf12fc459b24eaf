"""Supabase hardening on a real PostgreSQL shaped like a Supabase project (issue 12).

Each test gets Supabase's roles (anon, authenticated, service_role: suffixed names, since
roles are cluster-global on a shared server, handed to wsctl through the database settings
wsctl.anon_role / wsctl.authenticated_role), Supabase's default privileges in public as
its setup SQL grants them, and a non-superuser owner that runs wsctl. What the API roles
can read, write and execute is checked through SET ROLE, before and after `wsctl secure`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from tests.conftest import FIXTURES, url_for
from wsctl.security import PIPELINE_TABLES

ENRICH = "enrich_company_via_waterfall_in_clay"
NORMALIZE = "normalize_all_core_values"


@dataclass
class Supa:
    anon: str
    authenticated: str
    service_role: str
    owner: str
    worker: str
    admin_url: str  # superuser, on the project's database
    owner_url: str
    worker_url: str
    dbname: str


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


@pytest.fixture
def supa(fresh_db, pg_admin_url) -> Supa:
    url, name = fresh_db
    sfx = uuid.uuid4().hex[:8]
    s = Supa(
        anon=f"anon_{sfx}",
        authenticated=f"authenticated_{sfx}",
        service_role=f"service_role_{sfx}",
        owner=f"wsowner_{sfx}",
        worker=f"wsworker_{sfx}",
        admin_url=url,
        owner_url=url_for(url, name, user=f"wsowner_{sfx}", password="pw"),
        worker_url=url_for(url, name, user=f"wsworker_{sfx}", password="pw"),
        dbname=name,
    )
    roles = [s.anon, s.authenticated, s.service_role, s.owner, s.worker]
    with psycopg.connect(url, autocommit=True) as c:
        # Supabase's roles, as its setup SQL creates them; the owner stands for `postgres`,
        # which Supabase demotes to a non-superuser.
        c.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(_ident(s.anon)))
        c.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(_ident(s.authenticated)))
        c.execute(
            sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT BYPASSRLS").format(_ident(s.service_role))
        )
        for login in (s.owner, s.worker):
            c.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD 'pw'").format(_ident(login))
            )
        api = sql.SQL(", ").join(map(_ident, [s.anon, s.authenticated, s.service_role]))
        owner = _ident(s.owner)
        c.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(_ident(name), owner))
        c.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(owner))
        c.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(api))
        for kind in ("TABLES", "FUNCTIONS", "SEQUENCES"):
            c.execute(
                sql.SQL(
                    "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT ALL ON {} TO {}"
                ).format(owner, sql.SQL(kind), api)
            )
        for setting, role in (("anon_role", s.anon), ("authenticated_role", s.authenticated)):
            c.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    _ident(name), sql.Identifier("wsctl", setting), sql.Literal(role)
                )
            )
    try:
        yield s
    finally:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
                (roles,),
            )
            c.execute(sql.SQL("DROP OWNED BY {}").format(sql.SQL(", ").join(map(_ident, roles))))
            for role in roles:
                c.execute(sql.SQL("DROP ROLE {}").format(_ident(role)))


def global_default_privileges(s: Supa) -> None:
    """The hostile case: default privileges granted without IN SCHEMA, schemas included."""
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        api = sql.SQL(", ").join(map(_ident, [s.anon, s.authenticated]))
        for kind in ("TABLES", "FUNCTIONS", "SCHEMAS", "SEQUENCES"):
            c.execute(
                sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT ALL ON {} TO {}").format(
                    _ident(s.owner), sql.SQL(kind), api
                )
            )


def can(s: Supa, role: str, statement: str, params: tuple = ()) -> bool:
    """Whether ``role`` may run ``statement`` (run for real as that role, then rolled back)."""
    with psycopg.connect(s.admin_url) as c:
        c.execute(sql.SQL("SET ROLE {}").format(_ident(role)))
        try:
            c.execute(statement, params)
        except psycopg.errors.InsufficientPrivilege:
            return False
        finally:
            c.rollback()
    return True


def reach(s: Supa, role: str) -> dict[str, bool]:
    """What ``role`` can do through the Data API's eyes: read configs, write each table, use
    wsctl's schema and execute its completion function."""
    state = str(uuid.uuid4())
    out = {
        "read_configs": can(s, role, "SELECT * FROM public.client_workflow_configs"),
        "read_batches": can(s, role, "SELECT * FROM public.batches"),
        "write_states": can(
            s, role, "UPDATE public.workflow_states SET claim_token = gen_random_uuid()"
        ),
        "insert_clients": can(s, role, "INSERT INTO public.clients (name) VALUES ('evil')"),
        "wsctl_table": can(s, role, "SELECT * FROM wsctl.batch_dedupe_keys"),
        "complete_step": can(s, role, "SELECT wsctl.complete_step(%s)", (state,)),
    }
    return out


def acls(s: Supa) -> dict[str, object]:
    """Every ACL and policy of the pipeline tables, for 'nothing changed' assertions."""
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        tables = c.execute(
            "SELECT relname, relacl::text[], relrowsecurity FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace AND relname = ANY(%s) ORDER BY 1",
            (list(PIPELINE_TABLES),),
        ).fetchall()
        policies = c.execute(
            "SELECT tablename, policyname, roles::text[], cmd, qual FROM pg_policies "
            "WHERE schemaname = 'public' ORDER BY 1, 2"
        ).fetchall()
    return {"tables": tables, "policies": policies}


def public_grantees(s: Supa) -> set[str]:
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        rows = c.execute(
            "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END "
            "FROM pg_class c, aclexplode(c.relacl) a "
            "WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s)",
            (list(PIPELINE_TABLES),),
        ).fetchall()
    return {r[0] for r in rows}


def migrate_as_owner(run_cli, s: Supa) -> None:
    r = run_cli("migrate", url=s.owner_url)
    assert r.code == 0, r.err


def adopt_legacy(s: Supa) -> None:
    """The dashboard created the tables (as the owner: Supabase's default privileges apply)."""
    with psycopg.connect(s.owner_url, autocommit=True) as c:
        c.execute((FIXTURES / "legacy_schema.sql").read_text())
        c.execute("ALTER TABLE public.batches ENABLE ROW LEVEL SECURITY")
        c.execute(
            sql.SQL(
                "CREATE POLICY dash_read ON public.batches FOR SELECT TO {} USING (true)"
            ).format(_ident(s.authenticated))
        )


def api_check(run_cli, s: Supa) -> dict:
    r = run_cli("doctor", "--json", url=s.owner_url)
    return next(c for c in r.json()["checks"] if c["name"] == "api_exposure")


# --- 1. closed by default -------------------------------------------------------------------


def test_a_fresh_migrate_leaves_the_pipeline_tables_closed_to_the_api_roles(run_cli, supa):
    s = supa
    migrate_as_owner(run_cli, s)
    for role in (s.anon, s.authenticated):
        assert not any(reach(s, role).values()), role
    # Privileges, not RLS: nothing for PUBLIC, service_role keeps Supabase's grant.
    assert PIPELINE_TABLES and public_grantees(s) == {s.owner, s.service_role}
    assert can(s, s.service_role, "SELECT * FROM public.client_workflow_configs")
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        created = c.execute("SELECT table_name FROM wsctl.created_tables ORDER BY 1").fetchall()
        rls = c.execute(
            "SELECT bool_or(relrowsecurity) FROM pg_class WHERE relname = ANY(%s)",
            (list(PIPELINE_TABLES),),
        ).fetchone()[0]
    assert [r[0] for r in created] == sorted(PIPELINE_TABLES)
    assert rls is False
    assert api_check(run_cli, s)["status"] == "OK"
    # Nothing for `secure` to do on what wsctl created itself.
    r = run_cli("secure", "--json", url=s.owner_url)
    assert r.code == 0 and r.json()["revocations"] == []
    assert r.json()["created_by_wsctl"] == sorted(PIPELINE_TABLES)


def test_an_adopted_database_keeps_its_grants_and_policies(run_cli, supa):
    s = supa
    adopt_legacy(s)
    before = acls(s)
    migrate_as_owner(run_cli, s)
    assert acls(s) == before
    assert reach(s, s.anon)["read_configs"] and reach(s, s.anon)["write_states"]
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM wsctl.created_tables").fetchone()[0] == 0


def test_only_the_tables_migrate_created_are_closed_and_recorded(run_cli, supa):
    """The dashboard made clients before wsctl: adopted, left as it was; the rest are wsctl's."""
    s = supa
    with psycopg.connect(s.owner_url, autocommit=True) as c:
        c.execute(
            "CREATE TABLE public.clients (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "
            "name text NOT NULL UNIQUE, created_at timestamptz NOT NULL DEFAULT now())"
        )
    migrate_as_owner(run_cli, s)
    assert can(s, s.anon, "INSERT INTO public.clients (name) VALUES ('x')")
    assert not reach(s, s.anon)["read_configs"]
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        created = [r[0] for r in c.execute("SELECT table_name FROM wsctl.created_tables")]
    assert sorted(created) == sorted(set(PIPELINE_TABLES) - {"clients"})


def test_the_record_survives_a_migrate_stopped_before_0010(run_cli, supa):
    """Written in 0001's own transaction: a run that stops after 0001 loses nothing."""
    from wsctl import db, migrations, settings

    s = supa
    early = [m for m in migrations.load_migrations() if m.version < 10]
    with db.connect(s.owner_url, settings.Settings(database_url=s.owner_url, url_source="t")) as c:
        migrations.migrate(c, migrations=early)
    assert not any(reach(s, s.anon).values())
    migrate_as_owner(run_cli, s)  # 0010 adopts the table the runner made
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        n = c.execute("SELECT count(*) FROM wsctl.created_tables").fetchone()[0]
    assert n == len(PIPELINE_TABLES)


def test_a_fresh_database_needs_create_on_schema_public(run_cli, supa):
    """PostgreSQL 15: owning nothing yet and CREATE on the database is not enough."""
    s = supa
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        c.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(_ident(s.owner)))
    r = run_cli("migrate", url=s.owner_url)
    errors = [ln for ln in r.err.splitlines() if ln.startswith("wsctl: error:")]
    assert r.code == 1 and len(errors) == 1
    assert "0001_base_schema.sql failed: permission denied for schema public" in errors[0]
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        assert c.execute("SELECT to_regclass('public.clients')").fetchone()[0] is None
        assert c.execute("SELECT to_regclass('wsctl.created_tables')").fetchone()[0] is None
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(_ident(s.owner)))
    migrate_as_owner(run_cli, s)
    assert not any(reach(s, s.anon).values())


# --- 2. doctor api_exposure and wsctl secure -------------------------------------------------


def test_secure_prints_then_applies_the_lock_down_idempotently(run_cli, supa):
    s = supa
    adopt_legacy(s)
    migrate_as_owner(run_cli, s)
    check = api_check(run_cli, s)
    assert check["status"] == "FAIL"
    assert f"{s.anon} can read public.client_workflow_configs" in check["detail"]
    assert "wsctl secure --apply" in check["hint"]
    before = acls(s)

    printed = run_cli("secure", url=s.owner_url)
    assert printed.code == 0, printed.err
    assert "nothing changed" in printed.out
    assert f'REVOKE ALL ON TABLE public.client_workflow_configs FROM "{s.anon}";' in printed.out
    assert (
        f"would lose: a dashboard or app using the {s.anon} role can no longer read, insert, "
        "update or delete public.batch_items, public.batches, public.client_workflow_configs"
    ) in printed.out
    assert acls(s) == before  # printing changes nothing

    r = run_cli("secure", "--apply", "--json", url=s.owner_url)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["applied"] is True and doc["changed"] is True
    revoked = {(x["role"], x["object"]) for x in doc["revocations"]}
    assert {(s.anon, f"public.{t}") for t in PIPELINE_TABLES} <= revoked
    assert (s.authenticated, "public.client_workflow_configs") in revoked
    assert (s.authenticated, "public.batches") not in revoked
    assert doc["losses"] and doc["remaining"] == []

    anon, auth = reach(s, s.anon), reach(s, s.authenticated)
    assert not any(anon.values())
    assert not auth["read_configs"]
    assert auth["read_batches"] and auth["write_states"]  # only the configs are taken from it
    after = acls(s)
    assert after["policies"] == before["policies"]  # never drops or changes a policy
    assert api_check(run_cli, s)["status"] == "OK"

    again = run_cli("secure", "--apply", url=s.owner_url)
    assert again.code == 0 and again.out.startswith("nothing to change")
    assert acls(s) == after


def test_secure_options_include_and_leave_roles_and_tables(run_cli, supa):
    s = supa
    adopt_legacy(s)
    migrate_as_owner(run_cli, s)
    r = run_cli(
        "secure",
        "--apply",
        "--json",
        "--leave-role",
        s.authenticated,
        "--leave-table",
        "batches",
        url=s.owner_url,
    )
    assert r.code == 0, r.err
    assert reach(s, s.authenticated)["read_configs"]
    assert reach(s, s.anon)["read_batches"]
    assert not reach(s, s.anon)["read_configs"]
    r = run_cli("secure", "--apply", "--json", "--role", s.authenticated, url=s.owner_url)
    assert r.code == 0, r.err
    auth = reach(s, s.authenticated)
    assert not auth["read_batches"] and not auth["write_states"] and not auth["read_configs"]
    assert reach(s, s.anon)["read_batches"] is False  # --leave-table was for that run only
    with psycopg.connect(s.owner_url, autocommit=True) as c:  # a dashboard's own table
        c.execute("CREATE TABLE public.dash_notes (id int)")
    assert can(s, s.anon, "INSERT INTO public.dash_notes VALUES (1)")
    r = run_cli("secure", "--apply", "--table", "dash_notes", url=s.owner_url)
    assert r.code == 0, r.err
    assert not can(s, s.anon, "INSERT INTO public.dash_notes VALUES (1)")
    bad = run_cli("secure", "--role", "no_such_role_" + uuid.uuid4().hex[:6], url=s.owner_url)
    assert bad.code == 2 and bad.err.count("\n") == 1 and "no role named" in bad.err
    bad = run_cli("secure", "--leave-table", "nope", url=s.owner_url)
    assert bad.code == 2 and "public.nope" in bad.err


def test_secure_says_what_a_role_still_reaches_through_another_role(run_cli, supa):
    """A grant held through a role anon belongs to is not anon's to revoke: said, not hidden."""
    s = supa
    migrate_as_owner(run_cli, s)
    dash = f"dash_{s.owner}"
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        c.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(_ident(dash)))
        try:
            c.execute(sql.SQL("ALTER ROLE {} INHERIT").format(_ident(s.anon)))
            c.execute(sql.SQL("GRANT {} TO {}").format(_ident(dash), _ident(s.anon)))
            c.execute(
                sql.SQL("GRANT SELECT ON public.client_workflow_configs TO {}").format(_ident(dash))
            )
            r = run_cli("secure", "--apply", "--json", url=s.owner_url)
            assert r.code == 0, r.err
            assert r.json()["remaining"] == [
                f"{s.anon} can still SELECT public.client_workflow_configs "
                "(through PUBLIC or a role it belongs to)"
            ]
            assert api_check(run_cli, s)["status"] == "FAIL"
        finally:
            c.execute(sql.SQL("DROP OWNED BY {}").format(_ident(dash)))
            c.execute(sql.SQL("DROP ROLE {}").format(_ident(dash)))


def test_doctor_warns_on_authenticated_reading_configs_without_a_policy(run_cli, supa):
    s = supa
    migrate_as_owner(run_cli, s)
    with psycopg.connect(s.owner_url, autocommit=True) as c:
        c.execute(
            sql.SQL("GRANT SELECT ON public.client_workflow_configs TO {}").format(
                _ident(s.authenticated)
            )
        )
    check = api_check(run_cli, s)
    assert check["status"] == "WARN"
    assert "no row level security policy" in check["detail"]
    with psycopg.connect(s.owner_url, autocommit=True) as c:
        c.execute("ALTER TABLE public.client_workflow_configs ENABLE ROW LEVEL SECURITY")
        c.execute(
            sql.SQL(
                "CREATE POLICY own ON public.client_workflow_configs FOR SELECT TO {} USING (false)"
            ).format(_ident(s.authenticated))
        )
    assert api_check(run_cli, s)["status"] == "OK"
    # anon granted SELECT: RLS on and no policy for it lets no row through...
    with psycopg.connect(s.owner_url, autocommit=True) as c:
        c.execute(
            sql.SQL("GRANT SELECT ON public.client_workflow_configs TO {}").format(_ident(s.anon))
        )
    assert api_check(run_cli, s)["status"] == "OK"
    # ...a policy that applies to it does; a write anywhere FAILs too.
    with psycopg.connect(s.owner_url, autocommit=True) as c:
        c.execute(
            "CREATE POLICY everyone ON public.client_workflow_configs FOR SELECT USING (true)"
        )
        c.execute(sql.SQL("GRANT UPDATE ON public.workflow_states TO {}").format(_ident(s.anon)))
    check = api_check(run_cli, s)
    assert check["status"] == "FAIL"
    assert f"{s.anon} can write public.workflow_states (UPDATE)" in check["detail"]
    assert f"{s.anon} can read public.client_workflow_configs" in check["detail"]


def test_secure_waits_a_bounded_time_for_a_lock_and_changes_nothing(run_cli, supa):
    s = supa
    adopt_legacy(s)
    migrate_as_owner(run_cli, s)
    before = acls(s)
    with psycopg.connect(s.owner_url) as holder:  # an open transaction that changed a grant
        holder.execute(
            sql.SQL("GRANT SELECT ON public.workflow_states TO {}").format(_ident(s.service_role))
        )
        r = run_cli("secure", "--apply", "--lock-timeout", "300ms", url=s.owner_url)
        holder.rollback()
    assert r.code == 1
    assert r.err.count("\n") == 1 and "waited over 300ms" in r.err and "nothing changed" in r.err
    assert acls(s) == before


# --- 3. wsctl's own schema, whatever default privileges say ----------------------------------


def test_wsctl_schema_stays_closed_under_global_default_privileges(run_cli, supa):
    s = supa
    global_default_privileges(s)
    migrate_as_owner(run_cli, s)
    for role in (s.anon, s.authenticated):
        r = reach(s, role)
        assert not r["wsctl_table"] and not r["complete_step"], role
        assert not can(s, role, "SELECT * FROM wsctl.schema_migrations")
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        grantees = c.execute(
            "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END"
            " FROM (SELECT nspacl AS acl FROM pg_namespace WHERE nspname = 'wsctl'"
            "       UNION ALL SELECT relacl FROM pg_class WHERE relnamespace = 'wsctl'::regnamespace"
            "       UNION ALL SELECT coalesce(proacl, acldefault('f', proowner)) FROM pg_proc"
            "                 WHERE pronamespace = 'wsctl'::regnamespace) o,"
            " aclexplode(o.acl) a"
        ).fetchall()
    assert {g[0] for g in grantees} == {s.owner}
    assert api_check(run_cli, s)["status"] == "OK"


def test_objects_a_later_migration_creates_are_closed_and_granted_to_worker_roles(
    run_cli, supa, tmp_path
):
    from wsctl import db, migrations, settings

    s = supa
    global_default_privileges(s)
    migrate_as_owner(run_cli, s)
    assert run_cli("secure", "grant-worker", s.worker, url=s.owner_url).code == 0
    with psycopg.connect(s.admin_url, autocommit=True) as c:  # and defaults IN SCHEMA wsctl
        for kind in ("TABLES", "FUNCTIONS"):
            c.execute(
                sql.SQL(
                    "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA wsctl GRANT ALL ON {} TO {}"
                ).format(_ident(s.owner), sql.SQL(kind), _ident(s.authenticated))
            )
    later = tmp_path / "9990_later_feature.sql"
    later.write_text(
        "CREATE TABLE wsctl.step_counters (step text PRIMARY KEY, n bigint NOT NULL DEFAULT 0);\n"
        "CREATE FUNCTION wsctl.bump(s text) RETURNS void LANGUAGE sql AS\n"
        "$$ INSERT INTO wsctl.step_counters VALUES (s, 1)\n"
        "   ON CONFLICT (step) DO UPDATE SET n = step_counters.n + 1 $$;\n"
        f"GRANT SELECT ON wsctl.step_counters TO {s.service_role};\n"  # explicit: it stays
    )
    shipped = migrations.load_migrations()
    extra = migrations.load_migrations(tmp_path)
    with db.connect(s.owner_url, settings.Settings(database_url=s.owner_url, url_source="t")) as c:
        migrations.migrate(c, migrations=shipped + extra)
    for role in (s.anon, s.authenticated):
        assert not can(s, role, "SELECT * FROM wsctl.step_counters")
        assert not can(s, role, "SELECT wsctl.bump('x')")
    assert can(s, s.worker, "SELECT wsctl.bump('x')")
    with psycopg.connect(s.admin_url, autocommit=True) as c:  # (it has no USAGE on wsctl)
        probe = "SELECT has_table_privilege(%s, 'wsctl.step_counters', 'SELECT')"
        assert c.execute(probe, (s.service_role,)).fetchone()[0] is True
    assert not can(s, s.service_role, "SELECT wsctl.bump('x')")  # PUBLIC's EXECUTE is gone


def test_migration_0010_takes_back_what_default_privileges_gave_on_older_objects(run_cli, supa):
    """A database migrated before this change: wsctl's objects carry the global defaults."""
    from wsctl import db, migrations, settings

    s = supa
    global_default_privileges(s)
    from wsctl.queries import q

    old = [m for m in migrations.load_migrations() if m.version < 10]
    with psycopg.connect(s.owner_url, autocommit=True) as c:  # what an older wsctl did
        c.execute(q("migrations_bootstrap"))
        for m in old:
            c.execute(m.sql.replace("CONCURRENTLY", ""))
            c.execute(
                "INSERT INTO wsctl.schema_migrations (version, name, checksum, duration_ms) "
                "VALUES (%s, %s, %s, 0)",
                (m.version, m.name, m.checksum),
            )
    assert can(s, s.anon, "SELECT * FROM wsctl.batch_dedupe_keys")
    assert can(s, s.anon, "SELECT wsctl.complete_step(%s)", (str(uuid.uuid4()),))
    with db.connect(s.owner_url, settings.Settings(database_url=s.owner_url, url_source="t")) as c:
        applied = migrations.migrate(c).applied
    assert [a["version"] for a in applied] == [
        m.version for m in migrations.load_migrations() if m.version >= 10
    ]
    for role in (s.anon, s.authenticated):
        r = reach(s, role)
        assert not r["wsctl_table"] and not r["complete_step"], role
    # The adopted pipeline tables were left as they were.
    assert reach(s, s.anon)["read_configs"]


# --- the worker role ----------------------------------------------------------------------


def seed(s: Supa) -> dict:
    from wsctl import catalog
    from wsctl.queries import example_path

    with psycopg.connect(s.owner_url, autocommit=True) as c:
        catalog.import_registry(c, example_path("registry.toml"))
        client = c.execute("INSERT INTO clients (name) VALUES ('acme') RETURNING id").fetchone()[0]
        c.execute(
            "INSERT INTO client_workflow_configs (client_id, workflow_slug, workstream_slug, config)"
            " VALUES (%s, %s, 'apollo_scrape', '{\"clay_table\": \"t\"}')",
            (client, ENRICH),
        )
        batch = c.execute(
            "INSERT INTO batches (client_id, blueprint, workstream_slug) "
            "VALUES (%s, %s, 'apollo_scrape') RETURNING id",
            (client, [NORMALIZE, ENRICH]),
        ).fetchone()[0]
        item = c.execute(
            "INSERT INTO batch_items (batch_id) VALUES (%s) RETURNING id", (batch,)
        ).fetchone()[0]
        state = c.execute(
            "INSERT INTO workflow_states (item_id, batch_id, step_name) VALUES (%s, %s, %s) "
            "RETURNING id",
            (item, batch, NORMALIZE),
        ).fetchone()[0]
    return {"item": str(item), "state": str(state), "batch": batch}


def test_grant_worker_lets_the_worker_helpers_run_as_that_role(run_cli, supa, monkeypatch):
    from wsctl import worker

    s = supa
    global_default_privileges(s)
    migrate_as_owner(run_cli, s)
    world = seed(s)
    monkeypatch.setenv("WSCTL_DATABASE_URL", s.worker_url)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        worker.get_workstream_slug(world["item"])
    r = run_cli("secure", "grant-worker", s.worker, "--json", url=s.owner_url)
    assert r.code == 0, r.err
    assert any("wsctl.complete_step" in x for x in r.json()["statements"])
    assert worker.get_workstream_slug(world["item"]) == "apollo_scrape"
    assert worker.get_client_config(world["item"], ENRICH, "apollo_scrape") == {"clay_table": "t"}
    assert worker.complete_step(world["state"]) is True
    assert worker.complete_step(world["state"]) is False  # idempotent
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        rows = c.execute(
            "SELECT step_name, status FROM workflow_states WHERE batch_id = %s ORDER BY step_name",
            (world["batch"],),
        ).fetchall()
    assert rows == [(ENRICH, "PENDING"), (NORMALIZE, "COMPLETED")]
    assert worker.fail_step(str(uuid.uuid4()), "nope") is False
    # Granting again changes nothing and fails nothing; the worker still reads no wsctl bookkeeping.
    assert run_cli("secure", "grant-worker", s.worker, url=s.owner_url).code == 0
    assert not can(s, s.worker, "SELECT * FROM wsctl.worker_roles")


def test_grant_worker_refuses_an_api_role_and_an_unknown_one(run_cli, supa):
    s = supa
    migrate_as_owner(run_cli, s)
    r = run_cli("secure", "grant-worker", s.anon, url=s.owner_url)
    assert r.code == 2 and "Data API role" in r.err and r.err.count("\n") == 1
    r = run_cli("secure", "grant-worker", "nobody_" + uuid.uuid4().hex[:6], url=s.owner_url)
    assert r.code == 1 and "no role named" in r.err
    assert not can(s, s.anon, "SELECT wsctl.complete_step(%s)", (str(uuid.uuid4()),))


def test_grant_worker_waits_a_bounded_time_for_a_lock_and_grants_nothing(run_cli, supa):
    s = supa
    migrate_as_owner(run_cli, s)
    with psycopg.connect(s.owner_url) as holder:  # an open transaction that changed a grant
        holder.execute(
            sql.SQL("GRANT SELECT ON public.workflow_states TO {}").format(_ident(s.service_role))
        )
        r = run_cli("secure", "grant-worker", s.worker, "--lock-timeout", "300ms", url=s.owner_url)
        holder.rollback()
    assert r.code == 1
    assert r.err.count("\n") == 1 and "nothing granted" in r.err
    assert not can(s, s.worker, "SELECT * FROM public.clients")
    with psycopg.connect(s.admin_url, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM wsctl.worker_roles").fetchone()[0] == 0


def test_a_batch_create_by_the_owner_works_on_the_closed_tables(run_cli, supa, tmp_path):
    """The owner writes through privileges it holds as owner: no RLS got in its way."""
    s = supa
    migrate_as_owner(run_cli, s)
    seed(s)
    items = tmp_path / "items.csv"
    items.write_text("name\na\nb\n")
    r = run_cli(
        "batch",
        "create",
        "--client",
        "acme",
        "--workstream",
        "apollo_scrape",
        "--blueprint",
        NORMALIZE,
        "--items",
        str(items),
        "--json",
        url=s.owner_url,
    )
    assert r.code == 0, r.err
    assert r.json()["items"] == 2
    assert r.json()["fk_checks"] == "server"  # a plain owner may not set the parameter
