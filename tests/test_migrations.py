"""wsctl migrate against a real PostgreSQL: fresh, concurrent, changed, adopted, locked down."""

from __future__ import annotations

import os
import subprocess
import time

import psycopg
import pytest

from tests.conftest import table_snapshot, url_for
from tests.support.commands import wsctl_argv
from wsctl import db, migrations, settings
from wsctl.errors import OperationalError


def _settings(url: str) -> settings.Settings:
    return settings.Settings(database_url=url, url_source="test")


def test_fresh_database_is_migrated_and_status_is_clean(fresh_db, run_cli):
    url, _ = fresh_db
    r = run_cli("migrate", "--status", "--json", url=url)
    assert r.code == 1
    doc = r.json()
    assert doc["applied"] == []
    assert [p["version"] for p in doc["pending"]] == [
        m.version for m in migrations.load_migrations()
    ]

    r = run_cli("migrate", url=url)
    assert r.code == 0, r.err
    assert "applied 0001_base_schema" in r.out

    r = run_cli("migrate", "--status", "--json", url=url)
    assert r.code == 0
    doc = r.json()
    assert doc["pending"] == [] and doc["changed"] == []
    assert {"version", "name", "checksum", "applied_at"} <= set(doc["applied"][0])

    r = run_cli("migrate", url=url)
    assert r.code == 0 and "nothing to apply" in r.out


def test_fresh_schema_matches_legacy_shape(db_url, legacy_url):
    """0001 builds exactly the legacy tables: same columns, types, nullability, defaults."""
    q = """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name = ANY(%s)
        ORDER BY table_name, column_name
    """
    legacy_cols = {
        "id",
        "name",
        "created_at",
        "slug",
        "workstream_slug",
        "type",
        "modal_sender_fn",
        "modal_receiver_fn",
        "client_id",
        "workflow_slug",
        "config",
        "updated_at",
        "blueprint",
        "status",
        "batch_id",
        "data",
        "item_id",
        "step_name",
    }
    tables = [
        "clients",
        "enrichment_registry",
        "client_workflow_configs",
        "batches",
        "batch_items",
        "workflow_states",
    ]
    with psycopg.connect(db_url) as a, psycopg.connect(legacy_url) as b:
        ours = [r for r in a.execute(q, (tables,)).fetchall()]
        theirs = b.execute(q, (tables,)).fetchall()
        # Every legacy column exists in the migrated database with the same definition.
        ours_by_key = {(r[0], r[1]): r for r in ours}
        for row in theirs:
            if (row[0], row[1]) in (("batch_items", "id"), ("workflow_states", "id")):
                # migration 0014: a time-ordered (UUIDv7) default instead of gen_random_uuid()
                ours_row = ours_by_key[(row[0], row[1])]
                assert ours_row[:4] == row[:4] and "clock_timestamp()" in ours_row[4]
                continue
            assert ours_by_key[(row[0], row[1])] == row
        added = {(r[0], r[1]) for r in ours} - {(r[0], r[1]) for r in theirs}
        assert all(c not in legacy_cols or t == "batches" for t, c in added)
        cons = """
            SELECT conrelid::regclass::text, contype, pg_get_constraintdef(oid)
            FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype <> 'n'
            ORDER BY 1, 2, 3
        """
        assert a.execute(cons).fetchall() == b.execute(cons).fetchall()


