"""One dispatch pass over the database, independent of the backend.

Claim (one statement, committed before any spawn) -> resolve by the composite
key (the claim already joined the batch's workstream and the registry row)
-> run/spawn through the backend -> record outcomes in a few set-based
statements guarded by the claim token -> reconcile spawned calls.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from wsctl.db import tx
from wsctl.dispatch.backend import Backend, Failure, Job
from wsctl.domain import infer_workstreams
from wsctl.errors import EnvError, OperationalError
from wsctl.queries import q

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("wsctl.dispatch")


@dataclass
class PassOptions:
    limit: int = 1000
    concurrency: int = 32
    workstream: str | None = None
    lease_seconds: int = 300
    max_attempts: int = 5
    callback_timeout: int = 3600
    reconcile: bool = True
    reconcile_limit: int = 1000
    chunk_size: int = 2500
    claimed_by: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def validate(self) -> None:
        from wsctl.errors import UsageError

        for name in ("limit", "concurrency", "lease_seconds", "max_attempts", "chunk_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.callback_timeout < 1:
            raise UsageError("callback timeout must be at least 1 second")


@dataclass
class PassSummary:
    claimed: int = 0
    dispatched: int = 0
    completed: int = 0
    blocked: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    cancelled: int = 0
    reconciled: int = 0
    seconds: float = 0.0
    backend: str = ""
    errors: list[dict] = field(default_factory=list)  # a sample of blocked/failed rows

    @property
    def ok(self) -> bool:
        return self.blocked == 0 and self.failed == 0

    def to_json(self) -> dict:
        return asdict(self)


def backoff_seconds(attempts: int) -> float:
    """Exponential backoff with jitter: ~5 s, 10 s, 20 s ... capped at 15 minutes."""
    base = min(900.0, 5.0 * (2 ** max(0, attempts)))
    return base * random.uniform(0.5, 1.5)


_ERROR_SAMPLE = 20


def _note(summary: PassSummary, state_id, item_id, status: str, reason: str) -> None:
    if len(summary.errors) < _ERROR_SAMPLE:
        summary.errors.append(
            {"state_id": str(state_id), "item_id": str(item_id), "status": status, "reason": reason}
        )


def _blocked_reasons(conn: psycopg.Connection, rows: list[tuple]) -> dict:
    """Reasons for claimed rows that cannot be resolved by (step, workstream)."""
    missing_ws = {r[2] for r in rows if r[5] is None}
    inferred = infer_workstreams(conn, list(missing_ws)) if missing_ws else {}
    reasons = {}
    for r in rows:
        state_id, _item, batch_id, step, _att, ws = r[:6]
        if ws is None:
            inf = inferred.get(batch_id)
            advice = (
                f"`wsctl backfill workstream-slug` would set {inf.workstream}"
                if inf is not None and inf.workstream
                else f"the backfill cannot infer it ({inf.reason if inf else 'unknown batch'})"
            )
            reasons[state_id] = f"batch {batch_id} has no workstream_slug; {advice}"
        else:
            reasons[state_id] = (
                f"no enrichment_registry row for (step={step}, workstream={ws}); "
                "never falling back to another workstream's function"
            )
    return reasons


def _claim_statement(workstream: str | None):
    from psycopg import sql

    scope = sql.SQL(q("dispatch_claim_scope_workstream") if workstream else "")
    return sql.SQL(q("dispatch_claim")).format(scope=scope)


def _claim(conn: psycopg.Connection, opts: PassOptions, n: int, token: uuid.UUID) -> list[tuple]:
    with tx(conn):
        return conn.execute(
            _claim_statement(opts.workstream),
            {
                "limit": n,
                "token": token,
                "lease_seconds": opts.lease_seconds,
                "claimed_by": opts.claimed_by,
                "workstream": opts.workstream,
            },
        ).fetchall()


@dataclass
class _Outcomes:
    """What one claimed chunk came to, ready to be recorded set-based."""

    token: uuid.UUID
    complete_ids: list = field(default_factory=list)
    sent_ids: list = field(default_factory=list)
    sent_calls: list = field(default_factory=list)
    retry_ids: list = field(default_factory=list)
    retry_errors: list = field(default_factory=list)
    retry_delays: list = field(default_factory=list)
    block_ids: list = field(default_factory=list)
    block_reasons: list = field(default_factory=list)
    release_ids: list = field(default_factory=list)
    cancel_ids: list = field(default_factory=list)
    fail_ids: list = field(default_factory=list)
    fail_reasons: list = field(default_factory=list)
    items: dict = field(default_factory=dict)
    pass_failure: Failure | None = None


class _LeaseKeeper:
    """Renews a chunk's leases while its functions run (on the claim connection,
    idle meanwhile), so a chunk that outlives its lease is not reclaimed and run
    twice by another dispatcher. A dispatcher that dies stops renewing."""

    def __init__(self, conn: psycopg.Connection, token: uuid.UUID, lease_seconds: int):
        self.conn, self.token, self.lease = conn, token, lease_seconds
        self.every = max(0.5, lease_seconds / 3)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="wsctl-lease", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                with tx(self.conn):
                    self.conn.execute(q("dispatch_renew_lease"), (self.lease, self.token))
            except Exception as exc:  # the pass itself reports database trouble
                log.warning("could not renew the lease of claim %s: %s", self.token, exc)
                return

    def __enter__(self) -> _LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _run_chunk(
    conn: psycopg.Connection, backend: Backend, opts: PassOptions, rows: list[tuple], token
) -> _Outcomes:
    """Resolve and dispatch one claimed chunk; classify every result (no writes)."""
    out = _Outcomes(token=token, items={r[0]: r[1] for r in rows})
    runnable = []
    for r in rows:
        if r[9]:  # the batch was cancelled: never dispatched
            out.cancel_ids.append(r[0])
        elif r[10] and r[4] >= opts.max_attempts:
            out.fail_ids.append(r[0])
            out.fail_reasons.append(
                f"its dispatcher's lease expired while it ran, {r[4]} attempt(s) of "
                f"{opts.max_attempts}: FAILED (does it crash or outlive the lease?)"
            )
        else:
            runnable.append(r)
    unresolved = [r for r in runnable if r[5] is None or r[6] is None]
    reasons = _blocked_reasons(conn, unresolved) if unresolved else {}
    jobs = [Job(r[0], str(r[1]), r[3], r[5], r[7], r[6]) for r in runnable if r[0] not in reasons]
    out.block_ids = list(reasons)
    out.block_reasons = [reasons[i] for i in out.block_ids]

    if jobs:
        with _LeaseKeeper(conn, token, opts.lease_seconds):
            results = backend.dispatch(jobs, opts.concurrency)
    else:
        results = []

    attempts = {r[0]: r[4] for r in rows}
    verbose = log.isEnabledFor(logging.INFO)
    inline = backend.runs_inline
    for job, res in zip(jobs, results, strict=True):
        if res is None or isinstance(res, str):
            if inline and job.type == "sync":
                out.complete_ids.append(job.state_id)
            else:
                out.sent_ids.append(job.state_id)
                out.sent_calls.append(res)
            if verbose:
                log.info(
                    "Dispatched item %s... to %s (type=%s, workstream=%s)",
                    job.item_id[:8],
                    job.function,
                    job.type,
                    job.workstream_slug,
                )
        elif res.kind == "transient":
            out.retry_ids.append(job.state_id)
            out.retry_errors.append(res.message)
            out.retry_delays.append(backoff_seconds(attempts[job.state_id]))
        elif res.kind == "item":
            out.block_ids.append(job.state_id)
            out.block_reasons.append(res.message)
        else:
            out.pass_failure = out.pass_failure or res
            out.release_ids.append(job.state_id)
    return out


def _record(conn: psycopg.Connection, out: _Outcomes, opts: PassOptions) -> PassSummary:
    """Write one chunk's outcomes in one transaction; returns the counts it adds."""
    delta = PassSummary()
    token = out.token
    with tx(conn):
        # `dispatched` counts the calls made (they happened, whatever is recorded);
        # `completed` and the others count the rows the token-guarded statements
        # changed (a stale claim changes none). A sent state may already be
        # COMPLETED by its receiver (a fast callback): recording skips it.
        delta.dispatched += len(out.complete_ids) + len(out.sent_ids)
        if out.complete_ids:
            done = conn.execute(q("dispatch_complete_claimed"), (out.complete_ids, token))
            delta.completed += done.fetchone()[0]
        if out.sent_ids:
            conn.execute(q("dispatch_mark_dispatched"), (out.sent_ids, out.sent_calls, token))
        if out.retry_ids:
            rows = conn.execute(
                q("dispatch_retry_or_fail"),
                {
                    "ids": out.retry_ids,
                    "errors": out.retry_errors,
                    "delays": out.retry_delays,
                    "token": token,
                    "max_attempts": opts.max_attempts,
                },
            ).fetchall()
            _tally_retries(
                delta, rows, dict(zip(out.retry_ids, out.retry_errors, strict=True)), out.items
            )
        if out.block_ids:
            blocked = conn.execute(
                q("dispatch_block"), (out.block_ids, out.block_reasons, token)
            ).fetchall()
            delta.blocked += len(blocked)
            for state_id, reason in zip(out.block_ids, out.block_reasons, strict=True):
                _note(delta, state_id, out.items[state_id], "BLOCKED", reason)
        if out.fail_ids:
            failed = conn.execute(
                q("dispatch_fail_claimed"), (out.fail_ids, out.fail_reasons, token)
            ).fetchall()
            delta.failed += len(failed)
            for state_id, reason in zip(out.fail_ids, out.fail_reasons, strict=True):
                _note(delta, state_id, out.items[state_id], "FAILED", reason)
        if out.cancel_ids:
            delta.cancelled += len(
                conn.execute(q("dispatch_cancel_claimed"), (out.cancel_ids, token)).fetchall()
            )
        if out.release_ids:
            released = conn.execute(q("dispatch_release"), (out.release_ids, token))
            delta.released += released.rowcount
    return delta


