"""History benchmark (issue 14): run with `python tests/benchmarks/bench_history.py`.

In one run, on one PostgreSQL server (WSCTL_BENCH_DATABASE_URL, else
WSCTL_TEST_DATABASE_URL, else an embedded server), each size on a freshly
migrated database:

1. the no-op dispatch pass over 20,000 due items (the bench_dispatch.py pass)
   on a database with no history, then with 2,000,000 and 10,000,000
   COMPLETED history states (``--sizes``), as items/s and the ratio to fresh
   (best pass to best pass, and median to median), with the due items' ids as
   the column defaults give them (UUIDv7), from gen_random_uuid(), and with
   complete_steps' completion check as migration 0008 had it (``--due-ids``);
2. at each size, `batch status` of a history batch, `doctor` (every check but
   Modal's), `wsctl stats` (``wsctl.stats.collect``, median of 3) and `wsctl
   prune --dry-run` (the candidate scan), in seconds.

The history is four COMPLETED steps per item in batches of 10,000 items,
finished 40 days ago, ids from gen_random_uuid() (the dashboard's default,
the worst case for index locality), loaded by INSERT ... SELECT
generate_series with the foreign-key triggers skipped and workflow_states'
indexes dropped around the load and rebuilt after (as the migrations define
them), then VACUUM ANALYZE: old history is vacuumed and all-visible. The
tables stay logged. ``--explain`` also prints EXPLAIN (ANALYZE, BUFFERS) of
the claim and of wsctl.complete_steps' statements (auto_explain, nested) at
each size, with the completion check of 0023 and of 0008.

Benchmarks report numbers; the tests assert behaviour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.benchdb import admin_url, connect, drop_db, fresh_db  # noqa: E402
from tests.support import factories as f  # noqa: E402

STEP = "normalize_all_core_values"
HISTORY_STEPS = ["h1", "h2", "h3", "h4"]
ITEMS_PER_BATCH = 10_000
APP_SOURCE = """
def start_normalize_all_core_values(item_id, workstream_slug=None):
    return None
"""


def load_history(url: str, states: int) -> float:
    """``states`` COMPLETED states (4 per item, 10,000 items per batch); returns seconds."""
    if not states:
        return 0.0
    t = time.perf_counter()
    items = states // len(HISTORY_STEPS)
    n_batches = max(1, items // ITEMS_PER_BATCH)
    with connect(url) as c:
        client = f.add_client(c, "history")
        with c.transaction():
            c.execute("SET LOCAL session_replication_role = replica")  # skip the FK triggers
            idx = c.execute(
                """
                SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def,
                       con.conname, pg_get_constraintdef(con.oid) AS condef
                FROM pg_index i
                LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid
                WHERE i.indrelid = 'public.workflow_states'::regclass
                """
            ).fetchall()
            for name, _, conname, _ in idx:
                if conname:
                    c.execute(f"ALTER TABLE public.workflow_states DROP CONSTRAINT {conname}")
                else:
                    c.execute(f"DROP INDEX {name}")
            c.execute(
                "INSERT INTO batches (id, client_id, blueprint, status, workstream_slug, created_at)"
                " SELECT gen_random_uuid(), %s, %s, 'COMPLETED', 'apollo_scrape',"
                "        now() - interval '41 days'"
                " FROM generate_series(1, %s)",
                (client, HISTORY_STEPS, n_batches),
            )
            c.execute(
                "INSERT INTO batch_items (id, batch_id, data, created_at)"
                " SELECT gen_random_uuid(), b.id,"
                "        jsonb_build_object('n', g, 'company', 'history ' || g),"
                "        now() - interval '41 days'"
                " FROM batches b CROSS JOIN generate_series(1, %s) g"
                " WHERE b.client_id = %s",
                (ITEMS_PER_BATCH, client),
            )
            c.execute(
                "INSERT INTO workflow_states (id, item_id, batch_id, step_name, status, created_at,"
                "   updated_at, completed_at, dispatched_at, attempts, claimed_by, modal_call_id)"
                " SELECT gen_random_uuid(), i.id, i.batch_id, s.step, 'COMPLETED',"
                "        now() - interval '41 days',"
                "        now() - interval '40 days', now() - interval '40 days',"
                "        now() - interval '40 days', 0, 'history-bench', 'fc-' || md5(i.id::text)"
                " FROM batch_items i CROSS JOIN unnest(%s::text[]) AS s(step)"
                " WHERE i.batch_id IN (SELECT id FROM batches WHERE client_id = %s)",
                (HISTORY_STEPS, client),
            )
            for _, definition, conname, condef in idx:
                if conname:
                    c.execute(
                        f"ALTER TABLE public.workflow_states ADD CONSTRAINT {conname} {condef}"
                    )
                else:
                    c.execute(definition)
        c.execute("VACUUM ANALYZE")
    return time.perf_counter() - t


# The batch-completion check as migration 0008 defined it (a NOT EXISTS over the batch's
# items, planned as an anti join over all of batch_items) and as it stands now.
OLD_CHECK = ROOT / "sql" / "migrations" / "0008_complete_clears_reasons.sql"
NEW_CHECK = ROOT / "sql" / "migrations" / "0023_batch_completion_by_counts.sql"


def set_check(url: str, migration: Path) -> None:
    """Define wsctl.complete_steps as ``migration`` does (an A/B of the completion check)."""
    with connect(url) as c:
        c.execute(migration.read_text())


def noop_pass(url: str, app: str, n: int, ids: str = "default") -> dict:
    """The no-op pass over ``n`` new due items; ``ids`` "random": the items and states get
    gen_random_uuid() ids (as before migration 0014), "default": the column defaults,
    "old_check": the column defaults, with complete_steps' completion check as 0008 had it."""
    if ids == "old_check":
        set_check(url, OLD_CHECK)
    try:
        return _noop_pass(url, app, n, ids)
    finally:
        if ids == "old_check":
            set_check(url, NEW_CHECK)


