"""Batches: create one from an item file, see where it stands, list, cancel.

A batch carries its workstream from birth (``batches.workstream_slug``), and
``create_batch`` writes the batch, every item and one PENDING state per item
for the first blueprint step in ONE transaction: a bad row anywhere in the
file rolls it all back.

The items are streamed into ``COPY batch_items`` in COPY's binary format
(memory stays flat in the file's size; the server parses no COPY text and no
uuid text, only each item's JSON). Their ids are UUIDv7 (RFC 9562) made
client-side: a per-batch prefix (48-bit millisecond time, version 7, 42
random bits) and a 32-bit counter. A batch's items therefore occupy one
contiguous primary-key range, so index inserts append instead of landing on
random pages, and the states are written by one INSERT ... SELECT over the
counter (``generate_series``: no read of batch_items, no staging table).

Foreign-key checks by construction. PostgreSQL checks a foreign key with one
trigger call per inserted row; for a create that is 300,000 lookups (each
item's batch, each state's item and batch), about 40% of the server's time.
Every one of them is satisfied by construction: the batch and the items were
written by this same transaction, invisible to any other, and each state
names an item id from the counter range the COPY just wrote. When nothing else
would change, the create sets ``session_replication_role = replica`` for the
COPY and the states INSERT only (SET LOCAL, reset right after), which skips
exactly those trigger calls. "Nothing else" is checked inside the transaction,
after the tables are locked in the mode the inserts take anyway (so no
trigger can appear meanwhile), and again after the inserts (a partition can
be attached under that lock): the role may set the parameter (found by
trying a plain ``SET LOCAL`` in a savepoint, as Supabase allows it); no enabled
trigger fires on INSERT into batch_items or workflow_states (or their
partitions) but the three foreign keys' own checks, ALWAYS triggers included
(their writes would run under the replica role too), a deferrable
constraint's internal trigger included; no enabled rule; their
only foreign keys are those three. Otherwise, or with ``fk_checks="server"``,
the server checks every row as usual. The COPY's and the INSERT's row counts
are checked against the items counted either way.
"""

from __future__ import annotations

import re
import secrets
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

from wsctl.db import tx
from wsctl.domain import Client, find_client, parse_uuid, validate_slug
from wsctl.errors import NotFound, OperationalError, UsageError
from wsctl.itemfiles import item_line, open_items
from wsctl.jsondoc import FLATTEN, OMIT, JsonDoc
from wsctl.prune import PruneSummary, get_summary
from wsctl.queries import column, named, one, q, rows_as, scalar
from wsctl.redact import first_line

if TYPE_CHECKING:
    import psycopg

MAX_ITEMS = 0xFFFF_FFFF  # the id counter is 32 bits
MAX_DEDUPE_KEY = 500
_COPY_CHUNK = 256 * 1024  # bytes per COPY write
# COPY binary format: signature, flags (none), header extension length (0); the trailer.
_COPY_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_BINARY_TRAILER = b"\xff\xff"
_COUNTER = struct.Struct("!I").pack
_JSONB_FIELD = struct.Struct("!iB").pack  # field length, then jsonb's binary version byte (1)


# --- validation ---------------------------------------------------------------


