"""The Modal stand-in, exercised through the real ``modal`` client (never the real Modal).

The expectations below double as executable documentation of how modal 1.6.4 behaves
against each server answer; see ``tests/support/modal_standin.py`` for the summary.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import types
import uuid

import grpclib.client
import grpclib.const
import modal
import modal.exception
import pytest
from grpclib import GRPCError, Status
from modal_proto import api_grpc

from tests.support.modal_standin import ModalStandIn, Outcome, Spawn, reset_modal_client

APP = "enrichment-worker"
FN = "start_normalize_company_name"


@pytest.fixture(scope="module")
def _server():
    with ModalStandIn() as server:
        yield server


@pytest.fixture
def standin(_server, monkeypatch):
    _server.reset()
    _server.patch_env(monkeypatch)
    yield _server
    _server.reset()  # also releases anything left hanging
    reset_modal_client()


def _fn(environment_name: str | None = None):
    return modal.Function.from_name(APP, FN, environment_name=environment_name)


# --------------------------------------------------------------------------- lookup


def test_hydrate_finds_registered_function_sync_and_async(standin):
    function_id = standin.add_function(APP, FN)

    fn = _fn()
    fn.hydrate()
    assert fn.object_id == function_id

    async def hydrate_async():
        f = _fn()
        await f.hydrate.aio()
        return f.object_id

    assert asyncio.run(hydrate_async()) == function_id
    assert standin.calls["FunctionGet"] == 2
    assert standin.lookups == [("main", APP, FN, True)] * 2


def test_hydrate_respects_environment(standin):
    staging_id = standin.add_function(APP, FN, environment_name="staging")
    fn = _fn(environment_name="staging")
    fn.hydrate()
    assert fn.object_id == staging_id
    with pytest.raises(modal.exception.NotFoundError):
        _fn().hydrate()  # default environment "main" has no such app


def test_hydrate_unknown_function_is_not_found(standin):
    standin.add_function(APP, "other_function")

    with pytest.raises(modal.exception.NotFoundError) as excinfo:
        modal.Function.from_name(APP, "nope").hydrate()
    assert str(excinfo.value) == (
        f"Lookup failed for Function 'nope' from the '{APP}' app: "
        f"Function 'nope' not found in app '{APP}'."
    )

    async def unknown_app():
        await modal.Function.from_name("no-app", "nope", environment_name="prod").hydrate.aio()

    with pytest.raises(modal.exception.NotFoundError) as excinfo:
        asyncio.run(unknown_app())
    assert (
        "Lookup failed for Function 'nope' from the 'no-app' app (in the 'prod' environment)"
        in (str(excinfo.value))
    )
    assert standin.calls["FunctionGet"] == 2  # NOT_FOUND is not retried


# --------------------------------------------------------------------------- spawn


def test_spawn_records_args_and_returns_distinct_call_ids(standin):
    function_id = standin.add_function(APP, FN)
    item_a, item_b = str(uuid.uuid4()), str(uuid.uuid4())

    fn = _fn()
    call_a = fn.spawn(item_a, "apollo_scrape")
    call_b = fn.spawn(item_b, "apollo_scrape")

    async def spawn_async():
        return await _fn().spawn.aio(item_a, workstream="linkedin", retries=2)

    call_c = asyncio.run(spawn_async())

    assert standin.spawns == [
        (APP, FN, (item_a, "apollo_scrape"), {}),
        (APP, FN, (item_b, "apollo_scrape"), {}),
        (APP, FN, (item_a,), {"workstream": "linkedin", "retries": 2}),
    ]
    ids = [call_a.object_id, call_b.object_id, call_c.object_id]
    assert len(set(ids)) == 3
    assert all(i.startswith("fc-") for i in ids)
    spawns = standin.spawns
    assert [s.call_id for s in spawns] == ids
    assert all(isinstance(s, Spawn) for s in spawns)
    assert {s.function_id for s in spawns} == {function_id}
    assert {s.environment_name for s in spawns} == {"main"}
    assert {s.invocation_type for s in spawns} == {"async"}
    assert standin.calls["FunctionMap"] == 3
    assert standin.calls["FunctionPutInputs"] == 0  # inputs are pipelined into FunctionMap


def test_spawn_without_pipelined_inputs_uses_put_inputs(standin):
    standin.add_function(APP, FN)
    standin.pipeline_inputs = False
    call = _fn().spawn("x", 1)
    assert standin.spawns == [(APP, FN, ("x", 1), {})]
    assert standin.spawns[0].call_id == call.object_id
    assert standin.calls["FunctionMap"] == 1
    assert standin.calls["FunctionPutInputs"] == 1


def test_200_concurrent_spawns_are_each_recorded_once(standin):
    standin.add_function(APP, FN)
    item_ids = [str(uuid.uuid4()) for _ in range(200)]

    async def spawn_all():
        fn = _fn()
        # Hydrate first: un-hydrated, every concurrent spawn would send its own FunctionGet.
        await fn.hydrate.aio()
        return await asyncio.gather(*(fn.spawn.aio(i, "apollo_scrape") for i in item_ids))

    calls = asyncio.run(spawn_all())

    spawns = standin.spawns
    assert sorted(s.args[0] for s in spawns) == sorted(item_ids)
    assert len({c.object_id for c in calls}) == 200
    assert {c.object_id for c in calls} == {s.call_id for s in spawns}
    assert standin.calls["FunctionMap"] == 200
    assert standin.calls["FunctionGet"] == 1


def test_concurrent_spawns_on_unhydrated_function_each_look_it_up(standin):
    """modal does not share an in-flight hydration: N concurrent first uses -> N FunctionGet."""
    standin.add_function(APP, FN)

    async def spawn_all():
        fn = _fn()
        return await asyncio.gather(*(fn.spawn.aio(i) for i in range(20)))

    asyncio.run(spawn_all())
    assert standin.calls["FunctionMap"] == 20
    assert standin.calls["FunctionGet"] > 1


@pytest.mark.slow
def test_spawns_from_several_processes(standin):
    """4 separate processes spawn concurrently; also proves nothing leaves 127.0.0.1."""
    standin.add_function(APP, FN)
    child = r"""
