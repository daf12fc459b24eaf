"""Small shared pieces of the domain: slugs, clients, and workstream inference.

``infer_workstreams`` is THE inference: the backfill uses it to set
``batches.workstream_slug``, config resolution uses it to advise on items of
legacy batches, and the dispatcher uses it to say what the backfill would set.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from wsctl.errors import OperationalError, UsageError
from wsctl.queries import named, q, rows_as

if TYPE_CHECKING:
    import psycopg


class StepType(StrEnum):
    """How a workflow step runs (a registry row's ``type``): ``sync``, completed by what its
    sender returns, or ``async``, completed by its receiver when the webhook calls back."""

    sync = "sync"
    async_ = "async"


SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MAX_SLUG = 200


def validate_slug(value: str, what: str = "slug") -> str:
    """Return ``value`` if it is a slug (``^[a-z0-9][a-z0-9_-]*$``), else exit 1 with a clear error."""
    if isinstance(value, str) and len(value) > MAX_SLUG:
        raise OperationalError(
            f"invalid {what} {value[:40] + '...'!r}: too long ({len(value)} characters; "
            f"at most {MAX_SLUG})"
        )
    if not isinstance(value, str) or not SLUG_RE.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:77]}..."
        raise OperationalError(
            f"invalid {what} {shown!r}: use lower-case letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def validate_filters(*, workstream: str | None, step: str | None) -> None:
    """The slugs a listing is filtered by, each checked when given (None: no filter)."""
    if workstream is not None:
        validate_slug(workstream, "workstream slug")
    if step is not None:
        validate_slug(step, "step slug")


MAX_CHUNK_SIZE = 100_000


def check_chunk_size(chunk_size: int) -> int:
    """``--chunk-size`` of the long maintenance runs (backfill, prune): 1 to 100,000 rows or
    batches per transaction, else a usage error (exit 2)."""
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"--chunk-size must be between 1 and {MAX_CHUNK_SIZE}")
    return chunk_size


def parse_uuid(value: str, what: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(str(value).strip())
    except (ValueError, AttributeError):
        shown = value if len(str(value)) <= 80 else f"{str(value)[:77]}..."
        raise OperationalError(f"invalid {what} {shown!r}: expected a UUID") from None


@dataclass(frozen=True)
class Client:
    id: uuid.UUID
    name: str


def find_client(conn: psycopg.Connection, name_or_id: str) -> Client:
    """A client by id or by exact name; exit 1 when there is none."""
    value = (name_or_id or "").strip()
    if not value:
        raise OperationalError("a client name or id is required")
    row = None
    try:
        as_id = uuid.UUID(value)
    except ValueError:
        as_id = None
    if as_id is not None:
        row = rows_as(conn, Client).execute(q("client_by_id"), (as_id,)).fetchone()
    if row is None:
        row = rows_as(conn, Client).execute(q("client_by_name"), (value,)).fetchone()
    if row is None:
        shown = value if len(value) <= 80 else f"{value[:77]}..."
        raise OperationalError(
            f"no client named or with id {shown!r}", hint="see `wsctl client list`"
        )
    return row


@dataclass(frozen=True)
class Inference:
    """What the workstream of a legacy batch (NULL workstream_slug) would be."""

    batch_id: uuid.UUID
    registered: list[str] = field(default_factory=list)  # register every blueprint step
    narrowed: list[str] = field(default_factory=list)  # ... and the client has a config there

    @property
    def candidates(self) -> list[str]:
        """The candidates left after narrowing (all registered ones when narrowing kept none)."""
        if len(self.registered) > 1 and self.narrowed:
            return self.narrowed
        return self.registered

    @property
    def workstream(self) -> str | None:
        """The single inferred workstream, or None when there is no or more than one candidate."""
        c = self.candidates
        return c[0] if len(c) == 1 else None

    @property
    def reason(self) -> str:
        if self.workstream:
            how = (
                "the only workstream"
                if len(self.registered) == 1
                else (
                    "the only one of "
                    + ", ".join(self.registered)
                    + " where the client has a config"
                )
            )
            return f"{self.workstream} is {how} registering every blueprint step"
        if not self.registered:
            return "no workstream registers every step of the blueprint"
        return "several workstreams register every step: " + ", ".join(self.candidates)


def infer_workstreams(
    conn: psycopg.Connection, batch_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Inference]:
    """Inference for many batches in one statement (one per backfill chunk)."""
    if not batch_ids:
        return {}
    rows = named(conn).execute(q("infer_workstreams"), (list(batch_ids),)).fetchall()
    out = {bid: Inference(batch_id=bid) for bid in batch_ids}
    for r in rows:
        out[r["batch_id"]] = Inference(
            batch_id=r["batch_id"],
            registered=list(r["registered"] or []),
            narrowed=list(r["narrowed"] or []),
        )
    return out


def infer_workstream(conn: psycopg.Connection, batch_id: uuid.UUID) -> Inference:
    return infer_workstreams(conn, [batch_id])[batch_id]
