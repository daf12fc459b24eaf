"""The state machine of a workflow state, in one place.

Every module that names a status, an error class or a reason code imports it
from here; the README's transition table is this module's ``TRANSITIONS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """The ``workflow_states.status`` values (free text in the database)."""

    PENDING = "PENDING"  # due at available_at; waits for a claim
    DISPATCHING = "DISPATCHING"  # claimed: a dispatcher holds its lease
    DISPATCHED = "DISPATCHED"  # spawned at Modal; waits for its call or callback
    COMPLETED = "COMPLETED"  # done; the item's next blueprint step is PENDING
    FAILED = "FAILED"  # permanent failure, or attempts used up
    BLOCKED = "BLOCKED"  # needs an operator (no registry row, missing config ...)
    CANCELLED = "CANCELLED"  # its batch was cancelled


# Display order (batch status, stats, the dashboard).
ORDER: tuple[Status, ...] = (
    Status.PENDING,
    Status.DISPATCHING,
    Status.DISPATCHED,
    Status.COMPLETED,
    Status.FAILED,
    Status.BLOCKED,
    Status.CANCELLED,
)

IN_FLIGHT: frozenset[Status] = frozenset({Status.DISPATCHING, Status.DISPATCHED})
FINISHED: frozenset[Status] = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
NEEDS_OPERATOR: frozenset[Status] = frozenset({Status.BLOCKED, Status.FAILED})


class ErrorClass(StrEnum):
    """What a failure means for the state (``workflow_states.error_class``)."""

    TRANSIENT = "transient"  # back off and retry (PENDING later)
    OPERATOR = "operator"  # BLOCKED until an operator fixes the cause and retries
    PERMANENT = "permanent"  # FAILED at once


# -- Transitions ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """One allowed move of a state, who makes it, and when."""

    source: Status
    target: Status
    by: str  # who writes it: claim, pass, reconcile, receiver, operator, batch cancel
    when: str


#: Every move a state may make; nothing in wsctl writes any other. The
#: README's state table is ``transition_table()``.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(Status.PENDING, Status.DISPATCHING, "claim", "due (available_at <= now)"),
    Transition(Status.DISPATCHING, Status.DISPATCHING, "claim", "its lease expired: reclaimed"),
    Transition(Status.DISPATCHING, Status.COMPLETED, "pass", "a sync step ran inline and returned"),
    Transition(Status.DISPATCHING, Status.DISPATCHED, "pass", "spawned, or its sender returned"),
    Transition(
        Status.DISPATCHING, Status.PENDING, "pass", "transient error: retried after a backoff"
    ),
    Transition(Status.DISPATCHING, Status.PENDING, "pass", "released: claimed, never started"),
    Transition(
        Status.DISPATCHING, Status.BLOCKED, "pass", "needs an operator (error class operator)"
    ),
    Transition(Status.DISPATCHING, Status.FAILED, "pass", "permanent error, or attempts used up"),
    Transition(Status.DISPATCHING, Status.CANCELLED, "pass", "its batch was cancelled"),
    Transition(
        Status.DISPATCHING, Status.COMPLETED, "receiver", "a fast callback of its generation"
    ),
    Transition(Status.DISPATCHED, Status.COMPLETED, "reconcile", "its sync call returned"),
    Transition(Status.DISPATCHED, Status.COMPLETED, "receiver", "the callback of its generation"),
    Transition(Status.DISPATCHED, Status.PENDING, "reconcile", "its call raised a transient error"),
    Transition(
        Status.DISPATCHED,
        Status.FAILED,
        "reconcile",
        "permanent error, attempts used up, or no completion within the callback timeout",
    ),
    Transition(Status.DISPATCHED, Status.BLOCKED, "reconcile", "its call raised an operator error"),
    Transition(Status.BLOCKED, Status.PENDING, "operator", "`wsctl retry` after fixing the cause"),
    Transition(Status.FAILED, Status.PENDING, "operator", "`wsctl retry` after fixing the cause"),
    Transition(Status.PENDING, Status.CANCELLED, "batch cancel", "its batch was cancelled"),
    Transition(Status.BLOCKED, Status.CANCELLED, "batch cancel", "its batch was cancelled"),
)


def allowed(source: Status | str, target: Status | str) -> bool:
    """Whether ``TRANSITIONS`` lets a state move from ``source`` to ``target``."""
    return any(t.source == source and t.target == target for t in TRANSITIONS)


def transition_table() -> str:
    """``TRANSITIONS`` as a Markdown table (the README shows it)."""
    lines = ["| from | to | by | when |", "|---|---|---|---|"]
    lines += [f"| {t.source} | {t.target} | {t.by} | {t.when} |" for t in TRANSITIONS]
    return "\n".join(lines)


# -- Outcomes of a pass, grouped by the status they leave -------------------


class Outcome(StrEnum):
    """What a pass did with one claimed or polled state (a pass summary key)."""

    COMPLETED = "completed"
    DISPATCHED = "dispatched"
    RETRIED = "retried"
    RELEASED = "released"
    BLOCKED = "blocked"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The status each outcome leaves its state in.
OUTCOME_STATUS: dict[Outcome, Status] = {
    Outcome.COMPLETED: Status.COMPLETED,
    Outcome.DISPATCHED: Status.DISPATCHED,
    Outcome.RETRIED: Status.PENDING,
    Outcome.RELEASED: Status.PENDING,
    Outcome.BLOCKED: Status.BLOCKED,
    Outcome.FAILED: Status.FAILED,
    Outcome.CANCELLED: Status.CANCELLED,
}

#: Outcomes that end the state with a reason an operator reads (the pass's failure lines).
FAILURE_OUTCOMES: frozenset[Outcome] = frozenset({Outcome.BLOCKED, Outcome.FAILED})


# -- Error classes and reason codes: one table for the whole project -------


@dataclass(frozen=True, slots=True)
class Reason:
    """A short reason code, its error class, and what it means."""

    code: str
    error_class: ErrorClass
    meaning: str
    #: False for a transient refusal that says nothing about the item (a full queue at
    #: Modal, no token under a limit): the state backs off without counting an attempt
    counts_attempt: bool = True

    @property
    def outcome(self) -> Outcome:
        """What a dispatch pass does with a state that failed for this reason."""
        return _CLASS_OUTCOME[self.error_class]


_CLASS_OUTCOME = {
    ErrorClass.TRANSIENT: Outcome.RETRIED,  # FAILED once attempts are used up
    ErrorClass.OPERATOR: Outcome.BLOCKED,
    ErrorClass.PERMANENT: Outcome.FAILED,
}

_T, _O, _P = ErrorClass.TRANSIENT, ErrorClass.OPERATOR, ErrorClass.PERMANENT

#: Every reason code wsctl records in ``workflow_states.reason_code``. The
#: pacing and Supabase work classify with this same table.
REASONS: dict[str, Reason] = {
    r.code: r
    for r in (
        Reason("connection_error", _T, "a database or service connection failed or was lost"),
        Reason("timeout", _T, "a statement, request or call timed out"),
        Reason("spawn_timeout", _T, "a Modal spawn timed out; its outcome is unknown"),
        Reason("http_timeout", _T, "HTTP 408 from a service"),
        Reason("rate_limited", _T, "HTTP 429 from a service"),
        Reason("server_error", _T, "HTTP 5xx from a service"),
        # a full queue or no token says nothing about the item: no attempt counted
        Reason("modal_resource_exhausted", _T, "Modal's queue is full (RESOURCE_EXHAUSTED)", False),
        Reason("limit_wait", _T, "no token under a limit at the point of call in time", False),
        Reason("clay_error", _T, "the Clay webhook could not be reached"),
        Reason("modal_unavailable", _T, "Modal answered UNAVAILABLE"),
        Reason("unexpected_error", _T, "an exception no rule classifies: retried"),
        Reason("no_workstream", _O, "the batch has no workstream_slug"),
        Reason("no_registry_row", _O, "no enrichment_registry row for (step, workstream)"),
        Reason("function_not_found", _O, "the registry's function is not in the app"),
        Reason("missing_config_key", _O, "a required client config key is missing"),
        Reason("missing_secret", _O, "a secret the function needs is missing"),
        Reason("config_unresolved", _O, "the client config is ambiguous or mismatched"),
        Reason("credentials_rejected", _O, "Modal rejected the credentials: the pass stops"),
        Reason(
            "worker_environment", _O, "the worker helpers lack their database URL: the pass stops"
        ),
        Reason(
            "clay_webhook_cap",
            _O,
            "every Clay webhook source of the table is at its submission cap: add one",
        ),
        Reason("missing_relation", _P, "a table or view the function uses does not exist"),
        Reason("missing_column", _P, "a column the function uses does not exist"),
        Reason("client_error", _P, "HTTP 4xx other than 408 and 429 from a service"),
        Reason("payload_refused", _P, "the service refused the payload"),
        Reason("clay_record_too_large", _P, "the record is larger than Clay takes (100 KB)"),
        Reason("clay_bad_url", _P, "the Clay webhook URL is not an http(s) URL"),
        Reason("lease_expired", _P, "its dispatcher died with it, attempts used up"),
        Reason("callback_timeout", _P, "no completion within the callback timeout"),
    )
}


def reason(code: str) -> Reason:
    return REASONS[code]


class StepError(Exception):
    """Raised by an app's function to say how its failure is classified.

    ``raise StepError("missing_config_key", "config has no 'api_key'")``: the
    state ends BLOCKED (operator), FAILED (permanent) or is retried (transient)
    according to ``REASONS[code]``.
    """

    def __init__(self, code: str, message: str = ""):
        if code not in REASONS:
            raise ValueError(f"unknown reason code {code!r} (see wsctl.states.REASONS)")
        super().__init__(message or REASONS[code].meaning)
        self.reason_code = code


def http_reason(status: int) -> Reason | None:
    """The reason for an HTTP status a failure carries (None for non-errors)."""
    if status == 408:
        return REASONS["http_timeout"]
    if status == 429:
        return REASONS["rate_limited"]
    if 500 <= status <= 599:
        return REASONS["server_error"]
    if 400 <= status <= 499:
        return REASONS["client_error"]
    return None


def _http_status(exc: BaseException) -> int | None:
    for holder in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value
    return None


def classify(exc: BaseException) -> Reason:
    """The reason for an exception a function raised or a backend met.

    Checked in order: a ``reason_code`` attribute (``StepError``); Modal and
    grpc statuses; PostgreSQL's missing relation/column; connection and
    timeout errors; an HTTP status on the exception or its ``response``;
    otherwise ``unexpected_error`` (transient: retried, FAILED after the
    maximum attempts).
    """
    import sys

    code = getattr(exc, "reason_code", None)
    if isinstance(code, str) and code in REASONS:
        return REASONS[code]
    worker = sys.modules.get("wsctl.worker")
    if worker is not None and isinstance(exc, worker.ConfigResolutionError):
        return REASONS["config_unresolved"]
    if "modal" in sys.modules:
        import modal.exception as mexc

        if isinstance(exc, mexc.AuthError | mexc.PermissionDeniedError):
            return REASONS["credentials_rejected"]
        if isinstance(exc, mexc.NotFoundError):
            return REASONS["function_not_found"]
        if isinstance(exc, mexc.ResourceExhaustedError):
            return REASONS["modal_resource_exhausted"]
    # Modal's wrapped errors keep the grpc status in _grpc_status (reading
    # .status is deprecated); a bare grpclib.GRPCError has .status.
    status_obj = getattr(exc, "_grpc_status", None)
    if status_obj is None and type(exc).__module__.startswith("grpclib"):
        status_obj = getattr(exc, "status", None)
    grpc_status = getattr(status_obj, "name", None)
    if grpc_status == "RESOURCE_EXHAUSTED":
        return REASONS["modal_resource_exhausted"]
    if grpc_status == "UNAVAILABLE":
        return REASONS["modal_unavailable"]
    if grpc_status == "NOT_FOUND":
        return REASONS["function_not_found"]
    if grpc_status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return REASONS["credentials_rejected"]
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(exc, psycopg.errors.UndefinedTable):
            return REASONS["missing_relation"]
        if isinstance(exc, psycopg.errors.UndefinedColumn):
            return REASONS["missing_column"]
        if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
            return REASONS["timeout"]
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return REASONS["connection_error"]
    if isinstance(exc, TimeoutError):
        return REASONS["timeout"]
    if isinstance(exc, ConnectionError | OSError) and _http_status(exc) is None:
        return REASONS["connection_error"]
    status = _http_status(exc)
    if status is not None:
        found = http_reason(status)
        if found is not None:
            return found
    return REASONS["unexpected_error"]


def reason_table() -> str:
    """``REASONS`` as a Markdown table (the README shows it)."""
    lines = ["| reason code | class | state ends | meaning |", "|---|---|---|---|"]
    for r in REASONS.values():
        if r.error_class != ErrorClass.TRANSIENT:
            ends = str(OUTCOME_STATUS[r.outcome])
        elif r.counts_attempt:
            ends = "PENDING (backoff), FAILED at max attempts"
        else:
            ends = "PENDING (backoff), no attempt counted"
        lines.append(f"| {r.code} | {r.error_class} | {ends} | {r.meaning} |")
    return "\n".join(lines)
