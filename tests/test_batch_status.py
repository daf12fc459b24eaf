"""wsctl batch status / list / cancel against a real PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import table_snapshot
from tests.test_batch_create import APOLLO, BLUEPRINT, create_args, seed_catalog

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = BLUEPRINT.split(",")


@pytest.fixture
def catalog(conn):
    return seed_catalog(conn)


@pytest.fixture
def batch_id(cli, catalog) -> str:
    r = cli(*create_args(APOLLO, "--json"))
    assert r.code == 0, r.err
    return r.json()["batch_id"]


def _set_status(conn, batch_id, status, n, step=STEPS[0], where="PENDING"):
    """Move n states of a step to a status, as the dispatcher or the dashboard would."""
    conn.execute(
        "UPDATE public.workflow_states SET status = %s WHERE id IN ("
        " SELECT id FROM public.workflow_states WHERE batch_id = %s AND step_name = %s"
        " AND status = %s ORDER BY id LIMIT %s)",
        (status, batch_id, step, where, n),
    )


def test_status_counts_every_status_per_step(cli, conn, batch_id):
    _set_status(conn, batch_id, "DISPATCHED", 10)
    _set_status(conn, batch_id, "COMPLETED", 5)
    _set_status(conn, batch_id, "Retrying (manual)", 3)  # free text written by the dashboard
    # Five completed items moved on to the second step, one of them already failed there.
    conn.execute(
        "INSERT INTO public.workflow_states (item_id, batch_id, step_name, status)"
        " SELECT item_id, batch_id, %s, 'PENDING' FROM public.workflow_states"
        " WHERE batch_id = %s AND status = 'COMPLETED'",
        (STEPS[1], batch_id),
    )
    _set_status(conn, batch_id, "FAILED", 1, step=STEPS[1])
    # A step outside the blueprint (an old dashboard experiment) still shows.
    conn.execute(
        "INSERT INTO public.workflow_states (item_id, batch_id, step_name, status)"
        " SELECT id, batch_id, 'legacy_step', 'WAITING' FROM public.batch_items"
        " WHERE batch_id = %s LIMIT 2",
        (batch_id,),
    )

    r = cli("batch", "status", batch_id, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["batch_id"] == batch_id and doc["status"] == "PENDING"
    assert doc["client"] == "acme" and doc["workstream"] == "apollo_scrape"
    assert doc["items"] == 200 and doc["blueprint"] == STEPS
    steps = {s["step"]: s for s in doc["steps"]}
    assert [s["step"] for s in doc["steps"]] == [*STEPS, "legacy_step"]
    assert steps[STEPS[0]]["counts"] == {
        "PENDING": 182,
        "DISPATCHED": 10,
        "COMPLETED": 5,
        "Retrying (manual)": 3,
    }
    assert steps[STEPS[0]]["total"] == 200 and steps[STEPS[0]]["position"] == 1
    assert steps[STEPS[1]]["counts"] == {"PENDING": 4, "FAILED": 1}
    assert steps[STEPS[2]]["counts"] == {} and steps[STEPS[2]]["total"] == 0
    assert steps["legacy_step"]["position"] is None
    assert steps["legacy_step"]["counts"] == {"WAITING": 2}

    r = cli("batch", "status", batch_id)
    assert r.code == 0
    assert "Retrying (manual)" in r.out and "workstream apollo_scrape" in r.out
    header = next(line for line in r.out.splitlines() if line.startswith("#\t"))
    assert header.split("\t") == [
        "#",
        "step",
        "PENDING",
        "DISPATCHED",
        "COMPLETED",
        "FAILED",
        "Retrying (manual)",
        "WAITING",
        "total",
    ]


@pytest.mark.parametrize("command", ["status", "cancel"])
@pytest.mark.parametrize(
    ("value", "message"),
    [(str(uuid.uuid4()), "no batch with id"), ("not-a-uuid", "expected a UUID")],
)
def test_unknown_or_malformed_ids_exit_1(cli, conn, batch_id, command, value, message):
    before = table_snapshot(conn)
    r = cli("batch", command, value)
    assert r.code == 1 and message in r.err
    assert table_snapshot(conn) == before


def test_list_filters(cli, conn, catalog):
    a = cli(*create_args(EXAMPLES / "items.csv", "--json")).json()["batch_id"]
    g = cli(*create_args(EXAMPLES / "items.csv", "--json", client="globex")).json()["batch_id"]
    legacy = conn.execute(
        "INSERT INTO public.batches (client_id, blueprint, status) VALUES (%s, %s, 'RUNNING')"
        " RETURNING id",
        (catalog["acme"], STEPS[:1]),
    ).fetchone()[0]

    every = cli("batch", "list", "--json")
    assert every.code == 0
    assert {b["batch_id"] for b in every.json()} == {a, g, str(legacy)}
    acme = cli("batch", "list", "--client", "acme", "--json").json()
    assert {b["batch_id"] for b in acme} == {a, str(legacy)}
    ws = cli("batch", "list", "--workstream", "apollo_scrape", "--json").json()
    assert {b["batch_id"] for b in ws} == {a, g}
    missing = cli("batch", "list", "--missing-workstream", "--json").json()
    assert [b["batch_id"] for b in missing] == [str(legacy)]
    assert missing[0]["workstream"] is None and missing[0]["status"] == "RUNNING"
    assert len(cli("batch", "list", "--limit", "1", "--json").json()) == 1

    plain = cli("batch", "list", "--client", str(catalog["globex"]))
    assert plain.code == 0 and g in plain.out and a not in plain.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--client", "nobody"), "no client named"),
        (("--workstream", "NOT A SLUG"), "invalid workstream"),
    ],
)
def test_list_refusals(cli, conn, catalog, args, message):
    r = cli("batch", "list", *args)
    assert r.code == 1 and message in r.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--workstream", "apollo_scrape", "--missing-workstream"), "exclude each other"),
        (("--limit", "0"), "--limit"),
    ],
)
def test_list_usage_errors_are_exit_2_like_every_usage_error(cli, conn, catalog, args, message):
    r = cli("batch", "list", *args)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1


def test_list_shows_a_page_by_default_and_says_there_is_more(cli, conn, catalog):
    from wsctl.cli.cmd_batch import LIST_PAGE

    client = catalog["acme"]
    conn.execute(
        "INSERT INTO public.batches (client_id, blueprint, workstream_slug, created_at)"
        " SELECT %s, ARRAY['normalize_company_name'], 'apollo_scrape', now() - g * interval '1s'"
        " FROM generate_series(1, %s) g",
        (client, LIST_PAGE + 5),
    )
    total = conn.execute("SELECT count(*) FROM public.batches").fetchone()[0]
    page = cli("batch", "list", "--json")
    assert page.code == 0 and len(page.json()) == LIST_PAGE
    assert "--all" in page.err
    assert len(cli("batch", "list", "--all", "--json").json()) == total
    assert len(cli("batch", "list", "--limit", "3", "--json").json()) == 3
    plain = cli("batch", "list")
    assert len(plain.out.strip().splitlines()) == LIST_PAGE + 1  # the header and a page
    assert (
        plain.err.strip() == f"wsctl: showing the newest {LIST_PAGE}; --all or --limit N for more"
    )
    everything = cli("batch", "list", "--all")
    assert everything.code == 0 and everything.err == ""
    assert len(everything.out.strip().splitlines()) == total + 1


def test_cancel_stops_waiting_states_and_leaves_in_flight_ones(cli, conn, batch_id):
    _set_status(conn, batch_id, "DISPATCHED", 7)
    _set_status(conn, batch_id, "DISPATCHING", 2)
    _set_status(conn, batch_id, "BLOCKED", 4)
    _set_status(conn, batch_id, "COMPLETED", 1)
    before = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT id, status, updated_at FROM public.workflow_states WHERE batch_id = %s",
            (batch_id,),
        )
    }

    r = cli("batch", "cancel", batch_id, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc == {
        "batch_id": batch_id,
        "status": "CANCELLED",
        "previous_status": "PENDING",
        "cancelled_states": 186 + 4,
        "in_flight": 9,
    }
    after = dict(
        conn.execute(
            "SELECT status, count(*) FROM public.workflow_states WHERE batch_id = %s GROUP BY 1",
            (batch_id,),
        ).fetchall()
    )
    assert after == {"CANCELLED": 190, "DISPATCHED": 7, "DISPATCHING": 2, "COMPLETED": 1}
    # In-flight and finished states are untouched, to the timestamp.
    for sid, status, updated in conn.execute(
        "SELECT id, status, updated_at FROM public.workflow_states"
        " WHERE batch_id = %s AND status <> 'CANCELLED'",
        (batch_id,),
    ):
        assert before[sid] == (status, updated)
    assert (
        conn.execute("SELECT status FROM public.batches WHERE id = %s", (batch_id,)).fetchone()[0]
        == "CANCELLED"
    )
    # Nothing waits any more: the dispatcher's PENDING index has nothing of this batch.
    assert (
        conn.execute(
            "SELECT count(*) FROM public.workflow_states WHERE batch_id = %s AND status = 'PENDING'",
            (batch_id,),
        ).fetchone()[0]
        == 0
    )


def test_in_flight_state_completing_after_cancel_enqueues_nothing(cli, conn, batch_id):
    _set_status(conn, batch_id, "DISPATCHED", 3)
    assert cli("batch", "cancel", batch_id).code == 0
    # An in-flight state completes after the cancel: its next step is not enqueued.
    sid = conn.execute(
        "SELECT id FROM public.workflow_states WHERE batch_id = %s AND status = 'DISPATCHED' LIMIT 1",
        (batch_id,),
    ).fetchone()[0]
    assert conn.execute("SELECT wsctl.complete_step(%s)", (sid,)).fetchone()[0] is True
    pending = conn.execute(
        "SELECT count(*) FROM public.workflow_states WHERE batch_id = %s AND status = 'PENDING'",
        (batch_id,),
    ).fetchone()[0]
    assert pending == 0
    # Cancelling again is allowed and finds nothing left waiting.
    r = cli("batch", "cancel", batch_id)
    assert r.code == 0, r.err
    assert r.out.startswith(f"batch {batch_id} was already cancelled")
    assert "0 state(s) enqueued since cancelled, 2 in flight" in r.out


def test_cancel_refuses_a_completed_batch(cli, conn, batch_id):
    conn.execute("UPDATE public.batches SET status = 'COMPLETED' WHERE id = %s", (batch_id,))
    before = table_snapshot(conn)
    r = cli("batch", "cancel", batch_id)
    assert r.code == 1 and "is COMPLETED" in r.err
    assert table_snapshot(conn) == before
