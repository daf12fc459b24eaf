"""Backend construction and ``--loop``: passes until asked to stop.

A lost database connection in the loop is reported and retried after the
interval, never fatal; a stop request (SIGTERM/SIGINT, wired by the CLI)
stops claiming at once and lets the running functions finish (``--grace``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from wsctl.dispatch.backend import Backend
from wsctl.dispatch.engine import PassOptions, PassSummary, RecordingFailed, run_pass
from wsctl.errors import DatabaseUnavailable, UsageError
from wsctl.redact import first_line
from wsctl.settings import DEFAULT_DISPATCH

if TYPE_CHECKING:
    import psycopg

    from wsctl.dispatch.journal import Journal


def make_backend(
    kind: str,
    *,
    app: str | None,
    environment: str | None = None,
    spawn_timeout: float = DEFAULT_DISPATCH.spawn_timeout,
    function_cap: int | None = DEFAULT_DISPATCH.modal_function_cap,
) -> Backend:
    if kind == "local":
        from wsctl.dispatch.local import LocalBackend

        return LocalBackend(app or "")
    if kind == "modal":
        from wsctl.dispatch.modal_backend import ModalBackend

        return ModalBackend(
            app or "",
            environment=environment,
            spawn_timeout=spawn_timeout,
            function_cap=function_cap,
        )
    raise UsageError(f"--backend must be 'modal' or 'local', not {kind!r}")


def _why(exc: Exception) -> str:
    """The one line a retried failure of the loop is reported with."""
    if isinstance(exc, RecordingFailed | DatabaseUnavailable):
        return exc.one_line()
    return f"database connection lost: {first_line(exc)}"


def _wait(interval: float, failures: int) -> float:
    """The pause before the next pass: the interval, doubled per consecutive failure (max 60 s)."""
    if failures == 0:
        return interval
    return min(60.0, max(interval, 0.5) * 2 ** min(failures - 1, 7))


def run_loop(
    connect: Callable[..., psycopg.Connection],
    backend: Backend,
    opts: PassOptions,
    *,
    interval: float,
    stop: threading.Event,
    on_pass: Callable[[PassSummary], None],
    on_error: Callable[[str], None],
    journal: Journal | None = None,
    on_stop: Callable[[PassSummary], None] | None = None,
    stop_reason: Callable[[], str] | None = None,
) -> int:
    """Run passes every ``interval`` seconds until ``stop`` is set; returns the pass count."""
    import psycopg

    conn: psycopg.Connection | None = None
    passes = 0
    reported = False  # whether on_stop said how the stop ended
    failures = 0  # consecutive: the wait doubles (to a minute) while the database is away
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect()
                summary = run_pass(
                    conn,
                    backend,
                    opts,
                    connect=lambda: connect(require_schema=False),
                    journal=journal,
                    stop=stop,
                    stop_reason=stop_reason,
                )
                passes += 1
                failures = 0
                on_pass(summary)
                if stop.is_set() and on_stop is not None:
                    on_stop(summary)
                    reported = True
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                # a lock held elsewhere (the dashboard, a migration) or a statement timeout:
                # the connection is fine, the next pass tries again
                failures += 1
                what = (
                    "a lock wait timed out"
                    if isinstance(exc, psycopg.errors.LockNotAvailable)
                    else "a statement timed out"
                )
                on_error(f"{what}: {first_line(exc)}; retrying in {_wait(interval, failures):g}s")
                if conn is not None and conn.broken:
                    conn.close()
                    conn = None
            except (
                psycopg.OperationalError,
                psycopg.InterfaceError,
                RecordingFailed,
                DatabaseUnavailable,
            ) as exc:
                # Retried after the wait, on a new connection. RecordingFailed: the outcomes
                # stay journaled and the next pass records them first. DatabaseUnavailable:
                # unreachable at reconnect; other environment errors (credentials, a missing
                # app) would fail every pass: they stop the loop.
                failures += 1
                on_error(f"{_why(exc)}; retrying in {_wait(interval, failures):g}s")
                if conn is not None:
                    conn.close()
                conn = None
            stop.wait(_wait(interval, failures))
        if on_stop is not None and not reported:
            # stopped between passes: nothing was claimed, say so in the same words
            idle = PassSummary(backend=backend.name)
            idle.stopped_by = stop_reason() if stop_reason else "stop"
            on_stop(idle)
    finally:
        if conn is not None:
            conn.close()
        backend.close()
    return passes