def _tally_retries(summary: PassSummary, rows: list[tuple], errors: dict, items: dict) -> int:
    """Count what a retry statement returned: (state_id, PENDING|FAILED) rows."""
    for state_id, status in rows:
        if status == "FAILED":
            summary.failed += 1
            _note(summary, state_id, items.get(state_id, ""), "FAILED", errors[state_id])
        else:
            summary.retried += 1
            _note(summary, state_id, items.get(state_id, ""), "RETRY", errors[state_id])
    return len(rows)


def _merge(summary: PassSummary, delta: PassSummary) -> None:
    for name in (
        "dispatched",
        "completed",
        "blocked",
        "retried",
        "failed",
        "released",
        "cancelled",
    ):
        setattr(summary, name, getattr(summary, name) + getattr(delta, name))
    room = _ERROR_SAMPLE - len(summary.errors)
    if room > 0:
        summary.errors.extend(delta.errors[:room])


def reconcile(
    conn: psycopg.Connection, backend: Backend, opts: PassOptions, summary: PassSummary
) -> None:
    """Poll spawned calls (bounded), then fail what outlived the callback timeout."""
    if not backend.runs_inline:
        with tx(conn):
            rows = conn.execute(
                q("dispatch_reconcile_candidates"),
                {"workstream": opts.workstream, "limit": opts.reconcile_limit},
            ).fetchall()
        if rows:
            polls = backend.poll([r[3] for r in rows])
            done, done_calls, sent, sent_calls = [], [], [], []
            retry_ids, retry_calls, retry_errors, retry_delays = [], [], [], []
            items = {r[0]: r[1] for r in rows}
            for state_id, _item, _step, call_id, attempts, typ, _ws, _fn in rows:
                p = polls.get(call_id)
                if p is None:
                    continue
                if p.state == "returned" and typ == "sync":
                    done.append(state_id)
                    done_calls.append(call_id)
                elif p.state == "returned":
                    sent.append(state_id)  # an async sender: its receiver completes the step
                    sent_calls.append(call_id)
                elif p.state == "raised":
                    retry_ids.append(state_id)
                    retry_calls.append(call_id)
                    retry_errors.append(p.error or "the Modal call raised")
                    retry_delays.append(backoff_seconds(attempts))
            with tx(conn):
                # Each statement checks the row still holds the polled call id:
                # another dispatcher may have reconciled and re-spawned it since.
                if done:
                    n = conn.execute(
                        q("dispatch_reconcile_complete"), (done, done_calls)
                    ).fetchone()[0]
                    summary.completed += n
                    summary.reconciled += n
                if sent:
                    conn.execute(q("dispatch_sender_returned"), (sent, sent_calls))
                if retry_ids:
                    out = conn.execute(
                        q("dispatch_reconcile_retry"),
                        {
                            "ids": retry_ids,
                            "calls": retry_calls,
                            "errors": retry_errors,
                            "delays": retry_delays,
                            "max_attempts": opts.max_attempts,
                        },
                    ).fetchall()
                    summary.reconciled += _tally_retries(
                        summary, out, dict(zip(retry_ids, retry_errors, strict=True)), items
                    )
    with tx(conn):
        timed_out = conn.execute(
            q("dispatch_callback_timeouts"),
            {
                "timeout": opts.callback_timeout,
                "workstream": opts.workstream,
                "limit": opts.reconcile_limit,
            },
        ).fetchall()
    for (state_id,) in timed_out:
        summary.failed += 1
        summary.reconciled += 1
        _note(summary, state_id, "", "FAILED", "callback timeout")


