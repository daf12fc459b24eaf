"""An in-memory backend behind the same interface, for tests and benchmarks.

``MemoryBackend({"fn_name": callable_or_None})`` runs callables inline like
the local backend; with ``spawn=True`` it behaves like Modal instead: each
job gets a call id, is recorded in ``spawned``, and ``outcomes[call_id]``
(set by the test) is what ``poll`` reports.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from wsctl.dispatch.backend import Failure, Job, Poll, Result, Run
from wsctl.dispatch.local import run_threaded


class MemoryBackend:
    name = "memory"

    def __init__(
        self,
        functions: dict[str, Callable | None],
        *,
        spawn: bool = False,
        fail_setup: Exception | None = None,
    ):
        self.functions = functions
        self.runs_inline = not spawn
        self.fail_setup = fail_setup
        self.spawned: list[tuple[str, str, str]] = []  # (function, item_id, workstream)
        self.outcomes: dict[str, Poll] = {}
        self.polled: list[str] = []
        self.on_poll: Callable[[list[str]], None] | None = None  # tests: act while "polling"
        self.setups = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def setup(self) -> None:
        self.setups += 1
        if self.fail_setup is not None:
            raise self.fail_setup

    def has_function(self, name: str) -> bool | None:
        return self.functions.get(name) is not None

    def dispatch(self, jobs: list[Job], run: Run) -> list[Result]:
        def call(job: Job) -> Result:
            fn = self.functions.get(job.function)
            if fn is None:
                return Failure.of(
                    "function_not_found", f"function {job.function} not found in app memory"
                )
            with self._lock:
                self.spawned.append((job.function, job.item_id, job.workstream_slug))
            try:
                out = fn(job.item_id, job.workstream_slug)
            except Exception as exc:
                stops = bool(getattr(exc, "stops_pass", False))
                return Failure.of_exception(exc, f"{type(exc).__name__}: {exc}", stops_pass=stops)
            if self.runs_inline:
                return None
            call_id = out if isinstance(out, str) else f"fc-mem-{next(self._ids)}"
            return call_id

        return run_threaded(call, jobs, run)

    def poll(self, call_ids: list[str]) -> dict[str, Poll]:
        self.polled.extend(call_ids)
        if self.on_poll is not None:
            self.on_poll(call_ids)
        return {c: self.outcomes.get(c, Poll("running")) for c in call_ids}

    def close(self) -> None:
        pass
