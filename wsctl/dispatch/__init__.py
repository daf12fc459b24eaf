"""The dispatch pass: claim due states, resolve them by (step, workstream), run or
spawn their Modal functions through a backend, record the outcomes set-based.

``engine.run_pass`` is the library entry point for one pass; ``run`` is what
``wsctl dispatch`` calls around it (backend from the typed settings, journal,
signals, ``--loop`` through ``loop.run_loop``). Backends live beside it
(``local``, ``memory``, ``modal_backend``) behind the small interface in
``backend``.
"""

from wsctl.dispatch.backend import Backend, Failure, Job
from wsctl.dispatch.engine import PassOptions, PassSummary, plan, retry_states, run_pass

__all__ = [
    "Backend",
    "Failure",
    "Job",
    "PassOptions",
    "PassSummary",
    "plan",
    "retry_states",
    "run_pass",
]
