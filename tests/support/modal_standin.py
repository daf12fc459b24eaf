"""Loopback stand-in for Modal's gRPC control-plane API, for tests.

The *real* ``modal`` client (pinned 1.6.4) talks to this server over plain HTTP/2 on
127.0.0.1, so tests exercise the genuine client code paths (serialization, retries,
error mapping) without ever contacting Modal.  The service is the one the installed
client was generated from (``modal_proto.api_grpc.ModalClientBase``); it is served by
grpclib on a free port from a background thread that owns its own asyncio loop, so
synchronous tests, other threads and other processes can all use it.

Quick start (pytest)::

    from tests.support.modal_standin import ModalStandIn, Outcome, reset_modal_client

    with ModalStandIn() as standin:         # or .start() / .stop()
        fid = standin.add_function("enrichment-worker", "start_normalize_company_name")
        standin.patch_env(monkeypatch)      # MODAL_SERVER_URL / MODAL_TOKEN_* / proxy off,
                                            # hides ~/.modal.toml, reset_modal_client()
        # subprocesses: subprocess.run(..., env={**os.environ, **standin.env})

        fn = modal.Function.from_name("enrichment-worker", "start_normalize_company_name")
        call = fn.spawn("3f0c...", "apollo_scrape")
        assert standin.spawns == [
            ("enrichment-worker", "start_normalize_company_name", ("3f0c...", "apollo_scrape"), {})
        ]
        standin.set_outcome(call.object_id, returned={"ok": True})
        assert modal.FunctionCall.from_id(call.object_id).get(timeout=0) == {"ok": True}

Environment / configuration facts (modal 1.6.4)
------------------------------------------------
* ``MODAL_SERVER_URL``, ``MODAL_TOKEN_ID``, ``MODAL_TOKEN_SECRET``, ``MODAL_ENVIRONMENT``
  are read lazily (``modal.config.config.get`` consults ``os.environ`` on every call), so
  they do **not** have to be set before ``import modal``.  BUT the client built from them
  is a process-wide singleton (``modal.client._Client._client_from_env``) created on the
  first RPC and reused afterwards, even if the env vars change.  Call
  :func:`reset_modal_client` whenever the target URL/credentials change inside one process
  (e.g. a new stand-in per test).  Fresh subprocesses are unaffected.
* Read at import time only: ``MODAL_CONFIG_PATH`` / ``~/.modal.toml`` (profiles),
  ``MODAL_PROFILE``, ``MODAL_LOGLEVEL``.  Env vars beat ``.modal.toml`` values, so a
  developer's real token file cannot leak into tests once ``standin.env`` is applied; for
  full hermeticity :meth:`ModalStandIn.patch_env` also blanks ``modal.config._user_config``.
* ``standin.env`` also sets ``MODAL_DISABLE_API_PROXY=1``: modal routes even 127.0.0.1
  through ``HTTP_PROXY``/``ALL_PROXY`` unless ``NO_PROXY`` covers it.
* Cheap, offline credentials check: ``modal.config.config.get("token_id")`` and
  ``...get("token_secret")`` (env var first, then the active ``.modal.toml`` profile).
  With no token (and no OAuth settings) the first RPC raises
  ``modal.exception.AuthError("Token missing. Could not authenticate client. ...")``
  locally, before any network traffic.

What the client sends (observed)
--------------------------------
No handshake: ``Client.from_env()`` only opens the channel; the first RPC of a
``Function.from_name(...).hydrate()`` is ``FunctionGet``.  ``spawn`` sends ``FunctionMap``
with the input pipelined (``FunctionPutInputs`` only if the response carries no
pipelined inputs -- toggle with ``standin.pipeline_inputs = False``).
``FunctionCall.get(timeout=...)`` sends ``FunctionGetOutputs``.  ``ClientHello`` is only
sent by ``modal.Client.verify``/``client.hello()``; it is implemented too.  Anything else
answers ``UNIMPLEMENTED`` (-> ``modal.exception.UnimplementedError``) so a client upgrade
that needs a new RPC fails loudly.  Inputs are cloudpickled (``DATA_FORMAT_PICKLE``;
CBOR if ``MODAL_PAYLOAD_FORMAT=cbor``) and decoded here with modal's own deserializer.
Spawn inputs larger than 8 KiB (``MAX_ASYNC_OBJECT_SIZE_BYTES``) would go to blob
storage via ``BlobCreate`` + an HTTP PUT to another host; ``BlobCreate`` is unimplemented,
so such a spawn fails with ``UnimplementedError`` instead of leaving 127.0.0.1.

Recorded state (all thread-safe snapshots)
------------------------------------------
``standin.spawns`` -> ``list[Spawn]`` in arrival order.  ``Spawn`` is a NamedTuple
``(app_name, function_name, args, kwargs)`` -- so it compares equal to a plain 4-tuple --
with extra attributes ``call_id`` ("fc-..."), ``input_id``, ``function_id``,
``environment_name`` and ``invocation_type`` ("async" for spawn, "sync" for remote).
``args`` is always a tuple and ``kwargs`` a dict.
``standin.calls`` -> ``collections.Counter`` of RPC names, counting *every* request
received (including injected failures, client retries and UNIMPLEMENTED ones).
``standin.lookups`` -> list of ``(environment, app_name, function_name, found)`` per
``FunctionGet``.  ``standin.call_ids`` -> ids of calls created by FunctionMap.
``standin.wait_for_spawns(n, timeout)`` polls until ``n`` spawns were recorded.
``standin.reset()`` forgets everything (functions too) and releases hanging requests;
ids stay unique across resets.

Caveat: ``modal`` does not share an in-flight hydration.  ``asyncio.gather`` of N
``spawn.aio`` calls on a not-yet-hydrated ``Function`` sends N ``FunctionGet`` requests
(observed: 200 for 200); ``await fn.hydrate.aio()`` once first to send one.

Outcomes of function calls (what ``FunctionCall.get(timeout=0)`` sees)
----------------------------------------------------------------------
=============================  ===================================================
``Outcome.running()`` default  builtin ``TimeoutError`` (not a modal.exception type)
``Outcome.returned(v)``        returns a (pickled) copy of ``v``
``Outcome.raised(exc)``        re-raises a copy of ``exc`` (same type and args)
``Outcome.remote_error(msg)``  ``modal.exception.RemoteError(msg)``
``Outcome.function_timeout()`` ``modal.exception.FunctionTimeoutError``
``Outcome.internal_failure()`` ``modal.exception.InternalFailure``
``Outcome.expired()``          ``modal.exception.OutputExpiredError``
=============================  ===================================================
Unknown call id -> ``modal.exception.NotFoundError``.  With ``get(timeout=t>0)`` on a
running call the stand-in holds the request up to ``t`` seconds and answers as soon as
an outcome is set.

Error injection (``standin.inject(rpc, action, times=None, ...)``) and what callers see
---------------------------------------------------------------------------------------
Retry policy of modal 1.6.4 for ``FunctionGet``/``FunctionMap``/``FunctionPutInputs``:
``Retry()`` = 3 retries (4 attempts) with 0.1/0.2/0.4 s sleeps on UNAVAILABLE,
DEADLINE_EXCEEDED, CANCELLED, INTERNAL, UNKNOWN; no per-attempt timeout.  Measured on
``hydrate.aio`` / ``spawn.aio``:

* NOT_FOUND on FunctionGet (unknown function) -> ``modal.exception.NotFoundError``
  "Lookup failed for Function '<fn>' from the '<app>' app[ (in the '<env>'
  environment)]: <server message>." -- 1 attempt, a few ms.
* NOT_FOUND on FunctionMap (function deleted after lookup) -> ``NotFoundError`` with the
  bare server message.
* UNAUTHENTICATED -> ``modal.exception.AuthError``, 1 attempt, immediate.
  (Likewise PERMISSION_DENIED -> ``PermissionDeniedError``, INVALID_ARGUMENT ->
  ``InvalidError``: 1 attempt.)
* RESOURCE_EXHAUSTED -> ``modal.exception.ResourceExhaustedError``, 1 attempt, immediate
  (spawn_map would retry it forever; plain spawn does not).
* UNAVAILABLE ``times<=3`` -> transparently retried, call succeeds (~0.1/0.3/0.7 s extra).
  ``times>=4`` (or ``None`` = always) -> ``modal.exception.ServiceError`` after 4
  attempts, ~0.7 s.  So keep injected outages finite or rely on the 0.7 s give-up.
  DEADLINE_EXCEEDED / UNKNOWN / CANCELLED behave the same (``ServiceError``); INTERNAL
  -> ``modal.exception.InternalError`` after 4 attempts, ~0.7 s.
* ``retry_after=s`` attaches an ``RPCRetryPolicy`` detail (Modal's server-driven
  throttling): the client then retries *any* status after ``s`` seconds, without limit
  unless ``MODAL_MAX_THROTTLE_WAIT`` is set -- use small ``times``.  It logs
  "Warning: Received Status.X ... Retrying..." to stderr.
* ``after_processing=True`` -> the request is fully handled (spawn recorded, call id
  issued) and then answered with the error: a lost reply.  With a retryable status the
  client retries and the stand-in records a second spawn with a new call id -- both
  spawns carry the same ``idempotency_key`` (``retry_attempt`` 0 and 1).
* "hang" -> the request never completes (until ``release_hangs``/``reset``/``stop``);
  ``FunctionGet``/``FunctionMap`` have no client-side deadline, so the caller blocks
  forever: wrap in ``asyncio.wait_for`` -> ``asyncio.TimeoutError`` (== builtin
  ``TimeoutError`` on 3.11) after your timeout; the client stays usable.
  ``FunctionGetOutputs`` does carry a deadline (timeout + 5 s per attempt): a hanging
  ``get(timeout=0)`` ends with ``modal.exception.ConnectionError("Deadline exceeded")``
  after 4 attempts, ~20.7 s -- too slow for unit tests.
* "delay" (``seconds=``) -> answers normally after a pause.

* Stand-in stopped / nothing listening -> the client keeps re-trying to connect
  (18 attempts, <= 63 s budget) and raises ``modal.exception.ConnectionError("Could not
  connect to the Modal server.")`` after ~56 s.  Don't test "Modal is down" that way.

Actions: a grpclib ``Status`` (optionally ``message=``), ``"hang"``, ``"delay"``.
``times`` counts matching requests (``None`` = every request until cleared); several
injections on one RPC are consumed in FIFO order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import grpclib.server
from grpclib import GRPCError, Status
from modal._serialization import deserialize as _modal_deserialize
from modal._serialization import serialize as _modal_serialize
from modal._utils.grpc_utils import CustomProtoStatusDetailsCodec
from modal_proto import api_grpc, api_pb2

__all__ = [
    "DEFAULT_TOKEN_ID",
    "DEFAULT_TOKEN_SECRET",
    "ModalStandIn",
    "Outcome",
    "Spawn",
    "reset_modal_client",
]

DEFAULT_TOKEN_ID = "ak-standin-test-token"
DEFAULT_TOKEN_SECRET = "as-standin-test-secret"

_SERVICE_PREFIX = "/modal.client.ModalClient/"


# ---------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a function call has produced, as reported by ``FunctionGetOutputs``."""

    kind: str
    value: Any = None

    RUNNING = "running"
    RETURNED = "returned"
    RAISED = "raised"
    REMOTE_ERROR = "remote_error"
    FUNCTION_TIMEOUT = "function_timeout"
    INTERNAL_FAILURE = "internal_failure"
    EXPIRED = "expired"

    @classmethod
    def running(cls) -> Outcome:
        return cls(cls.RUNNING)

    @classmethod
    def returned(cls, value: Any) -> Outcome:
        return cls(cls.RETURNED, value)

    @classmethod
    def raised(cls, exc: BaseException) -> Outcome:
        if not isinstance(exc, BaseException):
            raise TypeError(f"Outcome.raised needs an exception instance, got {exc!r}")
        return cls(cls.RAISED, exc)

    @classmethod
    def remote_error(cls, message: str) -> Outcome:
        return cls(cls.REMOTE_ERROR, message)

    @classmethod
    def function_timeout(cls, message: str = "Function call timed out") -> Outcome:
        return cls(cls.FUNCTION_TIMEOUT, message)

    @classmethod
    def internal_failure(cls, message: str = "Internal failure") -> Outcome:
        return cls(cls.INTERNAL_FAILURE, message)

    @classmethod
    def expired(cls) -> Outcome:
        return cls(cls.EXPIRED)


