"""One dispatch pass over the database, independent of the backend.

Replay the journal (outcomes an earlier pass could not record) -> reconcile
spawned calls -> claim (one statement, committed before any spawn; every
claim increments the state's dispatch generation) -> resolve by the
composite key (the claim already joined the batch's workstream and the
registry row) -> run/spawn through the backend -> journal the outcomes
(fsynced) -> record them in a few set-based statements guarded by the claim
token, retried on a fresh connection while the lease is renewed.

What each outcome does to a state is ``wsctl.states.TRANSITIONS``; failures
are classified by ``wsctl.states.REASONS``.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.dispatch.backend import (
    NOT_STARTED,
    STILL_RUNNING,
    Backend,
    Failure,
    Job,
    Run,
    Stopping,
    _Unfinished,
)
from wsctl.domain import infer_workstreams
from wsctl.errors import EnvError, NotFound, OperationalError, WsctlError
from wsctl.queries import q
from wsctl.redact import first_line
from wsctl.settings import DEFAULT_DISPATCH
from wsctl.states import (
    FAILURE_OUTCOMES,
    OUTCOME_STATUS,
    REASONS,
    ErrorClass,
    Outcome,
    Reason,
    Status,
)

if TYPE_CHECKING:
    import psycopg

    from wsctl.dispatch.journal import Journal, JournaledChunk
    from wsctl.dispatch.pacing import Pacer

log = logging.getLogger("wsctl.dispatch")

Connect = Callable[[], "psycopg.Connection"]


_D = DEFAULT_DISPATCH  # the one source of the dispatch defaults (settings.DispatchSettings)


@dataclass
class PassOptions:
    limit: int = _D.limit
    concurrency: int = _D.concurrency
    workstream: str | None = None
    lease_seconds: int = _D.lease_seconds
    max_attempts: int = _D.max_attempts
    callback_timeout: int = _D.callback_timeout
    reconcile: bool = True
    reconcile_limit: int = 1000
    chunk_size: int = 2500
    #: how long recording a chunk's outcomes is retried on fresh connections
    record_retry_seconds: float = _D.record_retry_seconds
    #: the pass stops claiming (and starting functions) this long after it began
    max_seconds: float = _D.max_seconds
    #: once stopping, running functions get this long to finish
    grace: float = _D.grace
    claimed_by: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def validate(self) -> None:
        from wsctl.errors import UsageError

        for name in ("limit", "concurrency", "lease_seconds", "max_attempts", "chunk_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.callback_timeout < 1:
            raise UsageError("callback timeout must be at least 1 second")
        if self.record_retry_seconds < 0:
            raise UsageError("record_retry_seconds must be zero or more")
        if self.max_seconds <= 0:
            raise UsageError("--max-seconds must be more than 0")
        if self.grace < 0:
            raise UsageError("--grace must be zero or more seconds")


# -- Rows, read by name ------------------------------------------------------


@dataclass(slots=True)
class ClaimRow:
    """One row of ``dispatch_claim`` (and of ``dispatch_plan``, which has the same columns)."""

    id: uuid.UUID
    item_id: uuid.UUID
    batch_id: uuid.UUID
    step_name: str
    attempts: int
    dispatch_generation: int
    workstream_slug: str | None
    type: str | None
    modal_sender_fn: str | None
    modal_receiver_fn: str | None
    batch_cancelled: bool
    reclaimed: bool


@dataclass(slots=True)
class ReconcileRow:
    id: uuid.UUID
    item_id: uuid.UUID
    step_name: str
    modal_call_id: str
    attempts: int
    type: str | None


@dataclass(slots=True)
class TimeoutCandidate:
    id: uuid.UUID
    item_id: uuid.UUID
    modal_call_id: str | None
    type: str | None


def by_name(cls: type) -> Callable[[Any], Callable[[Any], Any]]:
    """A psycopg row factory that builds ``cls`` from the columns of the same names.

    Like ``psycopg.rows.class_row`` (a column ``cls`` has no field for is an
    error, as is a missing one), but the name-to-position mapping is worked
    out once per result from the cursor's description, and each row is then
    built positionally: no dict per row on the claim's hot path.
    """
    from dataclasses import fields

    names = [f.name for f in fields(cls)]

    def factory(cursor: Any) -> Callable[[Any], Any]:
        desc = cursor.description or []
        cols = [d.name for d in desc]
        if sorted(cols) != sorted(names):
            raise TypeError(f"{cls.__name__} needs columns {names}, the query returns {cols}")
        order = [cols.index(n) for n in names]
        if order == list(range(len(names))):
            return lambda values: cls(*values)
        return lambda values: cls(*[values[i] for i in order])

    return factory


@dataclass(slots=True)
class _Changed:
    """A row a guarded UPDATE changed (``RETURNING ws.id``)."""

    id: uuid.UUID


@dataclass(slots=True)
class _ChangedStatus:
    """``RETURNING ws.id, ws.status`` of the retry statement."""

    id: uuid.UUID
    status: str


@dataclass(slots=True)
class _Completed:
    """``SELECT wsctl.complete_steps(...) AS completed``."""

    completed: int | None


@dataclass(slots=True)
class _TimedOut:
    id: uuid.UUID
    item_id: uuid.UUID
    last_error: str


def _read(conn: psycopg.Connection, cls: type, query: str, params: Any) -> list[Any]:
    """Run ``query`` and read its rows by name into ``cls``."""
    with conn.cursor(row_factory=by_name(cls)) as cur:
        cur.execute(q(query), params)
        return cur.fetchall()


def _count(conn: psycopg.Connection, query: str, params: Any) -> int:
    rows = _read(conn, _Completed, query, params)
    return (rows[0].completed or 0) if rows else 0


# -- What a pass reports -----------------------------------------------------

_ERROR_SAMPLE = 20


@dataclass
class PassSummary:
    """Counts per outcome (``wsctl.states.Outcome``), failure lines and what recording met.

    ``summary.completed`` and the other outcome names read ``counts``. Failure
    lines (RETRY, BLOCKED, FAILED) are kept up to ``_ERROR_SAMPLE``;
    ``failures_total`` and ``reason_counts`` count them all.
    """

    claimed: int = 0
    reconciled: int = 0
    seconds: float = 0.0
    backend: str = ""
    counts: Counter[Outcome] = field(default_factory=Counter)
    errors: list[dict[str, str]] = field(default_factory=list)
    failures_total: int = 0
    reason_counts: Counter[str] = field(default_factory=Counter)
    #: recording: attempts beyond the first, chunks replayed from the journal, notices
    record_retries: int = 0
    replayed: int = 0
    notices: list[str] = field(default_factory=list)
    #: why the pass stopped early ("SIGTERM", "SIGINT", "max_seconds"), and the
    #: functions still running when the grace ended (their claims wait for their lease)
    stopped_by: str | None = None
    left_to_lease: int = 0
    #: states the limits held back, per limit key (distinct states, still PENDING)
    deferred: dict[str, int] = field(default_factory=dict)
    #: seconds the pass waited for limits (tokens, free slots)
    paced_seconds: float = 0.0

    def __getattr__(self, name: str) -> int:
        try:
            return self.counts[Outcome(name)]
        except ValueError:
            raise AttributeError(name) from None

    def add(self, outcome: Outcome, n: int = 1) -> None:
        self.counts[outcome] += n

    @property
    def ok(self) -> bool:
        return self.counts[Outcome.BLOCKED] == 0 and self.counts[Outcome.FAILED] == 0

    def note(self, state_id: Any, item_id: Any, status: str, message: str, code: str) -> None:
        self.failures_total += 1
        self.reason_counts[code] += 1
        if len(self.errors) < _ERROR_SAMPLE:
            self.errors.append(
                {
                    "state_id": str(state_id),
                    "item_id": str(item_id),
                    "status": status,
                    "reason_code": code,
                    "reason": message,
                }
            )

    def merge(self, delta: PassSummary) -> None:
        self.counts.update(delta.counts)
        self.failures_total += delta.failures_total
        self.reason_counts.update(delta.reason_counts)
        self.record_retries += delta.record_retries
        self.replayed += delta.replayed
        self.notices.extend(delta.notices)
        room = _ERROR_SAMPLE - len(self.errors)
        if room > 0:
            self.errors.extend(delta.errors[:room])

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"claimed": self.claimed}
        doc.update({o.value: self.counts[o] for o in Outcome})
        doc.update(
            reconciled=self.reconciled,
            seconds=self.seconds,
            backend=self.backend,
            errors=self.errors,
            errors_total=self.failures_total,
            errors_not_shown=self.failures_total - len(self.errors),
            reason_counts=dict(sorted(self.reason_counts.items())),
            record_retries=self.record_retries,
            replayed=self.replayed,
            notices=self.notices,
            stopped_by=self.stopped_by,
            left_to_lease=self.left_to_lease,
            deferred=dict(sorted(self.deferred.items())),
            paced_seconds=round(self.paced_seconds, 3),
        )
        return doc


def backoff_seconds(attempts: int) -> float:
    """Exponential backoff with jitter: ~5 s, 10 s, 20 s ... capped at 15 minutes."""
    base = min(900.0, 5.0 * (2 ** max(0, attempts)))
    return base * random.uniform(0.5, 1.5)


def _blocked_reasons(
    conn: psycopg.Connection, rows: list[ClaimRow]
) -> dict[uuid.UUID, tuple[Reason, str]]:
    """Reasons for claimed rows that cannot be resolved by (step, workstream)."""
    missing_ws = {r.batch_id for r in rows if r.workstream_slug is None}
    inferred = infer_workstreams(conn, list(missing_ws)) if missing_ws else {}
    reasons = {}
    for r in rows:
        if r.workstream_slug is None:
            inf = inferred.get(r.batch_id)
            advice = (
                f"`wsctl backfill workstream-slug` would set {inf.workstream}"
                if inf is not None and inf.workstream
                else f"the backfill cannot infer it ({inf.reason if inf else 'unknown batch'})"
            )
            reasons[r.id] = (
                REASONS["no_workstream"],
                f"batch {r.batch_id} has no workstream_slug; {advice}",
            )
        else:
            reasons[r.id] = (
                REASONS["no_registry_row"],
                f"no enrichment_registry row for (step={r.step_name}, "
                f"workstream={r.workstream_slug}); never falling back to another workstream's "
                "function",
            )
    return reasons


def claim_parts() -> dict[str, Any]:
    """The fragments every claim statement is composed with: its transition and its rows."""
    from psycopg import sql

    return {"flip": sql.SQL(q("dispatch_claim_flip")), "rows": sql.SQL(q("dispatch_claim_rows"))}


def _claim_statement(workstream: str | None):
    from psycopg import sql

    scope = sql.SQL(q("dispatch_claim_scope_workstream") if workstream else "")
    return sql.SQL(q("dispatch_claim")).format(scope=scope, **claim_parts())


def _claim(conn: psycopg.Connection, opts: PassOptions, n: int, token: uuid.UUID) -> list[ClaimRow]:
    with tx(conn), conn.cursor(row_factory=by_name(ClaimRow)) as cur:
        cur.execute(
            _claim_statement(opts.workstream),
            {
                "limit": n,
                "token": token,
                "lease_seconds": opts.lease_seconds,
                "claimed_by": opts.claimed_by,
                "workstream": opts.workstream,
            },
        )
        return cur.fetchall()


# -- One chunk's outcomes, grouped by outcome --------------------------------


@dataclass(slots=True)
class Entry:
    """One state's outcome: what recording writes, and what the journal keeps."""

    state_id: uuid.UUID
    generation: int
    item_id: str = ""
    message: str | None = None
    reason: Reason | None = None
    delay: float = 0.0
    call_id: str | None = None


