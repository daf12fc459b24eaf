"""Forward-only SQL migrations: ``sql/migrations/NNNN_name.sql``.

Each file runs in its own transaction together with its history row in
``wsctl.schema_migrations``, unless its first line is the marker
``-- wsctl:no-transaction`` (for ``CREATE INDEX CONCURRENTLY``): such a file
holds simple statements separated by ``;`` at line ends, is idempotent, and
an index an earlier failed concurrent build left INVALID is dropped and
rebuilt before the file runs again.

Concurrent runs serialize on an advisory lock, taken by polling
``pg_try_advisory_xact_lock``: a session blocked in ``pg_advisory_lock`` would
hold a snapshot that the holder's ``CREATE INDEX CONCURRENTLY`` waits for,
which PostgreSQL reports as a deadlock.

``migrate`` leaves no session state behind, so that it is safe even through a
transaction-mode pooler nobody declared (PgBouncer on any port): the lock is a
*transaction* advisory lock held by an open transaction on a second connection
(a pooler keeps a transaction on one server connection, while a session lock
could be taken on one server connection and "released" on another), every
timeout is SET LOCAL inside a transaction, and a statement that cannot run in
a transaction (``CREATE INDEX CONCURRENTLY``) has its lock waits bounded by a
watchdog on a third connection, which cancels it once it has waited longer
than ``ddl_lock_timeout`` for a lock.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsctl import security
from wsctl.errors import EnvError, OperationalError
from wsctl.jsondoc import JsonDoc
from wsctl.queries import named, q, scalar, sql_dir
from wsctl.redact import first_line

if TYPE_CHECKING:
    import psycopg

NO_TRANSACTION_MARKER = "-- wsctl:no-transaction"
# "wsctl" as a 63-bit number: one lock for every wsctl migrate on a database.
LOCK_KEY = 0x7773_6374_6C00_0001
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_CONCURRENT_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?([A-Za-z0-9_]+)\"?"
    r"\s+ON\s+(?:ONLY\s+)?(?:\"?([A-Za-z0-9_]+)\"?\s*\.\s*)?\"?[A-Za-z0-9_]+\"?",
    re.IGNORECASE,
)


def _concurrent_indexes(sql_text: str) -> list[tuple[str | None, str]]:
    """(schema or None, index name) of each concurrent index build in ``sql_text``; the
    index lives in its table's schema (None: the table is found through the search_path)."""
    return [(m.group(2), m.group(1)) for m in _CONCURRENT_INDEX.finditer(sql_text)]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def transactional(self) -> bool:
        first = self.sql.lstrip().splitlines()[0] if self.sql.strip() else ""
        return first.strip() != NO_TRANSACTION_MARKER

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass
class MigrationStatus(JsonDoc):
    applied: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    changed: list[dict] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.changed

    def changed_text(self) -> str:
        """What ``changed`` says, in the words doctor and every command print."""
        names = ", ".join(c["file"] for c in self.changed)
        return f"migration files changed after they were applied: {names}"

    def pending_text(self) -> str:
        """What ``pending`` says: how many, and the first."""
        first = self.pending[0]
        return f"{len(self.pending)} pending migration(s), first {first['version']:04d}_{first['name']}"


@dataclass
class MigrateResult:
    applied: list[dict] = field(default_factory=list)
    rebuilt_indexes: list[str] = field(default_factory=list)
    waited_seconds: float = 0.0


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or (sql_dir() / "migrations")
    out: list[Migration] = []
    seen: set[int] = set()
    for path in sorted(directory.glob("*.sql")):
        m = _FILE.match(path.name)
        if not m:
            raise OperationalError(f"migration file {path.name} is not named NNNN_name.sql")
        version = int(m.group(1))
        if version in seen:
            raise OperationalError(f"two migration files have version {version:04d}")
        seen.add(version)
        raw = path.read_bytes()
        out.append(
            Migration(
                version=version,
                name=m.group(2),
                path=path,
                sql=raw.decode("utf-8"),
                checksum=hashlib.sha256(raw).hexdigest(),
            )
        )
    return out


