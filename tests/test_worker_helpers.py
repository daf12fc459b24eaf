"""Worker-side helpers as Modal functions call them: connection from WSCTL_DATABASE_URL."""

from __future__ import annotations

import logging
import uuid

import pytest

from tests.conftest import table_snapshot, url_for
from tests.test_resolve import (
    APOLLO,
    APOLLO_CFG,
    ENRICH,
    LINKEDIN,
    LINKEDIN_CFG,
    NORMALIZE,
    add_item,
    add_state,
    seed_world,
)
from wsctl import worker
from wsctl.errors import EnvError, OperationalError
from wsctl.worker import ConfigResolutionError


@pytest.fixture
def world(conn, db_url, monkeypatch):
    """The seeded catalog, with the helpers pointed at the test database as a Modal secret would."""
    monkeypatch.setenv("WSCTL_DATABASE_URL", db_url)
    return seed_world(conn)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="wsctl.worker")
    return caplog


def config_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wsctl.worker"]


def test_get_workstream_slug(conn, world, logs):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    _, legacy = add_item(conn, world["acme"], [NORMALIZE, ENRICH], None)
    assert worker.get_workstream_slug(str(item)) == APOLLO
    assert worker.get_workstream_slug(str(legacy)) is None
    assert config_lines(logs) == [
        f"[CONFIG] item={legacy} workstream=None (the batch has no workstream_slug)"
    ]
    with pytest.raises(OperationalError, match="no batch item") as info:
        worker.get_workstream_slug(str(uuid.uuid4()))
    assert not isinstance(info.value, ConfigResolutionError)  # bad input, not a refusal


def test_config_found_by_the_batch_workstream_and_by_the_passed_one(conn, world, logs):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], LINKEDIN)
    # the seed's sender: look the workstream up, then the config by composite key
    ws = worker.get_workstream_slug(str(item))
    assert worker.get_client_config(str(item), ENRICH, ws) == LINKEDIN_CFG
    assert worker.get_client_config(str(item), ENRICH) == LINKEDIN_CFG
    line = f"[CONFIG] item={item} workflow={ENRICH} workstream={LINKEDIN} -> config found"
    assert config_lines(logs) == [line, line]
    assert all(r.levelno == logging.INFO for r in logs.records)


def test_no_config_returns_none(conn, world, logs):
    _, item = add_item(conn, world["beta"], [NORMALIZE, ENRICH], APOLLO)
    assert worker.get_client_config(str(item), ENRICH, APOLLO) is None
    assert config_lines(logs) == [
        f"[CONFIG] item={item} workflow={ENRICH} workstream={APOLLO} -> no config"
    ]


def test_mismatch_is_refused(conn, world, logs):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    with pytest.raises(ConfigResolutionError) as info:
        worker.get_client_config(str(item), ENRICH, LINKEDIN)
    assert (
        "workstream linkedin_scrape was passed but the item's batch carries apollo_scrape"
        in str(info.value)
    )
    assert info.value.resolution.status == "mismatch"
    assert isinstance(info.value, OperationalError)
    assert config_lines(logs) == [
        f"[CONFIG] item={item} workflow={ENRICH} workstream=None "
        "-> mismatch: batch=apollo_scrape explicit=linkedin_scrape"
    ]


def test_ambiguous_legacy_item_is_refused(conn, world, logs):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], None)
    with pytest.raises(ConfigResolutionError) as info:
        worker.get_client_config(str(item), ENRICH)
    assert "several workstreams fit (apollo_scrape, linkedin_scrape)" in str(info.value)
    assert "cannot infer one" in str(info.value)
    assert config_lines(logs) == [
        f"[CONFIG] item={item} workflow={ENRICH} workstream=None "
        "-> ambiguous: apollo_scrape, linkedin_scrape"
    ]


