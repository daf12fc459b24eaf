"""The example enrichment worker: a Modal app with the seed's six functions.

Deploy (after creating the two secrets, see "The example worker on Modal" in wsctl/cli/REFERENCE.md)::

    modal deploy examples/enrichment_app.py

Every function takes ``(item_id, workstream_slug=None)``: the dispatcher
passes the batch's workstream; when it is missing the function looks it up
from the item's batch (``wsctl.worker.get_workstream_slug``) and then reads
the client's config by the composite key (workflow slug, workstream slug)
through ``wsctl.worker.get_client_config``, which logs the ``[CONFIG]`` line
and refuses a config it cannot be sure of.

The business logic lives in plain functions in ``enrichment_logic.py``
beside this file; ``wsctl dispatch --backend local --app
examples/enrichment_app.py`` (and ``wsctl demo``) runs these same functions
in-process through ``.local()``, with no Modal account.

Functions for the workstream ``linkedin_scrape`` (another scrape layout,
other Clay tables) are the ``*_linkedin_*`` ones; the normalizers are shared
and read the layout from the client's config.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import modal

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # run from a checkout or the installed package alike
    sys.path.insert(0, str(_HERE))

import enrichment_logic as logic  # noqa: E402

APP_NAME = "enrichment-worker"
log = logging.getLogger("enrichment_worker")


def _image() -> modal.Image:
    from wsctl.queries import sql_dir

    return (
        modal.Image.debian_slim(python_version="3.11")
        .pip_install("psycopg[binary]>=3.2,<4", "platformdirs>=4", "fastapi[standard]")
        # wsctl's worker helpers and its SQL, as installed on the deploying machine.
        .add_local_python_source("wsctl")
        .add_local_dir(sql_dir(), remote_path="/root/sql")
        .add_local_python_source("enrichment_logic")
        .add_local_file(_HERE / logic.QUERIES_FILE, remote_path=f"/root/{logic.QUERIES_FILE}")
    )


image = _image()
app = modal.App(APP_NAME, image=image)
with image.imports():  # in the image; loading the app locally (tests, --backend local) needs none
    from fastapi import Request
# WSCTL_DATABASE_URL (a direct or pooled Supabase URL) for the worker helpers.
db_secret = modal.Secret.from_name("wsctl-database", required_keys=["WSCTL_DATABASE_URL"])
# CLAY_CALLBACK_SECRET: signs the callback token (state id + dispatch generation) receivers check.
callback_secret = modal.Secret.from_name("clay-callback", required_keys=[logic.SECRET_ENV])
# The values client configs reference by name ({"$secret": "CLAY_AUTH_ACME"}): every
# function that reads a config resolves its references from this secret's variables
# (`modal secret create clay-client-secrets CLAY_AUTH_ACME=...`); a name missing here
# ends the state BLOCKED with reason missing_secret.
client_secrets = modal.Secret.from_name("clay-client-secrets")
SECRETS = [db_secret, callback_secret, client_secrets]

if not modal.is_local():  # Modal's logs show INFO lines: [ASYNC SENDER], [CONFIG], [RECEIVER]
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _context(fn: str, kind: str, item_id: str, workstream_slug: str | None, step: str, conn):
    """The seed's preamble: log the call, find the workstream if missing, read the config."""
    from wsctl import worker

    if not workstream_slug:
        workstream_slug = worker.get_workstream_slug(item_id, conn=conn)
    log.info("[%s] %s called for item=%s... workstream=%s", kind, fn, item_id[:8], workstream_slug)
    config = worker.get_client_config(item_id, step, workstream_slug, conn=conn)
    return workstream_slug, config


def _normalize(fn: str, step: str, item_id: str, workstream_slug: str | None) -> dict:
    with logic.connect() as conn:
        ws, config = _context(fn, "SYNC STEP", item_id, workstream_slug, step, conn)
        return logic.run_normalize_step(item_id, ws, step, fn, config, conn=conn)


def _split(fn: str, item_id: str, workstream_slug: str | None) -> dict:
    with logic.connect() as conn:
        ws, config = _context(fn, "SYNC STEP", item_id, workstream_slug, logic.STEP_SPLIT, conn)
        return logic.run_split_step(item_id, ws, fn, config, conn=conn)


def _clay(fn: str, step: str, item_id: str, workstream_slug: str | None) -> str:
    with logic.connect() as conn:
        ws, config = _context(fn, "ASYNC SENDER", item_id, workstream_slug, step, conn)
        return logic.run_clay_sender(item_id, ws, step, fn, config, conn=conn)


# --- sync steps: the function finishes the step (the dispatcher marks it) ---


