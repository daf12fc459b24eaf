"""wsctl.complete_steps marks a batch COMPLETED exactly when every item completed its last step.

Migration 0023 replaced the check ("every item has a COMPLETED state of the last blueprint
step") by two per-batch counts. The scenarios run against both definitions, 0008's NOT
EXISTS and 0023's counts, and expect the same outcome of each: the meaning did not change.
The plan tests read the check's plan through auto_explain: no join, so no statistics can
turn it into a scan of every item of the table per finishing batch (0008) or a nested loop
over a batch's items (the OFFSET 0 rewrite of dropped migration 0015).
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from tests.support import factories as f
from wsctl import migrations
from wsctl.queries import sql_dir

STEPS = ["normalize_all_core_values", "enrich_company_via_waterfall_in_clay"]
OLD, NEW = "0008_complete_clears_reasons.sql", "0023_batch_completion_by_counts.sql"


def define_check(conn: psycopg.Connection, migration: str) -> None:
    conn.execute((sql_dir() / "migrations" / migration).read_text())


def batch_status(conn, batch) -> str:
    return conn.execute("SELECT status FROM batches WHERE id = %s", (batch,)).fetchone()[0]


def state_ids(conn, batch, step: str | None = None, status: str | None = None) -> list:
    return [
        r[0]
        for r in conn.execute(
            "SELECT id FROM workflow_states WHERE batch_id = %s"
            " AND (%s::text IS NULL OR step_name = %s) AND (%s::text IS NULL OR status = %s)"
            " ORDER BY id",
            (batch, step, step, status, status),
        )
    ]


def complete(conn, ids) -> int:
    return conn.execute("SELECT wsctl.complete_steps(%s::uuid[])", (ids,)).fetchone()[0]


@pytest.fixture
def client(conn):
    return f.add_client(conn)


@pytest.fixture(params=[OLD, NEW], ids=["check_0008", "check_0023"])
def check(request, conn):
    """The test runs once with each definition of the completion check."""
    if request.param == OLD:
        define_check(conn, OLD)
    return request.param


def test_the_migrated_function_is_0023s(conn):
    body = conn.execute(
        "SELECT pg_get_functiondef('wsctl.complete_steps(uuid[], uuid)'::regprocedure)"
    ).fetchone()[0]
    assert "SELECT count(*) FROM public.batch_items i WHERE i.batch_id = b.id" in body
    assert "NOT EXISTS" not in body.split("FOR NO KEY UPDATE")[1]


def test_a_batch_completes_with_its_last_items_last_step(conn, client, check):
    b = f.add_batch(conn, client, STEPS, 3)
    assert complete(conn, state_ids(conn, b, STEPS[0])) == 3
    assert batch_status(conn, b) == "PENDING"  # every first step done, no last step yet
    last = state_ids(conn, b, STEPS[1])
    assert len(last) == 3
    assert complete(conn, last[:2]) == 2
    assert batch_status(conn, b) == "PENDING"
    assert complete(conn, last[2:]) == 1
    assert batch_status(conn, b) == "COMPLETED"
    assert complete(conn, last) == 0  # again: nothing changes
    assert batch_status(conn, b) == "COMPLETED"


def test_one_call_finishing_several_batches_completes_exactly_the_finished_ones(
    conn, client, check
):
    done = f.add_batch(conn, client, STEPS[:1], 2)  # every item finishes in the call
    half = f.add_batch(conn, client, STEPS[:1], 2)  # one item stays PENDING
    # three items, only two with a state: the third never completed anything
    lacking = f.add_batch(conn, client, STEPS[:1], 2)
    orphan = conn.execute(
        "INSERT INTO batch_items (batch_id) VALUES (%s) RETURNING id", (lacking,)
    ).fetchone()[0]
    failed = f.add_batch(conn, client, STEPS[:1], 2)  # one item FAILED
    conn.execute(
        "UPDATE workflow_states SET status = 'FAILED' WHERE id = %s",
        (state_ids(conn, failed)[0],),
    )
    ids = (
        state_ids(conn, done)
        + state_ids(conn, half)[:1]
        + state_ids(conn, lacking)
        + state_ids(conn, failed, status="PENDING")
    )
    assert complete(conn, ids) == 6
    assert {
        "done": batch_status(conn, done),
        "half": batch_status(conn, half),
        "lacking": batch_status(conn, lacking),
        "failed": batch_status(conn, failed),
    } == {"done": "COMPLETED", "half": "PENDING", "lacking": "PENDING", "failed": "PENDING"}
    # the rest finishes them
    conn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name) VALUES (%s, %s, %s)",
        (orphan, lacking, STEPS[0]),
    )
    assert complete(conn, state_ids(conn, half, status="PENDING")) == 1
    assert complete(conn, state_ids(conn, lacking, status="PENDING")) == 1
    assert complete(conn, state_ids(conn, failed, status="FAILED")) == 1
    assert [batch_status(conn, x) for x in (half, lacking, failed)] == ["COMPLETED"] * 3


def test_a_last_state_in_a_status_the_dashboard_invented_keeps_the_batch_open(conn, client, check):
    """The cheap probe knows the wsctl statuses only; the full check catches any other."""
    b = f.add_batch(conn, client, STEPS[:1], 3)
    ids = state_ids(conn, b)
    conn.execute("UPDATE workflow_states SET status = 'ON_HOLD' WHERE id = %s", (ids[0],))
    assert complete(conn, ids[1:]) == 2
    assert batch_status(conn, b) == "PENDING"
    assert complete(conn, ids[:1]) == 1  # ON_HOLD is neither COMPLETED nor CANCELLED
    assert batch_status(conn, b) == "COMPLETED"


def test_an_item_that_completed_an_earlier_step_only_keeps_the_batch_open(conn, client, check):
    """An item whose next step was never enqueued (it existed, or got CANCELLED) is not done."""
    b = f.add_batch(conn, client, STEPS, 2)
    first = state_ids(conn, b, STEPS[0])
    item = conn.execute("SELECT item_id FROM workflow_states WHERE id = %s", (first[0],)).fetchone()
    conn.execute(  # its last step exists already, CANCELLED: completing step 1 enqueues nothing
        "INSERT INTO workflow_states (item_id, batch_id, step_name, status)"
        " VALUES (%s, %s, %s, 'CANCELLED')",
        (item[0], b, STEPS[1]),
    )
    assert complete(conn, first) == 2
    assert complete(conn, state_ids(conn, b, STEPS[1], "PENDING")) == 1
    assert batch_status(conn, b) == "PENDING"


def test_cancelled_and_completed_batches_are_left_alone(conn, client, check):
    cancelled = f.add_batch(conn, client, STEPS[:1], 1)
    conn.execute("UPDATE batches SET status = 'CANCELLED' WHERE id = %s", (cancelled,))
    assert complete(conn, state_ids(conn, cancelled)) == 1
    assert batch_status(conn, cancelled) == "CANCELLED"


def test_items_of_other_batches_do_not_count(conn, client, check):
    """Batches of the same size: another batch's completed items never complete this one."""
    a = f.add_batch(conn, client, STEPS[:1], 2)
    b = f.add_batch(conn, client, STEPS[:1], 2)
    assert complete(conn, state_ids(conn, a)[:1] + state_ids(conn, b)) == 3
    assert (batch_status(conn, a), batch_status(conn, b)) == ("PENDING", "COMPLETED")


