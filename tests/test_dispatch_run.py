"""wsctl.dispatch.run: a run as the CLI starts it (backend, journal, signals, the workers'
database), called as a library on a real PostgreSQL."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from tests.support import factories as f
from wsctl import db, settings
from wsctl.dispatch import run
from wsctl.errors import UsageError

STEP = "normalize_all_core_values"


@pytest.fixture
def worker_settings(db_url):
    return settings.Settings(database_url=db_url, url_source="test")


@pytest.fixture
def connect(worker_settings, db_url):
    from wsctl import migrations

    def _connect(*, require_schema: bool = True):
        c = db.connect(db_url, worker_settings)
        if require_schema:
            migrations.require_up_to_date(c)
        return c

    return _connect


def _app(tmp_path, body: str) -> str:
    path = tmp_path / "run_app.py"
    path.write_text(
        "import os, signal\n"
        "from wsctl.worker import get_workstream_slug\n"
        "seen = []\n"
        "def start_normalize_all_core_values(item_id, workstream_slug=None):\n" + body
    )
    return str(path)


def _cfg(tmp_path, app: str, **options):
    return settings.DispatchSettings().resolve(
        backend="local", app=app, journal_dir=str(tmp_path / "journal"), **options
    )


def _states(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM workflow_states GROUP BY 1").fetchall())


def test_a_pass_hands_the_workers_its_database_without_the_environment(
    conn, connect, worker_settings, tmp_path
):
    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], 3)
    app = _app(
        tmp_path,
        "    seen.append((os.environ.get('WSCTL_DATABASE_URL'), get_workstream_slug(item_id)))\n",
    )
    cfg = _cfg(tmp_path, app)
    result = run.run(connect, cfg, cfg.pass_options(), worker_settings=lambda: worker_settings)
    assert result.signal is None and result.exit_code is None and result.passes == 1
    assert result.summary is not None and result.summary.completed == 3
    assert _states(conn) == {"COMPLETED": 3}
    from wsctl.dispatch.local import load_app

    module = load_app(app)  # the module the pass imported (cached by path)
    # the helpers reached the database; WSCTL_DATABASE_URL was never set for them
    assert module.seen == [(None, "apollo_scrape")] * 3
    assert "WSCTL_DATABASE_URL" not in os.environ
    # scoped to the run: afterwards a bare load() reads the files and environment again
    assert settings.load().database_url is None


def test_without_worker_settings_the_helpers_have_no_database(conn, connect, tmp_path):
    """The hand-over is what gives them one: without it the pass stops (exit 3 in the CLI)."""
    from wsctl.errors import EnvError

    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], 2)
    app = _app(tmp_path, "    get_workstream_slug(item_id)\n")
    cfg = _cfg(tmp_path, app)
    with pytest.raises(EnvError, match="released"):
        run.run(connect, cfg, cfg.pass_options())
    assert _states(conn) == {"PENDING": 2}


def test_a_signal_stops_the_pass_and_the_handlers_are_restored(conn, connect, tmp_path):
    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], 1)
    app = _app(tmp_path, "    os.kill(os.getpid(), signal.SIGTERM)\n")
    cfg = _cfg(tmp_path, app)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    heard = []
    stopped = []
    result = run.run(
        connect,
        cfg,
        cfg.pass_options(),
        on_signal=heard.append,
        on_stop=stopped.append,
    )
    assert result.signal is signal.SIGTERM and result.exit_code == 143
    assert heard == [signal.SIGTERM] and stopped == [result.summary]
    assert result.summary is not None and result.summary.stopped_by == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_loop_runs_passes_until_a_signal(conn, connect, worker_settings, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 2)
    # the first pass completes both; the third pass's function is a new batch's, and stops it
    app = _app(
        tmp_path,
        "    seen.append(item_id)\n"
        "    if len(seen) > 2:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n",
    )
    cfg = _cfg(tmp_path, app, interval=0.05)
    passes = []

    def on_pass(summary):
        passes.append(summary)
        if len(passes) == 2:
            f.add_batch(conn, client, [STEP], 1)

    result = run.run(
        connect,
        cfg,
        cfg.pass_options(),
        worker_settings=lambda: worker_settings,
        loop=True,
        on_pass=on_pass,
    )
    assert result.signal is signal.SIGINT and result.exit_code == 130
    assert result.passes == len(passes) >= 3 and result.summary is passes[-1]
    assert passes[0].completed == 2
    assert _states(conn) == {"COMPLETED": 3}


def test_a_negative_interval_is_refused_before_anything_runs(conn, connect, tmp_path):
    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], 1)
    cfg = _cfg(tmp_path, _app(tmp_path, "    pass\n"), interval=-1)
    with pytest.raises(UsageError, match="--interval"):
        run.run(connect, cfg, cfg.pass_options(), loop=True)
    assert not (tmp_path / "journal").exists()
    assert _states(conn) == {"PENDING": 1}


def test_options_out_of_range_are_refused(connect, tmp_path):
    cfg = _cfg(tmp_path, _app(tmp_path, "    pass\n"), limit=0)
    with pytest.raises(UsageError, match="--limit must be at least 1"):
        run.run(connect, cfg, cfg.pass_options())
    with pytest.raises(UsageError, match="--limit must be at least 1"):
        run.dry_run(connect, cfg, cfg.pass_options())


def test_dry_run_plans_and_claims_nothing(conn, connect, tmp_path):
    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], 3)
    cfg = _cfg(tmp_path, _app(tmp_path, "    pass\n"), limit=2)
    p = run.dry_run(connect, cfg, cfg.pass_options())
    assert len(p.rows) == 2 and p.total == 3
    assert _states(conn) == {"PENDING": 3}


def test_a_run_from_another_thread_leaves_the_signal_handlers_alone(
    conn, connect, worker_settings, tmp_path
):
    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], 2)
    cfg = _cfg(tmp_path, _app(tmp_path, "    get_workstream_slug(item_id)\n"))
    out: list = []
    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(
        target=lambda: out.append(
            run.run(connect, cfg, cfg.pass_options(), worker_settings=lambda: worker_settings)
        )
    )
    t.start()
    t.join(60)
    assert out and out[0].summary.completed == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_item_log_lines_go_to_stderr_for_the_run_only(conn, connect, tmp_path, capsys):
    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], 1)
    cfg = _cfg(tmp_path, _app(tmp_path, "    pass\n"))
    logger = logging.getLogger("wsctl.dispatch")
    handlers, level = list(logger.handlers), logger.level
    run.run(connect, cfg, cfg.pass_options(), log_items=True)
    assert STEP in capsys.readouterr().err
    assert logger.handlers == handlers and logger.level == level


def test_in_process_workers_is_scoped_stacked_and_seen_from_threads(db_url, tmp_path):
    a = settings.Settings(database_url="postgresql://a@h/x", url_source="a")
    b = settings.Settings(database_url="postgresql://b@h/x", url_source="b")
    seen = []
    with settings.in_process_workers(a):
        with settings.in_process_workers(b):
            t = threading.Thread(target=lambda: seen.append(settings.load().database_url))
            t.start()
            t.join()
        seen.append(settings.load().url_source)
        # explicit arguments are never overridden
        assert settings.load("postgresql://c@h/x").database_url == "postgresql://c@h/x"
        assert settings.load(env={}).url_source == "embedded"
    assert seen == ["postgresql://b@h/x", "a"]
    assert settings.load().url_source == "embedded"
    with pytest.raises(ValueError, match="database URL"):
        with settings.in_process_workers(settings.Settings(database_url=None, url_source="x")):
            pass


# --- the loop's failure paths (wsctl.dispatch.loop.run_loop) ---------------------------------


def _loop_world(conn, n=1):
    from wsctl.dispatch.memory import MemoryBackend

    f.register_seed(conn)
    f.add_batch(conn, f.add_client(conn), [STEP], n)
    calls = []
    backend = MemoryBackend({"start_normalize_all_core_values": lambda i, w: calls.append(i)})
    return backend, calls


def _run_loop_until_a_pass(connect, backend, errors, passes):
    from wsctl.dispatch.engine import PassOptions
    from wsctl.dispatch.loop import run_loop

    stop = threading.Event()

    def on_pass(summary):
        passes.append(summary)
        stop.set()

    return run_loop(
        connect,
        backend,
        PassOptions(),
        interval=0.01,
        stop=stop,
        on_pass=on_pass,
        on_error=errors.append,
    )


def test_the_loop_retries_an_unreachable_database_then_runs(conn, connect):
    from wsctl.errors import DatabaseUnavailable

    backend, calls = _loop_world(conn)
    attempts = []

    def flaky(*, require_schema: bool = True):
        attempts.append(require_schema)
        if len(attempts) == 1:
            raise DatabaseUnavailable("database unreachable: connection refused")
        return connect(require_schema=require_schema)

    errors: list[str] = []
    passes: list = []
    assert _run_loop_until_a_pass(flaky, backend, errors, passes) == 1
    assert errors == ["database unreachable: connection refused; retrying in 0.5s"]
    assert passes[0].completed == 1 and len(calls) == 1


def test_the_loop_reconnects_after_a_connection_lost_mid_loop(conn, connect):
    """The server ends the loop's connection: reported, closed, and a new one used."""
    backend, calls = _loop_world(conn)
    opened = []

    def connect_then_lose_the_first(*, require_schema: bool = True):
        c = connect(require_schema=require_schema)
        opened.append(c)
        if len(opened) == 1:  # terminated under the client: it only finds out on its next use
            conn.execute("SELECT pg_terminate_backend(%s)", (c.info.backend_pid,))
        return c

    errors: list[str] = []
    passes: list = []
    assert _run_loop_until_a_pass(connect_then_lose_the_first, backend, errors, passes) == 1
    assert len(errors) == 1 and errors[0].startswith("database connection lost: ")
    assert errors[0].endswith("; retrying in 0.5s")
    assert opened[0].closed and passes[0].completed == 1 and len(calls) == 1
    for c in opened:
        c.close()


def test_an_environment_error_other_than_unreachable_stops_the_loop(conn):
    from wsctl.errors import EnvError

    backend, calls = _loop_world(conn)

    def refused(*, require_schema: bool = True):
        raise EnvError("password authentication failed")

    errors: list[str] = []
    with pytest.raises(EnvError, match="password authentication"):
        _run_loop_until_a_pass(refused, backend, errors, [])
    assert errors == [] and calls == []
