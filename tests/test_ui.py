"""`wsctl ui` against a real PostgreSQL, in Debian's Chromium driven by Playwright.

The server is the real command (`python -m wsctl ui`) in a subprocess. The tests bind
0.0.0.0 and connect only through 127.0.0.1. Chromium is /usr/bin/chromium (the
`chromium` package, which .ci/run installs); Playwright never downloads a browser.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import create_database, drop_database, table_snapshot
from tests.support.commands import wsctl_argv

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TOKEN = "test-token-" + "x7Qz" * 6
SECRETS = ["sk-live-SECRET-abc123", "SECRETPATH", "pw-SECRET9", "tok-SECRET8", "brr-SECRET7"]
VOLATILE = {"wsctl_stats_duration_seconds", "wsctl_oldest_due_age_seconds", "wsctl_limit_tokens"}
CLAY_STEP = "enrich_company_via_waterfall_in_clay"
HOOK_CLIENT = "Hook Client"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ui:
    """A `wsctl ui` subprocess; ``base`` is its 127.0.0.1 URL."""

    def __init__(self, url: str, *args: str, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.err_path = tmp / f"ui-{self.port}.err"
        env = {k: v for k, v in os.environ.items() if k != "WSCTL_UI_TOKEN"}
        self.proc = subprocess.Popen(
            wsctl_argv(url, "ui", "--port", str(self.port), "--refresh", "0", *args),
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.err_path.open("w"),
        )
        deadline = time.monotonic() + 30
        while "ui: serving" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"wsctl ui did not start: {self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http(method: str, url: str, headers: dict | None = None) -> tuple[int, dict, str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo(pg_admin_url, template_db, tmp_path_factory):
    """One database per module with the demo's data, plus a config and a BLOCKED state that
    hold secrets (the demo takes a few seconds: the tests share it and only add to it)."""
    name = f"t_ui_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_admin_url, name, template=template_db)
    tmp = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k not in ("WSCTL_DATABASE_URL", "DATABASE_URL")}
    env["XDG_CONFIG_HOME"] = str(tmp / "xdg")

    def wsctl(*args: str) -> None:
        r = subprocess.run(
            wsctl_argv(url, *args),
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr

    wsctl("demo", "--json")
    wsctl(
        "config",
        "set",
        "--client",
        "Demo Client",
        "--step",
        "normalize_company_name",
        "--workstream",
        "linkedin_scrape",
        "--set",
        f"api_key={SECRETS[0]}",
        "--set",
        f"table_url=https://api.clay.com/hooks/{SECRETS[1]}",
    )
    with psycopg.connect(url, autocommit=True) as c:
        sid = c.execute(
            "SELECT ws.id FROM workflow_states ws JOIN batches b ON b.id = ws.batch_id"
            " WHERE b.workstream_slug = 'apollo_scrape' AND ws.step_name = %s LIMIT 1",
            ("enrich_person_via_waterfall_in_clay",),
        ).fetchone()[0]
        c.execute(
            "UPDATE workflow_states SET status = 'BLOCKED', reason_code = 'missing_config_key',"
            " error_class = 'operator', last_error = %s WHERE id = %s",
            (
                f"POST https://user:{SECRETS[2]}@api.example.com/x?token={SECRETS[3]} failed; "
                f"Authorization: Bearer {SECRETS[4]}",
                sid,
            ),
        )
        # a limit per workstream bound to every registry row of apollo_scrape, one nothing binds
        c.execute(
            "INSERT INTO wsctl.registry_limit_keys (registry_id, key_template)"
            " SELECT id, 'demo:{workstream}' FROM enrichment_registry"
            " WHERE workstream_slug = 'apollo_scrape'"
        )
        # Clay webhooks of a client without batches: two sources, one nearly used up
        c.execute("INSERT INTO clients (name) VALUES (%s)", (HOOK_CLIENT,))
    wsctl("limit", "set", "demo:apollo_scrape", "--rate", "5/s", "--burst", "10")
    wsctl("limit", "set", "demo:apollo_scrape", "--max-in-flight", "50")
    wsctl("limit", "set", "idle-key", "--max-in-flight", "7")
    hooks = [
        f"https://api.clay.com/hooks/{SECRETS[1]}/a",
        f"https://api.clay.com/hooks/{SECRETS[1]}/b",
    ]
    wsctl(
        "config",
        "set",
        "--client",
        HOOK_CLIENT,
        "--step",
        CLAY_STEP,
        "--workstream",
        "apollo_scrape",
        "--set",
        f"clay_table_webhook_urls={json.dumps(hooks)}",
        "--set",
        "clay_webhook_submission_cap=1000",
    )
    with psycopg.connect(url, autocommit=True) as c:
        from wsctl import clay

        clay.record_prior(c, hooks[0], 1000)
        clay.record_prior(c, hooks[1], 990)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture(scope="module")
def dconn(demo):
    with psycopg.connect(demo, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def ui(demo, tmp_path_factory):
    server = Ui(demo, "--host", "0.0.0.0", "--token", TOKEN, tmp=tmp_path_factory.mktemp("ui"))
    yield server
    server.stop()


@pytest.fixture
def page(browser, ui):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    resp = pg.goto(f"{ui.base}/?token={TOKEN}")  # once in the URL, then a cookie
    assert resp.status == 200
    assert "token" not in pg.url  # the redirect took it out of the address bar
    yield pg
    ctx.close()


def test_dashboard_shows_the_counts_the_database_holds(page, ui, dconn, tmp_path):
    totals = dict(
        dconn.execute("SELECT status, count(*) FROM workflow_states GROUP BY 1").fetchall()
    )
    assert totals["COMPLETED"] > 0 and totals["BLOCKED"] == 1
    for status in ("PENDING", "DISPATCHING", "DISPATCHED", "COMPLETED", "FAILED", "BLOCKED"):
        shown = page.locator(f"[data-total-status={status}] .n").inner_text()
        assert int(shown) == totals.get(status, 0), status
    per_step = {
        (str(b), s, st): n
        for b, s, st, n in dconn.execute(
            "SELECT batch_id, step_name, status, count(*) FROM workflow_states GROUP BY 1, 2, 3"
        ).fetchall()
    }
    seen = {}
    for row in page.locator(".batch .steprow:not([data-pruned])").all():
        batch, step = row.get_attribute("data-batch"), row.get_attribute("data-step")
        for seg in row.locator("[data-status]").all():
            seen[(batch, step, seg.get_attribute("data-status"))] = int(
                seg.get_attribute("data-count")
            )
    assert seen == per_step
    reasons = page.locator("#reasons tr[data-reason]")
    assert reasons.count() == 1
    assert reasons.first.get_attribute("data-reason") == "missing_config_key"
    assert "wsctl config set --client 'Demo Client'" in reasons.first.inner_text()
    assert "wsctl retry --batch" in reasons.first.inner_text()
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("WSCTL_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "examples" / "dashboard.png")


def test_counts_keep_up_with_the_database(page, ui, dconn):
    before = int(page.locator("[data-total-status=PENDING] .n").inner_text())
    dconn.execute(
        "UPDATE workflow_states SET status = 'PENDING' WHERE id IN"
        " (SELECT id FROM workflow_states WHERE status = 'COMPLETED' LIMIT 2)"
    )
    page.reload()
    assert int(page.locator("[data-total-status=PENDING] .n").inner_text()) == before + 2


def test_the_dashboard_reloads_itself_by_default(demo, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        wsctl_argv(demo, "ui", "--port", str(port)),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "ui: serving" in proc.stderr.readline()
        _, _, body = http("GET", f"http://127.0.0.1:{port}/")
        assert '<meta http-equiv="refresh" content="5">' in body
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_item_page_names_the_config_row_the_function_used(page, ui, dconn):
    rows = dconn.execute(
        "SELECT ws.item_id, ws.step_name, ws.used_resolution ->> 'config_id', er.modal_sender_fn"
        " FROM workflow_states ws"
        " JOIN enrichment_registry er ON er.id = (ws.used_resolution ->> 'registry_id')::uuid"
        " WHERE ws.item_id = (SELECT item_id FROM workflow_states"
        "                     WHERE step_name = 'normalize_company_name' ORDER BY item_id DESC LIMIT 1)"
    ).fetchall()
    assert len(rows) == 6  # every step of the blueprint resolved a config and recorded it
    page.goto(f"{ui.base}/item/{rows[0][0]}")
    for _item, step, config_id, function in rows:
        card = page.locator(f".step[data-step={step}]")
        used = card.locator("[data-used-config]")
        assert used.get_attribute("data-used-config") == config_id
        assert config_id in used.inner_text()
        assert function in card.locator(".used").inner_text()
    # the config of linkedin's first step changed after the demo: its items say so
    li_item = dconn.execute(
        "SELECT ws.item_id FROM workflow_states ws JOIN batches b ON b.id = ws.batch_id"
        " WHERE b.workstream_slug = 'linkedin_scrape' AND ws.step_name = 'normalize_company_name'"
        " LIMIT 1"
    ).fetchone()[0]
    page.goto(f"{ui.base}/item/{li_item}")
    assert (
        "changed since"
        in page.locator(".step[data-step=normalize_company_name] .used").inner_text()
    )


def test_search_leads_to_the_item_or_the_batch(page, ui, dconn):
    item_id, batch_id = dconn.execute("SELECT id, batch_id FROM batch_items LIMIT 1").fetchone()
    page.goto(f"{ui.base}/")
    page.fill("input[name=q]", str(item_id))
    page.click("header button")
    page.wait_for_url(f"**/item/{item_id}")
    page.fill("input[name=q]", str(batch_id))
    page.click("header button")
    page.wait_for_url(f"**/batch/{batch_id}")
    assert (
        page.locator("#items tr").count()
        == 1
        + dconn.execute(
            "SELECT count(*) FROM batch_items WHERE batch_id = %s", (batch_id,)
        ).fetchone()[0]
    )
    resp = page.goto(f"{ui.base}/search?q={uuid.uuid4()}")
    assert resp.status == 404
    assert "no item or batch with id" in page.locator("#error-message").inner_text()


def test_anything_but_get_and_head_gets_405(page, ui, dconn):
    before = table_snapshot(dconn)
    resp = page.request.post(f"{ui.base}/", data="x=1")  # the browser's cookie rides along
    assert resp.status == 405
    assert resp.headers["allow"] == "GET, HEAD"
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        for path in ("/", "/metrics", f"/item/{uuid.uuid4()}"):
            status, headers, _ = http(method, ui.base + path, BEARER)
            assert status == 405, (method, path)
    status, headers, body = http("HEAD", ui.base + "/", BEARER)
    assert status == 200 and body == ""
    assert table_snapshot(dconn) == before


def test_no_secret_in_any_page(page, ui, dconn):
    pages = ["/", "/metrics", f"/item/{uuid.uuid4()}", "/item/not-a-uuid", "/nope"]
    pages += [f"/batch/{b}" for (b,) in dconn.execute("SELECT id FROM batches").fetchall()]
    pages += [f"/item/{i}" for (i,) in dconn.execute("SELECT id FROM batch_items").fetchall()]
    assert len(pages) > 10
    texts = {}
    for path in pages:
        page.goto(ui.base + path)
        texts[path] = page.content()
    blocked_item = dconn.execute(
        "SELECT item_id FROM workflow_states WHERE status = 'BLOCKED'"
    ).fetchone()[0]
    blocked_page = texts[f"/item/{blocked_item}"]
    assert "Bearer ***" in blocked_page and "api.example.com" in blocked_page  # shown, redacted
    for path, text in texts.items():
        for secret in [*SECRETS, TOKEN]:
            assert secret not in text, (path, secret)
    # the secrets are in the database all right
    assert SECRETS[0] in json.dumps(
        dconn.execute("SELECT json_agg(config) FROM client_workflow_configs").fetchone()[0]
    )


def test_a_0000_bind_refuses_requests_without_the_token(browser, ui):
    for path in ("/", "/metrics", f"/item/{uuid.uuid4()}", "/search?q=x"):
        status, headers, body = http("GET", ui.base + path)
        assert status == 401, path
        assert "Bearer" in headers.get("www-authenticate", "")
        assert "Traceback" not in body
    assert http("GET", ui.base + "/", {"Authorization": "Bearer wrong-token-123456"})[0] == 401
    assert http("GET", ui.base + "/?token=wrong-token-123456")[0] == 401
    assert http("GET", ui.base + "/metrics", BEARER)[0] == 200
    ctx = browser.new_context()  # a browser without the cookie
    try:
        pg = ctx.new_page()
        assert pg.goto(ui.base + "/").status == 401
        assert pg.goto(f"{ui.base}/?token={TOKEN}").status == 200
        assert pg.goto(ui.base + "/metrics").status == 200  # the cookie now
    finally:
        ctx.close()


def test_a_generated_token_is_printed_and_required(demo, tmp_path):
    server = Ui(demo, "--host", "0.0.0.0", tmp=tmp_path)
    try:
        err = server.stderr()
        assert "not a loopback address" in err
        token = err.split("?token=")[1].split()[0]
        assert len(token) >= 24
        assert http("GET", server.base + "/")[0] == 401
        assert http("GET", server.base + "/", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        server.stop()


def test_loopback_by_default_without_a_token(demo, tmp_path):
    server = Ui(demo, tmp=tmp_path)
    try:
        assert "serving http://127.0.0.1:" in server.stderr()
        assert "token" not in server.stderr()
        assert http("GET", server.base + "/")[0] == 200
    finally:
        server.stop()


def test_metrics_serves_the_stats_prometheus_text(ui, run_cli, demo):
    status, headers, body = http("GET", ui.base + "/metrics", BEARER)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    cli = run_cli("stats", "--prometheus", url=demo)
    assert cli.code == 0, cli.err

    def stable(text: str) -> dict:
        return {
            fam.name: sorted((tuple(sorted(s.labels.items())), s.value) for s in fam.samples)
            for fam in text_string_to_metric_families(text)
            if fam.name not in VOLATILE
        }

    assert stable(body) == stable(cli.out)
    assert set(ln.split(" ")[2] for ln in body.splitlines() if ln.startswith("# TYPE")) == set(
        ln.split(" ")[2] for ln in cli.out.splitlines() if ln.startswith("# TYPE")
    )


def test_error_pages_carry_one_line_and_no_traceback(pg_admin_url, template_db, tmp_path, run_cli):
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = create_database(pg_admin_url, name, template=template_db)
    server = Ui(url, tmp=tmp_path)
    try:
        status, _, body = http("GET", f"{server.base}/item/{uuid.uuid4()}")
        assert status == 404 and "no batch item with id" in body
        status, _, body = http("GET", f"{server.base}/batch/not-a-uuid")
        assert status == 400 and "expected a UUID" in body
        assert http("GET", f"{server.base}/no/such/page")[0] == 404
        drop_database(pg_admin_url, name)  # the database goes away under the server
        status, _, body = http("GET", server.base + "/")
        assert status == 503
        for text in (body, server.stderr()):
            assert "Traceback" not in text and 'File "' not in text
        assert "database error" in body or "cannot connect" in body
        assert server.proc.poll() is None  # still serving
    finally:
        server.stop()
        drop_database(pg_admin_url, name)


def test_a_taken_port_is_one_line_and_exit_3(demo, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            wsctl_argv(demo, "ui", "--port", str(port)),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().splitlines() == [
        ln for ln in r.stderr.strip().splitlines() if ln.startswith("wsctl: error: cannot listen")
    ]


def test_a_short_token_is_a_usage_error(run_cli, db_url):
    r = run_cli("ui", "--token", "short", url=db_url)
    assert r.code == 2 and "at least 16" in r.err


def test_wsctl_help_does_not_import_the_web_stack(tmp_path):
    code = (
        "import sys; from wsctl.cli import main; rc = main(['--help']);"
        "print(sorted(m for m in ('starlette', 'uvicorn', 'jinja2') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert "ui" in r.stdout and "stats" in r.stdout


# --- every query in a READ ONLY transaction (the app in-process, a real connection) -------


class WatchedCursor(psycopg.Cursor):
    """Before each statement: in a transaction? READ ONLY? (asked of the server itself)."""

    seen: list[tuple[str, str]] = []

    def execute(self, query, params=None, **kwargs):
        text = query if isinstance(query, str) else query.as_string(self.connection)
        status = self.connection.info.transaction_status
        if text.strip().upper().startswith("SET TRANSACTION READ ONLY"):
            WatchedCursor.seen.append(("SET TRANSACTION READ ONLY", "first"))
        elif status == psycopg.pq.TransactionStatus.INTRANS:
            ro = psycopg.Cursor(self.connection).execute("SHOW transaction_read_only").fetchone()
            WatchedCursor.seen.append((" ".join(text.split())[:60], ro[0]))
        else:
            WatchedCursor.seen.append((" ".join(text.split())[:60], "outside a transaction"))
        return super().execute(query, params, **kwargs)


def asgi_get(app, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    async def run():
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        p, _, qs = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": p,
            "raw_path": p.encode(),
            "query_string": qs.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], body

    # a thread of its own: Playwright's sync API keeps an event loop in this one
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(run())).result()


def test_every_query_runs_in_a_read_only_transaction(demo, dconn):
    from wsctl.ui.server import UiConfig, create_app

    app = create_app(
        UiConfig(
            connect=lambda: psycopg.connect(demo, autocommit=True, cursor_factory=WatchedCursor)
        )
    )
    item_id, batch_id = dconn.execute("SELECT id, batch_id FROM batch_items LIMIT 1").fetchone()
    WatchedCursor.seen = []
    for path in ("/", f"/batch/{batch_id}", f"/item/{item_id}", f"/search?q={item_id}", "/metrics"):
        status, _ = asgi_get(app, path)
        assert status in (200, 303), path
    seen = WatchedCursor.seen
    assert len(seen) > 15
    assert sum(1 for _, v in seen if v == "first") >= 5
    assert [s for s in seen if s[1] not in ("on", "first")] == []


def test_an_unmigrated_database_is_refused_before_listening(legacy_url, tmp_path):
    port = free_port()
    r = subprocess.run(
        wsctl_argv(legacy_url, "ui", "--port", str(port)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "migrate" in r.stderr
    with socket.socket() as s:  # nothing listens there
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_open_hands_the_url_to_the_browser(demo, tmp_path):
    opened = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    script.chmod(0o755)
    port = free_port()
    env = {**os.environ, "BROWSER": str(script)}
    proc = subprocess.Popen(
        wsctl_argv(demo, "ui", "--port", str(port), "--open"),
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (opened.exists() and opened.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert opened.read_text().strip() == f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- limits, Clay webhook capacity, pruned batches, the fix table -----------------------------


def test_dashboard_shows_each_limits_usage(page, ui, dconn):
    # what is in flight under demo:apollo_scrape, counted here independently of stats_limits
    want = dconn.execute(
        "SELECT count(*) FROM workflow_states ws JOIN batches b ON b.id = ws.batch_id"
        " JOIN enrichment_registry er ON er.slug = ws.step_name"
        "  AND er.workstream_slug = b.workstream_slug"
        " WHERE b.workstream_slug = 'apollo_scrape' AND (ws.status = 'DISPATCHED'"
        "  OR (ws.status = 'DISPATCHING' AND ws.lease_expires_at > now()))"
    ).fetchone()[0]
    sid = dconn.execute(  # one more in flight: a live claim
        "SELECT ws.id FROM workflow_states ws JOIN batches b ON b.id = ws.batch_id"
        " WHERE b.workstream_slug = 'apollo_scrape' AND ws.status = 'COMPLETED' LIMIT 1"
    ).fetchone()[0]
    dconn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHING',"
        " lease_expires_at = now() + interval '10 minutes' WHERE id = %s",
        (sid,),
    )
    try:
        page.reload()
        row = page.locator("#limits tr[data-limit='demo:apollo_scrape']")
        assert row.get_attribute("data-in-flight") == str(want + 1)
        assert row.get_attribute("data-max-in-flight") == "50"
        assert row.get_attribute("data-burst") == "10"
        assert 0 <= float(row.get_attribute("data-tokens")) <= 10
        assert "5/s" in row.inner_text()
        idle = page.locator("#limits tr[data-limit='idle-key']")
        assert idle.get_attribute("data-in-flight") == "0"
        assert idle.get_attribute("data-tokens") == "" and "no rate" in idle.inner_text()
        # and the demo's own: its Clay workspace at Clay's pace
        demo_row = page.locator("#limits tr[data-limit='clay:demo-workspace']")
        assert demo_row.get_attribute("data-burst") == "20" and "10/s" in demo_row.inner_text()
        assert page.locator("#limits tr[data-limit]").count() == 3
    finally:
        dconn.execute("UPDATE workflow_states SET status = 'COMPLETED' WHERE id = %s", (sid,))


def test_dashboard_shows_clay_webhook_capacity_left(page, ui, dconn, demo, run_cli):
    page.reload()
    card = page.locator(f"[data-webhook-capacity='apollo_scrape/{CLAY_STEP}']")
    doc = run_cli("stats", "--json", url=demo).json()["clay_webhooks"]
    want = next(
        c for c in doc["by_step"] if (c["workstream"], c["step"]) == ("apollo_scrape", CLAY_STEP)
    )
    hook = [w for w in doc["webhooks"] if w["client"] == HOOK_CLIENT]
    assert [(w["index"], w["left"]) for w in hook] == [(0, 0), (1, 10)]
    assert card.get_attribute("data-left") == str(want["left"])
    assert card.get_attribute("data-min-left") == "10" == str(want["min_config_left"])
    assert card.get_attribute("data-exhausted") == "0"
    assert "warn" in (card.get_attribute("class") or "")  # 10 left: under 20 % of a cap
    assert page.locator("[data-webhook-capacity]").count() == len(doc["by_step"])
    assert SECRETS[1] not in page.content()


def _pruned_batch(dconn, demo: str, run_cli) -> tuple[str, str]:
    """A batch of the demo's client, finished 40 days ago, pruned by the real `wsctl prune`."""
    from tests.support import factories as f

    client = dconn.execute("SELECT id FROM clients WHERE name = 'Demo Client'").fetchone()[0]
    steps = ["normalize_company_name", CLAY_STEP]
    b = f.add_batch(dconn, client, steps, 3, "apollo_scrape", first_status="COMPLETED")
    dconn.execute(
        "INSERT INTO workflow_states (item_id, batch_id, step_name, status)"
        " SELECT item_id, batch_id, %s, 'COMPLETED' FROM workflow_states WHERE batch_id = %s",
        (steps[1], b),
    )
    dconn.execute(
        "UPDATE workflow_states SET status = 'FAILED', reason_code = 'payload_refused',"
        " error_class = 'permanent' WHERE id = (SELECT id FROM workflow_states"
        " WHERE batch_id = %s AND step_name = %s LIMIT 1)",
        (b, steps[1]),
    )
    dconn.execute(
        "UPDATE workflow_states SET updated_at = now() - interval '40 days' WHERE batch_id = %s",
        (b,),
    )
    dconn.execute(
        "UPDATE batches SET created_at = now() - interval '41 days', status = 'COMPLETED'"
        " WHERE id = %s",
        (b,),
    )
    item = dconn.execute("SELECT id FROM batch_items WHERE batch_id = %s LIMIT 1", (b,)).fetchone()
    r = run_cli("prune", "--older-than", "30d", "--batch", str(b), "--json", url=demo)
    assert r.code == 0, r.err
    gone = dconn.execute("SELECT count(*) FROM workflow_states WHERE batch_id = %s", (b,))
    assert gone.fetchone()[0] == 0
    return str(b), str(item[0])


