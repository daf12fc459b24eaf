"""`wsctl stats`: how the pipeline stands, for people, --json, or Prometheus."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import CallbackTimeout, Json, WorkstreamFilter, state


def _render(st) -> None:
    from wsctl.cli import output

    output.table(
        ["workstream", "step", "status", "states"],
        [(c.workstream, c.step, c.status, c.states) for c in st.states],
        title="states",
    )
    age = st.oldest_due_age_seconds
    output.line(
        f"due backlog: {st.due_total} state(s)"
        + (f", oldest due {age:.0f} s ago" if age is not None else "")
    )
    t = st.recent_totals()
    output.line(
        f"last 5 min: dispatched {t['dispatched_5m']}, completed {t['completed_5m']}, "
        f"failed {t['failed_5m']}; last hour: dispatched {t['dispatched_1h']}, "
        f"completed {t['completed_1h']}, failed {t['failed_1h']}"
    )
    overdue = sum(o.states for o in st.overdue)
    output.line(f"DISPATCHED past the callback timeout ({st.callback_timeout} s): {overdue}")
    if st.reasons:
        output.table(
            ["workstream", "step", "status", "reason", "error class", "states"],
            [
                (r.workstream, r.step, r.status, r.reason_label, r.error_class, r.states)
                for r in st.reasons
            ],
            title="needs an operator",
        )
    changed = [u for u in st.config_use if u.changed_since]
    for u in changed:
        output.line(
            f"config {u.config_id} ({u.workstream}/{u.step}) changed since "
            f"{u.changed_since} of {u.states} state(s) of the last hour used it"
        )
    if st.limits:
        from wsctl.limits import format_rate

        output.table(
            ["limit", "in flight", "max in flight", "tokens now", "burst", "rate"],
            [
                (
                    lim.key,
                    lim.in_flight,
                    lim.max_in_flight if lim.max_in_flight is not None else "-",
                    f"{lim.tokens_now:.1f}" if lim.tokens_now is not None else "-",
                    lim.burst if lim.burst is not None else "-",
                    format_rate(lim.rate_per_second) or "-",
                )
                for lim in st.limits
            ],
            title="limits",
        )
    if st.webhooks:
        output.table(
            ["client", "workstream", "step", "webhook", "submitted", "cap", "left"],
            [
                (
                    w.client,
                    w.workstream,
                    w.step,
                    w.index,
                    w.submitted,
                    w.cap,
                    max(w.cap - w.submitted, 0),
                )
                for w in st.webhooks
            ],
            title="Clay webhooks",
        )
    est = st.states_total_estimate
    output.line(f"states in the table: about {est} (estimate)" if est is not None else "states: -")


def stats(
    ctx: typer.Context,
    workstream: WorkstreamFilter = None,
    prometheus: Annotated[bool, typer.Option("--prometheus")] = False,
    callback_timeout: CallbackTimeout = None,
    as_json: Json = False,
) -> None:
    """States per workstream, step and status; backlog, recent rates, reasons (read only).

    Args:
        prometheus: Print Prometheus's text exposition format.
    """
    import sys

    from wsctl.cli import output
    from wsctl.errors import UsageError
    from wsctl.stats import collect, render_prometheus

    if prometheus and as_json:
        raise UsageError("--json and --prometheus exclude each other")
    st_ = state(ctx)
    timeout = st_.callback_timeout(callback_timeout)
    result = st_.call(collect, workstream=workstream, callback_timeout=timeout)
    if prometheus:
        sys.stdout.write(render_prometheus(result))
    elif as_json:
        output.emit_json(result.to_json())
    else:
        _render(result)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