def parse_blueprint(value: str | list[str]) -> list[str]:
    """``"a,b,c"`` (or a list) as an ordered list of step slugs; refuses blanks and repeats."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    steps = [p.strip() for p in parts]
    if not steps or steps == [""]:
        raise OperationalError("the blueprint is empty: give its steps as step1,step2,...")
    seen: set[str] = set()
    for s in steps:
        if not s:
            raise OperationalError(f"the blueprint {value!r} has an empty step")
        validate_slug(s, "blueprint step")
        if s in seen:
            raise OperationalError(f"the blueprint repeats step {s!r}")
        seen.add(s)
    return steps


@dataclass(frozen=True)
class BatchPlan:
    """Validated options of a create: who, where, which steps, and what to warn about."""

    client: Client
    workstream: str
    blueprint: list[str]
    warnings: list[str] = field(default_factory=list)


def known_workstreams(conn: psycopg.Connection) -> list[str]:
    """Workstreams that have registry rows."""
    return column(named(conn).execute(q("batch_known_workstreams")), "workstream_slug")


def plan_batch(
    conn: psycopg.Connection, *, client: str, workstream: str, blueprint: str | list[str]
) -> BatchPlan:
    """Check the options of a create before anything is written (exit 1 on any problem)."""
    steps = parse_blueprint(blueprint)
    validate_slug(workstream, "workstream")
    with tx(conn):  # read only; the transaction carries the lock and statement timeouts
        return _plan_batch(conn, client, workstream, steps)


def _plan_batch(
    conn: psycopg.Connection, client: str, workstream: str, steps: list[str]
) -> BatchPlan:
    found = find_client(conn, client)
    known = known_workstreams(conn)
    if workstream not in known:
        listed = ", ".join(known) if known else "none: the registry is empty"
        raise OperationalError(
            f"unknown workstream {workstream!r} (no registry rows); known workstreams: {listed}"
        )
    registered = set(
        column(named(conn).execute(q("batch_registered_steps"), (workstream, steps)), "slug")
    )
    missing = [s for s in steps if s not in registered]
    if missing:
        raise OperationalError(
            f"blueprint step(s) not registered in workstream {workstream}: {', '.join(missing)}",
            hint=f"see `wsctl registry list --workstream {workstream}`",
        )
    configured = set(
        column(
            named(conn).execute(q("batch_configured_steps"), (found.id, workstream, steps)),
            "workflow_slug",
        )
    )
    warnings = [
        f"client {found.name} has no config for step {s} in workstream {workstream}"
        for s in steps
        if s not in configured
    ]
    return BatchPlan(client=found, workstream=workstream, blueprint=steps, warnings=warnings)


# --- create -------------------------------------------------------------------


@dataclass
class CreateResult(JsonDoc):
    batch_id: uuid.UUID | None  # None for a dry run
    items: int
    workstream: str
    blueprint: list[str]
    client_id: uuid.UUID
    client: str
    dry_run: bool = False
    deduplicated: bool = False  # an earlier create with the same dedupe key made this batch
    warnings: list[str] = field(default_factory=list, metadata=OMIT)
    # "by_construction": the per-row foreign-key triggers were skipped (see the module's
    # docstring); "server": PostgreSQL checked every row; None: nothing was written.
    fk_checks: str | None = None


class _DedupeTaken(Exception):
    """Raised inside the creating transaction to roll it back when the key is taken."""


def _uuid7_prefix() -> str:
    """The first 24 hex digits of a batch's item ids, dashed (the last 8 are a counter)."""
    ms = time.time_ns() // 1_000_000
    rnd = secrets.randbits(42)
    high = ((ms & 0xFFFF_FFFF_FFFF) << 16) | (0x7 << 12) | (rnd >> 30)  # time, version, rand_a
    mid = (0b10 << 30) | (rnd & 0x3FFF_FFFF)  # variant, rand_b's top 30 bits
    h = f"{high:016x}{mid:08x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:24]}"


def _check_dedupe_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = key.strip()
    if not key:
        raise OperationalError("the dedupe key is empty")
    if len(key) > MAX_DEDUPE_KEY:
        raise OperationalError(f"the dedupe key is longer than {MAX_DEDUPE_KEY} characters")
    return key


def _existing_for_key(
    conn: psycopg.Connection, key: str, plan: BatchPlan, *, dry_run: bool
) -> CreateResult | None:
    with tx(conn):  # read only; the transaction carries the lock and statement timeouts
        return _existing_for_key_in_tx(conn, key, plan, dry_run=dry_run)


def _existing_for_key_in_tx(
    conn: psycopg.Connection, key: str, plan: BatchPlan, *, dry_run: bool
) -> CreateResult | None:
    row = named(conn).execute(q("batch_dedupe_lookup"), (key,)).fetchone()
    if row is None:
        return None
    existing = get_batch(conn, row["batch_id"])
    if (
        existing.client_id != plan.client.id
        or existing.workstream != plan.workstream
        or list(existing.blueprint) != plan.blueprint
    ):
        raise OperationalError(
            f"dedupe key {key!r} already names batch {existing.batch_id} "
            f"(client {existing.client}, workstream {existing.workstream}, "
            f"blueprint {','.join(existing.blueprint)}), not this request"
        )
    items = scalar(conn.execute(q("batch_item_count"), (existing.batch_id,)))
    return CreateResult(
        batch_id=existing.batch_id,
        items=items,
        workstream=plan.workstream,
        blueprint=plan.blueprint,
        client_id=plan.client.id,
        client=plan.client.name,
        dry_run=dry_run,
        deduplicated=True,
        warnings=list(plan.warnings),
    )