# --- the plan --------------------------------------------------------------------------------


def check_plans(conn, ids) -> list[dict]:
    """auto_explain's JSON plans of the completion check (UPDATE batches) of one call."""
    notices: list[str] = []
    handler = lambda d: notices.append(d.message_primary)  # noqa: E731
    conn.add_notice_handler(handler)
    try:
        with conn.transaction():
            conn.execute("LOAD 'auto_explain'")
            for k, v in (
                ("log_min_duration", "0"),
                ("log_analyze", "on"),
                ("log_nested_statements", "on"),
                ("log_format", "json"),
                ("log_level", "notice"),
            ):
                conn.execute(f"SET LOCAL auto_explain.{k} = {v}")
            complete(conn, ids)
    finally:
        conn.remove_notice_handler(handler)
    plans = []
    for n in notices:
        text = n[n.index("{") :]
        doc = json.loads(text)
        if doc["Query Text"].lstrip().startswith("UPDATE public.batches b"):
            plans.append(doc["Plan"])
    return plans


def nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def item_rows_read(plan: dict) -> int:
    """Rows the plan's scans of batch_items produced or filtered away, over all loops."""
    return sum(
        (n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)) * n.get("Actual Loops", 1)
        for n in nodes(plan)
        if n.get("Relation Name") == "batch_items"
    )