class _SpawnFields(NamedTuple):
    app_name: str
    function_name: str
    args: tuple
    kwargs: dict


class Spawn(_SpawnFields):
    """One recorded function input.  Equal to the plain tuple ``(app, fn, args, kwargs)``.

    Extra attributes: ``call_id``, ``input_id``, ``function_id``, ``environment_name``,
    ``invocation_type`` ("async" = spawn, "sync" = remote/map), ``idempotency_key`` and
    ``retry_attempt`` (the client's ``x-idempotency-key`` / ``x-retry-attempt`` headers:
    one key per logical client call, shared by its retries).
    """

    call_id: str
    input_id: str
    function_id: str
    environment_name: str
    invocation_type: str
    idempotency_key: str
    retry_attempt: int

    def __repr__(self) -> str:
        return (
            f"Spawn(app_name={self.app_name!r}, function_name={self.function_name!r}, "
            f"args={self.args!r}, kwargs={self.kwargs!r}, call_id={self.call_id!r})"
        )


# ---------------------------------------------------------------------------
# Internal state
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Function:
    function_id: str
    app_id: str
    environment_name: str
    app_name: str
    function_name: str
    default_outcome: Outcome


@dataclasses.dataclass
class _Call:
    call_id: str
    function_id: str | None
    input_ids: list[str] = dataclasses.field(default_factory=list)
    outcome: Outcome | None = None


