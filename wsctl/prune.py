"""`wsctl prune`: remove the dispatch bookkeeping of batches that finished long ago.

A batch is finished when every one of its states is COMPLETED, CANCELLED or
FAILED (judged from the states, never from ``batches.status``, which the
dashboard writes); its finish time is its latest state update. Only the
``workflow_states`` rows of such batches are removed, unless
``include_items`` also removes their ``batch_items`` (the enrichment results).

Work goes in chunks, each in its own short transaction with a bounded lock
wait: lock the batch row (FOR UPDATE: no state of it can be inserted or
completed meanwhile), re-check that it is still finished, lock and read the
chunk's rows, append them to the archive and fsync it, delete them, and
count them into the batch's summary row (``wsctl.pruned_batches``) and the
archive's committed length (``wsctl.prune_archives``) in the same
transaction. A killed prune therefore leaves at most one uncommitted chunk
at the end of the archive, which the next run truncates away before it
appends: every removed row is in the archive exactly once. A batch whose
prune was interrupted is finished by the next run whatever its cutoff.

Nothing here prints or exits; ``on_chunk`` reports progress.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.domain import check_chunk_size, parse_uuid
from wsctl.errors import NotFound, OperationalError, UsageError
from wsctl.jsondoc import JsonDoc, fields_doc
from wsctl.queries import named, one, q, scalar

if TYPE_CHECKING:
    import psycopg

DEFAULT_CHUNK_SIZE = 5000
LOCK_TIMEOUT = "2s"
# A chunk that cannot get its locks (a dispatcher or callback holds the batch) is retried
# this many times, then the batch is left for the next run.
LOCK_RETRIES = 5
# Tests only: seconds to sleep after the archive's fsync, before the DELETE (a kill window).
_TEST_PAUSE_ENV = "WSCTL_TEST_PRUNE_PAUSE"

_DURATION = re.compile(r"(\d+)\s*(w|d|h|m|s)")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``2w``, ``1d12h``, ``90m``, ``45s`` (``0s``: no age limit)."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION.sub("", compact):
        raise UsageError(
            f"--older-than must be a duration such as 30d, 12h, 2w or 1d12h, not {text!r}"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(compact))
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class PruneSummary(JsonDoc):
    """The row ``wsctl.pruned_batches`` keeps for a pruned batch."""

    batch_id: uuid.UUID
    finished_at: datetime
    counts: dict[str, dict[str, int]]
    items: int
    states_pruned: int
    items_pruned: int
    include_items: bool
    archive: str | None
    started_at: datetime
    states_pruned_at: datetime | None
    items_pruned_at: datetime | None

    @property
    def complete(self) -> bool:
        """False while a prune of this batch was interrupted."""
        if self.states_pruned_at is None:
            return False
        return not self.include_items or self.items_pruned_at is not None

    def describe(self) -> str:
        """One line: what was pruned and when."""
        when = self.states_pruned_at or self.started_at
        what = f"{self.states_pruned} state(s)"
        if self.items_pruned:
            what += f" and {self.items_pruned} item(s)"
        text = (
            f"pruned {when.isoformat(timespec='seconds')}: {what} removed "
            f"(finished {self.finished_at.isoformat(timespec='seconds')})"
        )
        if not self.complete:
            text += "; the prune was interrupted, `wsctl prune` finishes it"
        if self.archive:
            text += f"; archive {self.archive}"
        return text

    json_extra = ("complete",)


def get_summary(conn: psycopg.Connection, batch_id: uuid.UUID) -> PruneSummary | None:
    """The summary row of a pruned batch, or None (call inside a transaction)."""
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(PruneSummary)) as cur:
        return cur.execute(q("prune_summary_get"), (batch_id,)).fetchone()


@dataclass
class BatchResult(JsonDoc):
    batch_id: uuid.UUID
    finished_at: datetime | None
    states: int  # states it had when the run found it
    status: str  # "pruned", "would prune", "skipped", "partly pruned"
    states_pruned: int = 0
    items_pruned: int = 0
    resumed: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class ChunkProgress:
    """One committed chunk (passed to ``on_chunk``)."""

    batch_id: uuid.UUID
    table: str  # "workflow_states" or "batch_items"
    rows: int
    total_states: int  # states of every candidate batch when the run began


@dataclass
class PruneReport(JsonDoc):
    json_extra = ("states_pruned", "items_pruned")

    older_than: str
    dry_run: bool
    include_items: bool
    archive: str | None = None
    archive_truncated_bytes: int = 0  # an interrupted run's uncommitted tail, removed on resume
    batches: list[BatchResult] = field(default_factory=list)

    @property
    def states_pruned(self) -> int:
        return sum(b.states_pruned for b in self.batches)

    @property
    def items_pruned(self) -> int:
        return sum(b.items_pruned for b in self.batches)

    @property
    def skipped(self) -> list[BatchResult]:
        return [b for b in self.batches if b.status in ("skipped", "partly pruned")]

    def to_json(self) -> dict[str, Any]:
        return fields_doc(self) | {"skipped": len(self.skipped)}


class _Archive:
    """The JSON Lines file: appended and fsynced before a chunk's DELETE commits.

    The file's committed length lives in ``wsctl.prune_archives``, updated in
    the chunk's own transaction; at open, anything past it (a chunk written
    by a run killed before its commit) is cut off.
    """

    def __init__(self, conn: psycopg.Connection, path: Path):
        self.path = str(path.resolve())
        self.conn = conn
        try:
            self.file: IO[bytes] = open(path, "ab+")  # noqa: SIM115 - held for the whole run
        except OSError as exc:
            raise OperationalError(f"cannot open archive {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise OperationalError(
                f"archive {self.path} is in use by another wsctl prune", hint="let it finish"
            ) from None
        size = os.fstat(self.file.fileno()).st_size
        with tx(conn):
            conn.execute(q("prune_archive_register"), (self.path, size))
            committed = one(named(conn).execute(q("prune_archive_get"), (self.path,)))[
                "committed_bytes"
            ]
        if size < committed:
            self.file.close()
            raise OperationalError(
                f"archive {self.path} holds {size} bytes but {committed} were committed to it: "
                "it was truncated or replaced since, so rows already removed would be missing",
                hint="restore the file, or archive to a new file",
            )
        self.truncated = size - committed
        if self.truncated:
            self._cut(committed)
        self.committed = committed

    def _cut(self, length: int) -> None:
        self.file.truncate(length)
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, table: str, docs: list[str]) -> int:
        """Append the rows and fsync; returns the file's new length (not committed yet)."""
        head = '{"table": "' + table + '", "row": '
        data = "".join(head + d + "}\n" for d in docs).encode("utf-8")
        try:
            self.file.seek(0, os.SEEK_END)
            self.file.write(data)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:  # disk full, I/O error: the chunk rolls back, nothing removed
            raise OperationalError(
                f"cannot write archive {self.path}: {exc.strerror or exc}; nothing of this "
                "chunk was removed"
            ) from None
        return self.committed + len(data)

    def commit_in_tx(self, new_length: int, rows: int) -> None:
        """Record the new length in the chunk's transaction (it commits with the DELETE)."""
        row = self.conn.execute(
            q("prune_archive_commit"),
            {"path": self.path, "bytes": new_length, "rows": rows, "expected": self.committed},
        ).fetchone()
        if row is None:
            raise OperationalError(
                f"archive {self.path} was advanced by another prune meanwhile; stopping"
            )

    def committed_to(self, new_length: int) -> None:
        self.committed = new_length

    def rollback(self) -> None:
        """After a failed chunk: cut the file to its committed length, as the database has it.

        Read back, not remembered: an interrupt may land after the COMMIT. When
        the database cannot say (a lost connection), the next run cuts instead.
        """
        try:
            with tx(self.conn):
                row = named(self.conn).execute(q("prune_archive_get"), (self.path,)).fetchone()
            if row is not None:
                self.committed = row["committed_bytes"]
                self._cut(self.committed)
        except Exception:
            pass

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pause_for_tests() -> None:
    value = os.environ.get(_TEST_PAUSE_ENV)
    if value:
        time.sleep(float(value))


