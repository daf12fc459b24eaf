"""Dispatch through the real modal client, talking to the loopback stand-in of Modal's API."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from grpclib import Status

from tests.conftest import table_snapshot
from tests.support import factories as f
from tests.support.commands import wsctl_argv
from tests.support.modal_standin import ModalStandIn, reset_modal_client
from wsctl import db, settings
from wsctl.dispatch import PassOptions, run_pass
from wsctl.dispatch.modal_backend import ModalBackend
from wsctl.errors import EnvError

APP = "enrichment-worker"
STEP = "normalize_all_core_values"


@pytest.fixture
def standin(monkeypatch):
    with ModalStandIn() as s:
        s.patch_env(monkeypatch)
        yield s
    reset_modal_client()


@pytest.fixture
def wconn(db_url):
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="test")) as c:
        f.register_seed(c)
        yield c


def backend(**kw) -> ModalBackend:
    kw.setdefault("spawn_timeout", 5.0)
    return ModalBackend(APP, **kw)


def test_spawns_with_the_seed_signature_and_records_call_ids(wconn, standin):
    standin.add_function(APP, "start_normalize_all_core_values")
    standin.add_function(APP, "li_normalize_all_core_values")
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 5, workstream="apollo_scrape")
    f.add_batch(wconn, client, [STEP], 3, workstream="linkedin_scrape")
    b = backend()
    try:
        s = run_pass(wconn, b, PassOptions(concurrency=4))
    finally:
        b.close()
    assert s.claimed == 8 and s.dispatched == 8 and s.ok
    spawns = standin.spawns
    assert len(spawns) == 8
    items = dict(
        wconn.execute(
            "SELECT ws.item_id::text, b.workstream_slug FROM workflow_states ws"
            " JOIN batches b ON b.id = ws.batch_id"
        ).fetchall()
    )
    for sp in spawns:
        assert sp.app_name == APP and sp.kwargs == {}
        item_id, workstream = sp.args
        assert isinstance(item_id, str) and items[item_id] == workstream
        expected = "start_" if workstream == "apollo_scrape" else "li_"
        assert sp.function_name == expected + "normalize_all_core_values"
    rows = wconn.execute(
        "SELECT item_id::text, modal_call_id, status FROM workflow_states"
    ).fetchall()
    by_item = {sp.args[0]: sp.call_id for sp in spawns}
    assert all(st == "DISPATCHED" and by_item[i] == call for i, call, st in rows)
    # Each function was looked up (hydrated) once in the pass, not once per item.
    assert standin.calls["FunctionGet"] == 2


def test_function_missing_on_modal_blocks_the_item(wconn, standin):
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 2)
    b = backend()
    try:
        s = run_pass(wconn, b, PassOptions())
    finally:
        b.close()
    assert s.blocked == 2 and standin.spawns == []
    errs = {r[0] for r in wconn.execute("SELECT last_error FROM workflow_states")}
    assert errs == {f"function start_normalize_all_core_values not found in Modal app {APP}"}


@pytest.mark.parametrize(
    ("status", "attempts"), [(Status.UNAVAILABLE, 1), (Status.RESOURCE_EXHAUSTED, 0)]
)
def test_transient_errors_go_back_to_pending_with_backoff(wconn, standin, status, attempts):
    """RESOURCE_EXHAUSTED (Modal's queue is full) backs off without counting an attempt."""
    standin.add_function(APP, "start_normalize_all_core_values")
    standin.inject("FunctionMap", status)
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 3)
    b = backend()
    try:
        s = run_pass(wconn, b, PassOptions())
    finally:
        b.close()
    assert s.retried == 3 and s.dispatched == 0
    rows = wconn.execute(
        "SELECT status, attempts, available_at > now(), claim_token FROM workflow_states"
    ).fetchall()
    assert rows == [("PENDING", attempts, True, None)] * 3
    codes = {r[0] for r in wconn.execute("SELECT reason_code FROM workflow_states")}
    assert codes == {
        "modal_resource_exhausted" if status == Status.RESOURCE_EXHAUSTED else "modal_unavailable"
    }


def test_the_default_cap_of_calls_per_function_holds_spawns_back(wconn, standin):
    fn = "start_normalize_all_core_values"
    standin.add_function(APP, fn)
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 5)
    b = backend(function_cap=2)  # 2,000 by default
    try:
        s = run_pass(wconn, b, PassOptions(max_seconds=0.5, reconcile=False))
    finally:
        b.close()
    assert s.dispatched == 2 and s.deferred == {f"modal:{fn}": 3}
    statuses = sorted(r[0] for r in wconn.execute("SELECT status FROM workflow_states"))
    assert statuses == ["DISPATCHED"] * 2 + ["PENDING"] * 3
    assert {r[0] for r in wconn.execute("SELECT attempts FROM workflow_states")} == {0}


def test_hung_spawn_times_out_and_is_retried(wconn, standin):
    standin.add_function(APP, "start_normalize_all_core_values")
    standin.inject("FunctionMap", "hang")
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 2)
    b = backend(spawn_timeout=0.5)
    try:
        s = run_pass(wconn, b, PassOptions())
    finally:
        b.close()
        standin.release_hangs()
    assert s.retried == 2
    errs = {r[0] for r in wconn.execute("SELECT last_error FROM workflow_states")}
    assert errs == {"spawn timed out; its outcome is unknown, retrying"}


