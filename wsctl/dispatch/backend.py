"""The interface every dispatch backend implements, and its result types.

A backend gets a list of ``Job`` and returns one result per job, in order:
``None`` (ran or spawned, no call id), a call id string (spawned on Modal),
or a ``Failure`` carrying its reason code and error class (wsctl.states).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from wsctl.states import REASONS, Reason


@dataclass(frozen=True, slots=True)
class Failure:
    """A job that did not run or spawn, with its reason (``wsctl.states.REASONS``).

    The reason's error class says what the pass does: transient retries with
    backoff (FAILED after max attempts), operator ends BLOCKED, permanent ends
    FAILED; ``stops_pass`` (credentials, the workers' environment) stops the
    pass and releases the claims not yet run, exit 3.
    """

    reason: Reason
    message: str
    stops_pass: bool = False
    #: the service's Retry-After (seconds), honoured as the backoff when given
    retry_after: float | None = None

    @classmethod
    def of(cls, code: str, message: str, *, stops_pass: bool = False) -> Failure:
        return cls(REASONS[code], message, stops_pass)

    @classmethod
    def of_exception(cls, exc: BaseException, message: str, *, stops_pass: bool = False):
        """The failure for what a function raised: classified, its Retry-After kept."""
        from wsctl.states import classify

        after = getattr(exc, "retry_after", None)
        if not isinstance(after, int | float) or isinstance(after, bool) or after < 0:
            after = None
        return cls(classify(exc), message, stops_pass, None if after is None else float(after))


@dataclass(frozen=True, slots=True)
class Job:
    state_id: object  # uuid.UUID
    item_id: str  # the seed's functions take item_id: str
    step_name: str
    workstream_slug: str
    function: str  # enrichment_registry.modal_sender_fn for (step, workstream)
    type: str  # 'sync' or 'async'


class _Unfinished:
    """A job a stopping pass did not see through (see ``NOT_STARTED`` and ``STILL_RUNNING``)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The pass was stopping before this job's function started: its claim is released.
NOT_STARTED = _Unfinished("NOT_STARTED")
#: Its function was still running when the grace period ended: left to its lease.
STILL_RUNNING = _Unfinished("STILL_RUNNING")

Result = None | str | Failure | _Unfinished

#: Asked before each job starts: True once the pass is stopping (a signal, --max-seconds).
Stopping = Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Run:
    """How a backend runs one chunk: at most ``concurrency`` jobs at once; once
    ``stopping()`` is true no job starts (``NOT_STARTED``) and those running get
    ``grace`` seconds, after which the call returns with ``STILL_RUNNING`` for
    those not done."""

    concurrency: int
    stopping: Stopping | None = None
    grace: float = 10.0


@dataclass(frozen=True, slots=True)
class Poll:
    """Where a spawned call stands: running, returned, or raised (with the error)."""

    state: Literal["running", "returned", "raised", "unknown"]
    error: str | None = None
    reason: Reason | None = None  # for "raised": how the call's error is classified


class Backend(Protocol):
    name: str
    #: True when a returned call means the function already ran (local): a sync
    #: step is then COMPLETED at once. False when it was only spawned (Modal).
    runs_inline: bool

    def setup(self) -> None:
        """Check the configuration before any claim; raise EnvError when unusable."""

    def has_function(self, name: str) -> bool | None:
        """Whether the app defines ``name`` (None when it can't tell without spawning)."""

    def dispatch(self, jobs: list[Job], run: Run) -> list[Result]:
        """Run or spawn every job as ``run`` says; one result per job, in order."""

    def poll(self, call_ids: list[str]) -> dict[str, Poll]:
        """Outcome of spawned calls (empty for backends that run inline)."""

    def close(self) -> None:
        """Release what setup() acquired."""
