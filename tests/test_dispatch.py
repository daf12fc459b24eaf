"""The dispatch pass on a real PostgreSQL, through the in-memory and local backends."""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg
import pytest

from tests.conftest import FIXTURES, table_snapshot
from tests.support import factories as f
from wsctl import db, settings
from wsctl.dispatch import PassOptions, run_pass
from wsctl.dispatch.backend import Poll
from wsctl.dispatch.memory import MemoryBackend
from wsctl.errors import EnvError

STEPS = ["normalize_all_core_values", "enrich_company_via_waterfall_in_clay"]


@pytest.fixture
def wconn(db_url):
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="test")) as c:
        yield c


@pytest.fixture
def seeded(wconn):
    f.register_seed(wconn)
    client = f.add_client(wconn)
    return client


def recorder(calls):
    def fn(item_id, workstream):
        calls.append((item_id, workstream))

    return fn


def all_functions(calls):
    names = [
        "start_normalize_all_core_values",
        "li_normalize_all_core_values",
        "start_enrich_company_via_waterfall_in_clay",
        "li_enrich_company_via_waterfall_in_clay",
    ]
    out = {}
    for n in names:

        def fn(item_id, workstream, _n=n):
            calls.append((_n, item_id, workstream))

        out[n] = fn
    return out


def test_each_workstream_gets_its_own_function(wconn, seeded):
    a = f.add_batch(wconn, seeded, STEPS, 3, workstream="apollo_scrape")
    b = f.add_batch(wconn, seeded, STEPS, 2, workstream="linkedin_scrape")
    calls = []
    s = run_pass(wconn, MemoryBackend(all_functions(calls)), PassOptions(limit=100))
    assert s.claimed == 5 + 5  # the second steps are enqueued and claimed in the same pass
    by_fn = {}
    for fn, item, ws in calls:
        by_fn.setdefault(fn, set()).add(ws)
        assert isinstance(item, str) and uuid.UUID(item)
    assert by_fn == {
        "start_normalize_all_core_values": {"apollo_scrape"},
        "start_enrich_company_via_waterfall_in_clay": {"apollo_scrape"},
        "li_normalize_all_core_values": {"linkedin_scrape"},
        "li_enrich_company_via_waterfall_in_clay": {"linkedin_scrape"},
    }
    # sync steps COMPLETED inline; async steps wait for their receiver as DISPATCHED.
    assert f.states(wconn, a) == [(STEPS[1], "DISPATCHED", 3), (STEPS[0], "COMPLETED", 3)]
    assert f.states(wconn, b) == [(STEPS[1], "DISPATCHED", 2), (STEPS[0], "COMPLETED", 2)]
    assert s.ok and s.completed == 5 and s.dispatched == 10


def test_limit_is_respected_and_oldest_first(wconn, seeded):
    batch = f.add_batch(wconn, seeded, STEPS[:1], 50)
    wconn.execute(
        "UPDATE workflow_states SET available_at = now() - make_interval(secs => n)"
        " FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM workflow_states) x"
        " WHERE x.id = workflow_states.id"
    )
    oldest = [
        r[0]
        for r in wconn.execute(
            "SELECT item_id::text FROM workflow_states ORDER BY available_at LIMIT 7"
        )
    ]
    calls = []
    s = run_pass(
        wconn,
        MemoryBackend({"start_normalize_all_core_values": recorder(calls)}),
        PassOptions(limit=7, chunk_size=3),
    )
    assert s.claimed == 7
    assert sorted(c[0] for c in calls) == sorted(oldest)
    assert f.states(wconn, batch) == [(STEPS[0], "COMPLETED", 7), (STEPS[0], "PENDING", 43)]


def test_legacy_batch_without_workstream_is_blocked_with_advice(wconn, seeded):
    legacy = f.add_batch(wconn, seeded, STEPS[:1], 2, workstream=None)
    f.add_config(wconn, seeded, STEPS[0], "apollo_scrape", {"x": 1})
    calls = []
    s = run_pass(wconn, MemoryBackend(all_functions(calls)), PassOptions())
    assert calls == []  # never dispatched
    assert s.blocked == 2 and not s.ok
    rows = wconn.execute(
        "SELECT status, last_error FROM workflow_states WHERE batch_id = %s", (legacy,)
    ).fetchall()
    assert {r[0] for r in rows} == {"BLOCKED"}
    assert "no workstream_slug" in rows[0][1]
    assert "would set apollo_scrape" in rows[0][1]


