"""`wsctl prune` on a real PostgreSQL: what it removes, what it never touches, and how it resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import table_snapshot
from tests.support import factories as f
from tests.support.commands import wsctl_argv

STEPS = ["normalize_all_core_values", "enrich_company_via_waterfall_in_clay"]
TWO_STEP_APP = """
def start_normalize_all_core_values(item_id, workstream_slug=None):
    return None

def start_second(item_id, workstream_slug=None):
    return None
"""


def _age(conn, batch_id, days: float = 40) -> None:
    """Make every state of the batch last updated ``days`` ago."""
    conn.execute(
        "UPDATE workflow_states SET updated_at = now() - make_interval(days => %s)"
        " WHERE batch_id = %s",
        (days, batch_id),
    )
    conn.execute(
        "UPDATE batches SET created_at = now() - make_interval(days => %s + 1) WHERE id = %s",
        (days, batch_id),
    )


def _finished_batch(conn, client, n: int, *, days: float = 40, two_steps: bool = True):
    """A batch whose items completed both steps (one FAILED on the second) ``days`` ago."""
    b = f.add_batch(conn, client, STEPS if two_steps else STEPS[:1], n, first_status="COMPLETED")
    if two_steps:
        conn.execute(
            "INSERT INTO workflow_states (item_id, batch_id, step_name, status)"
            " SELECT item_id, batch_id, %s, 'COMPLETED' FROM workflow_states WHERE batch_id = %s",
            (STEPS[1], b),
        )
        conn.execute(
            "UPDATE workflow_states SET status = 'FAILED' WHERE id = (SELECT id FROM"
            " workflow_states WHERE batch_id = %s AND step_name = %s LIMIT 1)",
            (b, STEPS[1]),
        )
    _age(conn, b, days)
    return b


def _rows(conn, batch_id) -> dict[str, dict]:
    return {
        str(r[0]): r[1]
        for r in conn.execute(
            "SELECT id, to_jsonb(s) FROM workflow_states s WHERE batch_id = %s", (batch_id,)
        ).fetchall()
    }


def _archive(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count(conn, sql: str, *params) -> int:
    return conn.execute(sql, params).fetchone()[0]


@pytest.fixture
def client(conn):
    f.register_seed(conn)
    return f.add_client(conn)


def test_prunes_only_finished_batches_and_never_active_ones(conn, client, cli):
    old = _finished_batch(conn, client, 5)
    recent = _finished_batch(conn, client, 3, days=1)
    active = f.add_batch(conn, client, STEPS, 4)  # PENDING, long ago
    _age(conn, active)
    # cancelled, but one state still DISPATCHED (in flight): not finished
    cancelled = f.add_batch(conn, client, STEPS, 3, first_status="CANCELLED")
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED' WHERE id = (SELECT id FROM"
        " workflow_states WHERE batch_id = %s LIMIT 1)",
        (cancelled,),
    )
    _age(conn, cancelled)
    # a status the dashboard invented is not finished either
    invented = _finished_batch(conn, client, 2)
    conn.execute(
        "UPDATE workflow_states SET status = 'needs review' WHERE id = (SELECT id FROM"
        " workflow_states WHERE batch_id = %s LIMIT 1)",
        (invented,),
    )
    conn.execute("UPDATE batches SET status = 'COMPLETED'")  # the dashboard's column is not trusted
    kept = {b: _rows(conn, b) for b in (recent, active, cancelled, invented)}
    items_before = table_snapshot(conn, ["batch_items"])

    dry = cli("prune", "--older-than", "30d", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert [b["batch_id"] for b in dry.json()["batches"]] == [str(old)]
    assert dry.json()["batches"][0]["states"] == 10
    assert _count(conn, "SELECT count(*) FROM workflow_states WHERE batch_id = %s", old) == 10

    r = cli("prune", "--older-than", "30d", "--json", "--chunk-size", "3")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["states_pruned"] == 10 and doc["items_pruned"] == 0
    assert doc["batches"][0]["status"] == "pruned"
    assert _count(conn, "SELECT count(*) FROM workflow_states WHERE batch_id = %s", old) == 0
    for b, rows in kept.items():
        assert _rows(conn, b) == rows
    assert table_snapshot(conn, ["batch_items"]) == items_before  # never the items by default
    summary = conn.execute(
        "SELECT states_pruned, items, counts, states_pruned_at IS NOT NULL FROM"
        " wsctl.pruned_batches WHERE batch_id = %s",
        (old,),
    ).fetchone()
    assert summary[0] == 10 and summary[1] == 5 and summary[3]
    assert summary[2] == {STEPS[0]: {"COMPLETED": 5}, STEPS[1]: {"COMPLETED": 4, "FAILED": 1}}

    again = cli("prune", "--older-than", "30d", "--json")
    assert again.code == 0 and again.json()["batches"] == []


@pytest.mark.parametrize(
    "status",
    # one of each range the "not finished" probes read (status < 'CANCELLED', between
    # 'CANCELLED' and 'COMPLETED', between 'COMPLETED' and 'FAILED', > 'FAILED')
    ["AWAITING", "BLOCKED", "CHECKING", "DISPATCHED", "DISPATCHING", "PENDING", "needs review"],
)
def test_a_state_in_any_unfinished_status_range_keeps_its_batch(conn, client, status):
    from wsctl import prune
    from wsctl.queries import q, scalar

    kept = _finished_batch(conn, client, 3)
    conn.execute(
        "UPDATE workflow_states SET status = %s WHERE id = (SELECT id FROM"
        " workflow_states WHERE batch_id = %s ORDER BY id LIMIT 1)",
        (status, kept),
    )
    done = _finished_batch(conn, client, 3)  # COMPLETED and FAILED; one CANCELLED too
    conn.execute(
        "UPDATE workflow_states SET status = 'CANCELLED' WHERE id = (SELECT id FROM"
        " workflow_states WHERE batch_id = %s AND status = 'COMPLETED' ORDER BY id LIMIT 1)",
        (done,),
    )
    assert scalar(conn.execute(q("prune_batch_unfinished"), {"batch_id": kept})) is True
    assert scalar(conn.execute(q("prune_batch_unfinished"), {"batch_id": done})) is False
    report = prune.prune(conn, older_than="30d", dry_run=True)
    assert [b.batch_id for b in report.batches] == [done]


def test_explicit_batch_that_is_active_or_recent_is_refused(conn, client, cli):
    active = f.add_batch(conn, client, STEPS, 2)
    _age(conn, active)
    recent = _finished_batch(conn, client, 2, days=1)
    before = table_snapshot(conn)
    r = cli("prune", "--older-than", "30d", "--batch", str(active))
    assert r.code == 1
    assert f"batch {active} is active: 2 of its 2 state(s)" in r.err
    assert len(r.err.strip().splitlines()) == 1
    r = cli("prune", "--older-than", "30d", "--batch", str(recent))
    assert r.code == 1 and "less than 30d ago" in r.err
    r = cli("prune", "--older-than", "soon")
    assert r.code == 2 and "--older-than must be a duration" in r.err
    assert table_snapshot(conn) == before
    assert _count(conn, "SELECT count(*) FROM wsctl.pruned_batches") == 0


def test_item_show_and_batch_status_answer_for_a_pruned_batch(conn, client, cli):
    b = _finished_batch(conn, client, 3)
    item = _count(conn, "SELECT id FROM batch_items WHERE batch_id = %s LIMIT 1", b)
    assert cli("prune", "--older-than", "30d").code == 0

    shown = cli("item", "show", str(item), "--json")
    assert shown.code == 0, shown.err
    doc = shown.json()
    assert [s["status"] for s in doc["steps"]] == ["PRUNED", "PRUNED"]
    assert doc["pruned"]["states_pruned"] == 6 and doc["pruned"]["complete"]
    assert any("were pruned" in w for w in doc["warnings"])
    human = cli("item", "show", str(item))
    assert human.code == 0 and "PRUNED" in human.out and "pruned" in human.err

    st = cli("batch", "status", str(b), "--json")
    assert st.code == 0, st.err
    sdoc = st.json()
    assert sdoc["pruned"]["states_pruned"] == 6
    assert [s["counts"] for s in sdoc["steps"]] == [
        {"COMPLETED": 3},
        {"COMPLETED": 2, "FAILED": 1},
    ]
    text = cli("batch", "status", str(b))
    assert text.code == 0 and "6 state(s) removed" in text.out
    refused = cli("prune", "--older-than", "30d", "--batch", str(b))
    assert refused.code == 1 and "already pruned" in refused.err


def test_include_items_archives_and_removes_them(conn, client, cli, tmp_path):
    b = _finished_batch(conn, client, 4)
    other = f.add_batch(conn, client, STEPS, 2)
    items = {
        str(r[0]): r[1]
        for r in conn.execute(
            "SELECT id, to_jsonb(i) FROM batch_items i WHERE batch_id = %s", (b,)
        ).fetchall()
    }
    states = _rows(conn, b)
    archive = tmp_path / "a.jsonl"
    r = cli("prune", "--older-than", "30d", "--include-items", "--archive", str(archive), "--json")
    assert r.code == 0, r.err
    assert "--include-items" in r.err  # said loudly
    assert r.json()["items_pruned"] == 4 and r.json()["states_pruned"] == 8
    lines = _archive(archive)
    assert {ln["row"]["id"]: ln["row"] for ln in lines if ln["table"] == "batch_items"} == items
    assert {
        ln["row"]["id"]: ln["row"] for ln in lines if ln["table"] == "workflow_states"
    } == states
    assert _count(conn, "SELECT count(*) FROM batch_items WHERE batch_id = %s", b) == 0
    assert _count(conn, "SELECT count(*) FROM batch_items WHERE batch_id = %s", other) == 2
    gone = cli("item", "show", next(iter(items)))
    assert gone.code == 1 and "--include-items" in gone.err
    st = cli("batch", "status", str(b), "--json")
    assert st.code == 0 and st.json()["items"] == 4 and st.json()["pruned"]["items_pruned"] == 4


def _prune_proc(url: str, *args: str, pause: float | None = None) -> subprocess.Popen:
    env = {**os.environ}
    if pause is not None:
        env["WSCTL_TEST_PRUNE_PAUSE"] = str(pause)
    return subprocess.Popen(
        wsctl_argv(url, "prune", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_archive_is_on_disk_before_the_rows_are_deleted(db_url, conn, client, tmp_path):
    b = _finished_batch(conn, client, 10, two_steps=False)
    archive = tmp_path / "a.jsonl"
    p = _prune_proc(
        db_url, "--older-than", "30d", "--archive", str(archive), "--chunk-size", "4", pause=3
    )
    try:
        _wait_for(lambda: _lines(archive) == 4, 30, "the first chunk in the archive")
        # written and fsynced, not deleted yet: every archived row is still in the table
        ids = [ln["row"]["id"] for ln in _archive(archive)]
        assert _count(conn, "SELECT count(*) FROM workflow_states WHERE id = ANY(%s::uuid[])", ids)
        assert _count(conn, "SELECT count(*) FROM workflow_states WHERE batch_id = %s", b) == 10
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_prune_resumes_with_every_row_archived_once(
    db_url, conn, client, tmp_path, sig
):
    batches = [_finished_batch(conn, client, 9) for _ in range(2)]
    original = {}
    for b in batches:
        original.update(_rows(conn, b))
    archive = tmp_path / "a.jsonl"
    args = ("--older-than", "30d", "--archive", str(archive), "--chunk-size", "5")
    # Kill twice at the worst moment: the chunk's rows written and fsynced, not yet deleted.
    for kill_at in (10, 25):
        p = _prune_proc(db_url, *args, pause=0.5)
        try:
            _wait_for(lambda k=kill_at: _lines(archive) >= k, 60, f"{kill_at} archived rows")
        finally:
            p.send_signal(sig)
            code = p.wait(20)
        if sig == signal.SIGINT:
            assert code == 130, p.stderr.read()
        left = _count(
            conn, "SELECT count(*) FROM workflow_states WHERE batch_id = ANY(%s::uuid[])", batches
        )
        assert 0 < left < len(original)
    done = _prune_proc(db_url, *args, "--json")
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    assert sum(b["states_pruned"] for b in json.loads(out)["batches"]) > 0
    lines = _archive(archive)
    ids = [ln["row"]["id"] for ln in lines]
    assert len(ids) == len(set(ids)) == len(original)  # exactly once each
    assert {ln["row"]["id"]: ln["row"] for ln in lines} == original
    assert (
        _count(
            conn, "SELECT count(*) FROM workflow_states WHERE batch_id = ANY(%s::uuid[])", batches
        )
        == 0
    )
    committed = conn.execute("SELECT committed_bytes, committed_rows FROM wsctl.prune_archives")
    assert committed.fetchone() == (archive.stat().st_size, len(original))
    sums = conn.execute(
        "SELECT sum(states_pruned), bool_and(states_pruned_at IS NOT NULL) FROM wsctl.pruned_batches"
    ).fetchone()
    assert sums == (len(original), True)


def test_a_truncated_archive_is_refused(conn, client, cli, tmp_path):
    _finished_batch(conn, client, 3)
    archive = tmp_path / "a.jsonl"
    assert cli("prune", "--older-than", "30d", "--archive", str(archive)).code == 0
    _finished_batch(conn, client, 3)
    archive.write_text("")
    before = table_snapshot(conn, ["workflow_states"])
    r = cli("prune", "--older-than", "30d", "--archive", str(archive))
    assert r.code == 1 and "truncated or replaced" in r.err
    assert table_snapshot(conn, ["workflow_states"]) == before


def test_an_uncommitted_archive_tail_is_cut_and_said(conn, client, cli, tmp_path):
    """What an interrupted run appended but never committed is cut before the first chunk,
    and the user is told (on stderr, --json too)."""
    _finished_batch(conn, client, 3)
    archive = tmp_path / "a.jsonl"
    assert cli("prune", "--older-than", "30d", "--archive", str(archive)).code == 0
    committed, first = archive.read_bytes(), _lines(archive)
    tail = b'{"table": "workflow_states", "row": {"id": "half-writ'
    with archive.open("ab") as fh:
        fh.write(tail)
    _finished_batch(conn, client, 2)
    r = cli("prune", "--older-than", "30d", "--archive", str(archive), "--json")
    assert r.code == 0, r.err
    assert r.err.count(f"wsctl: resuming archive {archive.resolve()}: cut {len(tail)} byte(s)") == 1
    assert r.json()["archive_truncated_bytes"] == len(tail)
    assert archive.read_bytes().startswith(committed) and _lines(archive) == first + 4
    assert all(line["row"]["id"] for line in _archive(archive))


@pytest.mark.parametrize("size", ["0", "100001"])
def test_a_chunk_size_out_of_range_is_a_usage_error(conn, client, cli, size):
    _finished_batch(conn, client, 2)
    before = table_snapshot(conn, ["workflow_states"])
    r = cli("prune", "--older-than", "30d", "--chunk-size", size)
    assert r.code == 2 and "--chunk-size must be between 1 and 100000" in r.err
    assert table_snapshot(conn, ["workflow_states"]) == before


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_an_empty_batch_value_is_refused_not_taken_for_every_batch(conn, client, cli, value):
    """`--batch "$ID"` with $ID unset must not prune every finished batch."""
    _finished_batch(conn, client, 2)
    before = table_snapshot(conn, ["workflow_states"])
    r = cli("prune", "--older-than", "30d", "--batch", value)
    assert r.code == 2 and "Invalid value for '--batch': names no id" in r.err
    assert table_snapshot(conn, ["workflow_states"]) == before


def test_batch_takes_several_ids_comma_separated(conn, client, cli):
    """--batch reads as in backfill: repeated, or comma-separated, or both."""
    a, b, c = (_finished_batch(conn, client, 2) for _ in range(3))
    r = cli("prune", "--older-than", "30d", "--batch", f"{a}, {b}", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert {x["batch_id"] for x in r.json()["batches"]} == {str(a), str(b)}
    r = cli("prune", "--older-than", "30d", "--batch", str(a), "--batch", f"{c},", "--json")
    assert r.code == 0, r.err
    assert {x["batch_id"] for x in r.json()["batches"]} == {str(a), str(c)}


def test_concurrent_dispatch_loop_loses_nothing(db_url, conn, client, tmp_path):
    conn.execute(
        "UPDATE enrichment_registry SET type = 'sync', modal_sender_fn = 'start_second'"
        " WHERE slug = %s AND workstream_slug = 'apollo_scrape'",
        (STEPS[1],),
    )
    app = tmp_path / "app.py"
    app.write_text(TWO_STEP_APP)
    finished = [_finished_batch(conn, client, 60) for _ in range(3)]
    active = f.add_batch(conn, client, STEPS, 300)
    _age(conn, active)  # its PENDING states are old: only the statuses keep it safe
    loop = subprocess.Popen(
        wsctl_argv(
            db_url,
            "dispatch",
            "--loop",
            "--interval",
            "0.05",
            "--limit",
            "10",
            "--backend",
            "local",
            "--app",
            str(app),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done_before = _wait_for(
            lambda: _count(
                conn,
                "SELECT count(*) FROM workflow_states WHERE batch_id = %s AND status = 'COMPLETED'",
                active,
            ),
            60,
            "the dispatcher to start",
        )
        assert done_before < 600  # the prune starts while the batch is being dispatched
        archive = tmp_path / "a.jsonl"
        p = _prune_proc(
            db_url,
            "--older-than",
            "30d",
            "--archive",
            str(archive),
            "--chunk-size",
            "7",
            pause=0.03,
        )
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        _wait_for(
            lambda: (
                _count(
                    conn,
                    "SELECT count(*) FROM workflow_states WHERE batch_id = %s AND status = 'COMPLETED'",
                    active,
                )
                == 600
            ),
            120,
            "the dispatcher to finish the active batch",
        )
    finally:
        loop.send_signal(signal.SIGINT)
        loop.wait(30)
    assert f.states(conn, active) == [(STEPS[1], "COMPLETED", 300), (STEPS[0], "COMPLETED", 300)]
    assert (
        _count(
            conn, "SELECT count(*) FROM workflow_states WHERE batch_id = ANY(%s::uuid[])", finished
        )
        == 0
    )
    assert len(_archive(archive)) == 3 * 120
    assert _count(conn, "SELECT count(*) FROM wsctl.pruned_batches") == 3


def test_rows_inserted_without_an_id_get_time_ordered_ids(conn, client):
    """Migration 0014: UUIDv7 defaults, so a batch's rows sit together in the indexes."""
    b = f.add_batch(conn, client, STEPS, 50)  # ids from the column defaults
    for table in ("batch_items", "workflow_states"):
        rows = conn.execute(
            f"SELECT id FROM {table} WHERE batch_id = %s ORDER BY ctid", (b,)
        ).fetchall()
        ids = [r[0] for r in rows]
        assert all(i.version == 7 for i in ids)
        # the first 48 bits are the insert's milliseconds: within seconds of now
        ms = [int.from_bytes(i.bytes[:6], "big") for i in ids]
        assert abs(ms[0] / 1000 - time.time()) < 60 and ms == sorted(ms)


