"""Pacing benchmark (issue 13): run with `python tests/benchmarks/bench_pacing.py`.

All in one run, on one PostgreSQL server (WSCTL_BENCH_DATABASE_URL, else
WSCTL_TEST_DATABASE_URL, else an embedded server), each on a fresh database:

1. the achieved rate under a limit: three `wsctl dispatch --loop` processes
   (local backend) over N items of an async step whose sender posts through
   `wsctl.clay.send` to a Clay stand-in on 127.0.0.1; the arrivals' mean rate
   against the limit's, and the worst window against `rate x t + burst`;
2. the no-op pass (20,000 items, as bench_dispatch.py) three ways: no key
   bound (the plain one-statement claim: the reference), a bound key no limit
   defines (the claim through the limits, nothing enforced), and a bound key
   with a limit too high to hold anything back (everything enforced); items/s
   and the ratio to the reference.

Benchmarks report numbers; the tests assert behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.benchdb import admin_url, connect, run_db  # noqa: E402
from tests.support import factories as f  # noqa: E402
from tests.support.clay_standin import ClayStandIn, max_in_window  # noqa: E402
from tests.support.commands import wsctl_argv  # noqa: E402
from wsctl import limits  # noqa: E402
from wsctl.dispatch import PassOptions, run_pass  # noqa: E402
from wsctl.dispatch.journal import Journal  # noqa: E402
from wsctl.dispatch.local import LocalBackend  # noqa: E402

CLAY = "enrich_company_via_waterfall_in_clay"
NOOP = "normalize_all_core_values"
APP_SOURCE = """
from wsctl import clay, worker

def start_normalize_all_core_values(item_id, workstream_slug=None):
    return None

def start_clay(item_id, workstream_slug=None):
    config = worker.get_client_config(item_id, "enrich_company_via_waterfall_in_clay",
                                      workstream_slug)
    with worker.connection() as conn:
        keys = worker.limit_keys(item_id, "enrich_company_via_waterfall_in_clay", conn=conn)
        clay.send(conn, config, {"item_id": item_id}, post=clay.http_post, limit_keys=keys)
"""


def _registry_id(c, step: str):
    return c.execute(
        "SELECT id FROM enrichment_registry WHERE slug = %s AND workstream_slug = 'apollo_scrape'",
        (step,),
    ).fetchone()[0]


def bench_rate(admin: str, app: Path, n: int, rate: int, burst: int, dispatchers: int) -> dict:
    url = run_db(admin, "wsctl_bench_pacing_rate")
    stand_in = ClayStandIn()
    with connect(url) as c:
        f.register(c, CLAY, "apollo_scrape", "async", "start_clay", "receive_clay")
        client = f.add_client(c)
        f.add_config(c, client, CLAY, "apollo_scrape", {
            "clay_table_webhook_url": f"{stand_in.url}/hook", "clay_workspace": "ws1",
            "clay_webhook_submission_cap": 1_000_000,
        })  # fmt: skip
        limits.bind_registry(c, _registry_id(c, CLAY), ["clay:{config.clay_workspace}"])
        limits.set_limit(c, "clay:ws1", rate=f"{rate}/s", burst=burst)
        f.add_batch(c, client, [CLAY], n)
    procs = [
        subprocess.Popen(
            wsctl_argv(
                url,
                "dispatch",
                "--loop",
                "--interval",
                "0.2",
                "--backend",
                "local",
                "--app",
                str(app),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ),
        )  # fmt: skip
        for _ in range(dispatchers)
    ]
    deadline = time.monotonic() + n / rate * 2 + 60
    while len(stand_in.times) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=60)
    stand_in.close()
    times = sorted(stand_in.times)
    span = times[-1] - times[0]
    worst = max(
        (max_in_window(times, t) - (rate * t + burst), t) for t in (0.1, 0.5, 1, 2, 5, 10, 30)
    )
    mean = (len(times) - 1) / span
    return {
        "items": n,
        "arrived": len(times),
        "dispatchers": dispatchers,
        "limit": f"{rate}/s burst {burst}",
        "seconds": round(span, 2),
        "mean_rate": round(mean, 2),
        "ratio_to_limit": round(mean / rate, 3),
        "worst_window_excess": worst[0],
        "worst_window_seconds": worst[1],
    }


def bench_noop(admin: str, app: Path, n: int, mode: str) -> dict:
    url = run_db(admin, f"wsctl_bench_pacing_{mode}")
    with connect(url) as c:
        f.register(c, NOOP, "apollo_scrape", "sync", "start_normalize_all_core_values")
        client = f.add_client(c)
        if mode != "unbound":
            limits.bind_registry(c, _registry_id(c, NOOP), ["noop:{client}"])
        if mode == "enforced":
            limits.set_limit(c, "noop:acme", rate="1000000/s", burst=1_000_000,
                             max_in_flight=1_000_000)  # fmt: skip
        f.add_batch(c, client, [NOOP], n)
        c.execute("VACUUM ANALYZE")
    journal = Journal(tempfile.mkdtemp(prefix="wsctl-bench-journal-"))
    with connect(url) as c, connect(url) as w:
        s = run_pass(
            c,
            LocalBackend(str(app)),
            PassOptions(limit=n, reconcile=False),
            writer_conn=w,
            connect=lambda: connect(url),
            journal=journal,
        )
        done = c.execute(
            "SELECT count(*) FROM workflow_states WHERE status='COMPLETED'"
        ).fetchone()[0]
    journal.close()
    assert done == n, (done, n)
    return {"mode": mode, "items": n, "seconds": s.seconds, "items_per_s": round(n / s.seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate-items", type=int, default=600)
    ap.add_argument("--rate", type=int, default=10)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--dispatchers", type=int, default=3)
    ap.add_argument("--noop-items", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    admin, server = admin_url()
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        app = Path(d) / "bench_pacing_app.py"
        app.write_text(APP_SOURCE)
        results["rate"] = bench_rate(
            admin, app, args.rate_items, args.rate, args.burst, args.dispatchers
        )
        rounds = []
        for _ in range(args.rounds):  # interleaved: the machine's noise hits all three alike
            rounds.append({m: bench_noop(admin, app, args.noop_items, m)
                           for m in ("unbound", "bound_undefined", "enforced")})  # fmt: skip
        results["noop_rounds"] = rounds
        best = {
            m: max(r[m]["items_per_s"] for r in rounds)
            for m in ("unbound", "bound_undefined", "enforced")
        }
        results["noop_best_items_per_s"] = best
        results["noop_ratio_to_unbound"] = {
            m: round(v / best["unbound"], 3) for m, v in best.items()
        }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            print(f"{k}: {v}")
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
