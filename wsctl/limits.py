"""Limits as data: a fleet-wide rate and an in-flight cap per limit key.

A limit (``wsctl.limits``) says how fast states under a key may be spawned (a token
bucket: ``rate_per_second``, refilled up to ``burst``) and how many may be in flight
at once (``max_in_flight``). Registry rows are bound to keys by templates
(``wsctl.registry_limit_keys``), filled per state with ``{client}``, ``{function}``,
``{workstream}``, ``{step}`` and ``{config.FIELD}`` (the client config of that step
and workstream; a secret reference fills in as its name). The filling happens in
the database (``wsctl.render_limit_key``), so the claim and these commands agree.

A bound key that no limit defines limits nothing (``doctor`` says so).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.errors import NotFound, OperationalError, UsageError
from wsctl.jsondoc import FLATTEN, JsonDoc, rename
from wsctl.queries import q, rows_as

if TYPE_CHECKING:
    import uuid

    import psycopg

MAX_KEY = 200
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIELDS = {"client", "function", "workstream", "step"}
_CONFIG_FIELD = re.compile(r"config\.([A-Za-z0-9_]+)")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.I)
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """``10/s``, ``600/m``, ``36000/h`` as spawns per second."""
    m = _RATE.match(text or "")
    if m is None:
        raise UsageError(f"invalid --rate {text!r}: use N/s, N/m or N/h (for example 10/s)")
    per_second = float(m.group(1)) / _PER[m.group(2)[0].lower()]
    if per_second <= 0 or not math.isfinite(per_second):
        raise UsageError(f"invalid --rate {text!r}: it must be more than 0")
    return per_second


def format_rate(per_second: float | None) -> str | None:
    """A rate as the user would write it (the largest unit that keeps it whole)."""
    if per_second is None:
        return None
    for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        n = per_second * seconds
        if abs(n - round(n)) < 1e-9:
            return f"{round(n)}/{unit}"
    return f"{per_second:g}/s"


def validate_key(key: str, what: str = "limit key") -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise UsageError(f"invalid {what}: 1 to {MAX_KEY} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise UsageError(f"invalid {what} {key!r}: no spaces or control characters")
    return key


def validate_template(template: str) -> str:
    """A key template: its placeholders are known, and no config field it names looks
    like a secret (a key must never carry one into the dispatcher's output)."""
    from wsctl.redact import is_secret_key

    validate_key(template, "limit key template")
    for name in _PLACEHOLDER.findall(template):
        m = _CONFIG_FIELD.fullmatch(name)
        if m is not None:
            if is_secret_key(m.group(1)):
                raise UsageError(
                    f"limit key template {template!r}: {{config.{m.group(1)}}} looks like a "
                    "secret; a key must be built from non-secret fields"
                )
        elif name not in _FIELDS:
            raise UsageError(
                f"limit key template {template!r}: unknown placeholder {{{name}}} (use "
                "{client}, {function}, {workstream}, {step} or {config.FIELD})"
            )
    if template.count("{") != template.count("}"):
        raise UsageError(f"limit key template {template!r}: unbalanced braces")
    return template


@dataclass(frozen=True)
class Limit:
    key: str
    rate_per_second: float | None
    burst: int | None
    max_in_flight: int | None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **definition(self),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def definition(limit: Any) -> dict[str, Any]:
    """What defines a limit, as every document shows it (``limit show``, ``stats``): its
    key, rate (as written and per second), burst and in-flight cap."""
    return {
        "key": limit.key,
        "rate": format_rate(limit.rate_per_second),
        "rate_per_second": limit.rate_per_second,
        "burst": limit.burst,
        "max_in_flight": limit.max_in_flight,
    }


@dataclass(frozen=True)
class LimitWrite(JsonDoc):
    limit: Limit = field(metadata=FLATTEN)
    created: bool


@dataclass(frozen=True)
class _LimitRow(Limit):
    created: bool = False


def get_limit(conn: psycopg.Connection, key: str) -> Limit | None:
    with tx(conn), rows_as(conn, Limit) as cur:
        return cur.execute(q("limits_get"), {"key": key}).fetchone()


def set_limit(
    conn: psycopg.Connection,
    key: str,
    *,
    rate: str | None = None,
    burst: int | None = None,
    max_in_flight: int | None = None,
    clear: frozenset[str] = frozenset(),
) -> LimitWrite:
    """Define a limit or change what is given; ``clear`` names what to drop
    (``rate``, ``max_in_flight``). A rate without a burst gets one second's worth."""
    validate_key(key)
    if burst is not None and burst < 1:
        raise UsageError("--burst must be at least 1")
    if max_in_flight is not None and max_in_flight < 1:
        raise UsageError("--max-in-flight must be at least 1")
    per_second = parse_rate(rate) if rate is not None else None
    with tx(conn, lock_timeout="5s"):
        with rows_as(conn, Limit) as cur:
            before = cur.execute(q("limits_get"), {"key": key}).fetchone()
        if "rate" in clear:
            new_rate, new_burst = None, None
        else:
            new_rate = per_second if per_second is not None else _was(before, "rate_per_second")
            if burst is not None:
                new_burst = burst
            elif _was(before, "burst") is not None:
                new_burst = _was(before, "burst")
            else:
                new_burst = max(1, math.ceil(new_rate)) if new_rate is not None else None
        new_cap = None if "max_in_flight" in clear else max_in_flight
        if new_cap is None and "max_in_flight" not in clear:
            new_cap = _was(before, "max_in_flight")
        if new_rate is None and burst is not None:
            raise UsageError("--burst needs a --rate")
        if new_rate is None and new_cap is None:
            raise UsageError(
                "a limit needs --rate N/s|N/m|N/h and/or --max-in-flight N "
                "(`wsctl limit remove KEY` removes one)"
            )
        with rows_as(conn, _LimitRow) as cur:
            row = cur.execute(
                q("limits_upsert"),
                {
                    "key": key,
                    "rate": new_rate,
                    "burst": new_burst if new_rate is not None else None,
                    "max_in_flight": new_cap,
                },
            ).fetchone()
    assert row is not None
    limit = Limit(
        row.key, row.rate_per_second, row.burst, row.max_in_flight, row.created_at, row.updated_at
    )
    return LimitWrite(limit=limit, created=row.created)


def _was(before: Limit | None, name: str) -> Any:
    return getattr(before, name) if before is not None else None


def list_limits(conn: psycopg.Connection) -> list[Limit]:
    with tx(conn), rows_as(conn, Limit) as cur:
        return cur.execute(q("limits_list")).fetchall()


def remove_limit(conn: psycopg.Connection, key: str) -> Limit:
    validate_key(key)
    with tx(conn, lock_timeout="5s"), rows_as(conn, Limit) as cur:
        gone = cur.execute(q("limits_delete"), {"key": key}).fetchone()
    if gone is None:
        raise NotFound("limit", key, by=None)
    return gone


@dataclass(frozen=True)
class BoundKey(JsonDoc):
    """A key a binding gives today, and whether a limit defines it."""

    key: str
    key_template: str = field(metadata=rename("template"))
    step: str
    workstream: str
    defined: bool


def bound_keys(conn: psycopg.Connection) -> list[BoundKey]:
    with tx(conn), rows_as(conn, BoundKey) as cur:
        return cur.execute(q("limits_bound_keys")).fetchall()


@dataclass(frozen=True)
class LimitReport:
    """``wsctl limit show``: the limit, what is under it now, and what binds it."""

    key: str
    limit: Limit | None
    in_flight: int
    tokens_now: float | None
    bound_by: list[BoundKey] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "defined": self.limit is not None,
            "limit": self.limit.to_json() if self.limit else None,
            "in_flight": self.in_flight,
            "tokens_now": None if self.tokens_now is None else round(self.tokens_now, 3),
            "bound_by": [b.to_json() for b in self.bound_by],
        }