def test_missing_registry_row_blocks_and_never_falls_back(wconn, seeded):
    f.register(wconn, "only_in_linkedin", "linkedin_scrape", "sync", "li_only")
    batch = f.add_batch(wconn, seeded, ["only_in_linkedin"], 1, workstream="apollo_scrape")
    calls = []
    s = run_pass(wconn, MemoryBackend({"li_only": recorder(calls)}), PassOptions())
    assert calls == []
    assert s.blocked == 1
    status, err = wconn.execute(
        "SELECT status, last_error FROM workflow_states WHERE batch_id = %s", (batch,)
    ).fetchone()
    assert status == "BLOCKED"
    assert "(step=only_in_linkedin, workstream=apollo_scrape)" in err


def test_function_missing_from_app_blocks_the_item(wconn, seeded):
    f.add_batch(wconn, seeded, STEPS[:1], 2)
    s = run_pass(wconn, MemoryBackend({}), PassOptions())
    assert s.blocked == 2
    errs = {r[0] for r in wconn.execute("SELECT last_error FROM workflow_states")}
    assert errs == {"function start_normalize_all_core_values not found in app memory"}


def test_transient_errors_retry_with_backoff_then_fail(wconn, seeded):
    f.add_batch(wconn, seeded, STEPS[:1], 1)

    def flaky(item_id, ws):
        raise ConnectionError("rate limited")

    backend = MemoryBackend({"start_normalize_all_core_values": flaky})
    s = run_pass(wconn, backend, PassOptions(max_attempts=3))
    assert s.retried == 1 and s.failed == 0
    status, attempts, delay, err = wconn.execute(
        "SELECT status, attempts, extract(epoch FROM available_at - now()), last_error"
        " FROM workflow_states"
    ).fetchone()
    assert (status, attempts) == ("PENDING", 1)
    assert 2.5 <= delay <= 7.5  # 5 s base for the first retry, with +-50 % jitter
    assert "rate limited" in err
    # Not due yet: the next pass claims nothing.
    assert run_pass(wconn, backend, PassOptions(max_attempts=3)).claimed == 0
    for expected in ("PENDING", "FAILED"):
        wconn.execute("UPDATE workflow_states SET available_at = now() - interval '1 s'")
        run_pass(wconn, backend, PassOptions(max_attempts=3))
        assert wconn.execute("SELECT status FROM workflow_states").fetchone()[0] == expected
    assert wconn.execute("SELECT attempts FROM workflow_states").fetchone()[0] == 3


def test_setup_failure_claims_nothing(wconn, seeded):
    f.add_batch(wconn, seeded, STEPS[:1], 3)
    before = table_snapshot(wconn)
    backend = MemoryBackend({}, fail_setup=EnvError("Modal credentials missing"))
    with pytest.raises(EnvError):
        run_pass(wconn, backend, PassOptions())
    assert table_snapshot(wconn) == before


def test_pass_level_failure_releases_unspawned_claims_untouched(wconn, seeded):
    f.add_batch(wconn, seeded, STEPS[:1], 4)

    class Rejected(Exception):
        stops_pass = True

    def reject(item_id, ws):
        raise Rejected("token rejected")

    with pytest.raises(EnvError, match="released"):
        run_pass(wconn, MemoryBackend({"start_normalize_all_core_values": reject}), PassOptions())
    rows = wconn.execute("SELECT status, attempts, claim_token FROM workflow_states").fetchall()
    assert rows == [("PENDING", 0, None)] * 4