@app.function(secrets=SECRETS)
def start_normalize_company_name(item_id: str, workstream_slug: str | None = None) -> dict:
    return _normalize("start_normalize_company_name", logic.STEP_NAME, item_id, workstream_slug)


@app.function(secrets=SECRETS)
def start_normalize_company_domain(item_id: str, workstream_slug: str | None = None) -> dict:
    return _normalize("start_normalize_company_domain", logic.STEP_DOMAIN, item_id, workstream_slug)


@app.function(secrets=SECRETS)
def start_normalize_all_core_values(item_id: str, workstream_slug: str | None = None) -> dict:
    return _normalize("start_normalize_all_core_values", logic.STEP_CORE, item_id, workstream_slug)


@app.function(secrets=SECRETS)
def run_split_raw_apollo_scrape_data(item_id: str, workstream_slug: str | None = None) -> dict:
    return _split("run_split_raw_apollo_scrape_data", item_id, workstream_slug)


@app.function(secrets=SECRETS)
def run_split_raw_linkedin_scrape_data(item_id: str, workstream_slug: str | None = None) -> dict:
    return _split("run_split_raw_linkedin_scrape_data", item_id, workstream_slug)


# --- async steps: the sender hands the row to Clay; a receiver finishes it ---


@app.function(secrets=SECRETS)
def start_enrich_company_via_waterfall_in_clay(
    item_id: str, workstream_slug: str | None = None
) -> str:
    return _clay(
        "start_enrich_company_via_waterfall_in_clay",
        logic.STEP_CLAY_COMPANY,
        item_id,
        workstream_slug,
    )


@app.function(secrets=SECRETS)
def start_enrich_person_via_waterfall_in_clay(
    item_id: str, workstream_slug: str | None = None
) -> str:
    return _clay(
        "start_enrich_person_via_waterfall_in_clay",
        logic.STEP_CLAY_PERSON,
        item_id,
        workstream_slug,
    )


@app.function(secrets=SECRETS)
def start_linkedin_enrich_company_via_waterfall_in_clay(
    item_id: str, workstream_slug: str | None = None
) -> str:
    return _clay(
        "start_linkedin_enrich_company_via_waterfall_in_clay",
        logic.STEP_CLAY_COMPANY,
        item_id,
        workstream_slug,
    )


@app.function(secrets=SECRETS)
def start_linkedin_enrich_person_via_waterfall_in_clay(
    item_id: str, workstream_slug: str | None = None
) -> str:
    return _clay(
        "start_linkedin_enrich_person_via_waterfall_in_clay",
        logic.STEP_CLAY_PERSON,
        item_id,
        workstream_slug,
    )


# --- receivers: web endpoints Clay's HTTP API column calls back ------------


def _respond(result: logic.CallbackResponse):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=result.status, content=result.body)


async def _receive(request: Request, step: str):
    """The raw body goes to the receiver logic, which answers every input itself (401 before
    400): FastAPI's own JSON parsing would answer a body it cannot parse before the token is
    checked. The logic's database calls block, so they run in a worker thread."""
    from starlette.concurrency import run_in_threadpool

    body = await request.body()
    result = await run_in_threadpool(logic.handle_clay_callback, body, expected_steps=(step,))
    return _respond(result)


@app.function(secrets=SECRETS)
@modal.fastapi_endpoint(method="POST")
async def receive_enrich_company_via_waterfall_in_clay(request: Request):
    return await _receive(request, logic.STEP_CLAY_COMPANY)


@app.function(secrets=SECRETS)
@modal.fastapi_endpoint(method="POST")
async def receive_enrich_person_via_waterfall_in_clay(request: Request):
    return await _receive(request, logic.STEP_CLAY_PERSON)


@app.function(secrets=SECRETS)
@modal.fastapi_endpoint(method="POST")
async def receive_linkedin_enrich_company_via_waterfall_in_clay(request: Request):
    return await _receive(request, logic.STEP_CLAY_COMPANY)


@app.function(secrets=SECRETS)
@modal.fastapi_endpoint(method="POST")
async def receive_linkedin_enrich_person_via_waterfall_in_clay(request: Request):
    return await _receive(request, logic.STEP_CLAY_PERSON)


# --- scheduling without a cron host: a dispatch pass every minute ----------


@app.function(secrets=[db_secret], schedule=modal.Cron("* * * * *"), timeout=300)
def dispatch_every_minute() -> dict:
    """``wsctl dispatch --once`` on Modal's scheduler: spawns this app's functions.

    Runs are serialized by the claim (``FOR UPDATE SKIP LOCKED``): an overrun
    pass and the next one never dispatch the same state twice.
    """
    summary = logic.dispatch_pass(APP_NAME)
    log.info("[DISPATCH] %s", summary)
    return summary