import asyncio, json, sys
connects = []
sys.addaudithook(lambda ev, args: connects.append(repr(args[1])) if ev == "socket.connect" else None)
import modal
async def main(prefix, n):
    fn = modal.Function.from_name(sys.argv[3], sys.argv[4])
    calls = await asyncio.gather(*(fn.spawn.aio(f"{prefix}-{i}", "apollo_scrape") for i in range(n)))
    return [c.object_id for c in calls]
ids = asyncio.run(main(sys.argv[1], int(sys.argv[2])))
print(json.dumps({"ids": ids, "connects": sorted(set(connects))}))
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child, f"p{n}", "25", APP, FN],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    expected_items = sorted(f"p{n}-{i}" for n in range(4) for i in range(25))
    assert sorted(s.args[0] for s in standin.spawns) == expected_items
    all_ids = [i for r in results for i in r["ids"]]
    assert len(set(all_ids)) == 100
    assert set(all_ids) == {s.call_id for s in standin.spawns}
    for r in results:
        assert r["connects"] == [repr(("127.0.0.1", standin.port))]


# --------------------------------------------------------------------------- outcomes


def test_get_timeout_zero_running_returned_raised(standin):
    standin.add_function(APP, FN)
    call_id = _fn().spawn("item", "apollo_scrape").object_id
    fc = modal.FunctionCall.from_id(call_id)

    # Default outcome: still running -> the *builtin* TimeoutError, not a modal.Error.
    with pytest.raises(TimeoutError) as excinfo:
        fc.get(timeout=0)
    assert not isinstance(excinfo.value, modal.exception.Error)

    standin.set_outcome(call_id, returned={"status": "ok", "rows": 3})
    assert modal.FunctionCall.from_id(call_id).get(timeout=0) == {"status": "ok", "rows": 3}

    standin.set_outcome(call_id, raised=ValueError("boom"))
    with pytest.raises(ValueError, match="^boom$"):
        modal.FunctionCall.from_id(call_id).get(timeout=0)

    async def get_async():
        return await modal.FunctionCall.from_id(call_id).get.aio(timeout=0)

    standin.set_outcome(call_id, Outcome.running())
    with pytest.raises(TimeoutError):
        asyncio.run(get_async())
    standin.set_outcome(call_id, returned=7)
    assert asyncio.run(get_async()) == 7