def test_four_concurrent_migrates_each_record_once(fresh_db):
    url, _ = fresh_db
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WSCTL_DATABASE_URL")}
    procs = [
        subprocess.Popen(
            wsctl_argv(url, "migrate", "--lock-timeout", "60"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [r[0] for r in results] == [0, 0, 0, 0], results
    assert sum("applied 0001" in r[1] for r in results) == 1
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT version, count(*) FROM wsctl.schema_migrations GROUP BY 1"
        ).fetchall()
    assert sorted(rows) == [(m.version, 1) for m in migrations.load_migrations()]


def test_changed_checksum_stops_migrate_naming_the_file(db_url, run_cli):
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("UPDATE wsctl.schema_migrations SET checksum = 'deadbeef' WHERE version = 2")
    r = run_cli("migrate", url=db_url)
    assert r.code == 1
    assert "0002_add_workstream_slug_to_batches.sql" in r.err
    assert len(r.err.strip().splitlines()) == 1
    r = run_cli("migrate", "--status", "--json", url=db_url)
    assert r.code == 1
    assert [c["version"] for c in r.json()["changed"]] == [2]
    # Other commands refuse a database whose history disagrees with the files.
    from wsctl.errors import EnvError

    with psycopg.connect(db_url) as c, pytest.raises(EnvError, match="0002_add_workstream"):
        migrations.require_up_to_date(c)


def test_dry_run_prints_sql_and_changes_nothing(fresh_db, run_cli):
    url, _ = fresh_db
    r = run_cli("migrate", "--dry-run", url=url)
    assert r.code == 0
    assert "-- 0001_base_schema.sql" in r.out
    assert "CREATE TABLE IF NOT EXISTS public.batches" in r.out
    with psycopg.connect(url) as c:
        n = c.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname IN ('public', 'wsctl')"
        ).fetchone()[0]
        assert n == 0
        assert (
            c.execute("SELECT count(*) FROM pg_namespace WHERE nspname='wsctl'").fetchone()[0] == 0
        )


def history(url: str) -> list:
    with psycopg.connect(url) as c:
        return c.execute("SELECT * FROM wsctl.schema_migrations ORDER BY version").fetchall()


@pytest.mark.parametrize("also_pending", [False, True])
def test_dry_run_refuses_a_changed_file_as_migrate_does(db_url, run_cli, also_pending):
    """--dry-run must not say "nothing pending" (exit 0) where `migrate` stops with exit 1."""
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("UPDATE wsctl.schema_migrations SET checksum = 'deadbeef' WHERE version = 2")
        if also_pending:  # and one file still to apply: its SQL is not printed either
            last = max(m.version for m in migrations.load_migrations())
            c.execute("DELETE FROM wsctl.schema_migrations WHERE version = %s", (last,))
    before = history(db_url)
    real = run_cli("migrate", url=db_url)
    assert real.code == 1
    for args in (("--dry-run",), ("--dry-run", "--json")):
        dry = run_cli("migrate", *args, url=db_url)
        assert dry.code == real.code == 1, dry.out
        assert dry.err == real.err
        assert "0002_add_workstream_slug_to_batches.sql changed after it was applied" in dry.err
        assert len(dry.err.strip().splitlines()) == 1
        assert dry.out == ""
    assert history(db_url) == before
    with psycopg.connect(db_url) as c, pytest.raises(OperationalError, match="0002_add_work"):
        migrations.pending_sql(c)


def test_unmigrated_database_is_an_environment_error(fresh_db):
    from wsctl.errors import EnvError

    url, _ = fresh_db
    with psycopg.connect(url) as c, pytest.raises(EnvError, match="not up to date") as info:
        migrations.require_up_to_date(c)
    assert info.value.exit_code == 3 and "wsctl migrate" in info.value.one_line()


def test_transaction_pooler_is_refused(run_cli, tmp_path):
    r = run_cli("migrate", url="postgresql://app:s3cret@db.example.invalid:6543/postgres")
    assert r.code == 3
    assert "5432" in r.err and "s3cret" not in r.err
    (tmp_path / "wsctl.toml").write_text(
        '[database]\nurl = "postgresql://app:pw@127.0.0.1:5999/x"\npooler = "transaction"\n'
    )
    r = run_cli("migrate")
    assert r.code == 3 and "pooler" in r.err


def test_unreachable_database_masks_password(run_cli):
    r = run_cli("migrate", url="postgresql://app:hunter2@127.0.0.1:1/nope?connect_timeout=2")
    assert r.code == 3
    assert "hunter2" not in r.err and "***" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert "Traceback" not in r.err


def test_invalid_concurrent_index_is_rebuilt(fresh_db, tmp_path):
    url, _ = fresh_db
    d = tmp_path / "migs"
    d.mkdir()
    (d / "0001_t.sql").write_text("CREATE TABLE t (v int);\nINSERT INTO t VALUES (1), (1);\n")
    (d / "0002_idx.sql").write_text(
        "-- wsctl:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_v_uniq ON t (v);\n"
    )
    migs = migrations.load_migrations(d)
    assert not migs[1].transactional
    with db.connect(url, _settings(url)) as c:
        with pytest.raises(Exception, match="0002_idx.sql"):
            migrations.migrate(c, migrations=migs)
        valid = c.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_v_uniq'::regclass")
        assert valid.fetchone()[0] is False
        c.execute("DELETE FROM t")
        result = migrations.migrate(c, migrations=migs)
        assert result.rebuilt_indexes == ["t_v_uniq"]
        assert [a["version"] for a in result.applied] == [2]
        valid = c.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_v_uniq'::regclass")
        assert valid.fetchone()[0] is True


def test_lock_timeout_when_another_run_holds_the_lock(db_url):
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrations.LOCK_KEY,))
        with db.connect(db_url, _settings(db_url)) as c:
            with pytest.raises(Exception, match="lock"):
                migrations.migrate(c, lock_timeout=0.3)


