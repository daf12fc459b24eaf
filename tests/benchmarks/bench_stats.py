"""`wsctl stats` on 2,000,000 states (issue 15): run with `python tests/benchmarks/bench_stats.py`.

On one PostgreSQL server (WSCTL_BENCH_DATABASE_URL, else WSCTL_TEST_DATABASE_URL, else an
embedded server), in a freshly migrated database: 400,000 items in 20 batches over two
workstreams, five states each (2,000,000), most COMPLETED, the rest spread over the other
statuses, a small share updated in the last hour, BLOCKED/FAILED ones with reason codes.
After VACUUM ANALYZE (what autovacuum does on a real table), ``wsctl.stats.collect`` runs
``--runs`` times; the figures are each run's seconds (median and max) and every query's plan
time from EXPLAIN ANALYZE. Benchmarks report numbers; the tests assert behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.benchdb import admin_url, connect, drop_db, fresh_db  # noqa: E402
from wsctl import stats  # noqa: E402
from wsctl.queries import q  # noqa: E402

STEPS = ["step_a", "step_b", "step_c", "step_d", "step_e"]
REASONS = ["no_registry_row", "missing_config", "function_not_found", "worker_error", None]


def load(conn, items: int, batches: int) -> None:
    conn.execute("INSERT INTO clients (name) VALUES ('bench') ON CONFLICT DO NOTHING")
    conn.execute(
        "INSERT INTO batches (client_id, blueprint, workstream_slug)"
        " SELECT c.id, %s, CASE WHEN g %% 2 = 0 THEN 'apollo_scrape' ELSE 'linkedin_scrape' END"
        " FROM clients c, generate_series(1, %s) g WHERE c.name = 'bench'",
        (STEPS, batches),
    )
    per = items // batches
    conn.execute(
        "INSERT INTO batch_items (batch_id, data)"
        " SELECT b.id, jsonb_build_object('n', g) FROM batches b, generate_series(1, %s) g",
        (per,),
    )
    # status by a hash of (item, step): 85% COMPLETED, 6% PENDING (one in six backing off, not
    # due yet), 2% DISPATCHED (one in twenty past the callback timeout, the rest within 30
    # minutes), 1% DISPATCHING, 1% FAILED, 1% BLOCKED, 4% CANCELLED; of the others 1% updated
    # in the last hour, the rest within the last 7 days.
    conn.execute(
        """
        INSERT INTO workflow_states (item_id, batch_id, step_name, status, available_at,
                                     dispatched_at, completed_at, updated_at, reason_code,
                                     error_class, last_error)
        SELECT i.id, i.batch_id, s.step, st.status,
               now() + CASE WHEN st.h = 85 THEN interval '1 hour' ELSE interval '-10 minutes' END,
               CASE WHEN st.status IN ('DISPATCHED', 'COMPLETED', 'FAILED') THEN t.ts END,
               CASE WHEN st.status = 'COMPLETED' THEN t.ts END,
               t.ts,
               CASE WHEN st.status IN ('FAILED', 'BLOCKED') THEN (%s::text[])[1 + st.h %% 5] END,
               CASE WHEN st.status = 'FAILED' THEN 'permanent'
                    WHEN st.status = 'BLOCKED' THEN 'operator' END,
               CASE WHEN st.status IN ('FAILED', 'BLOCKED') THEN 'error for item ' || i.id END
        FROM batch_items i
        CROSS JOIN unnest(%s::text[]) AS s(step)
        CROSS JOIN LATERAL (
            SELECT abs(hashtext(i.id::text || s.step)) %% 100 AS h
        ) hh
        CROSS JOIN LATERAL (
            SELECT hh.h AS h,
                   CASE WHEN hh.h < 85 THEN 'COMPLETED'
                        WHEN hh.h < 91 THEN 'PENDING'
                        WHEN hh.h < 93 THEN 'DISPATCHED'
                        WHEN hh.h < 94 THEN 'DISPATCHING'
                        WHEN hh.h < 95 THEN 'FAILED'
                        WHEN hh.h < 96 THEN 'BLOCKED'
                        ELSE 'CANCELLED' END AS status
        ) st
        CROSS JOIN LATERAL (
            SELECT CASE WHEN st.status = 'DISPATCHED' AND abs(hashtext(i.id::text)) %% 20 = 0
                        THEN now() - interval '3 hours'
                        WHEN st.status = 'DISPATCHED'
                        THEN now() - random() * interval '30 minutes'
                        WHEN abs(hashtext(i.id::text)) %% 100 = 0
                        THEN now() - random() * interval '1 hour'
                        ELSE now() - interval '1 hour' - random() * interval '7 days' END AS ts
        ) t
        """,
        (REASONS, STEPS),
    )
    # every (step, workstream) registered and bound to a limit per (workstream, step), and one
    # per client: stats_limits counts the in-flight states under each
    conn.execute(
        "INSERT INTO enrichment_registry (slug, workstream_slug, type, modal_sender_fn)"
        " SELECT s, w, 'async', 'fn_' || s FROM unnest(%s::text[]) s,"
        " unnest(ARRAY['apollo_scrape', 'linkedin_scrape']) w",
        (STEPS,),
    )
    conn.execute(
        "INSERT INTO wsctl.registry_limit_keys (registry_id, key_template)"
        " SELECT id, t FROM enrichment_registry,"
        " unnest(ARRAY['bench:{workstream}:{step}', 'client:{client}']) t"
    )
    conn.execute(
        "INSERT INTO wsctl.limits (key, max_in_flight)"
        " SELECT DISTINCT 'bench:' || workstream_slug || ':' || slug, 100000"
        " FROM enrichment_registry UNION ALL SELECT 'client:bench', 100000"
    )
    conn.execute("VACUUM ANALYZE workflow_states")
    conn.execute("VACUUM ANALYZE batches")


def explain(conn, name: str) -> float:
    params = {"workstream": None, "timeout": 3600}
    rows = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + q(name), params).fetchone()[0]
    return round(rows[0]["Execution Time"] / 1000.0, 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=400_000)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    ap.add_argument(
        "--reuse", action="store_true", help="measure a database an earlier --keep run left"
    )
    args = ap.parse_args()
    admin, server = admin_url()
    name = "wsctl_bench_stats"
    try:
        if args.reuse:
            from psycopg.conninfo import conninfo_to_dict, make_conninfo

            params = conninfo_to_dict(admin)
            params["dbname"] = name
            url = make_conninfo(**params)
        else:
            url = fresh_db(admin, name)
        with connect(url) as conn:
            t0 = time.perf_counter()
            if not args.reuse:
                load(conn, args.items, args.batches)
            load_s = time.perf_counter() - t0
            n = conn.execute("SELECT count(*) FROM workflow_states").fetchone()[0]
            runs = []
            for _ in range(args.runs):
                t = time.perf_counter()
                st = stats.collect(conn)
                runs.append(time.perf_counter() - t)
            text = stats.render_prometheus(st)
            per_query = {
                name: explain(conn, name)
                for name in (
                    "stats_state_counts",
                    "stats_not_due",
                    "stats_oldest_due",
                    "stats_recent",
                    "stats_overdue",
                    "stats_reasons",
                    "stats_limits",
                )
            }
            ws = []
            for _ in range(args.runs):
                t = time.perf_counter()
                stats.collect(conn, workstream="apollo_scrape")
                ws.append(time.perf_counter() - t)
        doc = {
            "load_average_1m": round(os.getloadavg()[0], 2),
            "states": n,
            "load_seconds": round(load_s, 1),
            "stats_seconds_median": round(statistics.median(runs), 3),
            "stats_seconds_max": round(max(runs), 3),
            "stats_workstream_seconds_median": round(statistics.median(ws), 3),
            "query_seconds": per_query,
            "prometheus_lines": text.count("\n"),
            "due": st.due_total,
            "needs_operator_groups": len(st.reasons),
            "limits_in_flight": {lim.key: lim.in_flight for lim in st.limits},
        }
        print(json.dumps(doc, indent=2))
        if not args.keep and not args.reuse:
            drop_db(admin, name)
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