@dataclass
class _Chunk:
    """What one claimed chunk came to, ready to be recorded set-based."""

    token: uuid.UUID
    groups: dict[Outcome, list[Entry]] = field(default_factory=dict)
    pass_failure: Failure | None = None
    left_to_lease: int = 0

    def add(self, outcome: Outcome, entry: Entry) -> None:
        self.groups.setdefault(outcome, []).append(entry)

    def ids(self, outcome: Outcome) -> list[uuid.UUID]:
        return [e.state_id for e in self.groups.get(outcome, ())]

    def size(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def to_journal(self) -> dict[str, dict[str, Any]]:
        """The groups as columns: ids (16-byte UUIDs, base64), generations, and only
        the columns a group has (calls for DISPATCHED; item, message, reason code
        and delay for the failures). Cheap enough for every chunk of every pass."""
        import base64

        out: dict[str, dict[str, Any]] = {}
        for outcome, entries in self.groups.items():
            col: dict[str, Any] = {
                "ids": base64.b64encode(b"".join([e.state_id.bytes for e in entries])).decode(),
                "gens": [e.generation for e in entries],
            }
            if outcome is Outcome.DISPATCHED:
                col["calls"] = [e.call_id for e in entries]
            elif outcome in (Outcome.RETRIED, Outcome.BLOCKED, Outcome.FAILED):
                col["items"] = [e.item_id for e in entries]
                col["messages"] = [e.message for e in entries]
                col["codes"] = [e.reason.code if e.reason else None for e in entries]
                col["delays"] = [e.delay for e in entries]
            out[outcome.value] = col
        return out

    @classmethod
    def from_journal(cls, chunk: JournaledChunk) -> _Chunk:
        import base64

        out = cls(token=chunk.token)
        for name, col in chunk.groups.items():
            outcome = Outcome(name)
            raw = base64.b64decode(col["ids"])
            ids = [uuid.UUID(bytes=raw[i : i + 16]) for i in range(0, len(raw), 16)]
            n = len(ids)
            calls = col.get("calls") or [None] * n
            items = col.get("items") or [""] * n
            messages = col.get("messages") or [None] * n
            codes = col.get("codes") or [None] * n
            delays = col.get("delays") or [0.0] * n
            for i, sid in enumerate(ids):
                code = codes[i]
                out.add(
                    outcome,
                    Entry(
                        sid,
                        int(col["gens"][i]),
                        items[i],
                        messages[i],
                        REASONS.get(code) if code else None,
                        float(delays[i]),
                        calls[i],
                    ),
                )
        return out

    def only(self, ids: set[uuid.UUID]) -> _Chunk:
        """The same chunk restricted to ``ids`` (the fenced replay)."""
        out = _Chunk(token=self.token)
        for outcome, entries in self.groups.items():
            kept = [e for e in entries if e.state_id in ids]
            if kept:
                out.groups[outcome] = kept
        return out


class _LeaseKeeper:
    """Renews a chunk's leases while its functions run (on the claim connection,
    idle meanwhile), so a chunk that outlives its lease is not reclaimed and run
    twice by another dispatcher. A dispatcher that dies stops renewing; one whose
    connection was lost renews on a fresh one (``connect``) at the next tick."""

    def __init__(
        self,
        conn: psycopg.Connection,
        token: uuid.UUID,
        lease_seconds: int,
        connect: Connect | None = None,
    ):
        self.conn, self.token, self.lease, self.connect = conn, token, lease_seconds, connect
        self.every = max(0.5, lease_seconds / 3)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="wsctl-lease", daemon=True)
        self._own: psycopg.Connection | None = None

    def _run(self) -> None:
        conn = self.conn
        while not self.stop.wait(self.every):
            try:
                if conn.closed or conn.broken:
                    if self.connect is None:
                        return
                    conn = self._own = self.connect()
                with tx(conn):
                    conn.execute(q("dispatch_renew_lease"), (self.lease, self.token))
            except Exception as exc:  # the pass itself reports database trouble
                log.warning("could not renew the lease of claim %s: %s", self.token, exc)
                if self.connect is None:
                    return

    def __enter__(self) -> _LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self._own is not None:
            self._own.close()


