"""`wsctl stats` and what the worker helpers record as used, against a real PostgreSQL."""

from __future__ import annotations

import logging
import uuid

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import table_snapshot
from tests.support import factories as f
from wsctl import stats, worker
from wsctl.item_report import item_report
from wsctl.states import ORDER, Status

STEPS = ["normalize_all_core_values", "enrich_company_via_waterfall_in_clay"]
LABELS = {"workstream", "step", "status", "reason", "key"}


@pytest.fixture
def world(conn):
    """Two workstreams, a batch in each, states in every status, reasons on BLOCKED/FAILED."""
    f.register_seed(conn)
    acme = f.add_client(conn, "acme")
    apollo = f.add_batch(conn, acme, STEPS, 20, "apollo_scrape")
    linkedin = f.add_batch(conn, acme, STEPS, 6, "linkedin_scrape")
    legacy = f.add_batch(conn, acme, STEPS, 2, None)
    # apollo: 20 states of the first step: spread them over the statuses
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM workflow_states WHERE batch_id = %s ORDER BY id", (apollo,)
        ).fetchall()
    ]
    plan = (
        [Status.COMPLETED] * 6
        + [Status.PENDING] * 4
        + [Status.DISPATCHING]
        + [Status.DISPATCHED] * 2
        + [Status.FAILED] * 3
        + [Status.BLOCKED] * 3
        + [Status.CANCELLED]
    )
    for sid, status in zip(ids, plan, strict=True):
        conn.execute("UPDATE workflow_states SET status = %s WHERE id = %s", (str(status), sid))
    failed = ids[13:16]
    blocked = ids[16:19]
    # two FAILED with one reason (each with its own free-text error), one unclassified
    for sid, n in zip(failed[:2], (1, 2), strict=True):
        conn.execute(
            "UPDATE workflow_states SET reason_code = 'worker_error', error_class = 'permanent',"
            " last_error = %s WHERE id = %s",
            (f"item {uuid.uuid4()} exploded at row {n}", sid),
        )
    conn.execute(
        "UPDATE workflow_states SET last_error = 'old failure' WHERE id = %s", (failed[2],)
    )
    conn.execute(
        "UPDATE workflow_states SET reason_code = 'no_registry_row', error_class = 'operator'"
        " WHERE id = ANY(%s)",
        (blocked,),
    )
    # the completed ones: completed within 5 min (3), within the hour (2), days ago (1)
    done = ids[:6]
    conn.execute(
        "UPDATE workflow_states SET dispatched_at = now() - interval '2 minutes',"
        " completed_at = now() - interval '1 minute', updated_at = now() - interval '1 minute'"
        " WHERE id = ANY(%s)",
        (done[:3],),
    )
    conn.execute(
        "UPDATE workflow_states SET dispatched_at = now() - interval '40 minutes',"
        " completed_at = now() - interval '30 minutes', updated_at = now() - interval '30 minutes'"
        " WHERE id = ANY(%s)",
        (done[3:5],),
    )
    conn.execute(
        "UPDATE workflow_states SET dispatched_at = now() - interval '3 days',"
        " completed_at = now() - interval '3 days', updated_at = now() - interval '3 days'"
        " WHERE id = %s",
        (done[5],),
    )
    # pending: 2 due (one 20 min ago), 2 backing off
    pending = ids[6:10]
    conn.execute(
        "UPDATE workflow_states SET available_at = now() - interval '20 minutes' WHERE id = %s",
        (pending[0],),
    )
    conn.execute(
        "UPDATE workflow_states SET available_at = now() - interval '1 minute' WHERE id = %s",
        (pending[1],),
    )
    conn.execute(
        "UPDATE workflow_states SET available_at = now() + interval '10 minutes'"
        " WHERE id = ANY(%s)",
        (pending[2:],),
    )
    # dispatched: one 2 hours ago (past a 3600 s callback timeout), one just now
    disp = ids[11:13]
    conn.execute(
        "UPDATE workflow_states SET dispatched_at = now() - interval '2 hours',"
        " updated_at = now() - interval '2 hours' WHERE id = %s",
        (disp[0],),
    )
    conn.execute(
        "UPDATE workflow_states SET dispatched_at = now() - interval '10 seconds' WHERE id = %s",
        (disp[1],),
    )
    # the rest of the apollo states (FAILED/BLOCKED/CANCELLED/DISPATCHING) were updated days ago
    conn.execute(
        "UPDATE workflow_states SET updated_at = now() - interval '2 days' WHERE id = ANY(%s)",
        (ids[10:11] + ids[13:],),
    )
    return {
        "acme": acme,
        "apollo": apollo,
        "linkedin": linkedin,
        "legacy": legacy,
        "ids": ids,
        "pending": pending,
    }