def test_spawn_backend_marks_dispatched_and_reconciles(wconn, seeded):
    batch = f.add_batch(wconn, seeded, STEPS, 3)
    backend = MemoryBackend(all_functions([]), spawn=True)
    s = run_pass(wconn, backend, PassOptions())
    assert s.dispatched == 3 and s.completed == 0
    rows = wconn.execute(
        "SELECT id, modal_call_id FROM workflow_states WHERE status='DISPATCHED' ORDER BY 2"
    ).fetchall()
    assert len(rows) == 3 and all(r[1].startswith("fc-mem-") for r in rows)
    # One returned, one raised, one still running.
    backend.outcomes[rows[0][1]] = Poll("returned")
    backend.outcomes[rows[1][1]] = Poll("raised", "ValueError: boom")
    s = run_pass(wconn, backend, PassOptions())
    assert s.reconciled == 2 and s.completed == 1 and s.retried == 1
    st = dict(
        wconn.execute(
            "SELECT id, status FROM workflow_states WHERE step_name=%s", (STEPS[0],)
        ).fetchall()
    )
    assert st[rows[0][0]] == "COMPLETED"
    assert st[rows[1][0]] == "PENDING"
    assert st[rows[2][0]] == "DISPATCHED"
    # The completed item's next step was enqueued and dispatched in that same pass.
    assert (STEPS[1], "DISPATCHED", 1) in f.states(wconn, batch)


def test_callback_timeout_fails_old_dispatched_states(wconn, seeded):
    f.add_batch(wconn, seeded, ["enrich_company_via_waterfall_in_clay"], 2)
    run_pass(wconn, MemoryBackend(all_functions([])), PassOptions())
    wconn.execute("UPDATE workflow_states SET dispatched_at = now() - interval '2 hours'")
    s = run_pass(wconn, MemoryBackend({}), PassOptions(callback_timeout=3600))
    assert s.failed == 2
    errs = [r[0] for r in wconn.execute("SELECT last_error FROM workflow_states")]
    assert all("callback timeout" in e for e in errs)


def test_stale_claim_never_overwrites_a_newer_one(wconn, seeded, db_url):
    """A dispatcher whose lease expired and whose rows were re-claimed records nothing."""
    f.add_batch(wconn, seeded, STEPS[:1], 1)
    reclaimed = threading.Event()
    proceed = threading.Event()

    def slow(item_id, ws):
        # While this "old" dispatcher runs, its lease expires and another claims the row.
        reclaimed.wait(10)

    def other_dispatcher():
        with psycopg.connect(db_url, autocommit=True) as c2:
            c2.execute("UPDATE workflow_states SET lease_expires_at = now() - interval '1 s'")
        with db.connect(db_url, settings.Settings(database_url=db_url, url_source="t")) as c3:
            s2 = run_pass(
                c3,
                MemoryBackend({"start_normalize_all_core_values": None}, spawn=True),
                PassOptions(),
            )
            assert s2.claimed == 1
        reclaimed.set()
        proceed.set()

    t = threading.Thread(target=other_dispatcher)
    started = threading.Event()

    def slow_start(item_id, ws):
        started.set()
        slow(item_id, ws)

    runner = threading.Thread(
        target=lambda: run_pass(
            wconn, MemoryBackend({"start_normalize_all_core_values": slow_start}), PassOptions()
        )
    )
    runner.start()
    assert started.wait(10)
    t.start()
    t.join(20)
    runner.join(20)
    # The newer claim (BLOCKED: its backend lacked the function) stands; the old one wrote nothing.
    assert wconn.execute("SELECT status FROM workflow_states").fetchone()[0] == "BLOCKED"


def test_complete_step_is_idempotent_and_completes_the_batch(wconn, seeded):
    batch = f.add_batch(wconn, seeded, STEPS, 2)
    run_pass(wconn, MemoryBackend(all_functions([])), PassOptions())
    async_ids = [
        r[0]
        for r in wconn.execute("SELECT id FROM workflow_states WHERE step_name=%s", (STEPS[1],))
    ]
    assert wconn.execute("SELECT wsctl.complete_step(%s)", (async_ids[0],)).fetchone()[0] is True
    assert wconn.execute("SELECT wsctl.complete_step(%s)", (async_ids[0],)).fetchone()[0] is False
    assert (
        wconn.execute("SELECT status FROM batches WHERE id=%s", (batch,)).fetchone()[0] == "PENDING"
    )
    wconn.execute("SELECT wsctl.complete_steps(%s)", (async_ids,))
    assert (
        wconn.execute("SELECT status FROM batches WHERE id=%s", (batch,)).fetchone()[0]
        == "COMPLETED"
    )
    assert f.states(wconn, batch) == [(STEPS[1], "COMPLETED", 2), (STEPS[0], "COMPLETED", 2)]