def prune(
    conn: psycopg.Connection,
    older_than: str,
    *,
    batch_ids: list[str] | None = None,
    dry_run: bool = False,
    archive: Path | None = None,
    include_items: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lock_timeout: str = LOCK_TIMEOUT,
    on_chunk: Callable[[ChunkProgress], None] | None = None,
    on_resume: Callable[[PruneReport], None] | None = None,
) -> PruneReport:
    """Prune the finished batches older than ``older_than`` (a duration such as ``30d``).

    ``batch_ids`` restricts the run to those batches; one that is not finished
    or not old enough is refused (``OperationalError``) before anything is
    written. Batches a chunk cannot lock (after retries) are reported as
    skipped and left for the next run. ``on_resume`` is called once, before the first
    chunk, when the archive held an interrupted run's uncommitted tail, now cut
    (``report.archive_truncated_bytes``).
    """
    age = parse_duration(older_than)
    check_chunk_size(chunk_size)
    ids = [parse_uuid(b, "batch id") for b in batch_ids] if batch_ids else None
    report = PruneReport(
        older_than=older_than,
        dry_run=dry_run,
        include_items=include_items,
        archive=str(archive.resolve()) if archive else None,
    )
    params = {
        "batch_ids": ids,
        "older_than": age,
        "include_items": include_items,
        "max_batches": None,
    }
    with tx(conn):
        rows = named(conn).execute(q("prune_candidates"), params).fetchall()
        if ids:
            _refuse_ineligible(conn, ids, {r["batch_id"] for r in rows}, older_than)
    found = [
        BatchResult(
            batch_id=r["batch_id"],
            finished_at=r["finished_at"],
            states=r["states"],
            status="would prune",
            resumed=r["resumed"],
        )
        for r in rows
    ]
    report.batches = found
    if dry_run or not found:
        return report
    total = sum(b.states for b in found)
    opened: AbstractContextManager[_Archive | None] = (
        _Archive(conn, archive) if archive else nullcontext()
    )
    with opened as arch:
        if arch is not None:
            report.archive_truncated_bytes = arch.truncated
            if arch.truncated and on_resume:
                on_resume(report)
        for result in found:

            def progress(table: str, n: int, bid: uuid.UUID = result.batch_id) -> None:
                if on_chunk:
                    on_chunk(ChunkProgress(bid, table, n, total))

            _prune_batch(
                conn,
                result,
                arch=arch,
                include_items=include_items,
                chunk_size=chunk_size,
                lock_timeout=lock_timeout,
                progress=progress,
            )
    return report


