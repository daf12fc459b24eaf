"""The claim under limits: fleet-wide rates and in-flight caps per limit key.

A pass claims through here when a registry row is bound to a limit key
(``wsctl limit``, ``registry add --limit-key``) or its backend caps the calls
per function (Modal: 2,000 at Modal at once, ``modal:FUNCTION``). Otherwise
the one-statement claim of ``engine._claim`` runs unchanged.

One transaction per claim:

1. lock the due candidates (``FOR UPDATE SKIP LOCKED``, as the plain claim);
2. their limit keys, rendered once per (batch, step) (``wsctl.limit_keys_of``);
3. lock the keys' limits in key order (every claimer and every worker takes
   them in that order): the claims under one key are serialized, whichever
   host they run on, for the few milliseconds this transaction lasts;
4. refill each token bucket from the database's clock, count the states in
   flight under the keys that cap them, and admit candidates in order while
   every key they are under has a token and a free slot;
5. flip the admitted to DISPATCHING and write the buckets back; commit.

The others are not written at all: they stay PENDING (or with their expired
lease) with no attempt counted, and the pass reports them per key
(``deferred``).

A bucket's capacity is ``burst - 1`` tokens (``burst`` when it is 1): taking a
token is not the request reaching the service, and the token left over
absorbs up to ``1/rate`` seconds of difference between the two, so that what
arrives stays within ``rate x t + burst`` in every window of ``t`` seconds.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.queries import q

if TYPE_CHECKING:
    import psycopg

#: The prefix of a key that counts calls at Modal (until the call returns) rather than
#: states in flight (until they finish); the backend's per-function cap uses it.
MODAL_PREFIX = "modal:"
#: How long a pass held back only by in-flight caps waits before it looks again.
IN_FLIGHT_POLL = 0.2


def function_key(function: str) -> str:
    return f"{MODAL_PREFIX}{function}"


def capacity(burst: int) -> float:
    """Tokens a bucket holds at most: one short of the burst (see the module docstring)."""
    return float(burst - 1 if burst > 1 else burst)


#: what a key lacks for one more state (``Limits.shortfall``)
TOKEN = "token"
SLOT = "slot"


@dataclass(slots=True)
class Candidate:
    id: uuid.UUID
    batch_id: uuid.UUID
    step_name: str
    reclaimed: bool


@dataclass(slots=True)
class Group:
    batch_id: uuid.UUID
    step_name: str
    function: str | None
    keys: list[str]


@dataclass(slots=True)
class Bucket:
    key: str
    rate_per_second: float | None
    burst: int | None
    max_in_flight: int | None
    tokens: float | None
    refilled_at: datetime | None
    call_tokens: float | None
    call_refilled_at: datetime | None
    now: datetime

    def available(self, *, call: bool = False) -> float | None:
        """Tokens in the bucket now (None: no rate)."""
        if self.rate_per_second is None or self.burst is None:
            return None
        cap = capacity(self.burst)
        tokens = self.call_tokens if call else self.tokens
        at = self.call_refilled_at if call else self.refilled_at
        if tokens is None or at is None:
            return cap
        elapsed = max(0.0, (self.now - at).total_seconds())
        return min(cap, tokens + self.rate_per_second * elapsed)

    def seconds_to_token(self, tokens: float) -> float:
        """How long until a bucket holding ``tokens`` has a whole one (it has a rate)."""
        assert self.rate_per_second, "a bucket without a rate has no tokens"
        return max(0.0, 1.0 - tokens) / self.rate_per_second


@dataclass(slots=True)
class InFlight:
    key: str
    in_flight: int
    at_modal: int

    @property
    def counted(self) -> int:
        """What the key's cap counts: calls still at Modal for a ``modal:`` key, else
        states in flight until they finish."""
        return self.at_modal if self.key.startswith(MODAL_PREFIX) else self.in_flight


@dataclass
class Admission:
    """What the limits made of one set of candidates."""

    admitted: list[Candidate] = field(default_factory=list)
    #: candidates held back, per key that held them (a candidate may count under several)
    deferred: dict[str, list[uuid.UUID]] = field(default_factory=dict)
    #: the (batch, step) groups with a candidate held back: a pass looks past them
    held_groups: set[tuple[uuid.UUID, str]] = field(default_factory=set)
    #: seconds until a held-back rate has a token again (None: none was held by a rate)
    rate_wait: float | None = None
    #: tokens left per rate key, and the clock they were read at (written back by the claim)
    tokens_left: dict[str, tuple[float, datetime]] = field(default_factory=dict)


@dataclass
class Limits:
    """The limits one claim works with: keys per group, buckets, what is in flight."""

    groups: dict[tuple[uuid.UUID, str], Group]
    buckets: dict[str, Bucket]
    in_flight: dict[str, int]
    function_cap: int | None

    def keys_of(self, group: Group) -> list[str]:
        keys = list(group.keys)
        if self.function_cap is not None and group.function:
            keys.append(function_key(group.function))
        return keys

    def cap_of(self, key: str) -> int | None:
        b = self.buckets.get(key)
        if b is not None:
            return b.max_in_flight
        if key.startswith(MODAL_PREFIX) and self.function_cap is not None:
            return self.function_cap
        return None

    def tokens_now(self) -> dict[str, float]:
        """Each rate's tokens now (a key without a rate has none here)."""
        return {k: t for k, b in self.buckets.items() if (t := b.available()) is not None}

    def shortfall(self, key: str, tokens: dict[str, float], claiming: int = 0) -> str | None:
        """What ``key`` lacks for one more state: ``TOKEN`` (its rate has no whole token in
        ``tokens``), ``SLOT`` (its cap is full, counting ``claiming`` more), or None."""
        if key in tokens and tokens[key] < 1.0:
            return TOKEN
        cap = self.cap_of(key)
        if cap is not None and self.in_flight.get(key, 0) + claiming >= cap:
            return SLOT
        return None

    def admit(self, candidates: list[Candidate]) -> Admission:
        out = Admission()
        tokens = self.tokens_now()
        used = Counter[str]()
        for c in candidates:
            group = self.groups.get((c.batch_id, c.step_name))
            keys = self.keys_of(group) if group is not None else []
            short = [key for key in keys if self.shortfall(key, tokens, used[key])]
            if short:
                for key in short:
                    out.deferred.setdefault(key, []).append(c.id)
                out.held_groups.add((c.batch_id, c.step_name))
                continue
            for key in keys:
                if key in tokens:
                    tokens[key] -= 1.0
                used[key] += 1
            out.admitted.append(c)
        for key, left in tokens.items():
            b = self.buckets[key]
            out.tokens_left[key] = (left, b.now)
            if key in out.deferred and left < 1.0 and b.rate_per_second:
                wait = b.seconds_to_token(left)
                out.rate_wait = wait if out.rate_wait is None else min(out.rate_wait, wait)
        return out