@dataclasses.dataclass
class _Injection:
    action: Any  # Status | "hang" | "delay"
    remaining: int | None
    message: str | None
    retry_after: float | None
    seconds: float
    after_processing: bool

    def error(self) -> GRPCError:
        details = None
        if self.retry_after is not None:
            details = [api_pb2.RPCRetryPolicy(retry_after_secs=self.retry_after)]
        msg = self.message or f"Injected {self.action.name} by the Modal stand-in"
        return GRPCError(self.action, msg, details)


def reset_modal_client() -> None:
    """Forget (and close) the ``modal`` client singleton of *this* process.

    ``modal.Client.from_env()`` caches the first client it builds, including its server
    URL and credentials.  Call this after changing ``MODAL_*`` env vars in-process.
    """
    from modal._utils.async_utils import synchronizer
    from modal.client import _Client

    client = _Client._client_from_env
    _Client._set_env_client(None)
    if client is not None and not client.is_closed():
        try:
            synchronizer._translate_out(client).close()
        except Exception:  # pragma: no cover - best effort on a possibly broken client
            pass


def _decode_args(fn_input: api_pb2.FunctionInput) -> tuple[tuple, dict]:
    if fn_input.WhichOneof("args_oneof") != "args":
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            "The Modal stand-in does not support blob-stored inputs; keep spawn inputs < 8 KiB",
        )
    if fn_input.data_format == api_pb2.DATA_FORMAT_CBOR:
        import cbor2

        args, kwargs = cbor2.loads(fn_input.args)
    else:
        args, kwargs = _modal_deserialize(fn_input.args, None)
    return tuple(args), dict(kwargs)