def test_cli_local_backend_and_json_summary(cli, conn, tmp_path, monkeypatch):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS, 2, workstream="apollo_scrape")
    f.add_batch(conn, client, STEPS, 1, workstream="linkedin_scrape")
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("WSCTL_TEST_CALLS", str(calls))
    app = str(FIXTURES / "local_app.py")
    r = cli("dispatch", "--once", "--backend", "local", "--app", app, "--json")
    # li_enrich raises: retried (exit 0: nothing blocked or failed in this pass).
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["claimed"] == 6 and doc["completed"] == 3 and doc["retried"] == 1
    assert set(doc) >= {
        "claimed",
        "dispatched",
        "completed",
        "blocked",
        "retried",
        "failed",
        "reconciled",
        "seconds",
    }
    recorded = [json.loads(x) for x in calls.read_text().splitlines()]
    assert {(c["fn"], c["workstream"]) for c in recorded} == {
        ("start_normalize_all_core_values", "apollo_scrape"),
        ("li_normalize_all_core_values", "linkedin_scrape"),
        ("start_enrich_company_via_waterfall_in_clay", "apollo_scrape"),
    }
    # Plain output under cron: no ANSI codes.
    r = cli("dispatch", "--once", "--backend", "local", "--app", app)
    assert r.code == 0 and "\x1b[" not in r.out and r.out.startswith("dispatch: claimed=")


def test_cli_verbose_logs_seed_format(cli, conn, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 1)
    item = conn.execute("SELECT item_id::text FROM workflow_states").fetchone()[0]
    r = cli(
        "dispatch", "--once", "--backend", "local", "--app", str(FIXTURES / "local_app.py"), "-v"
    )
    assert r.code == 0, r.err
    assert (
        f"Dispatched item {item} to start_normalize_all_core_values "
        "(type=sync, workstream=apollo_scrape)"
    ) in r.err


def test_cli_blocked_pass_exits_1(cli, conn):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 1, workstream=None)
    r = cli("dispatch", "--once", "--backend", "local", "--app", str(FIXTURES / "local_app.py"))
    assert r.code == 1
    assert "BLOCKED" in r.out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--backend", "local", "--app", "/nonexistent/app.py"], 3, "not found"),
        (["--backend", "local"], 3, "cannot import local app"),
        (["--backend", "carrier-pigeon"], 2, "modal"),
        (["--limit", "0"], 2, "--limit"),
        (["--once", "--loop"], 2, "exclude"),
        (["--workstream", "Bad Slug!"], 1, "invalid workstream"),
    ],
)
def test_cli_refusals_change_nothing(cli, conn, args, code, message):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 2)
    before = table_snapshot(conn)
    r = cli("dispatch", *args)
    assert r.code == code, (r.out, r.err)
    assert message in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert table_snapshot(conn) == before


def test_modal_backend_without_credentials_is_exit_3_even_when_nothing_is_due(
    cli, monkeypatch, tmp_path
):
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "none.toml"))
    import modal.config

    monkeypatch.setattr(modal.config, "_user_config", {}, raising=False)
    r = cli("dispatch", "--once", "--backend", "modal", "--app", "enrichment-worker")
    assert r.code == 3
    assert "Modal credentials missing" in r.err


def test_dry_run_prints_plan_and_claims_nothing(cli, conn):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 2)
    f.add_batch(conn, client, STEPS[:1], 1, workstream=None)
    before = table_snapshot(conn)
    r = cli(
        "dispatch",
        "--dry-run",
        "--backend",
        "local",
        "--app",
        str(FIXTURES / "local_app.py"),
        "--json",
    )
    assert r.code == 0, r.err
    plan = r.json()["plan"]
    assert len(plan) == 3
    assert sum(1 for p in plan if p["blocked_reason"]) == 1
    assert {p["function"] for p in plan if not p["blocked_reason"]} == {
        "start_normalize_all_core_values"
    }
    assert table_snapshot(conn) == before


