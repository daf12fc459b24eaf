"""The one place that opens database connections.

Connections are safe behind a transaction-mode pooler (Supabase on port 6543,
PgBouncer): no server-side prepared statements there, and no session state.
Timeouts are set per transaction with ``set_config(..., true)`` (SET LOCAL),
never as startup ``options``, which PgBouncer rejects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from wsctl.errors import DatabaseUnavailable, EnvError
from wsctl.redact import first_line, mask_url

if TYPE_CHECKING:
    import psycopg

    from wsctl.settings import Settings


def connect(
    url: str,
    settings: Settings,
    *,
    autocommit: bool = True,
    application_name: str = "wsctl",
) -> psycopg.Connection:
    """Open a connection; failures become ``EnvError`` (exit 3) with the password masked."""
    import psycopg

    kwargs: dict = {
        "autocommit": autocommit,
        "application_name": application_name,
        "connect_timeout": settings.connect_timeout,
    }
    if settings.transaction_pooler:
        kwargs["prepare_threshold"] = None
    try:
        conn = psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        msg = first_line(exc).replace(url, mask_url(url))
        raise DatabaseUnavailable(f"cannot connect to {mask_url(url)}: {msg}") from None
    except psycopg.ProgrammingError as exc:  # malformed conninfo
        raise EnvError(f"invalid database URL {mask_url(url)}: {first_line(exc)}") from None
    if settings.transaction_pooler:
        conn.prepare_threshold = None
    conn.info_statement_timeout = settings.statement_timeout  # type: ignore[attr-defined]
    return conn


@contextmanager
def tx(
    conn: psycopg.Connection,
    *,
    statement_timeout: str | None = None,
    lock_timeout: str = "0",
) -> Iterator[psycopg.Connection]:
    """A transaction with its timeouts set by SET LOCAL (nothing leaks to the session)."""
    from wsctl.queries import q

    timeout = statement_timeout or getattr(conn, "info_statement_timeout", "5min")
    with conn.transaction():
        conn.execute(q("set_local_timeouts"), (timeout, lock_timeout))
        yield conn
