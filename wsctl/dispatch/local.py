"""The local backend: run the app's functions in this process.

``--backend local --app path/to/file.py`` (or a module name) imports the app
and finds each registry function by name: a plain callable, or a Modal
Function whose ``.local()`` is called. Functions run in a thread pool of
``--concurrency`` threads fed from one shared iterator (no future per item),
and the pass waits for all of them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from wsctl.dispatch.backend import (
    NOT_STARTED,
    STILL_RUNNING,
    Failure,
    Job,
    Poll,
    Result,
    Run,
    Stopping,
)
from wsctl.errors import EnvError
from wsctl.redact import first_line

# Functions that finish this fast gain nothing from threads (only GIL hand-offs):
# run_threaded keeps calling them inline and starts the pool only for the rest
# once a call is slower or the inline average rises.
_INLINE_CALL_LIMIT = 0.0002  # seconds for one call
_INLINE_MEAN_LIMIT = 0.00005  # seconds per call on average


def run_threaded(call: Callable[[Job], Result], jobs: list[Job], run: Run) -> list[Result]:
    """Apply ``call`` to every job with ``run.concurrency`` threads sharing one iterator.

    No future per item and no lock: each thread's ``for`` pulls the next job
    from the shared ``enumerate`` iterator, whose ``next`` is atomic under the
    GIL (a C-level iterator over a list). Calls that return in microseconds
    (CPU-light functions) run inline first; the pool starts as soon as one
    call is slow, so blocking functions still get ``concurrency`` threads.

    With ``stopping``, all of that runs off the calling thread, which watches:
    once ``stopping()`` is true no further job starts (``NOT_STARTED``), the
    running ones get ``grace`` seconds, then ``STILL_RUNNING`` stands for
    those not done (their threads are daemons: the process may exit).
    """
    concurrency, stopping, grace = run.concurrency, run.stopping, run.grace
    results: list[Result] = [NOT_STARTED] * len(jobs)
    if not jobs:
        return results
    if stopping is None:
        _fill(call, jobs, concurrency, results, None)
        return results
    runner = threading.Thread(
        target=_fill, args=(call, jobs, concurrency, results, stopping), daemon=True
    )
    runner.start()
    deadline: float | None = None
    while runner.is_alive():
        runner.join(0.05)
        if deadline is None and stopping():
            deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() >= deadline:
            return list(results)  # what is still running stays STILL_RUNNING
    return results


def _fill(
    call: Callable[[Job], Result],
    jobs: list[Job],
    concurrency: int,
    results: list[Result],
    stopping: Stopping | None,
) -> None:
    work = enumerate(jobs)
    n = max(1, min(concurrency, len(jobs)))
    if n > 1:
        clock = time.perf_counter
        started = clock()
        done = 0
        for i, job in work:
            if stopping is not None and stopping():
                return
            t = clock()
            results[i] = STILL_RUNNING
            results[i] = call(job)
            done += 1
            now = clock()
            if now - t > _INLINE_CALL_LIMIT or (now - started) > _INLINE_MEAN_LIMIT * done + 0.001:
                break
        else:
            return

    def worker() -> None:
        for i, job in work:
            if stopping is not None and stopping():
                return
            results[i] = STILL_RUNNING
            results[i] = call(job)

    if n == 1:
        worker()
        return
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


_APP_HINT = (
    "--backend local runs the functions in-process: pass --app FILE.py or a module name "
    "(e.g. --app examples/enrichment_app.py), or set dispatch.app in wsctl.toml; "
    "the default app is a Modal app name, not a Python module"
)


def load_app(app: str) -> ModuleType:
    """Import a file path or a module name; failures are environment errors (exit 3)."""
    looks_like_path = app.endswith(".py") or "/" in app or "\\" in app
    try:
        if looks_like_path:
            path = Path(app).expanduser().resolve()
            if not path.is_file():
                raise EnvError(f"local app file not found: {app}")
            name = f"wsctl_local_app_{abs(hash(str(path)))}"
            if name in sys.modules:
                return sys.modules[name]
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise EnvError(
                    f"cannot import local app {app}: not a Python file",
                    hint=_APP_HINT,
                )
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
        return importlib.import_module(app)
    except EnvError:
        raise
    except ModuleNotFoundError as exc:
        raise EnvError(f"cannot import local app {app!r}: {exc}", hint=_APP_HINT) from exc
    except Exception as exc:
        raise EnvError(
            f"importing local app {app!r} failed: {first_line(exc, typed=True)}"
        ) from exc


def find_callable(module: ModuleType, name: str) -> Callable | None:
    obj = getattr(module, name, None)
    if obj is None:
        return None
    local = getattr(obj, "local", None)  # a modal.Function: run its body here
    if callable(local) and not isinstance(obj, type):
        return local
    return obj if callable(obj) else None


class LocalBackend:
    name = "local"
    runs_inline = True

    def __init__(self, app: str):
        self.app = app
        self.module: ModuleType | None = None
        self._fns: dict[str, Callable | None] = {}

    def setup(self) -> None:
        if not self.app:
            raise EnvError("--backend local needs --app PATH_OR_MODULE")
        self.module = load_app(self.app)
        self._fns = {}

    def _fn(self, name: str) -> Callable | None:
        if name not in self._fns:
            assert self.module is not None
            self._fns[name] = find_callable(self.module, name)
        return self._fns[name]

    def has_function(self, name: str) -> bool | None:
        return self._fn(name) is not None

    def dispatch(self, jobs: list[Job], run: Run) -> list[Result]:
        for name in {j.function for j in jobs}:
            self._fn(name)  # resolve once per function, before the threads start

        def call(job: Job) -> Result:
            fn = self._fns.get(job.function)
            if fn is None:
                return Failure.of(
                    "function_not_found", f"function {job.function} not found in app {self.app}"
                )
            try:
                fn(job.item_id, job.workstream_slug)
            except EnvError as exc:  # e.g. the worker helpers have no database URL
                return Failure.of(
                    "worker_environment", f"{job.function}: {exc.one_line()}", stops_pass=True
                )
            except Exception as exc:  # a MissingSecret carries its reason code: BLOCKED
                return Failure.of_exception(exc, first_line(exc, typed=True))
            return None

        # What the app prints (the seed's functions log with print) goes to
        # stderr: stdout belongs to wsctl's own output (--json).
        with contextlib.redirect_stdout(sys.stderr):
            return run_threaded(call, jobs, run)

    def poll(self, call_ids: list[str]) -> dict[str, Poll]:
        return {}

    def close(self) -> None:
        pass