def _serialize(obj: Any) -> bytes:
    return _modal_serialize(obj)


# ---------------------------------------------------------------------------
# The stand-in
# ---------------------------------------------------------------------------


class ModalStandIn:
    """A loopback Modal control plane.  See the module docstring for the full contract.

    Attributes:
        host, port, url: where it listens (``url`` is the ``MODAL_SERVER_URL`` value).
        env: the env vars a client process needs to talk to this stand-in.
        default_environment: environment used when the client sends none ("main").
        pipeline_inputs: if False, FunctionMap returns no pipelined inputs and the
            client sends the input with a separate FunctionPutInputs.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_environment: str = "main",
        token_id: str = DEFAULT_TOKEN_ID,
        token_secret: str = DEFAULT_TOKEN_SECRET,
        require_exact_credentials: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.default_environment = default_environment
        self.token_id = token_id
        self.token_secret = token_secret
        self.require_exact_credentials = require_exact_credentials
        self.pipeline_inputs = True

        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._functions: dict[tuple[str, str, str], _Function] = {}
        self._functions_by_id: dict[str, _Function] = {}
        self._apps: dict[tuple[str, str], str] = {}
        self._calls_state: dict[str, _Call] = {}
        self._spawns: list[Spawn] = []
        self._lookups: list[tuple[str, str, str, bool]] = []
        self._counter: Counter[str] = Counter()
        self._injections: dict[str, list[_Injection]] = {}
        self._pending_invocation_type: dict[str, int] = {}

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpclib.server.Server | None = None
        self._stop_future: asyncio.Future | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._changed: asyncio.Event | None = None  # loop-thread only
        self._hangs: set[asyncio.Future] = set()  # loop-thread only

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> ModalStandIn:
        if self._thread is not None:
            raise RuntimeError("ModalStandIn already started")
        self._thread = threading.Thread(target=self._thread_main, name="modal-standin", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=15):
            raise RuntimeError("Modal stand-in did not start within 15 s")
        if self._startup_error is not None:
            raise RuntimeError("Modal stand-in failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._request_stop)
            except RuntimeError:  # loop already closed
                pass
        thread.join(timeout=15)
        self._thread = None

    def __enter__(self) -> ModalStandIn:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": self.token_id,
            "MODAL_TOKEN_SECRET": self.token_secret,
            "MODAL_DISABLE_API_PROXY": "1",
        }

    def patch_env(self, monkeypatch: Any, *, isolate_user_config: bool = True) -> None:
        """Point this process's modal client at the stand-in (pytest ``monkeypatch``).

        Sets ``self.env``, removes OAuth/profile env vars that would conflict with token
        auth, optionally hides ``~/.modal.toml`` and drops the cached client singleton.
        Call :func:`reset_modal_client` again at fixture teardown.
        """
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        for key in (
            "MODAL_OAUTH_REFRESH_TOKEN",
            "MODAL_OAUTH_CLIENT_ID",
            "MODAL_OAUTH_CLIENT_SECRET",
            "MODAL_OAUTH_JWT_KEY",
            "MODAL_PROFILE",
            "MODAL_IS_REMOTE",
            "MODAL_ENVIRONMENT",
            "MODAL_PAYLOAD_FORMAT",
        ):
            monkeypatch.delenv(key, raising=False)
        if isolate_user_config:
            import modal.config

            monkeypatch.setattr(modal.config, "_user_config", {})
        reset_modal_client()

    # ------------------------------------------------------------- test controls

    def add_function(
        self,
        app_name: str,
        function_name: str,
        environment_name: str | None = None,
        *,
        default_outcome: Outcome | None = None,
    ) -> str:
        """Register a deployed function; returns its id ("fu-...").  Re-adding replaces it."""
        env = environment_name or self.default_environment
        with self._lock:
            app_id = self._apps.get((env, app_name))
            if app_id is None:
                app_id = self._apps[(env, app_name)] = self._new_id("ap")
            old = self._functions.get((env, app_name, function_name))
            entry = _Function(
                function_id=old.function_id if old else self._new_id("fu"),
                app_id=app_id,
                environment_name=env,
                app_name=app_name,
                function_name=function_name,
                default_outcome=default_outcome or Outcome.running(),
            )
            self._functions[(env, app_name, function_name)] = entry
            self._functions_by_id[entry.function_id] = entry
        self._notify()
        return entry.function_id

    def remove_function(
        self, app_name: str, function_name: str, environment_name: str | None = None
    ) -> None:
        env = environment_name or self.default_environment
        with self._lock:
            entry = self._functions.pop((env, app_name, function_name))
            self._functions_by_id.pop(entry.function_id, None)
            if not any(k[:2] == (env, app_name) for k in self._functions):
                self._apps.pop((env, app_name), None)

    def set_default_outcome(
        self,
        app_name: str,
        function_name: str,
        outcome: Outcome,
        environment_name: str | None = None,
    ) -> None:
        env = environment_name or self.default_environment
        with self._lock:
            self._functions[(env, app_name, function_name)].default_outcome = outcome
        self._notify()

    _MISSING = object()

    def set_outcome(
        self,
        call_id: str,
        outcome: Outcome | None = None,
        *,
        returned: Any = _MISSING,
        raised: BaseException | None = None,
    ) -> None:
        """Set what ``FunctionCall.from_id(call_id).get()`` observes.

        Exactly one of ``outcome``, ``returned=``, ``raised=``.  Unknown call ids are
        registered (so ``FunctionCall.from_id`` works for ids never spawned here).
        """
        given = [outcome is not None, returned is not self._MISSING, raised is not None]
        if sum(given) != 1:
            raise TypeError("pass exactly one of outcome, returned=, raised=")
        if returned is not self._MISSING:
            outcome = Outcome.returned(returned)
        elif raised is not None:
            outcome = Outcome.raised(raised)
        assert outcome is not None
        with self._lock:
            call = self._calls_state.get(call_id)
            if call is None:
                call = self._calls_state[call_id] = _Call(call_id=call_id, function_id=None)
            call.outcome = outcome
        self._notify()

    def inject(
        self,
        rpc: str,
        action: Status | str,
        *,
        times: int | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        seconds: float = 0.0,
        after_processing: bool = False,
    ) -> None:
        """Make the next ``times`` requests of ``rpc`` fail / hang / be delayed.

        ``action``: a ``grpclib.Status`` (answered with ``message``), ``"hang"`` or
        ``"delay"`` (``seconds``).  ``times=None`` = every request until cleared.
        ``retry_after`` (with a Status) adds Modal's ``RPCRetryPolicy`` detail.
        ``after_processing=True`` (with a Status): handle the request normally (e.g. record
        the spawn) and *then* fail it -- a lost reply.  Retried by the client, this yields
        duplicate spawns sharing one ``Spawn.idempotency_key``.
        """
        rpc = rpc.removeprefix(_SERVICE_PREFIX)
        if rpc not in _ALL_RPCS:
            raise ValueError(f"{rpc!r} is not an RPC of modal.client.ModalClient")
        if not isinstance(action, Status) and action not in ("hang", "delay"):
            raise ValueError(f"action must be a grpclib.Status, 'hang' or 'delay', not {action!r}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if after_processing and not isinstance(action, Status):
            raise ValueError("after_processing needs a grpclib.Status action")
        with self._lock:
            self._injections.setdefault(rpc, []).append(
                _Injection(action, times, message, retry_after, seconds, after_processing)
            )

    def clear_injections(self, rpc: str | None = None) -> None:
        with self._lock:
            if rpc is None:
                self._injections.clear()
            else:
                self._injections.pop(rpc, None)

    def release_hangs(self) -> None:
        """Answer every currently hanging request with UNAVAILABLE."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            done = threading.Event()

            def _release() -> None:
                for fut in list(self._hangs):
                    if not fut.done():
                        fut.set_exception(
                            GRPCError(Status.UNAVAILABLE, "Released by the Modal stand-in")
                        )
                done.set()

            try:
                loop.call_soon_threadsafe(_release)
                done.wait(timeout=5)
            except RuntimeError:
                pass

    def reset(self) -> None:
        """Forget functions, calls, spawns, counters and injections; release hangs."""
        self.release_hangs()
        with self._lock:
            self._functions.clear()
            self._functions_by_id.clear()
            self._apps.clear()
            self._calls_state.clear()
            self._spawns.clear()
            self._lookups.clear()
            self._counter.clear()
            self._injections.clear()
            self._pending_invocation_type.clear()
        self.pipeline_inputs = True

    def wait_for_spawns(self, count: int, timeout: float = 5.0) -> list[Spawn]:
        deadline = time.monotonic() + timeout
        while True:
            spawns = self.spawns
            if len(spawns) >= count or time.monotonic() >= deadline:
                return spawns
            time.sleep(0.01)

    # ------------------------------------------------------------- observations

    @property
    def spawns(self) -> list[Spawn]:
        with self._lock:
            return list(self._spawns)

    @property
    def calls(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counter)

    @property
    def lookups(self) -> list[tuple[str, str, str, bool]]:
        with self._lock:
            return list(self._lookups)

    @property
    def call_ids(self) -> list[str]:
        with self._lock:
            return [c.call_id for c in self._calls_state.values() if c.function_id is not None]

    def outcome_of(self, call_id: str) -> Outcome:
        with self._lock:
            return self._resolve_outcome(self._calls_state[call_id])

    # ------------------------------------------------------------- internals

    def _new_id(self, prefix: str) -> str:
        # Distinct across stand-ins and processes; counter keeps ids readable in failures.
        return f"{prefix}-{next(self._ids):06d}{secrets.token_hex(5)}"

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # pragma: no cover - surfaced via start()
            self._startup_error = exc
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._changed = asyncio.Event()
        self._stop_future = asyncio.get_running_loop().create_future()
        servicer = _SERVICER_CLASS(self)
        server = grpclib.server.Server(
            [servicer], status_details_codec=CustomProtoStatusDetailsCodec()
        )
        await server.start(self.host, self.port)
        self._server = server
        assert server._server is not None
        self.port = server._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop_future
        finally:
            for fut in list(self._hangs):
                if not fut.done():
                    fut.set_exception(GRPCError(Status.UNAVAILABLE, "Modal stand-in stopping"))
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=5)
            except TimeoutError:  # pragma: no cover
                pass

    def _request_stop(self) -> None:
        if self._stop_future is not None and not self._stop_future.done():
            self._stop_future.set_result(None)

    def _notify(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._bump)
        except RuntimeError:
            pass

    def _bump(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _resolve_outcome(self, call: _Call) -> Outcome:
        if call.outcome is not None:
            return call.outcome
        fn = self._functions_by_id.get(call.function_id or "")
        return fn.default_outcome if fn else Outcome.running()

    def _take_injection(self, rpc: str) -> _Injection | None:
        with self._lock:
            queue = self._injections.get(rpc)
            while queue:
                inj = queue[0]
                if inj.remaining is None:
                    return inj
                inj.remaining -= 1
                if inj.remaining <= 0:
                    queue.pop(0)
                return inj
            return None

    # Called for every request of every RPC, before the implementation runs.
    async def _before(self, rpc: str, stream: grpclib.server.Stream) -> _Injection | None:
        """Count, apply injections, check auth.  Returns an error to raise after processing."""
        with self._lock:
            self._counter[rpc] += 1
        inj = self._take_injection(rpc)
        if inj is not None:
            if inj.after_processing:
                self._check_auth(stream)
                return inj
            if inj.action == "hang":
                fut = asyncio.get_running_loop().create_future()
                self._hangs.add(fut)
                try:
                    await fut
                finally:
                    self._hangs.discard(fut)
            elif inj.action == "delay":
                await asyncio.sleep(inj.seconds)
            else:
                raise inj.error()
        self._check_auth(stream)
        return None

    def _check_auth(self, stream: grpclib.server.Stream) -> None:
        md = stream.metadata or {}
        token_id = md.get("x-modal-token-id")
        token_secret = md.get("x-modal-token-secret")
        if not token_id or not token_secret:
            raise GRPCError(Status.UNAUTHENTICATED, "No credentials provided")
        if self.require_exact_credentials and (token_id, token_secret) != (
            self.token_id,
            self.token_secret,
        ):
            raise GRPCError(Status.UNAUTHENTICATED, "Token ID or secret is invalid")

    # ------------------------------------------------------------- RPC bodies

    async def _rpc_ClientHello(self, stream: grpclib.server.Stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def _rpc_FunctionGet(self, stream: grpclib.server.Stream) -> None:
        req: api_pb2.FunctionGetRequest = await stream.recv_message()
        env = req.environment_name or self.default_environment
        with self._lock:
            entry = self._functions.get((env, req.app_name, req.object_tag))
            app_known = (env, req.app_name) in self._apps
            self._lookups.append((env, req.app_name, req.object_tag, entry is not None))
        if entry is None:
            if not app_known:
                msg = f"App '{req.app_name}' not found in environment '{env}'"
            else:
                msg = f"Function '{req.object_tag}' not found in app '{req.app_name}'"
            raise GRPCError(Status.NOT_FOUND, msg)
        fn_proto = api_pb2.Function(
            module_name="standin",
            function_name=entry.function_name,
            function_type=api_pb2.Function.FUNCTION_TYPE_FUNCTION,
        )
        formats = [api_pb2.DATA_FORMAT_PICKLE, api_pb2.DATA_FORMAT_CBOR]
        await stream.send_message(
            api_pb2.FunctionGetResponse(
                function_id=entry.function_id,
                handle_metadata=api_pb2.FunctionHandleMetadata(
                    function_name=entry.function_name,
                    function_type=api_pb2.Function.FUNCTION_TYPE_FUNCTION,
                    app_id=entry.app_id,
                    definition_id=f"de-{entry.function_id[3:]}",
                    supported_input_formats=formats,
                    supported_output_formats=formats,
                ),
                function=api_pb2.FunctionData(
                    module_name="standin",
                    function_name=entry.function_name,
                    function_type=api_pb2.Function.FUNCTION_TYPE_FUNCTION,
                    ranked_functions=[
                        api_pb2.FunctionData.RankedFunction(rank=0, function=fn_proto)
                    ],
                ),
            )
        )

    def _record_inputs(
        self,
        entry: _Function,
        call_id: str,
        items: Iterable[api_pb2.FunctionPutInputsItem],
        invocation_type: int,
        stream: grpclib.server.Stream,
    ) -> list[api_pb2.FunctionPutInputsResponseItem]:
        md = stream.metadata or {}
        idempotency_key = str(md.get("x-idempotency-key", ""))
        retry_attempt = int(md.get("x-retry-attempt", "0") or 0)
        decoded = [(item, _decode_args(item.input)) for item in items]  # decode before recording
        out = []
        with self._lock:
            call = self._calls_state.setdefault(
                call_id, _Call(call_id=call_id, function_id=entry.function_id)
            )
            for item, (args, kwargs) in decoded:
                input_id = self._new_id("in")
                call.input_ids.append(input_id)
                spawn = Spawn(entry.app_name, entry.function_name, args, kwargs)
                spawn.call_id = call_id
                spawn.input_id = input_id
                spawn.function_id = entry.function_id
                spawn.environment_name = entry.environment_name
                spawn.idempotency_key = idempotency_key
                spawn.retry_attempt = retry_attempt
                spawn.invocation_type = (
                    "async"
                    if invocation_type == api_pb2.FUNCTION_CALL_INVOCATION_TYPE_ASYNC
                    else "sync"
                )
                self._spawns.append(spawn)
                out.append(
                    api_pb2.FunctionPutInputsResponseItem(
                        idx=item.idx, input_id=input_id, input_jwt=f"standin-input-jwt.{input_id}"
                    )
                )
        return out

    def _function_for(self, function_id: str) -> _Function:
        with self._lock:
            entry = self._functions_by_id.get(function_id)
        if entry is None:
            raise GRPCError(Status.NOT_FOUND, f"Function {function_id} not found")
        return entry

    async def _rpc_FunctionMap(self, stream: grpclib.server.Stream) -> None:
        req: api_pb2.FunctionMapRequest = await stream.recv_message()
        entry = self._function_for(req.function_id)
        call_id = self._new_id("fc")
        with self._lock:
            self._calls_state[call_id] = _Call(call_id=call_id, function_id=entry.function_id)
        pipelined: list[api_pb2.FunctionPutInputsResponseItem] = []
        if self.pipeline_inputs and req.pipelined_inputs:
            pipelined = self._record_inputs(
                entry, call_id, req.pipelined_inputs, req.function_call_invocation_type, stream
            )
        else:
            with self._lock:
                self._pending_invocation_type[call_id] = req.function_call_invocation_type
        await stream.send_message(
            api_pb2.FunctionMapResponse(
                function_call_id=call_id,
                pipelined_inputs=pipelined,
                function_call_jwt=f"standin-fc-jwt.{call_id}",
                sync_client_retries_enabled=False,
                max_inputs_outstanding=1000,
            )
        )

    async def _rpc_FunctionPutInputs(self, stream: grpclib.server.Stream) -> None:
        req: api_pb2.FunctionPutInputsRequest = await stream.recv_message()
        entry = self._function_for(req.function_id)
        with self._lock:
            if req.function_call_id not in self._calls_state:
                raise GRPCError(Status.NOT_FOUND, f"Function call {req.function_call_id} not found")
            inv = self._pending_invocation_type.get(
                req.function_call_id, api_pb2.FUNCTION_CALL_INVOCATION_TYPE_ASYNC
            )
        items = self._record_inputs(entry, req.function_call_id, req.inputs, inv, stream)
        await stream.send_message(api_pb2.FunctionPutInputsResponse(inputs=items))

    async def _rpc_FunctionGetOutputs(self, stream: grpclib.server.Stream) -> None:
        req: api_pb2.FunctionGetOutputsRequest = await stream.recv_message()
        deadline = time.monotonic() + max(0.0, min(req.timeout, 60.0))
        while True:
            with self._lock:
                call = self._calls_state.get(req.function_call_id)
                if call is None:
                    raise GRPCError(
                        Status.NOT_FOUND, f"Function call {req.function_call_id} not found"
                    )
                outcome = self._resolve_outcome(call)
                input_id = call.input_ids[0] if call.input_ids else ""
            remaining = deadline - time.monotonic()
            if outcome.kind != Outcome.RUNNING or remaining <= 0:
                break
            changed = self._changed
            assert changed is not None
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except TimeoutError:
                pass

        idx = req.start_idx if req.HasField("start_idx") else 0
        if outcome.kind == Outcome.RUNNING:
            resp = api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=1, last_entry_id="0-0")
        elif outcome.kind == Outcome.EXPIRED:
            resp = api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=0, last_entry_id="0-0")
        else:
            resp = api_pb2.FunctionGetOutputsResponse(
                outputs=[
                    api_pb2.FunctionGetOutputsItem(
                        result=_generic_result(outcome),
                        idx=idx,
                        input_id=input_id,
                        data_format=api_pb2.DATA_FORMAT_PICKLE,
                    )
                ],
                last_entry_id="1-0",
                num_unfinished_inputs=0,
            )
        await stream.send_message(resp)


