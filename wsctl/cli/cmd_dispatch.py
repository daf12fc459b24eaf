"""`wsctl dispatch` (one pass or a loop) and `wsctl retry`."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import CallbackTimeout, Json, choices, setting_option, state
from wsctl.settings import Backend


def dispatch(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once")] = False,
    loop: Annotated[bool, typer.Option("--loop")] = False,
    interval: Annotated[float | None, setting_option("--interval")] = None,
    limit: Annotated[int | None, setting_option("--limit")] = None,
    concurrency: Annotated[int | None, setting_option("--concurrency")] = None,
    backend: Annotated[
        Backend | None, setting_option("--backend", metavar=choices(Backend))
    ] = None,
    app: Annotated[str | None, setting_option("--app")] = None,
    modal_environment: Annotated[str | None, setting_option("--modal-environment")] = None,
    workstream: Annotated[str | None, typer.Option("--workstream")] = None,
    lease_seconds: Annotated[int | None, setting_option("--lease-seconds")] = None,
    spawn_timeout: Annotated[float | None, setting_option("--spawn-timeout")] = None,
    max_attempts: Annotated[int | None, setting_option("--max-attempts")] = None,
    callback_timeout: CallbackTimeout = None,
    max_seconds: Annotated[float | None, setting_option("--max-seconds")] = None,
    grace: Annotated[float | None, setting_option("--grace")] = None,
    no_reconcile: Annotated[bool, typer.Option("--no-reconcile")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    as_json: Json = False,
) -> None:
    """Claim due workflow states and run them on their (step, workstream) function.

    Args:
        once: Run one pass and exit (the default).
        loop: Run passes until SIGTERM/SIGINT.
        workstream: Only states of batches in this workstream.
        no_reconcile: Skip polling spawned calls.
        dry_run: Print the plan; claim nothing.
        verbose: Log one line per dispatched item on stderr.
    """
    from wsctl.cli import output
    from wsctl.cli.dispatch_render import render_plan, render_summary
    from wsctl.dispatch import run
    from wsctl.dispatch.engine import PassStopped
    from wsctl.domain import validate_slug
    from wsctl.errors import UsageError

    if once and loop:
        raise UsageError("--once and --loop exclude each other")
    st = state(ctx)
    if workstream is not None:
        validate_slug(workstream, "workstream")
    cfg = st.settings().dispatch.resolve(
        interval=interval,
        limit=limit,
        concurrency=concurrency,
        backend=backend,
        app=app,
        modal_environment=modal_environment,
        lease_seconds=lease_seconds,
        spawn_timeout=spawn_timeout,
        max_attempts=max_attempts,
        callback_timeout=callback_timeout,
        max_seconds=max_seconds,
        grace=grace,
    )
    opts = cfg.pass_options(workstream=workstream, reconcile=not no_reconcile)
    if dry_run:
        p = run.dry_run(st.connect, cfg, opts)
        render_plan(p.rows, total=p.total, as_json=as_json)
        return

    def notice_signal(signum) -> None:
        output.notice(f"received {signum.name}: stopping claims, finishing running functions")

    result = run.run(
        st.connect,
        cfg,
        opts,
        # --backend local: the app's functions reach this database through the worker helpers
        worker_settings=st.resolved_settings,
        loop=loop,
        log_items=verbose,
        # --json in a loop: one compact document per pass (JSON Lines)
        on_pass=lambda s: render_summary(s, as_json=as_json, compact=True, lines=True),
        on_error=output.warn,
        on_signal=notice_signal if loop else None,
        on_stop=(lambda s: output.notice(stop_line(s))) if loop else None,
    )
    if loop:
        return
    summary = result.summary
    assert summary is not None  # one pass always has one
    render_summary(summary, as_json=as_json)
    if result.exit_code is not None:
        # 143 for SIGTERM, 130 for SIGINT, with the one line that says what became of the claims
        raise PassStopped(stop_line(summary), exit_code=result.exit_code)
    if not summary.ok:
        raise typer.Exit(1)


def stop_line(summary) -> str:
    """The one line a stopped pass ends with."""
    recorded = sum(summary.to_json()[k] for k in ("dispatched", "retried", "failed", "blocked"))
    return (
        f"stopped by {summary.stopped_by or 'a signal'}: {recorded} outcome(s) recorded, "
        f"{summary.released} claim(s) never started released to PENDING, "
        f"{summary.left_to_lease} still running left to their lease"
    )


def retry(
    ctx: typer.Context,
    batch: Annotated[str, typer.Option("--batch")],
    step: Annotated[str | None, typer.Option("--step")] = None,
    status: Annotated[list[str] | None, typer.Option("--status")] = None,
    as_json: Json = False,
) -> None:
    """Put a batch's BLOCKED/FAILED states back to PENDING after fixing the cause.

    Args:
        batch: Batch id.
        step: Only this blueprint step.
        status: BLOCKED and/or FAILED (default: both).
    """
    from wsctl.cli import output
    from wsctl.dispatch.engine import retry_states
    from wsctl.domain import parse_uuid, validate_slug
    from wsctl.errors import UsageError

    batch_id = parse_uuid(batch, "batch id")
    from wsctl.states import Status

    retryable = (Status.BLOCKED, Status.FAILED)
    statuses = [s.upper() for s in (status or list(retryable))]
    bad = [s for s in statuses if s not in retryable]
    if bad:
        raise UsageError(f"--status takes BLOCKED or FAILED, not {', '.join(bad)}")
    if step is not None:
        validate_slug(step, "step")
    n = state(ctx).call(retry_states, batch_id, step=step, statuses=statuses)
    if as_json:
        output.emit_json(
            {"batch_id": str(batch_id), "requeued": n, "statuses": statuses, "step": step}
        )
    else:
        output.line(f"requeued {n} state(s) of batch {batch_id} as PENDING")


def register(app: typer.Typer) -> None:
    app.command("dispatch")(dispatch)
    app.command("retry")(retry)
