"""A dispatch run as ``wsctl dispatch`` starts it: one pass, a loop, or the plan.

What surrounds the engine's ``run_pass``: the backend built from the resolved
settings, the journal of unrecorded outcomes, SIGTERM/SIGINT turned into a
stop request (claims stop at once, running functions get ``--grace``), the
per-item log on stderr, and the database handed to functions run in this
process. The caller gives typed settings and a ``connect`` callable and gets
typed results back; nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsctl.dispatch.backend import Backend
from wsctl.dispatch.engine import PassOptions, PassSummary, due_total, plan, run_pass
from wsctl.errors import UsageError

if TYPE_CHECKING:
    import psycopg

    from wsctl.dispatch.engine import PlanRow
    from wsctl.settings import DispatchSettings, Settings

#: ``connect(require_schema=True)``: a new autocommit connection (``CliState.connect``)
Connect = Callable[..., "psycopg.Connection"]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class RunResult:
    """What a run did: the pass's summary (the last one of a loop), the number of
    passes, and the signal that stopped it, if one did."""

    summary: PassSummary | None
    passes: int
    signal: signal.Signals | None = None

    @property
    def exit_code(self) -> int | None:
        """128 + the signal that stopped the run (143 for SIGTERM, 130 for SIGINT)."""
        return None if self.signal is None else 128 + self.signal.value


@dataclass
class Plan:
    rows: list[PlanRow]
    total: int  # every due state, not only the ``limit`` planned


def build_backend(cfg: DispatchSettings) -> Backend:
    from wsctl.dispatch.loop import make_backend

    return make_backend(
        cfg.backend,
        app=cfg.app,
        environment=cfg.modal_environment,
        spawn_timeout=cfg.spawn_timeout,
        function_cap=cfg.modal_function_cap,
    )


def dry_run(connect: Connect, cfg: DispatchSettings, opts: PassOptions) -> Plan:
    """The plan of the next pass; claims and spawns nothing.

    Modal credentials are not needed for it; a local app is imported so that
    functions it lacks show in the plan.
    """
    opts.validate()
    backend = build_backend(cfg)
    inspect_app = backend if backend.name == "local" else None
    try:
        if inspect_app is not None:
            inspect_app.setup()
        with connect() as conn:
            rows = plan(
                conn, opts, inspect_app, function_cap=getattr(backend, "function_cap", None)
            )
            # all of them fit: the plan is the total; else count them (one index scan)
            total = due_total(conn, opts.workstream) if len(rows) >= opts.limit else len(rows)
    finally:
        backend.close()
    return Plan(rows=rows, total=total)


def run(
    connect: Connect,
    cfg: DispatchSettings,
    opts: PassOptions,
    *,
    worker_settings: Callable[[], Settings] | None = None,
    loop: bool = False,
    log_items: bool = False,
    on_pass: Callable[[PassSummary], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    on_signal: Callable[[signal.Signals], None] | None = None,
    on_stop: Callable[[PassSummary], None] | None = None,
) -> RunResult:
    """One pass, or with ``loop`` passes every ``cfg.interval`` seconds until a signal.

    ``worker_settings()`` (settings with a database URL; called only when the
    backend runs the app's functions in this process, ``local``) is what those
    functions connect with: the worker helpers get it through
    ``settings.in_process_workers``, scoped to the run, os.environ untouched. A loop reports each pass to ``on_pass`` and each retried failure
    (a lost database) to ``on_error``; ``on_signal`` hears of a stop signal
    as it arrives, ``on_stop`` gets the pass it stopped.
    """
    opts.validate()
    if loop and cfg.interval < 0:
        raise UsageError("--interval must be zero or more seconds")
    backend = build_backend(cfg)

    from wsctl.dispatch.journal import Journal

    journal = Journal(str(cfg.journal_path()))
    stop = threading.Event()
    received: list[signal.Signals] = []

    def stop_reason() -> str:
        return received[0].name if received else "stop"

    last: list[PassSummary] = []

    def passed(summary: PassSummary) -> None:
        last[:] = [summary]
        if on_pass is not None:
            on_pass(summary)

    def heard(signum: signal.Signals) -> None:
        received.append(signum)
        if on_signal is not None:
            on_signal(signum)
        stop.set()  # stop claiming now; running functions get --grace

    try:
        with (
            stderr_log(log_items, ("wsctl.dispatch",)),  # one line per dispatched item
            _workers_database(backend, worker_settings),
            _stop_on_signals(heard),
        ):
            if loop:
                from wsctl.dispatch.loop import run_loop

                passes = run_loop(
                    connect,
                    backend,
                    opts,
                    interval=cfg.interval,
                    stop=stop,
                    on_pass=passed,
                    on_error=on_error or (lambda _m: None),
                    journal=journal,
                    on_stop=on_stop,
                    stop_reason=stop_reason,
                )
                return RunResult(last[-1] if last else None, passes, _first(received))
            # Two connections: claims on one, each chunk's outcomes recorded on the
            # other while the next chunk is claimed and dispatched; a recording
            # that fails is retried on a fresh one, the outcomes journaled meanwhile.
            with connect() as conn, connect(require_schema=False) as writer:
                summary = run_pass(
                    conn,
                    backend,
                    opts,
                    writer_conn=writer,
                    connect=lambda: connect(require_schema=False),
                    journal=journal,
                    stop=stop,
                    stop_reason=stop_reason,
                )
            if stop.is_set() and on_stop is not None:
                on_stop(summary)
            return RunResult(summary, 1, _first(received))
    finally:
        backend.close()
        journal.close()


@contextlib.contextmanager
def _stop_on_signals(heard: Callable[[signal.Signals], None]) -> Iterator[None]:
    """SIGTERM/SIGINT call ``heard`` instead of ending the process, for the block.

    Only the main thread may set signal handlers: elsewhere (a run started from
    a worker thread) the process's own handling stays and the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {
        s: signal.signal(s, lambda signum, _frame: heard(signal.Signals(signum)))
        for s in _STOP_SIGNALS
    }
    try:
        yield
    finally:
        for s, previous in old.items():
            signal.signal(s, previous)


@contextlib.contextmanager
def stderr_log(enabled: bool, names: tuple[str, ...], fmt: str = "%(message)s") -> Iterator[None]:
    """The INFO lines of the loggers ``names`` on stderr, for the block only."""
    if not enabled:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


@contextlib.contextmanager
def _workers_database(
    backend: Backend, worker_settings: Callable[[], Settings] | None
) -> Iterator[None]:
    """The functions the backend runs in this process connect with ``worker_settings()``."""
    if not backend.runs_inline or worker_settings is None:
        yield
        return
    from wsctl.settings import in_process_workers

    with in_process_workers(worker_settings()):
        yield


def _first(received: list[signal.Signals]) -> signal.Signals | None:
    return received[0] if received else None