def test_archive_write_failures_remove_nothing(conn, client, cli):
    _finished_batch(conn, client, 3)
    before = table_snapshot(conn, ["workflow_states"])
    r = cli("prune", "--older-than", "30d", "--archive", "/nonexistent-dir/a.jsonl")
    assert r.code == 1 and r.err.startswith("wsctl: error: cannot open archive")
    r = cli("prune", "--older-than", "30d", "--archive", "/dev/full")  # every write: ENOSPC
    assert r.code == 1 and "cannot write archive /dev/full" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert table_snapshot(conn, ["workflow_states"]) == before
    assert _count(conn, "SELECT count(*) FROM wsctl.pruned_batches") == 0


def test_an_archive_loads_back_as_the_notes_say(conn, client, cli, tmp_path):
    """The recipe of the notes: COPY the lines into a jsonb column, jsonb_populate_record."""
    b = _finished_batch(conn, client, 4)
    states = _rows(conn, b)
    items = table_snapshot(conn, ["batch_items"])
    archive = tmp_path / "a.jsonl"
    r = cli("prune", "--older-than", "30d", "--include-items", "--archive", str(archive))
    assert r.code == 0, r.err
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE archive (line jsonb)")
        with conn.cursor().copy(
            "COPY archive FROM STDIN WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')"
        ) as copy:
            copy.write(archive.read_bytes())
        conn.execute(
            "INSERT INTO public.batch_items SELECT (jsonb_populate_record(NULL::public.batch_items,"
            " line->'row')).* FROM archive WHERE line->>'table' = 'batch_items'"
            " ON CONFLICT (id) DO NOTHING"
        )
        conn.execute(
            "INSERT INTO public.workflow_states SELECT (jsonb_populate_record("
            "NULL::public.workflow_states, line->'row')).* FROM archive"
            " WHERE line->>'table' = 'workflow_states' ON CONFLICT (id) DO NOTHING"
        )
        conn.execute("DELETE FROM wsctl.pruned_batches WHERE batch_id = %s", (b,))
    assert _rows(conn, b) == states
    assert table_snapshot(conn, ["batch_items"]) == items
    st = cli("batch", "status", str(b), "--json").json()
    assert st["pruned"] is None and st["items"] == 4


def test_db_tune_prints_then_applies_per_table_autovacuum(conn, cli):
    printed = cli("db", "tune", "--json")
    assert printed.code == 0, printed.err
    doc = printed.json()
    assert not doc["applied"] and all(s["current"] is None for s in doc["settings"])
    assert _count(conn, "SELECT reloptions IS NULL FROM pg_class WHERE relname = 'workflow_states'")
    assert "autovacuum_vacuum_scale_factor = 0.02" in cli("db", "tune").out
    assert cli("db", "tune", "--apply").code == 0
    options = conn.execute(
        "SELECT reloptions FROM pg_class WHERE relname = 'workflow_states'"
    ).fetchone()[0]
    assert "autovacuum_vacuum_scale_factor=0.02" in options
    again = cli("db", "tune", "--json").json()
    assert all(not s["changes"] for s in again["settings"])
