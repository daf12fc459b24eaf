"""The example Modal app (examples/enrichment_app.py): each function finds its config by
(workflow slug, workstream slug), in the seed's situation: one client, two workstreams with
the same workflow slugs and different configs (different Clay webhook URLs on a local
stand-in). Run through `wsctl dispatch --backend local` and through ``.local()``."""

from __future__ import annotations

import csv
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from tests.conftest import table_snapshot
from tests.support import factories as f
from wsctl.demo import REGISTRY, ClayStandIn, ReceiverServer
from wsctl.dispatch.local import LocalBackend, find_callable, load_app
from wsctl.queries import example_path
from wsctl.worker import ConfigResolutionError

APP_PATH = str(example_path("enrichment_app.py"))
APP = load_app(APP_PATH)
logic = APP.logic
APOLLO, LINKEDIN = "apollo_scrape", "linkedin_scrape"
SECRET = "app-test-secret"

with example_path("apollo_export_sample.csv").open(encoding="utf-8", newline="") as _fh:
    SAMPLE = list(csv.DictReader(_fh))


@pytest.fixture
def servers():
    clay = ClayStandIn(delay=0.01)
    receivers = {r: step for (step, _ws), (_t, _s, r) in REGISTRY.items() if r}
    receiver = ReceiverServer(logic, receivers)
    yield clay, receiver
    clay.close()
    receiver.close()


@pytest.fixture
def worker_env(db_url, monkeypatch):
    """What the Modal secrets give the functions in production."""
    monkeypatch.setenv("WSCTL_DATABASE_URL", db_url)
    monkeypatch.setenv(logic.SECRET_ENV, SECRET)


def _configs(clay_url: str, receiver_url: str) -> dict:
    """Same slugs in both workstreams, different settings (layout, case, Clay tables)."""
    out = {}
    for ws in (APOLLO, LINKEDIN):
        out[(logic.STEP_NAME, ws)] = {"case": "lower" if ws == APOLLO else "upper"}
        out[(logic.STEP_DOMAIN, ws)] = {"domain_from_email": ws == LINKEDIN}
        out[(logic.STEP_CORE, ws)] = {}
        out[(logic.STEP_SPLIT, ws)] = {"source": f"{ws}-source"}
        for step in (logic.STEP_CLAY_COMPANY, logic.STEP_CLAY_PERSON):
            out[(step, ws)] = {
                "clay_table_webhook_url": f"{clay_url}/{ws}/{step}",
                "clay_webhook_auth_token": f"token-{ws}",
                "callback_url": f"{receiver_url}/{REGISTRY[(step, ws)][2]}",
            }
    return out


def _scenario(conn, servers, blueprint: list[str], n_items: int = 2) -> dict:
    clay, receiver = servers
    conn.execute(example_path("enrichment_schema.sql").read_text())
    client = f.add_client(conn)
    for (step, ws), (typ, sender, receiver_fn) in REGISTRY.items():
        f.register(conn, step, ws, typ, sender, receiver_fn)
    config_ids = {}
    for (step, ws), config in _configs(clay.url, receiver.url).items():
        f.add_config(conn, client, step, ws, config)
        config_ids[(step, ws)] = str(
            conn.execute(
                "SELECT id FROM client_workflow_configs WHERE workflow_slug = %s"
                " AND workstream_slug = %s",
                (step, ws),
            ).fetchone()[0]
        )
    batches, items = {}, {}
    rows = iter(r for r in SAMPLE if r["Email"] and r["Website"])
    for ws in (APOLLO, LINKEDIN):
        batches[ws] = f.add_batch(conn, client, blueprint, 0, workstream=ws)
        for _ in range(n_items):
            item = conn.execute(
                "INSERT INTO batch_items (batch_id, data) VALUES (%s, %s) RETURNING id",
                (batches[ws], psycopg.types.json.Jsonb(next(rows))),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO workflow_states (item_id, batch_id, step_name) VALUES (%s, %s, %s)",
                (item, batches[ws], blueprint[0]),
            )
            items[str(item)] = ws
    return {"client": client, "config_ids": config_ids, "batches": batches, "items": items}


