"""`wsctl doctor`: every check's OK and its WARN/FAIL, on a real PostgreSQL.

The bad situations are set up with plain SQL; Modal lookups go through the
real ``modal`` client against the loopback stand-in, never the real Modal.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import table_snapshot
from tests.support import factories as f
from tests.support.modal_standin import ModalStandIn, reset_modal_client
from wsctl.doctor import doctor

STEPS = ["normalize_all_core_values", "enrich_company_via_waterfall_in_clay"]
APP = "enrichment-worker"
CHECKS = [
    "database",
    "schema",
    "legacy_batches",
    "unregistered_states",
    "missing_configs",
    "plaintext_credentials",
    "expired_leases",
    "stale_dispatched",
    "limit_keys",
    "clay_webhooks",
    "states_bloat",
    "vacuum_horizon",
    "prune_candidates",
    "api_exposure",
    "modal_credentials",
]
DATA_CHECKS = CHECKS[2:14]


@pytest.fixture
def no_modal_token(monkeypatch):
    import modal.config

    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setattr(modal.config, "_user_config", {})


@pytest.fixture
def modal_token(monkeypatch):
    import modal.config

    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-doctor-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-doctor-test")
    monkeypatch.setattr(modal.config, "_user_config", {})


@pytest.fixture
def healthy(conn):
    """Registry for two workstreams, configs for every step, one active batch per workstream."""
    f.register_seed(conn)
    client = f.add_client(conn, "acme")
    for ws in ("apollo_scrape", "linkedin_scrape"):
        for step in STEPS:
            f.add_config(conn, client, step, ws, {"ws": ws})
        f.add_batch(conn, client, STEPS, 3, workstream=ws)
    return client


def checks_of(result) -> dict[str, dict]:
    doc = result.json()
    return {c["name"]: c for c in doc["checks"]}


def statuses(result) -> dict[str, str]:
    return {name: c["status"] for name, c in checks_of(result).items()}


# --- all OK, the JSON shape, the human output ---------------------------------------


def test_healthy_database_all_ok_exit_0(cli, healthy, modal_token):
    r = cli("doctor", "--json")
    assert r.code == 0, r.out + r.err
    doc = r.json()
    assert set(doc) == {"ok", "counts", "checks"}
    assert doc["ok"] is True
    assert doc["counts"] == {"OK": len(CHECKS), "WARN": 0, "FAIL": 0, "SKIP": 0}
    assert [c["name"] for c in doc["checks"]] == CHECKS
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail", "hint", "rows"}
        assert c["status"] == "OK" and c["hint"] is None and c["rows"] == []
        assert c["detail"] and "\n" not in c["detail"]
    assert "PostgreSQL" in doc["checks"][0]["detail"]


def test_human_output_is_a_table_and_a_summary(cli, healthy, no_modal_token):
    r = cli("doctor")
    assert r.code == 1  # the configured backend is modal (the default) and there is no token
    lines = r.out.splitlines()
    assert lines[0] == "status\tcheck\tdetail\thint"
    rows = [ln.split("\t") for ln in lines[1:-1]]
    assert [row[1] for row in rows] == CHECKS
    assert [row[0] for row in rows] == ["OK"] * 14 + ["FAIL"]
    assert rows[-1][3].startswith("modal token set")
    assert lines[-1] == "doctor: 14 OK, 1 FAIL"


# --- database reachable -----------------------------------------------------------


def test_unreachable_database_fails_without_raising(run_cli, no_modal_token):
    url = "postgresql://ops:s3cret-pw@127.0.0.1:1/nowhere"
    r = run_cli("doctor", "--json", "--backend", "local", url=url)
    assert r.code == 1
    assert "s3cret-pw" not in r.out + r.err
    checks = checks_of(r)
    db = checks["database"]
    assert db["status"] == "FAIL"
    assert "postgresql://ops:***@127.0.0.1:1/nowhere" in db["detail"]
    assert db["hint"]
    for name in ["schema", *DATA_CHECKS]:
        assert checks[name]["status"] == "SKIP"
        assert checks[name]["detail"] == "skipped: no database connection"
    assert checks["modal_credentials"]["status"] == "SKIP"  # the local backend needs none

    human = run_cli("doctor", "--backend", "local", url=url)
    assert human.code == 1 and "s3cret-pw" not in human.out + human.err
    assert human.out.splitlines()[1].startswith("FAIL\tdatabase\tcannot connect to ")


def test_library_reports_a_raising_factory_as_fail():
    def connect():
        raise OSError("embedded server failed to start")

    report = doctor(connect, backend="local")
    assert not report.ok
    assert report.get("database").status == "FAIL"
    assert "embedded server failed to start" in report.get("database").detail
    assert report.get("schema").status == "SKIP"


# --- schema up to date --------------------------------------------------------------


def test_unmigrated_database_fails_schema_and_skips_data_checks(run_cli, legacy_url, modal_token):
    import psycopg

    with psycopg.connect(legacy_url, autocommit=True) as c:
        before = table_snapshot(c)
        c.execute(
            "INSERT INTO clients (name) VALUES ('acme');"
            "INSERT INTO batches (client_id, blueprint) SELECT id, ARRAY['a'] FROM clients"
        )
        before = table_snapshot(c)
    r = run_cli("doctor", "--json", url=legacy_url)
    assert r.code == 1
    checks = checks_of(r)
    assert checks["database"]["status"] == "OK"
    assert checks["schema"]["status"] == "FAIL"
    assert "pending migration(s), first 0001_base_schema" in checks["schema"]["detail"]
    assert checks["schema"]["hint"].startswith("run `wsctl migrate`")
    assert {p["version"] for p in checks["schema"]["rows"]} >= {1, 2, 3, 4}
    for name in DATA_CHECKS:
        assert checks[name]["status"] == "SKIP"
        assert "schema is not migrated" in checks[name]["detail"]
    assert checks["modal_credentials"]["status"] == "OK"
    with psycopg.connect(legacy_url, autocommit=True) as c:
        assert table_snapshot(c) == before  # doctor wrote nothing, created no schema
        assert c.execute("SELECT to_regnamespace('wsctl')").fetchone()[0] is None


def test_empty_database_fails_schema(run_cli, fresh_db, modal_token):
    url, _ = fresh_db
    r = run_cli("doctor", "--json", url=url)
    assert r.code == 1
    assert statuses(r)["schema"] == "FAIL"
    assert all(statuses(r)[n] == "SKIP" for n in DATA_CHECKS)


def test_changed_migration_fails_schema_but_runs_data_checks(cli, conn, modal_token):
    conn.execute("UPDATE wsctl.schema_migrations SET checksum = 'x' WHERE version = 1")
    r = cli("doctor", "--json")
    assert r.code == 1
    checks = checks_of(r)
    assert checks["schema"]["status"] == "FAIL"
    assert "changed after they were applied: 0001_base_schema.sql" in checks["schema"]["detail"]
    assert all(checks[n]["status"] == "OK" for n in DATA_CHECKS)


# --- batches without workstream_slug -----------------------------------------------------


def test_legacy_batches_warn_with_count_and_exit_0(cli, conn, healthy, modal_token):
    b1 = f.add_batch(conn, healthy, STEPS, 2, workstream=None, first_status="COMPLETED")
    b2 = f.add_batch(conn, healthy, STEPS, 1, workstream=None, first_status="COMPLETED")
    conn.execute("UPDATE batches SET status = 'COMPLETED' WHERE id = %s", (b1,))
    before = table_snapshot(conn)
    r = cli("doctor", "--json")
    assert r.code == 0, r.out  # a WARN alone does not fail the diagnosis
    c = checks_of(r)["legacy_batches"]
    assert c["status"] == "WARN"
    assert c["detail"].startswith("2 batch(es) have no workstream_slug (1 active)")
    assert c["hint"] == "wsctl backfill workstream-slug"
    assert {row["batch_id"] for row in c["rows"]} == {str(b1), str(b2)}
    assert r.json()["ok"] is True
    assert table_snapshot(conn) == before


# --- PENDING/BLOCKED states without a registry row -----------------------------------------


def test_unregistered_states_fail_with_counts_per_pair(cli, conn, healthy, modal_token):
    # 3 PENDING in (normalize, new_ws); 2 BLOCKED in (enrich, new_ws); 1 PENDING in a legacy batch
    f.add_batch(conn, healthy, STEPS, 3, workstream="new_ws")
    b = f.add_batch(conn, healthy, STEPS[1:], 2, workstream="new_ws", first_status="BLOCKED")
    f.add_batch(conn, healthy, STEPS, 1, workstream=None)
    # states that are not PENDING/BLOCKED never count, registered or not
    f.add_batch(
        conn, healthy, ["unknown_step"], 4, workstream="apollo_scrape", first_status="DISPATCHED"
    )
    before = table_snapshot(conn)
    r = cli("doctor", "--json")
    assert r.code == 1
    c = checks_of(r)["unregistered_states"]
    assert c["status"] == "FAIL"
    assert c["rows"] == [
        {"step": STEPS[0], "workstream": "new_ws", "states": 3},
        {"step": STEPS[1], "workstream": "new_ws", "states": 2},
        {"step": STEPS[0], "workstream": None, "states": 1},
    ]
    assert c["detail"].startswith("PENDING/BLOCKED states in 3 (step, workstream) pair(s)")
    assert f"({STEPS[0]}, NULL): 1" in c["detail"]
    assert "wsctl registry add --step normalize_all_core_values --workstream new_ws" in c["hint"]
    assert "wsctl backfill workstream-slug" in c["hint"]
    assert b  # the BLOCKED batch exists
    assert table_snapshot(conn) == before

    f.register(conn, STEPS[0], "new_ws", "sync", "nw_normalize")
    f.register(conn, STEPS[1], "new_ws", "async", "nw_enrich", "nw_receive")
    conn.execute(
        "UPDATE batches SET workstream_slug = 'apollo_scrape' WHERE workstream_slug IS NULL"
    )
    assert statuses(cli("doctor", "--json"))["unregistered_states"] == "OK"


def test_top_bounds_the_rows_and_says_how_many_more(cli, conn, healthy, modal_token):
    for i in range(15):
        f.add_batch(conn, healthy, [f"step_{i:02d}"], 1, workstream="apollo_scrape")
    r = cli("doctor", "--json", "--top", "3")
    c = checks_of(r)["unregistered_states"]
    assert len(c["rows"]) == 3
    assert c["detail"].startswith("PENDING/BLOCKED states in 15 (step, workstream) pair(s)")
    assert c["detail"].endswith("(+12 more)")
    m = checks_of(r)["missing_configs"]
    assert len(m["rows"]) == 3 and m["detail"].endswith("(+12 more)")


# --- active batches whose client lacks a config -------------------------------------------


def test_missing_configs_warn_lists_client_step_workstream(cli, conn, modal_token):
    f.register_seed(conn)
    acme = f.add_client(conn, "acme")
    globex = f.add_client(conn, "globex")
    f.add_config(conn, acme, STEPS[0], "apollo_scrape", {})
    f.add_config(conn, acme, STEPS[1], "linkedin_scrape", {})  # the wrong workstream's config
    f.add_batch(conn, acme, STEPS, 1, workstream="apollo_scrape")
    f.add_batch(conn, acme, STEPS, 1, workstream="apollo_scrape")
    # finished or cancelled batches need no config
    for status in ("COMPLETED", "CANCELLED"):
        b = f.add_batch(
            conn, globex, STEPS, 1, workstream="linkedin_scrape", first_status="COMPLETED"
        )
        conn.execute("UPDATE batches SET status = %s WHERE id = %s", (status, b))
    before = table_snapshot(conn)
    r = cli("doctor", "--json")
    assert r.code == 0, r.out
    c = checks_of(r)["missing_configs"]
    assert c["status"] == "WARN"
    assert c["rows"] == [
        {"client": "acme", "step": STEPS[1], "workstream": "apollo_scrape", "batches": 2}
    ]
    assert f"(acme, {STEPS[1]}, apollo_scrape)" in c["detail"]
    assert c["hint"].startswith(
        f"wsctl config set --client acme --step {STEPS[1]} --workstream apollo_scrape"
    )
    assert table_snapshot(conn) == before

    f.add_config(conn, acme, STEPS[1], "apollo_scrape", {})
    assert statuses(cli("doctor", "--json"))["missing_configs"] == "OK"


# --- DISPATCHING rows with expired leases -------------------------------------------------


def test_expired_leases_warn(cli, conn, healthy, modal_token):
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHING', claim_token = gen_random_uuid(),"
        " lease_expires_at = now() + interval '5 minutes'"
        " WHERE batch_id IN (SELECT id FROM batches WHERE workstream_slug = 'apollo_scrape')"
    )
    assert statuses(cli("doctor", "--json"))["expired_leases"] == "OK"  # leases still held
    conn.execute(
        "UPDATE workflow_states SET lease_expires_at = now() - interval '2 hours'"
        " WHERE id IN (SELECT id FROM workflow_states WHERE status = 'DISPATCHING' LIMIT 2)"
    )
    before = table_snapshot(conn)
    r = cli("doctor", "--json")
    assert r.code == 0
    c = checks_of(r)["expired_leases"]
    assert c["status"] == "WARN"
    assert c["detail"].startswith(
        "2 DISPATCHING state(s) with an expired lease (oldest expired 2h ago)"
    )
    assert "dispatcher died" in c["detail"]
    assert c["hint"] == "the next `wsctl dispatch` pass reclaims them"
    assert c["rows"][0]["states"] == 2
    assert table_snapshot(conn) == before


# --- DISPATCHED rows older than the callback timeout -----------------------------------------


def test_stale_dispatched_warn_and_callback_timeout_option(cli, conn, healthy, modal_token):
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED', modal_call_id = 'fc-1',"
        " dispatched_at = now() - interval '10 minutes'"
    )
    assert statuses(cli("doctor", "--json"))["stale_dispatched"] == "OK"  # within 3600 s

    r = cli("doctor", "--json", "--callback-timeout", "60")
    assert r.code == 0
    c = checks_of(r)["stale_dispatched"]
    assert c["status"] == "WARN"
    assert c["detail"].startswith("6 DISPATCHED state(s) older than the 60s callback timeout")
    assert {(row["step"], row["workstream"], row["states"]) for row in c["rows"]} == {
        (STEPS[0], "apollo_scrape", 3),
        (STEPS[0], "linkedin_scrape", 3),
    }
    assert "marks them FAILED" in c["hint"]


def test_stale_dispatched_from_settings_and_undated_rows(cli, conn, healthy, modal_token, tmp_path):
    (tmp_path / "wsctl.toml").write_text("[dispatch]\ncallback_timeout = 120\n")
    # dispatched before wsctl: no dispatched_at, only an old updated_at; never timed out by dispatch
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED', dispatched_at = NULL,"
        " updated_at = now() - interval '3 days'"
        " WHERE batch_id IN (SELECT id FROM batches WHERE workstream_slug = 'linkedin_scrape')"
    )
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED', dispatched_at = now() - interval '5 minutes'"
        " WHERE batch_id IN (SELECT id FROM batches WHERE workstream_slug = 'apollo_scrape')"
    )
    before = table_snapshot(conn)
    r = cli("doctor", "--json")
    assert r.code == 0
    c = checks_of(r)["stale_dispatched"]
    assert c["status"] == "WARN"
    assert c["detail"].startswith("6 DISPATCHED state(s) older than the 120s callback timeout")
    assert "3 have no dispatched_at" in c["detail"]
    assert "oldest 3d" in c["detail"]
    assert "need an operator: SELECT wsctl.fail_step" in c["hint"]
    assert table_snapshot(conn) == before


# --- Modal credentials ---------------------------------------------------------------------


def test_modal_credentials_missing_fail_for_modal_backend(cli, healthy, no_modal_token):
    r = cli("doctor", "--json")
    assert r.code == 1
    c = checks_of(r)["modal_credentials"]
    assert c["status"] == "FAIL"
    assert "the dispatch backend is modal (the default" in c["detail"]
    assert c["hint"].startswith("modal token set")


def test_modal_credentials_not_needed_for_local_backend(cli, healthy, no_modal_token, tmp_path):
    """`doctor --backend local` called the option "the configured backend" and still
    suggested a Modal token: it says where the backend came from and suggests nothing."""
    r = cli("doctor", "--json", "--backend", "local")
    assert r.code == 0
    c = checks_of(r)["modal_credentials"]
    assert c["status"] == "SKIP" and not c["hint"]
    assert "none needed: the dispatch backend is local (--backend)" in c["detail"]
    (tmp_path / "wsctl.toml").write_text('[dispatch]\nbackend = "local"\n')
    r = cli("doctor", "--json")
    assert r.code == 0
    c = checks_of(r)["modal_credentials"]
    assert c["status"] == "SKIP" and "(dispatch.backend in wsctl.toml)" in c["detail"]


# --- one broken check does not stop the others -----------------------------------------------


def test_a_failing_query_fails_only_its_check(cli, conn, healthy, modal_token):
    conn.execute("ALTER TABLE workflow_states DROP COLUMN lease_expires_at")
    r = cli("doctor", "--json")
    assert r.code == 1
    s = statuses(r)
    assert s["expired_leases"] == "FAIL"
    assert checks_of(r)["expired_leases"]["detail"].startswith("query failed: ")
    assert s["stale_dispatched"] == "OK" and s["modal_credentials"] == "OK"


@pytest.mark.parametrize("command", [("stats",), ("ui", "--port", "0"), ("doctor",)])
def test_a_callback_timeout_under_a_second_is_the_same_usage_error_everywhere(
    cli, conn, tmp_path, command
):
    """stats, ui and doctor take --callback-timeout (else [dispatch] callback_timeout) through
    one check: under 1 s is exit 2 with one line, from the option or from wsctl.toml."""
    message = "wsctl: error: --callback-timeout must be at least 1 second"
    r = cli(*command, "--callback-timeout", "0")
    assert (r.code, r.out, r.err.strip()) == (2, "", message)
    (tmp_path / "wsctl.toml").write_text("[dispatch]\ncallback_timeout = 0\n")
    r = cli(*command)
    assert r.code == 2 and r.out == "" and len(r.err.strip().splitlines()) == 1


def test_invalid_options_are_usage_errors(cli, conn, healthy):
    before = table_snapshot(conn)
    r = cli("doctor", "--callback-timeout", "0")
    assert r.code == 2 and r.out == ""
    assert r.err.strip() == "wsctl: error: --callback-timeout must be at least 1 second"
    r = cli("doctor", "--top", "0")
    assert r.code == 2 and r.out == ""
    assert table_snapshot(conn) == before


# --- --check-modal through the real modal client and the loopback stand-in -------------------


@pytest.fixture(scope="module")
def _standin_server():
    with ModalStandIn() as server:
        yield server


@pytest.fixture
def standin(_standin_server, monkeypatch):
    _standin_server.reset()
    _standin_server.patch_env(monkeypatch)
    yield _standin_server
    _standin_server.reset()
    reset_modal_client()


def test_check_modal_fails_naming_the_missing_function(cli, conn, standin):
    f.register(conn, STEPS[0], "apollo_scrape", "sync", "start_normalize_all_core_values")
    f.register(conn, STEPS[1], "apollo_scrape", "async", "start_enrich", "receive_enrich")
    standin.add_function(APP, "start_normalize_all_core_values")
    standin.add_function(APP, "receive_enrich")
    before = table_snapshot(conn)
    r = cli("doctor", "--json", "--check-modal")
    assert r.code == 1
    checks = checks_of(r)
    assert [c["name"] for c in r.json()["checks"]] == [*CHECKS, "modal_functions"]
    c = checks["modal_functions"]
    assert c["status"] == "FAIL"
    assert c["detail"] == (
        f"1 of 3 registry function(s) not found in Modal app {APP}: "
        f"start_enrich (used by {STEPS[1]} (apollo_scrape))"
    )
    assert c["rows"] == [
        {"function": "start_enrich", "used_by": [f"{STEPS[1]} (apollo_scrape)"], "error": None}
    ]
    assert sorted(fn for (_env, _app, fn, _found) in standin.lookups) == [
        "receive_enrich",
        "start_enrich",
        "start_normalize_all_core_values",
    ]
    assert table_snapshot(conn) == before

    standin.add_function(APP, "start_enrich")
    r = cli("doctor", "--json", "--check-modal")
    assert r.code == 0, r.out
    assert checks_of(r)["modal_functions"]["detail"] == (
        f"all 3 registry function(s) found in Modal app {APP}"
    )


def test_check_modal_uses_app_and_environment(cli, conn, standin, tmp_path):
    f.register(conn, STEPS[0], "apollo_scrape", "sync", "start_normalize_all_core_values")
    standin.add_function("other-app", "start_normalize_all_core_values", environment_name="staging")
    r = cli("doctor", "--json", "--check-modal")
    assert r.code == 1
    assert checks_of(r)["modal_functions"]["status"] == "FAIL"
    r = cli(
        "doctor", "--json", "--check-modal", "--app", "other-app", "--modal-environment", "staging"
    )
    assert r.code == 0, r.out
    assert checks_of(r)["modal_functions"]["detail"].endswith(
        "found in Modal app other-app (environment staging)"
    )
    (tmp_path / "wsctl.toml").write_text(
        '[dispatch]\napp = "other-app"\nmodal_environment = "staging"\n'
    )
    assert cli("doctor", "--json", "--check-modal").code == 0
    assert standin.lookups[-1] == ("staging", "other-app", "start_normalize_all_core_values", True)


def test_check_modal_rejected_credentials_fail(cli, conn, monkeypatch):
    with ModalStandIn(require_exact_credentials=True) as server:
        server.patch_env(monkeypatch)
        monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-wrong-secret")
        try:
            f.register(conn, STEPS[0], "apollo_scrape", "sync", "start_normalize_all_core_values")
            server.add_function(APP, "start_normalize_all_core_values")
            r = cli("doctor", "--json", "--check-modal")
        finally:
            reset_modal_client()
    assert r.code == 1
    c = checks_of(r)["modal_functions"]
    assert c["status"] == "FAIL" and "rejected the credentials" in c["detail"]


def test_check_modal_without_credentials_fails_without_network(cli, conn, no_modal_token):
    f.register(conn, STEPS[0], "apollo_scrape", "sync", "start_normalize_all_core_values")
    r = cli("doctor", "--json", "--check-modal", "--backend", "local")
    assert r.code == 1
    c = checks_of(r)["modal_functions"]
    assert c["status"] == "FAIL" and "no Modal credentials" in c["detail"]
    assert checks_of(r)["modal_credentials"]["status"] == "WARN"


def test_check_modal_skipped_without_database(run_cli, standin):
    r = run_cli("doctor", "--json", "--check-modal", url="postgresql://ops@127.0.0.1:1/x")
    assert r.code == 1
    assert checks_of(r)["modal_functions"]["status"] == "SKIP"
    assert checks_of(r)["modal_credentials"]["status"] == "OK"


# --- long life: bloat, the vacuum horizon, prune candidates --------------------------


def test_states_bloat_warns_with_a_vacuum_hint(cli, conn, healthy, modal_token):
    client = conn.execute("SELECT id FROM clients LIMIT 1").fetchone()
    client = (
        client[0]
        if client
        else conn.execute("INSERT INTO clients (name) VALUES ('bloaty') RETURNING id").fetchone()[0]
    )
    conn.execute("ALTER TABLE workflow_states SET (autovacuum_enabled = false)")
    from tests.support import factories as fac

    b = fac.add_batch(conn, client, ["normalize_all_core_values"], 120_000)
    conn.execute("ANALYZE workflow_states")
    conn.execute("UPDATE workflow_states SET status = 'COMPLETED' WHERE batch_id = %s", (b,))
    import time

    deadline = time.monotonic() + 20  # the statistics collector reports the dead tuples soon
    while time.monotonic() < deadline:
        c = checks_of(cli("doctor", "--json"))["states_bloat"]
        if c["status"] == "WARN":
            break
        time.sleep(0.5)
    assert c["status"] == "WARN", c
    assert "120000 dead" in c["detail"] and "VACUUM (ANALYZE) public.workflow_states" in c["hint"]
    assert c["rows"][0]["dead"] == 120_000
    conn.execute("VACUUM workflow_states")
    assert statuses(cli("doctor", "--json"))["states_bloat"] == "OK"


def test_vacuum_horizon_warns_about_an_old_snapshot(db_url, conn, healthy, modal_token):
    import psycopg

    from wsctl.doctor import VACUUM_HORIZON, doctor

    with psycopg.connect(db_url, application_name="held-snapshot") as holder:
        # a REPEATABLE READ transaction (pg_dump, a long report) keeps its snapshot while idle
        holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        holder.execute("SELECT 1 FROM clients LIMIT 1")
        time.sleep(1.2)
        report = doctor(lambda: psycopg.connect(db_url, autocommit=True), xmin_threshold=1)
        check = report.get(VACUUM_HORIZON)
        assert check.status == "WARN", check
        pid = holder.info.backend_pid
        assert any(r.get("pid") == pid for r in check.rows) or "backend pid" in check.detail
        assert "pg_terminate_backend(" in check.hint
    report = doctor(lambda: psycopg.connect(db_url, autocommit=True), xmin_threshold=86400)
    assert report.get(VACUUM_HORIZON).status == "OK"


def test_prune_candidates_warn_with_the_prune_command(cli, conn, healthy, modal_token):
    from tests.support import factories as fac

    client = conn.execute("INSERT INTO clients (name) VALUES ('old') RETURNING id").fetchone()[0]
    b = fac.add_batch(conn, client, ["normalize_all_core_values"], 4, first_status="COMPLETED")
    active = fac.add_batch(conn, client, ["normalize_all_core_values"], 2)
    conn.execute("UPDATE workflow_states SET updated_at = now() - interval '40 days'")
    conn.execute("UPDATE batches SET created_at = now() - interval '41 days'")
    c = checks_of(cli("doctor", "--json"))["prune_candidates"]
    assert c["status"] == "WARN"
    assert "1 batch(es) finished more than 30d ago keep 4 state(s)" in c["detail"]
    assert c["hint"].startswith("wsctl prune --older-than 30d --dry-run")
    assert [r["batch_id"] for r in c["rows"]] == [str(b)] and str(active) not in c["detail"]
    assert cli("prune", "--older-than", "30d").code == 0
    assert statuses(cli("doctor", "--json"))["prune_candidates"] == "OK"