def run_pass(
    conn: psycopg.Connection,
    backend: Backend,
    opts: PassOptions,
    *,
    writer_conn: psycopg.Connection | None = None,
) -> PassSummary:
    """One dispatch pass. ``conn`` is autocommit; the backend is set up before any claim.

    With ``writer_conn`` (a second connection), each chunk's outcomes are
    recorded on it in a background thread while the next chunk is claimed
    and dispatched: claims still commit before any spawn, and at most one
    chunk's write is outstanding. ``seconds`` runs from the first statement
    of the pass (reconcile, then the first claim) to the last commit: set-up,
    connecting and importing the app are excluded.
    """
    opts.validate()
    summary = PassSummary(backend=backend.name)
    backend.setup()  # a misconfiguration fails even when nothing is due
    started = time.perf_counter()
    remaining = opts.limit
    failure: Failure | None = None
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
            _merge(summary, done.result())

    try:
        if opts.reconcile:
            # First, so that steps completed by reconciliation have their next
            # step enqueued and dispatched in this same pass.
            reconcile(conn, backend, opts, summary)
        tail = False
        while remaining > 0:
            if tail:
                settle()  # the last write may have enqueued next steps: let them be seen
            # A short tail chunk would cost a partial round of the thread pool
            # for its whole duration: up to twice the chunk size goes in one.
            n = remaining if remaining <= 2 * opts.chunk_size else opts.chunk_size
            token = uuid.uuid4()
            rows = _claim(conn, opts, n, token)
            if not rows and pending is not None:
                settle()
                rows = _claim(conn, opts, n, token)
            if not rows:
                break
            summary.claimed += len(rows)
            remaining -= len(rows)
            out = _run_chunk(conn, backend, opts, rows, token)
            settle()
            if writer is not None and out.pass_failure is None:
                pending = writer.submit(_record, writer_conn, out, opts)
            else:
                _merge(summary, _record(conn, out, opts))
            if out.pass_failure is not None:
                failure = out.pass_failure
                break
            # A short chunk means nothing more is due, unless completions just
            # enqueued next steps: those are due now, in this same pass.
            tail = len(rows) < n
            if tail and not out.complete_ids:
                break
        settle()
    finally:
        if writer is not None:
            writer.shutdown(wait=True)
        summary.seconds = round(time.perf_counter() - started, 6)
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


