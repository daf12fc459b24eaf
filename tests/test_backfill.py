"""wsctl backfill workstream-slug against a real PostgreSQL built from the legacy schema."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from tests.conftest import table_snapshot
from tests.support.commands import wsctl_argv
from tests.test_batch_create import run_with_stderr_on_a_pty
from wsctl import backfill
from wsctl.errors import OperationalError

# alpha registers only_alpha and shared; beta registers shared. ghost_step is registered nowhere.
REGISTRY = [("only_alpha", "alpha"), ("shared", "alpha"), ("shared", "beta")]


def seed(conn: psycopg.Connection) -> dict[str, uuid.UUID]:
    """Legacy rows (no workstream_slug column needed): one batch per inference case."""
    ids: dict[str, uuid.UUID] = {}
    for name in ("narrow", "plain"):
        ids[name] = conn.execute(
            "INSERT INTO public.clients (name) VALUES (%s) RETURNING id", (name,)
        ).fetchone()[0]
    for slug, ws in REGISTRY:
        conn.execute(
            "INSERT INTO public.enrichment_registry (slug, workstream_slug, type, modal_sender_fn)"
            " VALUES (%s, %s, 'sync', 'fn')",
            (slug, ws),
        )
    conn.execute(
        "INSERT INTO public.client_workflow_configs (client_id, workflow_slug, workstream_slug)"
        " VALUES (%s, 'shared', 'beta')",
        (ids["narrow"],),
    )
    cases = {
        "one_candidate": ("plain", ["only_alpha", "shared"]),
        "narrowed": ("narrow", ["shared"]),
        "not_narrowed": ("plain", ["shared"]),
        "no_workstream": ("plain", ["ghost_step"]),
    }
    for case, (client, blueprint) in cases.items():
        bid = conn.execute(
            "INSERT INTO public.batches (client_id, blueprint, status) VALUES (%s, %s, 'RUNNING')"
            " RETURNING id",
            (ids[client], blueprint),
        ).fetchone()[0]
        ids[case] = bid
        item = conn.execute(
            "INSERT INTO public.batch_items (batch_id, data) VALUES (%s, '{\"a\": 1}') RETURNING id",
            (bid,),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO public.workflow_states (item_id, batch_id, step_name, status)"
            " VALUES (%s, %s, %s, 'COMPLETED')",
            (item, bid, blueprint[0]),
        )
    return ids


@pytest.fixture
def legacy(legacy_url, run_cli):
    """The legacy database with its rows, then adopted by `wsctl migrate`."""
    with psycopg.connect(legacy_url, autocommit=True) as c:
        ids = seed(c)
    r = run_cli("migrate", url=legacy_url)
    assert r.code == 0, r.err
    with psycopg.connect(legacy_url, autocommit=True) as c:
        yield legacy_url, c, ids


def workstreams(conn) -> dict[uuid.UUID, str | None]:
    return dict(conn.execute("SELECT id, workstream_slug FROM public.batches").fetchall())


def batches_without_slug(conn) -> list:
    return sorted(
        conn.execute(
            "SELECT id, client_id, blueprint, status, created_at FROM public.batches"
        ).fetchall()
    )


def progress_rows(conn) -> list:
    return conn.execute("SELECT job, last_id FROM wsctl.backfill_progress").fetchall()


def test_each_inference_case_on_an_adopted_legacy_database(legacy, run_cli):
    url, conn, ids = legacy
    before = table_snapshot(conn)
    other_columns = batches_without_slug(conn)

    dry = run_cli("backfill", "workstream-slug", "--dry-run", "--json", url=url)
    assert dry.code == 1  # unresolved batches remain
    d = dry.json()
    assert (d["inferred"], d["defaulted"], d["updated"], d["dry_run"]) == (2, 0, 0, True)
    assert table_snapshot(conn) == before and progress_rows(conn) == []

    r = run_cli("backfill", "workstream-slug", "--json", url=url)
    assert r.code == 1, r.err
    doc = r.json()
    assert (doc["inferred"], doc["defaulted"], doc["updated"]) == (2, 0, 2)
    unresolved = {u["batch_id"]: u for u in doc["unresolved"]}
    assert set(unresolved) == {str(ids["not_narrowed"]), str(ids["no_workstream"])}
    assert unresolved[str(ids["not_narrowed"])]["candidates"] == ["alpha", "beta"]
    assert "several workstreams" in unresolved[str(ids["not_narrowed"])]["reason"]
    assert unresolved[str(ids["no_workstream"])]["candidates"] == []
    assert "no workstream registers" in unresolved[str(ids["no_workstream"])]["reason"]
    assert d["unresolved"] == doc["unresolved"]

    assert workstreams(conn) == {
        ids["one_candidate"]: "alpha",
        ids["narrowed"]: "beta",
        ids["not_narrowed"]: None,
        ids["no_workstream"]: None,
    }
    # Only workstream_slug changed: every other column of batches, and every other table.
    assert batches_without_slug(conn) == other_columns
    after = table_snapshot(conn)
    assert {k: v for k, v in after.items() if k != "batches"} == {
        k: v for k, v in before.items() if k != "batches"
    }
    assert progress_rows(conn) == []  # a finished walk leaves no checkpoint

    plain = run_cli("backfill", "workstream-slug", url=url)
    assert plain.code == 1
    assert "inferred 0, defaulted 0, set 0, unresolved 2" in plain.out
    assert str(ids["no_workstream"]) in plain.out


def test_default_fills_in_with_a_warning_then_enforce_binds_the_dashboard(legacy, run_cli):
    url, conn, ids = legacy
    r = run_cli("backfill", "workstream-slug", "--default", "alpha", "--enforce", "--json", url=url)
    assert r.code == 0, r.err
    doc = r.json()
    assert (doc["inferred"], doc["defaulted"], doc["updated"], doc["unresolved"]) == (2, 2, 4, [])
    # alpha registers the not-narrowed blueprint but not ghost_step: one warning, for that batch.
    assert doc["default_unregistered"] == [str(ids["no_workstream"])]
    assert "does not register every blueprint step of 1 defaulted batch" in r.err
    assert doc["enforce"] == {"state": "added", "remaining_null": 0, "ok": True}
    assert workstreams(conn)[ids["not_narrowed"]] == "alpha"
    assert workstreams(conn)[ids["narrowed"]] == "beta"  # inference wins over the default

    # The dashboard's insert without a workstream now fails; with one it works.
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO public.batches (client_id, blueprint, status) VALUES (%s, %s, 'PENDING')",
            (ids["plain"], ["shared"]),
        )
    conn.execute(
        "INSERT INTO public.batches (client_id, blueprint, status, workstream_slug)"
        " VALUES (%s, %s, 'PENDING', 'alpha')",
        (ids["plain"], ["shared"]),
    )
    validated = conn.execute(
        "SELECT convalidated FROM pg_constraint WHERE conname = %s", (backfill.CHECK_NAME,)
    ).fetchone()
    assert validated == (True,)

    again = run_cli("backfill", "workstream-slug", "--enforce", url=url)
    assert again.code == 0, again.err
    assert "already enforced" in again.out


def check_count(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_constraint WHERE conname = %s", (backfill.CHECK_NAME,)
    ).fetchone()[0]


def test_enforce_is_refused_while_nulls_remain_and_then_changes_nothing(legacy, run_cli):
    """--enforce decides first: with batches that would stay NULL it writes nothing at all,
    not even the workstreams it could infer, nor the checkpoint."""
    url, conn, ids = legacy
    before = table_snapshot(conn)
    first = run_cli("backfill", "workstream-slug", "--enforce", url=url)
    assert first.code == 1
    assert (
        "not enforcing: 2 batch(es) would still have no workstream_slug after the backfill"
        in first.err
    )
    assert "nothing was written" in first.err
    assert first.err.count("wsctl: error:") == 1
    # What the backfill would have done, and which batches block the check.
    assert "inferred 2, defaulted 0, would set 2, unresolved 2" in first.out
    assert str(ids["not_narrowed"]) in first.out and str(ids["no_workstream"]) in first.out
    assert table_snapshot(conn) == before
    assert all(v is None for v in workstreams(conn).values())
    assert progress_rows(conn) == []
    assert check_count(conn) == 0

    again = run_cli("backfill", "workstream-slug", "--enforce", "--json", url=url)
    assert again.code == 1
    doc = again.json()
    assert doc["enforce"] == {"state": "refused", "remaining_null": 2, "ok": False}
    assert doc["refused_before_writing"] is True
    assert (doc["inferred"], doc["defaulted"], doc["updated"], doc["dry_run"]) == (2, 0, 0, False)
    assert {u["batch_id"] for u in doc["unresolved"]} == {
        str(ids["not_narrowed"]),
        str(ids["no_workstream"]),
    }
    assert table_snapshot(conn) == before
    assert check_count(conn) == 0
    # The dashboard may still insert without a workstream.
    conn.execute(
        "INSERT INTO public.batches (client_id, blueprint) VALUES (%s, %s)",
        (ids["plain"], ["shared"]),
    )

    dry = run_cli(
        "backfill", "workstream-slug", "--enforce", "--dry-run", "--default", "beta", url=url
    )
    assert dry.code == 0, dry.err
    assert "would add and validate" in dry.out


def test_enforce_refusal_keeps_an_interrupted_runs_checkpoint(conn, run_cli, db_url):
    ids = make_batches(conn, 6)
    conn.execute("UPDATE public.batches SET blueprint = '{ghost_step}' WHERE id = %s", (ids[4],))
    conn.execute(
        "INSERT INTO wsctl.backfill_progress (job, last_id) VALUES (%s, %s)", (backfill.JOB, ids[1])
    )
    checkpoint = conn.execute("SELECT * FROM wsctl.backfill_progress").fetchall()
    before = table_snapshot(conn)
    r = run_cli("backfill", "workstream-slug", "--enforce", "--chunk-size", "2", url=db_url)
    assert r.code == 1
    assert "not enforcing: 1 batch(es) would still" in r.err
    assert table_snapshot(conn) == before
    assert conn.execute("SELECT * FROM wsctl.backfill_progress").fetchall() == checkpoint
    assert check_count(conn) == 0


def test_enforce_with_batch_refuses_while_batches_outside_it_lack_a_workstream(legacy, run_cli):
    """Every batch in --batch resolves, but the check needs the whole table: nothing is set."""
    url, conn, ids = legacy
    before = table_snapshot(conn)
    r = run_cli(
        "backfill",
        "workstream-slug",
        "--enforce",
        "--batch",
        str(ids["one_candidate"]),
        "--json",
        url=url,
    )
    assert r.code == 1
    doc = r.json()
    assert (doc["inferred"], doc["updated"], doc["unresolved"]) == (1, 0, [])
    assert doc["enforce"]["remaining_null"] == 3
    assert "not enforcing: 3 batch(es) would still" in r.err
    assert table_snapshot(conn) == before
    assert check_count(conn) == 0


def test_enforce_that_can_succeed_runs_the_backfill_and_adds_the_check(conn, run_cli, db_url):
    ids = make_batches(conn, 5)
    r = run_cli(
        "backfill", "workstream-slug", "--enforce", "--chunk-size", "2", "--json", url=db_url
    )
    assert r.code == 0, r.err
    doc = r.json()
    assert (doc["updated"], doc["refused_before_writing"]) == (5, False)
    assert doc["enforce"]["state"] == "added"
    assert all(workstreams(conn)[i] == "alpha" for i in ids)
    assert check_count(conn) == 1 and progress_rows(conn) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--default", "gamma"), "unknown default workstream 'gamma'"),
        (("--default", "Not A Slug"), "invalid default workstream"),
        (("--batch", "not-a-uuid"), "expected a UUID"),
        (("--batch", "00000000-0000-4000-8000-000000000000"), "no batch with id"),
        (("--chunk-size", "0"), "--chunk-size must be between"),
        (("--batch", ""), "Invalid value for '--batch': names no id"),
        (("--batch", " , "), "Invalid value for '--batch': names no id"),
    ],
)
def test_refusals_change_nothing(legacy, run_cli, args, message):
    url, conn, _ = legacy
    before = table_snapshot(conn)
    r = run_cli("backfill", "workstream-slug", *args, url=url)
    usage = args[0] == "--chunk-size" or not args[1].strip(" ,")
    assert r.code == (2 if usage else 1)  # usage errors as in prune
    assert message in r.err and len(r.err.strip().splitlines()) == 1
    assert table_snapshot(conn) == before and progress_rows(conn) == []


def test_batch_option_restricts_the_run(legacy, run_cli):
    url, conn, ids = legacy
    r = run_cli(
        "backfill",
        "workstream-slug",
        "--batch",
        f"{ids['narrowed']},{ids['no_workstream']}",
        "--default",
        "beta",
        "--json",
        url=url,
    )
    assert r.code == 0, r.err
    doc = r.json()
    assert (doc["inferred"], doc["defaulted"], doc["updated"]) == (1, 1, 2)
    assert workstreams(conn) == {
        ids["one_candidate"]: None,
        ids["narrowed"]: "beta",
        ids["not_narrowed"]: None,
        ids["no_workstream"]: "beta",
    }
    assert progress_rows(conn) == []  # a restricted run keeps no checkpoint


# --- chunks, concurrency, interruption -----------------------------------------------


def make_batches(conn, n: int, blueprint=("only_alpha",), client: str = "plain") -> list[uuid.UUID]:
    cid = conn.execute("SELECT id FROM public.clients WHERE name = %s", (client,)).fetchone()
    if cid is None:
        cid = conn.execute(
            "INSERT INTO public.clients (name) VALUES (%s) RETURNING id", (client,)
        ).fetchone()
    if not conn.execute("SELECT 1 FROM public.enrichment_registry").fetchone():
        for slug, ws in REGISTRY:
            conn.execute(
                "INSERT INTO public.enrichment_registry (slug, workstream_slug, type, modal_sender_fn)"
                " VALUES (%s, %s, 'sync', 'fn')",
                (slug, ws),
            )
    rows = conn.execute(
        "INSERT INTO public.batches (client_id, blueprint)"
        " SELECT %s, %s FROM generate_series(1, %s) RETURNING id",
        (cid[0], list(blueprint), n),
    ).fetchall()
    return sorted(r[0] for r in rows)


def test_concurrent_insert_and_update_during_a_chunked_run(conn, db_url):
    ids = make_batches(conn, 25)
    behind = uuid.UUID("00000000-0000-4000-8000-000000000001")  # sorts before every cursor
    chunks: list[backfill.ChunkReport] = []

    def meanwhile(chunk: backfill.ChunkReport) -> None:
        chunks.append(chunk)
        if len(chunks) == 1:
            with psycopg.connect(db_url, autocommit=True) as other:
                # The dashboard sets a batch the walk has not reached yet...
                other.execute(
                    "UPDATE public.batches SET workstream_slug = 'beta' WHERE id = %s", (ids[-1],)
                )
                # ...and inserts a legacy-style batch behind the cursor.
                other.execute(
                    "INSERT INTO public.batches (id, client_id, blueprint)"
                    " SELECT %s, client_id, blueprint FROM public.batches WHERE id = %s",
                    (behind, ids[0]),
                )

    report = backfill.backfill_workstream_slug(conn, chunk_size=5, on_chunk=meanwhile)
    assert [c.phase for c in chunks] == ["walk"] * 5 + ["sweep"]
    assert chunks[-1].batch_ids == [behind]
    assert all(len(c.batch_ids) <= 5 for c in chunks)
    assert report.unresolved == []
    assert (report.inferred, report.updated) == (25, 25)  # 24 walked + the one behind the cursor
    got = workstreams(conn)
    assert got[ids[-1]] == "beta"  # set by the dashboard, not overwritten
    assert got[behind] == "alpha"
    assert all(v is not None for v in got.values())


def test_the_update_never_overwrites_a_value_set_while_it_waits(conn, db_url):
    """The dashboard holds a batch row when the chunk's UPDATE reaches it."""
    ids = make_batches(conn, 6)
    locked = threading.Event()

    def dashboard():
        with psycopg.connect(db_url) as other:
            other.execute(
                "UPDATE public.batches SET workstream_slug = 'beta' WHERE id = %s", (ids[2],)
            )
            locked.set()
            time.sleep(1.0)
            other.commit()

    t = threading.Thread(target=dashboard)
    t.start()
    assert locked.wait(10)
    report = backfill.backfill_workstream_slug(conn, chunk_size=10)
    t.join()
    # The batch the dashboard set counts as neither inferred nor updated.
    assert (report.inferred, report.updated, report.set_meanwhile) == (5, 5, 1)
    assert report.to_json()["set_meanwhile"] == 1
    assert workstreams(conn)[ids[2]] == "beta"


