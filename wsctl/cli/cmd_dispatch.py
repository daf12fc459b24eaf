"""`wsctl dispatch` (one pass or a loop) and `wsctl retry`."""

from __future__ import annotations

import typer

from wsctl.cli.common import JSON_OPTION, state
from wsctl.settings import DispatchSettings

_FROM_CONFIG = "default: the dispatch table of wsctl.toml, else"


def _d(key: str) -> str:
    """A dispatch default as the help shows it (from settings.DispatchSettings, the one source)."""
    value = DispatchSettings.default(key)
    return f"{value:g}" if isinstance(value, float) else str(value)


def dispatch(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Run one pass and exit (the default)."),
    loop: bool = typer.Option(False, "--loop", help="Run passes until SIGTERM/SIGINT."),
    interval: float | None = typer.Option(
        None,
        "--interval",
        help=f"Seconds between --loop passes ({_FROM_CONFIG}: {_d('interval')}).",
    ),
    limit: int | None = typer.Option(
        None, "--limit", help=f"Most states claimed in a pass ({_FROM_CONFIG}: {_d('limit')})."
    ),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        help=f"Concurrent spawns/calls ({_FROM_CONFIG}: {_d('concurrency')}).",
    ),
    backend: str | None = typer.Option(
        None, "--backend", help=f"modal or local ({_FROM_CONFIG}: {_d('backend')})."
    ),
    app: str | None = typer.Option(
        None, "--app", help="Modal app name, or for --backend local a file path or module."
    ),
    modal_environment: str | None = typer.Option(
        None, "--modal-environment", help="Modal environment name."
    ),
    workstream: str | None = typer.Option(
        None, "--workstream", help="Only states of batches in this workstream."
    ),
    lease_seconds: int | None = typer.Option(
        None, "--lease-seconds", help=f"Claim lease ({_FROM_CONFIG}: {_d('lease_seconds')})."
    ),
    spawn_timeout: float | None = typer.Option(
        None, "--spawn-timeout", help=f"Seconds per spawn ({_FROM_CONFIG}: {_d('spawn_timeout')})."
    ),
    max_attempts: int | None = typer.Option(
        None,
        "--max-attempts",
        help=f"Attempts before FAILED ({_FROM_CONFIG}: {_d('max_attempts')}).",
    ),
    callback_timeout: int | None = typer.Option(
        None,
        "--callback-timeout",
        help="Seconds a DISPATCHED state may wait for completion "
        f"({_FROM_CONFIG}: {_d('callback_timeout')}).",
    ),
    max_seconds: float | None = typer.Option(
        None,
        "--max-seconds",
        help=f"A pass stops claiming after this many seconds ({_FROM_CONFIG}: {_d('max_seconds')}).",
    ),
    grace: float | None = typer.Option(
        None,
        "--grace",
        help="Once stopping (SIGTERM/SIGINT, --max-seconds), seconds running functions get "
        f"to finish ({_FROM_CONFIG}: {_d('grace')}).",
    ),
    no_reconcile: bool = typer.Option(False, "--no-reconcile", help="Skip polling spawned calls."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; claim nothing."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log one line per dispatched item on stderr."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Claim due workflow states and run them on their (step, workstream) function."""
    from wsctl.cli.dispatch_render import render_plan, render_summary
    from wsctl.dispatch.engine import due_total, plan, run_pass
    from wsctl.dispatch.loop import make_backend
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
    opts.validate()
    chosen = make_backend(
        cfg.backend,
        app=cfg.app,
        environment=cfg.modal_environment,
        spawn_timeout=cfg.spawn_timeout,
    )
    if verbose:
        import logging

        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("wsctl.dispatch")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    if dry_run:
        # The plan spawns nothing: Modal credentials are not needed for it; a
        # local app is imported so that functions it lacks show in the plan.
        inspect_app = chosen if chosen.name == "local" else None
        if inspect_app is not None:
            inspect_app.setup()
        try:
            with st.connect() as conn:
                rows = plan(conn, opts, inspect_app)
                # all of them fit: the plan is the total; else count them (one index scan)
                total = due_total(conn, opts.workstream) if len(rows) >= opts.limit else len(rows)
        finally:
            chosen.close()
        render_plan(rows, total=total, as_json=as_json)
        return

    if chosen.name == "local":
        # The app's functions run in this process and reach the database through
        # the worker helpers, which read WSCTL_DATABASE_URL: give them this URL.
        import os

        os.environ["WSCTL_DATABASE_URL"] = st.resolved_url()

    from wsctl.dispatch.journal import Journal

    journal = Journal(str(cfg.journal_path()))
    if loop:
        try:
            _run_loop(st, chosen, opts, cfg.interval, as_json, journal)
        finally:
            journal.close()
        return

    import signal
    import threading

    stop = threading.Event()
    received: list[signal.Signals] = []

    def request_stop(signum, _frame):
        received.append(signal.Signals(signum))
        stop.set()  # stop claiming now; running functions get --grace

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Two connections: claims on one, each chunk's outcomes recorded on the
        # other while the next chunk is claimed and dispatched; a recording
        # that fails is retried on a fresh one, the outcomes journaled meanwhile.
        with st.connect() as conn, st.connect(require_schema=False) as writer:
            summary = run_pass(
                conn,
                chosen,
                opts,
                writer_conn=writer,
                connect=lambda: st.connect(require_schema=False),
                journal=journal,
                stop=stop,
                stop_reason=lambda: received[0].name if received else "stop",
            )
    finally:
        for s, previous in old.items():
            signal.signal(s, previous)
        chosen.close()
        journal.close()
    render_summary(summary, as_json=as_json)
    if received:
        from wsctl.dispatch.engine import PassStopped

        # 143 for SIGTERM, 130 for SIGINT, with the one line that says what became of the claims
        raise PassStopped(stop_line(summary), exit_code=128 + received[0].value)
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


def _run_loop(st, backend, opts, interval: float, as_json: bool, journal) -> None:
    import signal
    import threading

    from wsctl.cli import output
    from wsctl.cli.dispatch_render import render_summary
    from wsctl.dispatch.loop import run_loop

    if interval < 0:
        from wsctl.errors import UsageError

        raise UsageError("--interval must be zero or more seconds")
    stop = threading.Event()
    received: list[signal.Signals] = []

    def request_stop(signum, _frame):
        output.notice(
            f"received {signal.Signals(signum).name}: stopping claims, finishing running functions"
        )
        received.append(signal.Signals(signum))
        stop.set()

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_loop(
            st.connect,
            backend,
            opts,
            interval=interval,
            stop=stop,
            # --json in a loop: one compact document per pass (JSON Lines)
            on_pass=lambda s: render_summary(s, as_json=as_json, compact=True, lines=True),
            on_error=output.warn,
            journal=journal,
            on_stop=lambda s: output.notice(stop_line(s)),
            stop_reason=lambda: received[0].name if received else "stop",
        )
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def retry(
    ctx: typer.Context,
    batch: str = typer.Option(..., "--batch", help="Batch id."),
    step: str | None = typer.Option(None, "--step", help="Only this blueprint step."),
    status: list[str] = typer.Option(
        None, "--status", help="BLOCKED and/or FAILED (default: both)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Put a batch's BLOCKED/FAILED states back to PENDING after fixing the cause."""
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
    with state(ctx).connect() as conn:
        n = retry_states(conn, batch_id, step=step, statuses=statuses)
    if as_json:
        output.emit_json(
            {"batch_id": str(batch_id), "requeued": n, "statuses": statuses, "step": step}
        )
    else:
        output.line(f"requeued {n} state(s) of batch {batch_id} as PENDING")


def register(app: typer.Typer) -> None:
    app.command("dispatch")(dispatch)
    app.command("retry")(retry)