def _refuse_ineligible(
    conn: psycopg.Connection, ids: list[uuid.UUID], eligible: set[uuid.UUID], older_than: str
) -> None:
    for bid in ids:
        if bid in eligible:
            continue
        if conn.execute(q("batch_get"), (bid,)).fetchone() is None:
            raise NotFound("batch", bid)
        explained = one(named(conn).execute(q("prune_explain_batch"), (bid,)))
        states, unfinished = explained["states"], explained["unfinished"]
        finished_at = explained["finished_at"]
        if unfinished:
            raise OperationalError(
                f"batch {bid} is active: {unfinished} of its {states} state(s) are not "
                "COMPLETED, CANCELLED or FAILED; nothing was pruned"
            )
        summary = get_summary(conn, bid)
        if states == 0 and summary is not None:
            raise OperationalError(f"batch {bid} is already pruned: {summary.describe()}")
        if states == 0:
            raise OperationalError(f"batch {bid} has no states to prune")
        raise OperationalError(
            f"batch {bid} finished {finished_at.isoformat(timespec='seconds')}, less than "
            f"{older_than} ago; nothing was pruned"
        )


def _prune_batch(
    conn: psycopg.Connection,
    result: BatchResult,
    *,
    arch: _Archive | None,
    include_items: bool,
    chunk_size: int,
    lock_timeout: str,
    progress: Callable[[str, int], Any],
) -> None:
    import psycopg

    bid = result.batch_id
    retries = 0
    table = "workflow_states"
    while True:
        try:
            outcome, n = _chunk(
                conn,
                bid,
                table=table,
                arch=arch,
                include_items=include_items,
                chunk_size=chunk_size,
                lock_timeout=lock_timeout,
            )
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            if arch is not None:
                arch.rollback()
            retries += 1
            if retries > LOCK_RETRIES:
                result.status = "partly pruned" if result.states_pruned else "skipped"
                result.reason = f"could not lock the batch's rows: {str(exc).splitlines()[0]}"
                return
            time.sleep(0.2 * retries)
            continue
        except BaseException:
            if arch is not None:
                arch.rollback()
            raise
        if outcome == "locked":  # every row left is locked by another transaction
            retries += 1
            if retries > LOCK_RETRIES:
                result.status = "partly pruned" if result.states_pruned else "skipped"
                result.reason = "the batch's remaining rows stayed locked by other transactions"
                return
            time.sleep(0.2 * retries)
            continue
        retries = 0
        if outcome == "unfinished":
            result.status = "partly pruned" if result.states_pruned else "skipped"
            result.reason = "a state of the batch is no longer finished (retried or enqueued)"
            return
        if outcome == "gone":
            result.status = "skipped"
            result.reason = "the batch was deleted meanwhile"
            return
        if table == "workflow_states":
            result.states_pruned += n
        else:
            result.items_pruned += n
        if n:
            progress(table, n)
        if outcome == "states done":
            if not include_items:
                break
            table = "batch_items"
        elif outcome == "items done":
            break
    result.status = "pruned"


