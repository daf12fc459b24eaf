"""``wsctl demo``: the whole pipeline on one machine, in well under a minute.

One client, two workstreams (``apollo_scrape`` and ``linkedin_scrape``) that
register the same workflow slugs with different functions, and client
configs that differ per workstream (field layouts, Clay table webhook URLs):
the situation the workstream slug exists for. A batch in each workstream,
dispatch passes with the local backend over the example app shipped in the
package (``examples/enrichment_app.py``), Clay answered by a stand-in on
127.0.0.1 that calls the example's receiver back (served on 127.0.0.1 too),
and a closing report: per item and step, which workstream's config was used.

Safe to run again: the catalog rows are upserts, unfinished batches of an
earlier run are cancelled, each run makes new batches and reports only those.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from wsctl.errors import OperationalError
from wsctl.jsondoc import JsonDoc
from wsctl.queries import column, example_path, named, one, q, scalar

if TYPE_CHECKING:
    import psycopg

DEMO_DBNAME = "wsctl_demo"
DEMO_CLIENT = "Demo Client"
APOLLO, LINKEDIN = "apollo_scrape", "linkedin_scrape"
WORKSTREAMS = (APOLLO, LINKEDIN)

STEP_NAME = "normalize_company_name"
STEP_DOMAIN = "normalize_company_domain"
STEP_CORE = "normalize_all_core_values"
STEP_SPLIT = "split_raw_apollo_scrape_data_into_two_tables"
STEP_CLAY_COMPANY = "enrich_company_via_waterfall_in_clay"
STEP_CLAY_PERSON = "enrich_person_via_waterfall_in_clay"
BLUEPRINT = [STEP_NAME, STEP_DOMAIN, STEP_CORE, STEP_SPLIT, STEP_CLAY_COMPANY, STEP_CLAY_PERSON]


def _example_registry() -> dict[tuple[str, str], tuple[str, str, str | None]]:
    """(step, workstream) -> (type, sender, receiver), from examples/registry.toml."""
    from wsctl.catalog import parse_registry_toml

    path = example_path("registry.toml")
    rows = parse_registry_toml(path.read_text(encoding="utf-8"), str(path))
    return {(r.step, r.workstream): (r.type, r.sender, r.receiver) for r in rows}


REGISTRY = _example_registry()

# Where the LinkedIn scrape layout keeps each core value (the Apollo layout is the default).
LINKEDIN_FIELDS = {
    "company_name": "company",
    "website": "company_website",
    "full_name": "full_name",
    "title": "headline",
    "person_linkedin_url": "profile_url",
    "company_linkedin_url": "company_page",
    "employees": "company_size",
    "country": "location_country",
    "email": "contact_email",
}


def _secret_name(kind: str, ws: str, table: str) -> str:
    return f"CLAY_{kind}_{ws}_{table}".upper()


def demo_secrets(clay_url: str) -> dict[str, str]:
    """What the Modal secrets of the Clay senders hold: each table's webhook URL and token."""
    values: dict[str, str] = {}
    for ws in WORKSTREAMS:
        for table in ("companies", "people"):
            values[_secret_name("WEBHOOK_URL", ws, table)] = f"{clay_url}/{ws}/{table}"
            values[_secret_name("WEBHOOK_AUTH", ws, table)] = f"demo-{ws}-{table}-token"
    return values


DEMO_CLAY_WORKSPACE = "demo-workspace"


