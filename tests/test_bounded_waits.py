"""Every wait bounded (issue 11 item 6): a held lock makes a command fail fast, never hang.

Another session holds ACCESS EXCLUSIVE on one table at a time (the six pipeline
tables, then wsctl.schema_migrations) while every one-shot command of
``wsctl --help`` that touches the database runs, with sub-second timeouts set
in wsctl.toml. Each command that needs the locked table exits 1 within its
timeouts plus 2 s, with one line on stderr naming the lock, and writes nothing;
``doctor`` reports the affected checks as FAIL and runs the rest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import FIXTURES, table_snapshot
from tests.support import factories as f
from tests.support.commands import wsctl_argv

LOCK_TIMEOUT_S = 0.3
STATEMENT_TIMEOUT_S = 0.8
BOUND_S = LOCK_TIMEOUT_S + STATEMENT_TIMEOUT_S + 2.0

PIPELINE = [
    "clients",
    "enrichment_registry",
    "client_workflow_configs",
    "batches",
    "batch_items",
    "workflow_states",
]
STEP = "normalize_all_core_values"


def _seed(conn: psycopg.Connection) -> dict[str, str]:
    f.register_seed(conn)
    client = f.add_client(conn, "acme")
    f.add_config(conn, client, STEP, "apollo_scrape", {"k": 1})
    batch = f.add_batch(conn, client, [STEP], 3)
    f.add_batch(conn, client, [STEP], 2, workstream=None)  # a legacy batch for the backfill
    item = conn.execute("SELECT id FROM batch_items WHERE batch_id = %s LIMIT 1", (batch,))
    return {"batch": str(batch), "item": str(item.fetchone()[0])}


def _commands(ids: dict[str, str], files: Path) -> dict[str, list[str]]:
    """Every one-shot command of `wsctl --help` that touches the database."""
    app = str(FIXTURES / "local_app.py")
    step = ["--step", STEP, "--workstream", "apollo_scrape"]
    return {
        "migrate": ["migrate"],
        "migrate --status": ["migrate", "--status"],
        "migrate --dry-run": ["migrate", "--dry-run"],
        "dispatch --once": ["dispatch", "--once", "--backend", "local", "--app", app],
        "dispatch --dry-run": ["dispatch", "--dry-run", "--backend", "local", "--app", app],
        "retry": ["retry", "--batch", ids["batch"]],
        "client add": ["client", "add", "newco"],
        "client list": ["client", "list"],
        "registry add": [
            "registry",
            "add",
            "--step",
            "new_step",
            "--workstream",
            "apollo_scrape",
            "--type",
            "sync",
            "--sender",
            "start_new_step",
        ],
        "registry list": ["registry", "list"],
        "registry remove": [
            "registry",
            "remove",
            "--step",
            "enrich_company_via_waterfall_in_clay",
            "--workstream",
            "linkedin_scrape",
        ],
        "registry import": ["registry", "import", str(files / "registry.toml")],
        "config set": ["config", "set", "--client", "acme", *step, "--set", "k=2"],
        "config list": ["config", "list"],
        "config unset": ["config", "unset", "--client", "acme", *step],
        "config show": ["config", "show", "--client", "acme", *step],
        "batch create": [
            "batch",
            "create",
            "--client",
            "acme",
            "--workstream",
            "apollo_scrape",
            "--blueprint",
            STEP,
            "--items",
            str(files / "items.csv"),
        ],
        "batch status": ["batch", "status", ids["batch"]],
        "batch list": ["batch", "list"],
        "batch cancel": ["batch", "cancel", ids["batch"]],
        "backfill": ["backfill", "workstream-slug", "--default", "apollo_scrape"],
        "backfill --dry-run": ["backfill", "workstream-slug", "--dry-run"],
        "item show": ["item", "show", ids["item"]],
    }


# The commands that need each table (and therefore fail while it is locked). Every
# command reads wsctl.schema_migrations first: the schema check.
NEEDS = {
    "clients": {
        "client add",
        "client list",
        "config set",
        "config list",
        "config unset",
        "config show",
        "batch create",
        "batch status",
        "batch list",
        "batch cancel",
        "item show",
    },
    "enrichment_registry": {
        "dispatch --once",
        "dispatch --dry-run",
        "registry add",
        "registry list",
        "registry remove",
        "registry import",
        "config set",
        "batch create",
        "backfill",
        "backfill --dry-run",
        "item show",
    },
    "client_workflow_configs": {
        "client list",
        "config set",
        "config list",
        "config unset",
        "config show",
        "batch create",
        "backfill",
        "backfill --dry-run",
        "item show",
    },
    "batches": {
        "dispatch --once",
        "dispatch --dry-run",
        "retry",
        "client list",
        "registry remove",
        "batch create",
        "batch status",
        "batch list",
        "batch cancel",
        "backfill",
        "backfill --dry-run",
        "item show",
    },
    "batch_items": {
        "batch create",
        "batch status",
        "item show",
    },
    "workflow_states": {
        "dispatch --once",
        "dispatch --dry-run",
        "retry",
        "registry remove",
        "batch create",
        "batch status",
        "batch cancel",
        "item show",
    },
}


@pytest.fixture
def locked_world(db_url, tmp_path, monkeypatch):
    """A seeded database, the files the commands read, and sub-second timeouts."""
    with psycopg.connect(db_url, autocommit=True) as c:
        ids = _seed(c)
    files = tmp_path / "files"
    files.mkdir()
    (files / "items.csv").write_text("company_name,company_domain\nAcme,acme.com\n")
    (files / "registry.toml").write_text(
        '[[registry]]\nstep = "other_step"\nworkstream = "apollo_scrape"\n'
        'type = "sync"\nsender = "start_other_step"\n'
    )
    (tmp_path / "wsctl.toml").write_text(
        "[database]\n"
        f'lock_timeout = "{int(LOCK_TIMEOUT_S * 1000)}ms"\n'
        f'statement_timeout = "{int(STATEMENT_TIMEOUT_S * 1000)}ms"\n'
    )
    monkeypatch.setenv("WSCTL_TEST_CALLS", str(tmp_path / "calls.jsonl"))
    return ids, files


def _lock(holder: psycopg.Connection, schema: str, table: str) -> None:
    holder.execute(
        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(schema, table))
    )


def _history(holder: psycopg.Connection) -> list[tuple]:
    return holder.execute("SELECT * FROM wsctl.schema_migrations ORDER BY version").fetchall()


@pytest.mark.parametrize("table", [*PIPELINE, "schema_migrations"])
def test_every_command_fails_fast_on_a_locked_table_and_writes_nothing(
    table, locked_world, db_url, cli, tmp_path
):
    ids, files = locked_world
    commands = _commands(ids, files)
    schema = "wsctl" if table == "schema_migrations" else "public"
    needing = set(commands) if table == "schema_migrations" else NEEDS[table]
    with psycopg.connect(db_url) as holder:
        _lock(holder, schema, table)
        for name in sorted(needing):
            before = (table_snapshot(holder), _history(holder))
            started = time.monotonic()
            r = cli(*commands[name])
            elapsed = time.monotonic() - started
            lines = r.err.strip().splitlines()
            assert r.code == 1, (name, r.code, r.err)
            assert elapsed < BOUND_S, (name, elapsed)
            assert len(lines) == 1 and lines[0].startswith("wsctl: error: "), (name, r.err)
            assert "timeout" in lines[0], (name, lines[0])
            assert (table_snapshot(holder), _history(holder)) == before, name
        holder.rollback()
    assert not (tmp_path / "calls.jsonl").exists()  # no function ran for a locked dispatch


def test_the_lock_message_names_the_locked_table(locked_world, db_url, cli):
    ids, _ = locked_world
    with psycopg.connect(db_url) as holder:
        _lock(holder, "public", "batches")
        r = cli("batch", "cancel", ids["batch"])
        assert r.code == 1
        assert r.err.strip() == (
            "wsctl: error: lock timeout: waited 300ms for a lock on public.batches held by "
            "another session (hint: try again when the other transaction ends, or raise "
            "[database] lock_timeout)"
        )
        _lock(holder, "wsctl", "schema_migrations")
        r = cli("client", "list")
        assert r.code == 1 and "wsctl.schema_migrations" in r.err, r.err
        holder.rollback()


def test_commands_not_needing_the_locked_table_still_work(locked_world, db_url, cli):
    """The NEEDS table is not a blanket: what does not need the table is not blocked by it."""
    ids, files = locked_world
    commands = _commands(ids, files)
    with psycopg.connect(db_url) as holder:
        _lock(holder, "public", "batch_items")
        for name in ("client list", "registry list", "config list", "batch list", "migrate"):
            r = cli(*commands[name])
            assert r.code == 0, (name, r.err)
        holder.rollback()


@pytest.mark.parametrize("table", ["workflow_states", "schema_migrations"])
def test_doctor_fails_the_affected_checks_and_runs_the_rest(table, locked_world, db_url, cli):
    schema = "wsctl" if table == "schema_migrations" else "public"
    with psycopg.connect(db_url) as holder:
        _lock(holder, schema, table)
        started = time.monotonic()
        r = cli("doctor", "--backend", "local", "--json")
        elapsed = time.monotonic() - started
        holder.rollback()
    assert r.code == 1, r.err
    checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
    assert elapsed < len(checks) * LOCK_TIMEOUT_S + BOUND_S
    locked = {n for n, c in checks.items() if c["status"] == "FAIL" and "lock" in c["detail"]}
    if table == "schema_migrations":
        assert locked == {"schema"}
    else:  # the data checks that read workflow_states (missing_configs reads the batches)
        assert locked == {
            "unregistered_states",
            "expired_leases",
            "stale_dispatched",
            "states_bloat",
            "prune_candidates",
        }
    for name in locked:
        assert f"for a lock on {schema}.{table}" in checks[name]["detail"], checks[name]
    # The rest ran: the legacy batch's states are reported as unregistered whatever is locked.
    if table == "schema_migrations":
        assert checks["unregistered_states"]["status"] == "FAIL"
        assert "lock" not in checks["unregistered_states"]["detail"]
    assert checks["database"]["status"] == "OK"
    # (modal_credentials is SKIP for the local backend: it needs no token)
    skipped = [n for n, c in checks.items() if c["status"] == "SKIP"]
    assert skipped in ([], ["modal_credentials"]), checks


def test_dispatch_loop_logs_a_lock_timeout_and_goes_on(locked_world, db_url, tmp_path):
    """--loop survives a lock timeout: it says so on stderr and passes again once it is free."""
    import os
    import subprocess

    env = {**os.environ, "WSCTL_TEST_CALLS": str(tmp_path / "calls.jsonl")}
    app = str(FIXTURES / "local_app.py")
    with psycopg.connect(db_url) as holder:
        _lock(holder, "public", "workflow_states")
        proc = subprocess.Popen(
            wsctl_argv(db_url, "dispatch", "--loop")
            + ["--interval", "0.2", "--backend", "local", "--app", app],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.5)
        assert proc.poll() is None, proc.communicate()
        holder.rollback()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with psycopg.connect(db_url) as c:
            left = c.execute(
                "SELECT count(*) FROM workflow_states WHERE status = 'PENDING'"
                " AND batch_id IN (SELECT id FROM batches WHERE workstream_slug IS NOT NULL)"
            ).fetchone()[0]
        if left == 0:
            break
        time.sleep(0.2)
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert left == 0, err
    assert "lock timeout" in err or "lock_timeout" in err, err
    # said as what it is, not as a lost connection
    assert "a lock wait timed out" in err and "connection lost" not in err, err
