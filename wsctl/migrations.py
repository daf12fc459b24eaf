"""Forward-only SQL migrations: ``sql/migrations/NNNN_name.sql``.

Each file runs in its own transaction together with its history row in
``wsctl.schema_migrations``, unless its first line is the marker
``-- wsctl:no-transaction`` (for ``CREATE INDEX CONCURRENTLY``): such a file
holds simple statements separated by ``;`` at line ends, is idempotent, and
an index an earlier failed concurrent build left INVALID is dropped and
rebuilt before the file runs again.

Concurrent runs serialize on a session advisory lock, taken by polling
``pg_try_advisory_lock``: a session blocked in ``pg_advisory_lock`` would hold
a snapshot that the holder's ``CREATE INDEX CONCURRENTLY`` waits for, which
PostgreSQL reports as a deadlock.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from wsctl.errors import EnvError, OperationalError
from wsctl.queries import q, sql_dir
from wsctl.redact import first_line

if TYPE_CHECKING:
    import psycopg

NO_TRANSACTION_MARKER = "-- wsctl:no-transaction"
# "wsctl" as a 63-bit number: one lock for every wsctl migrate on a database.
LOCK_KEY = 0x7773_6374_6C00_0001
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_CONCURRENT_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?([A-Za-z0-9_]+)\"?",
    re.IGNORECASE,
)


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
class MigrationStatus:
    applied: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    changed: list[dict] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.changed

    def to_json(self) -> dict:
        return {"applied": self.applied, "pending": self.pending, "changed": self.changed}


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
    statements, current = [], []
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


def _applied_rows(conn: psycopg.Connection) -> list[tuple]:
    exists = conn.execute(q("migrations_table_exists")).fetchone()[0]
    if not exists:
        return []
    return conn.execute(q("migrations_applied")).fetchall()


def status(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> MigrationStatus:
    """Applied, pending and changed migrations (read only)."""
    migrations = load_migrations() if migrations is None else migrations
    by_version = {m.version: m for m in migrations}
    result = MigrationStatus()
    applied_versions = set()
    for version, name, checksum, applied_at, _duration in _applied_rows(conn):
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
        names = ", ".join(c["file"] for c in st.changed)
        raise EnvError(f"migration files changed after they were applied: {names}")
    if st.pending:
        first = st.pending[0]
        raise EnvError(
            f"database schema is not up to date ({len(st.pending)} pending migration(s), "
            f"first {first['version']:04d}_{first['name']})",
            hint="run `wsctl migrate`",
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


def _acquire_lock(conn: psycopg.Connection, lock_timeout: float) -> float:
    start = time.monotonic()
    delay = 0.05
    while True:
        if conn.execute(q("migrations_try_lock"), (LOCK_KEY,)).fetchone()[0]:
            return time.monotonic() - start
        if time.monotonic() - start >= lock_timeout:
            raise OperationalError(
                f"another `wsctl migrate` held the migration lock for over {lock_timeout:g}s",
                hint="wait for it to finish, or raise --lock-timeout",
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _rebuild_invalid_indexes(conn: psycopg.Connection, m: Migration) -> list[str]:
    from psycopg import sql

    rebuilt = []
    for name in _CONCURRENT_INDEX.findall(m.sql):
        row = conn.execute(q("index_validity"), (name,)).fetchone()
        if row is not None and row[0] is False:
            conn.execute(sql.SQL(q("drop_index_concurrently")).format(sql.Identifier(name)))
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
    """Apply pending migrations. ``conn`` must be autocommit on a direct/session connection.

    ``lock_timeout`` (seconds) bounds the wait for another ``wsctl migrate``;
    ``ddl_lock_timeout`` bounds each statement's wait for a table lock, so an
    ALTER TABLE queued behind a long transaction fails (nothing of that file is
    applied) instead of blocking every reader of the table.
    """
    migrations = load_migrations() if migrations is None else migrations
    result = MigrateResult()
    result.waited_seconds = _acquire_lock(conn, lock_timeout)
    try:
        conn.execute(q("migrations_set_lock_timeout"), (ddl_lock_timeout,))
        with conn.transaction():
            conn.execute(q("migrations_bootstrap"))
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
                    with conn.transaction():
                        conn.execute(m.sql)
                        ms = int((time.monotonic() - started) * 1000)
                        conn.execute(q("migrations_record"), (m.version, m.name, m.checksum, ms))
                else:
                    result.rebuilt_indexes += _rebuild_invalid_indexes(conn, m)
                    for stmt in split_statements(m.sql):
                        conn.execute(stmt)
                    ms = int((time.monotonic() - started) * 1000)
                    with conn.transaction():
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
        try:
            conn.execute(q("migrations_unlock"), (LOCK_KEY,))
        except Exception:
            pass  # the session ending releases it too
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
