"""How a dispatch pass and a dispatch plan are shown."""

from __future__ import annotations

import sys

from wsctl.cli import output


def _counts(summary) -> list[tuple[str, object]]:
    """The pass's counts in one order: claimed, each outcome (wsctl.states.Outcome), reconciled."""
    from wsctl.states import Outcome

    rows: list[tuple[str, object]] = [("claimed", summary.claimed)]
    rows += [(o.value, summary.counts[o]) for o in Outcome]
    rows.append(("reconciled", summary.reconciled))
    return rows


def _tail(summary) -> list[str]:
    """'... and N more' when failure lines were left out, then the count per reason code."""
    lines = []
    more = summary.failures_total - len(summary.errors)
    if more > 0:
        lines.append(f"  ... and {more} more")
    if summary.deferred:
        keys = ", ".join(f"{key}={n}" for key, n in summary.deferred.items())
        lines.append(f"  held back by limits (still PENDING, no attempt counted): {keys}")
    if summary.reason_counts:
        counted = ", ".join(f"{code}={n}" for code, n in sorted(summary.reason_counts.items()))
        lines.append(f"  by reason: {counted}")
    return lines


def render_summary(summary, *, as_json: bool, compact: bool = False, lines: bool = False) -> None:
    if as_json:
        if lines:
            import json

            output.line(json.dumps(summary.to_json(), separators=(",", ":")))
            sys.stdout.flush()
        else:
            output.emit_json(summary.to_json())
        return
    if compact or not output.is_tty():
        parts = [f"{k}={v}" for k, v in _counts(summary) if v or k in _ALWAYS]
        output.line("dispatch: " + " ".join(parts) + f" seconds={summary.seconds:.3f}")
        for notice in summary.notices:
            output.line(f"  note: {notice}")
        for e in summary.errors:
            output.line(f"  {e['status']} state={e['state_id']} [{e['reason_code']}] {e['reason']}")
        for line in _tail(summary):
            output.line(line)
        return
    rows = [*_counts(summary), ("seconds", f"{summary.seconds:.3f}")]
    output.table(["", "count"], rows, title=f"dispatch pass ({summary.backend})")
    for notice in summary.notices:
        output.line(f"note: {notice}")
    if summary.errors:
        output.table(
            ["status", "state", "item", "reason code", "reason"],
            [
                (e["status"], e["state_id"], e["item_id"], e["reason_code"], e["reason"])
                for e in summary.errors
            ],
        )
    for line in _tail(summary):
        output.line(line.strip())


# Shown even when zero in the one-line form (the others only when they happened).
_ALWAYS = frozenset(
    {"claimed", "dispatched", "completed", "blocked", "retried", "failed", "reconciled"}
)


def render_plan(rows, *, total: int, as_json: bool) -> None:
    from collections import Counter

    deferred = Counter(r.held_by for r in rows if r.held_by)
    if as_json:
        output.emit_json(
            {
                "due": total,
                "deferred": dict(sorted(deferred.items())),
                "plan": [r.__dict__ for r in rows],
            }
        )
        return
    shown = (
        f"{len(rows):,} state(s) due"
        if total <= len(rows)
        else f"the first {len(rows):,} of {total:,} states due"
    )
    output.table(
        ["item", "step", "workstream", "function", "type", "blocked because", "held back by"],
        [
            (r.item_id, r.step, r.workstream, r.function, r.type, r.blocked_reason, r.held_by)
            for r in rows
        ],
        title=f"dispatch plan: {shown}",
    )
    if deferred:
        keys = ", ".join(f"{key}={n}" for key, n in sorted(deferred.items()))
        output.line(f"held back by limits now (would stay PENDING): {keys}")