@pytest.mark.parametrize(
    ("outcome", "exc_type"),
    [
        (Outcome.expired(), modal.exception.OutputExpiredError),
        (Outcome.remote_error("worker crashed"), modal.exception.RemoteError),
        (Outcome.function_timeout(), modal.exception.FunctionTimeoutError),
        (Outcome.internal_failure(), modal.exception.InternalFailure),
    ],
)
def test_other_outcomes(standin, outcome, exc_type):
    standin.add_function(APP, FN)
    call_id = _fn().spawn("item").object_id
    standin.set_outcome(call_id, outcome)
    with pytest.raises(exc_type):
        modal.FunctionCall.from_id(call_id).get(timeout=0)


def test_per_function_default_outcome_and_unknown_call(standin):
    standin.add_function(APP, FN, default_outcome=Outcome.returned("done"))
    call = _fn().spawn("item")
    assert call.get(timeout=0) == "done"
    standin.set_default_outcome(APP, FN, Outcome.raised(RuntimeError("late failure")))
    with pytest.raises(RuntimeError, match="late failure"):
        call.get(timeout=0)
    with pytest.raises(modal.exception.NotFoundError):
        modal.FunctionCall.from_id("fc-neverspawned").get(timeout=0)


def test_get_with_timeout_returns_as_soon_as_outcome_is_set(standin):
    standin.add_function(APP, FN)
    call_id = _fn().spawn("item").object_id
    timer = threading.Timer(0.2, standin.set_outcome, args=(call_id,), kwargs={"returned": 5})
    timer.start()
    started = time.monotonic()
    assert modal.FunctionCall.from_id(call_id).get(timeout=10) == 5
    assert time.monotonic() - started < 3
    timer.join()


# --------------------------------------------------------------------------- injected errors


def _spawn_aio():
    async def go():
        return await _fn().spawn.aio("item", "apollo_scrape")

    return asyncio.run(go())


def _hydrate_aio():
    async def go():
        await _fn().hydrate.aio()

    asyncio.run(go())


def test_transient_unavailable_is_retried_by_the_client(standin):
    standin.add_function(APP, FN)
    standin.inject("FunctionMap", Status.UNAVAILABLE, times=2)
    started = time.monotonic()
    call = _spawn_aio()
    assert call.object_id.startswith("fc-")
    assert standin.calls["FunctionMap"] == 3
    assert len(standin.spawns) == 1
    assert time.monotonic() - started < 3  # 0.1 s + 0.2 s back-off


def test_persistent_unavailable_gives_up_after_four_attempts(standin):
    standin.add_function(APP, FN)
    standin.inject("FunctionMap", Status.UNAVAILABLE)
    started = time.monotonic()
    with pytest.raises(modal.exception.ServiceError):
        _spawn_aio()
    elapsed = time.monotonic() - started
    assert standin.calls["FunctionMap"] == 4  # Retry(): 3 retries, 0.1 + 0.2 + 0.4 s
    assert 0.6 < elapsed < 3
    assert standin.spawns == []

    standin.clear_injections()
    standin.inject("FunctionGet", Status.UNAVAILABLE)
    with pytest.raises(modal.exception.ServiceError):
        _hydrate_aio()
    assert standin.calls["FunctionGet"] == 5  # 1 from the spawn's hydration + 4 attempts


def test_unauthenticated_and_resource_exhausted_are_not_retried(standin):
    standin.add_function(APP, FN)
    standin.inject("FunctionGet", Status.UNAUTHENTICATED, times=1)
    with pytest.raises(modal.exception.AuthError):
        _hydrate_aio()
    assert standin.calls["FunctionGet"] == 1

    standin.inject("FunctionMap", Status.UNAUTHENTICATED, times=1)
    with pytest.raises(modal.exception.AuthError):
        _spawn_aio()
    assert standin.calls["FunctionMap"] == 1

    standin.inject("FunctionMap", Status.RESOURCE_EXHAUSTED, times=1, message="rate limited")
    with pytest.raises(modal.exception.ResourceExhaustedError, match="rate limited"):
        _spawn_aio()
    assert standin.calls["FunctionMap"] == 2
    assert standin.spawns == []


def test_server_driven_retry_policy(standin):
    standin.add_function(APP, FN)
    standin.inject("FunctionMap", Status.RESOURCE_EXHAUSTED, times=2, retry_after=0.05)
    call = _spawn_aio()
    assert standin.calls["FunctionMap"] == 3
    assert standin.spawns[0].call_id == call.object_id