def _noop_pass(url: str, app: str, n: int, ids: str) -> dict:
    from wsctl.dispatch import PassOptions, run_pass
    from wsctl.dispatch.local import LocalBackend

    with connect(url) as c:
        if not c.execute("SELECT 1 FROM enrichment_registry WHERE slug = %s", (STEP,)).fetchone():
            f.register(c, STEP, "apollo_scrape", "sync", "start_normalize_all_core_values")
        client = f.add_client(c, f"due-{time.monotonic_ns()}")
        if ids == "random":
            batch = c.execute(
                "INSERT INTO batches (client_id, blueprint, workstream_slug)"
                " VALUES (%s, %s, 'apollo_scrape') RETURNING id",
                (client, [STEP]),
            ).fetchone()[0]
            c.execute(
                "INSERT INTO batch_items (id, batch_id, data) SELECT gen_random_uuid(), %s,"
                " jsonb_build_object('n', g) FROM generate_series(1, %s) g",
                (batch, n),
            )
            c.execute(
                "INSERT INTO workflow_states (id, item_id, batch_id, step_name, status)"
                " SELECT gen_random_uuid(), id, batch_id, %s, 'PENDING' FROM batch_items"
                " WHERE batch_id = %s",
                (STEP, batch),
            )
        else:
            batch = f.add_batch(c, client, [STEP], n)
        c.execute("VACUUM ANALYZE")
    before = _blocks(url)
    with connect(url) as c, connect(url) as w:
        s = run_pass(c, LocalBackend(app), PassOptions(limit=n, reconcile=False), writer_conn=w)
    after = _blocks(url)
    with connect(url) as c:
        done = c.execute(
            "SELECT count(*) FROM workflow_states WHERE batch_id = %s AND status = 'COMPLETED'",
            (batch,),
        ).fetchone()[0]
    assert done == n, (done, n)
    return {
        "items": n,
        "seconds": round(s.seconds, 3),
        "items_per_s": round(n / s.seconds),
        # what the server's share costs, whatever the machine's load: pages per item
        "read_per_item": round((after[0] - before[0]) / n, 2),
        "hit_per_item": round((after[1] - before[1]) / n, 2),
    }


