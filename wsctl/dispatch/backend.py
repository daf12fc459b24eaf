"""The interface every dispatch backend implements, and its result types.

A backend gets a list of ``Job`` and returns one result per job, in order:
``None`` (ran or spawned, no call id), a call id string (spawned on Modal),
or a ``Failure`` saying how the dispatcher should treat the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# transient: retry with backoff (FAILED after max attempts)
# item:      permanent for this item (function not found): BLOCKED
# pass:      permanent for the pass (credentials): stop, release unspawned claims, exit 3
FailureKind = Literal["transient", "item", "pass"]


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    message: str


@dataclass(frozen=True, slots=True)
class Job:
    state_id: object  # uuid.UUID
    item_id: str  # the seed's functions take item_id: str
    step_name: str
    workstream_slug: str
    function: str  # enrichment_registry.modal_sender_fn for (step, workstream)
    type: str  # 'sync' or 'async'


Result = None | str | Failure


@dataclass(frozen=True, slots=True)
class Poll:
    """Where a spawned call stands: running, returned, or raised (with the error)."""

    state: Literal["running", "returned", "raised", "unknown"]
    error: str | None = None


class Backend(Protocol):
    name: str
    #: True when a returned call means the function already ran (local): a sync
    #: step is then COMPLETED at once. False when it was only spawned (Modal).
    runs_inline: bool

    def setup(self) -> None:
        """Check the configuration before any claim; raise EnvError when unusable."""

    def has_function(self, name: str) -> bool | None:
        """Whether the app defines ``name`` (None when it can't tell without spawning)."""

    def dispatch(self, jobs: list[Job], concurrency: int) -> list[Result]:
        """Run or spawn every job; one result per job, in order."""

    def poll(self, call_ids: list[str]) -> dict[str, Poll]:
        """Outcome of spawned calls (empty for backends that run inline)."""

    def close(self) -> None:
        """Release what setup() acquired."""
