"""Batch create benchmark (issue 4): run with `python tests/benchmarks/bench_batch_create.py`.

All measurements in one run, on one PostgreSQL server (WSCTL_BENCH_DATABASE_URL,
an admin URL that may create databases, else WSCTL_TEST_DATABASE_URL, else an
embedded server), on one freshly migrated database:

1. `wsctl batch create` of a 100,000-row CSV (the 26 columns of the Apollo
   export sample), run as a subprocess: wall time from spawn to exit, process
   start-up, connection and migration check included. Twice: as the admin
   role (a superuser: the per-row foreign-key triggers are skipped, their
   checks hold by construction, see wsctl/batches.py) and as a plain role
   that may only read and write the tables (PostgreSQL checks every row);
2. the reference: in this process (no start-up), a plain
   `COPY staging FROM STDIN (FORMAT csv, HEADER)` of the same file into a
   temporary table, then ONE `INSERT INTO batch_items ... SELECT` building each
   item's jsonb (server-side parsing: no validation, no line numbers, no
   workflow_states);
3. the reference plus the workflow_states INSERT ... SELECT, i.e. the same
   rows the command writes, for comparison;
4. peak RSS of the subprocess for 100,000 and 400,000 rows (memory must stay
   flat in the file's size: the file is streamed);
5. the command on the same rows as JSON Lines (one `json.dumps` object a line).

The runs alternate (command, reference, reference+states) so that load from
other processes hits all of them alike; the best and the median are shown.
Benchmarks report numbers; the tests assert behaviour.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks import benchdb  # noqa: E402
from tests.benchmarks.benchdb import admin_url, drop_db  # noqa: E402
from tests.support.commands import wsctl_argv  # noqa: E402

APOLLO = ROOT / "examples" / "apollo_export_sample.csv"
STEPS = ["normalize_all_core_values", "split_raw_apollo_scrape_data"]


def fresh_db(admin: str, name: str) -> str:
    url = benchdb.fresh_db(admin, name)
    with psycopg.connect(url, autocommit=True) as c:
        client = c.execute(
            "INSERT INTO public.clients (name) VALUES ('bench') RETURNING id"
        ).fetchone()[0]
        for step in STEPS:
            c.execute(
                "INSERT INTO public.enrichment_registry (slug, workstream_slug, type, modal_sender_fn)"
                " VALUES (%s, 'apollo_scrape', 'sync', 'fn')",
                (step,),
            )
            c.execute(
                "INSERT INTO public.client_workflow_configs (client_id, workflow_slug, workstream_slug)"
                " VALUES (%s, %s, 'apollo_scrape')",
                (client, step),
            )
    return url


def make_csv(path: Path, n: int, columns: int = 26) -> Path:
    """n rows of the Apollo export sample (its first ``columns`` columns, 26 = all),
    each with its own contact id."""
    with APOLLO.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    with path.open("w", newline="", encoding="utf-8") as out:
        w = csv.writer(out)
        w.writerow(header[:columns])
        for i in range(n):
            row = list(body[i % len(body)])
            row[-2] = f"{i:024x}"
            if columns < len(row):
                row = row[: columns - 1] + [f"{i:024x}"]
            w.writerow(row[:columns])
    return path


PLAIN_ROLE = "wsctl_bench_plain"


def plain_role_url(url: str) -> str:
    """A login role that may only read and write the tables (not set session_replication_role)."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"DROP ROLE IF EXISTS {PLAIN_ROLE}")
        c.execute(f"CREATE ROLE {PLAIN_ROLE} LOGIN NOSUPERUSER PASSWORD 'bench'")
        c.execute(f"GRANT USAGE ON SCHEMA public, wsctl TO {PLAIN_ROLE}")
        c.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public, wsctl TO {PLAIN_ROLE}")
    params = conninfo_to_dict(url)
    params.update(user=PLAIN_ROLE, password="bench")
    return make_conninfo(**params)


def drop_plain_role(admin: str, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"DROP OWNED BY {PLAIN_ROLE}")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"DROP ROLE IF EXISTS {PLAIN_ROLE}")


def csv_to_jsonl(path: Path) -> Path:
    out = path.with_suffix(".jsonl")
    with path.open(newline="", encoding="utf-8") as f, out.open("w", encoding="utf-8") as w:
        for row in csv.DictReader(f):
            w.write(json.dumps(row) + "\n")
    return out


def run_command(url: str, path: Path, expect: str) -> tuple[float, int]:
    """`wsctl batch create` as a subprocess: (wall seconds, peak RSS in KiB).

    ``expect``: the ``fk_checks`` its JSON must report (which path ran)."""
    env = {**os.environ, "WSCTL_DATABASE_URL": url}
    args = wsctl_argv(
        None,
        "batch",
        "create",
        "--client",
        "bench",
        "--workstream",
        "apollo_scrape",
        "--blueprint",
        ",".join(STEPS),
        "--items",
        str(path),
        "--json",
    )
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own peak RSS
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(
                f"wsctl batch create failed ({proc.returncode}): {err.read().decode()}"
            )
        out.seek(0)
        got = json.loads(out.read())["fk_checks"]
        if got != expect:
            raise SystemExit(f"wsctl batch create ran with fk_checks {got}, not {expect}")
    return elapsed, usage.ru_maxrss