def claim_all(conn) -> None:
    """What a dispatch claim does to each state (until wsctl's claim bumps the generation)."""
    conn.execute(
        "UPDATE workflow_states SET dispatch_generation = dispatch_generation + 1,"
        " status = 'DISPATCHING'"
    )


def _trace(conn, item_id: str, step: str) -> dict:
    row = conn.execute("SELECT data->'_trace'->%s FROM batch_items WHERE id = %s", (step, item_id))
    return row.fetchone()[0]


def _wait_completed(conn, step: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = conn.execute(
            "SELECT count(*) FROM workflow_states WHERE step_name = %s AND status = 'COMPLETED'",
            (step,),
        ).fetchone()[0]
        if done == n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{step}: {done} of {n} states completed")


@pytest.mark.parametrize("step", [logic.STEP_CLAY_COMPANY, logic.STEP_CLAY_PERSON])
def test_dispatch_sends_each_item_to_its_workstreams_clay_table(
    cli, conn, servers, worker_env, step
):
    sc = _scenario(conn, servers, [step])
    clay, _receiver = servers
    res = cli("dispatch", "--once", "--backend", "local", "--app", APP_PATH, "--json")
    assert res.code == 0, res.err
    assert res.json()["dispatched"] == 4
    _wait_completed(conn, step, 4)

    got = {r["item_id"]: r for r in clay.requests}
    assert set(got) == set(sc["items"])
    for item_id, ws in sc["items"].items():
        assert got[item_id]["path"] == f"/{ws}/{step}"
        assert got[item_id]["auth"] == f"token-{ws}"
        assert got[item_id]["workstream"] == ws
        trace = _trace(conn, item_id, step)
        assert trace["config_id"] == sc["config_ids"][(step, ws)]
        assert trace["config_workstream"] == ws
        assert trace["function"] == REGISTRY[(step, ws)][1]
        clay_data = conn.execute(
            "SELECT data->'clay'->%s FROM batch_items WHERE id = %s", (step, item_id)
        ).fetchone()[0]
        assert clay_data["clay_table"] == f"/{ws}/{step}"
    assert clay.callback_errors == []


SYNC_FUNCTIONS = [
    ("start_normalize_company_name", logic.STEP_NAME),
    ("start_normalize_company_domain", logic.STEP_DOMAIN),
    ("start_normalize_all_core_values", logic.STEP_CORE),
    ("run_split_raw_apollo_scrape_data", logic.STEP_SPLIT),
    ("run_split_raw_linkedin_scrape_data", logic.STEP_SPLIT),
]
ASYNC_FUNCTIONS = [
    ("start_enrich_company_via_waterfall_in_clay", logic.STEP_CLAY_COMPANY),
    ("start_enrich_person_via_waterfall_in_clay", logic.STEP_CLAY_PERSON),
    ("start_linkedin_enrich_company_via_waterfall_in_clay", logic.STEP_CLAY_COMPANY),
    ("start_linkedin_enrich_person_via_waterfall_in_clay", logic.STEP_CLAY_PERSON),
]


@pytest.mark.parametrize("pass_workstream", [False, True], ids=["looked-up", "passed"])
@pytest.mark.parametrize(("fn", "step"), SYNC_FUNCTIONS + ASYNC_FUNCTIONS)
def test_each_function_uses_its_items_workstream_config(
    conn, servers, worker_env, fn, step, pass_workstream
):
    sc = _scenario(conn, servers, [step], n_items=1)
    clay, _receiver = servers
    claim_all(conn)  # the functions run while their states are claimed
    modal_fn = getattr(APP, fn)
    for item_id, ws in sc["items"].items():
        modal_fn.local(item_id, ws if pass_workstream else None)
        trace = _trace(conn, item_id, step)
        assert trace["workstream"] == ws
        assert trace["config_workstream"] == ws
        assert trace["config_id"] == sc["config_ids"][(step, ws)]
        assert trace["function"] == fn
    if (fn, step) in ASYNC_FUNCTIONS:
        assert {r["item_id"]: r["path"] for r in clay.requests} == {
            item_id: f"/{ws}/{step}" for item_id, ws in sc["items"].items()
        }


def test_the_configs_settings_take_effect_per_workstream(conn, servers, worker_env):
    sc = _scenario(conn, servers, [logic.STEP_NAME], n_items=1)
    names = {}
    for item_id, ws in sc["items"].items():
        APP.start_normalize_company_name.local(item_id)
        names[ws] = conn.execute(
            "SELECT data->'normalized'->>'company_name' FROM batch_items WHERE id = %s",
            (item_id,),
        ).fetchone()[0]
    assert names[APOLLO] == names[APOLLO].lower()  # {"case": "lower"}
    assert names[LINKEDIN] == names[LINKEDIN].upper()  # {"case": "upper"}


def test_split_writes_with_its_workstreams_source(conn, servers, worker_env):
    sc = _scenario(conn, servers, [logic.STEP_SPLIT], n_items=1)
    for item_id, ws in sc["items"].items():
        getattr(APP, REGISTRY[(logic.STEP_SPLIT, ws)][1]).local(item_id, ws)
    rows = conn.execute(
        "SELECT workstream_slug, source FROM enrichment_example.people ORDER BY 1"
    ).fetchall()
    assert rows == [(APOLLO, f"{APOLLO}-source"), (LINKEDIN, f"{LINKEDIN}-source")]


def test_a_passed_workstream_that_disagrees_with_the_batch_is_refused(conn, servers, worker_env):
    sc = _scenario(conn, servers, [logic.STEP_CLAY_COMPANY], n_items=1)
    clay, _receiver = servers
    item_id = next(i for i, ws in sc["items"].items() if ws == APOLLO)
    before = table_snapshot(conn)
    with pytest.raises(ConfigResolutionError, match="refusing to choose"):
        APP.start_enrich_company_via_waterfall_in_clay.local(item_id, LINKEDIN)
    assert table_snapshot(conn) == before
    assert clay.requests == []


def test_a_legacy_batch_without_workstream_is_refused(conn, servers, worker_env):
    sc = _scenario(conn, servers, [logic.STEP_NAME], n_items=1)
    conn.execute("UPDATE batches SET workstream_slug = NULL")
    before = table_snapshot(conn)
    for item_id in sc["items"]:
        with pytest.raises(ConfigResolutionError, match="no workstream_slug"):
            APP.start_normalize_company_name.local(item_id)
    assert table_snapshot(conn) == before


def test_a_config_without_webhook_url_is_retried_and_sends_nothing(cli, conn, servers, worker_env):
    _scenario(conn, servers, [logic.STEP_CLAY_COMPANY], n_items=1)
    clay, _receiver = servers
    conn.execute(
        "UPDATE client_workflow_configs SET config = config - 'clay_table_webhook_url'"
        " WHERE workstream_slug = %s",
        (LINKEDIN,),
    )
    res = cli("dispatch", "--once", "--backend", "local", "--app", APP_PATH, "--json")
    assert res.json()["retried"] == 1
    err = conn.execute(
        "SELECT s.last_error FROM workflow_states s JOIN batches b ON b.id = s.batch_id"
        " WHERE b.workstream_slug = %s",
        (LINKEDIN,),
    ).fetchone()[0]
    assert "has no clay_table_webhook_url" in err
    assert [r["workstream"] for r in clay.requests] == [APOLLO]


def test_the_scheduled_functions_pass(conn, servers, worker_env):
    """``dispatch_every_minute``'s body: one dispatch pass through the library."""
    _scenario(conn, servers, [logic.STEP_NAME, logic.STEP_DOMAIN], n_items=2)
    summary = logic.dispatch_pass("enrichment-worker", backend=LocalBackend(APP_PATH), conn=conn)
    assert summary["completed"] == 8  # both sync steps of 4 items, in one pass
    assert summary["failed"] == summary["blocked"] == 0
    statuses = conn.execute("SELECT DISTINCT status FROM workflow_states").fetchall()
    assert statuses == [("COMPLETED",)]


def test_every_function_of_the_example_registry_is_in_the_app():
    """examples/registry.toml and examples/enrichment_app.py ship together: they must agree."""
    named = {fn for typ_sender_receiver in REGISTRY.values() for fn in typ_sender_receiver[1:]}
    named.discard(None)
    assert named
    assert sorted(fn for fn in named if find_callable(APP, fn) is None) == []
    for (step, ws), (typ, _sender, receiver) in REGISTRY.items():
        assert ws in (APOLLO, LINKEDIN)
        assert (typ == "async") == (receiver is not None), (step, ws)


# --- the Clay sender posts each dispatch generation at most once ----------------


class RecordingClay:
    """A Clay table webhook on loopback that records each row and answers ``status``, after
    ``delay`` seconds; it never calls back (the tests send callbacks themselves)."""

    def __init__(self, status: int = 200, delay: float = 0.0):
        self.status, self.delay = status, delay
        self.rows: list[dict] = []
        clay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                clay.rows.append(json.loads(body))
                time.sleep(clay.delay)
                self.send_response(clay.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/table"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recording_clay():
    clay = RecordingClay()
    yield clay
    clay.close()


@pytest.fixture
def clay_item(conn):
    """One item whose Clay company step is claimed (DISPATCHING, generation 1)."""
    conn.execute(example_path("enrichment_schema.sql").read_text())
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, [logic.STEP_CLAY_COMPANY, logic.STEP_CLAY_PERSON], 0)
    item = conn.execute(
        "INSERT INTO batch_items (batch_id, data) VALUES (%s, %s) RETURNING id",
        (batch, psycopg.types.json.Jsonb(SAMPLE[0])),
    ).fetchone()[0]
    state = conn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name) VALUES (%s, %s, %s)"
        " RETURNING id",
        (item, batch, logic.STEP_CLAY_COMPANY),
    ).fetchone()[0]
    claim_all(conn)
    return str(item), state


