"""Backend construction and ``--loop``: passes until asked to stop.

A lost database connection in the loop is reported and retried after the
interval, never fatal; a stop request (SIGTERM/SIGINT, wired by the CLI)
lets the current pass finish.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from wsctl.dispatch.backend import Backend
from wsctl.dispatch.engine import PassOptions, PassSummary, run_pass
from wsctl.errors import DatabaseUnavailable, UsageError
from wsctl.redact import first_line

if TYPE_CHECKING:
    import psycopg


def make_backend(
    kind: str, *, app: str | None, environment: str | None = None, spawn_timeout: float = 30.0
) -> Backend:
    if kind == "local":
        from wsctl.dispatch.local import LocalBackend

        return LocalBackend(app or "")
    if kind == "modal":
        from wsctl.dispatch.modal_backend import ModalBackend

        return ModalBackend(app or "", environment=environment, spawn_timeout=spawn_timeout)
    raise UsageError(f"--backend must be 'modal' or 'local', not {kind!r}")


def _wait(interval: float, failures: int) -> float:
    """The pause before the next pass: the interval, doubled per consecutive failure (max 60 s)."""
    if failures == 0:
        return interval
    return min(60.0, max(interval, 0.5) * 2 ** min(failures - 1, 7))


def run_loop(
    connect: Callable[[], psycopg.Connection],
    backend: Backend,
    opts: PassOptions,
    *,
    interval: float,
    stop: threading.Event,
    on_pass: Callable[[PassSummary], None],
    on_error: Callable[[str], None],
) -> int:
    """Run passes every ``interval`` seconds until ``stop`` is set; returns the pass count."""
    import psycopg

    conn: psycopg.Connection | None = None
    passes = 0
    failures = 0  # consecutive: the wait doubles (to a minute) while the database is away
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect()
                summary = run_pass(conn, backend, opts)
                passes += 1
                failures = 0
                on_pass(summary)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                failures += 1
                on_error(
                    f"database connection lost: {first_line(exc)}; "
                    f"retrying in {_wait(interval, failures):g}s"
                )
                if conn is not None:
                    conn.close()
                conn = None
            except DatabaseUnavailable as exc:
                # Unreachable at reconnect: retried. Other environment errors
                # (credentials, a missing app) would fail every pass: they stop.
                failures += 1
                on_error(f"{exc.one_line()}; retrying in {_wait(interval, failures):g}s")
                conn = None
            stop.wait(_wait(interval, failures))
    finally:
        if conn is not None:
            conn.close()
        backend.close()
    return passes