def demo_configs(clay_url: str, receiver_url: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The client's config per (step, workstream): same slugs, different settings.

    The Clay webhook URL and token are secret references (``demo_secrets``
    holds their values, as a Modal secret would): no config row holds them.
    """
    configs: dict[tuple[str, str], dict[str, Any]] = {}
    for ws in WORKSTREAMS:
        fields = {"fields": LINKEDIN_FIELDS} if ws == LINKEDIN else {}
        configs[(STEP_NAME, ws)] = {"case": "smart" if ws == APOLLO else "upper", **fields}
        configs[(STEP_DOMAIN, ws)] = {"domain_from_email": ws == LINKEDIN, **fields}
        configs[(STEP_CORE, ws)] = {"domain_from_email": ws == LINKEDIN, **fields}
        configs[(STEP_SPLIT, ws)] = {"source": f"{ws} export", **fields}
        for step, table in ((STEP_CLAY_COMPANY, "companies"), (STEP_CLAY_PERSON, "people")):
            receiver = REGISTRY[(step, ws)][2]
            configs[(step, ws)] = {
                "clay_table_webhook_url": {"$secret": _secret_name("WEBHOOK_URL", ws, table)},
                "clay_webhook_auth_token": {"$secret": _secret_name("WEBHOOK_AUTH", ws, table)},
                "callback_url": f"{receiver_url}/{receiver}",
                # the limit key examples/registry.toml binds: clay:{config.clay_workspace}
                "clay_workspace": DEMO_CLAY_WORKSPACE,
                **fields,
            }
    return configs


def demo_items() -> dict[str, list[dict]]:
    """The example items per workstream (examples/demo_items.json)."""
    doc = json.loads(example_path("demo_items.json").read_text(encoding="utf-8"))
    return {ws: doc[ws] for ws in WORKSTREAMS}


# --- result ----------------------------------------------------------------


@dataclass
class DemoRow(JsonDoc):
    item_id: str
    workstream: str  # the batch's
    step: str
    status: str | None
    function: str | None  # the registry's function for (step, batch workstream)
    ran_function: str | None  # what the worker recorded
    ran_workstream: str | None
    config_id: str | None
    config_workstream: str | None  # the workstream of the config row actually used
    detail: str | None
    clay: dict | None = None

    @property
    def ok(self) -> bool:
        return (
            self.status == "COMPLETED"
            and self.config_workstream == self.workstream
            and self.ran_workstream == self.workstream
            and self.ran_function == self.function
        )

    json_extra = ("ok",)


@dataclass
class DemoResult(JsonDoc):
    database: str
    client: str
    batches: list[dict] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    rows: list[DemoRow] = field(default_factory=list)
    clay_requests: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    json_extra = ("ok",)


# --- local stand-ins: Clay's table webhooks and the receiver endpoints -------


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) serving in a daemon thread."""

    def __init__(self, handle: Callable[[str, dict, bytes], tuple[int, dict]]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    status, doc = outer.handle(self.path, dict(self.headers), body)
                except Exception as exc:  # report it to the caller, keep serving
                    outer.errors.append(f"{self.path}: {type(exc).__name__}: {exc}")
                    status, doc = 500, {"error": "internal"}
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.handle = handle
        self.errors: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ClayStandIn:
    """Clay's table webhooks: records each row, answers 200 at once, and a moment later
    posts an enriched payload with the row's state id and token to its ``callback_url``
    (as a Clay table's HTTP API column would)."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.requests: list[dict] = []
        self.callback_errors: list[str] = []
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self.server = _Server(self._handle)
        self.url = self.server.url

    def _handle(self, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        row = json.loads(body)
        with self._lock:
            self.requests.append(
                {
                    "path": path,
                    "item_id": row.get("item_id"),
                    "step": row.get("workflow"),  # the Clay row's key, as it was posted
                    "workstream": row.get("workstream"),
                    "auth": {k.lower(): v for k, v in headers.items()}.get("x-clay-webhook-auth"),
                }
            )
            timer = threading.Timer(self.delay, self._call_back, (path, row))
            timer.daemon = True
            self._timers.append(timer)
        timer.start()
        return 200, {"status": "queued", "table": path}

    def _call_back(self, path: str, row: dict) -> None:
        record = row.get("record") or {}
        if row.get("workflow") == STEP_CLAY_COMPANY:
            enriched = {
                "company_name": record.get("company_name"),
                "domain": record.get("company_domain"),
                "employees": record.get("employees") or 120,
                "industry": record.get("industry") or "computer software",
            }
        else:
            enriched = {
                "full_name": record.get("full_name"),
                "work_email": record.get("email"),
                "email_verified": bool(record.get("email")),
                "linkedin_url": record.get("person_linkedin_url"),
            }
        doc = {
            "state_id": row.get("state_id"),
            "callback_token": row.get("callback_token"),
            "enriched": {**enriched, "clay_table": path},
        }
        try:
            request = urllib.request.Request(
                row["callback_url"],
                data=json.dumps(doc).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                response.read()
        except Exception as exc:
            self.callback_errors.append(f"callback for {row.get('item_id')}: {exc}")

    def close(self) -> None:
        with self._lock:
            timers = list(self._timers)
        for t in timers:
            t.join(timeout=5)
        self.server.close()


class ReceiverServer:
    """The example's receiver endpoints, served locally: ``POST /<receiver function>``
    runs the receiver's plain logic (``handle_clay_callback``) and answers its status."""

    def __init__(self, logic, receivers: dict[str, str]):
        self.logic = logic
        self.receivers = receivers  # receiver function name -> its step
        self.server = _Server(self._handle)
        self.url = self.server.url

    def _handle(self, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        step = self.receivers.get(path.strip("/"))
        if step is None:
            return 404, {"error": "no such endpoint"}
        result = self.logic.handle_clay_callback(body, expected_steps=(step,))
        return result.status, result.body

    def close(self) -> None:
        self.server.close()


@contextmanager
def _worker_env(callback_secret: str, clay_secrets: dict[str, str]) -> Iterator[None]:
    """The secrets Modal provides in production, for the in-process worker functions: they
    read them from their environment (``wsctl.secret_refs``), so the environment it is."""
    values = {"CLAY_CALLBACK_SECRET": callback_secret, **clay_secrets}
    saved = {n: os.environ.get(n) for n in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


# --- the run -----------------------------------------------------------------


def check_target(conn: psycopg.Connection) -> None:
    """Refuse a database that holds other clients' data (the demo writes registry rows)."""
    if not scalar(conn.execute(q("demo_clients_table"))):
        return
    others = column(named(conn).execute(q("demo_other_clients"), (DEMO_CLIENT,)), "name")
    if others:
        raise OperationalError(
            f"refusing to run the demo in a database with other clients ({', '.join(others)}): "
            "it writes registry rows for apollo_scrape and linkedin_scrape",
            hint="drop --database-url to use the embedded demo database, or give an empty one",
        )


def apply_example_schema(conn: psycopg.Connection) -> None:
    """The example worker's own tables (schema enrichment_example); idempotent."""
    from wsctl.db import tx

    with tx(conn):
        conn.execute(example_path("enrichment_schema.sql").read_text(encoding="utf-8"))


def setup_catalog(conn: psycopg.Connection, configs: dict[tuple[str, str], dict]) -> None:
    """The demo client, examples/registry.toml, the client's configs (all upserts), and
    the limit of its Clay workspace at Clay's pace: 10 records/s, bursts of 20."""
    from wsctl import catalog, limits

    catalog.add_client(conn, DEMO_CLIENT)
    catalog.import_registry(conn, example_path("registry.toml"))
    for (step, ws), config in configs.items():
        catalog.set_config(conn, client=DEMO_CLIENT, step=step, workstream=ws, config=config)
    limits.set_limit(conn, f"clay:{DEMO_CLAY_WORKSPACE}", rate="10/s", burst=20)


def cancel_earlier_runs(conn: psycopg.Connection) -> int:
    """Cancel the demo client's batches that still have states to finish (an interrupted run)."""
    from wsctl import batches

    ids = column(named(conn).execute(q("demo_unfinished_batches"), (DEMO_CLIENT,)), "id")
    for batch_id in ids:
        batches.cancel_batch(conn, batch_id)
    return len(ids)


def create_batches(conn: psycopg.Connection, items: dict[str, list[dict]]) -> list[dict]:
    """One batch per workstream from the example items (through ``wsctl.batches``)."""
    import io

    from wsctl import batches

    out = []
    for ws in WORKSTREAMS:
        jsonl = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items[ws])
        res = batches.create_batch(
            conn,
            client=DEMO_CLIENT,
            workstream=ws,
            blueprint=BLUEPRINT,
            items="-",
            fmt="jsonl",
            stdin=io.StringIO(jsonl),
        )
        out.append({"workstream": ws, "batch_id": str(res.batch_id), "items": res.items})
    return out


def _progress(conn: psycopg.Connection, batch_ids: list[uuid.UUID]) -> dict[str, int]:
    return {r["status"]: r["n"] for r in named(conn).execute(q("demo_progress"), (batch_ids,))}


def _all_done(conn: psycopg.Connection, batch_ids: list[uuid.UUID]) -> bool:
    """Every item has completed every step (counted on the states, not on batches.status)."""
    steps = one(named(conn).execute(q("demo_steps_done"), (batch_ids, batch_ids)))
    return steps["total"] > 0 and steps["done"] == steps["total"]


IN_FLIGHT = ("DISPATCHING", "DISPATCHED")


def _wait_for_callbacks(
    conn: psycopg.Connection, batch_ids: list[uuid.UUID], deadline: float
) -> dict[str, int]:
    """Wait until no state of the batches is in flight (every Clay callback has landed and
    completed its state) or the deadline passes; returns the states per status then."""
    while True:
        counts = _progress(conn, batch_ids)
        if not any(counts.get(s) for s in IN_FLIGHT) or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def _problems(conn: psycopg.Connection, batch_ids: list[uuid.UUID]) -> str | None:
    rows = named(conn).execute(q("demo_problems"), (batch_ids,)).fetchall()
    if not rows:
        return None
    return "; ".join(f"{r['step_name']} {r['status']}: {r['last_error']}" for r in rows)


def report(conn: psycopg.Connection, batch_ids: list[uuid.UUID]) -> list[DemoRow]:
    """Per item and blueprint step: status, function, and the config row the worker used."""
    rows = named(conn).execute(q("demo_report"), (batch_ids, batch_ids)).fetchall()
    out = []
    for r in rows:
        trace = r["trace"] or {}
        out.append(
            DemoRow(
                item_id=str(r["item_id"]),
                workstream=r["workstream"],
                step=r["step"],
                status=r["status"],
                function=r["function"],
                ran_function=trace.get("function"),
                ran_workstream=trace.get("workstream"),
                config_id=str(r["config_id"]) if r["config_id"] else None,
                config_workstream=r["config_workstream"],
                detail=trace.get("detail"),
                clay=r["clay"],
            )
        )
    return out


def run_demo(
    conn: psycopg.Connection,
    *,
    database_url: str,
    database_label: str,
    timeout: float = 50.0,
    on_progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Set up, create a batch per workstream, dispatch until done, and report.

    ``conn`` (autocommit) and ``database_url`` name the same database: the
    worker functions connect to it through the worker helpers
    (``settings.in_process_workers``), as they would on Modal through
    ``WSCTL_DATABASE_URL``.
    Raises ``OperationalError`` when the batches do not finish within
    ``timeout`` seconds or a state FAILs or is BLOCKED.
    """
    from wsctl import migrations
    from wsctl.dispatch import PassOptions, run_pass
    from wsctl.dispatch.local import LocalBackend
    from wsctl.settings import Settings, in_process_workers

    say = on_progress or (lambda _msg: None)
    started = time.monotonic()
    check_target(conn)
    applied = migrations.migrate(conn).applied
    say(f"schema: {len(applied)} migration(s) applied" if applied else "schema: up to date")
    apply_example_schema(conn)

    app_path = str(example_path("enrichment_app.py"))
    backend = LocalBackend(app_path)
    backend.setup()  # imports the app (and its enrichment_logic) before anything is written
    assert backend.module is not None  # setup() imported it
    logic = backend.module.logic
    receivers = {receiver: step for (step, _ws), (_t, _s, receiver) in REGISTRY.items() if receiver}
    clay = ClayStandIn()
    receiver = ReceiverServer(logic, receivers)
    try:
        setup_catalog(conn, demo_configs(clay.url, receiver.url))
        say(
            f"client {DEMO_CLIENT!r}: {len(REGISTRY)} registry rows and client configs in "
            f"workstreams {', '.join(WORKSTREAMS)} (same workflow slugs, different configs)"
        )
        cancelled = cancel_earlier_runs(conn)
        if cancelled:
            say(f"cancelled {cancelled} unfinished batch(es) of an earlier demo run")
        result = DemoResult(database=database_label, client=DEMO_CLIENT)
        result.batches = create_batches(conn, demo_items())
        for b in result.batches:
            say(f"batch {b['batch_id']} in {b['workstream']}: {b['items']} items")
        batch_ids = [uuid.UUID(b["batch_id"]) for b in result.batches]

        opts = PassOptions(concurrency=8, max_attempts=2, callback_timeout=120)
        deadline = started + timeout
        # The functions run here: they connect to the demo's database through the worker
        # helpers (given explicitly, not through WSCTL_DATABASE_URL).
        workers = in_process_workers(Settings(database_url=database_url, url_source="demo"))
        with workers, _worker_env(secrets.token_hex(32), demo_secrets(clay.url)):
            while True:
                summary = run_pass(conn, backend, opts)
                result.passes += 1
                # Wait for the pass's outstanding Clay callbacks before saying where the
                # batches stand: the summary then counts what the callbacks completed.
                counts = _wait_for_callbacks(conn, batch_ids, deadline)
                if summary.claimed:
                    say(
                        f"pass {result.passes}: dispatched {summary.dispatched}, completed "
                        f"{summary.completed}; states now "
                        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                    )
                else:
                    time.sleep(0.2)  # only states waiting for a retry: don't spin
                problem = _problems(conn, batch_ids)
                if problem:
                    raise OperationalError(f"the demo stopped: {problem}")
                if _all_done(conn, batch_ids):
                    break
                if time.monotonic() > deadline:
                    errors = clay.callback_errors + clay.server.errors + receiver.server.errors
                    raise OperationalError(
                        f"the demo did not finish within {timeout:g} s (states: "
                        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                        + ")"
                        + (f"; {errors[0]}" if errors else "")
                    )
        result.rows = report(conn, batch_ids)
        result.clay_requests = list(clay.requests)
    finally:
        clay.close()
        receiver.close()
        backend.close()
    result.seconds = round(time.monotonic() - started, 2)
    return result
