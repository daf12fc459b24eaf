"""Config and registry resolution by the composite key (step slug, workstream slug).

The same step slug exists in several workstreams, with different Modal
functions and different client configs, so nothing is ever looked up by the
step slug alone. For a client config the workstream comes from, in order:

a. an explicit workstream (source ``explicit``); if an item is given too and
   its batch carries a different one, the result is ``mismatch``;
b. the item's batch (source ``batch``);
c. nothing recorded: for an item of a legacy batch (NULL workstream_slug) the
   candidates come from ``wsctl.domain.infer_workstream`` (the backfill's
   inference); for a client alone, the workstreams where the client has a
   config for the step. One candidate is reported ``found`` with source
   ``inferred`` and a warning; several are ``ambiguous``; none ``not_found``.

An inferred workstream is advice for the operator: ``Resolution.trusted`` is
False for it, and the dispatcher and the worker helpers refuse to act on it.
Pure functions over a connection: nothing here prints.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from wsctl.catalog import RegistryRow
from wsctl.db import tx
from wsctl.domain import Client, find_client, infer_workstream, parse_uuid, validate_slug
from wsctl.errors import OperationalError, UsageError
from wsctl.jsondoc import JsonDoc
from wsctl.queries import column, named, q, rows_as

if TYPE_CHECKING:
    import psycopg

FOUND, NOT_FOUND, AMBIGUOUS, MISMATCH = "found", "not_found", "ambiguous", "mismatch"
EXPLICIT, BATCH, INFERRED = "explicit", "batch", "inferred"

# Trace rule names: the lookups that lead to the rules, then the rules a, b, c.
RULE_ITEM = "item"
RULE_CLIENT = "client"
RULE_EXPLICIT = "a:explicit"
RULE_BATCH = "b:batch"
RULE_INFER = "c:infer"


@dataclass(frozen=True)
class TraceStep(JsonDoc):
    """One step of a resolution: which rule, which row it looked at, and why it concluded."""

    rule: str
    why: str
    row: dict[str, Any] | None = None


@dataclass
class Resolution:
    """The outcome of resolving one client config; ``config`` is raw (redact before printing)."""

    status: str
    source: str | None
    step: str
    workstream: str | None = None
    config: dict[str, Any] | None = None
    candidates: list[str] = field(default_factory=list)
    trace: list[TraceStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    client: Client | None = None
    item_id: uuid.UUID | None = None
    batch_id: uuid.UUID | None = None
    batch_workstream: str | None = None  # what the item's batch carries (None: legacy)
    explicit_workstream: str | None = None
    backfill_workstream: str | None = None  # what `wsctl backfill workstream-slug` would set
    config_id: uuid.UUID | None = None
    updated_at: datetime | None = None

    @property
    def found(self) -> bool:
        return self.status == FOUND

    @property
    def inferred(self) -> bool:
        """True when the workstream was only inferred: advice, never to be acted on."""
        return self.source == INFERRED

    @property
    def trusted(self) -> bool:
        """True when the config may be used: found by an explicit or recorded workstream."""
        return self.status == FOUND and self.source in (EXPLICIT, BATCH)

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        """The documented JSON shape (config redacted unless ``reveal``), plus context keys."""
        from wsctl.redact import redact

        return {
            "status": self.status,
            "source": self.source,
            "workstream": self.workstream,
            "config": redact(self.config, reveal=reveal),
            "candidates": list(self.candidates),
            "trace": [t.to_json() for t in self.trace],
            "warnings": list(self.warnings),
            "step": self.step,
            "client": self.client.name if self.client else None,
            "client_id": str(self.client.id) if self.client else None,
            "item_id": str(self.item_id) if self.item_id else None,
            "batch_id": str(self.batch_id) if self.batch_id else None,
            "batch_workstream": self.batch_workstream,
            "backfill_workstream": self.backfill_workstream,
            "config_id": str(self.config_id) if self.config_id else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def _key_row(client: Client, step: str, workstream: str, config_id=None) -> dict[str, Any]:
    return {
        "table": "client_workflow_configs",
        "id": str(config_id) if config_id else None,
        "client": client.name,
        "workflow_slug": step,  # trace rows name the table's columns
        "workstream_slug": workstream,
    }


def _lookup(
    conn: psycopg.Connection, res: Resolution, workstream: str, source: str, rule: str
) -> Resolution:
    """The exact composite-key lookup shared by every rule; fills ``res`` and returns it."""
    client = res.client
    assert client is not None
    row = (
        named(conn)
        .execute(q("resolve_config_by_key"), (client.id, res.step, workstream))
        .fetchone()
    )
    res.source = source
    res.workstream = workstream
    if row is None:
        configured = named(conn).execute(q("resolve_client_workstreams"), (client.id, res.step))
        elsewhere = [ws for ws in column(configured, "workstream_slug") if ws != workstream]
        why = f"no config for ({client.name}, {res.step}, {workstream})"
        if elsewhere:
            why += f"; the client has one in other workstream(s) only: {', '.join(elsewhere)}"
        res.trace.append(TraceStep(rule, why, _key_row(client, res.step, workstream)))
        res.status = NOT_FOUND
        return res
    res.config_id, res.config, res.updated_at = row["id"], row["config"], row["updated_at"]
    res.status = FOUND
    res.trace.append(
        TraceStep(
            rule,
            f"exact composite key ({client.name}, {res.step}, {workstream}) found",
            _key_row(client, res.step, workstream, row["id"]),
        )
    )
    return res


def _item(conn: psycopg.Connection, res: Resolution, item_id: uuid.UUID) -> None:
    row = named(conn).execute(q("resolve_item"), (item_id,)).fetchone()
    if row is None:
        raise OperationalError(f"no batch item with id {item_id}")
    res.batch_id, res.batch_workstream = row["batch_id"], row["workstream_slug"]
    client_name = row["name"]
    res.client = Client(id=row["client_id"], name=client_name)
    carried = res.batch_workstream or "NULL (legacy batch)"
    res.trace.append(
        TraceStep(
            RULE_ITEM,
            f"item {item_id} belongs to batch {res.batch_id} of client {client_name}, "
            f"whose workstream_slug is {carried}",
            {
                "table": "batches",
                "id": str(res.batch_id),
                "client": client_name,
                "workstream_slug": res.batch_workstream,
            },
        )
    )


def _infer_for_item(conn: psycopg.Connection, res: Resolution) -> Resolution:
    assert res.batch_id is not None  # _item() set it from the item's batch
    inference = infer_workstream(conn, res.batch_id)
    res.candidates = list(inference.candidates)
    res.backfill_workstream = inference.workstream
    row = {
        "table": "batches",
        "id": str(res.batch_id),
        "registered": inference.registered,
        "narrowed": inference.narrowed,
    }
    res.trace.append(TraceStep(RULE_INFER, f"inference: {inference.reason}", row))
    return _settle_candidates(conn, res, backfill=True)


def _infer_for_client(conn: psycopg.Connection, res: Resolution) -> Resolution:
    client = res.client
    assert client is not None
    configured = named(conn).execute(q("resolve_client_workstreams"), (client.id, res.step))
    res.candidates = column(configured, "workstream_slug")
    listed = ", ".join(res.candidates) or "none"
    res.trace.append(
        TraceStep(
            RULE_INFER,
            f"no workstream given: workstreams where {client.name} has a config for "
            f"{res.step}: {listed}",
            {
                "table": "client_workflow_configs",
                "client": client.name,
                "workflow_slug": res.step,
                "workstream_slugs": res.candidates,
            },
        )
    )
    return _settle_candidates(conn, res, backfill=False)


def _settle_candidates(conn: psycopg.Connection, res: Resolution, *, backfill: bool) -> Resolution:
    """Rule c's outcome: one candidate is advice, several are ambiguous, none is not found."""
    if len(res.candidates) > 1:
        res.status, res.source = AMBIGUOUS, None
        res.trace.append(
            TraceStep(
                RULE_INFER,
                "several candidates: refusing to pick one of " + ", ".join(res.candidates),
            )
        )
        return res
    if not res.candidates:
        res.status, res.source = NOT_FOUND, None
        res.trace.append(TraceStep(RULE_INFER, "no candidate workstream"))
        return res
    only = res.candidates[0]
    if backfill:
        res.warnings.append(
            f"workstream {only} is inferred, not recorded on batch {res.batch_id}: "
            f"`wsctl backfill workstream-slug` would set {only}; nothing acts on an inference"
        )
    else:
        assert res.client is not None  # known before any candidate is looked for
        res.warnings.append(
            f"workstream {only} is inferred (the only one where {res.client.name} has a config "
            f"for {res.step}); pass --workstream {only} to make it explicit"
        )
    return _lookup(conn, res, only, INFERRED, RULE_INFER)