def test_rejected_credentials_stop_the_pass_and_release_claims(wconn, standin):
    standin.add_function(APP, "start_normalize_all_core_values")
    standin.inject("FunctionGet", Status.UNAUTHENTICATED, message="invalid token")
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 3)
    before = table_snapshot(wconn)
    b = backend()
    try:
        with pytest.raises(EnvError, match="credentials"):
            run_pass(wconn, b, PassOptions())
    finally:
        b.close()
    rows = wconn.execute("SELECT status, attempts, claim_token FROM workflow_states").fetchall()
    assert rows == [("PENDING", 0, None)] * 3
    after = table_snapshot(wconn)
    assert len(after["workflow_states"]) == len(before["workflow_states"])


def test_reconcile_polls_calls_through_function_get_outputs(wconn, standin):
    standin.add_function(APP, "start_normalize_all_core_values")
    client = f.add_client(wconn)
    batch = f.add_batch(wconn, client, [STEP, "enrich_company_via_waterfall_in_clay"], 3)
    b = backend()
    try:
        run_pass(wconn, b, PassOptions())
        calls = [sp.call_id for sp in standin.spawns]
        standin.set_outcome(calls[0], returned={"ok": True})
        standin.set_outcome(calls[1], raised=ValueError("bad row"))
        standin.add_function(APP, "start_enrich_company_via_waterfall_in_clay")
        s = run_pass(wconn, b, PassOptions())
    finally:
        b.close()
    assert s.reconciled == 2 and s.retried == 1
    st = dict(
        wconn.execute(
            "SELECT modal_call_id, status FROM workflow_states WHERE step_name = %s", (STEP,)
        ).fetchall()
    )
    assert st[calls[0]] == "COMPLETED"
    assert st[calls[2]] == "DISPATCHED"
    err = wconn.execute(
        "SELECT last_error FROM workflow_states WHERE step_name = %s AND status = 'PENDING'",
        (STEP,),
    ).fetchone()[0]
    assert "bad row" in err
    # The completed item's next step (async Clay sender) was spawned in the same pass.
    assert ("enrich_company_via_waterfall_in_clay", "DISPATCHED", 1) in f.states(wconn, batch)
    assert standin.calls["FunctionGetOutputs"] >= 3


def test_cli_modal_backend_json(cli, conn, standin):
    standin.add_function(APP, "start_normalize_all_core_values")
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 4)
    r = cli("dispatch", "--once", "--backend", "modal", "--app", APP, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["dispatched"] == 4 and doc["backend"] == "modal"
    assert len(standin.spawns) == 4


def test_four_dispatchers_at_once_spawn_every_item_exactly_once(db_url, conn, standin):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 1000, workstream="apollo_scrape")
    f.add_batch(conn, client, [STEP], 1000, workstream="linkedin_scrape")
    standin.add_function(APP, "start_normalize_all_core_values")
    standin.add_function(APP, "li_normalize_all_core_values")
    env = {**os.environ, **standin.env}
    cmd = wsctl_argv(
        db_url,
        "dispatch",
        "--once",
        "--backend",
        "modal",
        "--app",
        APP,
        "--limit",
        "2000",
        "--concurrency",
        "32",
        "--no-reconcile",
        "--json",
    )
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [(p.wait(timeout=240), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [o[0] for o in outs] == [0, 0, 0, 0], outs
    import json

    claimed = [json.loads(o[1])["claimed"] for o in outs]
    assert sum(claimed) == 2000
    spawned_items = [sp.args[0] for sp in standin.spawns]
    assert len(spawned_items) == 2000
    assert len(set(spawned_items)) == 2000
    rows = conn.execute("SELECT status, count(*) FROM workflow_states GROUP BY 1").fetchall()
    assert rows == [("DISPATCHED", 2000)]
    calls = {r[0] for r in conn.execute("SELECT modal_call_id FROM workflow_states")}
    assert calls == {sp.call_id for sp in standin.spawns}


def test_item_id_is_a_string_uuid(wconn, standin):
    standin.add_function(APP, "start_normalize_all_core_values")
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 1)
    b = backend()
    try:
        run_pass(wconn, b, PassOptions())
    finally:
        b.close()
    (sp,) = standin.spawns
    assert type(sp.args[0]) is str and str(uuid.UUID(sp.args[0])) == sp.args[0]


def test_a_remote_missing_secret_blocks_the_state_through_modal(wconn, standin):
    """A function on Modal raising MissingSecret (pickled back by Modal) ends BLOCKED with
    its reason code, never retried as transient."""
    from wsctl.secret_refs import MissingSecret

    standin.add_function(APP, "start_normalize_all_core_values")
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 1)
    b = backend()
    try:
        run_pass(wconn, b, PassOptions())
        (call,) = [sp.call_id for sp in standin.spawns]
        standin.set_outcome(call, raised=MissingSecret([("clay_auth", "CLAY_AUTH_ACME")]))
        s = run_pass(wconn, b, PassOptions())
    finally:
        b.close()
    row = wconn.execute(
        "SELECT status, error_class, reason_code, last_error FROM workflow_states"
        " WHERE step_name = %s",
        (STEP,),
    ).fetchone()
    assert row[:3] == ("BLOCKED", "operator", "missing_secret"), row
    assert "CLAY_AUTH_ACME" in row[3] and s.retried == 0