def _blocks(url: str) -> tuple[int, int]:
    """This database's blocks read (from outside shared buffers) and hit, so far.

    The pass's connections have closed (a backend flushes its statistics when it
    exits); the short wait lets the flush land.
    """
    time.sleep(0.3)
    with connect(url) as c:
        c.execute("SELECT pg_stat_clear_snapshot()")
        row = c.execute(
            "SELECT blks_read, blks_hit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return row[0], row[1]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return round(time.perf_counter() - t, 3)


def read_side(url: str) -> dict:
    from wsctl import batches, prune, stats
    from wsctl.doctor import doctor

    with connect(url) as c:
        row = c.execute(
            "SELECT id FROM batches WHERE blueprint = %s::text[] LIMIT 1", (HISTORY_STEPS,)
        ).fetchone()
        if row is None:
            row = c.execute("SELECT id FROM batches LIMIT 1").fetchone()
        out = {"batch_status_s": timed(lambda: batches.batch_status(c, row[0]))}
        out["prune_dry_run_s"] = timed(lambda: prune.prune(c, older_than="30d", dry_run=True))
    out["doctor_s"] = timed(lambda: doctor(lambda: connect(url), backend="local"))
    # `wsctl stats` is `wsctl.stats.collect` plus printing: the median of 3 runs (the
    # first one reads the indexes in from disk), and the runs themselves.
    with connect(url) as c:
        runs = sorted(timed(lambda: stats.collect(c)) for _ in range(3))
    out["stats_s"] = runs[1]
    out["stats_runs_s"] = runs
    return out


def explain(url: str) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of one claim of 1,000 and of its recording."""
    import uuid

    from wsctl.queries import q

    with connect(url) as c:
        client = f.add_client(c, f"explain-{time.monotonic_ns()}")
        f.add_batch(c, client, [STEP], 1000)
        c.execute("VACUUM ANALYZE workflow_states")
        from psycopg import sql

        from wsctl.dispatch.engine import _claim_statement

        claim = _claim_statement(None)  # the claim a pass runs, composed as it composes it
        params = {"limit": 1000, "token": uuid.uuid4(), "lease_seconds": 300, "claimed_by": "x"}
        explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) ") + claim
        plan = c.execute(explain, params).fetchall()
        print("--- claim", file=sys.stderr)
        print("\n".join(_short(r[0]) for r in plan), file=sys.stderr)
        ids = [
            r[0]
            for r in c.execute(
                "SELECT id FROM workflow_states WHERE claim_token = %s", (params["token"],)
            ).fetchall()
        ]
        # The claim committed, as the dispatcher's does: completing rows this same transaction
        # wrote would fire the foreign-key checks, which the real path never runs.
        notices: list[str] = []
        with c.transaction():
            c.execute("LOAD 'auto_explain'")
            for k, v in (
                ("log_min_duration", "0"),
                ("log_analyze", "on"),
                ("log_buffers", "on"),
                ("log_nested_statements", "on"),
                ("log_level", "notice"),
            ):
                c.execute(f"SET LOCAL auto_explain.{k} = {v}")
            c.add_notice_handler(lambda d: notices.append(d.message_primary))
            c.execute(q("dispatch_complete_claimed"), (ids, params["token"]))
        print("--- complete_steps (auto_explain, nested)", file=sys.stderr)
        print(
            "\n\n".join(
                "\n".join(_short(line) for line in n.splitlines())
                for n in notices
                if "FOR KEY SHARE" not in n
            ),
            file=sys.stderr,
        )


def _short(line: str, width: int = 240) -> str:
    """A plan line with its 1,000-id array literal cut short."""
    return line if len(line) <= width else line[:width] + " ...'"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--sizes", default="0,2000000,10000000", help="history states per database")
    ap.add_argument(
        "--due-ids",
        default="default,random,old_check",
        help="ids of the due items: default (the column defaults, UUIDv7 since migration "
        "0014, as `wsctl batch create` writes), random (gen_random_uuid(), before 0014), "
        "old_check (default ids, complete_steps' completion check as migration 0008 had it)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="passes per size and id kind")
    ap.add_argument("--explain", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the databases")
    args = ap.parse_args()
    admin, server = admin_url()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.due_ids.split(",")
    results: dict[str, dict] = {}
    urls: dict[int, str] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            app = Path(tmp) / "app.py"
            app.write_text(APP_SOURCE)
            for size in sizes:
                urls[size] = fresh_db(admin, f"wsctl_bench_history_{size}")
                load_s = load_history(urls[size], size)
                noop_pass(urls[size], str(app), 2000)  # warm up (plans, caches)
                results[str(size)] = {"history_states": size, "load_s": round(load_s, 1)}
                print(f"loaded {size} in {load_s:.0f}s", file=sys.stderr)
            # Rounds interleave the sizes, so that a neighbour's load on a shared machine
            # falls on every size alike, and each round starts at the next size (the first
            # pass after a change of database ran slower); every rate is kept.
            for rnd in range(args.rounds):
                order = sizes[rnd % len(sizes) :] + sizes[: rnd % len(sizes)]
                for kind in kinds:
                    for size in order:
                        r = noop_pass(urls[size], str(app), args.items, kind)
                        print(f"round {rnd} {kind} {size}: {r}", file=sys.stderr)
                        res = results[str(size)]
                        res.setdefault(f"rates_{kind}", []).append(r["items_per_s"])
                        best = res.setdefault(f"noop_{kind}", r)
                        if r["items_per_s"] > best["items_per_s"]:
                            res[f"noop_{kind}"] = r
            for size in sizes:
                results[str(size)].update(read_side(urls[size]))
                if args.explain:
                    print(f"=== history {size}", file=sys.stderr)
                    explain(urls[size])
                    print(f"=== history {size}, the check as 0008 had it", file=sys.stderr)
                    set_check(urls[size], OLD_CHECK)
                    explain(urls[size])
                    set_check(urls[size], NEW_CHECK)
    finally:
        if not args.keep:
            for size in urls:
                drop_db(admin, f"wsctl_bench_history_{size}")
        if server is not None:
            server.cleanup()
    base = results.get("0", {})
    for r in results.values():
        for kind in kinds:
            key = f"noop_{kind}"
            if key in r and key in base:
                # the best pass against the best, and the median against the median
                r[f"ratio_{kind}"] = round(r[key]["items_per_s"] / base[key]["items_per_s"], 3)
                rates = f"rates_{kind}"
                r[f"ratio_{kind}_median"] = round(
                    statistics.median(r[rates]) / statistics.median(base[rates]), 3
                )
    print(json.dumps({"noop_pass_with_history": results}, indent=2))


if __name__ == "__main__":
    main()
