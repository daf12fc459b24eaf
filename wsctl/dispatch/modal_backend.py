"""The Modal backend: spawn the registry's functions on a deployed Modal app.

``modal`` is imported here, lazily, so ``wsctl --help`` and passes on other
backends never pay for it. Each function is looked up with
``modal.Function.from_name(app, name, environment_name=...)`` and hydrated
once per pass; spawns run concurrently (``spawn.aio`` under a semaphore of
``--concurrency``), each with its own timeout.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from wsctl import states
from wsctl.dispatch.backend import NOT_STARTED, Failure, Job, Poll, Result, Run, Stopping
from wsctl.errors import EnvError
from wsctl.redact import first_line
from wsctl.settings import DEFAULT_DISPATCH


def classify(exc: BaseException) -> Failure:
    """The failure for a Modal error, classified by ``wsctl.states.classify``.

    Rejected credentials stop the pass (exit 3, unspawned claims released);
    NotFound is an operator error (function_not_found: BLOCKED);
    RESOURCE_EXHAUSTED, UNAVAILABLE, connection errors and timeouts are
    transient; anything unexpected is retried too (FAILED after --max-attempts).
    """
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return Failure.of("spawn_timeout", "spawn timed out; its outcome is unknown, retrying")
    reason = states.classify(exc)
    if reason.code == "credentials_rejected":
        return Failure(
            reason, f"Modal rejected the credentials: {first_line(exc, typed=True)}", True
        )
    if reason.code == "function_not_found":
        return Failure(reason, f"not found on Modal: {first_line(exc, typed=True)}")
    return Failure(reason, first_line(exc, typed=True))


def credentials_present() -> bool:
    """Whether Modal credentials are configured (env vars or ~/.modal.toml), without network."""
    if os.environ.get("MODAL_IS_REMOTE") == "1":
        return True  # inside a Modal container (e.g. the Cron function): its own identity
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    from modal.config import config

    return bool(config.get("token_id") and config.get("token_secret"))


class ModalBackend:
    name = "modal"
    runs_inline = False

    def __init__(
        self,
        app: str,
        *,
        environment: str | None = None,
        spawn_timeout: float = DEFAULT_DISPATCH.spawn_timeout,
        lookup_timeout: float = DEFAULT_DISPATCH.spawn_timeout,
        function_cap: int | None = DEFAULT_DISPATCH.modal_function_cap,
    ):
        self.app = app
        #: calls at Modal at once per function unless a limit `modal:FUNCTION` says
        #: otherwise (Modal queues at most 2,000 pending inputs per function)
        self.function_cap = function_cap
        self.environment = environment or None
        self.spawn_timeout = spawn_timeout
        self.lookup_timeout = lookup_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fns: dict[str, Any] = {}

    def setup(self) -> None:
        if not self.app:
            raise EnvError("--app is required for the modal backend (the deployed app's name)")
        if self.app.endswith(".py") or "/" in self.app:
            raise EnvError(
                f"--app {self.app!r} looks like a file: the modal backend takes a deployed app "
                "name (use --backend local for a file)"
            )
        try:
            import modal  # noqa: F401
        except Exception as exc:  # pragma: no cover - broken installation
            raise EnvError(f"cannot import modal: {exc}") from exc
        if not credentials_present():
            raise EnvError(
                "Modal credentials missing: set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET "
                "(or run `modal token set`)"
            )
        self._fns = {}
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()

    def has_function(self, name: str) -> bool | None:
        return None  # only a lookup on Modal can tell (doctor --check-modal does it)

    async def _lookup(self, name: str) -> Any:
        """The hydrated Function, or a Failure (hydrated once per function per pass)."""
        if name in self._fns:
            return self._fns[name]
        import modal

        fn = modal.Function.from_name(self.app, name, environment_name=self.environment)
        try:
            await asyncio.wait_for(fn.hydrate.aio(), self.lookup_timeout)
            self._fns[name] = fn
        except Exception as exc:
            failure = classify(exc)
            if failure.reason.code == "function_not_found":
                env = f" (environment {self.environment})" if self.environment else ""
                failure = Failure(
                    failure.reason, f"function {name} not found in Modal app {self.app}{env}"
                )
            if failure.reason.error_class == states.ErrorClass.TRANSIENT:
                return failure  # not cached: the next chunk tries again
            self._fns[name] = failure
        return self._fns[name]

    async def _dispatch(
        self, jobs: list[Job], concurrency: int, stopping: Stopping | None
    ) -> list[Result]:
        names = sorted({j.function for j in jobs})
        looked_up = await asyncio.gather(*(self._lookup(n) for n in names))
        fns = dict(zip(names, looked_up, strict=True))
        sem = asyncio.Semaphore(max(1, concurrency))
        stop = asyncio.Event()  # set on a pass-level failure: spawn nothing more

        async def one(job: Job) -> Result:
            fn = fns[job.function]
            if isinstance(fn, Failure):
                return fn
            async with sem:
                if stopping is not None and stopping():
                    return NOT_STARTED  # a spawn in flight finishes (bounded by its timeout)
                if stop.is_set():
                    return Failure.of(
                        "credentials_rejected", "not spawned: the pass stopped", stops_pass=True
                    )
                try:
                    call = await asyncio.wait_for(
                        fn.spawn.aio(job.item_id, job.workstream_slug), self.spawn_timeout
                    )
                except Exception as exc:
                    failure = classify(exc)
                    if failure.stops_pass:
                        stop.set()
                    return failure
                return call.object_id

        return list(await asyncio.gather(*(one(j) for j in jobs)))

    def dispatch(self, jobs: list[Job], run: Run) -> list[Result]:
        assert self._loop is not None, "setup() first"
        return self._loop.run_until_complete(self._dispatch(jobs, run.concurrency, run.stopping))

    async def _poll(self, call_ids: list[str]) -> dict[str, Poll]:
        import modal

        sem = asyncio.Semaphore(32)

        async def one(call_id: str) -> tuple[str, Poll]:
            async with sem:
                try:
                    fc = modal.FunctionCall.from_id(call_id)
                    await asyncio.wait_for(fc.get.aio(timeout=0), self.spawn_timeout)
                except TimeoutError:
                    return call_id, Poll("running")
                except Exception as exc:
                    import modal.exception as mexc

                    if isinstance(exc, mexc.OutputExpiredError | mexc.NotFoundError):
                        return call_id, Poll("unknown", first_line(exc, typed=True))
                    failure = classify(exc)
                    if failure.stops_pass:
                        return call_id, Poll("unknown", first_line(exc, typed=True))
                    return call_id, Poll("raised", first_line(exc, typed=True), failure.reason)
                return call_id, Poll("returned")

        return dict(await asyncio.gather(*(one(c) for c in call_ids)))

    def poll(self, call_ids: list[str]) -> dict[str, Poll]:
        assert self._loop is not None, "setup() first"
        return self._loop.run_until_complete(self._poll(call_ids))

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
        self._loop = None
