"""Helpers for code running inside the Modal functions (the seed's worker helpers).

The connection comes from wsctl's settings (``WSCTL_DATABASE_URL``, typically
from a Modal secret). Inside Modal there is no embedded database to fall back
to, so a missing URL is an ``EnvError``. Each call opens and closes its own
short connection, unless the caller passes ``conn=`` (tests, local backend).

``get_client_config`` returns a config only when the workstream is known for
certain (explicit or recorded on the batch). It raises
``ConfigResolutionError`` on a mismatch, on several candidates, or when the
workstream is merely inferred, instead of returning a config that may belong
to another workstream. Log lines follow the seed::

    [CONFIG] item=<item id> workflow=<slug> workstream=<slug> -> config found

Secret references in the config (``{"$secret": "NAME"}``, see
``wsctl.secret_refs``) are resolved here, inside the function, from its
environment (a Modal secret); a missing one raises ``MissingSecret``, which
the dispatcher treats as permanent for the item (BLOCKED). Every log line of
these helpers is redacted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsctl.domain import parse_uuid
from wsctl.errors import EnvError, OperationalError
from wsctl.queries import q, scalar
from wsctl.redact import RedactingFilter, first_line, redact_text, remember
from wsctl.resolve import AMBIGUOUS, BATCH, EXPLICIT, MISMATCH, NOT_FOUND
from wsctl.secret_refs import MissingSecret, resolve

if TYPE_CHECKING:
    import psycopg

    from wsctl.resolve import Resolution

log = logging.getLogger("wsctl.worker")
log.addFilter(RedactingFilter())


class ConfigResolutionError(OperationalError):
    """The config cannot be used: mismatch, ambiguity, or a merely inferred workstream."""

    def __init__(self, message: str, *, resolution: Resolution | None = None, hint=None):
        super().__init__(message, hint=hint)
        self.resolution = resolution


@contextmanager
def _connection(conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
    if conn is not None:
        yield conn
        return
    from wsctl import db, settings

    s = settings.load()
    if not s.database_url:
        raise EnvError(
            "no database URL for the worker helpers: set WSCTL_DATABASE_URL "
            "(for example from a Modal secret); they never use an embedded database"
        )
    with db.connect(s.database_url, s, application_name="wsctl-worker") as c:
        yield c


@contextmanager
def connection(conn: psycopg.Connection | None = None) -> Iterator[psycopg.Connection]:
    """The worker helpers' connection (``WSCTL_DATABASE_URL``), for a function's own calls
    such as ``wsctl.clay.send``; ``conn`` when given (tests, one connection per call)."""
    with _connection(conn) as c:
        yield c


def _short(item_id: Any) -> str:
    # The whole id: ids share a time-ordered prefix, so 8 characters tell none apart.
    return str(item_id)


def get_workstream_slug(item_id: str, *, conn: psycopg.Connection | None = None) -> str | None:
    """The ``workstream_slug`` of the item's batch; None for a legacy batch that has none.

    An unknown item raises ``OperationalError`` (as ``get_client_config`` does).
    """
    item = parse_uuid(item_id, "item id")
    from wsctl.queries import named

    with _connection(conn) as c, named(c) as cur:
        row = cur.execute(q("worker_item_workstream"), (item,)).fetchone()
    if row is None:
        raise OperationalError(f"no batch item with id {item}")
    if row["workstream_slug"] is None:
        log.warning(
            "[CONFIG] item=%s workstream=None (the batch has no workstream_slug)", _short(item)
        )
    return row["workstream_slug"]


def _refusal(res: Resolution) -> str:
    what = f"item {res.item_id} workflow {res.step}"
    if res.status == MISMATCH:
        return (
            f"{what}: workstream {res.explicit_workstream} was passed but the item's "
            f"batch carries {res.batch_workstream}; refusing to choose"
        )
    backfill = (
        f"`wsctl backfill workstream-slug` would set {res.backfill_workstream}"
        if res.backfill_workstream
        else "`wsctl backfill workstream-slug` cannot infer one"
    )
    if res.status == AMBIGUOUS:
        return (
            f"{what}: the batch has no workstream_slug and several workstreams fit "
            f"({', '.join(res.candidates)}); {backfill}"
        )
    if res.inferred:
        return (
            f"{what}: the batch has no workstream_slug; {res.workstream} is only "
            f"inferred and is not used; {backfill}"
        )
    return f"{what}: the batch has no workstream_slug and none can be inferred; {backfill}"


def _certainly_none(res: Resolution) -> bool:
    """No config, for certain: the workstream is explicit or recorded and has none."""
    return res.status == NOT_FOUND and res.source in (EXPLICIT, BATCH)


def get_client_config(
    item_id: str,
    workflow_slug: str,
    workstream_slug: str | None = None,
    *,
    conn: psycopg.Connection | None = None,
) -> dict | None:
    """The client's config for ``workflow_slug`` in the item's workstream, or None (no config).

    Secret references in it are resolved from this process's environment;
    ``MissingSecret`` (permanent for the item) when one is not set.

    ``workstream_slug`` is the one the dispatcher passed (the batch's); when it
    is None the batch's is used. Raises ``ConfigResolutionError`` whenever the
    workstream is not known for certain.
    """
    from wsctl.resolve import resolve_config

    item = parse_uuid(item_id, "item id")
    with _connection(conn) as c:
        res = resolve_config(c, step=workflow_slug, item_id=item, workstream=workstream_slug)
        # What the step goes on with (a config, or none for certain) is noted on its state;
        # a refusal writes nothing.
        if res.trusted or _certainly_none(res):
            record_used_resolution(c, res)
    head = f"[CONFIG] item={_short(item)} workflow={workflow_slug} workstream={res.workstream}"
    for warning in res.warnings:
        log.warning("[CONFIG] item=%s %s", _short(item), warning)
    if res.trusted:
        log.info("%s -> config found", head)
        if res.config is None:
            return None
        remember(res.config)
        return resolve(
            res.config,
            where=f"the config of {res.client.name if res.client else '?'} for {workflow_slug} "
            f"in workstream {res.workstream}",
        )
    if _certainly_none(res):
        log.info("%s -> no config", head)
        return None
    if res.status == AMBIGUOUS:
        log.warning("%s -> ambiguous: %s", head, ", ".join(res.candidates))
    elif res.status == MISMATCH:
        log.warning(
            "%s -> mismatch: batch=%s explicit=%s",
            head,
            res.batch_workstream,
            res.explicit_workstream,
        )
    elif res.inferred:
        log.warning("%s -> inferred, refused", head)
    else:
        log.warning("%s -> no config", head)
    raise ConfigResolutionError(_refusal(res), resolution=res)


def record_used_resolution(conn: psycopg.Connection, res: Resolution) -> bool:
    """Note on the item's state for the step what was resolved (``used_resolution``).

    The client config row (id, ``updated_at``) and the registry row of (step,
    workstream), with the resolution's status and source, so that `item show`,
    `stats` and the dashboard say what a step really used, and whether the config
    changed since. Runs in a savepoint of the caller's transaction (or its own); a
    failure is logged and never fails the step. False when no state matched.
    """
    import psycopg

    if res.item_id is None:
        return False
    params = {
        "item_id": res.item_id,
        "step": res.step,
        "workstream": res.workstream,
        "config_id": res.config_id if res.found else None,
        "config_updated_at": res.updated_at if res.found else None,
        "status": res.status,
        "source": res.source,
    }
    try:
        with conn.transaction():
            return conn.execute(q("stats_record_used_resolution"), params).fetchone() is not None
    except psycopg.Error as exc:
        log.warning(
            "[CONFIG] item=%s workflow=%s: could not record the resolution: %s",
            _short(res.item_id),
            res.step,
            first_line(exc),
        )
        return False


def complete_step(state_id: str, *, conn: psycopg.Connection | None = None) -> bool:
    """Mark a state COMPLETED and enqueue the next blueprint step; False if it already was."""
    sid = parse_uuid(state_id, "state id")
    with _connection(conn) as c:
        return bool(scalar(c.execute(q("worker_complete_step"), (sid,))))


def fail_step(state_id: str, error: str, *, conn: psycopg.Connection | None = None) -> bool:
    """Mark a state FAILED with ``error``; False when it was COMPLETED, CANCELLED or unknown."""
    sid = parse_uuid(state_id, "state id")
    with _connection(conn) as c:
        reason = redact_text(str(error))  # an exception text may quote a secret
        return bool(scalar(c.execute(q("worker_fail_step"), (sid, reason))))


__all__ = [
    "ConfigResolutionError",
    "MissingSecret",
    "complete_step",
    "fail_step",
    "get_client_config",
    "get_workstream_slug",
    "record_used_resolution",
]


# -- The dispatch a running function belongs to (dispatch work) --------------


@dataclass(frozen=True, slots=True)
class CurrentDispatch:
    """The state a running function was dispatched for, at the claim's generation."""

    state_id: uuid.UUID
    dispatch_generation: int
    status: str


def current_dispatch(
    item_id: str, step_name: str, *, conn: psycopg.Connection | None = None
) -> CurrentDispatch | None:
    """The item-step's state while the dispatcher holds it (DISPATCHING), else None.

    Every claim increments ``dispatch_generation``, so a function that binds
    its side effects (a callback token, a Clay post) to this pair is fenced
    against any later run of the same item-step.
    """
    from psycopg.rows import class_row

    item = parse_uuid(item_id, "item id")
    with _connection(conn) as c, c.cursor(row_factory=class_row(CurrentDispatch)) as cur:
        return cur.execute(q("dispatch_worker_current"), (item, step_name)).fetchone()


__all__ += ["CurrentDispatch", "current_dispatch"]


def limit_keys(item_id: str, step: str, *, conn: psycopg.Connection | None = None) -> list[str]:
    """The limit keys the item's state of ``step`` is under (``wsctl limit``)."""
    item = parse_uuid(item_id, "item id")
    with _connection(conn) as c:
        from psycopg.rows import dict_row

        from wsctl.db import tx

        with tx(c), c.cursor(row_factory=dict_row) as cur:
            row = cur.execute(q("limits_keys_of_item"), {"item_id": item, "step": step}).fetchone()
    return list(row["keys"] or []) if row is not None else []


def take_limit_token(
    item_id: str,
    step: str,
    *,
    max_wait: float = 30.0,
    conn: psycopg.Connection | None = None,
) -> float:
    """Take a token under each of the item's limit keys just before calling the service,
    waiting at most ``max_wait`` seconds; returns the seconds waited.

    The dispatcher paces its spawns by the same limits, but Modal may run queued inputs
    in a burst (cold starts): this keeps what reaches the service within the limit.
    Raises ``wsctl.dispatch.pacing.LimitWait`` (transient, no attempt counted: the
    state goes back to PENDING) when no token came in time.
    """
    from wsctl.dispatch.pacing import take_call_token

    with _connection(conn) as c:
        keys = limit_keys(item_id, step, conn=c)
        return take_call_token(c, keys, max_wait=max_wait) if keys else 0.0
