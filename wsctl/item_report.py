"""Where an item went and why: `wsctl item show`.

For one batch item, every step of its batch's blueprint in order (including
steps not reached yet): the state's status, attempts and timestamps, the
workstream it runs in, the registry row (Modal functions) for
``(step, workstream)``, the Modal call id it was dispatched to, the last
error, and the client config its lookup resolves to, with the resolution's
trace. The config resolution is ``wsctl.resolve.resolve_config``, the same
one the worker helpers use, so what is shown is what a worker would get.
Beside it, what the worker helpers recorded the step actually used
(``used_resolution``: the config row and its ``updated_at`` then, the
registry row), and whether that config row has changed since.
Read only; nothing here prints.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.domain import parse_uuid
from wsctl.errors import OperationalError
from wsctl.jsondoc import OMIT, JsonDoc, rename
from wsctl.prune import PruneSummary, get_summary
from wsctl.queries import named, one, q, rows_as
from wsctl.redact import redact_text
from wsctl.resolve import Resolution, resolve_config
from wsctl.settings import DEFAULT_DISPATCH

if TYPE_CHECKING:
    import psycopg

NOT_REACHED = "NOT_REACHED"  # shown for a blueprint step the item has no state for yet
PRUNED = "PRUNED"  # shown for a step whose state `wsctl prune` removed
TIMESTAMPS = (
    "created_at",
    "available_at",
    "dispatched_at",
    "completed_at",
    "updated_at",
    "lease_expires_at",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@dataclass(frozen=True)
class UsedResolution(JsonDoc):
    """What the worker helpers recorded when the step resolved its config (item 1 of issue 15)."""

    json_extra = ("config_changed_since",)

    step: str = field(metadata=OMIT)  # the step's own document says it
    config_id: uuid.UUID | None
    config_updated_at: datetime | None  # the row's updated_at when the step read it
    registry_id: uuid.UUID | None
    registry_function: str | None = field(metadata=rename("function"))
    workstream: str | None
    status: str | None
    source: str | None
    resolved_at: datetime | None
    config_exists: bool
    config_updated_at_now: datetime | None

    @property
    def config_changed_since(self) -> bool:
        """True when the config row used has been updated (or deleted) since the step read it."""
        if self.config_id is not None and not self.config_exists:
            return True  # deleted
        was, now = self.config_updated_at, self.config_updated_at_now
        return was is not None and now is not None and now > was


@dataclass
class StepReport:
    """One step of the item's blueprint (or a state outside it: ``position`` None)."""

    position: int | None
    step: str
    workstream: str | None
    state_id: uuid.UUID | None = None
    status: str | None = None  # None: not reached yet
    attempts: int | None = None
    registry: dict[str, Any] | None = None  # type, sender, receiver; None: no registry row
    registry_note: str | None = None  # why there is no registry row
    modal_call_id: str | None = None
    last_error: str | None = None
    claimed_by: str | None = None
    times: dict[str, datetime | None] = field(default_factory=dict)
    resolution: Resolution | None = None
    resolution_error: str | None = None  # the step slug could not be resolved at all
    used: UsedResolution | None = None  # what the worker helpers recorded; None: nothing yet
    pruned: bool = False  # no state because `wsctl prune` removed it
    #: for a PENDING state: the limits that would hold it back now ("waiting for limit KEY ...")
    waiting_for: list[str] = field(default_factory=list)

    @property
    def shown_status(self) -> str:
        return self.status or (PRUNED if self.pruned else NOT_REACHED)

    @property
    def function(self) -> str | None:
        return self.registry["sender"] if self.registry else None

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        config = None
        if self.resolution is not None:
            config = self.resolution.to_json(reveal=reveal)
        elif self.resolution_error:
            config = {"status": "error", "error": self.resolution_error}
        error = self.last_error
        if error and not reveal:
            error = redact_text(error)
        return {
            "position": self.position,
            "step": self.step,
            "in_blueprint": self.position is not None,
            "state_id": str(self.state_id) if self.state_id else None,
            "status": self.shown_status,
            "attempts": self.attempts,
            "workstream": self.workstream,
            "registry": self.registry,
            "registry_note": self.registry_note,
            "function": self.function,
            "modal_call_id": self.modal_call_id,
            "config": config,
            "used": self.used.to_json() if self.used else None,
            "last_error": error,
            "claimed_by": self.claimed_by,
            "waiting_for": list(self.waiting_for),
            **{k: _iso(v) for k, v in self.times.items()},
        }