def _read(conn: psycopg.Connection, cls: type, query: str, params: Any) -> list[Any]:
    from wsctl.dispatch.engine import _read as read

    return read(conn, cls, query, params)


def load_groups(
    conn: psycopg.Connection, pairs: set[tuple[uuid.UUID, str]]
) -> dict[tuple[uuid.UUID, str], Group]:
    if not pairs:
        return {}
    ordered = sorted(pairs, key=lambda p: (str(p[0]), p[1]))
    rows = _read(
        conn,
        Group,
        "dispatch_limit_groups",
        {"batches": [p[0] for p in ordered], "steps": [p[1] for p in ordered]},
    )
    return {(g.batch_id, g.step_name): g for g in rows}


def load_limits(
    conn: psycopg.Connection,
    groups: dict[tuple[uuid.UUID, str], Group],
    function_cap: int | None,
    *,
    lock: bool,
) -> Limits:
    """The buckets and in-flight counts for the keys of ``groups`` (locked when ``lock``)."""
    keys: set[str] = set()
    probe = Limits(groups, {}, {}, function_cap)
    for g in groups.values():
        keys.update(probe.keys_of(g))
    if not keys:
        return probe
    wanted = sorted(keys)
    if lock:
        conn.execute(q("dispatch_limits_lock"), {"keys": wanted})
    limits = Limits(groups, read_buckets(conn, wanted), {}, function_cap)
    capped = [k for k in wanted if limits.cap_of(k) is not None]
    if capped:
        limits.in_flight = read_in_flight(conn, capped)
    return limits


def read_buckets(conn: psycopg.Connection, keys: list[str]) -> dict[str, Bucket]:
    """The limits of ``keys`` as they stand, with the database's clock (no lock)."""
    return {b.key: b for b in _read(conn, Bucket, "dispatch_limits_buckets", {"keys": keys})}


def read_in_flight(conn: psycopg.Connection, keys: list[str]) -> dict[str, int]:
    """What each key's in-flight cap counts now (``InFlight.counted``)."""
    return {
        r.key: r.counted for r in _read(conn, InFlight, "dispatch_limits_in_flight", {"keys": keys})
    }