def test_hang_surfaces_via_caller_timeout_and_client_recovers(standin):
    standin.add_function(APP, FN)
    standin.inject("FunctionMap", "hang", times=1)

    async def go():
        fn = _fn()
        await fn.hydrate.aio()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fn.spawn.aio("stuck"), timeout=0.3)
        return await fn.spawn.aio("after")

    started = time.monotonic()
    call = asyncio.run(go())
    assert time.monotonic() - started < 3
    assert standin.spawns == [(APP, FN, ("after",), {})]
    assert standin.spawns[0].call_id == call.object_id

    standin.inject("FunctionGet", "hang")
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(asyncio.wait_for(_fn().hydrate.aio(), timeout=0.3))


def test_lost_reply_duplicates_spawn_with_same_idempotency_key(standin):
    standin.add_function(APP, FN)
    standin.inject("FunctionMap", Status.UNAVAILABLE, times=1, after_processing=True)
    call = _fn().spawn("item")
    first, second = standin.spawns
    assert first == second == (APP, FN, ("item",), {})
    assert first.idempotency_key == second.idempotency_key != ""
    assert (first.retry_attempt, second.retry_attempt) == (0, 1)
    assert second.call_id == call.object_id != first.call_id


def test_delay_injection(standin):
    standin.add_function(APP, FN)
    standin.inject("FunctionGet", "delay", seconds=0.2)
    started = time.monotonic()
    _fn().hydrate()
    assert time.monotonic() - started >= 0.2


# --------------------------------------------------------------------------- protocol surface


def test_unimplemented_rpc_through_modal(standin):
    standin.add_function(APP, FN)
    call = _fn().spawn("item")
    with pytest.raises(modal.exception.UnimplementedError, match="FunctionCallCancel"):
        call.cancel()
    assert standin.calls["FunctionCallCancel"] == 1


def test_every_other_unary_rpc_answers_unimplemented(standin):
    implemented = {
        "ClientHello",
        "FunctionGet",
        "FunctionMap",
        "FunctionPutInputs",
        "FunctionGetOutputs",
    }
    rpc_names = api_grpc.ModalClientBase.__abstractmethods__
    handlers = api_grpc.ModalClientBase.__mapping__(
        types.SimpleNamespace(**dict.fromkeys(rpc_names))
    )
    unary = {
        path: h
        for path, h in handlers.items()
        if h.cardinality is grpclib.const.Cardinality.UNARY_UNARY
        and path.rsplit("/", 1)[1] not in implemented
    }
    assert len(unary) > 200

    async def probe():
        channel = grpclib.client.Channel("127.0.0.1", standin.port)
        metadata = {"x-modal-token-id": "ak-x", "x-modal-token-secret": "as-x"}
        statuses = {}
        try:
            for path, h in unary.items():
                method = grpclib.client.UnaryUnaryMethod(
                    channel, path, h.request_type, h.reply_type
                )
                try:
                    await method(h.request_type(), metadata=metadata, timeout=5)
                    statuses[path] = Status.OK
                except GRPCError as exc:
                    statuses[path] = exc.status
        finally:
            channel.close()
        return statuses

    statuses = asyncio.run(probe())
    assert set(statuses.values()) == {Status.UNIMPLEMENTED}
    assert standin.calls["AppList"] == 1


def test_client_hello(standin):
    client = modal.Client.from_env()
    client.hello()
    assert standin.calls["ClientHello"] == 1


def test_missing_token_fails_locally(standin, monkeypatch):
    monkeypatch.delenv("MODAL_TOKEN_ID")
    reset_modal_client()
    standin.add_function(APP, FN)
    assert modal.config.config.get("token_id") is None
    with pytest.raises(modal.exception.AuthError, match="Token missing"):
        _fn().hydrate()
    assert sum(standin.calls.values()) == 0


def test_reset_modal_client_switches_servers(standin, monkeypatch):
    standin.add_function(APP, FN)
    _fn().hydrate()
    with ModalStandIn() as other:
        other.add_function(APP, FN)
        other.patch_env(monkeypatch)  # includes reset_modal_client()
        _fn().hydrate()
        assert other.calls["FunctionGet"] == 1
    assert standin.calls["FunctionGet"] == 1
    standin.patch_env(monkeypatch)


def test_inject_validates_arguments(standin):
    with pytest.raises(ValueError):
        standin.inject("NoSuchRpc", Status.UNAVAILABLE)
    with pytest.raises(ValueError):
        standin.inject("FunctionMap", "explode")
    with pytest.raises(TypeError):
        standin.set_outcome("fc-x")