def _seed_legacy_rows(c: psycopg.Connection) -> None:
    c.execute("""
        INSERT INTO clients (id, name) VALUES ('00000000-0000-0000-0000-00000000000a', 'acme');
        INSERT INTO enrichment_registry (slug, workstream_slug, type, modal_sender_fn)
        VALUES ('normalize_all_core_values', 'apollo_scrape', 'sync', 'start_normalize_all_core_values');
        INSERT INTO client_workflow_configs (client_id, workflow_slug, workstream_slug, config)
        VALUES ('00000000-0000-0000-0000-00000000000a', 'normalize_all_core_values', 'apollo_scrape',
                '{"k": 1}');
        INSERT INTO batches (id, client_id, blueprint, status)
        VALUES ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-00000000000a',
                ARRAY['normalize_all_core_values'], 'RUNNING');
        INSERT INTO batch_items (id, batch_id, data)
        VALUES ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-0000000000b1',
                '{"Company": "Acme, Inc."}');
        INSERT INTO workflow_states (item_id, batch_id, step_name, status)
        VALUES ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-0000000000b1',
                'normalize_all_core_values', 'DISPATCHED');
    """)


def test_adopts_production_database_as_non_superuser(legacy_url, pg_admin_url, run_cli):
    """Rows, an extra dashboard column, RLS, a non-superuser owner: migrate changes no row."""
    role = "wsctl_mig_" + os.urandom(4).hex()
    with psycopg.connect(legacy_url, autocommit=True) as c:
        c.execute("ALTER TABLE batches ADD COLUMN dashboard_note text DEFAULT 'from ui'")
        _seed_legacy_rows(c)
        c.execute("ALTER TABLE batch_items ENABLE ROW LEVEL SECURITY")
        c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD 'pw'")
        dbname = c.execute("SELECT current_database()").fetchone()[0]
        c.execute(f'GRANT CREATE, CONNECT ON DATABASE "{dbname}" TO {role}')
        c.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {role}")
        for t in (
            "clients",
            "enrichment_registry",
            "client_workflow_configs",
            "batches",
            "batch_items",
            "workflow_states",
        ):
            c.execute(f"ALTER TABLE {t} OWNER TO {role}")
        before = table_snapshot(c)
    try:
        role_url = url_for(legacy_url, dbname, user=role, password="pw")
        with psycopg.connect(role_url) as rc:
            assert (
                rc.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[
                    0
                ]
                is False
            )
        r = run_cli("migrate", url=role_url)
        assert r.code == 0, r.err
        with psycopg.connect(legacy_url) as c:
            after = table_snapshot(c)
            # New columns appear on workflow_states; every old key and value is unchanged.
            for table, rows in before.items():
                import json

                old = [json.loads(x) for x in rows]
                new = [json.loads(x) for x in after[table]]
                assert len(old) == len(new)
                for o, n in zip(
                    sorted(old, key=lambda x: x["id"]),
                    sorted(new, key=lambda x: x["id"]),
                    strict=True,
                ):
                    assert {k: n[k] for k in o} == o
            assert c.execute(
                "SELECT relrowsecurity FROM pg_class WHERE relname = 'batch_items'"
            ).fetchone()[0]
            assert c.execute("SELECT dashboard_note FROM batches").fetchone()[0] == "from ui"
        r = run_cli("migrate", "--status", url=role_url)
        assert r.code == 0
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            c.execute(f"DROP ROLE IF EXISTS {role}")