def _failure_outcome(failure: Failure) -> Outcome:
    return failure.reason.outcome


def _run_chunk(
    conn: psycopg.Connection,
    backend: Backend,
    opts: PassOptions,
    rows: list[ClaimRow],
    token: uuid.UUID,
    stopping: Stopping | None = None,
    connect: Connect | None = None,
) -> _Chunk:
    """Resolve and dispatch one claimed chunk; classify every result (no writes)."""
    out = _Chunk(token=token)
    runnable: list[ClaimRow] = []
    for r in rows:
        if r.batch_cancelled:  # the batch was cancelled: never dispatched
            out.add(Outcome.CANCELLED, Entry(r.id, r.dispatch_generation, str(r.item_id)))
        elif r.reclaimed and r.attempts >= opts.max_attempts:
            out.add(
                Outcome.FAILED,
                Entry(
                    r.id,
                    r.dispatch_generation,
                    str(r.item_id),
                    f"its dispatcher's lease expired while it ran, {r.attempts} attempt(s) of "
                    f"{opts.max_attempts}: FAILED (does it crash or outlive the lease?)",
                    REASONS["lease_expired"],
                ),
            )
        else:
            runnable.append(r)
    unresolved = [r for r in runnable if r.workstream_slug is None or r.type is None]
    reasons = _blocked_reasons(conn, unresolved) if unresolved else {}
    for r in unresolved:
        why, message = reasons[r.id]
        out.add(why.outcome, Entry(r.id, r.dispatch_generation, str(r.item_id), message, why))
    claimed = {r.id: r for r in runnable if r.id not in reasons}
    jobs = [
        Job(r.id, str(r.item_id), r.step_name, r.workstream_slug, r.modal_sender_fn, r.type)  # type: ignore[arg-type]
        for r in claimed.values()
    ]

    if jobs:
        with _LeaseKeeper(conn, token, opts.lease_seconds, connect):
            results = backend.dispatch(jobs, Run(opts.concurrency, stopping, opts.grace))
    else:
        results = []

    verbose = log.isEnabledFor(logging.INFO)
    inline = backend.runs_inline
    for job, res in zip(jobs, results, strict=True):
        row = claimed[job.state_id]  # type: ignore[index]
        if res is NOT_STARTED:  # stopping: the claim goes back, attempts unchanged
            out.add(Outcome.RELEASED, Entry(row.id, row.dispatch_generation))
        elif res is STILL_RUNNING:  # outlived the grace: left to its lease
            out.left_to_lease += 1
        elif res is None or isinstance(res, str):
            if inline and job.type == "sync":
                out.add(Outcome.COMPLETED, Entry(row.id, row.dispatch_generation))
            else:
                out.add(Outcome.DISPATCHED, Entry(row.id, row.dispatch_generation, call_id=res))
            if verbose:
                log.info(
                    "Dispatched item %s to %s (type=%s, workstream=%s)",
                    job.item_id,
                    job.function,
                    job.type,
                    job.workstream_slug,
                )
        elif isinstance(res, _Unfinished):  # pragma: no cover - only the two above exist
            raise AssertionError(res)
        elif res.stops_pass:
            out.pass_failure = out.pass_failure or res
            out.add(Outcome.RELEASED, Entry(row.id, row.dispatch_generation))
        else:
            delay = (
                res.retry_after if res.retry_after is not None else backoff_seconds(row.attempts)
            )
            out.add(
                _failure_outcome(res),
                Entry(row.id, row.dispatch_generation, job.item_id, res.message, res.reason, delay),
            )
    return out