def test_a_pruned_batch_shows_its_summary_and_its_items_say_pruned(page, ui, dconn, demo, run_cli):
    batch_id, item_id = _pruned_batch(dconn, demo, run_cli)
    summary = dconn.execute(
        "SELECT counts, states_pruned FROM wsctl.pruned_batches WHERE batch_id = %s", (batch_id,)
    ).fetchone()
    assert summary[1] == 6
    page.goto(f"{ui.base}/batch/{batch_id}")
    assert "were pruned" in page.locator("#pruned").inner_text()
    assert page.locator("#pruned").get_attribute("data-states-pruned") == "6"
    seen = {}
    for row in page.locator(".batch .steprow").all():
        for seg in row.locator("[data-status]").all():
            seen.setdefault(row.get_attribute("data-step"), {})[
                seg.get_attribute("data-status")
            ] = int(seg.get_attribute("data-count"))
    assert (
        seen
        == summary[0]
        == {
            "normalize_company_name": {"COMPLETED": 3},
            CLAY_STEP: {"COMPLETED": 2, "FAILED": 1},
        }
    )
    assert "3" in page.locator("dl").inner_text()  # the items: the summary's, not 0
    # `batch status` says the same
    st = run_cli("batch", "status", batch_id, "--json", url=demo).json()
    assert {s["step"]: s["counts"] for s in st["steps"]} == seen
    # the dashboard's bar of the batch: the summary's counts, marked pruned
    page.goto(f"{ui.base}/?refresh=0")
    head = page.locator(f".batch[data-batch-id='{batch_id}'] .head")
    assert head.count() == 1 and "pruned" in head.inner_text()  # (the demo has < 50 batches)
    # the item page: every step PRUNED, as `item show` says, with the summary's line
    page.goto(f"{ui.base}/item/{item_id}")
    for step in ("normalize_company_name", CLAY_STEP):
        status = page.locator(f".step[data-step={step}] h2 .status")
        assert status.inner_text() == "PRUNED"
    assert "were pruned" in page.locator(".warning").first.inner_text()
    shown = run_cli("item", "show", item_id, "--json", url=demo).json()
    assert [s["status"] for s in shown["steps"]] == ["PRUNED", "PRUNED"]