def db_counts(conn) -> dict:
    rows = conn.execute(
        "SELECT coalesce(b.workstream_slug, ''), ws.step_name, ws.status, count(*)"
        " FROM workflow_states ws JOIN batches b ON b.id = ws.batch_id GROUP BY 1, 2, 3"
    ).fetchall()
    return {(w, s, st): n for w, s, st, n in rows}


def test_counts_per_workstream_step_status_match_the_database(cli, conn, world):
    r = cli("stats", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    got = {(c["workstream"] or "", c["step"], c["status"]): c["states"] for c in doc["states"]}
    assert got == db_counts(conn)
    assert got[("apollo_scrape", STEPS[0], "COMPLETED")] == 6
    assert got[("linkedin_scrape", STEPS[0], "PENDING")] == 6
    assert got[("", STEPS[0], "PENDING")] == 2  # a legacy batch: no workstream
    assert list(doc["totals_by_status"]) == [str(s) for s in ORDER]
    assert sum(doc["totals_by_status"].values()) == 28
    assert doc["estimates"] == ["states_total_estimate"]  # the only figure not counted


def test_due_backlog_and_the_age_of_the_oldest_due_state(cli, world):
    doc = cli("stats", "--json").json()
    by_ws = {d["workstream"]: d for d in doc["due"]["by_workstream"]}
    # apollo: 2 due of 4 PENDING (2 back off); linkedin: 6 fresh ones; legacy: 2
    assert by_ws["apollo_scrape"]["due"] == 2
    assert by_ws["linkedin_scrape"]["due"] == 6
    assert by_ws[None]["due"] == 2
    assert doc["due"]["states"] == 10
    assert 20 * 60 - 5 <= doc["due"]["oldest_due_age_seconds"] <= 20 * 60 + 60


def test_recent_windows_and_dispatched_past_the_callback_timeout(cli, world):
    doc = cli("stats", "--json").json()
    apollo = next(r for r in doc["recent"]["by_workstream"] if r["workstream"] == "apollo_scrape")
    assert apollo["completed_5m"] == 3
    assert apollo["completed_1h"] == 5  # the one of three days ago is not counted
    assert apollo["dispatched_5m"] == 3 + 1  # three completed since, one still DISPATCHED
    assert apollo["dispatched_1h"] == 3 + 2 + 1
    assert apollo["failed_1h"] == 0  # failed two days ago
    overdue = doc["dispatched_past_callback_timeout"]
    assert [(o["workstream"], o["step"], o["states"]) for o in overdue] == [
        ("apollo_scrape", STEPS[0], 1)
    ]
    longer = cli("stats", "--json", "--callback-timeout", "10800").json()
    assert longer["dispatched_past_callback_timeout"] == []


def test_blocked_and_failed_are_grouped_by_reason_code_never_by_the_message(cli, world):
    doc = cli("stats", "--json").json()
    groups = {(g["status"], g["reason"]): g["states"] for g in doc["needs_operator"]}
    # two FAILED states with different messages are one group; NULL is "unclassified"
    assert groups == {
        ("FAILED", "worker_error"): 2,
        ("FAILED", "unclassified"): 1,
        ("BLOCKED", "no_registry_row"): 3,
    }
    assert all("exploded" not in str(g) for g in doc["needs_operator"])


def test_workstream_option_keeps_to_one_workstream(cli, conn, world):
    doc = cli("stats", "--json", "--workstream", "linkedin_scrape").json()
    assert {c["workstream"] for c in doc["states"]} == {"linkedin_scrape"}
    assert doc["needs_operator"] == []
    assert doc["due"]["states"] == 6
    bad = cli("stats", "--workstream", "Not A Slug")
    assert bad.code == 1 and bad.out == ""
    assert bad.err.startswith("wsctl: error:") and len(bad.err.strip().splitlines()) == 1


def test_prometheus_text_parses_with_bounded_labels_and_agrees_with_json(cli, world):
    r = cli("stats", "--prometheus")
    assert r.code == 0, r.err
    families = {fam.name: fam for fam in text_string_to_metric_families(r.out)}
    assert families, r.out
    for fam in families.values():
        assert fam.name.startswith("wsctl_")
        for sample in fam.samples:
            assert set(sample.labels) <= LABELS, sample
    doc = cli("stats", "--json").json()
    states = {
        (s.labels["workstream"], s.labels["step"], s.labels["status"]): s.value
        for s in families["wsctl_states"].samples
    }
    assert states == {
        (c["workstream"] or "", c["step"], c["status"]): c["states"] for c in doc["states"]
    }
    reasons = {
        (s.labels["status"], s.labels["reason"]): s.value
        for s in families["wsctl_needs_operator_states"].samples
    }
    assert reasons == {
        ("FAILED", "worker_error"): 2,
        ("FAILED", "unclassified"): 1,
        ("BLOCKED", "no_registry_row"): 3,
    }
    due = {s.labels["workstream"]: s.value for s in families["wsctl_due_states"].samples}
    assert due == {"apollo_scrape": 2, "linkedin_scrape": 6, "": 2}
    ages = {
        s.labels["workstream"]: s.value for s in families["wsctl_oldest_due_age_seconds"].samples
    }
    assert ages["apollo_scrape"] >= 20 * 60 - 5
    completed = {
        s.labels["workstream"]: s.value for s in families["wsctl_completed_states_5m"].samples
    }
    assert completed["apollo_scrape"] == 3
    overdue = families["wsctl_dispatched_past_callback_timeout_states"].samples
    assert [(s.labels["step"], s.value) for s in overdue] == [(STEPS[0], 1)]


def test_label_values_are_escaped(conn):
    # a dashboard-invented status with a quote and a backslash still parses
    f.register_seed(conn)
    acme = f.add_client(conn, "acme")
    f.add_batch(conn, acme, STEPS, 1, "apollo_scrape", first_status='WEIRD"\\ONE')
    st = stats.collect(conn)
    fams = list(text_string_to_metric_families(stats.render_prometheus(st)))
    sample = next(fam for fam in fams if fam.name == "wsctl_states").samples[0]
    assert sample.labels["status"] == 'WEIRD"\\ONE'


def test_stats_reads_in_a_read_only_transaction(conn, world):
    before = table_snapshot(conn)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        with stats.read_only(conn):
            conn.execute("UPDATE workflow_states SET attempts = attempts + 1")
    assert table_snapshot(conn) == before
    stats.collect(conn)
    assert table_snapshot(conn) == before


def test_usage_and_environment_errors_are_one_line(cli, run_cli, legacy_url):
    both = cli("stats", "--json", "--prometheus")
    assert both.code == 2 and both.out == "" and len(both.err.strip().splitlines()) == 1
    zero = cli("stats", "--callback-timeout", "0")
    assert zero.code == 2 and zero.out == ""
    unmigrated = run_cli("stats", url=legacy_url)
    assert unmigrated.code == 3 and unmigrated.out == ""
    assert len(unmigrated.err.strip().splitlines()) == 1


def test_human_output(cli, world):
    r = cli("stats")
    assert r.code == 0, r.err
    assert "due backlog: 10 state(s)" in r.out
    assert "DISPATCHED past the callback timeout (3600 s): 1" in r.out
    assert "no_registry_row" in r.out and "unclassified" in r.out


# --- item 1: what the worker helpers record ----------------------------------------------


@pytest.fixture
def ran(conn):
    """An apollo item whose first step has a config, resolved once by the worker helpers."""
    f.register_seed(conn)
    acme = f.add_client(conn, "acme")
    f.add_config(conn, acme, STEPS[0], "apollo_scrape", {"case": "lower"})
    f.add_config(conn, acme, STEPS[0], "linkedin_scrape", {"case": "upper"})
    batch = f.add_batch(conn, acme, STEPS, 1, "apollo_scrape")
    item = conn.execute("SELECT id FROM batch_items WHERE batch_id = %s", (batch,)).fetchone()[0]
    config = worker.get_client_config(str(item), STEPS[0], "apollo_scrape", conn=conn)
    assert config == {"case": "lower"}
    return {"acme": acme, "batch": batch, "item": item}


def used_of(conn, item, step) -> dict | None:
    row = conn.execute(
        "SELECT used_resolution FROM workflow_states WHERE item_id = %s AND step_name = %s",
        (item, step),
    ).fetchone()
    return row[0] if row else None


def test_worker_helpers_record_the_config_and_registry_rows_used(conn, ran):
    used = used_of(conn, ran["item"], STEPS[0])
    cfg_id, cfg_at = conn.execute(
        "SELECT id, updated_at FROM client_workflow_configs"
        " WHERE workflow_slug = %s AND workstream_slug = 'apollo_scrape'",
        (STEPS[0],),
    ).fetchone()
    reg_id = conn.execute(
        "SELECT id FROM enrichment_registry WHERE slug = %s AND workstream_slug = 'apollo_scrape'",
        (STEPS[0],),
    ).fetchone()[0]
    assert used["config_id"] == str(cfg_id)
    assert used["registry_id"] == str(reg_id)
    assert used["workstream_slug"] == "apollo_scrape"
    assert used["status"] == "found" and used["source"] == "explicit"
    from datetime import datetime

    assert datetime.fromisoformat(used["config_updated_at"]) == cfg_at
    report = item_report(conn, ran["item"])
    step = report.steps[0]
    assert step.used is not None and step.used.config_id == cfg_id
    assert step.used.registry_function == "start_normalize_all_core_values"
    assert step.used.config_changed_since is False
    assert report.steps[1].used is None  # not reached


def test_item_show_says_when_the_config_changed_since(conn, cli, ran):
    cli(
        "config",
        "set",
        "--client",
        "acme",
        "--step",
        STEPS[0],
        "--workstream",
        "apollo_scrape",
        "--set",
        "case=smart",
    )
    r = cli("item", "show", str(ran["item"]), "--json")
    assert r.code == 0, r.err
    used = r.json()["steps"][0]["used"]
    assert used["config_changed_since"] is True and used["config_exists"] is True
    human = cli("item", "show", str(ran["item"])).out
    assert "CHANGED since: updated" in human
    # stats counts the state among those of the last hour that used a changed config
    conn.execute("UPDATE workflow_states SET updated_at = now() WHERE item_id = %s", (ran["item"],))
    doc = cli("stats", "--json").json()
    uses = doc["config_use_last_hour"]
    assert [(u["step"], u["states"], u["changed_since"]) for u in uses] == [(STEPS[0], 1, 1)]
    # a deleted config row counts as changed too
    cli(
        "config",
        "unset",
        "--client",
        "acme",
        "--step",
        STEPS[0],
        "--workstream",
        "apollo_scrape",
    )
    used = cli("item", "show", str(ran["item"]), "--json").json()["steps"][0]["used"]
    assert used["config_exists"] is False and used["config_changed_since"] is True


def test_no_config_for_certain_is_recorded_and_a_refusal_writes_nothing(conn, ran):
    # the second step has no config in apollo_scrape: None, recorded as such
    assert worker.get_client_config(str(ran["item"]), STEPS[1], conn=conn) is None
    used = used_of(conn, ran["item"], STEPS[1])
    assert used is None  # no state for the second step yet: nothing to write on
    conn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name) VALUES (%s, %s, %s)",
        (ran["item"], ran["batch"], STEPS[1]),
    )
    assert worker.get_client_config(str(ran["item"]), STEPS[1], conn=conn) is None
    used = used_of(conn, ran["item"], STEPS[1])
    assert used["config_id"] is None and used["status"] == "not_found"
    assert used["registry_id"] is not None
    # a mismatch is refused and leaves every row as it was
    before = table_snapshot(conn)
    with pytest.raises(worker.ConfigResolutionError):
        worker.get_client_config(str(ran["item"]), STEPS[0], "linkedin_scrape", conn=conn)
    assert table_snapshot(conn) == before