def _generic_result(outcome: Outcome) -> api_pb2.GenericResult:
    GR = api_pb2.GenericResult
    if outcome.kind == Outcome.RETURNED:
        return GR(status=GR.GENERIC_STATUS_SUCCESS, data=_serialize(outcome.value))
    if outcome.kind == Outcome.RAISED:
        exc = outcome.value
        return GR(
            status=GR.GENERIC_STATUS_FAILURE,
            data=_serialize(exc),
            exception=repr(exc),
            traceback="".join(traceback.format_exception_only(type(exc), exc)),
        )
    if outcome.kind == Outcome.REMOTE_ERROR:
        return GR(status=GR.GENERIC_STATUS_FAILURE, exception=str(outcome.value))
    if outcome.kind == Outcome.FUNCTION_TIMEOUT:
        return GR(status=GR.GENERIC_STATUS_TIMEOUT, exception=str(outcome.value))
    if outcome.kind == Outcome.INTERNAL_FAILURE:
        return GR(status=GR.GENERIC_STATUS_INTERNAL_FAILURE, exception=str(outcome.value))
    raise AssertionError(f"unexpected outcome {outcome!r}")


# ---------------------------------------------------------------------------
# Servicer class: every abstract RPC of ModalClientBase, generated at import time.
# ---------------------------------------------------------------------------