def test_adopts_database_where_seed_sql_ran_by_hand(legacy_url, run_cli):
    with psycopg.connect(legacy_url, autocommit=True) as c:
        _seed_legacy_rows(c)
        c.execute("ALTER TABLE public.batches ADD COLUMN workstream_slug TEXT")
        c.execute("CREATE INDEX idx_batches_workstream_slug ON public.batches(workstream_slug)")
        c.execute("UPDATE batches SET workstream_slug = 'apollo_scrape'")
    r = run_cli("migrate", url=legacy_url)
    assert r.code == 0, r.err
    with psycopg.connect(legacy_url) as c:
        assert c.execute("SELECT workstream_slug FROM batches").fetchall() == [("apollo_scrape",)]


def test_supabase_roles_cannot_reach_wsctl_objects(fresh_db, run_cli):
    url, dbname = fresh_db
    with psycopg.connect(url, autocommit=True) as c:
        for role in ("anon", "authenticated"):
            c.execute(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') "
                f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$"
            )
            c.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
            c.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {role}")
            c.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO {role}")
            c.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO {role}")
    r = run_cli("migrate", url=url)
    assert r.code == 0, r.err
    with psycopg.connect(url, autocommit=True) as c:
        tables = [
            r[0]
            for r in c.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname='wsctl'"
            )
        ]
        funcs = [
            r[0]
            for r in c.execute(
                "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'wsctl'::regnamespace"
            )
        ]
        assert "wsctl.schema_migrations" in tables and funcs
        for role in ("anon", "authenticated"):
            assert not c.execute(
                "SELECT has_schema_privilege(%s, 'wsctl', 'USAGE')", (role,)
            ).fetchone()[0]
            for t in tables:
                assert not c.execute(
                    "SELECT has_table_privilege(%s, %s, 'SELECT')", (role, t)
                ).fetchone()[0]
            for f in funcs:
                assert not c.execute(
                    "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, f)
                ).fetchone()[0], f
        # And really: as anon, reading the history fails.
        c.execute("SET ROLE anon")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM wsctl.schema_migrations")
        c.execute("RESET ROLE")


def test_ddl_waiting_behind_a_long_transaction_gives_up_and_applies_nothing(fresh_db):
    url, _ = fresh_db
    migs = migrations.load_migrations()
    with db.connect(url, _settings(url)) as c:
        migrations.migrate(c, migrations=migs[:2])
    with psycopg.connect(url) as report:  # a long report holding a lock on workflow_states
        report.execute("SELECT count(*) FROM workflow_states")
        with db.connect(url, _settings(url)) as c:
            with pytest.raises(OperationalError, match="0003_dispatch_bookkeeping.sql waited"):
                migrations.migrate(c, migrations=migs, ddl_lock_timeout="300ms")
            assert [r[0] for r in c.execute("SELECT version FROM wsctl.schema_migrations")] == [
                1,
                2,
            ]
            cols = c.execute(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_name = 'workflow_states' AND column_name = 'claim_token'"
            ).fetchone()[0]
            assert cols == 0
        report.rollback()
    with db.connect(url, _settings(url)) as c:
        assert [a["version"] for a in migrations.migrate(c, migrations=migs).applied] == [
            m.version for m in migs[2:]
        ]


