"""`wsctl item show`: where an item went and why, on a real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import table_snapshot
from tests.support import factories as f
from wsctl import db, settings
from wsctl.dispatch import PassOptions, run_pass
from wsctl.dispatch.backend import Poll
from wsctl.dispatch.memory import MemoryBackend
from wsctl.errors import OperationalError
from wsctl.item_report import item_report

STEPS = ["normalize_all_core_values", "enrich_company_via_waterfall_in_clay"]
SECRET_KEY = "sk-live-3b9f0c1d2e"
SECRET_HOOK = "https://api.clay.com/v3/sources/webhook/pull-in-data-from-a-webhook-7c1e9"


@pytest.fixture
def wconn(db_url):
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="test")) as c:
        yield c


def _functions(calls):
    names = [
        "start_normalize_all_core_values",
        "li_normalize_all_core_values",
        "start_enrich_company_via_waterfall_in_clay",
        "li_enrich_company_via_waterfall_in_clay",
    ]
    return {n: (lambda item, ws, _n=n: calls.append((_n, item, ws))) for n in names}


def _item_of(conn, batch_id) -> uuid.UUID:
    return conn.execute("SELECT id FROM batch_items WHERE batch_id = %s", (batch_id,)).fetchone()[0]


@pytest.fixture
def completed_item(wconn):
    """An item that went through both steps in apollo_scrape, via the real dispatch pass."""
    f.register_seed(wconn)
    client = f.add_client(wconn, "acme")
    f.add_config(wconn, client, STEPS[0], "apollo_scrape", {"case": "title"})
    f.add_config(wconn, client, STEPS[1], "apollo_scrape", {"table": "companies"})
    f.add_config(wconn, client, STEPS[1], "linkedin_scrape", {"table": "WRONG-ONE"})
    batch = f.add_batch(wconn, client, STEPS, 1, workstream="apollo_scrape")
    item = _item_of(wconn, batch)
    backend = MemoryBackend(_functions([]), spawn=True)
    run_pass(wconn, backend, PassOptions(limit=10))  # step 1 spawned: fc-mem-1
    backend.outcomes["fc-mem-1"] = Poll("returned")
    run_pass(wconn, backend, PassOptions(limit=10))  # reconciled, step 2 spawned: fc-mem-2
    state2 = wconn.execute(
        "SELECT id FROM workflow_states WHERE item_id = %s AND step_name = %s", (item, STEPS[1])
    ).fetchone()[0]
    assert wconn.execute("SELECT wsctl.complete_step(%s)", (state2,)).fetchone()[0] is True
    return item, batch


def test_completed_item_library(wconn, completed_item):
    item, batch = completed_item
    report = item_report(wconn, str(item))
    assert report.batch_id == batch and report.client == "acme"
    assert report.batch_workstream == "apollo_scrape" and report.batch_status == "COMPLETED"
    assert [s.step for s in report.steps] == STEPS
    assert [s.position for s in report.steps] == [1, 2]
    assert [s.status for s in report.steps] == ["COMPLETED", "COMPLETED"]
    assert [s.modal_call_id for s in report.steps] == ["fc-mem-1", "fc-mem-2"]
    assert [s.function for s in report.steps] == [
        "start_normalize_all_core_values",
        "start_enrich_company_via_waterfall_in_clay",
    ]
    assert report.steps[1].registry == {
        "type": "async",
        "sender": "start_enrich_company_via_waterfall_in_clay",
        "receiver": None,
    }
    for s in report.steps:
        assert s.workstream == "apollo_scrape"
        assert s.last_error is None
        assert all(s.times[k] is not None for k in ("created_at", "dispatched_at", "completed_at"))
        assert s.resolution.status == "found" and s.resolution.source == "batch"
        assert s.resolution.workstream == "apollo_scrape"
    # the apollo_scrape config, never the linkedin_scrape one of the same step
    assert report.steps[1].resolution.config == {"table": "companies"}
    assert report.warnings == []


def test_completed_item_cli_json(cli, completed_item):
    item, batch = completed_item
    r = cli("item", "show", str(item), "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert set(doc) == {"item", "steps", "warnings", "pruned"}
    assert doc["pruned"] is None
    assert doc["item"] == {
        "id": str(item),
        "batch_id": str(batch),
        "client": "acme",
        "client_id": doc["item"]["client_id"],
        "batch_workstream": "apollo_scrape",
        "batch_status": "COMPLETED",
        "blueprint": STEPS,
        "created_at": doc["item"]["created_at"],
    }
    step = doc["steps"][1]
    assert set(step) >= {
        "position",
        "step",
        "status",
        "attempts",
        "workstream",
        "registry",
        "function",
        "modal_call_id",
        "config",
        "last_error",
        "created_at",
        "available_at",
        "dispatched_at",
        "completed_at",
        "updated_at",
    }
    assert step["status"] == "COMPLETED" and step["modal_call_id"] == "fc-mem-2"
    assert step["config"]["status"] == "found" and step["config"]["source"] == "batch"
    assert step["config"]["config"] == {"table": "companies"}
    assert [t["rule"] for t in step["config"]["trace"]] == ["item", "b:batch"]


def test_completed_item_cli_human(cli, completed_item):
    item, _ = completed_item
    r = cli("item", "show", str(item))
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == f"item        {item}"
    assert "workstream  apollo_scrape" in lines
    # the summary table (plain tab-separated when not on a terminal)
    header = lines.index("#\tstep\tstatus\tattempts\tworkstream\tfunction\tmodal_call_id\tconfig")
    assert lines[header + 1].split("\t") == [
        "1",
        STEPS[0],
        "COMPLETED",
        "0",
        "apollo_scrape",
        "start_normalize_all_core_values",
        "fc-mem-1",
        "found (batch apollo_scrape)",
    ]
    assert "2. enrich_company_via_waterfall_in_clay: COMPLETED" in lines
    assert '     value     {"table": "companies"}' in lines
    assert "WRONG-ONE" not in r.out
    assert r.err == ""


def test_blocked_item_of_legacy_batch(wconn, cli):
    f.register_seed(wconn)
    client = f.add_client(wconn, "acme")
    f.add_config(wconn, client, STEPS[0], "apollo_scrape", {"case": "title"})
    batch = f.add_batch(wconn, client, STEPS, 1, workstream=None)
    item = _item_of(wconn, batch)
    summary = run_pass(wconn, MemoryBackend(_functions([])), PassOptions(limit=10))
    assert summary.blocked == 1

    report = item_report(wconn, item)
    assert report.legacy and report.batch_workstream is None
    first, second = report.steps
    assert first.status == "BLOCKED" and "no workstream_slug" in first.last_error
    assert first.registry is None and "legacy batch" in first.registry_note
    assert first.workstream is None and first.modal_call_id is None
    # the resolution only advises: inferred (the client has a config in apollo_scrape only)
    assert first.resolution.status == "found" and first.resolution.source == "inferred"
    assert first.resolution.trusted is False
    assert second.status is None and second.shown_status == "NOT_REACHED"
    assert second.state_id is None and all(v is None for v in second.times.values())
    assert any("no workstream_slug" in w for w in report.warnings)

    r = cli("item", "show", str(item))
    assert r.code == 0, r.err
    assert "workstream  NULL (legacy batch)" in r.out.splitlines()
    assert "1. normalize_all_core_values: BLOCKED" in r.out
    assert "2. enrich_company_via_waterfall_in_clay: NOT_REACHED" in r.out
    assert "no registry row: the batch has no workstream_slug" in r.out
    assert "   last error  batch " in r.out
    assert "wsctl: warning: batch" in r.err

    doc = cli("item", "show", str(item), "--json").json()
    assert [s["status"] for s in doc["steps"]] == ["BLOCKED", "NOT_REACHED"]
    assert doc["steps"][0]["registry"] is None
    assert doc["steps"][0]["config"]["source"] == "inferred"
    assert doc["item"]["batch_workstream"] is None


def test_secrets_redacted_unless_reveal(wconn, cli):
    f.register_seed(wconn)
    client = f.add_client(wconn, "acme")
    f.add_config(
        wconn,
        client,
        STEPS[0],
        "apollo_scrape",
        {"api_key": SECRET_KEY, "clay_table": SECRET_HOOK, "threshold": 3},
    )
    batch = f.add_batch(wconn, client, STEPS, 1, workstream="apollo_scrape")
    item = _item_of(wconn, batch)
    wconn.execute(
        "UPDATE workflow_states SET status = 'FAILED', last_error = %s WHERE item_id = %s",
        (f"POST {SECRET_HOOK} answered 410", item),
    )

    for args in (("item", "show", str(item)), ("item", "show", str(item), "--json")):
        r = cli(*args)
        assert r.code == 0, r.err
        assert SECRET_KEY not in r.out and "pull-in-data" not in r.out
        assert "***" in r.out and "threshold" in r.out
        shown = cli(*args, "--reveal")
        assert shown.code == 0
        assert SECRET_KEY in shown.out and SECRET_HOOK in shown.out

    doc = cli("item", "show", str(item), "--json").json()
    step = doc["steps"][0]
    assert step["config"]["config"] == {
        "api_key": "***",
        "clay_table": "https://api.clay.com/***",
        "threshold": 3,
    }
    assert step["last_error"] == "POST https://api.clay.com/*** answered 410"


def test_state_outside_the_blueprint_is_listed_last(wconn):
    f.register_seed(wconn)
    client = f.add_client(wconn)
    batch = f.add_batch(wconn, client, STEPS, 1)
    item = _item_of(wconn, batch)
    wconn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name, status)"
        " VALUES (%s, %s, 'old_step_removed', 'COMPLETED')",
        (item, batch),
    )
    report = item_report(wconn, item)
    assert [(s.position, s.step) for s in report.steps] == [
        (1, STEPS[0]),
        (2, STEPS[1]),
        (None, "old_step_removed"),
    ]
    extra = report.steps[2]
    assert extra.status == "COMPLETED" and extra.registry is None
    assert "no registry row for (old_step_removed, apollo_scrape)" in extra.registry_note
    assert any("not in its blueprint" in w for w in report.warnings)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("not-a-uuid", "invalid item id 'not-a-uuid': expected a UUID"),
        ("00000000-0000-0000-0000-000000000000", "no batch item with id"),
    ],
)
def test_unknown_or_malformed_id_exit_1(wconn, cli, bad, message):
    f.register_seed(wconn)
    client = f.add_client(wconn)
    f.add_batch(wconn, client, STEPS, 2)
    before = table_snapshot(wconn)
    for args in (("item", "show", bad), ("item", "show", bad, "--json")):
        r = cli(*args)
        assert r.code == 1
        assert r.out == ""
        assert len(r.err.splitlines()) == 1 and r.err.startswith("wsctl: error: ")
        assert message in r.err
    with pytest.raises(OperationalError, match=message):
        item_report(wconn, bad)
    assert table_snapshot(wconn) == before


def test_item_show_refuses_unmigrated_database(run_cli, legacy_url):
    r = run_cli("item", "show", str(uuid.uuid4()), url=legacy_url)
    assert r.code == 3
    assert "wsctl migrate" in r.err and r.out == ""