def run_reference(url: str, path: Path, *, with_states: bool) -> float:
    """COPY the file into a staging table, then one INSERT ... SELECT (in-process)."""
    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    cols = [sql.Identifier(f"c{i}") for i in range(len(header))]
    t0 = time.perf_counter()
    with psycopg.connect(url) as c:
        client = c.execute("SELECT id FROM public.clients WHERE name = 'bench'").fetchone()[0]
        batch = uuid.uuid4()
        c.execute(
            "INSERT INTO public.batches (id, client_id, blueprint, workstream_slug)"
            " VALUES (%s, %s, %s, 'apollo_scrape')",
            (batch, client, STEPS),
        )
        c.execute(
            sql.SQL("CREATE TEMP TABLE staging ({}) ON COMMIT DROP").format(
                sql.SQL(", ").join(sql.SQL("{} text").format(col) for col in cols)
            )
        )
        with c.cursor().copy("COPY staging FROM STDIN (FORMAT csv, HEADER)") as copy:
            with path.open("rb") as raw:
                while chunk := raw.read(1 << 20):
                    copy.write(chunk)
        insert = sql.SQL(
            "INSERT INTO public.batch_items (batch_id, data)"
            " SELECT %(b)s, jsonb_object(%(k)s::text[], ARRAY[{}]) FROM staging"
        ).format(sql.SQL(", ").join(cols))
        if with_states:
            insert = sql.SQL(
                "WITH items AS ({} RETURNING id)"
                " INSERT INTO public.workflow_states (item_id, batch_id, step_name)"
                " SELECT id, %(b)s, %(step)s FROM items"
            ).format(insert)
        c.execute(insert, {"b": batch, "k": header, "step": STEPS[0]})
        c.commit()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--big", type=int, default=400_000, help="second size for peak RSS")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--columns", type=int, default=26, help="columns of the Apollo layout to keep (26 = all)"
    )
    opts = parser.parse_args()

    admin, server = admin_url()
    name = f"wsctl_bench_batch_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="wsctl-bench-batch-"))
    try:
        url = fresh_db(admin, name)
        with psycopg.connect(url) as c:
            version = c.execute("SHOW server_version").fetchone()[0]
        small = make_csv(tmp / f"items_{opts.items}.csv", opts.items, opts.columns)
        big = make_csv(tmp / f"items_{opts.big}.csv", opts.big, opts.columns)
        mb = small.stat().st_size / 1e6
        print(f"PostgreSQL {version}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
        print(f"file: {opts.items:,} rows x {opts.columns} columns, {mb:.1f} MB")

        plain = plain_role_url(url)
        cmd, cmd_plain, ref, ref_states, rss_small = [], [], [], [], []
        run_command(url, make_csv(tmp / "warm.csv", 1000), "by_construction")  # warm caches
        for i in range(opts.repeat):
            t, rss = run_command(url, small, "by_construction")
            cmd.append(t)
            rss_small.append(rss)
            cmd_plain.append(run_command(plain, small, "server")[0])
            ref.append(run_reference(url, small, with_states=False))
            ref_states.append(run_reference(url, small, with_states=True))
            print(
                f"  round {i + 1}: wsctl batch create {cmd[-1]:.2f} s,"
                f" as a plain role {cmd_plain[-1]:.2f} s, reference {ref[-1]:.2f} s,"
                f" reference + states {ref_states[-1]:.2f} s",
                flush=True,
            )
        t_big, rss_big = run_command(url, big, "by_construction")
        jsonl = csv_to_jsonl(small)
        cmd_jsonl = [run_command(url, jsonl, "by_construction")[0] for _ in range(opts.repeat)]

        def fmt(xs: list[float]) -> str:
            return f"best {min(xs):.2f} s, median {statistics.median(xs):.2f} s"

        print()
        print(f"wsctl batch create (subprocess, {opts.items:,} items): {fmt(cmd)}")
        print(f"  the same as a plain role (every row checked):    {fmt(cmd_plain)}")
        print(f"reference COPY + one INSERT ... SELECT (in-process): {fmt(ref)}")
        print(f"reference + workflow_states (in-process):           {fmt(ref_states)}")
        print(
            f"ratio command / reference: best {min(cmd) / min(ref):.2f}x, "
            f"median {statistics.median(cmd) / statistics.median(ref):.2f}x "
            f"(target <= 2.5x); vs reference + states: "
            f"{statistics.median(cmd) / statistics.median(ref_states):.2f}x"
        )
        print(
            f"ratio plain role / reference: median "
            f"{statistics.median(cmd_plain) / statistics.median(ref):.2f}x"
        )
        print(f"items/s (command, median): {opts.items / statistics.median(cmd):,.0f}")
        print(
            f"wsctl batch create, the same rows as JSON Lines "
            f"({jsonl.stat().st_size / 1e6:.1f} MB): {fmt(cmd_jsonl)}"
        )
        print(
            f"peak RSS: {max(rss_small) / 1024:.0f} MiB for {opts.items:,} items, "
            f"{rss_big / 1024:.0f} MiB for {opts.big:,} items ({t_big:.2f} s)"
        )
    finally:
        try:
            drop_plain_role(admin, url)
        except (psycopg.Error, NameError):  # NameError: failed before the database existed
            pass
        drop_db(admin, name)
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