def _chunk(
    conn: psycopg.Connection,
    bid: uuid.UUID,
    *,
    table: str,
    arch: _Archive | None,
    include_items: bool,
    chunk_size: int,
    lock_timeout: str,
) -> tuple[str, int]:
    """One chunk in one transaction; returns (outcome, rows removed).

    outcome: "more", "states done", "items done", "locked" (every row left is
    locked by another transaction), "unfinished" (no longer finished), "gone".
    """
    from psycopg.rows import dict_row
    from psycopg.types.json import Jsonb

    new_length = None
    with tx(conn, lock_timeout=lock_timeout):
        if conn.execute(q("prune_lock_batch"), (bid,)).fetchone() is None:
            return "gone", 0
        if scalar(conn.execute(q("prune_batch_unfinished"), {"batch_id": bid})):
            return "unfinished", 0
        if get_summary(conn, bid) is None:
            with conn.cursor(row_factory=dict_row) as cur:
                snapshot = one(cur.execute(q("prune_batch_snapshot"), {"batch_id": bid}))
            conn.execute(
                q("prune_summary_insert"),
                {
                    "batch_id": bid,
                    "finished_at": snapshot["finished_at"],
                    "counts": Jsonb(snapshot["counts"]),
                    "items": snapshot["items"],
                    "include_items": include_items,
                    "archive": arch.path if arch else None,
                },
            )
        elif include_items or arch is not None:
            conn.execute(
                q("prune_summary_note"),
                {
                    "batch_id": bid,
                    "include_items": include_items,
                    "archive": arch.path if arch else None,
                },
            )
        select, delete = (
            ("prune_select_states", "prune_delete_states")
            if table == "workflow_states"
            else ("prune_select_items", "prune_delete_items")
        )
        if table == "batch_items" and scalar(conn.execute(q("prune_states_left"), (bid,))):
            return "unfinished", 0  # a state appeared: its item must stay
        rows = named(conn).execute(q(select), {"batch_id": bid, "limit": chunk_size}).fetchall()
        ids = [r["id"] for r in rows]
        if rows and arch is not None:
            new_length = arch.write(table, [r["doc"] for r in rows])
            _pause_for_tests()
            arch.commit_in_tx(new_length, len(rows))
        if ids:
            deleted = conn.execute(q(delete), (ids,)).rowcount
            if deleted != len(ids):  # the rows were locked: cannot happen
                raise OperationalError(f"deleted {deleted} of {len(ids)} locked rows; rolled back")
        left = q("prune_states_left") if table == "workflow_states" else q("prune_items_left")
        done = not scalar(conn.execute(left, (bid,)))
        conn.execute(
            q("prune_summary_add"),
            {
                "batch_id": bid,
                "states": len(ids) if table == "workflow_states" else 0,
                "items": len(ids) if table == "batch_items" else 0,
                "states_done": table == "workflow_states" and done,
                "items_done": table == "batch_items" and done,
            },
        )
    if new_length is not None and arch is not None:
        arch.committed_to(new_length)
    if not done:
        return ("more" if ids else "locked"), len(ids)
    return ("states done" if table == "workflow_states" else "items done"), len(ids)