def create_batch(
    conn: psycopg.Connection,
    *,
    client: str,
    workstream: str,
    blueprint: str | list[str],
    items: str | Path,
    fmt: str | None = None,
    dry_run: bool = False,
    dedupe_key: str | None = None,
    delimiter: str = ",",
    stdin: IO | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    fk_checks: str = "auto",
) -> CreateResult:
    """Create a batch from an item file (``-`` is stdin) in one transaction.

    Validates the options first (see ``plan_batch``), then streams the file
    into COPY. ``dry_run`` parses the whole file and writes nothing. With
    ``dedupe_key``, a key already used returns that batch (``deduplicated``).
    ``on_progress(items, bytes_read)`` is called as the file is read.
    ``fk_checks``: ``"auto"`` skips the per-row foreign-key triggers where that is
    safe (see the module's docstring), ``"server"`` always lets PostgreSQL check.
    """
    if fk_checks not in ("auto", "server"):
        raise ValueError(f"fk_checks must be 'auto' or 'server', not {fk_checks!r}")
    plan = plan_batch(conn, client=client, workstream=workstream, blueprint=blueprint)
    key = _check_dedupe_key(dedupe_key)
    with open_items(items, fmt, stdin=stdin, delimiter=delimiter) as stream:
        if key is not None:
            found = _existing_for_key(conn, key, plan, dry_run=dry_run)
            if found is not None:
                return found
        result = CreateResult(
            batch_id=None,
            items=0,
            workstream=plan.workstream,
            blueprint=plan.blueprint,
            client_id=plan.client.id,
            client=plan.client.name,
            dry_run=dry_run,
            warnings=list(plan.warnings),
        )
        if dry_run:
            for _ in stream.json_rows():
                if on_progress and stream.items % 10_000 == 0:
                    on_progress(stream.items, stream.bytes_read)
            result.items = stream.items
            return result
        batch_id = uuid.uuid4()
        try:
            with tx(conn):
                conn.execute(
                    q("batch_insert"), (batch_id, plan.client.id, plan.blueprint, plan.workstream)
                )
                if key is not None:
                    if conn.execute(q("batch_dedupe_claim"), (key, batch_id)).fetchone() is None:
                        raise _DedupeTaken
                conn.execute(q("batch_utf8"))
                restore = _skip_fk_triggers(conn) if fk_checks == "auto" else None
                prefix = _uuid7_prefix()
                n = _copy_items(conn, stream, batch_id, prefix, on_progress)
                states = conn.execute(
                    q("batch_states_first_step"),
                    {
                        "state_prefix": _uuid7_prefix(),
                        "item_prefix": prefix,
                        "items": n,
                        "step": plan.blueprint[0],
                        "batch_id": batch_id,
                    },
                ).rowcount
                if restore is not None:
                    # A partition attached while the rows went in is not covered by the
                    # lock: check again before anything is committed.
                    if not one(named(conn).execute(q("batch_fk_skip_is_safe")))["safe"]:
                        raise OperationalError(
                            "batch_items or workflow_states changed during the create (a "
                            "trigger, rule or partition appeared); nothing written: run it again"
                        )
                    _restore_replication_role(conn, restore)
                if states != n:  # pragma: no cover - would mean a bug in the id scheme
                    raise OperationalError(
                        f"internal error: {n} items but {states} first-step states; nothing written"
                    )
        except _DedupeTaken:
            assert key is not None  # raised only when the dedupe key was claimed
            found = _existing_for_key(conn, key, plan, dry_run=False)
            if found is None:  # pragma: no cover - the holder was deleted meanwhile
                raise OperationalError(f"dedupe key {key!r} is taken; try again") from None
            return found
        except Exception as exc:
            located = _refused_item(exc, stream.name, items, fmt, delimiter)
            if located is None:
                raise
            raise located from exc
        result.batch_id = batch_id
        result.items = n
        result.fk_checks = "server" if restore is None else "by_construction"
        return result


_COPY_ITEM = re.compile(r"COPY batch_items, line (\d+)")


