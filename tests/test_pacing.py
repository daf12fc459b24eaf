"""Pacing: limits enforced in the claim, fleet-wide (issue: pacing, parts 2, 3 and 5).

In-process passes over a real PostgreSQL with the memory backend; the subprocess
acceptance tests (three `dispatch --loop` against a Clay stand-in) are in
tests/test_pacing_fleet.py.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tests.support import factories as f
from tests.support.clay_standin import max_in_window
from wsctl import limits
from wsctl.dispatch import PassOptions, run_pass
from wsctl.dispatch.memory import MemoryBackend

STEP = "enrich_company_via_waterfall_in_clay"
OTHER = "normalize_all_core_values"


def _registry_id(conn, step: str, workstream: str = "apollo_scrape") -> uuid.UUID:
    return conn.execute(
        "SELECT id FROM enrichment_registry WHERE slug = %s AND workstream_slug = %s",
        (step, workstream),
    ).fetchone()[0]


def _bind(conn, step: str, *templates: str) -> None:
    limits.bind_registry(conn, _registry_id(conn, step), list(templates))


def _world(conn, *, type_: str = "sync", n: int = 30, steps=(STEP,)):
    for step in steps:
        f.register(
            conn, step, "apollo_scrape", type_, f"fn_{step}", "recv" if type_ == "async" else None
        )
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, list(steps), n)
    return client, batch


class Recorder:
    """Memory-backend functions that note when each item ran."""

    def __init__(self):
        self.calls: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, item_id, workstream_slug=None):
        with self.lock:
            self.calls.append((time.monotonic(), item_id))


def _backend(fn_names, fn, *, inline: bool = True) -> MemoryBackend:
    b = MemoryBackend({name: fn for name in fn_names})
    b.runs_inline = inline
    return b


def _statuses(conn, step=STEP):
    return dict(
        conn.execute(
            "SELECT status, count(*) FROM workflow_states WHERE step_name = %s GROUP BY 1",
            (step,),
        ).fetchall()
    )


def test_a_rate_limit_spreads_a_once_pass_and_holds_back_the_rest(conn):
    _world(conn, n=40)
    _bind(conn, STEP, "clay:{client}")
    limits.set_limit(conn, "clay:acme", rate="10/s", burst=5)
    rec = Recorder()
    opts = PassOptions(max_seconds=1.5, chunk_size=50)
    summary = run_pass(conn, _backend([f"fn_{STEP}"], rec), opts)
    ran = len(rec.calls)
    # a full bucket holds burst-1 tokens, then 10/s for the pass's 1.5 s
    assert 4 + 10 <= ran <= 4 + 16, ran
    assert summary.completed == ran
    # spread over the pass, not at its start: within rate x t + burst in every window
    times = [t for t, _ in rec.calls]
    for window in (0.1, 0.3, 0.5, 1.0):
        assert max_in_window(times, window) <= 10 * window + 5
    assert times[-1] - times[0] >= 0.9
    assert summary.deferred == {"clay:acme": 40 - ran}
    assert summary.to_json()["deferred"] == {"clay:acme": 40 - ran}
    assert summary.stopped_by == "max_seconds" and summary.paced_seconds > 0.5
    # held back: PENDING with no attempt counted
    rows = conn.execute(
        "SELECT status, attempts, count(*) FROM workflow_states WHERE step_name = %s GROUP BY 1, 2",
        (STEP,),
    ).fetchall()
    assert sorted(rows) == sorted([("COMPLETED", 0, ran), ("PENDING", 0, 40 - ran)])


def test_unlimited_work_behind_a_held_back_key_is_still_claimed(conn):
    client, _ = _world(conn, n=30)
    f.register(conn, OTHER, "apollo_scrape", "sync", "fn_other")
    f.add_batch(conn, client, [OTHER], 30)  # due after the Clay states
    _bind(conn, STEP, "clay")
    limits.set_limit(conn, "clay", rate="1/h", burst=3)  # 2 tokens, then nothing for an hour
    rec = Recorder()
    summary = run_pass(
        conn, _backend([f"fn_{STEP}", "fn_other"], rec), PassOptions(max_seconds=1, chunk_size=10)
    )
    assert _statuses(conn, OTHER) == {"COMPLETED": 30}
    assert _statuses(conn, STEP) == {"COMPLETED": 2, "PENDING": 28}
    assert summary.deferred["clay"] >= 8  # the candidates it examined (a chunk at a time)


def test_a_bound_key_with_no_limit_limits_nothing(conn):
    _world(conn, n=25)
    _bind(conn, STEP, "clay:{config.clay_workspace}")
    rec = Recorder()
    summary = run_pass(conn, _backend([f"fn_{STEP}"], rec), PassOptions(max_seconds=5))
    assert len(rec.calls) == 25 and summary.deferred == {}
    assert summary.paced_seconds == 0


def test_a_config_field_key_is_shared_by_clients_in_one_workspace(conn):
    f.register(conn, STEP, "apollo_scrape", "sync", "fn_clay")
    acme, globex, initech = (f.add_client(conn, n) for n in ("acme", "globex", "initech"))
    f.add_config(conn, acme, STEP, "apollo_scrape", {"clay_workspace": "ws1"})
    f.add_config(conn, globex, STEP, "apollo_scrape", {"clay_workspace": "ws1"})
    f.add_config(conn, initech, STEP, "apollo_scrape", {"clay_workspace": "ws2"})
    for c in (acme, globex, initech):
        f.add_batch(conn, c, [STEP], 10)
    _bind(conn, STEP, "clay:{config.clay_workspace}")
    limits.set_limit(conn, "clay:ws1", rate="1/h", burst=5)
    limits.set_limit(conn, "clay:ws2", rate="1/h", burst=3)
    rec = Recorder()
    summary = run_pass(conn, _backend(["fn_clay"], rec), PassOptions(max_seconds=0.5))
    per_client = dict(
        conn.execute(
            "SELECT c.name, count(*) FROM workflow_states ws JOIN batches b ON b.id = ws.batch_id"
            " JOIN clients c ON c.id = b.client_id WHERE ws.status = 'COMPLETED' GROUP BY 1"
        ).fetchall()
    )
    # acme and globex share ws1's 4 tokens; initech has ws2's 2 to itself
    assert sum(v for k, v in per_client.items() if k in ("acme", "globex")) == 4
    assert per_client.get("initech") == 2
    assert summary.deferred == {"clay:ws1": 16, "clay:ws2": 8}


def test_max_in_flight_counts_dispatched_states_until_they_finish(conn):
    _world(conn, type_="async", n=10)
    _bind(conn, STEP, "clay")
    limits.set_limit(conn, "clay", max_in_flight=3)
    rec = Recorder()
    backend = _backend([f"fn_{STEP}"], rec, inline=True)
    s1 = run_pass(conn, backend, PassOptions(max_seconds=0.6))
    assert len(rec.calls) == 3 and _statuses(conn) == {"DISPATCHED": 3, "PENDING": 7}
    assert s1.deferred == {"clay": 7}
    # Nothing frees a slot: the next pass claims nothing.
    run_pass(conn, backend, PassOptions(max_seconds=0.3))
    assert len(rec.calls) == 3
    # Two callbacks complete their states: two slots.
    done = [r[0] for r in conn.execute(
        "SELECT id FROM workflow_states WHERE status = 'DISPATCHED' ORDER BY id LIMIT 2"
    )]  # fmt: skip
    conn.execute("SELECT wsctl.complete_steps(%s::uuid[], NULL)", (done,))
    run_pass(conn, backend, PassOptions(max_seconds=0.3))
    assert len(rec.calls) == 5 and _statuses(conn)["DISPATCHED"] == 3


def test_an_expired_lease_never_holds_a_slot(conn):
    _world(conn, n=4)
    _bind(conn, STEP, "clay")
    limits.set_limit(conn, "clay", max_in_flight=2)
    # two states claimed by a dispatcher that died: their leases expired
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHING', claim_token = gen_random_uuid(),"
        " lease_expires_at = now() - interval '1 minute'"
        " WHERE id IN (SELECT id FROM workflow_states ORDER BY id LIMIT 2)"
    )
    rec = Recorder()
    run_pass(conn, _backend([f"fn_{STEP}"], rec), PassOptions(max_seconds=2))
    # the two reclaimed and the two PENDING all ran: the dead claims held no slot
    assert len(rec.calls) == 4 and _statuses(conn) == {"COMPLETED": 4}


def test_the_backend_cap_per_function_and_a_limit_that_overrides_it(conn):
    _world(conn, type_="async", n=12)
    rec = Recorder()
    backend = _backend([f"fn_{STEP}"], rec, inline=False)
    backend.function_cap = 5  # what ModalBackend sets (2,000 by default)
    s = run_pass(conn, backend, PassOptions(max_seconds=0.4, reconcile=False))
    assert len(rec.calls) == 5 and s.deferred == {f"modal:fn_{STEP}": 7}
    # an async call whose sender returned is no longer at Modal: its slot is free
    conn.execute(
        "UPDATE workflow_states SET sender_returned_at = now()"
        " WHERE id IN (SELECT id FROM workflow_states WHERE status = 'DISPATCHED' LIMIT 2)"
    )
    run_pass(conn, backend, PassOptions(max_seconds=0.4, reconcile=False))
    assert len(rec.calls) == 7
    # a limit on modal:FUNCTION says otherwise
    limits.set_limit(conn, f"modal:fn_{STEP}", max_in_flight=9)
    run_pass(conn, backend, PassOptions(max_seconds=0.4, reconcile=False))
    assert len(rec.calls) == 11


def test_two_dispatchers_at_once_share_one_bucket(db_url, conn):
    import psycopg

    _world(conn, n=200)
    _bind(conn, STEP, "clay")
    limits.set_limit(conn, "clay", rate="20/s", burst=10)
    rec = Recorder()

    def one():
        with psycopg.connect(db_url, autocommit=True) as c:
            run_pass(c, _backend([f"fn_{STEP}"], rec), PassOptions(max_seconds=2.0))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = [t for t, _ in rec.calls]
    assert len({i for _, i in rec.calls}) == len(rec.calls)  # none twice
    assert 9 + 20 * 1.5 <= len(times) <= 9 + 20 * 2.2, len(times)
    for window in (0.05, 0.2, 0.5, 1.0, 1.5):
        assert max_in_window(times, window) <= 20 * window + 10, window


def test_a_retry_after_is_the_backoff_and_a_full_queue_counts_no_attempt(conn):
    from wsctl.clay import ClayAnswer

    _world(conn, n=2)

    class Full(Exception):
        reason_code = "modal_resource_exhausted"

    def fn(item_id, workstream_slug=None):
        if fn.n == 0:
            fn.n += 1
            raise ClayAnswer(429, retry_after=120)
        raise Full("queue full")

    fn.n = 0
    run_pass(conn, _backend([f"fn_{STEP}"], fn), PassOptions(max_attempts=1))
    rows = conn.execute(
        "SELECT status, attempts, reason_code,"
        " extract(epoch FROM available_at - now()) AS wait FROM workflow_states ORDER BY reason_code"
    ).fetchall()
    by_code = {r[2]: r for r in rows}
    # 429: transient, its Retry-After (120 s) is the backoff; with --max-attempts 1 it FAILED
    assert by_code["rate_limited"][0] == "FAILED"
    # RESOURCE_EXHAUSTED: backs off, no attempt counted, so even at max-attempts 1 it waits
    full = by_code["modal_resource_exhausted"]
    assert full[0] == "PENDING" and full[1] == 0 and full[3] > 1


def test_retry_after_sets_available_at(conn):
    from wsctl.clay import ClayAnswer

    _world(conn, n=1)

    def fn(item_id, workstream_slug=None):
        raise ClayAnswer(429, retry_after=120)

    run_pass(conn, _backend([f"fn_{STEP}"], fn), PassOptions())
    status, attempts, wait = conn.execute(
        "SELECT status, attempts, extract(epoch FROM available_at - now()) FROM workflow_states"
    ).fetchone()
    assert (status, attempts) == ("PENDING", 1) and 110 < float(wait) <= 121


@pytest.mark.parametrize("burst", [1, 4])
def test_the_point_of_call_token_waits_and_gives_up(conn, burst):
    from wsctl.dispatch.pacing import LimitWait, take_call_token

    limits.set_limit(conn, "k", rate="5/s", burst=burst)
    cap = max(1, burst - 1)
    t0 = time.monotonic()
    for _ in range(cap + 2):
        take_call_token(conn, ["k"], max_wait=2)
    # cap at once, then 5/s
    assert time.monotonic() - t0 == pytest.approx(2 / 5, abs=0.15)
    limits.set_limit(conn, "slow", rate="1/h", burst=2)
    take_call_token(conn, ["slow"], max_wait=0.1)
    with pytest.raises(LimitWait):
        take_call_token(conn, ["slow"], max_wait=0.1)
    assert take_call_token(conn, ["undefined-key"], max_wait=0) < 0.05  # took nothing


def test_dry_run_and_item_show_say_what_a_limit_holds_back(cli, conn):
    _, batch = _world(conn, n=6)
    _bind(conn, STEP, "clay")
    limits.set_limit(conn, "clay", rate="1/h", burst=3)  # 2 tokens now
    before = conn.execute("SELECT tokens FROM wsctl.limits").fetchone()
    r = cli("dispatch", "--dry-run", "--backend", "modal", "--app", "x", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["deferred"] == {"clay": 4}
    assert [p["held_by"] for p in doc["plan"]].count("clay") == 4
    assert [p["held_by"] for p in doc["plan"]][:2] == [None, None]
    text = cli("dispatch", "--dry-run", "--backend", "modal", "--app", "x")
    assert "held back by limits now (would stay PENDING): clay=4" in text.out
    # the plan drew nothing from the bucket
    assert conn.execute("SELECT tokens FROM wsctl.limits").fetchone() == before
    # Take the two tokens: then every PENDING state waits for the limit.
    conn.execute("UPDATE wsctl.limits SET tokens = 0, refilled_at = now()")
    item = conn.execute(
        "SELECT item_id FROM workflow_states WHERE batch_id = %s LIMIT 1", (batch,)
    ).fetchone()[0]
    shown = cli("item", "show", str(item), "--json").json()
    (step,) = [s for s in shown["steps"] if s["step"] == STEP]
    assert len(step["waiting_for"]) == 1
    assert step["waiting_for"][0].startswith("waiting for limit clay: no token now (rate")
    human = cli("item", "show", str(item))
    assert "waiting for limit clay: no token now" in human.out
    # An in-flight cap that is full says so too.
    limits.set_limit(conn, "clay", max_in_flight=1, clear=frozenset({"rate"}))
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED' WHERE id = ("
        " SELECT id FROM workflow_states WHERE item_id <> %s LIMIT 1)",
        (item,),
    )
    shown = cli("item", "show", str(item), "--json").json()
    (step,) = [s for s in shown["steps"] if s["step"] == STEP]
    assert step["waiting_for"] == ["waiting for limit clay: 1 of 1 in flight"]


def test_item_show_counts_the_configured_cap_of_calls_per_function(cli, conn, tmp_path):
    """`[dispatch] modal_function_cap` in wsctl.toml, not its default, is the cap item show
    counts (one call at Modal fills a cap of 1; the default 2,000 holds nothing back)."""
    _, batch = _world(conn, n=3)
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHED', modal_call_id = 'fc-1' WHERE id = ("
        " SELECT id FROM workflow_states WHERE batch_id = %s LIMIT 1)",
        (batch,),
    )
    item = conn.execute(
        "SELECT item_id FROM workflow_states WHERE batch_id = %s AND status = 'PENDING' LIMIT 1",
        (batch,),
    ).fetchone()[0]

    def waiting() -> list[str]:
        shown = cli("item", "show", str(item), "--json")
        assert shown.code == 0, shown.err
        (step,) = [s for s in shown.json()["steps"] if s["step"] == STEP]
        return step["waiting_for"]

    assert waiting() == []
    (tmp_path / "wsctl.toml").write_text("[dispatch]\nmodal_function_cap = 1\n")
    assert waiting() == [f"waiting for limit modal:fn_{STEP}: 1 of 1 in flight"]


def test_a_limit_row_locked_elsewhere_fails_the_pass_in_one_line_claiming_nothing(
    cli, conn, db_url, tmp_path
):
    import psycopg

    from tests.conftest import table_snapshot

    _world(conn, n=5)
    _bind(conn, STEP, "clay")
    limits.set_limit(conn, "clay", rate="10/s", burst=5)
    app = tmp_path / "app.py"
    app.write_text(f"def fn_{STEP}(item_id, workstream_slug=None):\n    return None\n")
    (tmp_path / "wsctl.toml").write_text('[database]\nlock_timeout = "1s"\n')
    before = table_snapshot(conn)
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM wsctl.limits WHERE key = 'clay' FOR UPDATE")
        import os

        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            r = cli("dispatch", "--once", "--backend", "local", "--app", str(app))
        finally:
            os.chdir(cwd)
        holder.rollback()
    assert r.code == 1, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "lock" in lines[0] and "limits" in lines[0], r.err
    assert table_snapshot(conn) == before  # nothing claimed, no token taken
    # Once the lock is gone the same pass claims them.
    rec = Recorder()
    run_pass(conn, _backend([f"fn_{STEP}"], rec), PassOptions(max_seconds=1))
    assert len(rec.calls) == 5  # 4 at once (burst 5 keeps one back), the fifth 0.1 s later


def test_the_modal_function_cap_is_a_setting(tmp_path, monkeypatch):
    from wsctl import settings
    from wsctl.dispatch.run import build_backend
    from wsctl.errors import UsageError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wsctl.toml").write_text('[dispatch]\nmodal_function_cap = 300\napp = "x"\n')
    cfg = settings.load().dispatch
    assert cfg.modal_function_cap == 300 and cfg.source("modal_function_cap").startswith("file:")
    assert build_backend(cfg).function_cap == 300  # the modal backend caps at the setting
    assert settings.DEFAULT_DISPATCH.modal_function_cap == 2000  # Modal's figure by default
    (tmp_path / "wsctl.toml").write_text("[dispatch]\nmodal_function_cap = 0\n")
    with pytest.raises(UsageError, match="modal_function_cap"):
        settings.load()