def test_the_check_joins_nothing_and_reads_only_the_finishing_batchs_items(conn, client):
    history = f.add_batch(conn, client, STEPS[:1], 20_000)
    complete(conn, state_ids(conn, history))  # finished history in the table
    b = f.add_batch(conn, client, STEPS[:1], 100)
    conn.execute("VACUUM ANALYZE batch_items")
    conn.execute("VACUUM ANALYZE workflow_states")
    plans = check_plans(conn, state_ids(conn, b))
    assert batch_status(conn, b) == "COMPLETED" and len(plans) == 1
    kinds = {n["Node Type"] for n in nodes(plans[0])}
    assert not any("Join" in k or k == "Nested Loop" for k in kinds), kinds
    assert item_rows_read(plans[0]) == 100, json.dumps(plans[0], indent=1)


def test_a_fresh_table_over_stale_statistics_checks_in_linear_time(conn, client):
    """Statistics taken while the tables were empty, then 20,000 items completed in
    chunks as the dispatcher does: the OFFSET 0 rewrite took 25 s here; without a join the
    check cannot loop over the items per item."""
    conn.execute("ANALYZE batch_items")
    conn.execute("ANALYZE workflow_states")
    b = f.add_batch(conn, client, STEPS[:1], 20_000)
    ids = state_ids(conn, b)
    started = time.perf_counter()
    for i in range(0, len(ids) - 2500, 2500):
        complete(conn, ids[i : i + 2500])
    plans = check_plans(conn, ids[-2500:])  # the call that finds the batch done
    took = time.perf_counter() - started
    assert batch_status(conn, b) == "COMPLETED" and len(plans) == 1
    kinds = {n["Node Type"] for n in nodes(plans[0])}
    assert not any("Join" in k or k == "Nested Loop" for k in kinds), kinds
    assert item_rows_read(plans[0]) <= 20_000 + 1, json.dumps(plans[0], indent=1)
    assert took < 20, took  # seconds, on a loaded 2-core machine; 25 s was the misplan


def test_migration_0023_adopts_a_database_with_batches_half_done(fresh_db):
    """Migrated up to 0022, a batch half done; 0023 applied, the rest completes it."""
    from wsctl import db, settings

    url, _ = fresh_db
    every = migrations.load_migrations()
    assert any(m.filename == NEW for m in every)
    before = [m for m in every if m.version < 23]
    with db.connect(url, settings.Settings(database_url=url, url_source="test")) as c:
        migrations.migrate(c, migrations=before)
        client = f.add_client(c)
        b = f.add_batch(c, client, STEPS[:1], 4)
        ids = state_ids(c, b)
        assert complete(c, ids[:2]) == 2
        result = migrations.migrate(c)
        assert [m["version"] for m in result.applied] == [
            m.version for m in every if m.version >= 23
        ]
        assert batch_status(c, b) == "PENDING"
        assert complete(c, ids[2:]) == 2
        assert batch_status(c, b) == "COMPLETED"