def test_every_operator_and_permanent_reason_code_has_a_fix():
    from wsctl import clay
    from wsctl.states import REASONS
    from wsctl.ui.fixes import FIXES, ReasonGroup, fix_commands

    needs = {c for c, r in REASONS.items() if r.error_class in ("operator", "permanent")}
    clay_codes = {
        cls.reason_code
        for cls in (clay.WebhookCapacityExhausted, clay.RecordTooLarge, clay.BadWebhookURL)
    }
    assert needs and needs | clay_codes <= set(FIXES)
    assert set(FIXES) <= set(REASONS) | clay_codes  # no guessed code

    def group(reason, status, workstream="w", client="c", sample="I") -> ReasonGroup:
        return ReasonGroup("B", workstream, client, "s", status, reason, sample_item_id=sample)

    for code in needs | clay_codes:
        cmds = fix_commands(group(code, "BLOCKED", client="O'Brien & Co"))
        assert len(cmds) >= 2 and cmds[-1] == "wsctl retry --batch B --step s --status BLOCKED"
        for c in cmds[:-1]:
            assert c.split()[0] in ("wsctl", "modal") and "{" not in c, (code, c)
            if "--client" in c:
                assert "'O'\"'\"'Brien & Co'" in c  # shell-quoted
    # a transient code (FAILED at max attempts), an unknown one and none: the item's page
    for code in ("rate_limited", "made_up", None):
        cmds = fix_commands(group(code, "FAILED"))
        assert cmds == ["wsctl item show I", "wsctl retry --batch B --step s --status FAILED"]
    legacy = fix_commands(group("missing_secret", "BLOCKED", workstream=None, sample=None))
    assert legacy[0] == "wsctl backfill workstream-slug"