def _send(conn, item_id: str, clay: RecordingClay) -> str:
    config = {"clay_table_webhook_url": clay.url, "callback_url": "http://127.0.0.1:9/cb"}
    return logic.run_clay_sender(
        item_id, APOLLO, logic.STEP_CLAY_COMPANY, "sender", config, conn=conn, secret=SECRET
    )


def _sends(conn) -> list[tuple]:
    return conn.execute(
        "SELECT dispatch_generation, posted_at IS NOT NULL, http_status, error"
        " FROM enrichment_example.clay_sends ORDER BY dispatch_generation"
    ).fetchall()


def _retry_and_claim(conn, state_id) -> None:
    """`wsctl retry` (PENDING, attempts reset) and the next claim (generation + 1)."""
    conn.execute("UPDATE workflow_states SET status = 'PENDING' WHERE id = %s", (state_id,))
    claim_all(conn)


def test_a_rerun_of_the_same_generation_posts_nothing(conn, clay_item, recording_clay):
    item_id, state_id = clay_item
    from wsctl import clay

    webhook = clay.digest(recording_clay.url)
    used = [_send(conn, item_id, recording_clay) for _ in range(3)]  # a Modal input retry, ...
    assert used[0] == f"clay webhook {webhook[:12]} on 127.0.0.1"
    assert used[1:] == [f"sent before (state {state_id} generation 1)"] * 2
    assert len(recording_clay.rows) == 1
    row = recording_clay.rows[0]
    assert (row["state_id"], row["dispatch_generation"]) == (str(state_id), 1)
    assert logic.verify_callback_token(row["state_id"], row["callback_token"], SECRET) == (
        state_id,
        1,
    )
    assert _sends(conn) == [(1, True, 200, None)]