@dataclass
class ItemReport:
    item_id: uuid.UUID
    batch_id: uuid.UUID
    client_id: uuid.UUID
    client: str
    batch_workstream: str | None
    batch_status: str
    blueprint: list[str]
    created_at: datetime | None
    steps: list[StepReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pruned: PruneSummary | None = None  # the batch's states were removed by `wsctl prune`

    @property
    def legacy(self) -> bool:
        """True when the batch carries no workstream (created before the change)."""
        return self.batch_workstream is None

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        """The documented ``wsctl item show --json`` document (secrets redacted unless reveal)."""
        return {
            "item": {
                "id": str(self.item_id),
                "batch_id": str(self.batch_id),
                "client": self.client,
                "client_id": str(self.client_id),
                "batch_workstream": self.batch_workstream,
                "batch_status": self.batch_status,
                "blueprint": list(self.blueprint),
                "created_at": _iso(self.created_at),
            },
            "steps": [s.to_json(reveal=reveal) for s in self.steps],
            "warnings": list(self.warnings),
            "pruned": self.pruned.to_json() if self.pruned else None,
        }


def _registry_note(workstream: str | None, step: str) -> str:
    if workstream is None:
        return (
            "no registry row: the batch has no workstream_slug (legacy batch), so no "
            "(step, workstream) key exists; see `wsctl backfill workstream-slug`"
        )
    return f"no registry row for ({step}, {workstream}); see `wsctl registry add`"


def item_report(
    conn: psycopg.Connection,
    item_id: str | uuid.UUID,
    *,
    function_cap: int = DEFAULT_DISPATCH.modal_function_cap,
) -> ItemReport:
    """Everything known about one item's way through its blueprint (read only).

    ``function_cap`` is the modal backend's cap of calls per function
    (``[dispatch] modal_function_cap``), counted in what would hold a PENDING
    step back. A malformed or unknown id raises ``OperationalError`` (exit 1).
    """
    with tx(conn):  # read only; the transaction carries the statement timeout
        report = _item_report(conn, item_id)
        _limit_waits(conn, report, function_cap)
    return report


def _item_report(conn: psycopg.Connection, item_id: str | uuid.UUID) -> ItemReport:
    iid = item_id if isinstance(item_id, uuid.UUID) else parse_uuid(item_id, "item id")
    report = rows_as(conn, ItemReport).execute(q("inspect_item"), (iid,)).fetchone()
    if report is None:
        pruned = one(named(conn).execute(q("prune_pruned_count")))
        batches, last = pruned["batches"], pruned["last"]
        if batches:
            raise OperationalError(
                f"no batch item with id {iid}",
                hint=f"`wsctl prune --include-items` removed the items of {batches} batch(es), "
                f"last {last.isoformat(timespec='seconds')}; their archives hold the rows",
            )
        raise OperationalError(f"no batch item with id {iid}")
    if report.legacy:
        report.warnings.append(
            f"batch {report.batch_id} has no workstream_slug (legacy batch): the dispatcher "
            "blocks its states until `wsctl backfill workstream-slug` sets one"
        )
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(UsedResolution)) as cur:
        used = {
            u.step: u
            for u in cur.execute(q("stats_item_used_resolutions"), {"item_id": iid}).fetchall()
        }
    report.pruned = get_summary(conn, report.batch_id)
    if report.pruned is not None:
        report.warnings.append(
            f"the states of batch {report.batch_id} were {report.pruned.describe()}; "
            "`wsctl batch status` shows its counts as they were"
        )
    for r in named(conn).execute(q("inspect_item_steps"), {"item_id": iid}).fetchall():
        times = {name: r.pop(name) for name in TIMESTAMPS}
        registry = {name: r.pop(name) for name in ("type", "sender", "receiver")}
        s = StepReport(**r, times=times)
        s.used = used.get(s.step) if s.state_id is not None else None
        s.pruned = s.state_id is None and report.pruned is not None
        if registry["sender"] is not None:
            s.registry = registry
        else:
            s.registry_note = _registry_note(s.workstream, s.step)
        if s.position is None:
            report.warnings.append(
                f"the item has a state for {s.step}, which is not in its blueprint"
            )
        try:
            s.resolution = resolve_config(conn, step=s.step, item_id=iid)
        except OperationalError as exc:  # a legacy step name that is not a slug
            s.resolution_error = exc.one_line()
        report.steps.append(s)
    return report


def _limit_waits(conn: psycopg.Connection, report: ItemReport, function_cap: int) -> None:
    """For each PENDING step: the limits that would hold it back now (the cap of calls per
    function counted, as the modal backend does)."""
    from wsctl.dispatch import pacing

    for s in report.steps:
        if s.status == "PENDING" and s.registry is not None:
            s.waiting_for = pacing.holding_back(
                conn, report.batch_id, s.step, function_cap=function_cap
            )
