"""Pacing, fleet-wide (issue: pacing, "Done when"): three `wsctl dispatch --loop` processes
at once (local backend) against a Clay stand-in on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from tests.support import factories as f
from tests.support.clay_standin import ClayStandIn, max_in_window
from tests.support.commands import wsctl_argv

STEP = "enrich_company_via_waterfall_in_clay"

# The sender of an async step posts the item to the client's Clay table through
# wsctl.clay.send, taking a token under the step's limit keys just before the POST.
APP = """
from wsctl import clay, worker

STEP = "enrich_company_via_waterfall_in_clay"

def start_clay(item_id, workstream_slug=None):
    config = worker.get_client_config(item_id, STEP, workstream_slug)
    with worker.connection() as conn:
        keys = worker.limit_keys(item_id, STEP, conn=conn)
        clay.send(conn, config, {"item_id": item_id}, post=clay.http_post, limit_keys=keys)
"""


def _fleet(db_url, app, n=3, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [
        subprocess.Popen(
            wsctl_argv(
                db_url,
                "dispatch",
                "--loop",
                "--interval",
                "0.2",
                "--backend",
                "local",
                "--app",
                str(app),
                "--json",
                *extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(n)
    ]


def _stop(procs):
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    return outs


def _wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "clay_app.py"
    path.write_text(APP)
    return path


def _setup(cli, conn, stand_in, *, n, type_, limit_args):
    client = f.add_client(conn)
    f.add_config(conn, client, STEP, "apollo_scrape", {
        "clay_table_webhook_url": f"{stand_in.url}/hook", "clay_workspace": "ws1"
    })  # fmt: skip
    receiver = ["--receiver", "receive_clay"] if type_ == "async" else []
    r = cli("registry", "add", "--workflow", STEP, "--workstream", "apollo_scrape",
            "--type", type_, "--sender", "start_clay", *receiver,
            "--limit-key", "clay:{config.clay_workspace}")  # fmt: skip
    assert r.code == 0, r.err
    r = cli("limit", "set", "clay:ws1", *limit_args)
    assert r.code == 0, r.err
    return f.add_batch(conn, client, [STEP], n)


def test_three_loop_dispatchers_keep_clay_within_10_per_second_burst_20(cli, conn, db_url, app):
    stand_in = ClayStandIn()
    try:
        _setup(cli, conn, stand_in, n=600, type_="async",
               limit_args=["--rate", "10/s", "--burst", "20"])  # fmt: skip
        procs = _fleet(db_url, app)
        try:
            _wait_for(lambda: len(stand_in.times) >= 600, timeout=150)
            time.sleep(1.0)  # anything more would arrive now
        finally:
            _stop(procs)
    finally:
        stand_in.close()
    times = sorted(stand_in.times)
    items = Counter(body["item_id"] for _path, body in stand_in.arrivals)
    assert len(items) == 600 and set(items.values()) == {1}  # each item posted once
    assert len(times) == 600
    # at most 10 x t + 20 arrivals in every window of t seconds
    for t in (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60):
        assert max_in_window(times, t) <= 10 * t + 20, (t, max_in_window(times, t))
    # a mean rate of at least 9/s over the run
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate >= 9.0, rate
    states = dict(conn.execute(
        "SELECT status, count(*) FROM workflow_states GROUP BY 1").fetchall())  # fmt: skip
    assert states == {"DISPATCHED": 600}  # waiting for Clay's callbacks
    attempts = conn.execute("SELECT max(attempts) FROM workflow_states").fetchone()[0]
    assert attempts == 0


def test_max_in_flight_5_holds_across_three_dispatchers(cli, conn, db_url, app):
    stand_in = ClayStandIn(hold=0.5)
    try:
        _setup(cli, conn, stand_in, n=40, type_="sync", limit_args=["--max-in-flight", "5"])
        procs = _fleet(db_url, app)
        try:
            _wait_for(lambda: len(stand_in.arrivals) >= 40, timeout=120)
            time.sleep(0.5)
        finally:
            _stop(procs)
    finally:
        stand_in.close()
    # never more than 5 at once (and several at once: the cap, not one dispatcher, decides;
    # the local backend runs a chunk's first call alone, so 5 are not always reached)
    assert 2 <= stand_in.max_open <= 5, stand_in.max_open
    assert len(stand_in.times) == 40
    items = Counter(body["item_id"] for _path, body in stand_in.arrivals)
    assert len(items) == 40 and set(items.values()) == {1}
    done = conn.execute(
        "SELECT count(*) FROM workflow_states WHERE status = 'COMPLETED'").fetchone()[0]  # fmt: skip
    assert done == 40


def test_a_once_pass_paces_to_max_seconds_and_reaches_90_percent(cli, conn, db_url, app):
    stand_in = ClayStandIn()
    try:
        _setup(cli, conn, stand_in, n=200, type_="async",
               limit_args=["--rate", "20/s", "--burst", "10"])  # fmt: skip
        p = subprocess.run(
            wsctl_argv(db_url, "dispatch", "--once",
             "--backend", "local", "--app", str(app), "--max-seconds", "4", "--json"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        stand_in.close()
    assert p.returncode == 0, p.stderr
    import json

    doc = json.loads(p.stdout)
    n = len(stand_in.times)
    # 90 % of rate x max-seconds + burst at least; never more than the limit allows
    assert 0.9 * (20 * 4 + 10) <= n <= 20 * 4.5 + 10, n
    assert doc["dispatched"] == n and doc["stopped_by"] == "max_seconds"
    # the states it examined and held back (not every remaining one: a paced claim looks
    # at a few dozen at a time)
    assert list(doc["deferred"]) == ["clay:ws1"] and 0 < doc["deferred"]["clay:ws1"] <= 200 - n
    times = sorted(stand_in.times)
    assert times[-1] - times[0] >= 3.0  # spread over the pass
    for t in (0.1, 0.5, 1, 2):
        assert max_in_window(times, t) <= 20 * t + 10
