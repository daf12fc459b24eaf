"""Backfill ``batches.workstream_slug`` for legacy batches, chunk by chunk.

The workstream of a batch with none is inferred by THE shared inference
(``wsctl.domain.infer_workstreams``, one statement per chunk); ``default``
fills in where inference cannot. The walk goes through batches without a
workstream by primary key, one short transaction per chunk with a lock
timeout, and records the chunk's last id in ``wsctl.backfill_progress`` in
that same transaction: an interrupted run resumes after its last finished
chunk, and a finished walk clears the checkpoint.

Batch ids are random UUIDs, so a batch inserted during the walk may land
behind the cursor. After the walk, a sweep therefore goes once more over the
batches still without a workstream (those left unresolved, those inserted
meanwhile, and, after a resume, those the interrupted run left): the report
and the exit code describe the table as it stands when the run ends.

``--enforce`` decides first: a read-only pass (the dry-run inference) over
the batches in scope counts what would remain without a workstream; if any
would, the run is refused before anything is written (not even the
checkpoint). Otherwise the backfill runs and the NOT NULL check is added and
validated; a batch without a workstream inserted meanwhile still makes the
validation refuse, after the backfill's chunks are committed.

The UPDATE says ``WHERE workstream_slug IS NULL``: a value set meanwhile (by
the dashboard) is never overwritten, and no other column is touched.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from wsctl.db import first_line, settings_of, tx
from wsctl.domain import (
    Inference,
    check_chunk_size,
    infer_workstreams,
    parse_uuid,
    validate_slug,
)
from wsctl.errors import NotFound, OperationalError
from wsctl.jsondoc import OMIT, JsonDoc
from wsctl.queries import column, named, q, scalar

if TYPE_CHECKING:
    import psycopg

JOB = "workstream_slug"
CHECK_NAME = "batches_workstream_slug_not_null"
DEFAULT_CHUNK_SIZE = 1000


@dataclass(frozen=True)
class Unresolved(JsonDoc):
    batch_id: uuid.UUID
    reason: str
    candidates: list[str]


@dataclass(frozen=True)
class ChunkReport:
    """What one committed chunk did (passed to ``on_chunk``)."""

    phase: str  # "check" (--enforce's read-only pass), "walk" or "sweep"
    batch_ids: list[uuid.UUID]
    inferred: int
    defaulted: int
    updated: int
    total: int  # batches without a workstream ahead of the walk when it started


@dataclass
class EnforceResult(JsonDoc):
    state: str  # "added", "validated", "already", "refused", "would add", "would refuse"
    remaining_null: int
    message: str = field(metadata=OMIT)

    @property
    def ok(self) -> bool:
        return self.state in ("added", "validated", "already", "would add")

    json_extra = ("ok",)


@dataclass
class BackfillReport(JsonDoc):
    inferred: int = 0
    defaulted: int = 0
    updated: int = 0
    unresolved: list[Unresolved] = field(default_factory=list)
    scanned: int = 0  # batches examined (walk + new ones in the sweep)
    already_set: int = 0  # --batch ids that already had a workstream
    set_meanwhile: int = 0  # batches the dashboard set between the chunk's read and its UPDATE
    dry_run: bool = False
    default: str | None = None
    resumed_after: uuid.UUID | None = None
    resumed_checkpoint_at: datetime | None = field(default=None, metadata=OMIT)
    # Defaulted batches whose blueprint the default workstream does not fully register.
    default_unregistered: list[uuid.UUID] = field(default_factory=list)
    enforce: EnforceResult | None = None
    # --enforce refused before writing: the counts say what the backfill would have set.
    refused_before_writing: bool = False


def _check_default(conn: psycopg.Connection, default: str | None) -> str | None:
    if default is None:
        return None
    validate_slug(default, "default workstream")
    from wsctl.batches import known_workstreams

    with tx(conn):
        known = known_workstreams(conn)
    if default not in known:
        listed = ", ".join(known) if known else "none: the registry is empty"
        raise OperationalError(
            f"unknown default workstream {default!r} (no registry rows); "
            f"known workstreams: {listed}"
        )
    return default


def _check_scope(
    conn: psycopg.Connection, batch_ids: Sequence[str | uuid.UUID] | None, report: BackfillReport
) -> list[uuid.UUID] | None:
    if not batch_ids:
        return None
    ids: list[uuid.UUID] = []
    for raw in batch_ids:
        bid = raw if isinstance(raw, uuid.UUID) else parse_uuid(raw, "batch id")
        if bid not in ids:
            ids.append(bid)
    with tx(conn):
        found: dict[uuid.UUID, bool] = dict(
            conn.execute(q("backfill_existing_ids"), (ids,)).fetchall()
        )
    missing = [str(b) for b in ids if b not in found]
    if missing:
        raise NotFound("batch", ", ".join(missing))
    report.already_set = sum(1 for b in ids if found[b])
    return ids


def _process_chunk(
    conn: psycopg.Connection,
    phase: str,
    ids: list[uuid.UUID],
    *,
    total: int,
    dry_run: bool,
    report: BackfillReport,
    unresolved: dict[uuid.UUID, Inference],
) -> ChunkReport:
    """Infer, decide and (unless dry run) set the chunk's workstreams (``report.default`` for
    a batch nothing infers); adds to ``report`` and says what the chunk did."""
    inferences = infer_workstreams(conn, ids)
    default = report.default
    set_ids: list[uuid.UUID] = []
    set_values: list[str] = []
    defaulted_ids: set[uuid.UUID] = set()
    for bid in ids:
        inf = inferences[bid]
        if inf.workstream:
            set_ids.append(bid)
            set_values.append(inf.workstream)
        elif default:
            set_ids.append(bid)
            set_values.append(default)
            defaulted_ids.add(bid)
        else:
            unresolved[bid] = inf
    done = set(set_ids)  # a dry run counts what it would set
    if set_ids and not dry_run:
        done = set(column(named(conn).execute(q("backfill_set"), (set_ids, set_values)), "id"))
        # The UPDATE skips a batch the dashboard set meanwhile: it counts as neither.
        report.set_meanwhile += len(set_ids) - len(done)
    updated = 0 if dry_run else len(done)
    defaulted = len(done & defaulted_ids)
    inferred = len(done) - defaulted
    report.default_unregistered += [
        b
        for b in set_ids
        if b in done and b in defaulted_ids and default not in inferences[b].registered
    ]
    report.inferred += inferred
    report.defaulted += defaulted
    report.updated += updated
    report.scanned += len(ids)
    return ChunkReport(phase, ids, inferred, defaulted, updated, total=total)


def _lock_error(exc: Exception, after: uuid.UUID | None) -> OperationalError:
    where = f"after batch {after}" if after else "at the start"
    return OperationalError(
        f"backfill stopped {where}: {first_line(exc)}; finished chunks are kept, re-run to resume"
    )


def backfill_workstream_slug(
    conn: psycopg.Connection,
    *,
    default: str | None = None,
    batch_ids: Sequence[str | uuid.UUID] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dry_run: bool = False,
    enforce: bool = False,
    lock_timeout: str | None = None,
    on_chunk: Callable[[ChunkReport], None] | None = None,
    on_resume: Callable[[BackfillReport], None] | None = None,
) -> BackfillReport:
    """Set ``workstream_slug`` on batches that have none; see the module docstring.

    ``batch_ids`` restricts the run to those batches (no checkpoint is used).
    ``dry_run`` reads only: it starts from the beginning and writes nothing,
    not even the checkpoint. ``enforce`` adds the NOT NULL check once no batch
    without a workstream remains (``report.enforce`` says what happened); it
    decides first, read only, and refuses before writing anything when a batch
    would remain without one (``report.refused_before_writing``).
    ``on_chunk`` is called after each chunk (for ``--enforce``'s read-only
    pass too, with phase "check"); ``on_resume`` once, before the walk, when it
    takes up an interrupted run's checkpoint (``report.resumed_after``).
    """
    check_chunk_size(chunk_size)
    import psycopg

    lock_timeout = lock_timeout or settings_of(conn).lock_timeout
    report = BackfillReport(dry_run=dry_run)
    try:  # the checks before the walk wait for a lock as long as the walk's chunks do
        report.default = _check_default(conn, default)
        scope = _check_scope(conn, batch_ids, report)
    except psycopg.errors.LockNotAvailable as exc:
        raise _lock_error(exc, None) from None
    resumable = scope is None and not dry_run

    if (
        enforce
        and not dry_run
        and _refuse_before_writing(conn, scope, chunk_size, lock_timeout, report, on_chunk)
    ):
        return report

    cursor: uuid.UUID | None = None
    if resumable:
        with tx(conn):
            row = named(conn).execute(q("backfill_checkpoint_get"), (JOB,)).fetchone()
        if row is not None and row["last_id"] is not None:
            cursor = report.resumed_after = row["last_id"]
            report.resumed_checkpoint_at = row["updated_at"]
            if on_resume:
                on_resume(report)
    unresolved: dict[uuid.UUID, Inference] = {}
    # The walk: from the checkpoint to the end, checkpointing each chunk.
    total = _walk(
        conn,
        "walk",
        scope=scope,
        cursor=cursor,
        chunk_size=chunk_size,
        lock_timeout=lock_timeout,
        dry_run=dry_run,
        checkpoint=resumable,
        report=report,
        unresolved=unresolved,
        on_chunk=on_chunk,
    )
    if resumable:
        with tx(conn, lock_timeout=lock_timeout):
            conn.execute(q("backfill_checkpoint_clear"), (JOB,))

    if not dry_run:
        _sweep(conn, scope, chunk_size, lock_timeout, report, unresolved, on_chunk, total)
    report.unresolved = _unresolved_list(unresolved)
    if enforce:
        report.enforce = _enforce(conn, report, lock_timeout)
    return report


def _unresolved_list(unresolved: dict[uuid.UUID, Inference]) -> list[Unresolved]:
    return [
        Unresolved(batch_id=b, reason=i.reason, candidates=list(i.candidates))
        for b, i in sorted(unresolved.items(), key=lambda kv: kv[0])
    ]


def _walk(
    conn: psycopg.Connection,
    phase: str,
    *,
    scope: list[uuid.UUID] | None,
    cursor: uuid.UUID | None,
    chunk_size: int,
    lock_timeout: str,
    dry_run: bool,
    checkpoint: bool,
    report: BackfillReport,
    unresolved: dict[uuid.UUID, Inference],
    on_chunk: Callable[[ChunkReport], None] | None,
) -> int:
    """The batches without a workstream after ``cursor``, chunk by chunk, one transaction each.

    Unless ``dry_run``, each chunk's inferred (or defaulted) workstreams are
    set; with ``checkpoint`` the chunk's last id is recorded in the same
    transaction. Returns how many batches lacked a workstream ahead of the
    walk when it started.
    """
    with tx(conn):  # the count scans the batches table: give it the statement timeout
        total = scalar(conn.execute(q("backfill_count_null"), {"after": cursor, "scope": scope}))

    def process(ids: list[uuid.UUID]) -> ChunkReport:
        chunk = _process_chunk(
            conn, phase, ids, total=total, dry_run=dry_run, report=report, unresolved=unresolved
        )
        if checkpoint:
            conn.execute(q("backfill_checkpoint_set"), (JOB, ids[-1]))
        return chunk

    _chunks(conn, scope, cursor, chunk_size, lock_timeout, process, on_chunk)
    return total


def _chunks(
    conn: psycopg.Connection,
    scope: list[uuid.UUID] | None,
    cursor: uuid.UUID | None,
    chunk_size: int,
    lock_timeout: str,
    process: Callable[[list[uuid.UUID]], ChunkReport | None],
    on_chunk: Callable[[ChunkReport], None] | None,
) -> None:
    """The batches without a workstream after ``cursor``, ``chunk_size`` at a time, each
    chunk in a transaction of its own: ``process(ids)`` runs inside it (its writes commit
    with the chunk), and the report it returns goes to ``on_chunk`` once committed. A
    lock wait past ``lock_timeout`` stops the walk, naming the last committed chunk."""
    import psycopg

    while True:
        try:
            with tx(conn, lock_timeout=lock_timeout):
                ids = _next_chunk(conn, cursor, scope, chunk_size)
                if not ids:
                    return
                chunk = process(ids)
        except psycopg.errors.LockNotAvailable as exc:
            raise _lock_error(exc, cursor) from None
        cursor = ids[-1]
        if on_chunk and chunk is not None:
            on_chunk(chunk)


def _next_chunk(
    conn: psycopg.Connection, after: uuid.UUID | None, scope: list[uuid.UUID] | None, size: int
) -> list[uuid.UUID]:
    """The ids of the next ``size`` batches without a workstream after ``after``, in order."""
    params = {"after": after, "scope": scope, "limit": size}
    return column(named(conn).execute(q("backfill_next_chunk"), params), "id")


def _refuse_before_writing(
    conn: psycopg.Connection,
    scope: list[uuid.UUID] | None,
    chunk_size: int,
    lock_timeout: str,
    report: BackfillReport,
    on_chunk: Callable[[ChunkReport], None] | None,
) -> bool:
    """--enforce's decision, read only: would any batch still lack a workstream afterwards?

    Runs the dry-run inference over the batches in scope (from the start, the
    checkpoint neither read nor written). If some batch would remain without a
    workstream (in scope and unresolved, or outside the scope), fills
    ``report`` with what the backfill would have done plus the refusal and
    returns True: the caller writes nothing.
    """
    with tx(conn, lock_timeout=lock_timeout):
        row = named(conn).execute(q("backfill_check_state")).fetchone()
    if row is not None and row["convalidated"]:
        return False  # validated: no batch can lack a workstream
    probe = BackfillReport(dry_run=True, default=report.default)
    unresolved: dict[uuid.UUID, Inference] = {}
    _walk(
        conn,
        "check",
        scope=scope,
        cursor=None,
        chunk_size=chunk_size,
        lock_timeout=lock_timeout,
        dry_run=True,
        checkpoint=False,
        report=probe,
        unresolved=unresolved,
        on_chunk=on_chunk,
    )
    with tx(conn, lock_timeout=lock_timeout):
        remaining = scalar(conn.execute(q("backfill_null_total")))
    remaining = max(remaining - probe.inferred - probe.defaulted, len(unresolved))
    if not remaining:
        return False
    report.inferred, report.defaulted, report.scanned = (
        probe.inferred,
        probe.defaulted,
        probe.scanned,
    )
    report.default_unregistered = probe.default_unregistered
    report.unresolved = _unresolved_list(unresolved)
    report.refused_before_writing = True
    report.enforce = EnforceResult(
        "refused",
        remaining,
        f"not enforcing: {remaining} batch(es) would still have no workstream_slug after the "
        "backfill (resolve them, or pass --default); nothing was written",
    )
    return True


def _sweep(
    conn: psycopg.Connection,
    scope: list[uuid.UUID] | None,
    chunk_size: int,
    lock_timeout: str,
    report: BackfillReport,
    unresolved: dict[uuid.UUID, Inference],
    on_chunk: Callable[[ChunkReport], None] | None,
    total: int,
) -> None:
    """Once more over the batches still without a workstream, from the start.

    Batches the walk left unresolved keep their inference (no second
    inference); any other one (inserted behind the cursor meanwhile, or left by
    an interrupted run before a resume) is inferred and set now. What is still
    unresolved at the end is exactly what the table still lacks.
    """
    still: dict[uuid.UUID, Inference] = {}

    def process(ids: list[uuid.UUID]) -> ChunkReport | None:
        for b in ids:
            if b in unresolved:
                still[b] = unresolved[b]
        new = [b for b in ids if b not in unresolved]
        if not new:
            return None
        return _process_chunk(
            conn, "sweep", new, total=total, dry_run=False, report=report, unresolved=still
        )

    _chunks(conn, scope, None, chunk_size, lock_timeout, process, on_chunk)
    unresolved.clear()
    unresolved.update(still)


def _enforce(conn: psycopg.Connection, report: BackfillReport, lock_timeout: str) -> EnforceResult:
    """Add and validate the NOT NULL check once no batch lacks a workstream."""
    import psycopg

    with tx(conn, lock_timeout=lock_timeout):
        remaining = scalar(conn.execute(q("backfill_null_total")))
        row = named(conn).execute(q("backfill_check_state")).fetchone()
    if report.dry_run:
        remaining = max(remaining - report.inferred - report.defaulted, 0)
        if remaining:
            return EnforceResult(
                "would refuse",
                remaining,
                f"--enforce would refuse: {remaining} batch(es) would still have no workstream_slug",
            )
        return EnforceResult("would add", 0, f"--enforce would add and validate {CHECK_NAME}")
    if row is not None and row["convalidated"]:
        return EnforceResult("already", remaining, f"{CHECK_NAME} is already enforced")
    if remaining:
        return EnforceResult(
            "refused",
            remaining,
            f"not enforcing: {remaining} batch(es) still have no workstream_slug "
            "(resolve them, or pass --default)",
        )
    try:
        if row is None:
            with tx(conn, lock_timeout=lock_timeout):
                conn.execute(q("backfill_add_check"))
        with tx(conn, lock_timeout=lock_timeout):
            conn.execute(q("backfill_validate_check"))
    except psycopg.errors.CheckViolation:
        with tx(conn, lock_timeout=lock_timeout):
            remaining = scalar(conn.execute(q("backfill_null_total")))
        return EnforceResult(
            "refused",
            remaining,
            f"a batch without workstream_slug appeared meanwhile: {CHECK_NAME} is in place "
            "for new rows (NOT VALID) but not validated; re-run the backfill with --enforce",
        )
    except psycopg.errors.LockNotAvailable:
        return EnforceResult(
            "refused",
            0,
            f"could not lock public.batches within {lock_timeout} to add {CHECK_NAME}; try again",
        )
    except psycopg.errors.DuplicateObject:  # a concurrent --enforce added it first
        return EnforceResult("already", 0, f"{CHECK_NAME} was added concurrently")
    return EnforceResult(
        "added" if row is None else "validated", 0, f"{CHECK_NAME} added and validated"
    )