def _retry_params(entries: list[Entry], token: uuid.UUID | None, opts: PassOptions) -> dict:
    return {
        "ids": [e.state_id for e in entries],
        "calls": [e.call_id for e in entries],
        "errors": [e.message for e in entries],
        "classes": [e.reason.error_class if e.reason else None for e in entries],
        "codes": [e.reason.code if e.reason else None for e in entries],
        "delays": [e.delay for e in entries],
        "counted": [e.reason.counts_attempt if e.reason else True for e in entries],
        "token": token,
        "max_attempts": opts.max_attempts,
    }


def _tally_retries(summary: PassSummary, rows: list[_ChangedStatus], entries: list[Entry]) -> int:
    """Count what ``dispatch_retry`` returned: (state_id, PENDING|FAILED) rows."""
    by_id = {e.state_id: e for e in entries}
    for row in rows:
        state_id, status = row.id, row.status
        e = by_id[state_id]
        code = e.reason.code if e.reason else "unexpected_error"
        if status == Status.FAILED:
            summary.add(Outcome.FAILED)
            summary.note(state_id, e.item_id, Status.FAILED, e.message or "", code)
        else:
            summary.add(Outcome.RETRIED)
            # a retry's line says RETRY (its state is PENDING again, after a backoff)
            summary.note(state_id, e.item_id, "RETRY", e.message or "", code)
    return len(rows)