def test_the_webhook_url_is_kept_nowhere_but_its_digest(conn, clay_item, recording_clay):
    """A Clay webhook URL lets anyone post into the table: the sender records which source
    took the POST by its digest, and neither its send row, the item's trace nor its return
    value holds the URL."""
    from wsctl import clay

    item_id, state_id = clay_item
    returned = _send(conn, item_id, recording_clay)
    (digest,) = conn.execute(
        "SELECT webhook_digest FROM enrichment_example.clay_sends WHERE state_id = %s",
        (state_id,),
    ).fetchone()
    assert digest == clay.digest(recording_clay.url)
    path = "/table"  # the URL's secret part
    sends = conn.execute("SELECT to_jsonb(cs)::text FROM enrichment_example.clay_sends cs")
    data = conn.execute("SELECT data::text FROM batch_items WHERE id = %s", (item_id,))
    for text in [returned, *(r[0] for r in sends), *(r[0] for r in data)]:
        assert recording_clay.url not in text and path not in text, text


def test_an_earlier_send_table_loses_the_url(conn):
    """Applying the schema file again to a table of the version that kept webhook_url drops
    the column (twice: idempotent); its rows stay, with no digest (which source took an old
    POST is not known), and the sender works on the table as converted."""
    conn.execute(example_path("enrichment_schema.sql").read_text())
    conn.execute("DROP TABLE enrichment_example.clay_sends")
    conn.execute(
        "CREATE TABLE enrichment_example.clay_sends (state_id uuid NOT NULL,"
        " dispatch_generation bigint NOT NULL, item_id uuid NOT NULL, step_name text NOT NULL,"
        " webhook_url text NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now(),"
        " posted_at timestamptz, http_status integer, error text,"
        " PRIMARY KEY (state_id, dispatch_generation))"
    )
    conn.execute(
        "INSERT INTO enrichment_example.clay_sends"
        " (state_id, dispatch_generation, item_id, step_name, webhook_url)"
        " VALUES (gen_random_uuid(), 1, gen_random_uuid(), 's', 'https://api.clay.com/v3/x')"
    )
    for _ in range(2):
        conn.execute(example_path("enrichment_schema.sql").read_text())
    cols = {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'enrichment_example' AND table_name = 'clay_sends'"
        )
    }
    assert "webhook_url" not in cols and "webhook_digest" in cols
    rows = conn.execute("SELECT step_name, webhook_digest FROM enrichment_example.clay_sends")
    assert rows.fetchall() == [("s", None)]