def resolve_config(
    conn: psycopg.Connection,
    *,
    step: str,
    item_id: str | uuid.UUID | None = None,
    client: str | None = None,
    workstream: str | None = None,
) -> Resolution:
    """Resolve one ``client_workflow_configs`` row for an item or a client (rules a, b, c).

    Exactly one of ``item_id`` and ``client`` (a name or an id). Bad input
    (slug, UUID, unknown client or item) raises ``OperationalError``; every
    other outcome, including not found, is a ``Resolution``.
    """
    validate_slug(step, "step slug")
    if workstream is not None:
        validate_slug(workstream, "workstream slug")
    if (item_id is None) == (client is None):
        raise UsageError("give either an item id or a client, not both")
    with tx(conn):  # read only; the transaction carries the statement timeout
        return _resolve(conn, step, item_id, client, workstream)


def _resolve(
    conn: psycopg.Connection,
    step: str,
    item_id: str | uuid.UUID | None,
    client: str | None,
    workstream: str | None,
) -> Resolution:
    res = Resolution(
        status=NOT_FOUND,
        source=None,
        step=step,
        explicit_workstream=workstream,
    )
    if item_id is not None:
        res.item_id = item_id if isinstance(item_id, uuid.UUID) else parse_uuid(item_id, "item id")
        _item(conn, res, res.item_id)
    else:
        assert client is not None  # resolve_config() takes exactly one of item_id and client
        res.client = find_client(conn, client)
        res.trace.append(
            TraceStep(
                RULE_CLIENT,
                f"client {res.client.name} given directly (no item, no batch)",
                {"table": "clients", "id": str(res.client.id), "name": res.client.name},
            )
        )

    if workstream is not None:  # rule a
        carried = res.batch_workstream
        if res.item_id is not None and carried is not None and carried != workstream:
            res.status, res.source = MISMATCH, EXPLICIT
            res.candidates = [carried, workstream]
            res.trace.append(
                TraceStep(
                    RULE_EXPLICIT,
                    f"explicit workstream {workstream} disagrees with the item's batch "
                    f"({carried}): refusing to trust either",
                )
            )
            return res
        if res.item_id is not None and carried is None:
            assert res.batch_id is not None  # _item() set it from the item's batch
            inference = infer_workstream(conn, res.batch_id)
            res.backfill_workstream = inference.workstream
            res.warnings.append(
                f"batch {res.batch_id} has no workstream_slug; using the explicit "
                f"{workstream} ({inference.reason})"
            )
        return _lookup(conn, res, workstream, EXPLICIT, RULE_EXPLICIT)

    if res.item_id is not None and res.batch_workstream is not None:  # rule b
        return _lookup(conn, res, res.batch_workstream, BATCH, RULE_BATCH)

    if res.item_id is not None:  # rule c, legacy batch
        return _infer_for_item(conn, res)
    return _infer_for_client(conn, res)  # rule c, client alone


def resolve_registry(conn: psycopg.Connection, step: str, workstream: str) -> RegistryRow | None:
    """The ``enrichment_registry`` row of a step in a workstream, or None: not registered there."""
    validate_slug(step, "step slug")
    validate_slug(workstream, "workstream slug")
    with tx(conn):
        return (
            rows_as(conn, RegistryRow).execute(q("resolve_registry"), (step, workstream)).fetchone()
        )