def plan(
    conn: psycopg.Connection, opts: PassOptions, backend: Backend | None = None
) -> list[PlanRow]:
    """What a pass would do (``--dry-run``): nothing is claimed or written."""
    with tx(conn):
        rows = conn.execute(
            q("dispatch_plan"), {"limit": opts.limit, "workstream": opts.workstream}
        ).fetchall()
        unresolved = [r for r in rows if r[5] is None or r[6] is None]
        reasons = _blocked_reasons(conn, unresolved) if unresolved else {}
    out = []
    for r in rows:
        reason = "its batch was cancelled: it would be CANCELLED" if r[9] else reasons.get(r[0])
        if reason is None and backend is not None and backend.has_function(r[7]) is False:
            reason = f"function {r[7]} not found in the app"
        out.append(PlanRow(str(r[0]), str(r[1]), r[3], r[5], r[7], r[6], reason))
    return out


def retry_states(
    conn: psycopg.Connection, batch_id, *, step: str | None = None, statuses: list[str]
) -> int:
    """Put a batch's BLOCKED/FAILED states back to PENDING after the cause was fixed."""
    with tx(conn):
        row = conn.execute(q("dispatch_batch_status"), (batch_id,)).fetchone()
        if row is None:
            raise OperationalError(f"no batch with id {batch_id}")
        if row[0] == "CANCELLED":
            raise OperationalError(
                f"batch {batch_id} is CANCELLED: its states are never dispatched again"
            )
        return len(
            conn.execute(
                q("dispatch_retry_states"),
                {"batch_id": batch_id, "statuses": statuses, "step": step},
            ).fetchall()
        )