def split_statements(sql: str) -> list[str]:
    """Statements of a non-transactional file: ``;`` at a line's end ends a statement."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        if line.strip().startswith("--") and not current:
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            stmt = "\n".join(current).strip()
            if stmt.rstrip(";").strip():
                statements.append(stmt)
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


def _applied_rows(conn: psycopg.Connection) -> list[dict[str, Any]]:
    from wsctl.db import tx

    with tx(conn):  # the schema check too waits for a lock only as long as lock_timeout
        exists = scalar(conn.execute(q("migrations_table_exists")))
        if not exists:
            return []
        return named(conn).execute(q("migrations_applied")).fetchall()


def status(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> MigrationStatus:
    """Applied, pending and changed migrations (read only)."""
    migrations = load_migrations() if migrations is None else migrations
    by_version = {m.version: m for m in migrations}
    result = MigrationStatus()
    applied_versions = set()
    for applied in _applied_rows(conn):
        version, name, checksum = applied["version"], applied["name"], applied["checksum"]
        applied_at = applied["applied_at"]
        applied_versions.add(version)
        row = {
            "version": version,
            "name": name,
            "checksum": checksum,
            "applied_at": applied_at.isoformat()
            if isinstance(applied_at, datetime)
            else applied_at,
        }
        result.applied.append(row)
        m = by_version.get(version)
        if m is not None and m.checksum != checksum:
            result.changed.append(
                {
                    "version": version,
                    "name": name,
                    "file": m.filename,
                    "applied_checksum": checksum,
                    "file_checksum": m.checksum,
                }
            )
    for m in migrations:
        if m.version not in applied_versions:
            result.pending.append({"version": m.version, "name": m.name})
    return result


def require_up_to_date(conn: psycopg.Connection) -> None:
    """Commands other than migrate refuse a database wsctl has not migrated (exit 3)."""
    st = status(conn)
    if st.changed:
        raise EnvError(st.changed_text())
    if st.pending:
        raise EnvError(
            f"database schema is not up to date ({st.pending_text()})", hint="run `wsctl migrate`"
        )


def _refuse_changed(st: MigrationStatus) -> None:
    """``migrate`` and its ``--dry-run`` refuse a history that disagrees with the files."""
    if st.changed:
        c = st.changed[0]
        raise OperationalError(
            f"migration {c['file']} changed after it was applied "
            f"(checksum {c['applied_checksum'][:12]} applied, {c['file_checksum'][:12]} now)",
            hint="migrations are never edited after release; add a new file instead",
        )


def _sibling(conn: psycopg.Connection, *, autocommit: bool) -> psycopg.Connection:
    """Another connection with ``conn``'s own parameters (password included).

    Its statements go by the simple protocol (parameters bound client-side): an
    extended-protocol portal left open in the lock's transaction keeps a snapshot,
    whose xmin a concurrent index build would wait for until the run ends.
    """
    import psycopg

    params = {
        o.keyword.decode(): o.val.decode()
        for o in conn.pgconn.info
        if o.val is not None and o.keyword.decode() != "hostaddr"
    }
    params["application_name"] = "wsctl-migrate-lock"
    return psycopg.connect(
        psycopg.conninfo.make_conninfo(**params),
        autocommit=autocommit,
        prepare_threshold=None,
        cursor_factory=psycopg.ClientCursor,
    )


class _MigrationLock:
    """The migrate lock: a transaction advisory lock, held by an open transaction on a
    second connection for the whole run (no session state: safe through any pooler).

    A third connection (autocommit: never in an open transaction, whose virtual xid a
    concurrent index build would wait for) watches the statements that cannot run in a
    transaction and cancels one that has waited longer than the DDL lock timeout.
    """

    def __init__(self, conn: psycopg.Connection):
        self._work = conn
        # Not autocommit: its first statement opens the transaction that holds the lock.
        self.conn = _sibling(conn, autocommit=False)
        self._watch: psycopg.Connection | None = None

    def acquire(self, lock_timeout: float) -> float:
        start = time.monotonic()
        delay = 0.05
        while True:
            # The lock lives as long as this transaction: a server-side idle timeout must
            # not end it.
            self.conn.execute(q("migrations_lock_transaction_settings"))
            if scalar(self.conn.execute(q("migrations_try_lock"), (LOCK_KEY,))):
                return time.monotonic() - start
            # Not held: end this try's transaction before waiting. A waiter's transaction
            # left open would be one the holder's CREATE INDEX CONCURRENTLY waits for
            # (it waits for every transaction that had a snapshot when it began).
            self.conn.rollback()
            if time.monotonic() - start >= lock_timeout:
                raise OperationalError(
                    f"another `wsctl migrate` held the migration lock for over {lock_timeout:g}s",
                    hint="wait for it to finish, or raise --lock-timeout",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def run_bounded(self, work: psycopg.Connection, stmt: str, ddl_lock_timeout: str) -> None:
        """Run ``stmt`` (outside any transaction) on ``work``; cancel it server-side once it
        has waited longer than ``ddl_lock_timeout`` for a lock (then LockNotAvailable)."""
        import threading

        import psycopg

        from wsctl.settings import duration_ms

        limit_ms = duration_ms(ddl_lock_timeout)
        if not limit_ms:  # "0": no limit, as PostgreSQL's lock_timeout = 0
            work.execute(stmt)
            return
        if self._watch is None:
            self._watch = _sibling(self._work, autocommit=True)
        watch_conn = self._watch
        done = threading.Event()
        cancelled: list[bool] = []

        def watch() -> None:
            while not done.wait(0.1):
                row = (
                    named(watch_conn)
                    .execute(
                        q("migrations_cancel_lock_waiter"),
                        {"query": stmt, "timeout_s": limit_ms / 1000.0},
                    )
                    .fetchone()
                )
                if row is not None and row["cancelled"]:
                    cancelled.append(True)
                    return

        watcher = threading.Thread(target=watch, name="wsctl-migrate-watchdog", daemon=True)
        watcher.start()
        try:
            work.execute(stmt)
        except psycopg.errors.QueryCanceled as exc:
            done.set()
            watcher.join()
            if cancelled:
                raise psycopg.errors.LockNotAvailable(
                    f"waited over {ddl_lock_timeout} for a lock"
                ) from exc
            raise
        finally:
            done.set()
            watcher.join()

    def release(self) -> None:
        try:
            self.conn.rollback()  # ends the transaction, and the lock with it
        except Exception:
            pass  # closing the connection releases it too
        self.conn.close()
        if self._watch is not None:
            self._watch.close()


def _rebuild_invalid_indexes(
    conn: psycopg.Connection, m: Migration, lock: _MigrationLock, ddl_lock_timeout: str
) -> list[str]:
    from psycopg import sql

    from wsctl.db import tx

    rebuilt = []
    for schema, name in _concurrent_indexes(m.sql):
        with tx(conn):
            params = {"schema": schema, "name": name}
            row = named(conn).execute(q("index_validity"), params).fetchone()
        if row is not None and row["indisvalid"] is False:
            stmt = sql.SQL(q("drop_index_concurrently")).format(
                sql.Identifier(row["nspname"], name)
            )
            lock.run_bounded(conn, stmt.as_string(conn), ddl_lock_timeout)
            rebuilt.append(name)
    return rebuilt


def migrate(
    conn: psycopg.Connection,
    *,
    lock_timeout: float = 60.0,
    ddl_lock_timeout: str = "10s",
    migrations: list[Migration] | None = None,
    on_apply: Callable[[Migration], None] | None = None,
) -> MigrateResult:
    """Apply pending migrations. ``conn`` must be autocommit.

    ``lock_timeout`` (seconds) bounds the wait for another ``wsctl migrate``;
    ``ddl_lock_timeout`` bounds each statement's wait for a table lock, so an
    ALTER TABLE queued behind a long transaction fails (nothing of that file is
    applied) instead of blocking every reader of the table. The statements of
    a migration file have no statement timeout (an index build on a large
    table takes what it takes); wsctl's own bookkeeping has the connection's.
    Nothing is left in the session (see the module's docstring).
    """
    from wsctl.db import tx
    from wsctl.settings import duration_ms

    duration_ms(ddl_lock_timeout)  # a usage error before anything is done
    migrations = load_migrations() if migrations is None else migrations
    result = MigrateResult()
    lock = _MigrationLock(conn)
    try:
        result.waited_seconds = lock.acquire(lock_timeout)
        with tx(conn):
            before = security.object_keys(conn)
            conn.execute(q("migrations_bootstrap"))
            security.close_new_wsctl_objects(conn, before)
        st = status(conn, migrations)
        _refuse_changed(st)
        pending = {p["version"] for p in st.pending}
        for m in migrations:
            if m.version not in pending:
                continue
            if on_apply:
                on_apply(m)
            started = time.monotonic()
            try:
                if m.transactional:
                    with tx(conn, statement_timeout="0", lock_timeout=ddl_lock_timeout):
                        # Closed by default: what wsctl creates itself, the Data API cannot reach.
                        created = security.missing_pipeline_tables(conn) if m.version == 1 else []
                        before = security.object_keys(conn)
                        conn.execute(m.sql)
                        security.close_created_tables(conn, created, m.version)
                        security.close_new_wsctl_objects(conn, before)
                        ms = int((time.monotonic() - started) * 1000)
                        conn.execute(q("migrations_record"), (m.version, m.name, m.checksum, ms))
                else:
                    result.rebuilt_indexes += _rebuild_invalid_indexes(
                        conn, m, lock, ddl_lock_timeout
                    )
                    for stmt in split_statements(m.sql):
                        lock.run_bounded(conn, stmt, ddl_lock_timeout)
                    ms = int((time.monotonic() - started) * 1000)
                    with tx(conn, lock_timeout=ddl_lock_timeout):
                        conn.execute(q("migrations_record"), (m.version, m.name, m.checksum, ms))
            except Exception as exc:
                import psycopg

                if isinstance(exc, psycopg.errors.LockNotAvailable):
                    raise OperationalError(
                        f"migration {m.filename} waited over {ddl_lock_timeout} for a table lock "
                        "held by another transaction; nothing of it was applied",
                        hint="retry when the long transaction ends, or raise --ddl-lock-timeout",
                    ) from exc
                if isinstance(exc, psycopg.Error):
                    raise OperationalError(
                        f"migration {m.filename} failed: {first_line(exc)}"
                    ) from exc
                raise
            result.applied.append({"version": m.version, "name": m.name, "duration_ms": ms})
    finally:
        lock.release()
    return result


def pending_sql(conn: psycopg.Connection) -> list[Migration]:
    """The migrations ``--dry-run`` would print (read only).

    Refuses, as ``migrate`` does, when an applied migration's file changed:
    a dry run must not report "nothing pending" where the real run stops.
    """
    migrations = load_migrations()
    st = status(conn, migrations)
    _refuse_changed(st)
    pending = {p["version"] for p in st.pending}
    return [m for m in migrations if m.version in pending]
