"""Test data built with plain SQL (tests may write rows directly)."""

from __future__ import annotations

import uuid

import psycopg

SEED_STEPS = {
    # step slug: (type, apollo_scrape sender, linkedin_scrape sender)
    "normalize_all_core_values": (
        "sync",
        "start_normalize_all_core_values",
        "li_normalize_all_core_values",
    ),
    "enrich_company_via_waterfall_in_clay": (
        "async",
        "start_enrich_company_via_waterfall_in_clay",
        "li_enrich_company_via_waterfall_in_clay",
    ),
}


def add_client(conn: psycopg.Connection, name: str = "acme") -> uuid.UUID:
    return conn.execute("INSERT INTO clients (name) VALUES (%s) RETURNING id", (name,)).fetchone()[
        0
    ]


def register(
    conn, step: str, workstream: str, type_: str, sender: str, receiver: str | None = None
):
    conn.execute(
        "INSERT INTO enrichment_registry (slug, workstream_slug, type, modal_sender_fn, modal_receiver_fn)"
        " VALUES (%s, %s, %s, %s, %s)",
        (step, workstream, type_, sender, receiver),
    )


def register_seed(conn) -> None:
    """The same steps in two workstreams with different functions (the seed's situation)."""
    for step, (typ, apollo, linkedin) in SEED_STEPS.items():
        register(conn, step, "apollo_scrape", typ, apollo)
        register(conn, step, "linkedin_scrape", typ, linkedin)


def add_config(conn, client_id, workflow: str, workstream: str, config: dict) -> None:
    conn.execute(
        "INSERT INTO client_workflow_configs (client_id, workflow_slug, workstream_slug, config)"
        " VALUES (%s, %s, %s, %s)",
        (client_id, workflow, workstream, psycopg.types.json.Jsonb(config)),
    )


def add_batch(
    conn,
    client_id,
    blueprint: list[str],
    n_items: int,
    workstream: str | None = "apollo_scrape",
    first_status: str = "PENDING",
) -> uuid.UUID:
    """A batch with n items and one state per item for the first step (set-based)."""
    batch_id = conn.execute(
        "INSERT INTO batches (client_id, blueprint, workstream_slug) VALUES (%s, %s, %s) RETURNING id",
        (client_id, blueprint, workstream),
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO batch_items (batch_id, data)"
        " SELECT %s, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
        (batch_id, n_items),
    )
    conn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name, status)"
        " SELECT id, batch_id, %s, %s FROM batch_items WHERE batch_id = %s",
        (blueprint[0], first_status, batch_id),
    )
    return batch_id


def states(conn, batch_id) -> list[tuple]:
    return conn.execute(
        "SELECT step_name, status, count(*) FROM workflow_states WHERE batch_id = %s"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        (batch_id,),
    ).fetchall()