def _record(conn: psycopg.Connection, out: _Chunk, opts: PassOptions) -> PassSummary:
    """Write one chunk's outcomes in one transaction; returns the counts it adds.

    One statement per outcome group; every statement is guarded by the claim
    token (a stale claim changes no row).
    """
    delta = PassSummary()
    token = out.token
    with tx(conn):
        # `dispatched` counts the calls made (they happened, whatever is recorded);
        # `completed` and the others count the rows the token-guarded statements
        # changed. A sent state may already be COMPLETED by its receiver (a fast
        # callback): recording skips it.
        groups = out.groups
        delta.add(
            Outcome.DISPATCHED,
            len(groups.get(Outcome.COMPLETED, ())) + len(groups.get(Outcome.DISPATCHED, ())),
        )
        for outcome, entries in groups.items():
            if not entries:
                continue
            ids = [e.state_id for e in entries]
            if outcome is Outcome.COMPLETED:
                delta.add(
                    Outcome.COMPLETED, _count(conn, "dispatch_complete_claimed", (ids, token))
                )
            elif outcome is Outcome.DISPATCHED:
                calls = [e.call_id for e in entries]
                conn.execute(q("dispatch_mark_dispatched"), (ids, calls, token))
            elif outcome is Outcome.RETRIED:
                rows = _read(
                    conn, _ChangedStatus, "dispatch_retry", _retry_params(entries, token, opts)
                )
                _tally_retries(delta, rows, entries)
            elif outcome is Outcome.RELEASED:
                released = conn.execute(q("dispatch_release"), (ids, token))
                delta.add(Outcome.RELEASED, released.rowcount)
            else:  # BLOCKED, FAILED, CANCELLED: one statement, the status a parameter
                status = OUTCOME_STATUS[outcome]
                changed = {
                    r.id
                    for r in _read(
                        conn,
                        _Changed,
                        "dispatch_finish_claimed",
                        {
                            "status": status,
                            "ids": ids,
                            "reasons": [e.message for e in entries],
                            "classes": [
                                e.reason.error_class if e.reason else None for e in entries
                            ],
                            "codes": [e.reason.code if e.reason else None for e in entries],
                            "token": token,
                        },
                    )
                }
                delta.add(outcome, len(changed))
                if outcome in FAILURE_OUTCOMES:
                    for e in entries:
                        if e.state_id in changed:
                            code = e.reason.code if e.reason else "unexpected_error"
                            delta.note(e.state_id, e.item_id, status, e.message or "", code)
    return delta


# -- Recording that survives the database's hiccups --------------------------


class RecordingFailed(OperationalError):
    """A chunk's outcomes could not be recorded within the retry budget (kept journaled)."""