def test_invalid_index_is_found_and_rebuilt_whatever_the_search_path(fresh_db, run_cli):
    """Issue 11 item 7: with the database's search_path = pg_catalog, an index a failed
    concurrent build left INVALID is still found (schema-qualified lookups) and rebuilt."""
    url, name = fresh_db
    migs = migrations.load_migrations()
    first_concurrent = next(m.version for m in migs if m.version > 3 and not m.transactional)
    assert first_concurrent == 4
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f'ALTER DATABASE "{name}" SET search_path = pg_catalog')
    with db.connect(url, _settings(url)) as c:
        assert c.execute("SHOW search_path").fetchone()[0] == "pg_catalog"
        migrations.migrate(c, migrations=[m for m in migs if m.version < first_concurrent])
    with psycopg.connect(url, autocommit=True) as c:
        # A concurrent build of 0004's index name that fails (duplicate keys) leaves it
        # INVALID, as a killed `migrate` during the build would.
        c.execute(
            "INSERT INTO public.clients (id, name) VALUES ('00000000-0000-0000-0000-00000000000a', 'a');"
            "INSERT INTO public.batches (id, client_id, blueprint) VALUES"
            " ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-00000000000a',"
            " ARRAY['s']);"
            "INSERT INTO public.batch_items (id, batch_id, data) SELECT gen_random_uuid(),"
            " '00000000-0000-0000-0000-0000000000b1', '{}' FROM generate_series(1, 2);"
            "INSERT INTO public.workflow_states (item_id, batch_id, step_name, status)"
            " SELECT id, batch_id, 's', 'PENDING' FROM public.batch_items"
        )
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY idx_workflow_states_claim_pending"
                " ON public.workflow_states (step_name)"
            )
        valid = "SELECT indisvalid, indisunique FROM pg_catalog.pg_index WHERE indexrelid ="
        valid += " 'public.idx_workflow_states_claim_pending'::pg_catalog.regclass"
        assert c.execute(valid).fetchone() == (False, True)
    r = run_cli("migrate", url=url)
    assert r.code == 0, r.err
    assert "rebuilt invalid index idx_workflow_states_claim_pending" in r.err
    with psycopg.connect(url, autocommit=True) as c:
        assert c.execute(valid).fetchone() == (True, False)  # 0004's own definition, valid
        history = c.execute("SELECT version FROM wsctl.schema_migrations ORDER BY 1").fetchall()
    assert [v for (v,) in history] == [m.version for m in migs]


def test_concurrent_index_names_carry_their_tables_schema():
    found = migrations._concurrent_indexes(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON public.t (v);\n"
        'CREATE UNIQUE INDEX CONCURRENTLY "b_idx" ON ONLY "s2" . "t" (v);\n'
        "CREATE INDEX CONCURRENTLY c_idx ON t (v);\n"
    )
    assert found == [("public", "a_idx"), ("s2", "b_idx"), (None, "c_idx")]


def test_a_concurrent_build_waiting_for_a_lock_is_cancelled_and_leaves_no_session_state(fresh_db):
    """CREATE INDEX CONCURRENTLY cannot run in a transaction, so no SET LOCAL bounds it: the
    watchdog cancels it once it has waited --ddl-lock-timeout, and migrate sets nothing on
    its session (no lock_timeout, no advisory lock) either way."""
    url, _ = fresh_db
    migs = migrations.load_migrations()
    with db.connect(url, _settings(url)) as c:
        migrations.migrate(c, migrations=migs[:1])
        with psycopg.connect(url) as holder:
            holder.execute("LOCK TABLE public.batches IN SHARE UPDATE EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(OperationalError, match="0002_add_workstream_slug_to_batches.sql w"):
                migrations.migrate(c, migrations=migs[:2], ddl_lock_timeout="300ms")
            assert time.monotonic() - started < 3
            holder.rollback()
        assert c.execute("SHOW lock_timeout").fetchone()[0] == "0"
        assert (
            c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]
            == 0
        )
        assert [r[0] for r in c.execute("SELECT version FROM wsctl.schema_migrations")] == [1]
        result = migrations.migrate(c, migrations=migs[:2])
        assert [a["version"] for a in result.applied] == [2]
        valid = "SELECT indisvalid FROM pg_index WHERE indexrelid ="
        valid += " 'public.idx_batches_workstream_slug'::regclass"
        assert c.execute(valid).fetchone()[0] is True