def _refused_item(
    exc: Exception, name: str, source: str | Path, fmt: str | None, delimiter: str = ","
) -> OperationalError | None:
    """An error PostgreSQL raised on one item of the COPY (a dashboard CHECK, say), as a
    one-line refusal naming the item's line in the file; None for any other error."""
    diag = getattr(exc, "diag", None)
    found = _COPY_ITEM.search(getattr(diag, "context", None) or "")
    if found is None:
        return None
    number = int(found.group(1))
    line = item_line(source, fmt, number, delimiter=delimiter)
    where = f"line {line}" if line is not None else f"item {number}"
    return OperationalError(f"{name} {where}: PostgreSQL refused the item: {first_line(exc)}")


def _skip_fk_triggers(conn: psycopg.Connection) -> str | None:
    """Switch this transaction to ``session_replication_role = replica`` when that only
    skips foreign-key checks the create satisfies by construction; returns the role to
    restore afterwards, or None (nothing changed: the server checks every row).

    Whether the role may set it is found by trying a plain ``SET LOCAL`` in a savepoint:
    on Supabase the supautils extension allows that to ``postgres`` while both
    ``has_parameter_privilege`` and ``set_config`` say no.
    """
    import psycopg

    conn.execute(q("batch_lock_item_tables"))  # the inserts' own lock mode, before the check
    check = one(named(conn).execute(q("batch_fk_skip_is_safe")))
    if not check["safe"]:
        return None
    try:
        with conn.transaction():  # a savepoint: a refusal leaves the create's transaction usable
            conn.execute(q("batch_replication_role_replica"))
    except psycopg.errors.InsufficientPrivilege:
        return None
    return check["role"]


def _restore_replication_role(conn: psycopg.Connection, role: str) -> None:
    """Back to the role the transaction had, by the same plain SET LOCAL that set it."""
    from psycopg import sql

    conn.execute(sql.SQL(q("batch_replication_role_restore")).format(sql.Literal(role)))


def _copy_items(
    conn: psycopg.Connection,
    stream,
    batch_id: uuid.UUID,
    prefix: str,
    on_progress: Callable[[int, int], None] | None,
) -> int:
    """COPY every item of ``stream`` into batch_items with ids ``prefix`` + counter; returns how many.

    Binary format, one tuple per item: 3 fields; the id (16 bytes: the prefix's
    12 and the 32-bit counter); the batch id; the data as jsonb (version byte 1,
    then the JSON text in UTF-8).
    """
    row_head = struct.pack("!hi", 3, 16) + bytes.fromhex(prefix.replace("-", ""))
    middle = struct.pack("!i", 16) + batch_id.bytes
    n = 0
    parts: list[bytes] = [_COPY_BINARY_HEADER]
    size = 0
    with conn.cursor() as cur:
        with cur.copy(q("batch_items_copy")) as copy:
            for text in stream.json_rows():
                n += 1
                if n > MAX_ITEMS:
                    raise OperationalError(f"more than {MAX_ITEMS} items in one batch")
                data = text.encode("utf-8")
                parts += (row_head, _COUNTER(n), middle, _JSONB_FIELD(len(data) + 1, 1), data)
                size += len(data)
                if size >= _COPY_CHUNK:
                    copy.write(b"".join(parts))
                    parts.clear()
                    size = 0
                    if on_progress:
                        on_progress(n, stream.bytes_read)
            parts.append(_COPY_BINARY_TRAILER)
            copy.write(b"".join(parts))
        if cur.rowcount != n:  # pragma: no cover - the states are made from this count
            raise OperationalError(
                f"internal error: COPY wrote {cur.rowcount} items of {n}; nothing written"
            )
    if on_progress:
        on_progress(n, stream.bytes_read)
    return n


# --- status, list, cancel -------------------------------------------------------


@dataclass(frozen=True)
class BatchInfo(JsonDoc):
    batch_id: uuid.UUID
    client_id: uuid.UUID
    client: str
    workstream: str | None
    blueprint: list[str]
    status: str
    created_at: datetime | None


def get_batch(conn: psycopg.Connection, batch_id: str | uuid.UUID) -> BatchInfo:
    """One batch; exit 1 when the id is malformed or unknown."""
    bid = batch_id if isinstance(batch_id, uuid.UUID) else parse_uuid(batch_id, "batch id")
    with tx(conn):  # a savepoint inside a caller's transaction
        info = rows_as(conn, BatchInfo).execute(q("batch_get"), (bid,)).fetchone()
    if info is None:
        raise NotFound("batch", bid)
    return info