class PassStopped(WsctlError):
    """A pass stopped by a signal: the CLI's exit is 128 + the signal (143, 130)."""

    def __init__(self, message: str, *, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _Recorder:
    """Records chunks: journal first (fsynced once a recording fails), then the database.

    A failed recording (statement timeout, lost connection, restart) is retried
    on a fresh connection with a short backoff for ``record_retry_seconds``,
    the chunk's lease renewed before each retry. When the budget runs out the
    outcomes stay in the journal and ``RecordingFailed`` stops the pass; the
    next pass replays them before it claims.
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        opts: PassOptions,
        connect: Connect | None,
        journal: Journal | None,
    ):
        self.conn, self.opts, self.connect, self.journal = conn, opts, connect, journal
        self.claim_conn: psycopg.Connection | None = None
        self._opened: list[psycopg.Connection] = []

    def _fresh(self) -> psycopg.Connection:
        import contextlib

        assert self.connect is not None
        if self.conn in self._opened or self.conn is not self.claim_conn:
            with contextlib.suppress(Exception):
                self.conn.close()  # never the pass's claim connection: the caller owns it
        self.conn = self.connect()
        self._opened.append(self.conn)
        return self.conn

    def record(self, out: _Chunk) -> PassSummary:
        import psycopg

        if self.journal is not None:
            self.journal.write(out.token, out.to_journal())
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                if attempt:
                    conn = self._fresh()
                    with tx(conn):  # keep the claims ours while recording is retried
                        conn.execute(
                            q("dispatch_renew_lease"), (self.opts.lease_seconds, out.token)
                        )
                delta = _record(self.conn, out, self.opts)
                break
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if self.journal is not None and attempt == 0:
                    self.journal.sync()  # from now on the outcomes survive this host too
                attempt += 1
                first = first_line(exc)
                elapsed = time.monotonic() - started
                if self.connect is None or elapsed >= self.opts.record_retry_seconds:
                    where = (
                        f"kept in the journal {self.journal.path}; the next pass records them "
                        "before it claims"
                        if self.journal is not None
                        else "no journal: they are lost and run again once their lease expires"
                    )
                    raise RecordingFailed(
                        f"recording the outcomes of {out.size()} claimed state(s) failed "
                        f"{attempt} time(s) over {elapsed:.1f}s ({first}); {where}"
                    ) from exc
                log.warning("recording failed (%s); retrying on a fresh connection", first)
                time.sleep(
                    min(2.0, 0.1 * 2**attempt, max(0.0, self.opts.record_retry_seconds - elapsed))
                )
        if attempt:
            delta.record_retries += attempt
            delta.notices.append(
                f"recording {out.size()} outcome(s) failed {attempt} time(s); recorded on a "
                "fresh connection"
            )
        if self.journal is not None:
            self.journal.done(out.token)
        return delta

    def keep(self, out: _Chunk) -> None:
        """Journal a chunk without recording it (the pass is failing: the next one records it)."""
        if self.journal is not None:
            self.journal.write(out.token, out.to_journal(), sync=True)

    def replay(self, summary: PassSummary) -> None:
        """Record what the journal holds from earlier passes, fenced by generation."""
        if self.journal is None:
            return
        fenced = 0

        def apply(chunk: JournaledChunk) -> None:
            nonlocal fenced
            out = _Chunk.from_journal(chunk)
            entries = [e for group in out.groups.values() for e in group]
            with tx(self.conn):
                live = {
                    r.id
                    for r in _read(
                        self.conn,
                        _Changed,
                        "dispatch_journal_fence",
                        (
                            [e.state_id for e in entries],
                            [e.generation for e in entries],
                            out.token,
                        ),
                    )
                }
                kept = out.only(live)
                fenced += len(entries) - len(live)
                delta = _record(self.conn, kept, self.opts)
            delta.counts[Outcome.DISPATCHED] = 0  # those calls were counted by their pass
            summary.merge(delta)

        n = self.journal.replay(apply)
        if n:
            summary.replayed += n
            summary.notices.append(
                f"recorded {n} journaled chunk(s) of an earlier pass"
                + (f" ({fenced} state(s) claimed again since: skipped)" if fenced else "")
            )

    def close(self) -> None:
        for c in self._opened:
            c.close()


# -- Reconciliation ----------------------------------------------------------


def _reconcile_rows(conn: psycopg.Connection, opts: PassOptions) -> list[ReconcileRow]:
    with tx(conn), conn.cursor(row_factory=by_name(ReconcileRow)) as cur:
        cur.execute(
            q("dispatch_reconcile_candidates"),
            {"workstream": opts.workstream, "limit": opts.reconcile_limit},
        )
        rows = cur.fetchall()
        if rows:
            conn.execute(q("dispatch_mark_polled"), ([r.id for r in rows],))
        return rows


def _apply_polls(
    conn: psycopg.Connection,
    backend: Backend,
    opts: PassOptions,
    summary: PassSummary,
    rows: list[ReconcileRow] | list[TimeoutCandidate],
) -> set[uuid.UUID]:
    """Poll the rows' calls and record what returned or raised; returns the ids settled."""
    polls = backend.poll([r.modal_call_id for r in rows if r.modal_call_id])
    done: list[tuple[uuid.UUID, str]] = []
    sent: list[tuple[uuid.UUID, str]] = []
    failed: list[Entry] = []
    for r in rows:
        p = polls.get(r.modal_call_id) if r.modal_call_id else None
        if p is None:
            continue
        if p.state == "returned" and r.type == "sync":
            done.append((r.id, r.modal_call_id))  # type: ignore[arg-type]
        elif p.state == "returned":
            sent.append((r.id, r.modal_call_id))  # type: ignore[arg-type]  # its receiver completes it
        elif p.state == "raised":
            why = p.reason or REASONS["unexpected_error"]
            attempts = getattr(r, "attempts", 0)
            failed.append(
                Entry(
                    r.id,
                    0,
                    str(r.item_id),
                    p.error or "the Modal call raised",
                    why,
                    backoff_seconds(attempts),
                    r.modal_call_id,
                )
            )
    settled: set[uuid.UUID] = set()
    with tx(conn):
        # Each statement checks the row still holds the polled call id:
        # another dispatcher may have reconciled and re-spawned it since.
        if done:
            ids, calls = [d[0] for d in done], [d[1] for d in done]
            n = _count(conn, "dispatch_reconcile_complete", (ids, calls))
            summary.add(Outcome.COMPLETED, n)
            summary.reconciled += n
            settled.update(ids)
        if sent:
            conn.execute(
                q("dispatch_sender_returned"), ([d[0] for d in sent], [d[1] for d in sent])
            )
        if failed:
            # An operator or permanent error of a call is retried like a transient
            # one here only if it is transient; the others end the state at once.
            retry = [e for e in failed if e.reason and e.reason.error_class == ErrorClass.TRANSIENT]
            if retry:
                got = _read(
                    conn, _ChangedStatus, "dispatch_retry", _retry_params(retry, None, opts)
                )
                summary.reconciled += _tally_retries(summary, got, retry)
            for outcome in (Outcome.BLOCKED, Outcome.FAILED):
                group = [e for e in failed if e.reason and e.reason.outcome is outcome]
                if group:
                    changed = _read(
                        conn,
                        _Changed,
                        "dispatch_reconcile_finish",
                        {
                            "status": OUTCOME_STATUS[outcome],
                            "ids": [e.state_id for e in group],
                            "calls": [e.call_id for e in group],
                            "reasons": [e.message for e in group],
                            "classes": [e.reason.error_class for e in group if e.reason],
                            "codes": [e.reason.code for e in group if e.reason],
                        },
                    )
                    ids_changed = {c.id for c in changed}
                    summary.add(outcome, len(ids_changed))
                    summary.reconciled += len(ids_changed)
                    for e in group:
                        if e.state_id in ids_changed and e.reason:
                            summary.note(
                                e.state_id,
                                e.item_id,
                                OUTCOME_STATUS[outcome],
                                e.message or "",
                                e.reason.code,
                            )
            settled.update(e.state_id for e in failed)
    return settled


def reconcile(
    conn: psycopg.Connection, backend: Backend, opts: PassOptions, summary: PassSummary
) -> None:
    """Poll spawned calls, least recently polled first (bounded), then fail what
    outlived the callback timeout, after checking the calls of sync steps."""
    if not backend.runs_inline:
        rows = _reconcile_rows(conn, opts)
        if rows:
            _apply_polls(conn, backend, opts, summary, rows)
    params = {
        "timeout": opts.callback_timeout,
        "workstream": opts.workstream,
        "limit": opts.reconcile_limit,
    }
    with tx(conn), conn.cursor(row_factory=by_name(TimeoutCandidate)) as cur:
        cur.execute(q("dispatch_callback_timeout_candidates"), params)
        candidates = cur.fetchall()
    if not candidates:
        return
    settled: set[uuid.UUID] = set()
    if not backend.runs_inline:
        # A sync step whose call returned is completed, not failed; an async
        # step's sender returning proves nothing: it waits for its callback.
        sync = [c for c in candidates if c.type == "sync" and c.modal_call_id]
        if sync:
            settled = _apply_polls(conn, backend, opts, summary, sync)
    ids = [c.id for c in candidates if c.id not in settled]
    if not ids:
        return
    items = {c.id: c.item_id for c in candidates}
    with tx(conn):
        timed_out = _read(conn, _TimedOut, "dispatch_callback_timeouts", {**params, "ids": ids})
    for t in timed_out:
        summary.add(Outcome.FAILED)
        summary.reconciled += 1
        summary.note(
            t.id, items.get(t.id, t.item_id), Status.FAILED, t.last_error, "callback_timeout"
        )


# -- The pass ----------------------------------------------------------------


def run_pass(
    conn: psycopg.Connection,
    backend: Backend,
    opts: PassOptions,
    *,
    writer_conn: psycopg.Connection | None = None,
    connect: Connect | None = None,
    journal: Journal | None = None,
    stop: threading.Event | None = None,
    stop_reason: Callable[[], str] | None = None,
) -> PassSummary:
    """One dispatch pass. ``conn`` is autocommit; the backend is set up before any claim.

    With ``writer_conn`` (a second connection), each chunk's outcomes are
    recorded on it in a background thread while the next chunk is claimed
    and dispatched: claims still commit before any spawn, and at most one
    chunk's write is outstanding. ``connect`` opens a fresh connection for
    retried recordings; ``journal`` keeps outcomes on disk until they are
    recorded (replayed, fenced, at the start of the next pass). ``seconds``
    runs from the first statement of the pass to the last commit: set-up,
    connecting and importing the app are excluded.

    Stopping: once ``stop`` is set (a signal; ``stop_reason()`` names it) or
    ``opts.max_seconds`` have passed, nothing more is claimed and no further
    function starts; running ones get ``opts.grace`` seconds; the outcomes of
    those that finished are recorded, claims never started go back to
    PENDING (attempts unchanged), and those still running are left to their
    lease (``summary.left_to_lease``).
    """
    opts.validate()
    summary = PassSummary(backend=backend.name)
    backend.setup()  # a misconfiguration fails even when nothing is due
    started = time.perf_counter()
    claim_until = time.monotonic() + opts.max_seconds

    def stopping() -> bool:
        if stop is not None and stop.is_set():
            summary.stopped_by = summary.stopped_by or (stop_reason() if stop_reason else "stop")
            return True
        if time.monotonic() >= claim_until:
            summary.stopped_by = summary.stopped_by or "max_seconds"
            return True
        return False

    remaining = opts.limit
    failure: Failure | None = None
    function_cap = getattr(backend, "function_cap", None)
    pacer: Pacer | None = None  # claims through the limits; decided once, after reconciling
    recorder = _Recorder(writer_conn or conn, opts, connect, journal)
    recorder.claim_conn = conn
    own: list[psycopg.Connection] = []  # claim connections this pass opened after a loss

    def claim_once(n: int, token: uuid.UUID) -> list[ClaimRow]:
        if pacer is None:
            return _claim(conn, opts, n, token)
        return pacer.claim(conn, opts, n, token)

    def claim(n: int, token: uuid.UUID) -> list[ClaimRow]:
        """A claim; once, on a fresh connection when the claim connection was lost."""
        nonlocal conn
        import psycopg

        try:
            return claim_once(n, token)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            if connect is None or not (conn.closed or conn.broken):
                raise
        # The statement never reached a commit we saw: if it did commit, those
        # claims wait for their lease (never run twice), the rest stay PENDING.
        conn = connect()
        own.append(conn)
        summary.notices.append("the claim connection was lost: reconnected")
        return claim_once(n, token)

    def pace() -> bool:
        """Held back by limits with nothing else due: wait for a token or a free slot
        (never past --max-seconds or a stop); False when the pass should end instead."""
        wait = pacer.next_wait() if pacer is not None else None
        if wait is None:
            return False
        if time.monotonic() + wait >= claim_until:
            summary.stopped_by = summary.stopped_by or "max_seconds"
            return False
        began = time.monotonic()
        if stop is not None:
            stop.wait(wait)
        else:
            time.sleep(wait)
        summary.paced_seconds += time.monotonic() - began
        return not stopping()

    writer = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsctl-record")
        if writer_conn
        else None
    )
    pending: Future | None = None

    def settle() -> None:
        nonlocal pending
        if pending is not None:
            done, pending = pending, None
            summary.merge(done.result())

    try:
        recorder.replay(summary)  # before anything is claimed: fenced by generation
        if opts.reconcile:
            # First, so that steps completed by reconciliation have their next
            # step enqueued and dispatched in this same pass.
            reconcile(conn, backend, opts, summary)
        from wsctl.dispatch.pacing import Pacer, applies

        if applies(conn, function_cap):
            pacer = Pacer(function_cap)
        tail = False
        while remaining > 0 and not stopping():
            if tail:
                settle()  # the last write may have enqueued next steps: let them be seen
            # A short tail chunk would cost a partial round of the thread pool
            # for its whole duration: up to twice the chunk size goes in one.
            n = remaining if remaining <= 2 * opts.chunk_size else opts.chunk_size
            token = uuid.uuid4()
            rows = claim(n, token)
            if not rows and pending is not None:
                settle()
                rows = claim(n, token)
            if not rows:
                if pace():
                    tail = False
                    continue
                break
            summary.claimed += len(rows)
            remaining -= len(rows)
            out = _run_chunk(conn, backend, opts, rows, token, stopping, connect)
            summary.left_to_lease += out.left_to_lease
            try:
                settle()
            except RecordingFailed:
                recorder.keep(out)  # this chunk's functions ran too: never forget them
                raise
            if writer is not None and out.pass_failure is None:
                pending = writer.submit(recorder.record, out)
            else:
                summary.merge(recorder.record(out))
            if out.pass_failure is not None:
                failure = out.pass_failure
                break
            # A short chunk means nothing more is due, unless completions just
            # enqueued next steps: those are due now, in this same pass.
            tail = len(rows) < n
            if tail and not out.groups.get(Outcome.COMPLETED) and not (pacer and pacer.holding):
                break
        settle()
    finally:
        if writer is not None:
            writer.shutdown(wait=True)
        recorder.close()
        for c in own:
            c.close()
        summary.seconds = round(time.perf_counter() - started, 6)
        summary.deferred = pacer.deferred() if pacer is not None else {}
    if failure is not None:
        raise EnvError(
            f"dispatch stopped: {failure.message}; {summary.released} unspawned claim(s) "
            "released to PENDING"
        )
    return summary