def test_a_failed_record_never_fails_the_step(conn, db_url, ran, caplog):
    """A role that may read but not update workflow_states: the config still comes back."""
    role = f"wsctl_ro_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        conn.execute(f'GRANT USAGE ON SCHEMA public, wsctl TO "{role}"')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        before = table_snapshot(conn)
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(db_url)
        params["user"] = role
        params.pop("password", None)
        caplog.set_level(logging.WARNING, logger="wsctl.worker")
        with psycopg.connect(make_conninfo(**params), autocommit=True) as ro:
            with ro.transaction():  # inside the caller's transaction: a savepoint absorbs it
                cfg = worker.get_client_config(str(ran["item"]), STEPS[0], conn=ro)
                assert ro.execute("SELECT 1").fetchone() == (1,)  # the transaction still works
        assert cfg == {"case": "lower"}
        assert table_snapshot(conn) == before
        assert any("could not record the resolution" in r.getMessage() for r in caplog.records)
    finally:
        conn.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{role}"')
        conn.execute(f'REVOKE ALL ON SCHEMA public, wsctl FROM "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


# --- limits and Clay webhook capacity ------------------------------------------------------

CLAY_STEP = STEPS[1]


@pytest.fixture
def limited(cli, conn, world):
    """world, plus: a limit bound to the first step per client (3 in flight under acme's key,
    an expired lease not counted), a limit nothing binds, a bound key no limit defines, and
    Clay webhooks of three clients on the second step (one client's all used up)."""
    ids = world["ids"]
    conn.execute(  # the DISPATCHING state holds a live lease; a second one's lease expired
        "UPDATE workflow_states SET lease_expires_at = now() + interval '5 minutes' WHERE id = %s",
        (ids[10],),
    )
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHING',"
        " lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (ids[19],),
    )
    conn.execute(
        "INSERT INTO wsctl.registry_limit_keys (registry_id, key_template)"
        " SELECT id, t FROM enrichment_registry, unnest(%s::text[]) t"
        " WHERE slug = %s AND workstream_slug = 'apollo_scrape'",
        (["norm:{client}", "norm:undefined"], STEPS[0]),
    )
    assert cli("limit", "set", "norm:acme", "--rate", "10/s", "--burst", "20").code == 0
    assert cli("limit", "set", "norm:acme", "--max-in-flight", "5").code == 0
    assert cli("limit", "set", "idle", "--max-in-flight", "3").code == 0
    from wsctl import clay

    urls = {n: f"https://api.clay.com/hooks/SECRET{n}" for n in range(4)}
    globex, initech = f.add_client(conn, "globex"), f.add_client(conn, "initech")
    cap = {"clay_webhook_submission_cap": 100}
    f.add_config(
        conn,
        world["acme"],
        CLAY_STEP,
        "apollo_scrape",
        {"clay_table_webhook_urls": [urls[0], urls[1]], **cap},
    )
    f.add_config(conn, globex, CLAY_STEP, "apollo_scrape", {"clay_table_webhook_url": urls[2]})
    f.add_config(
        conn, initech, CLAY_STEP, "apollo_scrape", {"clay_table_webhook_urls": [urls[3]], **cap}
    )
    clay.record_prior(conn, urls[0], 100)
    clay.record_prior(conn, urls[1], 30)
    clay.record_prior(conn, urls[2], 1_000)
    clay.record_prior(conn, urls[3], 100)
    return world