def test_an_interrupted_run_resumes_after_its_last_chunk(conn):
    ids = make_batches(conn, 12)
    # One unresolvable batch inside the first chunk: the resumed run must still report it.
    conn.execute("UPDATE public.batches SET blueprint = '{ghost_step}' WHERE id = %s", (ids[1],))

    def stop_after_first(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backfill.backfill_workstream_slug(conn, chunk_size=4, on_chunk=stop_after_first)
    assert progress_rows(conn) == [(backfill.JOB, ids[3])]
    got = workstreams(conn)
    assert [got[i] for i in ids[:4]] == ["alpha", None, "alpha", "alpha"]
    assert all(got[i] is None for i in ids[4:])

    seen: list[backfill.ChunkReport] = []
    report = backfill.backfill_workstream_slug(conn, chunk_size=4, on_chunk=seen.append)
    assert report.resumed_after == ids[3]
    walked = [b for c in seen if c.phase == "walk" for b in c.batch_ids]
    assert walked == ids[4:]  # the finished chunk is not walked again
    assert report.updated == 8
    assert [u.batch_id for u in report.unresolved] == [ids[1]]
    assert progress_rows(conn) == []
    got = workstreams(conn)
    assert all(got[i] == "alpha" for i in ids if i != ids[1])


def test_a_resumed_run_says_so_before_it_walks(conn, run_cli, db_url):
    """The notice comes when the checkpoint is taken up (on_resume), not after the walk, and
    under --json too (on stderr; the document says resumed_after)."""
    ids = make_batches(conn, 6)

    def stop_after_first(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backfill.backfill_workstream_slug(conn, chunk_size=2, on_chunk=stop_after_first)
    events: list[str] = []
    report = backfill.backfill_workstream_slug(
        conn,
        chunk_size=2,
        dry_run=False,
        on_chunk=lambda c: events.append(c.phase),
        on_resume=lambda r: events.append(f"resume {r.resumed_after}"),
    )
    assert events[0] == f"resume {ids[1]}" and events.count(f"resume {ids[1]}") == 1
    assert report.resumed_after == ids[1]

    conn.execute("UPDATE public.batches SET workstream_slug = NULL WHERE id = ANY(%s)", (ids,))
    with pytest.raises(KeyboardInterrupt):
        backfill.backfill_workstream_slug(conn, chunk_size=2, on_chunk=stop_after_first)
    r = run_cli("backfill", "workstream-slug", "--chunk-size", "2", "--json", url=db_url)
    assert r.code == 0, r.err
    assert r.err.count(f"wsctl: resuming after batch {ids[1]} (checkpoint of ") == 1
    assert json.loads(r.out)["resumed_after"] == str(ids[1])
    fresh = run_cli("backfill", "workstream-slug", url=db_url)
    assert fresh.code == 0 and "resuming" not in fresh.err


def test_a_lock_timeout_stops_the_run_and_a_rerun_finishes_it(conn, db_url):
    ids = make_batches(conn, 6)
    with psycopg.connect(db_url) as other:
        other.execute("SELECT 1 FROM public.batches WHERE id = %s FOR UPDATE", (ids[3],))
        with pytest.raises(OperationalError, match="lock timeout.*re-run to resume"):
            backfill.backfill_workstream_slug(conn, chunk_size=2, lock_timeout="200ms")
        other.rollback()
    assert progress_rows(conn) == [(backfill.JOB, ids[1])]
    report = backfill.backfill_workstream_slug(conn, chunk_size=2)
    assert report.resumed_after == ids[1] and report.updated == 4
    assert all(v == "alpha" for v in workstreams(conn).values())


def test_dry_run_neither_reads_nor_writes_the_checkpoint(conn, run_cli, db_url):
    ids = make_batches(conn, 5)
    conn.execute(
        "INSERT INTO wsctl.backfill_progress (job, last_id) VALUES (%s, %s)", (backfill.JOB, ids[2])
    )
    before = table_snapshot(conn)
    r = run_cli(
        "backfill", "workstream-slug", "--dry-run", "--chunk-size", "2", "--json", url=db_url
    )
    assert r.code == 0, r.err
    assert r.json()["inferred"] == 5 and r.json()["updated"] == 0
    assert table_snapshot(conn) == before
    assert progress_rows(conn) == [(backfill.JOB, ids[2])]


def test_the_progress_bar_is_drawn_on_a_terminal_and_not_otherwise(conn, db_url):
    make_batches(conn, 5)
    env = {**os.environ, "WSCTL_DATABASE_URL": db_url}
    args = ["backfill", "workstream-slug", "--chunk-size", "2"]

    def reset() -> None:
        conn.execute("UPDATE public.batches SET workstream_slug = NULL")

    code, out, term = run_with_stderr_on_a_pty(args, env)
    assert code == 0, term
    assert out == "inferred 5, defaulted 0, set 5, unresolved 0\n"  # stdout is a pipe: plain
    # Rich's bar, advanced chunk by chunk to the 5 batches the walk found without a workstream.
    assert "\x1b[" in term and "backfilling" in term and "5/5" in term, term
    assert set(workstreams(conn).values()) == {"alpha"}

    reset()
    plain = subprocess.run(wsctl_argv(None, *args), capture_output=True, env=env, text=True)
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr == ""  # no bar, no escape codes
    assert plain.stdout == "inferred 5, defaulted 0, set 5, unresolved 0\n"

    # With --enforce the one bar covers the read-only check pass and then the walk.
    reset()
    code, out, term = run_with_stderr_on_a_pty([*args, "--enforce"], env)
    assert code == 0, term
    assert "10/10" in term, term
    assert check_count(conn) == 1