def test_a_rerun_after_the_callback_completed_the_state_posts_nothing(
    conn, clay_item, recording_clay
):
    item_id, state_id = clay_item
    _send(conn, item_id, recording_clay)
    row = recording_clay.rows[0]
    callback = {"state_id": row["state_id"], "callback_token": row["callback_token"]}
    res = logic.handle_clay_callback(
        {**callback, "enriched": {"employees": 3}}, secret=SECRET, conn=conn
    )
    assert res.status == 200
    before = table_snapshot(conn)
    assert _send(conn, item_id, recording_clay).startswith("sent before")
    assert len(recording_clay.rows) == 1
    assert table_snapshot(conn) == before


def test_a_new_generation_posts_again_with_its_own_token(conn, clay_item, recording_clay):
    item_id, state_id = clay_item
    _send(conn, item_id, recording_clay)
    _retry_and_claim(conn, state_id)
    _send(conn, item_id, recording_clay)
    _send(conn, item_id, recording_clay)
    assert [r["dispatch_generation"] for r in recording_clay.rows] == [1, 2]
    first, second = (r["callback_token"] for r in recording_clay.rows)
    assert first != second
    assert _sends(conn) == [(1, True, 200, None), (2, True, 200, None)]
    # The first generation's callback is fenced off; the second's completes the state.
    stale = {"state_id": str(state_id), "callback_token": first, "enriched": {}}
    assert logic.handle_clay_callback(stale, secret=SECRET, conn=conn).status == 409
    fresh = {**stale, "callback_token": second}
    assert logic.handle_clay_callback(fresh, secret=SECRET, conn=conn).status == 200