def test_retry_requeues_blocked_and_failed(cli, conn):
    f.register_seed(conn)
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, STEPS[:1], 3)
    conn.execute(
        "UPDATE workflow_states SET status='BLOCKED', attempts=2, last_error='x'"
        " WHERE id IN (SELECT id FROM workflow_states LIMIT 2)"
    )
    r = cli("retry", "--batch", str(batch), "--status", "BLOCKED", "--json")
    assert r.code == 0, r.err
    assert r.json()["requeued"] == 2
    assert f.states(conn, batch) == [(STEPS[0], "PENDING", 3)]
    before = table_snapshot(conn)
    r = cli("retry", "--batch", str(uuid.uuid4()))
    assert r.code == 1 and "no batch" in r.err
    r = cli("retry", "--batch", "not-a-uuid")
    assert r.code == 1
    r = cli("retry", "--batch", str(batch), "--status", "COMPLETED")
    assert r.code == 2
    assert table_snapshot(conn) == before


def test_pipelined_writer_gives_the_same_outcome(wconn, seeded, db_url):
    """With a writer connection, multi-chunk passes over a two-step blueprint end the same."""
    a = f.add_batch(wconn, seeded, STEPS, 230, workstream="apollo_scrape")
    legacy = f.add_batch(wconn, seeded, STEPS[:1], 7, workstream=None)
    calls = []
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="t")) as writer:
        s = run_pass(
            wconn,
            MemoryBackend(all_functions(calls)),
            PassOptions(limit=1000, chunk_size=50),
            writer_conn=writer,
        )
    assert s.claimed == 230 + 230 + 7
    assert s.completed == 230 and s.blocked == 7 and s.dispatched == 460
    assert f.states(wconn, a) == [(STEPS[1], "DISPATCHED", 230), (STEPS[0], "COMPLETED", 230)]
    assert f.states(wconn, legacy) == [(STEPS[0], "BLOCKED", 7)]
    assert len(calls) == 460 and len(set(calls)) == 460


def test_callback_timeout_covers_rows_dispatched_before_wsctl(wconn, seeded):
    """Legacy DISPATCHED rows have no dispatched_at: their updated_at stands in."""
    batch = f.add_batch(wconn, seeded, ["enrich_company_via_waterfall_in_clay"], 2)
    wconn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED', dispatched_at = NULL,"
        " updated_at = now() - interval '3 hours' WHERE batch_id = %s",
        (batch,),
    )
    s = run_pass(wconn, MemoryBackend({}), PassOptions(callback_timeout=3600))
    assert s.failed == 2
    assert f.states(wconn, batch) == [("enrich_company_via_waterfall_in_clay", "FAILED", 2)]


def test_completion_in_a_cancelled_batch_enqueues_nothing(wconn, seeded):
    batch = f.add_batch(wconn, seeded, STEPS, 2)
    backend = MemoryBackend(all_functions([]), spawn=True)
    run_pass(wconn, backend, PassOptions())
    wconn.execute("UPDATE batches SET status = 'CANCELLED' WHERE id = %s", (batch,))
    ids = [
        r[0] for r in wconn.execute("SELECT id FROM workflow_states WHERE batch_id = %s", (batch,))
    ]
    assert wconn.execute("SELECT wsctl.complete_steps(%s)", (ids,)).fetchone()[0] == 2
    assert f.states(wconn, batch) == [(STEPS[0], "COMPLETED", 2)]
    assert run_pass(wconn, backend, PassOptions()).claimed == 0


def test_last_items_completing_in_parallel_transactions_complete_the_batch(wconn, seeded, db_url):
    """Two sessions complete the last two items at once: the batch must still end COMPLETED."""
    batch = f.add_batch(wconn, seeded, STEPS[:1], 2)
    ids = [
        r[0] for r in wconn.execute("SELECT id FROM workflow_states WHERE batch_id=%s", (batch,))
    ]
    a = psycopg.connect(db_url)
    b = psycopg.connect(db_url)
    try:
        a.execute("SELECT wsctl.complete_step(%s)", (ids[0],))
        done = threading.Event()

        def second():
            b.execute("SELECT wsctl.complete_step(%s)", (ids[1],))  # waits for a's batch lock
            b.commit()
            done.set()

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        a.commit()
        t.join(10)
        assert done.is_set()
    finally:
        a.close()
        b.close()
    assert (
        wconn.execute("SELECT status FROM batches WHERE id=%s", (batch,)).fetchone()[0]
        == "COMPLETED"
    )


