"""Any pooler, any port (issue 11 item 8): wsctl through a real PgBouncer in transaction mode.

PgBouncer (the Debian/Ubuntu package ``pgbouncer``) runs on a free loopback port
(never 6543, so nothing is guessed from the port) and no ``pooler`` setting is
given. A pooled server connection outlives its clients, and whatever a client
leaves on it (a prepared statement, a session setting, a session advisory
lock) meets the next client: the tests leave a psycopg prepared statement
``_pg3_0`` on the pool first, as another application behind the same pooler
would, and show that wsctl's defaults work where prepared statements fail.
Without pgbouncer installed these tests are skipped, saying so.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import FIXTURES, create_database, drop_database, url_for
from tests.support import factories as f
from tests.support.commands import wsctl_argv
from wsctl import db, migrations, settings


def _find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"):
        if os.access(path, os.X_OK):
            return path
    return None


PGBOUNCER = _find_pgbouncer()
pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (apt-get install -y pgbouncer): the transaction-mode "
    "pooler tests need a real PgBouncer",
)
STEP = "normalize_all_core_values"


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6543:
            return port


def _run_as(host: str) -> str | None:
    """PgBouncer refuses to run as root: run it as the owner of the server's socket
    directory (the embedded server's OS user), or nobody for a TCP server."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
        if owner != "root":
            return owner
    return "nobody"


@contextmanager
def pgbouncer(admin_url: str, *, pool_size: int) -> Iterator[Callable[[str], str]]:
    """A PgBouncer in transaction mode in front of the test server; yields dbname -> URL."""
    params = conninfo_to_dict(admin_url)
    host = str(params.get("host") or "127.0.0.1")
    server = f"host={host} port={params.get('port') or 5432}"
    if params.get("password"):
        server += f" password={params['password']}"
    user = str(params.get("user") or "postgres")
    port = _free_port()
    d = Path(tempfile.mkdtemp(prefix="wsctl-pgbouncer-"))
    (d / "users.txt").write_text(f'"{user}" ""\n')
    (d / "pgbouncer.ini").write_text(
        f"[databases]\n* = {server}\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {d / 'users.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 200\n"
        "server_reset_query =\nignore_startup_parameters = extra_float_digits\n"
        f"logfile = {d / 'pgbouncer.log'}\n"
    )
    (d / "pgbouncer.log").touch()
    run_as = _run_as(host)
    if run_as:
        for p in (d, *d.iterdir()):
            shutil.chown(p, user=run_as)
    argv = [PGBOUNCER, *(["-u", run_as] if run_as else []), str(d / "pgbouncer.ini")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def url(dbname: str) -> str:
        return url_for(admin_url, dbname, host="127.0.0.1", port=str(port))

    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(url("postgres"), connect_timeout=2) as c:
                    c.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (d / "pgbouncer.log").read_text()
                    raise RuntimeError(f"pgbouncer did not start: {log}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pooled_db(pg_admin_url, template_db):
    """A fresh migrated database, its direct URL and a pooler (pool of one) in front of it."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    direct = create_database(pg_admin_url, name, template=template_db)
    with pgbouncer(pg_admin_url, pool_size=1) as pooled:
        yield direct, pooled(name), name
    drop_database(pg_admin_url, name)


def _leave_a_prepared_statement(pooled_url: str) -> None:
    """What another psycopg client behind the same pooler leaves on the pooled server
    connection: its first prepared statement, "_pg3_0" (unless one is there already)."""
    if "_pg3_0" in _prepared_on_pool(pooled_url):
        return
    with psycopg.connect(pooled_url, autocommit=True, prepare_threshold=0) as c:
        c.execute("SELECT %s::int", (1,))
    assert _prepared_on_pool(pooled_url) == ["_pg3_0"]


def _prepared_on_pool(pooled_url: str) -> list[str]:
    with psycopg.connect(pooled_url, autocommit=True, prepare_threshold=None) as c:
        return [r[0] for r in c.execute("SELECT name FROM pg_prepared_statements")]


def test_wsctl_sends_no_prepared_statement_and_asking_for_them_fails(pooled_db):
    """The fault behind the issue's failures, at the connection: two clients sharing one
    pooled server connection both prepare "_pg3_0"; wsctl's default prepares nothing."""
    _, url, _ = pooled_db
    asked = settings.Settings(database_url=url, url_source="test", prepared_statements=True)
    with db.connect(url, asked) as a, db.connect(url, asked) as b:
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement, match="_pg3_0"):
            for i in range(6):  # psycopg prepares a statement on its 5th run
                a.execute("SELECT %s::int", (i,))
                b.execute("SELECT %s::int", (i,))
    default = settings.Settings(database_url=url, url_source="test")
    _leave_a_prepared_statement(url)
    with db.connect(url, default) as a, db.connect(url, default) as b:
        for i in range(20):
            assert a.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            assert b.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    assert _prepared_on_pool(url) == ["_pg3_0"]  # only what the other client left


def _legacy_batches(direct: str, n: int) -> list[uuid.UUID]:
    with psycopg.connect(direct, autocommit=True) as c:
        f.register(c, STEP, "apollo_scrape", "sync", "start_normalize_all_core_values")
        client = f.add_client(c)
        return [f.add_batch(c, client, [STEP], 1, workstream=None) for _ in range(n)]


def test_backfill_through_an_undeclared_pooler(pooled_db, run_cli, tmp_path):
    direct, url, _ = pooled_db
    ids = _legacy_batches(direct, 12)
    _leave_a_prepared_statement(url)
    (tmp_path / "wsctl.toml").write_text("[database]\nprepared_statements = true\n")
    r = run_cli("backfill", "workstream-slug", "--chunk-size", "2", url=url)
    assert r.code == 1 and 'prepared statement "_pg3_0" already exists' in r.err, r.err
    (tmp_path / "wsctl.toml").unlink()  # wsctl's defaults: no pooler setting at all
    r = run_cli("backfill", "workstream-slug", "--chunk-size", "2", url=url)
    assert r.code == 0, r.err
    with psycopg.connect(direct) as c:
        rows = c.execute(
            "SELECT workstream_slug, count(*) FROM batches WHERE id = ANY(%s) GROUP BY 1", (ids,)
        ).fetchall()
    assert rows == [("apollo_scrape", 12)]


def _start_loop(url: str, cwd: Path, calls: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WSCTL_DATABASE_URL")}
    env["WSCTL_TEST_CALLS"] = str(calls)
    return subprocess.Popen(
        wsctl_argv(url, "dispatch", "--loop")
        + ["--interval", "0.1", "--backend", "local", "--app", str(FIXTURES / "local_app.py")],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _loop(url: str, cwd: Path, calls: Path, seconds: float) -> tuple[int | None, str]:
    proc = _start_loop(url, cwd, calls)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_dispatch_loop_through_an_undeclared_pooler(pooled_db, tmp_path):
    direct, url, _ = pooled_db
    with psycopg.connect(direct, autocommit=True) as c:
        f.register(c, STEP, "apollo_scrape", "sync", "start_normalize_all_core_values")
        client = f.add_client(c)
    _leave_a_prepared_statement(url)
    (tmp_path / "wsctl.toml").write_text("[database]\nprepared_statements = true\n")
    code, err = _loop(url, tmp_path, tmp_path / "calls-prepared.jsonl", 20)
    assert code == 1 and 'prepared statement "_pg3_0" already exists' in err, (code, err)

    (tmp_path / "wsctl.toml").unlink()  # wsctl's defaults: no pooler setting at all
    with psycopg.connect(direct, autocommit=True) as c:
        batch = f.add_batch(c, client, [STEP], 40)
    calls = tmp_path / "calls.jsonl"
    deadline = time.monotonic() + 30
    proc = _start_loop(url, tmp_path, calls)
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        with psycopg.connect(direct) as c:
            done = c.execute(
                "SELECT count(*) FROM workflow_states WHERE batch_id = %s AND status = 'COMPLETED'",
                (batch,),
            ).fetchone()[0]
        if done == 40:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # a few more passes over nothing: still no error
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert still_running and done == 40, err
    assert proc.returncode == 0, err
    assert "prepared statement" not in err and "error" not in err.lower(), err
    assert len(calls.read_text().splitlines()) == 40  # each item's function ran once


def _server_sessions(pooled_url: str, direct: str, dbname: str, n: int) -> list[tuple]:
    """Session state of every pooled server connection: n clients each hold a transaction
    at once, so each sits on its own server connection, and together they cover the pool."""
    clients = [psycopg.connect(pooled_url, prepare_threshold=None) for _ in range(n)]
    try:
        seen = [
            c.execute(
                "SELECT pg_backend_pid(), current_setting('lock_timeout'),"
                " current_setting('statement_timeout'),"
                " (SELECT count(*) FROM pg_prepared_statements)"
            ).fetchone()
            for c in clients
        ]
        with psycopg.connect(direct) as c:
            servers = {
                r[0]
                for r in c.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend'",
                    (dbname,),
                )
            }
        assert {s[0] for s in seen} == servers  # every server connection of the pool probed
        return sorted(s[1:] for s in seen)
    finally:
        for c in clients:
            c.close()


def test_migrate_through_an_undeclared_pooler_leaves_no_session_state(
    pg_admin_url, run_cli, tmp_path
):
    name = f"t_{uuid.uuid4().hex[:16]}"
    direct = create_database(pg_admin_url, name)
    try:
        with pgbouncer(pg_admin_url, pool_size=3) as pooled:
            url = pooled(name)
            r = run_cli("migrate", "--ddl-lock-timeout", "7s", url=url)
            assert r.code == 0, r.err
            r = run_cli("migrate", "--status", "--json", url=url)
            assert r.code == 0 and r.json()["pending"] == []
            with psycopg.connect(direct) as c:
                versions = [v for (v,) in c.execute("SELECT version FROM wsctl.schema_migrations")]
                advisory = c.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = %s)",
                    (name,),
                ).fetchone()[0]
                invalid = c.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid")
                assert invalid.fetchone()[0] == 0
            assert sorted(versions) == [m.version for m in migrations.load_migrations()]
            assert advisory == 0
            assert _server_sessions(url, direct, name, 3) == [("0", "0", 0)] * 3
            # The probe sees what a client leaves on a server connection: the session
            # lock_timeout the old migrate set with set_config(..., false).
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("SELECT set_config('lock_timeout', '7s', false)")
            assert ("7s", "0", 0) in _server_sessions(url, direct, name, 3)
    finally:
        drop_database(pg_admin_url, name)


def test_migrate_lock_serializes_two_runs_through_the_pooler(pg_admin_url, tmp_path):
    """The migrate lock is a transaction lock on its own connection: through the pooler
    a second run waits for it, then finds nothing to do."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    create_database(pg_admin_url, name)
    try:
        with pgbouncer(pg_admin_url, pool_size=6) as pooled:
            url = pooled(name)
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "WSCTL_DATABASE_URL")
            }
            procs = [
                subprocess.Popen(
                    wsctl_argv(url, "migrate"),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=tmp_path,
                )
                for _ in range(2)
            ]
            results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
            assert [r[0] for r in results] == [0, 0], results
            assert sum("applied 0001" in r[1] for r in results) == 1
            assert sum("nothing to apply" in r[1] for r in results) == 1
    finally:
        drop_database(pg_admin_url, name)