def test_stats_reports_each_limit_in_flight_and_tokens_in_one_query(cli, limited):
    doc = cli("stats", "--json").json()
    by_key = {lim["key"]: lim for lim in doc["limits"]}
    assert set(by_key) == {"idle", "norm:acme"}  # only limits: a bound, undefined key is none
    acme = by_key["norm:acme"]
    # DISPATCHING with a live lease (1) + DISPATCHED (2); the expired lease holds no slot
    assert acme["in_flight"] == 3 and acme["max_in_flight"] == 5
    assert acme["burst"] == 20 and acme["rate"] == "10/s" and 0 <= acme["tokens_now"] <= 20
    assert by_key["idle"] == {
        "key": "idle",
        "rate": None,
        "rate_per_second": None,
        "burst": None,
        "tokens_now": None,
        "max_in_flight": 3,
        "in_flight": 0,
    }
    for key, lim in by_key.items():  # the same counts `limit show` gives, key by key
        assert cli("limit", "show", key, "--json").json()["in_flight"] == lim["in_flight"]
    human = cli("stats")
    assert "norm:acme" in human.out and "idle" in human.out


def test_stats_limits_reads_only_the_in_flight_indexes(conn, limited):
    # 60,000 COMPLETED states: a plan that read workflow_states beyond the in-flight rows
    # would show a sequential scan, or an index other than the partial in-flight ones.
    acme = limited["acme"]
    f.add_batch(conn, acme, STEPS, 60_000, "apollo_scrape", first_status="COMPLETED")
    conn.execute("ANALYZE workflow_states")
    from wsctl.queries import q

    plan = conn.execute("EXPLAIN (FORMAT JSON) " + q("stats_limits")).fetchone()[0]

    def scans(node: dict) -> list[tuple[str, str | None, str | None]]:
        out = []
        if node.get("Relation Name") == "workflow_states":
            index = node.get("Index Name")
            if node["Node Type"] == "Bitmap Heap Scan":  # its index is on its child
                (index,) = {c.get("Index Name") for c in node.get("Plans", [])}
            out.append((node["Node Type"], index, node.get("Alias")))
        for child in node.get("Plans", []):
            out += scans(child)
        return out

    found = scans(plan[0]["Plan"])
    assert found, plan
    assert {index for _, index, _ in found} == {
        "idx_workflow_states_claim_lease",
        "idx_workflow_states_dispatched",
    }, found
    assert not any(kind == "Seq Scan" for kind, _, _ in found)
    st = stats.collect(conn)
    assert st.seconds < 1.0