@dataclass
class LimitedClaim:
    """One claim under limits: the claimed rows (``engine.ClaimRow``) and what was held."""

    rows: list[Any]
    admission: Admission


def claim_limited(
    conn: psycopg.Connection,
    *,
    n: int,
    token: uuid.UUID,
    lease_seconds: int,
    claimed_by: str,
    workstream: str | None,
    function_cap: int | None,
    skip: set[tuple[uuid.UUID, str]],
) -> LimitedClaim:
    """Claim up to ``n`` due states that the limits admit (one transaction)."""
    from psycopg import sql

    from wsctl.dispatch.engine import ClaimRow, by_name, claim_parts

    scope = sql.SQL(q("dispatch_claim_scope_workstream") if workstream else "")
    skip_sql = sql.SQL(q("dispatch_claim_skip_groups") if skip else "")
    statement = sql.SQL(q("dispatch_claim_candidates")).format(scope=scope, skip=skip_sql)
    ordered_skip = sorted(skip, key=lambda p: (str(p[0]), p[1]))
    with tx(conn):
        with conn.cursor(row_factory=by_name(Candidate)) as cur:
            cur.execute(
                statement,
                {
                    "limit": n,
                    "workstream": workstream,
                    "skip_batches": [p[0] for p in ordered_skip],
                    "skip_steps": [p[1] for p in ordered_skip],
                },
            )
            candidates = cur.fetchall()
        if not candidates:
            return LimitedClaim([], Admission())
        groups = load_groups(conn, {(c.batch_id, c.step_name) for c in candidates})
        limits = load_limits(conn, groups, function_cap, lock=True)
        admission = limits.admit(candidates)
        if admission.tokens_left:
            keys = sorted(admission.tokens_left)
            conn.execute(
                q("dispatch_limits_take"),
                {
                    "call": False,
                    "keys": keys,
                    "tokens": [admission.tokens_left[k][0] for k in keys],
                    "ats": [admission.tokens_left[k][1] for k in keys],
                },
            )
        rows: list[Any] = []
        if admission.admitted:
            with conn.cursor(row_factory=by_name(ClaimRow)) as cur:
                cur.execute(
                    sql.SQL(q("dispatch_claim_admitted")).format(**claim_parts()),
                    {
                        "ids": [c.id for c in admission.admitted],
                        "reclaimed": [c.id for c in admission.admitted if c.reclaimed],
                        "token": token,
                        "lease_seconds": lease_seconds,
                        "claimed_by": claimed_by,
                    },
                )
                rows = cur.fetchall()
    return LimitedClaim(rows, admission)


def applies(conn: psycopg.Connection, function_cap: int | None) -> bool:
    """Whether claims go through the limits: the backend caps calls per function, or a
    registry row is bound to a limit key (one ``SELECT EXISTS``)."""
    from wsctl.queries import scalar

    if function_cap is not None:
        return True
    with tx(conn):
        return bool(scalar(conn.execute(q("dispatch_limits_bound"))))


# -- The point of call --------------------------------------------------------


class LimitWait(Exception):
    """No token under a limit within the wait allowed at the point of call.

    Transient and not counted as an attempt: the state goes back to PENDING."""

    reason_code = "limit_wait"
    error_class = "transient"


def take_call_token(
    conn: psycopg.Connection,
    keys: list[str],
    *,
    max_wait: float = 30.0,
    sleep: Any = time.sleep,
) -> float:
    """Take one token from each key's point-of-call bucket, waiting at most ``max_wait``
    seconds for them; returns the seconds waited. Keys without a rate take nothing.

    Raises ``LimitWait`` when the tokens did not come in time (nothing is taken then).
    """
    wanted = sorted(set(keys))
    if not wanted:
        return 0.0
    started = time.monotonic()
    while True:
        with tx(conn, lock_timeout="5s"):
            conn.execute(q("dispatch_limits_lock"), {"keys": wanted})
            rated = []  # (bucket, tokens now) of the keys with a rate, in key order
            for b in sorted(read_buckets(conn, wanted).values(), key=lambda b: b.key):
                tokens = b.available(call=True)
                if tokens is not None:
                    rated.append((b, tokens))
            short = [(b, tokens) for b, tokens in rated if tokens < 1.0]
            if not short:
                if rated:
                    conn.execute(
                        q("dispatch_limits_take"),
                        {
                            "call": True,
                            "keys": [b.key for b, _ in rated],
                            "tokens": [tokens - 1.0 for _, tokens in rated],
                            "ats": [b.now for b, _ in rated],
                        },
                    )
                return time.monotonic() - started
            wait = max(b.seconds_to_token(tokens) for b, tokens in short)
        waited = time.monotonic() - started
        if waited + wait > max_wait:
            names = ", ".join(b.key for b, _ in short)
            raise LimitWait(
                f"no token under limit {names} within {max_wait:g} s at the point of call"
            )
        sleep(min(wait + 0.001, max(0.0, max_wait - waited)))


