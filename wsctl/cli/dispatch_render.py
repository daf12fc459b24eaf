"""How a dispatch pass and a dispatch plan are shown."""

from __future__ import annotations

import sys

from wsctl.cli import output

_FIELDS = ("claimed", "dispatched", "completed", "blocked", "retried", "failed", "reconciled")


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
        parts = [f"{k}={getattr(summary, k)}" for k in _FIELDS]
        if summary.released:
            parts.append(f"released={summary.released}")
        if summary.cancelled:
            parts.append(f"cancelled={summary.cancelled}")
        output.line("dispatch: " + " ".join(parts) + f" seconds={summary.seconds:.3f}")
        for e in summary.errors:
            output.line(f"  {e['status']} state={e['state_id']} {e['reason']}")
        return
    rows = [(k, getattr(summary, k)) for k in _FIELDS] + [("seconds", f"{summary.seconds:.3f}")]
    output.table(["", "count"], rows, title=f"dispatch pass ({summary.backend})")
    if summary.errors:
        output.table(
            ["status", "state", "item", "reason"],
            [(e["status"], e["state_id"], e["item_id"], e["reason"]) for e in summary.errors],
        )


def render_plan(rows, *, as_json: bool) -> None:
    if as_json:
        output.emit_json({"plan": [r.__dict__ for r in rows]})
        return
    output.table(
        ["item", "step", "workstream", "function", "type", "blocked because"],
        [(r.item_id, r.step, r.workstream, r.function, r.type, r.blocked_reason) for r in rows],
        title=f"dispatch plan: {len(rows)} state(s) due",
    )
