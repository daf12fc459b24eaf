"""`wsctl demo`: the whole flow on one machine, against a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.conftest import table_snapshot
from tests.support import factories as f
from wsctl import demo

N_ITEMS = sum(len(v) for v in demo.demo_items().values())


def _check_run(doc: dict) -> None:
    assert doc["ok"] is True
    assert [b["workstream"] for b in doc["batches"]] == ["apollo_scrape", "linkedin_scrape"]
    rows = doc["rows"]
    assert len(rows) == N_ITEMS * len(demo.BLUEPRINT)
    for r in rows:
        assert r["status"] == "COMPLETED", r
        # The config row the function actually used belongs to the item's batch's workstream,
        # and the function that ran is the one registered for (step, that workstream).
        assert r["config_workstream"] == r["workstream"], r
        assert r["ran_workstream"] == r["workstream"], r
        assert r["ran_function"] == r["function"] == demo.REGISTRY[(r["step"], r["workstream"])][1]
        assert r["config_id"]
    # Same workflow slug, two workstreams, two different config rows.
    by_key = {(r["step"], r["workstream"]): r["config_id"] for r in rows}
    for step in demo.BLUEPRINT:
        assert by_key[(step, "apollo_scrape")] != by_key[(step, "linkedin_scrape")]
    # Clay got each item at its own workstream's table, and its payload came back.
    items_ws = {r["item_id"]: r["workstream"] for r in rows}
    assert len(doc["clay_requests"]) == 2 * N_ITEMS
    for req in doc["clay_requests"]:
        assert req["path"].startswith(f"/{items_ws[req['item_id']]}/")
    for r in rows:
        if r["step"].endswith("_in_clay"):
            assert r["clay"]["clay_table"].startswith(f"/{r['workstream']}/")
    # The normalizer configs differ too: linkedin_scrape's says case "upper".
    names = {r["workstream"]: r["detail"] for r in rows if r["step"] == demo.STEP_NAME}
    assert names["linkedin_scrape"] == names["linkedin_scrape"].upper()


def test_demo_twice_against_a_given_database(run_cli, db_url):
    first = run_cli("demo", "--json", url=db_url)
    assert first.code == 0, first.err
    doc1 = first.json()
    _check_run(doc1)
    assert "pass 1:" in first.err  # progress on stderr

    second = run_cli("demo", "--json", url=db_url)
    assert second.code == 0, second.err
    doc2 = second.json()
    _check_run(doc2)
    assert {b["batch_id"] for b in doc1["batches"]}.isdisjoint(
        b["batch_id"] for b in doc2["batches"]
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        # Catalog rows were upserted, not duplicated; the first run's results are intact.
        assert conn.execute("SELECT count(*) FROM clients").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM enrichment_registry").fetchone()[0] == len(
            demo.REGISTRY
        )
        assert conn.execute(
            "SELECT count(*) FROM workflow_states WHERE status = 'COMPLETED'"
        ).fetchone()[0] == 2 * N_ITEMS * len(demo.BLUEPRINT)
        assert (
            conn.execute("SELECT count(*) FROM enrichment_example.people").fetchone()[0]
            == 2 * N_ITEMS
        )


def test_demo_pass_lines_count_the_callbacks_of_their_pass(run_cli, db_url):
    """Each pass's state summary is printed after its Clay callbacks landed: no line shows
    states still DISPATCHED, and the last one agrees with the closing line."""
    res = run_cli("demo", url=db_url)
    assert res.code == 0, res.err
    passes = [ln for ln in res.err.splitlines() if ln.startswith("wsctl: pass ")]
    assert passes
    for ln in passes:
        assert "DISPATCHED" not in ln and "DISPATCHING" not in ln, ln
    n_steps = N_ITEMS * len(demo.BLUEPRINT)
    assert passes[-1].endswith(f"states now COMPLETED {n_steps}"), passes[-1]
    assert f"{n_steps} steps in 2 batches" in res.err


def test_demo_table_output(run_cli, db_url):
    res = run_cli("demo", url=db_url)
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].split("\t") == [
        "item",
        "workstream",
        "step",
        "status",
        "function",
        "config used",
        "detail",
    ]
    assert len(lines) == 1 + N_ITEMS * len(demo.BLUEPRINT)
    used_ids = set()
    for line in lines[1:]:
        cells = line.split("\t")
        assert cells[3] == "COMPLETED"
        # config used: the item's own workstream and the config row's whole id (not 8 chars)
        ws, _, rest = cells[5].partition(" (")
        assert ws == cells[1] and rest.endswith(")")
        used_ids.add(str(uuid.UUID(rest[:-1])))
    with psycopg.connect(db_url) as c:
        ids = {str(r[0]) for r in c.execute("SELECT id FROM client_workflow_configs")}
    assert used_ids and used_ids <= ids
    assert "every step ran with its own workstream's config" in res.err


BOGUS_URL = "postgresql://nobody@127.0.0.1:1/nowhere"


@pytest.mark.parametrize("spelling", ["after the command", "before the command"])
def test_demo_takes_database_url_before_or_after_the_command(
    run_cli, db_url, monkeypatch, spelling
):
    """`wsctl demo --database-url URL` and `wsctl --database-url URL demo` are the same run;
    WSCTL_DATABASE_URL, DATABASE_URL and wsctl.toml are still ignored."""
    from wsctl.redact import mask_url

    monkeypatch.setenv("WSCTL_DATABASE_URL", BOGUS_URL)
    monkeypatch.setenv("DATABASE_URL", BOGUS_URL)
    Path("wsctl.toml").write_text(f'[database]\nurl = "{BOGUS_URL}"\n')
    if spelling == "after the command":
        res = run_cli("demo", "--database-url", db_url, "--json")
    else:
        res = run_cli("--database-url", db_url, "demo", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    _check_run(doc)
    assert doc["database"] == mask_url(db_url)
    assert "embedded" not in res.err


def test_demo_database_url_of_the_command_beats_the_global_one(run_cli, db_url, conn):
    before = table_snapshot(conn)
    res = run_cli("--database-url", db_url, "demo", "--database-url", BOGUS_URL)
    assert res.code == 3  # it tried the command's URL (which refuses connections)
    assert "127.0.0.1:1" in res.err and len(res.err.strip().splitlines()) == 1
    assert res.out == ""
    assert table_snapshot(conn) == before


def test_demo_finishes_an_interrupted_earlier_run_cleanly(run_cli, db_url):
    assert run_cli("demo", "--json", url=db_url).code == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        # An earlier run died mid-way: a batch with a PENDING state is left behind.
        client = conn.execute("SELECT id FROM clients").fetchone()[0]
        stale = f.add_batch(conn, client, demo.BLUEPRINT, 1, workstream="apollo_scrape")
    res = run_cli("demo", "--json", url=db_url)
    assert res.code == 0, res.err
    _check_run(res.json())
    assert "cancelled 1 unfinished batch" in res.err
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT status FROM batches WHERE id = %s", (stale,)).fetchone() == (
            "CANCELLED",
        )


def test_demo_refuses_a_database_with_other_clients(run_cli, db_url, conn):
    f.add_client(conn, "Real Customer Inc")
    before = table_snapshot(conn)
    res = run_cli("demo", url=db_url)
    assert res.code == 1
    assert res.err.startswith("wsctl: error: refusing to run the demo")
    assert len(res.err.strip().splitlines()) == 1
    assert table_snapshot(conn) == before
    assert conn.execute("SELECT to_regnamespace('enrichment_example')").fetchone()[0] is None


def test_demo_refuses_a_bad_timeout(run_cli, db_url, conn):
    before = table_snapshot(conn)
    res = run_cli("demo", "--timeout", "0", url=db_url)
    assert res.code == 2
    assert table_snapshot(conn) == before


def test_demo_gives_up_clearly_when_clay_never_calls_back(run_cli, db_url, conn, monkeypatch):
    # A Clay that accepts rows and never answers: the demo stops at its time limit.
    monkeypatch.setattr(demo.ClayStandIn, "_call_back", lambda self, path, row: None)
    res = run_cli("demo", "--timeout", "3", url=db_url)
    assert res.code == 1
    assert "did not finish within 3 s" in res.err
    assert "DISPATCHED" in res.err
    assert res.out == ""


@pytest.fixture
def data_home(monkeypatch):
    """A user data dir of its own (mkdtemp: readable by the embedded server's system user)."""
    path = Path(tempfile.mkdtemp(prefix="wsctl-demo-test-"))
    os.chmod(path, 0o755)
    monkeypatch.setenv("XDG_DATA_HOME", str(path))
    yield path
    from wsctl import embedded

    embedded.stop(path / "wsctl")
    shutil.rmtree(path, ignore_errors=True)


def test_demo_without_database_url_uses_its_own_embedded_database(
    run_cli, db_url, conn, data_home, monkeypatch
):
    """A configured database (env, wsctl.toml) is never touched: only --database-url counts."""
    monkeypatch.setenv("WSCTL_DATABASE_URL", db_url)
    Path("wsctl.toml").write_text(f'[database]\nurl = "{db_url}"\n')
    before = table_snapshot(conn)
    res = run_cli("demo", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    _check_run(doc)
    assert f"/{demo.DEMO_DBNAME}?" in doc["database"]
    assert str(data_home) in doc["database"]
    assert table_snapshot(conn) == before
    assert os.environ["WSCTL_DATABASE_URL"] == db_url  # restored after the run
    assert "stop it with `wsctl embedded stop`" in res.err  # it keeps running: say how to stop it