def test_stats_reports_clay_webhook_capacity_without_urls(cli, limited):
    r = cli("stats", "--json")
    doc = r.json()
    assert "SECRET" not in r.out
    hooks = {(w["client"], w["index"]): w for w in doc["clay_webhooks"]["webhooks"]}
    assert {k: (w["submitted"], w["cap"], w["left"]) for k, w in hooks.items()} == {
        ("acme", 0): (100, 100, 0),
        ("acme", 1): (30, 100, 70),
        ("globex", 0): (1_000, 45_000, 44_000),
        ("initech", 0): (100, 100, 0),
    }
    assert doc["clay_webhooks"]["by_step"] == [
        {
            "workstream": "apollo_scrape",
            "step": CLAY_STEP,
            "configs": 3,
            "webhooks": 4,
            "left": 44_070,
            "min_config_left": 0,
            "exhausted_configs": 1,
        }
    ]
    other = cli("stats", "--json", "--workstream", "linkedin_scrape").json()
    assert other["clay_webhooks"] == {"by_step": [], "webhooks": []}
    human = cli("stats")
    assert "Clay webhooks" in human.out and "initech" in human.out and "SECRET" not in human.out


def test_prometheus_limits_and_webhooks_parse_with_bounded_labels(cli, limited):
    r = cli("stats", "--prometheus")
    assert r.code == 0, r.err
    assert "SECRET" not in r.out and "https://" not in r.out
    fams = {fam.name: fam for fam in text_string_to_metric_families(r.out)}
    for fam in fams.values():
        for sample in fam.samples:
            assert set(sample.labels) <= LABELS, sample
            if "key" in sample.labels:  # only the limit metrics carry a key
                assert fam.name.startswith("wsctl_limit_")

    def values(name: str, label: str) -> dict:
        return {s.labels[label]: s.value for s in fams[name].samples}

    assert values("wsctl_limit_in_flight", "key") == {"idle": 0, "norm:acme": 3}
    assert values("wsctl_limit_max_in_flight", "key") == {"idle": 3, "norm:acme": 5}
    assert values("wsctl_limit_burst", "key") == {"norm:acme": 20}
    assert values("wsctl_limit_rate_per_second", "key") == {"norm:acme": 10.0}
    assert 0 <= values("wsctl_limit_tokens", "key")["norm:acme"] <= 20
    for name, want in (
        ("wsctl_clay_webhook_left", 44_070),
        ("wsctl_clay_webhook_min_config_left", 0),
        ("wsctl_clay_webhook_exhausted_configs", 1),
        ("wsctl_clay_webhooks", 4),
    ):
        samples = fams[name].samples
        assert [(s.labels, s.value) for s in samples] == [
            ({"workstream": "apollo_scrape", "step": CLAY_STEP}, want)
        ], name


def test_a_malformed_webhook_config_is_left_out_and_stats_still_answers(cli, conn, limited):
    hooli = f.add_client(conn, "hooli")
    f.add_config(
        conn,
        hooli,
        CLAY_STEP,
        "apollo_scrape",
        {"clay_table_webhook_urls": "https://api.clay.com/hooks/SECRETX", "x": 1},
    )
    r = cli("stats", "--json")
    assert r.code == 0, r.err
    doc = r.json()["clay_webhooks"]
    assert "hooli" not in {w["client"] for w in doc["webhooks"]}  # its sender reports it
    assert doc["by_step"][0]["configs"] == 3 and "SECRETX" not in r.out
    prom = cli("stats", "--prometheus")
    assert prom.code == 0 and "SECRETX" not in prom.out


def test_no_limits_and_no_webhooks_are_empty_figures(cli, world):
    doc = cli("stats", "--json").json()
    assert doc["limits"] == [] and doc["clay_webhooks"] == {"by_step": [], "webhooks": []}
    fams = {f.name: f for f in text_string_to_metric_families(cli("stats", "--prometheus").out)}
    assert fams["wsctl_limit_in_flight"].samples == []
    assert fams["wsctl_clay_webhook_left"].samples == []