@dataclass
class PlanRow:
    state_id: str
    item_id: str
    step: str
    workstream: str | None
    function: str | None
    type: str | None
    blocked_reason: str | None
    #: the limit key that would hold it back (it would stay PENDING), if any
    held_by: str | None = None


def due_total(conn: psycopg.Connection, workstream: str | None) -> int:
    """How many states are due now in all (``--dry-run`` shows the first ``--limit``)."""
    from wsctl.queries import named

    with tx(conn), named(conn) as cur:
        row = cur.execute(q("dispatch_plan_due_total"), {"workstream": workstream}).fetchone()
    return int(row["due"]) if row is not None else 0


def plan(
    conn: psycopg.Connection,
    opts: PassOptions,
    backend: Backend | None = None,
    *,
    function_cap: int | None = None,
) -> list[PlanRow]:
    """What a pass would do (``--dry-run``): nothing is claimed or written.

    Rows a limit would hold back now (no token, no free slot) name the key in
    ``held_by``: the limits are read as they stand, not locked or drawn from.
    """
    from wsctl.dispatch import pacing

    with tx(conn), conn.cursor(row_factory=by_name(ClaimRow)) as cur:
        cur.execute(q("dispatch_plan"), {"limit": opts.limit, "workstream": opts.workstream})
        rows = cur.fetchall()
        unresolved = [r for r in rows if r.workstream_slug is None or r.type is None]
        reasons = _blocked_reasons(conn, unresolved) if unresolved else {}
        held: dict[uuid.UUID, str] = {}
        if rows and pacing.applies(conn, function_cap):
            groups = pacing.load_groups(conn, {(r.batch_id, r.step_name) for r in rows})
            limits = pacing.load_limits(conn, groups, function_cap, lock=False)
            adm = limits.admit(
                [pacing.Candidate(r.id, r.batch_id, r.step_name, r.reclaimed) for r in rows]
            )
            for key in sorted(adm.deferred):
                for state_id in adm.deferred[key]:
                    held.setdefault(state_id, key)
    out = []
    for r in rows:
        reason: str | None = (
            "its batch was cancelled: it would be CANCELLED"
            if r.batch_cancelled
            else (reasons[r.id][1] if r.id in reasons else None)
        )
        if (
            reason is None
            and backend is not None
            and r.modal_sender_fn
            and backend.has_function(r.modal_sender_fn) is False
        ):
            reason = f"function {r.modal_sender_fn} not found in the app"
        out.append(
            PlanRow(
                str(r.id),
                str(r.item_id),
                r.step_name,
                r.workstream_slug,
                r.modal_sender_fn,
                r.type,
                reason,
                held.get(r.id),
            )
        )
    return out


@dataclass(slots=True)
class _BatchStatus:
    status: str


def retry_states(
    conn: psycopg.Connection, batch_id, *, step: str | None = None, statuses: list[str]
) -> int:
    """Put a batch's BLOCKED/FAILED states back to PENDING after the cause was fixed."""
    with tx(conn):
        with conn.cursor(row_factory=by_name(_BatchStatus)) as cur:
            row = cur.execute(q("dispatch_batch_status"), (batch_id,)).fetchone()
        if row is None:
            raise NotFound("batch", batch_id)
        if row.status == Status.CANCELLED:
            raise OperationalError(
                f"batch {batch_id} is CANCELLED: its states are never dispatched again"
            )
        return len(
            conn.execute(
                q("dispatch_retry_states"),
                {"batch_id": batch_id, "statuses": statuses, "step": step},
            ).fetchall()
        )
