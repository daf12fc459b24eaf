"""Dispatch benchmark (issue 5): run with `python tests/benchmarks/bench_dispatch.py`.

All measurements in one run, on one PostgreSQL server (WSCTL_BENCH_DATABASE_URL,
an admin URL that may create databases, else WSCTL_TEST_DATABASE_URL, else an
embedded server), each on a freshly migrated database:

1. a pass over 20,000 items with a no-op local function (items/s from the
   pass's own `seconds`: first claim to last commit, start-up excluded);
2. a pass over 4,000 items with a 20 ms function at concurrency 64, against
   the ideal 4000 x 0.02 / 64 s;
3. spawns/s through the real modal client against the loopback stand-in,
   against a bare `asyncio.gather` of `spawn.aio` calls on the same stand-in;
4. for comparison, a loop shaped like the seed's orchestrator (one item per
   round trip) on the same data;
5. PgQueuer draining the same number of no-op jobs (batch 100), if pgqueuer
   is installed (`pip install pgqueuer`).

Benchmarks report numbers; the tests assert behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.benchdb import admin_url, connect, run_db  # noqa: E402
from tests.support import factories as f  # noqa: E402
from wsctl.dispatch import PassOptions, run_pass  # noqa: E402
from wsctl.dispatch.journal import Journal  # noqa: E402
from wsctl.dispatch.local import LocalBackend  # noqa: E402

STEP = "normalize_all_core_values"
APP_SOURCE = """
import time

def start_normalize_all_core_values(item_id, workstream_slug=None):
    return None

def sleepy(item_id, workstream_slug=None):
    time.sleep(0.02)
"""


def seed(url: str, n: int, sender: str = "start_normalize_all_core_values") -> None:
    with connect(url) as c:
        f.register(c, STEP, "apollo_scrape", "sync", sender)
        client = f.add_client(c)
        f.add_batch(c, client, [STEP], n)
        c.execute("VACUUM ANALYZE")


def bench_noop(admin: str, app: str, n: int) -> dict:
    url = run_db(admin, "wsctl_bench_noop")
    seed(url, n)
    backend = LocalBackend(app)
    # As `wsctl dispatch` runs it: outcomes journaled (fsynced) before they are recorded.
    journal = Journal(tempfile.mkdtemp(prefix="wsctl-bench-journal-"))
    with connect(url) as c, connect(url) as w:
        s = run_pass(
            c,
            backend,
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
    return {"items": n, "seconds": s.seconds, "items_per_s": round(n / s.seconds)}


def bench_sleepy(admin: str, app: str, n: int, concurrency: int) -> dict:
    url = run_db(admin, "wsctl_bench_sleepy")
    seed(url, n, sender="sleepy")
    with connect(url) as c, connect(url) as w:
        s = run_pass(
            c,
            LocalBackend(app),
            PassOptions(limit=n, concurrency=concurrency, reconcile=False),
            writer_conn=w,
            journal=Journal(tempfile.mkdtemp(prefix="wsctl-bench-journal-")),
        )
    ideal = n * 0.02 / concurrency
    # The same sleeps on a bare thread pool, no database, in the same run: what this machine
    # makes of the ideal today (its timers and thread switches), to read the ratio against.
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: time.sleep(0.02), range(n)))
    bare = time.perf_counter() - t
    return {
        "items": n,
        "concurrency": concurrency,
        "seconds": s.seconds,
        "ideal": ideal,
        "ratio_to_ideal": round(s.seconds / ideal, 3),
        "bare_threads_seconds": round(bare, 3),
        "bare_threads_ratio_to_ideal": round(bare / ideal, 3),
    }


def bench_seed_loop(admin: str, n: int) -> dict:
    """The seed's orchestrator shape: fetch pending (no lock), dispatch and update one by one."""
    url = run_db(admin, "wsctl_bench_seed")
    seed(url, n)
    q_fetch = """
        SELECT ws.id, ws.item_id, ws.step_name, ws.batch_id, b.workstream_slug,
               er.type, er.modal_sender_fn, er.modal_receiver_fn
        FROM workflow_states ws
        JOIN batches b ON ws.batch_id = b.id
        LEFT JOIN enrichment_registry er
               ON ws.step_name = er.slug AND b.workstream_slug = er.workstream_slug
        WHERE ws.status = 'PENDING'
        ORDER BY ws.updated_at ASC
        LIMIT %s
    """
    q_update = "UPDATE workflow_states SET status = 'COMPLETED', updated_at = now() WHERE id = %s"

    def fn(item_id, workstream):
        return None

    with psycopg.connect(url, autocommit=True) as c:
        t = time.perf_counter()
        done = 0
        while True:
            rows = c.execute(q_fetch, (100,)).fetchall()
            if not rows:
                break
            for r in rows:
                fn(str(r[1]), r[4])
                c.execute(q_update, (r[0],))
                done += 1
        secs = time.perf_counter() - t
    return {"items": done, "seconds": round(secs, 3), "items_per_s": round(done / secs)}