_ALL_RPCS: frozenset[str] = frozenset(api_grpc.ModalClientBase.__abstractmethods__)


def _make_handler(rpc: str):
    async def handler(self: Any, stream: grpclib.server.Stream) -> None:
        standin: ModalStandIn = self._standin
        late_failure = await standin._before(rpc, stream)
        impl = getattr(standin, f"_rpc_{rpc}", None)
        if impl is None:
            raise GRPCError(
                Status.UNIMPLEMENTED, f"{rpc} is not implemented by the wsctl Modal stand-in"
            )
        await impl(stream)
        if late_failure is not None:
            # The reply message is already on the wire; the non-OK trailers make the client
            # raise anyway, i.e. "the server did the work but the client saw an error".
            raise late_failure.error()

    handler.__name__ = handler.__qualname__ = rpc
    return handler


def _build_servicer_class() -> type:
    def __init__(self: Any, standin: ModalStandIn) -> None:
        self._standin = standin

    namespace: dict[str, Any] = {"__init__": __init__}
    for rpc in _ALL_RPCS:
        namespace[rpc] = _make_handler(rpc)
    cls = type("ModalStandInServicer", (api_grpc.ModalClientBase,), namespace)
    assert not cls.__abstractmethods__
    return cls


_SERVICER_CLASS = _build_servicer_class()

# Sanity: every RPC we implement must exist in the installed proto (catches renames on upgrade).
_IMPLEMENTED = {name[len("_rpc_") :] for name in vars(ModalStandIn) if name.startswith("_rpc_")}
assert _IMPLEMENTED <= _ALL_RPCS, _IMPLEMENTED - _ALL_RPCS