def test_inferred_workstream_is_refused_and_names_the_backfill(conn, world, logs):
    # beta only has configs in linkedin_scrape: the inference picks it, the helper refuses it
    _, item = add_item(conn, world["beta"], [NORMALIZE, ENRICH], None)
    with pytest.raises(ConfigResolutionError) as info:
        worker.get_client_config(str(item), ENRICH)
    msg = str(info.value)
    assert "`wsctl backfill workstream-slug` would set linkedin_scrape" in msg
    assert info.value.resolution.inferred and info.value.resolution.config == LINKEDIN_CFG
    assert config_lines(logs)[-1] == (
        f"[CONFIG] item={item} workflow={ENRICH} workstream={LINKEDIN} -> inferred, refused"
    )


def test_legacy_item_with_an_explicit_workstream_is_served_with_a_warning(conn, world, logs):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], None)
    assert worker.get_client_config(str(item), ENRICH, APOLLO) == APOLLO_CFG
    lines = config_lines(logs)
    assert "no workstream_slug" in lines[0] and lines[-1].endswith("-> config found")


def test_bad_arguments(conn, world):
    before = table_snapshot(conn)
    with pytest.raises(OperationalError, match="invalid item id"):
        worker.get_client_config("acme'; DROP TABLE batches; --", ENRICH)
    with pytest.raises(OperationalError, match="invalid step slug"):
        worker.get_client_config(str(uuid.uuid4()), "Bad Slug")
    with pytest.raises(OperationalError, match="no batch item"):
        worker.get_client_config(str(uuid.uuid4()), ENRICH)
    with pytest.raises(OperationalError, match="invalid state id"):
        worker.complete_step("nope")
    assert table_snapshot(conn) == before


def test_no_url_is_an_env_error_and_starts_no_embedded_server(conn, tmp_path, monkeypatch):
    from wsctl import embedded

    def tripwire(*a, **k):
        raise AssertionError("the worker helpers must never start the embedded database")

    monkeypatch.setattr(embedded, "ensure", tripwire)
    monkeypatch.setattr(embedded, "_start", tripwire)
    item = str(uuid.uuid4())
    for call in (
        lambda: worker.get_workstream_slug(item),
        lambda: worker.get_client_config(item, ENRICH, APOLLO),
        lambda: worker.complete_step(item),
        lambda: worker.fail_step(item, "boom"),
    ):
        with pytest.raises(EnvError, match="WSCTL_DATABASE_URL"):
            call()
    assert not (tmp_path / "xdg-data").exists()


def test_unreachable_database_is_an_env_error(db_url, monkeypatch):
    monkeypatch.setenv("WSCTL_DATABASE_URL", url_for(db_url, "no_such_database_here"))
    with pytest.raises(EnvError, match="cannot connect"):
        worker.get_workstream_slug(str(uuid.uuid4()))


def test_explicit_connection_needs_no_environment(conn):
    seed_world(conn)
    acme = conn.execute("SELECT id FROM clients WHERE name = 'acme'").fetchone()[0]
    _, item = add_item(conn, acme, [NORMALIZE, ENRICH], APOLLO)
    assert worker.get_workstream_slug(item, conn=conn) == APOLLO
    assert worker.get_client_config(item, ENRICH, conn=conn) == APOLLO_CFG
    assert not conn.closed  # a passed connection is left open for its owner


def test_complete_and_fail_step(conn, world):
    batch, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    first = add_state(conn, item, batch, NORMALIZE, "DISPATCHED")
    assert worker.complete_step(str(first)) is True
    assert worker.complete_step(str(first)) is False  # idempotent
    rows = dict(
        conn.execute(
            "SELECT step_name, status FROM workflow_states WHERE item_id = %s", (item,)
        ).fetchall()
    )
    assert rows == {NORMALIZE: "COMPLETED", ENRICH: "PENDING"}
    second = conn.execute(
        "SELECT id FROM workflow_states WHERE item_id = %s AND step_name = %s", (item, ENRICH)
    ).fetchone()[0]
    assert worker.fail_step(str(second), "clay said 500") is True
    assert conn.execute(
        "SELECT status, last_error FROM workflow_states WHERE id = %s", (second,)
    ).fetchone() == ("FAILED", "clay said 500")
    assert worker.fail_step(str(first), "late failure") is False  # COMPLETED stays COMPLETED
    assert worker.fail_step(str(uuid.uuid4()), "unknown") is False