def _usage(conn: psycopg.Connection, key: str) -> tuple[int, float | None]:
    """What is in flight under ``key`` now and the tokens its bucket holds, counted as the
    claim counts them (``wsctl.dispatch.pacing``)."""
    from wsctl.dispatch import pacing

    bucket = pacing.read_buckets(conn, [key]).get(key)
    in_flight = pacing.read_in_flight(conn, [key]).get(key, 0)
    return in_flight, (bucket.available() if bucket is not None else None)


def show_limit(conn: psycopg.Connection, key: str) -> LimitReport:
    validate_key(key)
    with tx(conn):
        with rows_as(conn, Limit) as cur:
            limit = cur.execute(q("limits_get"), {"key": key}).fetchone()
        in_flight, tokens_now = _usage(conn, key)
        with rows_as(conn, BoundKey) as cur:
            bound = [b for b in cur.execute(q("limits_bound_keys")).fetchall() if b.key == key]
    if limit is None and not bound:
        raise OperationalError(
            f"no limit {key!r} and no registry row bound to it", hint="see `wsctl limit list`"
        )
    return LimitReport(
        key=key,
        limit=limit,
        in_flight=in_flight,
        tokens_now=tokens_now,
        bound_by=bound,
    )


# --- registry bindings ----------------------------------------------------------------


def registry_bindings(conn: psycopg.Connection, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """The key templates bound to each registry row (inside the caller's transaction)."""
    out: dict[uuid.UUID, list[str]] = {i: [] for i in ids}
    if ids:
        from psycopg.rows import dict_row

        with conn.cursor(row_factory=dict_row) as cur:
            for r in cur.execute(q("limits_bindings_of_registry"), {"ids": ids}):
                out[r["registry_id"]].append(r["key_template"])
    return out


def bind_registry(conn: psycopg.Connection, registry_id: uuid.UUID, templates: list[str]) -> None:
    """Bind exactly these templates to a registry row (inside the caller's transaction)."""
    conn.execute(q("limits_unbind_registry"), {"registry_id": registry_id})
    if templates:
        conn.execute(
            q("limits_bind_registry"), {"registry_id": registry_id, "templates": templates}
        )
