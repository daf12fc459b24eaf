"""How the pipeline stands, in numbers: `wsctl stats` and the dashboard's figures.

One READ ONLY transaction, a handful of index-backed queries (sql/queries/stats.sql):

* states per (workstream, step, status): exact, an index-only scan of
  ``idx_workflow_states_batch_status``;
* the due backlog (PENDING, ``available_at`` passed): the exact PENDING counts minus
  the PENDING states not due yet (retries backing off, few; a range of
  ``idx_workflow_states_claim_pending``), and per workstream the oldest due state's
  age (an ordered walk of the same index that stops at the first);
* states dispatched, completed and failed in the last 5 minutes and the last
  hour: among the states updated in the last hour (``idx_workflow_states_updated_at``,
  migration 0016). They count states by their latest dispatch or completion, not
  events: a state dispatched twice in the hour counts once;
* DISPATCHED states past the callback timeout: ``idx_workflow_states_dispatched``;
* BLOCKED and FAILED states per reason code (NULL: ``unclassified``), never per
  ``last_error``'s free text: ``idx_workflow_states_needs_operator`` (migration 0016);
* per config row, states of the last hour that ran with it, and how many ran with a
  version the row has since changed from (``used_resolution``, written by the worker helpers);
* per limit (``wsctl.limits``), the states in flight under its key now against
  ``max_in_flight`` and the tokens its bucket holds now against ``burst``: one query for
  every limit, reading only the in-flight rows (the partial indexes of DISPATCHING and
  DISPATCHED states);
* per configured Clay webhook (client, step, workstream, index in the config's list), the
  submissions counted against its cap (``wsctl.clay.usage``; never the URL, a digest);
* the table's total row count is the planner's estimate (``pg_class.reltuples``),
  and is the only figure labelled as an estimate.

``render_prometheus`` prints the text exposition format (node_exporter's textfile
collector reads it), every metric prefixed ``wsctl_``, labels bounded to
``workstream``, ``step``, ``status`` and ``reason``, and ``key`` on the limit metrics
(bounded by the number of rows of ``wsctl.limits``, which an operator defines one by one).
Webhook capacity is per (workstream, step): the sum left over every client's webhooks and
the least any one client config has left (its URLs together); clients and URLs are no
labels (clients grow with the business, URLs carry secrets). Nothing here prints.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from wsctl.queries import one, q
from wsctl.states import ORDER, Status

if TYPE_CHECKING:
    import psycopg

UNCLASSIFIED = "unclassified"  # the reason shown for a BLOCKED/FAILED state with no reason_code
NO_WORKSTREAM = ""  # the workstream label of a legacy batch (NULL workstream_slug)
ESTIMATED = ("states_total_estimate",)  # the figures that are estimates, not counts


@contextmanager
def read_only(conn: psycopg.Connection, *, statement_timeout: str = "30s") -> Iterator[None]:
    """A READ ONLY transaction with SET LOCAL timeouts (safe behind a transaction pooler)."""
    with conn.transaction():
        conn.execute(q("stats_read_only"))
        conn.execute(q("set_local_timeouts"), (statement_timeout, "0"))
        yield


@dataclass(frozen=True)
class StateCount:
    workstream: str | None
    step: str
    status: str
    states: int


@dataclass(frozen=True)
class DueCount:
    workstream: str | None
    due: int
    oldest_due_at: datetime | None


@dataclass(frozen=True)
class RecentCount:
    workstream: str | None
    dispatched_5m: int
    dispatched_1h: int
    completed_5m: int
    completed_1h: int
    failed_5m: int
    failed_1h: int


@dataclass(frozen=True)
class OverdueCount:
    workstream: str | None
    step: str
    states: int
    oldest_dispatched_at: datetime | None


@dataclass(frozen=True)
class ReasonCount:
    workstream: str | None
    step: str
    status: str
    reason: str | None  # None: no reason_code recorded (shown as "unclassified")
    error_class: str | None
    states: int

    @property
    def reason_label(self) -> str:
        return self.reason or UNCLASSIFIED


@dataclass(frozen=True)
class ConfigUse:
    workstream: str | None
    step: str
    config_id: str
    states: int
    changed_since: int


@dataclass(frozen=True)
class LimitUse:
    """One limit and what is under its key now."""

    key: str
    rate_per_second: float | None
    burst: int | None
    max_in_flight: int | None
    in_flight: int
    tokens_now: float | None  # None: the limit has no rate

    def to_json(self) -> dict[str, Any]:
        from wsctl.limits import definition

        return {
            **definition(self),
            "tokens_now": None if self.tokens_now is None else round(self.tokens_now, 3),
            "in_flight": self.in_flight,
        }


@dataclass(frozen=True)
class WebhookCapacity:
    """Clay webhook capacity of one (workstream, step): every client config together."""

    workstream: str
    step: str
    configs: int  # client configs that name webhooks
    webhooks: int  # webhook entries over those configs
    left: int  # submissions left, summed over every webhook
    min_config_left: int  # the least any one client config has left (its webhooks together)
    exhausted_configs: int  # configs with nothing left: their states end BLOCKED


def webhook_capacity(entries: list) -> list[WebhookCapacity]:
    """Per (workstream, step), from ``wsctl.clay.usage`` entries."""
    per_config: dict[tuple[str, str], dict[str, int]] = {}
    webhooks: dict[tuple[str, str], int] = {}
    for e in entries:
        key = (e.workstream, e.step)
        left = max(e.cap - e.submitted, 0)
        cfgs = per_config.setdefault(key, {})
        cfgs[e.client] = cfgs.get(e.client, 0) + left
        webhooks[key] = webhooks.get(key, 0) + 1
    return [
        WebhookCapacity(
            workstream=ws,
            step=step,
            configs=len(cfgs),
            webhooks=webhooks[(ws, step)],
            left=sum(cfgs.values()),
            min_config_left=min(cfgs.values()),
            exhausted_configs=sum(1 for v in cfgs.values() if v == 0),
        )
        for (ws, step), cfgs in sorted(per_config.items())
    ]


@dataclass(frozen=True)
class _NotDue:
    workstream: str | None
    states: int


@dataclass(frozen=True)
class _Oldest:
    workstream: str | None
    oldest_due_at: datetime | None


def _due(counts: list[StateCount], not_due: list[_NotDue], oldest: list[_Oldest]) -> list[DueCount]:
    """Due = PENDING (exact, from the counts) minus PENDING not due yet, per workstream."""
    pending: dict[str | None, int] = {}
    for c in counts:
        pending.setdefault(c.workstream, 0)  # every workstream with states: 0 due is a figure
        if c.status == Status.PENDING:
            pending[c.workstream] = pending.get(c.workstream, 0) + c.states
    ahead = {n.workstream: n.states for n in not_due}
    first = {o.workstream: o.oldest_due_at for o in oldest}
    out = []
    for ws in sorted(pending, key=lambda w: (w is not None, w or "")):
        due = max(0, pending[ws] - ahead.get(ws, 0))
        out.append(DueCount(workstream=ws, due=due, oldest_due_at=first.get(ws) if due else None))
    return out


#: the counts of a ``RecentCount`` (and of each ``stats_recent`` row, with its config's use)
_WINDOWS = tuple(f.name for f in fields(RecentCount) if f.name != "workstream")


def _recent(rows: list[dict[str, Any]]) -> tuple[list[RecentCount], list[ConfigUse]]:
    """``stats_recent``'s rows (per workstream, step and config row) as the per-workstream
    windows and the per-config-row use."""
    sums: dict[str | None, dict[str, int]] = {}
    uses = []
    for r in rows:
        acc = sums.setdefault(r["workstream"], dict.fromkeys(_WINDOWS, 0))
        for k in _WINDOWS:
            acc[k] += r[k]
        if r["config_id"] is not None:
            use = (r["workstream"], r["step"], r["config_id"], r["used_config"], r["changed_since"])
            uses.append(ConfigUse(*use))
    recent = [
        RecentCount(workstream=ws, **acc)
        for ws, acc in sorted(sums.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))
    ]
    uses.sort(key=lambda u: (u.workstream or "", u.step, u.config_id))
    return recent, uses


def _iso(v: datetime | None) -> str | None:
    return v.isoformat() if v else None


def _age(now: datetime, then: datetime | None) -> float | None:
    return max(0.0, (now - then).total_seconds()) if then else None


@dataclass
class Stats:
    generated_at: datetime
    workstream: str | None
    callback_timeout: int
    states: list[StateCount] = field(default_factory=list)
    due: list[DueCount] = field(default_factory=list)
    recent: list[RecentCount] = field(default_factory=list)
    overdue: list[OverdueCount] = field(default_factory=list)
    reasons: list[ReasonCount] = field(default_factory=list)
    config_use: list[ConfigUse] = field(default_factory=list)
    limits: list[LimitUse] = field(default_factory=list)
    webhooks: list = field(default_factory=list)  # wsctl.clay.WebhookUsage, one per webhook
    states_total_estimate: int | None = None
    seconds: float = 0.0

    @property
    def due_total(self) -> int:
        return sum(d.due for d in self.due)

    @property
    def oldest_due_at(self) -> datetime | None:
        times = [d.oldest_due_at for d in self.due if d.oldest_due_at]
        return min(times) if times else None

    @property
    def oldest_due_age_seconds(self) -> float | None:
        return _age(self.generated_at, self.oldest_due_at)

    def totals_by_status(self) -> dict[str, int]:
        out = {str(s): 0 for s in ORDER}
        for c in self.states:
            out[c.status] = out.get(c.status, 0) + c.states
        return out

    def recent_totals(self) -> dict[str, int]:
        return {k: sum(getattr(r, k) for r in self.recent) for k in _WINDOWS}

    def webhook_capacity(self) -> list[WebhookCapacity]:
        return webhook_capacity(self.webhooks)

    def to_json(self) -> dict[str, Any]:
        """The documented ``wsctl stats --json`` document."""

        def rows(items: list) -> list[dict[str, Any]]:
            out = []
            for it in items:
                d = asdict(it)
                for k, v in d.items():
                    if isinstance(v, datetime):
                        d[k] = v.isoformat()
                    elif isinstance(v, uuid.UUID):
                        d[k] = str(v)
                out.append(d)
            return out

        reasons = rows(self.reasons)
        for d, r in zip(reasons, self.reasons, strict=True):
            d["reason"] = r.reason_label
        return {
            "generated_at": self.generated_at.isoformat(),
            "workstream": self.workstream,
            "seconds": self.seconds,
            "states": rows(self.states),
            "totals_by_status": self.totals_by_status(),
            "due": {
                "states": self.due_total,
                "oldest_due_at": _iso(self.oldest_due_at),
                "oldest_due_age_seconds": self.oldest_due_age_seconds,
                "by_workstream": rows(self.due),
            },
            "recent": {"totals": self.recent_totals(), "by_workstream": rows(self.recent)},
            "callback_timeout": self.callback_timeout,
            "dispatched_past_callback_timeout": rows(self.overdue),
            "needs_operator": reasons,
            "config_use_last_hour": rows(self.config_use),
            "limits": [lim.to_json() for lim in self.limits],
            "clay_webhooks": {
                "by_step": rows(self.webhook_capacity()),
                "webhooks": [w.to_json() for w in self.webhooks],
            },
            "states_total_estimate": self.states_total_estimate,
            "estimates": list(ESTIMATED),
        }


def collect(
    conn: psycopg.Connection,
    *,
    workstream: str | None = None,
    callback_timeout: int = 3600,
    statement_timeout: str = "30s",
) -> Stats:
    """Every figure of `wsctl stats`, read in one READ ONLY transaction."""
    import time

    from psycopg.rows import class_row, dict_row

    if workstream is not None:
        from wsctl.domain import validate_slug

        validate_slug(workstream, "workstream")
    started = time.perf_counter()
    params = {"workstream": workstream, "timeout": int(callback_timeout)}
    with read_only(conn, statement_timeout=statement_timeout):
        with conn.cursor(row_factory=dict_row) as cur:
            now = one(cur.execute(q("stats_now")))["now"]
        out = Stats(generated_at=now, workstream=workstream, callback_timeout=callback_timeout)

        def fetch(name: str, cls: type[Any]) -> list[Any]:
            """The rows of query ``name`` as ``cls`` (``dict``: by column name)."""
            with conn.cursor(row_factory=dict_row if cls is dict else class_row(cls)) as cur:
                return cur.execute(q(name), params).fetchall()

        out.states = fetch("stats_state_counts", StateCount)
        out.due = _due(
            out.states, fetch("stats_not_due", _NotDue), fetch("stats_oldest_due", _Oldest)
        )
        out.recent, out.config_use = _recent(fetch("stats_recent", dict))
        out.overdue = fetch("stats_overdue", OverdueCount)
        out.reasons = fetch("stats_reasons", ReasonCount)
        with conn.cursor(row_factory=class_row(LimitUse)) as limits_cur:
            out.limits = limits_cur.execute(q("stats_limits")).fetchall()  # fleet-wide: every limit
        from wsctl import clay

        out.webhooks = [
            w for w in clay.usage(conn) if workstream is None or w.workstream == workstream
        ]
        with conn.cursor(row_factory=dict_row) as cur:
            est = one(cur.execute(q("stats_total_estimate")))["estimate"]
        out.states_total_estimate = int(est) if est is not None and est >= 0 else None
    out.seconds = round(time.perf_counter() - started, 4)
    return out


# --- Prometheus text exposition format ----------------------------------------------------


def _label_value(v: Any) -> str:
    s = "" if v is None else str(v)
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: dict[str, Any], value: float | int | None) -> str:
    body = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
    shown = "NaN" if value is None else (repr(float(value)) if isinstance(value, float) else value)
    return f"{name}{{{body}}} {shown}" if body else f"{name} {shown}"


# One gauge per limit field: (metric, help, LimitUsage attribute, printed as a float).
# A limit without a cap or a rate has no sample for those fields.
_LIMIT_METRICS = (
    ("wsctl_limit_in_flight", "States in flight now under a limit key.", "in_flight", False),
    (
        "wsctl_limit_max_in_flight",
        "A limit's max_in_flight (limits with a cap only).",
        "max_in_flight",
        False,
    ),
    (
        "wsctl_limit_tokens",
        "Tokens a limit's bucket holds now (limits with a rate only).",
        "tokens_now",
        True,
    ),
    (
        "wsctl_limit_burst",
        "A limit's burst: its bucket's size (limits with a rate only).",
        "burst",
        False,
    ),
    (
        "wsctl_limit_rate_per_second",
        "A limit's rate (limits with a rate only).",
        "rate_per_second",
        True,
    ),
)


def render_prometheus(st: Stats) -> str:
    """The figures as Prometheus text (version 0.0.4); a legacy batch's workstream is ""."""
    lines: list[str] = []

    def family(name: str, help_: str, kind: str = "gauge") -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    family("wsctl_states", "Workflow states per workstream, step and status.")
    for c in st.states:
        lines.append(
            _sample(
                "wsctl_states",
                {"workstream": c.workstream, "step": c.step, "status": c.status},
                c.states,
            )
        )
    family("wsctl_due_states", "PENDING states whose available_at has passed.")
    for d in st.due:
        lines.append(_sample("wsctl_due_states", {"workstream": d.workstream}, d.due))
    family(
        "wsctl_oldest_due_age_seconds",
        "Age of the oldest due PENDING state (0 when none is due).",
    )
    for d in st.due:
        lines.append(
            _sample(
                "wsctl_oldest_due_age_seconds",
                {"workstream": d.workstream},
                _age(st.generated_at, d.oldest_due_at) or 0.0,
            )
        )
    windows = (("5m", "the last 5 minutes"), ("1h", "the last hour"))
    for what in ("dispatched", "completed", "failed"):
        for w, span in windows:
            name = f"wsctl_{what}_states_{w}"
            family(name, f"States {what} in {span} (by their latest {what} time).")
            for r in st.recent:
                lines.append(_sample(name, {"workstream": r.workstream}, getattr(r, f"{what}_{w}")))
    family(
        "wsctl_dispatched_past_callback_timeout_states",
        f"DISPATCHED states waiting longer than the callback timeout ({st.callback_timeout} s).",
    )
    for o in st.overdue:
        lines.append(
            _sample(
                "wsctl_dispatched_past_callback_timeout_states",
                {"workstream": o.workstream, "step": o.step},
                o.states,
            )
        )
    family("wsctl_needs_operator_states", "BLOCKED and FAILED states per reason code.")
    merged: dict[tuple[str, str, str, str], int] = {}
    for rc in st.reasons:
        key = (_label_value(rc.workstream), rc.step, rc.status, rc.reason_label)
        merged[key] = merged.get(key, 0) + rc.states
    for (ws, step, status, reason), n in merged.items():
        lines.append(
            _sample(
                "wsctl_needs_operator_states",
                {"workstream": ws, "step": step, "status": status, "reason": reason},
                n,
            )
        )
    family(
        "wsctl_config_changed_since_used_states",
        "States of the last hour that ran with a config row changed since.",
    )
    changed: dict[tuple[str, str], int] = {}
    for u in st.config_use:
        use_key = (_label_value(u.workstream), u.step)
        changed[use_key] = changed.get(use_key, 0) + u.changed_since
    for (ws, step), n in changed.items():
        lines.append(
            _sample("wsctl_config_changed_since_used_states", {"workstream": ws, "step": step}, n)
        )
    for name, help_text, attr, as_float in _LIMIT_METRICS:
        family(name, help_text)
        for lim in st.limits:
            value = getattr(lim, attr)
            if value is not None:
                lines.append(_sample(name, {"key": lim.key}, float(value) if as_float else value))
    caps = st.webhook_capacity()
    for name, attr, help_ in (
        ("wsctl_clay_webhook_left", "left", "Clay webhook submissions left, every client's."),
        (
            "wsctl_clay_webhook_min_config_left",
            "min_config_left",
            "The least Clay webhook submissions any one client config has left.",
        ),
        (
            "wsctl_clay_webhook_exhausted_configs",
            "exhausted_configs",
            "Client configs whose Clay webhooks are all at their cap.",
        ),
        ("wsctl_clay_webhooks", "webhooks", "Clay webhook URLs configured."),
    ):
        family(name, help_ + " Per workstream and step.")
        for cap in caps:
            lines.append(
                _sample(name, {"workstream": cap.workstream, "step": cap.step}, getattr(cap, attr))
            )
    family("wsctl_states_total_estimate", "Rows of workflow_states: the planner's estimate.")
    if st.states_total_estimate is not None:  # none before the table's first ANALYZE
        lines.append(_sample("wsctl_states_total_estimate", {}, st.states_total_estimate))
    family("wsctl_stats_duration_seconds", "Time the stats queries took.")
    lines.append(_sample("wsctl_stats_duration_seconds", {}, float(st.seconds)))
    return "\n".join(lines) + "\n"


__all__ = [
    "UNCLASSIFIED",
    "LimitUse",
    "Stats",
    "WebhookCapacity",
    "collect",
    "read_only",
    "render_prometheus",
]