def test_credentials_inside_a_modal_container(monkeypatch):
    from wsctl.dispatch.modal_backend import credentials_present

    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_IS_REMOTE", "1")
    assert credentials_present()


def test_cli_dispatch_defaults_come_from_wsctl_toml(cli, conn, tmp_path, monkeypatch):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 5)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("WSCTL_TEST_CALLS", str(calls))
    (tmp_path / "wsctl.toml").write_text(
        f'[dispatch]\nbackend = "local"\napp = "{FIXTURES / "local_app.py"}"\nlimit = 3\n'
    )
    r = cli("dispatch", "--once", "--json")
    assert r.code == 0, r.err
    assert r.json()["backend"] == "local" and r.json()["claimed"] == 3
    r = cli("dispatch", "--once", "--json", "--limit", "10")  # the option beats the file
    assert r.json()["claimed"] == 2
    assert len(calls.read_text().splitlines()) == 5


def test_completers_of_one_batch_do_not_deadlock(wconn, seeded, db_url):
    """Two sessions each enqueue next steps and finish last steps of the same batch."""
    rounds = 40
    for _ in range(rounds):
        batch = f.add_batch(wconn, seeded, STEPS, 40)
        first = [
            r[0]
            for r in wconn.execute(
                "SELECT id FROM workflow_states WHERE batch_id=%s ORDER BY id", (batch,)
            )
        ]
        # Half the items already at their last step (DISPATCHED), half at their first.
        wconn.execute(
            "UPDATE workflow_states SET status='COMPLETED' WHERE id = ANY(%s)", (first[:20],)
        )
        wconn.execute(
            "INSERT INTO workflow_states (item_id, batch_id, step_name, status)"
            " SELECT item_id, batch_id, %s, 'DISPATCHED' FROM workflow_states WHERE id = ANY(%s)",
            (STEPS[1], first[:20]),
        )
        last = [
            r[0]
            for r in wconn.execute(
                "SELECT id FROM workflow_states WHERE batch_id=%s AND step_name=%s",
                (batch, STEPS[1]),
            )
        ]
        work = [first[20:30] + last[:10], first[30:] + last[10:]]
        errors = []
        barrier = threading.Barrier(2)

        def complete(ids, barrier=barrier, errors=errors):
            try:
                with psycopg.connect(db_url) as c:
                    barrier.wait(5)
                    c.execute("SELECT wsctl.complete_steps(%s)", (ids,))
                    c.commit()
            except Exception as exc:  # pragma: no cover - what this test guards against
                errors.append(exc)

        threads = [threading.Thread(target=complete, args=(w,)) for w in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []


def test_states_of_a_cancelled_batch_are_cancelled_not_dispatched(wconn, seeded):
    batch = f.add_batch(wconn, seeded, STEPS[:1], 3)
    # e.g. a step enqueued while the batch was being cancelled
    wconn.execute("UPDATE batches SET status = 'CANCELLED' WHERE id = %s", (batch,))
    calls = []
    s = run_pass(wconn, MemoryBackend(all_functions(calls)), PassOptions())
    assert calls == [] and s.cancelled == 3 and s.dispatched == 0
    assert f.states(wconn, batch) == [(STEPS[0], "CANCELLED", 3)]


def test_retry_refuses_a_cancelled_batch(cli, conn):
    f.register_seed(conn)
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, STEPS[:1], 2, first_status="FAILED")
    conn.execute("UPDATE batches SET status = 'CANCELLED' WHERE id = %s", (batch,))
    before = table_snapshot(conn)
    r = cli("retry", "--batch", str(batch), "--status", "FAILED")
    assert r.code == 1 and "CANCELLED" in r.err
    assert table_snapshot(conn) == before