def test_concurrent_runs_of_one_generation_post_once(db_url, conn, clay_item):
    item_id, _state_id = clay_item
    clay = RecordingClay(delay=0.3)  # the winner is still posting while the others look
    n = 6
    barrier = threading.Barrier(n)
    outcomes: list[str] = []

    def run() -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            try:
                _send(c, item_id, clay)
                outcomes.append("returned")
            except logic.AlreadySent:
                outcomes.append("already sent")

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    clay.close()
    assert len(clay.rows) == 1
    assert sorted(outcomes) == ["already sent"] * (n - 1) + ["returned"]
    assert _sends(conn) == [(1, True, 200, None)]


def test_a_failed_post_is_never_posted_again_in_its_generation(conn, clay_item):
    item_id, state_id = clay_item
    clay = RecordingClay(status=503)
    try:
        from wsctl.clay import ClayAnswer

        with pytest.raises(ClayAnswer, match="HTTP 503"):  # transient: the step is retried
            _send(conn, item_id, clay)
        # Clay may have taken the row before it failed: this generation is not sent again.
        with pytest.raises(logic.AlreadySent, match="failed: Clay webhook answered HTTP 503"):
            _send(conn, item_id, clay)
        assert len(clay.rows) == 1
        assert _trace(conn, item_id, logic.STEP_CLAY_COMPANY) is None  # recorded no success
        clay.status = 200
        _retry_and_claim(conn, state_id)
        _send(conn, item_id, clay)
    finally:
        clay.close()
    assert [r["dispatch_generation"] for r in clay.rows] == [1, 2]
    assert _sends(conn) == [
        (1, False, None, "Clay webhook answered HTTP 503"),
        (2, True, 200, None),
    ]


def test_a_sender_that_stopped_mid_post_leaves_its_generation_unposted(
    conn, clay_item, recording_clay
):
    """Killed between its claim and Clay's answer: the outcome is unknown, so the rerun of
    that generation refuses to post (the retry's next generation does)."""
    item_id, state_id = clay_item
    conn.execute(
        "INSERT INTO enrichment_example.clay_sends"
        " (state_id, dispatch_generation, item_id, step_name)"
        " VALUES (%s, 1, %s, %s)",
        (state_id, item_id, logic.STEP_CLAY_COMPANY),
    )
    with pytest.raises(logic.AlreadySent, match="no outcome"):
        _send(conn, item_id, recording_clay)
    assert recording_clay.rows == []


@pytest.mark.parametrize("status", ["PENDING", "BLOCKED", "FAILED", "COMPLETED", "CANCELLED"])
def test_the_sender_posts_nothing_for_a_state_not_dispatched(
    conn, clay_item, recording_clay, status
):
    item_id, state_id = clay_item
    conn.execute("UPDATE workflow_states SET status = %s WHERE id = %s", (status, state_id))
    before = table_snapshot(conn)
    with pytest.raises(RuntimeError, match=f"is {status}, not dispatched"):
        _send(conn, item_id, recording_clay)
    assert recording_clay.rows == []
    assert table_snapshot(conn) == before
    assert _sends(conn) == []


