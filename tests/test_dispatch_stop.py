"""Graceful stop: SIGTERM/SIGINT, --max-seconds and --grace, and the crontab line's budget."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support import factories as f
from tests.support.commands import wsctl_argv
from wsctl import db, settings
from wsctl.dispatch import PassOptions, run_pass
from wsctl.dispatch.memory import MemoryBackend

ROOT = Path(__file__).resolve().parents[1]
STEP = "normalize_all_core_values"
TWO = [STEP, "enrich_company_via_waterfall_in_clay"]

# Each run appends its item id to RUNS_FILE (counted across passes), then sleeps.
APP = """
import os, time

def start_normalize_all_core_values(item_id, workstream_slug=None):
    with open(os.environ["RUNS_FILE"], "a") as fh:
        fh.write(item_id + "\\n")
        fh.flush()
    time.sleep(float(os.environ.get("SLEEP", "1")))

def li_normalize_all_core_values(item_id, workstream_slug=None):
    return None

def start_enrich_company_via_waterfall_in_clay(item_id, workstream_slug=None):
    return None
"""


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "counting_app.py"
    path.write_text(APP)
    return path


def _runs(path: Path) -> Counter:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def _statuses(conn) -> Counter:
    return Counter(
        (r[0], r[1])
        for r in conn.execute(
            "SELECT status, attempts FROM workflow_states WHERE step_name = %s", (STEP,)
        )
    )


def _once(url: str, app: Path, runs: Path, *extra: str, sleep: str = "1") -> subprocess.Popen:
    env = {**os.environ, "RUNS_FILE": str(runs), "SLEEP": sleep}
    return subprocess.Popen(
        wsctl_argv(url, "dispatch", "--once",
         "--backend", "local", "--app", str(app), "--concurrency", "4", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_runs(runs: Path, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sum(_runs(runs).values()) < n:
        assert time.monotonic() < deadline, "the functions never started"
        time.sleep(0.02)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_claiming_lets_running_finish_and_releases_the_rest(
    db_url, conn, app, tmp_path, sig, code
):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, TWO, 20)
    runs = tmp_path / "runs"
    p = _once(db_url, app, runs, "--grace", "5")
    _wait_runs(runs, 4)  # the first four (concurrency 4) are running
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"wsctl: error: stopped by {sig.name}: "), err
    assert "0 still running left to their lease" in lines[0]
    ran = _runs(runs)
    st = _statuses(conn)
    # Those that ran finished and were recorded; the rest went back, attempts unchanged.
    assert st[("COMPLETED", 0)] == len(ran) and st[("PENDING", 0)] == 20 - len(ran)
    assert sum(st.values()) == 20 and 4 <= len(ran) < 20
    assert f"{20 - len(ran)} claim(s) never started released to PENDING" in lines[0]
    # The next pass runs only the released ones: nothing ran twice.
    p = _once(db_url, app, runs, sleep="0")
    p.communicate(timeout=60)
    assert p.returncode == 0
    assert len(_runs(runs)) == 20 and set(_runs(runs).values()) == {1}
    assert _statuses(conn) == {("COMPLETED", 0): 20}


def test_functions_outliving_the_grace_are_left_to_their_lease(db_url, conn, app, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 10)
    runs = tmp_path / "runs"
    p = _once(db_url, app, runs, "--grace", "0.3", sleep="3")
    # The first call of a chunk runs alone (the inline probe for instant
    # functions); once it proved slow, four run at once.
    _wait_runs(runs, 5)
    started = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 143 and time.monotonic() - started < 2.5, err
    assert (
        "1 outcome(s) recorded, 5 claim(s) never started released to PENDING, "
        "4 still running left to their lease"
    ) in err
    st = Counter(r[0] for r in conn.execute("SELECT status FROM workflow_states"))
    assert st == {"COMPLETED": 1, "PENDING": 5, "DISPATCHING": 4}


def test_max_seconds_stops_claiming_and_starting(db_url):
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="t")) as c:
        f.register_seed(c)
        client = f.add_client(c)
        f.add_batch(c, client, [STEP], 30)
        ran: list[str] = []

        def slow(item_id, ws):
            ran.append(item_id)
            time.sleep(0.1)

        s = run_pass(
            c,
            MemoryBackend({"start_normalize_all_core_values": slow}),
            PassOptions(concurrency=1, max_seconds=0.35, grace=1),
        )
        assert s.stopped_by == "max_seconds" and 2 <= len(ran) < 30
        assert s.completed == len(ran) and s.released == 30 - len(ran)
        assert _statuses(c) == {("COMPLETED", 0): len(ran), ("PENDING", 0): 30 - len(ran)}


def test_loop_stops_gracefully_with_exit_0_and_one_line(db_url, conn, app, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 12)
    runs = tmp_path / "runs"
    env = {**os.environ, "RUNS_FILE": str(runs), "SLEEP": "1"}
    p = subprocess.Popen(
        wsctl_argv(db_url, "dispatch", "--loop",
         "--interval", "0.1", "--backend", "local", "--app", str(app), "--concurrency", "4"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    _wait_runs(runs, 4)
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert re.search(r"stopped by SIGTERM: \d+ outcome\(s\) recorded, \d+ claim", err), err
    st = Counter(r[0] for r in conn.execute("SELECT status FROM workflow_states"))
    assert "DISPATCHING" not in st


def test_loop_stopped_between_passes_says_so_with_the_counts(db_url, conn, app, tmp_path):
    f.register_seed(conn)
    p = subprocess.Popen(
        wsctl_argv(db_url, "dispatch", "--loop",
         "--interval", "30", "--backend", "local", "--app", str(app)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.0)  # the first (empty) pass is done: it waits for the next
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert (
        "stopped by SIGTERM: 0 outcome(s) recorded, 0 claim(s) never started released to "
        "PENDING, 0 still running left to their lease" in err
    ), err


# -- the crontab line, run as cron runs it ---------------------------------------------


def _crontab() -> tuple[str, str]:
    text = (ROOT / "examples" / "crontab.example").read_text()
    path = next(line for line in text.splitlines() if line.startswith("PATH="))
    job = next(line for line in text.splitlines() if line.startswith("* * * * * "))
    return path[len("PATH=") :], job[len("* * * * * ") :]


def _cron_run(
    tmp_path: Path, db_url: str, app: Path, *, budget: str | None, config: str, sleep: str
):
    """The crontab's job line with its paths pointed at this test, under cron's bare environment."""
    path, job = _crontab()
    assert "/opt/wsctl/.venv/bin" in path and "timeout -s TERM -k 5 55 " in job
    assert "flock -n " in job
    venv_bin = str(Path(sys.executable).parent)
    assert (Path(venv_bin) / "wsctl").exists(), "the README's install puts wsctl in .venv/bin"
    env_file = tmp_path / "env"
    cfg = tmp_path / "xdg" / "wsctl"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "wsctl.toml").write_text(config)
    env_file.write_text(
        f"WSCTL_DATABASE_URL={shlex.quote(db_url)}\nXDG_CONFIG_HOME={tmp_path / 'xdg'}\n"
        f"RUNS_FILE={tmp_path / 'runs'}\nSLEEP={sleep}\n"
    )
    job = (
        job.replace("/etc/wsctl/env", str(env_file))
        .replace("/tmp/wsctl-dispatch.lock", str(tmp_path / "lock"))
        .replace("/var/log/wsctl/dispatch.log", str(tmp_path / "dispatch.log"))
    )
    if budget is not None:  # the same shape with a test-sized budget
        job = job.replace("timeout -s TERM -k 5 55 ", f"timeout -s TERM -k 5 {budget} ")
    cron_env = {
        "PATH": path.replace("/opt/wsctl/.venv/bin", venv_bin),
        "SHELL": "/bin/bash",
        "HOME": str(tmp_path),
        "LOGNAME": "cron",
    }
    return subprocess.run(
        ["/bin/bash", "-c", job], env=cron_env, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_the_crontab_line_runs_a_pass_within_its_budget(db_url, conn, app, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 30)
    config = (
        f'[dispatch]\nbackend = "local"\napp = "{app}"\nconcurrency = 2\n'
        "max_seconds = 1.0\ngrace = 2.0\n"
    )
    r = _cron_run(tmp_path, db_url, app, budget=None, config=config, sleep="0.2")
    log = (tmp_path / "dispatch.log").read_text()
    assert r.returncode == 0, (r.stderr, log)
    assert log.startswith("dispatch: claimed=30 ") and "released=" in log
    st = Counter(
        r[0] for r in conn.execute("SELECT status FROM workflow_states WHERE step_name=%s", (STEP,))
    )
    assert set(st) == {"COMPLETED", "PENDING"} and sum(st.values()) == 30


def test_the_crontab_line_timeout_is_a_graceful_stop(db_url, conn, app, tmp_path):
    f.register_seed(conn)
    client = f.add_client(conn)
    f.add_batch(conn, client, [STEP], 20)
    config = f'[dispatch]\nbackend = "local"\napp = "{app}"\nconcurrency = 2\ngrace = 3.0\n'
    # timeout's SIGTERM arrives mid-pass (the budget scaled from 55 s to 2 s).
    r = _cron_run(tmp_path, db_url, app, budget="2", config=config, sleep="0.5")
    log = (tmp_path / "dispatch.log").read_text()
    # timeout reports 124 for a command it had to stop; wsctl's own line is in the log
    assert "wsctl dispatch exited 124" in r.stderr, (r.stderr, log)
    assert "stopped by SIGTERM: " in log and "0 still running left to their lease" in log
    st = Counter(
        r[0] for r in conn.execute("SELECT status FROM workflow_states WHERE step_name=%s", (STEP,))
    )
    assert "DISPATCHING" not in st and sum(st.values()) == 20
    assert st["COMPLETED"] == len(_runs(tmp_path / "runs"))


def test_the_crontab_lines_flock_skips_a_minute_while_a_pass_runs(db_url, conn, app, tmp_path):
    import fcntl

    config = f'[dispatch]\nbackend = "local"\napp = "{app}"\n'
    with open(tmp_path / "lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        r = _cron_run(tmp_path, db_url, app, budget=None, config=config, sleep="0")
    assert "wsctl dispatch exited 1" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_crontab_line_is_one_line_with_the_budget():
    _path, job = _crontab()
    words = shlex.split(job.split(" >> ")[0].split("set +a; ")[1])
    assert words[:3] == ["flock", "-n", "/tmp/wsctl-dispatch.lock"]
    assert words[3:9] == ["timeout", "-s", "TERM", "-k", "5", "55"]
    assert words[9:] == ["wsctl", "dispatch", "--once"]
    assert settings.DEFAULT_DISPATCH.max_seconds + settings.DEFAULT_DISPATCH.grace <= 55
