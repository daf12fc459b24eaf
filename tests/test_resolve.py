"""Config and registry resolution by (workflow slug, workstream slug), every rule, on real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from psycopg.types.json import Jsonb

from tests.conftest import table_snapshot
from wsctl import catalog
from wsctl.errors import OperationalError, UsageError
from wsctl.queries import example_path
from wsctl.resolve import resolve_config, resolve_registry

ENRICH = "enrich_company_via_waterfall_in_clay"
NORMALIZE = "normalize_company_name"
APOLLO, LINKEDIN = "apollo_scrape", "linkedin_scrape"
APOLLO_CFG = {"clay_table": "apollo-companies", "webhook_url": "https://api.clay.com/hook/AAA"}
LINKEDIN_CFG = {"clay_table": "linkedin-companies", "webhook_url": "https://api.clay.com/hook/BBB"}


# --- helpers shared by this area's tests ------------------------------------


def add_client(conn, name: str) -> uuid.UUID:
    return conn.execute("INSERT INTO clients (name) VALUES (%s) RETURNING id", (name,)).fetchone()[
        0
    ]


def add_config(conn, client_id, workflow: str, workstream: str, config: dict) -> None:
    conn.execute(
        "INSERT INTO client_workflow_configs (client_id, workflow_slug, workstream_slug, config) "
        "VALUES (%s, %s, %s, %s)",
        (client_id, workflow, workstream, Jsonb(config)),
    )


def add_item(conn, client_id, blueprint: list[str], workstream: str | None) -> tuple:
    """A batch (workstream or legacy NULL) with one item; returns (batch_id, item_id)."""
    batch_id = conn.execute(
        "INSERT INTO batches (client_id, blueprint, workstream_slug) VALUES (%s, %s, %s) RETURNING id",
        (client_id, blueprint, workstream),
    ).fetchone()[0]
    item_id = conn.execute(
        "INSERT INTO batch_items (batch_id) VALUES (%s) RETURNING id", (batch_id,)
    ).fetchone()[0]
    return batch_id, item_id


def add_state(conn, item_id, batch_id, step: str, status: str = "PENDING") -> uuid.UUID:
    return conn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name, status) VALUES (%s, %s, %s, %s) "
        "RETURNING id",
        (item_id, batch_id, step, status),
    ).fetchone()[0]


def seed_world(conn) -> dict:
    """The seed's six steps in two workstreams; acme has configs for ENRICH in both.

    ``score_lead`` is registered in apollo_scrape only, so a legacy batch whose
    blueprint has it infers apollo_scrape alone.
    """
    catalog.import_registry(conn, example_path("registry.toml"))
    catalog.add_registry(
        conn, step="score_lead", workstream=APOLLO, type="sync", sender="run_score_lead"
    )
    acme = add_client(conn, "acme")
    beta = add_client(conn, "beta")
    add_config(conn, acme, ENRICH, APOLLO, APOLLO_CFG)
    add_config(conn, acme, ENRICH, LINKEDIN, LINKEDIN_CFG)
    add_config(conn, beta, ENRICH, LINKEDIN, LINKEDIN_CFG)
    return {"acme": acme, "beta": beta}


@pytest.fixture
def world(conn):
    return seed_world(conn)


def rules(res) -> list[str]:
    return [t.rule for t in res.trace]


# --- rule a: explicit workstream --------------------------------------------


def test_same_workflow_in_two_workstreams_gives_each_its_own_config(conn, world):
    a = resolve_config(conn, step=ENRICH, client="acme", workstream=APOLLO)
    li = resolve_config(conn, step=ENRICH, client="acme", workstream=LINKEDIN)
    assert (a.status, a.source, a.workstream, a.config) == (
        "found",
        "explicit",
        APOLLO,
        APOLLO_CFG,
    )
    assert (li.status, li.source, li.workstream, li.config) == (
        "found",
        "explicit",
        LINKEDIN,
        LINKEDIN_CFG,
    )
    assert a.trusted and li.trusted and a.config_id != li.config_id
    assert rules(a) == ["client", "a:explicit"]


def test_explicit_workstream_by_client_id(conn, world):
    res = resolve_config(conn, step=ENRICH, client=str(world["acme"]), workstream=LINKEDIN)
    assert res.found and res.config == LINKEDIN_CFG and res.client.name == "acme"


def test_explicit_workstream_that_agrees_with_the_batch(conn, world):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    res = resolve_config(conn, step=ENRICH, item_id=item, workstream=APOLLO)
    assert (res.status, res.source, res.config) == ("found", "explicit", APOLLO_CFG)
    assert rules(res) == ["item", "a:explicit"]


def test_explicit_workstream_that_disagrees_with_the_batch_is_a_mismatch(conn, world):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    res = resolve_config(conn, step=ENRICH, item_id=str(item), workstream=LINKEDIN)
    assert res.status == "mismatch"
    assert res.config is None and res.workstream is None and not res.trusted
    assert res.candidates == [APOLLO, LINKEDIN]
    assert res.batch_workstream == APOLLO and res.explicit_workstream == LINKEDIN
    assert "disagrees" in res.trace[-1].why


def test_explicit_workstream_on_a_legacy_batch_is_used_with_a_warning(conn, world):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], None)
    res = resolve_config(conn, step=ENRICH, item_id=item, workstream=LINKEDIN)
    assert (res.status, res.source, res.config) == ("found", "explicit", LINKEDIN_CFG)
    assert res.warnings and "no workstream_slug" in res.warnings[0]


# --- rule b: the batch's workstream -----------------------------------------


def test_item_whose_batch_has_a_workstream(conn, world):
    batch, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], LINKEDIN)
    res = resolve_config(conn, step=ENRICH, item_id=item)
    assert (res.status, res.source, res.workstream) == ("found", "batch", LINKEDIN)
    assert res.config == LINKEDIN_CFG and res.trusted and not res.inferred
    assert res.batch_id == batch and res.client.name == "acme"
    assert rules(res) == ["item", "b:batch"]
    assert res.trace[-1].row["id"] == str(res.config_id)


def test_missing_config_in_the_batch_workstream(conn, world):
    _, item = add_item(conn, world["beta"], [NORMALIZE, ENRICH], APOLLO)
    res = resolve_config(conn, step=ENRICH, item_id=item)
    assert (res.status, res.source, res.workstream, res.config) == (
        "not_found",
        "batch",
        APOLLO,
        None,
    )
    # never falls back to the config of another workstream, but says it exists
    assert "other workstream(s) only: linkedin_scrape" in res.trace[-1].why


def test_missing_config_for_an_unconfigured_workflow(conn, world):
    res = resolve_config(conn, step=NORMALIZE, client="acme", workstream=APOLLO)
    assert res.status == "not_found" and res.config is None and res.source == "explicit"


# --- rule c: inference for legacy batches -----------------------------------


def test_legacy_batch_with_one_candidate_is_inferred_advice(conn, world):
    add_config(conn, world["acme"], "score_lead", APOLLO, {"threshold": 3})
    batch, item = add_item(conn, world["acme"], [NORMALIZE, "score_lead"], None)
    res = resolve_config(conn, step="score_lead", item_id=item)
    assert (res.status, res.source, res.workstream) == ("found", "inferred", APOLLO)
    assert res.config == {"threshold": 3}
    assert res.inferred and not res.trusted
    assert res.candidates == [APOLLO] and res.backfill_workstream == APOLLO
    assert (
        res.warnings
        and "wsctl backfill workstream-slug` would set apollo_scrape" in res.warnings[0]
    )
    assert rules(res) == ["item", "c:infer", "c:infer"]
    # the batch itself is untouched: inference is never acted on
    carried = conn.execute("SELECT workstream_slug FROM batches WHERE id = %s", (batch,)).fetchone()
    assert carried == (None,)


def test_legacy_batch_with_two_candidates_is_ambiguous(conn, world):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], None)
    res = resolve_config(conn, step=ENRICH, item_id=item)
    assert (res.status, res.source, res.workstream, res.config) == (
        "ambiguous",
        None,
        None,
        None,
    )
    assert res.candidates == [APOLLO, LINKEDIN]
    assert res.backfill_workstream is None
    assert "refusing to pick" in res.trace[-1].why


def test_legacy_batch_narrowed_by_the_clients_configs(conn, world):
    # both workstreams register the blueprint; beta has configs in linkedin_scrape only
    _, item = add_item(conn, world["beta"], [NORMALIZE, ENRICH], None)
    res = resolve_config(conn, step=ENRICH, item_id=item)
    assert (res.status, res.source, res.workstream) == ("found", "inferred", LINKEDIN)
    assert res.config == LINKEDIN_CFG and not res.trusted
    assert res.trace[1].row["registered"] == [APOLLO, LINKEDIN]
    assert res.trace[1].row["narrowed"] == [LINKEDIN]


def test_legacy_batch_with_no_candidate(conn, world):
    _, item = add_item(conn, world["acme"], ["never_registered_step"], None)
    res = resolve_config(conn, step=ENRICH, item_id=item)
    assert (res.status, res.source, res.candidates, res.config) == ("not_found", None, [], None)


def test_inferred_workstream_without_config_is_not_found(conn, world):
    _, item = add_item(conn, world["beta"], [NORMALIZE, "score_lead"], None)
    res = resolve_config(conn, step="score_lead", item_id=item)
    assert (res.status, res.source, res.workstream) == ("not_found", "inferred", APOLLO)


# --- rule c: a client alone -------------------------------------------------


@pytest.mark.parametrize(
    "client, step, status, candidates",
    [
        ("acme", NORMALIZE, "not_found", []),
        ("beta", ENRICH, "found", [LINKEDIN]),
        ("acme", ENRICH, "ambiguous", [APOLLO, LINKEDIN]),
    ],
)
def test_client_only_resolution(conn, world, client, step, status, candidates):
    res = resolve_config(conn, step=step, client=client)
    assert res.status == status and res.candidates == candidates
    if status == "found":
        assert res.source == "inferred" and res.config == LINKEDIN_CFG and not res.trusted
        assert "--workstream linkedin_scrape" in res.warnings[0]
    else:
        assert res.source is None and res.config is None and res.workstream is None


# --- registry ---------------------------------------------------------------


def test_registry_resolves_by_composite_key(conn, world):
    a = resolve_registry(conn, ENRICH, APOLLO)
    li = resolve_registry(conn, ENRICH, LINKEDIN)
    assert (a.type, a.sender, a.receiver) == (
        "async",
        "start_enrich_company_via_waterfall_in_clay",
        "receive_enrich_company_via_waterfall_in_clay",
    )
    assert li.sender == "start_linkedin_enrich_company_via_waterfall_in_clay"
    sync = resolve_registry(conn, "split_raw_apollo_scrape_data_into_two_tables", APOLLO)
    assert (sync.type, sync.sender, sync.receiver) == (
        "sync",
        "run_split_raw_apollo_scrape_data",
        None,
    )
    assert resolve_registry(conn, "score_lead", LINKEDIN) is None
    assert resolve_registry(conn, ENRICH, "no_such_workstream") is None


# --- the JSON document ------------------------------------------------------


def test_to_json_shape_and_redaction(conn, world):
    res = resolve_config(conn, step=ENRICH, client="acme", workstream=APOLLO)
    doc = res.to_json()
    assert list(doc)[:6] == ["status", "source", "workstream", "config", "candidates", "trace"]
    assert doc["config"] == {"clay_table": "apollo-companies", "webhook_url": "***"}
    assert res.to_json(reveal=True)["config"] == APOLLO_CFG
    assert all(set(t) == {"rule", "row", "why"} for t in doc["trace"])
    assert res.config["webhook_url"].endswith("AAA")  # the library value itself stays raw


# --- bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"step": "Bad Slug", "client": "acme"}, OperationalError),
        (
            {"step": ENRICH, "client": "acme", "workstream": "x'; --"},
            OperationalError,
        ),
        ({"step": ENRICH, "client": "acme'; DROP TABLE batches; --"}, OperationalError),
        ({"step": ENRICH, "item_id": "not-a-uuid"}, OperationalError),
        ({"step": ENRICH, "item_id": str(uuid.uuid4())}, OperationalError),
        ({"step": ENRICH}, UsageError),
        ({"step": ENRICH, "client": "acme", "item_id": str(uuid.uuid4())}, UsageError),
    ],
)
def test_bad_input_raises_and_changes_nothing(conn, world, kwargs, error):
    before = table_snapshot(conn)
    with pytest.raises(error):
        resolve_config(conn, **kwargs)
    assert table_snapshot(conn) == before


def test_registry_lookup_rejects_bad_slugs(conn, world):
    with pytest.raises(OperationalError, match="invalid workstream slug"):
        resolve_registry(conn, ENRICH, "Apollo Scrape")