def test_retry_with_step_filter(cli, conn):
    f.register_seed(conn)
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, STEPS, 2, first_status="FAILED")
    conn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name, status)"
        " SELECT item_id, batch_id, %s, 'FAILED' FROM workflow_states WHERE batch_id = %s",
        (STEPS[1], batch),
    )
    r = cli("retry", "--batch", str(batch), "--step", STEPS[1], "--json")
    assert r.code == 0 and r.json()["requeued"] == 2
    assert f.states(conn, batch) == [(STEPS[1], "PENDING", 2), (STEPS[0], "FAILED", 2)]


def test_stale_reconcile_never_overwrites_a_newer_call(wconn, seeded):
    f.add_batch(wconn, seeded, STEPS[:1], 1)
    backend = MemoryBackend(all_functions([]), spawn=True)
    run_pass(wconn, backend, PassOptions())
    (call,) = [r[0] for r in wconn.execute("SELECT modal_call_id FROM workflow_states")]
    backend.outcomes[call] = Poll("raised", "ValueError: boom")

    def another_dispatcher_moves_on(call_ids):
        wconn.execute("UPDATE workflow_states SET modal_call_id = 'fc-newer'")

    backend.on_poll = another_dispatcher_moves_on
    s = run_pass(wconn, backend, PassOptions())
    assert s.retried == 0
    row = wconn.execute("SELECT status, modal_call_id, attempts FROM workflow_states").fetchone()
    assert row == ("DISPATCHED", "fc-newer", 0)


def test_returned_async_senders_are_not_polled_again(wconn, seeded):
    f.add_batch(wconn, seeded, ["enrich_company_via_waterfall_in_clay"], 2)
    backend = MemoryBackend(all_functions([]), spawn=True)
    run_pass(wconn, backend, PassOptions())
    calls = [r[0] for r in wconn.execute("SELECT modal_call_id FROM workflow_states")]
    for c in calls:
        backend.outcomes[c] = Poll("returned")
    run_pass(wconn, backend, PassOptions())
    assert sorted(backend.polled) == sorted(calls)
    backend.polled.clear()
    run_pass(wconn, backend, PassOptions())
    assert backend.polled == []  # their receivers complete them; nothing left to poll
    rows = wconn.execute("SELECT status, sender_returned_at IS NOT NULL FROM workflow_states")
    assert rows.fetchall() == [("DISPATCHED", True)] * 2


def test_leases_are_renewed_while_a_long_chunk_runs(wconn, seeded, db_url):
    f.add_batch(wconn, seeded, STEPS[:1], 6)
    calls = []

    def slow(item_id, ws):
        calls.append(item_id)
        time.sleep(0.4)

    runner = threading.Thread(
        target=run_pass,
        args=(
            wconn,
            MemoryBackend({"start_normalize_all_core_values": slow}),
            PassOptions(lease_seconds=1, concurrency=1),
        ),
    )
    runner.start()
    time.sleep(1.6)  # past the original lease, while the chunk still runs
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="t")) as other:
        s2 = run_pass(
            other, MemoryBackend({"start_normalize_all_core_values": slow}), PassOptions()
        )
    runner.join(20)
    assert s2.claimed == 0
    assert len(calls) == 6 == len(set(calls))


def test_an_item_that_keeps_killing_its_dispatcher_ends_failed(wconn, seeded):
    f.add_batch(wconn, seeded, STEPS[:1], 1)
    wconn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHING', attempts = 2,"
        " lease_expires_at = now() - interval '1 s', claim_token = gen_random_uuid()"
    )
    calls = []
    s = run_pass(wconn, MemoryBackend(all_functions(calls)), PassOptions(max_attempts=3))
    assert calls == [] and s.failed == 1
    status, attempts, err = wconn.execute(
        "SELECT status, attempts, last_error FROM workflow_states"
    ).fetchone()
    assert (status, attempts) == ("FAILED", 3) and "lease expired" in err