def test_dispatch_records_the_generation_each_sender_posted(cli, conn, servers, worker_env):
    """Through `wsctl dispatch`: one send per state, at the generation the state is at."""
    _scenario(conn, servers, [logic.STEP_CLAY_PERSON])
    res = cli("dispatch", "--once", "--backend", "local", "--app", APP_PATH, "--json")
    assert res.code == 0, res.err
    _wait_completed(conn, logic.STEP_CLAY_PERSON, 4)
    rows = conn.execute(
        "SELECT s.id, s.dispatch_generation, c.dispatch_generation, c.posted_at IS NOT NULL"
        " FROM workflow_states s"
        " LEFT JOIN enrichment_example.clay_sends c ON c.state_id = s.id"
    ).fetchall()
    assert len(rows) == 4
    assert all(state_gen == sent_gen and posted for _id, state_gen, sent_gen, posted in rows)


# --- the receivers' web endpoints ---------------------------------------------


@pytest.mark.filterwarnings("ignore:Using `httpx`")  # starlette's TestClient on httpx
def test_the_web_endpoint_hands_the_raw_body_to_the_receiver(conn, worker_env, clay_item):
    """The Modal endpoint, served by FastAPI: 401 for a body nested 100,000 deep (FastAPI's
    own parsing would answer 400 before the token is checked), 400 for a proven callback
    whose payload jsonb cannot store, 200 for a good one. FastAPI is in the Modal image,
    not in the dev extras: this test runs only where it is installed."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    _item_id, state_id = clay_item
    endpoint = APP.receive_enrich_company_via_waterfall_in_clay
    api = fastapi.FastAPI()

    # The endpoints' annotation resolves in the app module, as FastAPI reads it on Modal.
    assert APP.Request is fastapi.Request

    async def receive(request):
        return await endpoint.local(request)

    receive.__annotations__ = {"request": fastapi.Request}  # not a string: resolvable here
    api.add_api_route("/receive", receive, methods=["POST"])

    client = TestClient(api)
    token = logic.callback_token(state_id, 1, SECRET)
    deep = b'{"state_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert client.post("/receive", content=deep).status_code == 401
    proven = f'{{"state_id": "{state_id}", "callback_token": "{token}", "enriched": '
    before = table_snapshot(conn)
    for bad in ('{"v": NaN}}', '{"v": "\\u0000"}}', '{"v": "\\ud800"}}'):
        res = client.post("/receive", content=proven + bad)
        assert res.status_code == 400, res.text
    assert table_snapshot(conn) == before
    res = client.post("/receive", content=proven + '{"employees": 7}}')
    assert (res.status_code, res.json()["completed"]) == (200, True)
    again = client.post("/receive", content=proven + '{"employees": 7}}')
    assert again.status_code == 409


def test_the_example_sender_takes_a_token_under_its_limit_before_the_post(
    conn, clay_item, recording_clay
):
    from wsctl import limits
    from wsctl.dispatch.pacing import LimitWait

    item_id, _state_id = clay_item
    f.register(conn, logic.STEP_CLAY_COMPANY, APOLLO, "async", "sender", "receiver")
    registry_id = conn.execute(
        "SELECT id FROM enrichment_registry WHERE slug = %s AND workstream_slug = %s",
        (logic.STEP_CLAY_COMPANY, APOLLO),
    ).fetchone()[0]
    limits.bind_registry(conn, registry_id, ["clay:{client}"])
    limits.set_limit(conn, "clay:acme", rate="1/h", burst=2)
    conn.execute("UPDATE wsctl.limits SET call_tokens = 0, call_refilled_at = now()")
    config = {
        "clay_table_webhook_url": recording_clay.url,
        "callback_url": "http://127.0.0.1:9/cb",
        "limit_wait_seconds": 0.2,
    }
    with pytest.raises(LimitWait, match="clay:acme"):
        logic.run_clay_sender(
            item_id, APOLLO, logic.STEP_CLAY_COMPANY, "sender", config, conn=conn, secret=SECRET
        )
    assert recording_clay.rows == []  # never posted without a token
    assert _sends(conn)[0][3].startswith("no token under limit clay:acme")
