"""The state machine of a workflow state, in one place.

Every module that names a status, an error class or a reason code imports it
from here; the README's transition table is this module's ``TRANSITIONS``.
"""

from __future__ import annotations

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