def test_local_app_prints_go_to_stderr_and_json_stays_parseable(cli, conn, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 2)
    app = tmp_path / "noisy_app.py"
    app.write_text(
        "def start_normalize_all_core_values(item_id, workstream_slug=None):\n"
        "    print(f'[SYNC] {item_id[:8]}... workstream={workstream_slug}')\n"
    )
    r = cli("dispatch", "--once", "--backend", "local", "--app", str(app), "--json")
    assert r.code == 0, r.err
    assert r.json()["completed"] == 2
    assert r.err.count("[SYNC]") == 2


def test_local_app_gets_the_cli_database_url(cli, conn, db_url, monkeypatch, tmp_path):
    """--database-url reaches the app's worker helpers (they read WSCTL_DATABASE_URL)."""
    monkeypatch.delenv("WSCTL_DATABASE_URL", raising=False)
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 1)
    app = tmp_path / "helper_app.py"
    app.write_text(
        "from wsctl.worker import get_workstream_slug\n"
        "def start_normalize_all_core_values(item_id, workstream_slug=None):\n"
        "    assert get_workstream_slug(item_id) == workstream_slug == 'apollo_scrape'\n"
    )
    r = cli("dispatch", "--once", "--backend", "local", "--app", str(app), "--json")
    assert r.code == 0, r.err
    assert r.json()["completed"] == 1


def test_app_without_database_url_stops_the_pass_with_exit_3(run_cli, conn, db_url, tmp_path):
    from wsctl.errors import EnvError

    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 3)
    app = tmp_path / "env_app.py"
    app.write_text(
        "from wsctl.errors import EnvError\n"
        "def start_normalize_all_core_values(item_id, workstream_slug=None):\n"
        "    raise EnvError('WSCTL_DATABASE_URL is not set')\n"
    )
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="t")) as c:
        from wsctl.dispatch.local import LocalBackend

        with pytest.raises(EnvError, match="released"):
            run_pass(c, LocalBackend(str(app)), PassOptions())
    assert {r[0] for r in conn.execute("SELECT status FROM workflow_states")} == {"PENDING"}


def test_dry_run_needs_no_modal_credentials(cli, conn, monkeypatch, tmp_path):
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(var, raising=False)
    import modal.config

    monkeypatch.setattr(modal.config, "_user_config", {}, raising=False)
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, STEPS[:1], 2)
    r = cli("dispatch", "--dry-run", "--backend", "modal", "--app", "enrichment-worker", "--json")
    assert r.code == 0, r.err
    assert len(r.json()["plan"]) == 2


def test_workstream_option_claims_only_that_workstream(wconn, seeded, cli):
    a = f.add_batch(wconn, seeded, STEPS[:1], 3, workstream="apollo_scrape")
    li = f.add_batch(wconn, seeded, STEPS[:1], 2, workstream="linkedin_scrape")
    legacy = f.add_batch(wconn, seeded, STEPS[:1], 1, workstream=None)
    # An expired lease in each workstream: only linkedin's may be reclaimed.
    wconn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHING', claim_token = gen_random_uuid(),"
        " lease_expires_at = now() - interval '1 s'"
        " WHERE id IN (SELECT DISTINCT ON (batch_id) id FROM workflow_states"
        "              WHERE batch_id IN (%s, %s) ORDER BY batch_id, id)",
        (a, li),
    )
    calls = []
    s = run_pass(
        wconn, MemoryBackend(all_functions(calls)), PassOptions(workstream="linkedin_scrape")
    )
    assert s.claimed == 2 and {c[0] for c in calls} == {"li_normalize_all_core_values"}
    assert f.states(wconn, li) == [(STEPS[0], "COMPLETED", 2)]
    assert f.states(wconn, a) == [(STEPS[0], "DISPATCHING", 1), (STEPS[0], "PENDING", 2)]
    assert f.states(wconn, legacy) == [(STEPS[0], "PENDING", 1)]
    r = cli(
        "dispatch",
        "--dry-run",
        "--workstream",
        "apollo_scrape",
        "--backend",
        "local",
        "--app",
        str(FIXTURES / "local_app.py"),
        "--json",
    )
    assert r.code == 0, r.err
    assert {p["workstream"] for p in r.json()["plan"]} == {"apollo_scrape"}
    assert len(r.json()["plan"]) == 3