def bench_pgqueuer(admin: str, n: int) -> dict | None:
    try:
        import pgqueuer  # noqa: F401
        from pgqueuer import QueueManager
        from pgqueuer.domain.types import QueueExecutionMode
        from pgqueuer.queries import Queries
    except ImportError:
        return None
    url = run_db(admin, "wsctl_bench_pgq")

    async def main() -> dict:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:  # PgQueuer's fastest driver when installed (`pip install asyncpg`)
            import asyncpg
            from psycopg.conninfo import conninfo_to_dict

            p = conninfo_to_dict(url)
            apg = await asyncpg.connect(
                user=p.get("user"),
                host=p.get("host"),
                port=p.get("port"),
                database=p.get("dbname"),
                password=p.get("password"),
            )
            queries = Queries.from_asyncpg_connection(apg)
            driver = "asyncpg"
        except ImportError:
            apg = None
            queries = Queries.from_psycopg_connection(conn)
            driver = "psycopg"
        await queries.install()
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
        qm = QueueManager(queries)

        @qm.entrypoint("noop")
        async def noop(job) -> None:
            return None

        t = time.perf_counter()
        await qm.run(
            batch_size=100,
            mode=QueueExecutionMode.drain,
            dequeue_timeout=__import__("datetime").timedelta(seconds=0.5),
        )
        secs = time.perf_counter() - t
        left = await conn.execute("SELECT count(*) FROM pgqueuer")
        remaining = (await left.fetchone())[0]
        await conn.close()
        if apg is not None:
            await apg.close()
        return {
            "jobs": n,
            "seconds": round(secs, 3),
            "jobs_per_s": round(n / secs),
            "remaining": remaining,
            "driver": driver,
            "batch_size": 100,
        }

    return asyncio.run(main())


def _standin_process(conn, n_functions: int) -> None:
    from tests.support.modal_standin import ModalStandIn

    with ModalStandIn() as s:
        s.add_function("enrichment-worker", "start_normalize_all_core_values")
        conn.send(s.env)
        conn.recv()  # until the parent is done
        conn.send(len(s.spawns))


def bench_modal(admin: str, n: int, concurrency: int) -> dict:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_standin_process, args=(child, 1))
    proc.start()
    env = parent.recv()
    os.environ.update(env)
    from tests.support.modal_standin import reset_modal_client

    reset_modal_client()
    import modal

    async def bare() -> float:
        fn = modal.Function.from_name("enrichment-worker", "start_normalize_all_core_values")
        await fn.hydrate.aio()
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem:
                await fn.spawn.aio(str(uuid.uuid4()), "apollo_scrape")

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t

    bare_secs = asyncio.run(bare())
    url = run_db(admin, "wsctl_bench_modal")
    seed(url, n)
    from wsctl.dispatch.modal_backend import ModalBackend

    backend = ModalBackend("enrichment-worker", spawn_timeout=30)
    with connect(url) as c, connect(url) as w:
        s = run_pass(
            c,
            backend,
            PassOptions(limit=n, concurrency=concurrency, reconcile=False),
            writer_conn=w,
        )
    backend.close()
    parent.send("done")
    total_spawns = parent.recv()
    proc.join(10)
    ours = n / s.seconds
    bare_rate = n / bare_secs
    return {
        "items": n,
        "concurrency": concurrency,
        "bare_gather_spawns_per_s": round(bare_rate),
        "wsctl_pass_spawns_per_s": round(ours),
        "ratio": round(ours / bare_rate, 3),
        "dispatched": s.dispatched,
        "standin_spawns": total_spawns,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noop-items", type=int, default=20000)
    ap.add_argument("--sleepy-items", type=int, default=4000)
    ap.add_argument("--modal-items", type=int, default=2000)
    ap.add_argument("--seed-items", type=int, default=5000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    admin, server = admin_url()
    with tempfile.TemporaryDirectory() as d:
        app = Path(d) / "bench_app.py"
        app.write_text(APP_SOURCE)
        with psycopg.connect(admin) as c:
            version = c.execute("SHOW server_version").fetchone()[0]
        results = {"server_version": version}
        results["noop_pass"] = bench_noop(admin, str(app), args.noop_items)
        results["sleepy_pass"] = bench_sleepy(admin, str(app), args.sleepy_items, 64)
        results["seed_shaped_loop"] = bench_seed_loop(admin, args.seed_items)
        results["pgqueuer"] = bench_pgqueuer(admin, args.noop_items)
        results["modal"] = bench_modal(admin, args.modal_items, 32)
    if results["pgqueuer"]:
        results["noop_vs_pgqueuer"] = round(
            results["noop_pass"]["items_per_s"] / results["pgqueuer"]["jobs_per_s"], 2
        )
    results["noop_vs_seed_loop"] = round(
        results["noop_pass"]["items_per_s"] / results["seed_shaped_loop"]["items_per_s"], 1
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            print(f"{k}: {v}")
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
