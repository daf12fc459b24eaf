"""The one place that opens database connections.

Connections are safe behind a transaction-mode pooler on any port (Supabase's
Supavisor, PgBouncer), declared or not: no server-side prepared statements by
default, and no session state. Every statement runs inside ``tx()``, whose
statement and lock timeouts are set per transaction with ``set_config(...,
true)`` (SET LOCAL), never as startup ``options``, which PgBouncer rejects: no
statement waits without bound on a lock.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from wsctl.errors import DatabaseUnavailable, EnvError
from wsctl.redact import first_line, mask_url
from wsctl.settings import DATABASE_DEFAULTS

if TYPE_CHECKING:
    import psycopg

    from wsctl.settings import Settings


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything wsctl sets on a connection, in one small object.

    ``statement_timeout`` and ``lock_timeout`` are PostgreSQL durations set by
    ``tx()`` with SET LOCAL in each transaction; ``prepared_statements`` is off
    by default, so a transaction-mode pooler on any port (PgBouncer, Supavisor)
    works without a ``pooler`` setting.
    """

    statement_timeout: str = DATABASE_DEFAULTS["statement_timeout"]
    lock_timeout: str = DATABASE_DEFAULTS["lock_timeout"]
    connect_timeout: int = DATABASE_DEFAULTS["connect_timeout"]
    prepared_statements: bool = DATABASE_DEFAULTS["prepared_statements"]
    application_name: str = "wsctl"

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionSettings:
        return cls(
            statement_timeout=settings.statement_timeout,
            lock_timeout=settings.lock_timeout,
            connect_timeout=settings.connect_timeout,
            # Behind a declared transaction pooler never, whatever the setting says.
            prepared_statements=settings.prepared_statements and not settings.transaction_pooler,
        )


DEFAULT_CONNECTION_SETTINGS = ConnectionSettings()
# The settings each open connection was made with (connections opened elsewhere,
# by tests or by hand, get the defaults). Kept beside the connection, not on it.
_OPENED: weakref.WeakKeyDictionary[psycopg.Connection, ConnectionSettings] = (
    weakref.WeakKeyDictionary()
)


def settings_of(conn: psycopg.Connection) -> ConnectionSettings:
    """The ``ConnectionSettings`` ``conn`` was opened with (the defaults if not by ``connect``)."""
    return _OPENED.get(conn, DEFAULT_CONNECTION_SETTINGS)


def connect(
    url: str,
    settings: Settings | ConnectionSettings,
    *,
    autocommit: bool = True,
    application_name: str | None = None,
) -> psycopg.Connection:
    """Open a connection; failures become ``EnvError`` (exit 3) with the password masked."""
    import psycopg

    cs = (
        settings
        if isinstance(settings, ConnectionSettings)
        else ConnectionSettings.from_settings(settings)
    )
    if application_name is not None:
        cs = replace(cs, application_name=application_name)
    kwargs: dict = {
        "autocommit": autocommit,
        "application_name": cs.application_name,
        "connect_timeout": cs.connect_timeout,
    }
    if not cs.prepared_statements:
        kwargs["prepare_threshold"] = None
    try:
        conn = psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        msg = first_line(exc).replace(url, mask_url(url))
        # which setting gave the URL: a DATABASE_URL set for another application, say
        source = getattr(settings, "url_source", None)
        where = f" (from {source})" if source and url == settings.database_url else ""  # type: ignore[union-attr]
        raise DatabaseUnavailable(f"cannot connect to {mask_url(url)}{where}: {msg}") from None
    except psycopg.ProgrammingError as exc:  # malformed conninfo
        raise EnvError(f"invalid database URL {mask_url(url)}: {first_line(exc)}") from None
    if not cs.prepared_statements:
        conn.prepare_threshold = None
    _OPENED[conn] = cs
    return conn


_RELATION_IN_CONTEXT = re.compile(r'relation "([^"]+)"')


def locked_relation(conn: psycopg.Connection, exc: BaseException) -> str | None:
    """What a lock timeout waited for, if it can be told: the relation PostgreSQL names
    in the error's context (row locks), else the tables another session holds in a
    mode that blocks reads or writes (table locks). None when unknown."""
    diag = getattr(exc, "diag", None)
    found = _RELATION_IN_CONTEXT.search(getattr(diag, "context", None) or "")
    if found:
        return found.group(1)
    from wsctl.queries import named, q

    try:
        with conn.transaction():
            conn.execute(q("set_local_timeouts"), ("2s", "1s"))
            rows = named(conn).execute(q("waits_strong_locks_held")).fetchall()
    except Exception:  # the lookup is a courtesy: never hide the original error
        return None
    names = sorted({r["relation"] for r in rows})
    return ", ".join(names) if names else None


@contextmanager
def tx(
    conn: psycopg.Connection,
    *,
    statement_timeout: str | None = None,
    lock_timeout: str | None = None,
) -> Iterator[psycopg.Connection]:
    """A transaction with its timeouts set by SET LOCAL (nothing leaks to the session).

    The timeouts default to the connection's ``ConnectionSettings``. Nested in a
    transaction already open, it is a savepoint (its SET LOCAL lasts to the end
    of the outer transaction). A lock timeout is re-raised, by the outermost
    ``tx()``, as the same psycopg error with a message naming what was locked
    when that can be told.
    """
    import psycopg

    from wsctl.queries import q

    nested = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    cs = settings_of(conn)
    try:
        with conn.transaction():
            conn.execute(
                q("set_local_timeouts"),
                (statement_timeout or cs.statement_timeout, lock_timeout or cs.lock_timeout),
            )
            yield conn
    except psycopg.errors.LockNotAvailable as exc:
        if nested or exc.pgresult is None:  # a savepoint, or already named by an inner tx()
            raise
        what = locked_relation(conn, exc)
        waited = lock_timeout or cs.lock_timeout
        on = f" on {what}" if what else ""
        raise psycopg.errors.LockNotAvailable(
            f"lock timeout: waited {waited} for a lock{on} held by another session"
        ) from exc