@dataclass
class Pacer:
    """A pass's claims through the limits, and what they held back.

    A round is the claims between two waits: groups held back in it are skipped
    by its later claims (unlimited work behind them is still claimed);
    ``next_wait`` ends it. Held back by a rate, the pass waits for the next
    token; held back only by full in-flight caps (slots free when callbacks
    come), it looks again after 0.2 s, doubling to 2 s while nothing is claimed.
    """

    function_cap: int | None
    skip: set[tuple[uuid.UUID, str]] = field(default_factory=set)
    #: per key, the states held back and not claimed since (what the pass reports)
    held: dict[str, set[uuid.UUID]] = field(default_factory=dict)
    #: the shortest wait a claim of this round gave (a rate's next token, or the look
    #: again of a full cap), and whether a rate held anything back
    wait: float | None = None
    rated: bool = False
    idle_rounds: int = 0  # consecutive cap-only rounds that claimed nothing
    examine: int = 0  # candidates a claim locks: a few dozen while paced, else the chunk

    @property
    def holding(self) -> bool:
        """Whether this round held anything back."""
        return bool(self.skip)

    def claim(self, conn: psycopg.Connection, opts: Any, n: int, token: uuid.UUID) -> list[Any]:
        got = claim_limited(
            conn,
            n=min(n, self.examine or n),
            token=token,
            lease_seconds=opts.lease_seconds,
            claimed_by=opts.claimed_by,
            workstream=opts.workstream,
            function_cap=self.function_cap,
            skip=self.skip,
        )
        adm = got.admission
        for key, deferred_ids in adm.deferred.items():
            self.held.setdefault(key, set()).update(deferred_ids)
        if adm.deferred:
            self.skip.update(adm.held_groups)
            wait = max(0.005, adm.rate_wait) if adm.rate_wait is not None else IN_FLIGHT_POLL
            self.wait = wait if self.wait is None else min(self.wait, wait)
            self.rated = self.rated or adm.rate_wait is not None
            self.examine = max(32, 2 * len(adm.admitted) + 16)
        else:
            self.examine = 0
        if got.rows:
            self.idle_rounds = 0
        for r in got.rows:
            for held_ids in self.held.values():
                held_ids.discard(r.id)
        return got.rows

    def next_wait(self) -> float | None:
        """End the round: how long to wait before claiming again (None: nothing was held
        back, so nothing more is due)."""
        if not self.skip:
            return None
        wait = self.wait if self.wait is not None else IN_FLIGHT_POLL
        if not self.rated:
            wait = min(2.0, wait * 2**self.idle_rounds)
            self.idle_rounds += 1
        self.skip.clear()
        self.wait, self.rated = None, False
        return wait

    def deferred(self) -> dict[str, int]:
        return {key: len(ids) for key, ids in sorted(self.held.items()) if ids}


def holding_back(
    conn: psycopg.Connection,
    batch_id: uuid.UUID,
    step: str,
    *,
    function_cap: int | None = None,
) -> list[str]:
    """Why a due state of ``step`` in ``batch_id`` would be held back by a limit now: one
    line per key without a token or a free slot (empty when none holds it). Read only."""
    groups = load_groups(conn, {(batch_id, step)})
    group = groups.get((batch_id, step))
    if group is None:
        return []
    limits = load_limits(conn, groups, function_cap, lock=False)
    tokens = limits.tokens_now()
    out = []
    for key in limits.keys_of(group):
        lacks = limits.shortfall(key, tokens)
        if lacks == TOKEN:
            b = limits.buckets[key]
            out.append(
                f"waiting for limit {key}: no token now (rate {b.rate_per_second:g}/s, "
                f"burst {b.burst}; the next in {b.seconds_to_token(tokens[key]):.2f} s)"
            )
        elif lacks == SLOT:
            used, cap = limits.in_flight.get(key, 0), limits.cap_of(key)
            out.append(f"waiting for limit {key}: {used} of {cap} in flight")
    return out