@dataclass(frozen=True)
class StepCounts(JsonDoc):
    step: str
    position: int | None  # 1-based place in the blueprint; None for a step outside it
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    json_extra = ("total",)


@dataclass(frozen=True)
class BatchStatus(JsonDoc):
    batch: BatchInfo = field(metadata=FLATTEN)
    items: int
    steps: list[StepCounts]
    # `wsctl prune` removed its states: the counts are those kept when the prune began
    pruned: PruneSummary | None = None


def batch_status(conn: psycopg.Connection, batch_id: str | uuid.UUID) -> BatchStatus:
    """Per blueprint step, how many states are in each status (any free-text status counts).

    Steps with states but outside the blueprint (written by other tools) come last.
    """
    with tx(conn):  # read only; the transaction carries the statement timeout
        info = get_batch(conn, batch_id)
        items = scalar(conn.execute(q("batch_item_count"), (info.batch_id,)))
        states = named(conn).execute(q("batch_state_counts"), (info.batch_id,)).fetchall()
        pruned = get_summary(conn, info.batch_id)
    counts: dict[str, dict[str, int]] = {}
    if pruned is not None:  # the states are gone (or going): answer from the summary row
        items = max(items, pruned.items)
        for step, by_status in pruned.counts.items():
            counts[step] = dict(by_status)
    for r in states:
        if pruned is None:
            counts.setdefault(r["step_name"], {})[r["status"]] = r["n"]
    steps = [
        StepCounts(step=s, position=i, counts=counts.pop(s, {}))
        for i, s in enumerate(info.blueprint, start=1)
    ]
    steps += [StepCounts(step=s, position=None, counts=c) for s, c in sorted(counts.items())]
    return BatchStatus(batch=info, items=items, steps=steps, pruned=pruned)


def list_batches(
    conn: psycopg.Connection,
    *,
    client: str | None = None,
    workstream: str | None = None,
    missing_workstream: bool = False,
    limit: int | None = None,
) -> list[BatchInfo]:
    """Batches, newest first, filtered by client, workstream, or a missing workstream."""
    if workstream is not None and missing_workstream:
        raise UsageError("--workstream and --missing-workstream exclude each other")
    if workstream is not None:
        validate_slug(workstream, "workstream")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    with tx(conn):  # read only; the transaction carries the statement timeout
        client_id = find_client(conn, client).id if client is not None else None
        params = {
            "client_id": client_id,
            "workstream": workstream,
            "missing": missing_workstream,
            "limit": limit,
        }
        return rows_as(conn, BatchInfo).execute(q("batch_list"), params).fetchall()


@dataclass(frozen=True)
class CancelResult(JsonDoc):
    batch_id: uuid.UUID
    cancelled_states: int
    in_flight: int  # DISPATCHING / DISPATCHED states left to finish
    previous_status: str
    status: str = "CANCELLED"


def cancel_batch(conn: psycopg.Connection, batch_id: str | uuid.UUID) -> CancelResult:
    """PENDING and BLOCKED states become CANCELLED, and so does the batch.

    In-flight states (DISPATCHING, DISPATCHED) finish as they will. Cancelling
    a cancelled batch again sweeps states enqueued since; a COMPLETED batch is refused.
    """
    info = get_batch(conn, batch_id)
    with tx(conn):
        row = named(conn).execute(q("batch_lock"), (info.batch_id,)).fetchone()
        if row is None:  # deleted since get_batch
            raise NotFound("batch", info.batch_id)
        previous = row["status"]
        if previous == "COMPLETED":
            raise OperationalError(f"batch {info.batch_id} is COMPLETED: nothing to cancel")
        cancelled = conn.execute(q("batch_cancel_states"), (info.batch_id,)).rowcount
        conn.execute(q("batch_cancel"), (info.batch_id,))
        in_flight = scalar(conn.execute(q("batch_in_flight"), (info.batch_id,)))
    return CancelResult(
        batch_id=info.batch_id,
        cancelled_states=cancelled,
        in_flight=in_flight,
        previous_status=previous,
    )
