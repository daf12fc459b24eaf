"""Business logic of the example enrichment worker, in plain functions.

``enrichment_app.py`` wraps these in Modal functions; the tests, the local
dispatch backend and ``wsctl demo`` run them directly. Nothing here imports
``modal``.

* Normalizers (pure): company names, domains, and all core values of a raw
  item at once. Which input field holds what comes from the client's config
  (``fields``), because each workstream scrapes a different layout.
* The splitter: one raw scrape row becomes a company row and a person row in
  the example's own tables (``examples/enrichment_schema.sql``, schema
  ``enrichment_example``; never created by ``wsctl migrate``).
* The Clay senders POST the item to the Clay table webhook URL from the
  client's config, at most once per dispatch generation of its state (a row
  in ``enrichment_example.clay_sends``, committed before the POST), with a
  callback token that binds the state id and that generation (HMAC-SHA256
  under ``CLAY_CALLBACK_SECRET``). The receiver accepts a callback only with
  such a token (401 otherwise) and a storable payload (400 otherwise), and
  completes the step only while that generation is the state's current one
  and the state waits for it (409 otherwise: a replay, a callback from before
  ``wsctl retry``, a finished state), recording Clay's payload on the item in
  the same transaction.

Every SQL statement sent from here is a named block of
``enrichment_queries.sql`` beside this file; parameters are always bound.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import unicodedata
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wsctl.states import IN_FLIGHT

log = logging.getLogger("enrichment_worker")

SECRET_ENV = "CLAY_CALLBACK_SECRET"
QUERIES_FILE = "enrichment_queries.sql"

# The workflow step slugs of the seed.
STEP_NAME = "normalize_company_name"
STEP_DOMAIN = "normalize_company_domain"
STEP_CORE = "normalize_all_core_values"
STEP_SPLIT = "split_raw_apollo_scrape_data_into_two_tables"
STEP_CLAY_COMPANY = "enrich_company_via_waterfall_in_clay"
STEP_CLAY_PERSON = "enrich_person_via_waterfall_in_clay"
SEED_BLUEPRINT = [
    STEP_NAME,
    STEP_DOMAIN,
    STEP_CORE,
    STEP_SPLIT,
    STEP_CLAY_COMPANY,
    STEP_CLAY_PERSON,
]


# --- SQL -----------------------------------------------------------------


@cache
def queries() -> dict[str, str]:
    """The named blocks of ``enrichment_queries.sql`` (same format as wsctl's sql/queries)."""
    from wsctl.queries import parse_blocks

    path = Path(__file__).resolve().parent / QUERIES_FILE
    return parse_blocks(path.read_text(encoding="utf-8"))


def q(name: str) -> str:
    return queries()[name]


@contextmanager
def connect(conn=None) -> Iterator[Any]:
    """``conn`` as given, or a short connection from ``WSCTL_DATABASE_URL`` (a Modal secret)."""
    if conn is not None:
        yield conn
        return
    from wsctl import db, settings
    from wsctl.errors import EnvError

    s = settings.load()
    if not s.database_url:
        raise EnvError("WSCTL_DATABASE_URL is not set (the Modal secret wsctl-database holds it)")
    with db.connect(s.database_url, s, application_name="enrichment-worker") as c:
        yield c


# --- normalizers (pure) ----------------------------------------------------

# Legal-form suffixes, stripped from the end of a name, repeatedly ("Pty Ltd",
# "GmbH & Co. KG"). Dots and spaces inside a form are optional ("S.A.", "S A").
_LEGAL_FORMS = [
    "incorporated",
    "inc",
    "llc",
    "l l c",
    "llp",
    "lp",
    "ltd",
    "limited",
    "plc",
    "pty",
    "gmbh",
    "mbh",
    "ag",
    "kg",
    "& co",
    "sa",
    "sas",
    "sarl",
    "srl",
    "spa",
    "bv",
    "nv",
    "oy",
    "ab",
    "as",
    "corp",
    "corporation",
]


def _form_pattern(form: str) -> str:
    parts = [re.escape(ch) for ch in form.replace(" ", "")]
    if form.startswith("&"):
        return r"&\s*co\.?"
    return r"\.?\s?".join(parts) + r"\.?"


_SUFFIX_RE = re.compile(
    r"(?:^|[\s,]+)(?:" + "|".join(_form_pattern(f) for f in _LEGAL_FORMS) + r")\s*$",
    re.IGNORECASE,
)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})
_EDGE_PUNCT = " \t,;:.-_/|*\"'()[]"
CASE_MODES = ("smart", "keep", "title", "upper", "lower")


def _clean_text(value: Any) -> str:
    if value is None:
        return ""
    text = unicodedata.normalize("NFKC", str(value)).translate(_QUOTES)
    return " ".join(text.split())


def _title(text: str) -> str:
    # str.title() capitalises after apostrophes ("O'Neil" ok, "Macy'S" not): do it per word.
    def word(w: str) -> str:
        return "-".join(p[:1].title() + p[1:].lower() for p in w.split("-"))

    return " ".join(word(w) for w in text.split(" "))


def normalize_company_name(
    raw: Any, *, case: str = "smart", strip_legal_suffixes: bool = True
) -> str | None:
    """A company's display name: whitespace, quotes, edge punctuation, legal forms, case.

    ``case``: ``smart`` title-cases a name written all upper or all lower case
    and keeps mixed case ("iRobot"); ``keep``, ``title``, ``upper``, ``lower``.
    None when nothing is left.
    """
    if case not in CASE_MODES:
        raise ValueError(f"case must be one of {', '.join(CASE_MODES)}, not {case!r}")
    text = _clean_text(raw).strip(_EDGE_PUNCT)
    if not text:
        return None
    if strip_legal_suffixes:
        while True:
            stripped = _SUFFIX_RE.sub("", text).strip(_EDGE_PUNCT)
            if stripped == text or not stripped:
                break
            text = stripped
    text = re.sub(r"\s+,", ",", text)
    if case == "title" or (case == "smart" and (text.isupper() or text.islower())):
        text = _title(text)
    elif case == "upper":
        text = text.upper()
    elif case == "lower":
        text = text.lower()
    return text or None


def company_match_key(name: str | None) -> str | None:
    """A case- and punctuation-insensitive key for matching names ("Acme, Inc." == "ACME")."""
    norm = normalize_company_name(name, case="lower")
    if not norm:
        return None
    return re.sub(r"[^\w&]+", " ", norm).strip() or None


_HOST_RE = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


def normalize_domain(raw: Any) -> str | None:
    """A bare registrable host: no scheme, ``www.``, credentials, port, path, query or trailing dot.

    Accepts a URL, a bare host or an email address; None when no valid host is left.
    """
    text = _clean_text(raw).strip().strip("\"'<>")
    if not text:
        return None
    if "@" in text and "://" not in text:
        text = text.rsplit("@", 1)[1]  # an email address: its domain
    if "://" not in text:
        text = "//" + text.lstrip("/")
    try:
        host = urlsplit(text).hostname or ""
    except ValueError:
        return None
    host = host.strip().rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii")  # münchen.de -> xn--mnchen-3ya.de
    except UnicodeError:
        return None
    while host.startswith("www.") and host.count(".") > 1:
        host = host[4:]
    return host if _HOST_RE.match(host) else None


_LINKEDIN_RE = re.compile(
    r"^(?:https?://)?(?:[a-z]{2,3}\.)?linkedin\.com/(in|company)/([^/?#\s]+)", re.I
)


def normalize_linkedin_url(raw: Any) -> str | None:
    """``https://www.linkedin.com/in/<slug>`` (or ``/company/<slug>``); None if not LinkedIn."""
    text = _clean_text(raw)
    m = _LINKEDIN_RE.match(text)
    if not m:
        return None
    return f"https://www.linkedin.com/{m.group(1).lower()}/{m.group(2).rstrip('/')}"


def normalize_email(raw: Any) -> str | None:
    text = _clean_text(raw).strip("<>\"' ").lower()
    if text.startswith("mailto:"):
        text = text[7:]
    local, sep, domain = text.rpartition("@")
    domain = normalize_domain(domain) if sep else None
    if not local or not domain or " " in local:
        return None
    return f"{local}@{domain}"


_MULTIPLIERS = {
    "k": 1_000,
    "m": 1_000_000,
    "mm": 1_000_000,
    "b": 1_000_000_000,
    "bn": 1_000_000_000,
}


def parse_amount(raw: Any) -> int | None:
    """``"1,200"`` -> 1200, ``"$1.2M"`` -> 1200000, ``"12000000"``; None when not a number."""
    text = _clean_text(raw).lower().replace(",", "").replace("$", "").replace("€", "")
    text = text.replace("usd", "").replace("eur", "").replace(" ", "").rstrip("+")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|mm|m|bn|b)?", text)
    if not m:
        return None
    try:
        value = Decimal(m.group(1)) * _MULTIPLIERS.get(m.group(2) or "", 1)
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        return None
    return int(value)


def _person_name(text: Any) -> str | None:
    clean = _clean_text(text).strip(_EDGE_PUNCT)
    if not clean:
        return None
    return _title(clean) if (clean.isupper() or clean.islower()) else clean


# Where each core value sits in a raw item: the Apollo CSV export by default;
# a client config's ``fields`` overrides (another workstream, another layout).
APOLLO_FIELDS: dict[str, str] = {
    "company_name": "Company",
    "website": "Website",
    "email": "Email",
    "email_status": "Email Status",
    "first_name": "First Name",
    "last_name": "Last Name",
    "full_name": "Full Name",
    "title": "Title",
    "seniority": "Seniority",
    "department": "Departments",
    "person_linkedin_url": "Person Linkedin Url",
    "company_linkedin_url": "Company Linkedin Url",
    "employees": "# Employees",
    "annual_revenue": "Annual Revenue",
    "industry": "Industry",
    "city": "City",
    "country": "Country",
    "external_person_id": "Apollo Contact Id",
    "external_company_id": "Apollo Account Id",
}


def field_map(config: dict | None) -> dict[str, str]:
    fields = dict(APOLLO_FIELDS)
    fields.update((config or {}).get("fields") or {})
    return fields


def raw_value(data: dict, config: dict | None, key: str) -> Any:
    return data.get(field_map(config).get(key, key))


def normalize_core_values(data: dict, config: dict | None = None) -> dict[str, Any]:
    """Every core value of a raw item at once, normalized (missing values are None)."""
    config = config or {}
    get = lambda key: raw_value(data, config, key)  # noqa: E731
    first, last = _person_name(get("first_name")), _person_name(get("last_name"))
    full = _person_name(get("full_name"))
    if full and not (first or last):
        first, _, rest = full.partition(" ")
        last = rest or None
    full = full or " ".join(p for p in (first, last) if p) or None
    email = normalize_email(get("email"))
    domain = normalize_domain(get("website"))
    if domain is None and email and config.get("domain_from_email", False):
        domain = email.rsplit("@", 1)[1]
    return {
        "company_name": normalize_company_name(
            get("company_name"),
            case=config.get("case", "smart"),
            strip_legal_suffixes=config.get("strip_legal_suffixes", True),
        ),
        "company_domain": domain,
        "email": email,
        "email_status": _clean_text(get("email_status")).lower() or None,
        "first_name": first,
        "last_name": last,
        "full_name": full,
        "title": _clean_text(get("title")) or None,
        "seniority": _clean_text(get("seniority")) or None,
        "department": _clean_text(get("department")) or None,
        "person_linkedin_url": normalize_linkedin_url(get("person_linkedin_url")),
        "company_linkedin_url": normalize_linkedin_url(get("company_linkedin_url")),
        "employees": parse_amount(get("employees")),
        "annual_revenue": parse_amount(get("annual_revenue")),
        "industry": _clean_text(get("industry")).lower() or None,
        "city": _clean_text(get("city")) or None,
        "country": _clean_text(get("country")) or None,
        "external_person_id": _clean_text(get("external_person_id")) or None,
        "external_company_id": _clean_text(get("external_company_id")) or None,
    }


def core_values(data: dict, config: dict | None = None) -> dict[str, Any]:
    """The item's normalized values: what earlier steps stored, else normalized now."""
    stored = data.get("normalized") or {}
    fresh = normalize_core_values(data, config)
    return {**fresh, **{k: v for k, v in stored.items() if v is not None}}


# --- split (pure part) -----------------------------------------------------


def split_row(data: dict, config: dict | None = None) -> tuple[dict | None, dict | None]:
    """A raw scrape row as ``(company, person)``; either is None when the row lacks it."""
    v = core_values(data, config)
    company = None
    key = v["company_domain"] or (
        f"name:{company_match_key(v['company_name'])}" if v["company_name"] else None
    )
    if key:
        company = {
            "company_key": key,
            "name": v["company_name"] or v["company_domain"],
            "domain": v["company_domain"],
            "linkedin_url": v["company_linkedin_url"],
            "employees": v["employees"],
            "annual_revenue": v["annual_revenue"],
            "industry": v["industry"],
            "country": v["country"],
        }
    person = None
    if v["full_name"] or v["email"] or v["person_linkedin_url"]:
        person = {
            "first_name": v["first_name"],
            "last_name": v["last_name"],
            "full_name": v["full_name"],
            "title": v["title"],
            "seniority": v["seniority"],
            "department": v["department"],
            "email": v["email"],
            "email_status": v["email_status"],
            "linkedin_url": v["person_linkedin_url"],
            "city": v["city"],
            "country": v["country"],
        }
    return company, person


# --- the item and its trace -----------------------------------------------


@dataclass
class ItemContext:
    item_id: uuid.UUID
    client_id: uuid.UUID
    workstream_slug: str | None
    data: dict


def load_item(conn, item_id: str) -> ItemContext:
    row = conn.execute(q("example_item_get"), (item_id,)).fetchone()
    if row is None:
        raise LookupError(f"no batch item {item_id}")
    return ItemContext(item_id=row[0], client_id=row[1], workstream_slug=row[2], data=row[3] or {})


def config_row(conn, item_id, step: str, workstream_slug: str | None) -> dict | None:
    """Which ``client_workflow_configs`` row the composite key picks, for the trace."""
    if workstream_slug is None:
        return None
    row = conn.execute(q("example_config_row"), (item_id, step, workstream_slug)).fetchone()
    return {"config_id": str(row[0]), "config_workstream": row[1]} if row else None


def record_step(
    conn,
    item_id,
    step: str,
    *,
    function: str,
    workstream_slug: str | None,
    normalized: dict | None = None,
    detail: str | None = None,
) -> None:
    """Merge normalized values into the item and note in ``data._trace[step]`` what ran.

    The trace says which function ran in which workstream and which config row
    (by id, with its workstream) it used: ``wsctl demo`` prints it.
    """
    from psycopg.types.json import Jsonb

    trace = {"function": function, "workstream": workstream_slug, "detail": detail}
    trace.update(config_row(conn, item_id, step, workstream_slug) or {})
    conn.execute(
        q("example_item_record_step"),
        {
            "item_id": item_id,
            "normalized": Jsonb(normalized or {}),
            "step": step,
            "trace": Jsonb(trace),
        },
    )


def run_normalize_step(
    item_id: str,
    workstream_slug: str,
    step: str,
    function: str,
    config: dict | None,
    *,
    conn,
) -> dict:
    """The three normalizer steps: name, domain, or all core values; returns what was stored."""
    from wsctl.db import tx

    item = load_item(conn, item_id)
    values = normalize_core_values(item.data, config)
    if step == STEP_NAME:
        out = {"company_name": values["company_name"]}
        detail = values["company_name"]
    elif step == STEP_DOMAIN:
        out = {"company_domain": values["company_domain"]}
        detail = values["company_domain"]
    else:
        out = values
        detail = f"{sum(v is not None for v in values.values())} values"
    with tx(conn):
        record_step(
            conn,
            item.item_id,
            step,
            function=function,
            workstream_slug=workstream_slug,
            normalized=out,
            detail=detail,
        )
    return out


def run_split_step(
    item_id: str, workstream_slug: str, function: str, config: dict | None, *, conn
) -> dict:
    """Split the raw row into ``enrichment_example.companies``/``people`` (idempotent upserts)."""
    from psycopg.types.json import Jsonb

    from wsctl.db import tx

    item = load_item(conn, item_id)
    company, person = split_row(item.data, config)
    source = (config or {}).get("source") or workstream_slug
    out: dict[str, Any] = {"company_id": None, "person_id": None}
    with tx(conn):
        if company is not None:
            out["company_id"] = str(
                conn.execute(
                    q("example_company_upsert"),
                    {**company, "client_id": item.client_id, "source": source},
                ).fetchone()[0]
            )
        if person is not None:
            out["person_id"] = str(
                conn.execute(
                    q("example_person_upsert"),
                    {
                        **person,
                        "item_id": item.item_id,
                        "client_id": item.client_id,
                        "company_id": out["company_id"],
                        "workstream_slug": workstream_slug,
                        "source": source,
                        "raw": Jsonb({k: v for k, v in item.data.items() if not k.startswith("_")}),
                    },
                ).fetchone()[0]
            )
        parts = [p for p in ("company", "person") if out[f"{p}_id"]]
        record_step(
            conn,
            item.item_id,
            STEP_SPLIT,
            function=function,
            workstream_slug=workstream_slug,
            detail=f"{'+'.join(parts) or 'nothing'} -> enrichment_example ({source})",
        )
    return out


# --- Clay: sender and receiver --------------------------------------------

# The token a callback must carry: ``v2.<dispatch generation>.<HMAC-SHA256 hex>``. The HMAC
# binds the state id and the generation, so a callback answers one dispatch of one state.
TOKEN_VERSION = "v2"
_TOKEN_RE = re.compile(r"\Av2\.(0|[1-9][0-9]{0,18})\.([0-9a-f]{64})\Z", re.ASCII)
_UUID_RE = re.compile(
    r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z", re.ASCII | re.IGNORECASE
)
_MAX_GENERATION = 2**63 - 1  # dispatch_generation is a bigint
# What an ``enriched`` payload may be: JSON that PostgreSQL's jsonb stores as it is.
MAX_ENRICHED_DEPTH = 64
_MAX_INT_BITS = 3000  # about 900 digits: json.dumps refuses ints past 4300
# A callback waits at most this long for its state's row (a claim, a completer), then is a
# 503 that Clay retries: the receiver never hangs on a lock.
CALLBACK_LOCK_TIMEOUT = "5s"
CALLBACK_STATEMENT_TIMEOUT = "15s"
# DISPATCHED, DISPATCHING: the states a sender may post for and a callback may complete.
WAITING = sorted(s.value for s in IN_FLIGHT)


def callback_secret(secret: str | None = None) -> str | None:
    return secret if secret is not None else (os.environ.get(SECRET_ENV) or None)


def _mac(state_id: uuid.UUID, generation: int, secret: str) -> str:
    msg = f"wsctl-callback:{TOKEN_VERSION}:{state_id}:{generation}".encode("ascii")
    # surrogateescape: how os.environ decodes bytes that are not UTF-8 (a secret is bytes)
    key = secret.encode("utf-8", "surrogateescape")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def callback_token(state_id: str | uuid.UUID, generation: int, secret: str) -> str:
    """The token a callback for one dispatch generation of ``state_id`` must carry."""
    generation = int(generation)
    if not 0 <= generation <= _MAX_GENERATION:
        raise ValueError(f"not a dispatch generation: {generation}")
    sid = uuid.UUID(str(state_id))
    return f"{TOKEN_VERSION}.{generation}.{_mac(sid, generation, secret)}"


def verify_callback_token(state_id: Any, token: Any, secret: str) -> tuple[uuid.UUID, int] | None:
    """``(state id, generation)`` when ``token`` proves itself for ``state_id``, else None.

    Never raises, whatever the two values are (any JSON value, lone surrogates included).
    """
    if not isinstance(state_id, str) or not isinstance(token, str):
        return None
    if not _UUID_RE.match(state_id):
        return None
    m = _TOKEN_RE.match(token)
    if m is None:
        return None
    sid, generation = uuid.UUID(state_id), int(m.group(1))
    if generation > _MAX_GENERATION:
        return None
    # Both sides are ASCII here (the patterns say so): compare_digest takes them as str.
    if not hmac.compare_digest(m.group(2), _mac(sid, generation, secret)):
        return None
    return sid, generation


class AlreadySent(RuntimeError):
    """This dispatch generation was handed to a sender before whose POST did not succeed."""


@dataclass
class ClaySend:
    """One sender run: the generation it belongs to and whether this run posted."""

    state_id: uuid.UUID
    generation: int
    posted: bool


def claim_clay_send(conn, item_id: uuid.UUID, step: str) -> ClaySend:
    """Claim the one POST of the state's current generation, committed before the POST.

    ``posted=False``: the generation's POST already succeeded in an earlier run (a Modal
    retry, an overrun pass): send nothing, wait for its callback. Raises ``AlreadySent`` when
    an earlier run claimed it and failed or stopped mid-POST (it may have reached Clay: it is
    never posted again; the retry's new generation is), ``RuntimeError`` when the state is
    not waiting to be sent, ``LookupError`` when there is none.
    """
    from psycopg.rows import dict_row

    from wsctl.db import tx

    params = {"item_id": item_id, "step": step, "waiting": WAITING}
    with tx(conn), conn.cursor(row_factory=dict_row) as cur:
        won = cur.execute(q("example_clay_send_claim"), params).fetchone()
        if won is not None:
            return ClaySend(won["state_id"], won["dispatch_generation"], posted=True)
        row = cur.execute(q("example_clay_send_existing"), params).fetchone()
    if row is None:
        raise LookupError(f"item {item_id} has no workflow state for {step}")
    sid, gen = row["state_id"], row["dispatch_generation"]
    if row["posted_at"] is not None:  # its callback may even have completed the state since
        log.info("[ASYNC SENDER] state %s generation %s was sent already: not again", sid, gen)
        return ClaySend(sid, gen, posted=False)
    if row["claimed"]:
        what = f"failed: {row['error']}" if row["error"] else "has no outcome (stopped mid-POST?)"
        raise AlreadySent(
            f"state {sid} generation {gen} was handed to Clay before and its POST {what}; "
            "it is not posted again (a retry posts a new generation)"
        )
    raise RuntimeError(
        f"state {sid} ({step}) is {row['status']}, not dispatched: nothing sent to Clay"
    )


def run_clay_sender(
    item_id: str,
    workstream_slug: str,
    step: str,
    function: str,
    config: dict | None,
    *,
    conn,
    secret: str | None = None,
) -> str:
    """Hand the item to the client's Clay table for ``step``; returns which webhook source took
    it (``clay webhook DIGEST on HOST``: the URL itself is a secret, so it is neither returned
    nor recorded).

    The row carries ``callback_token`` (see ``callback_token``: it binds the state and its
    dispatch generation) and, when the config has one, ``callback_url``: the Clay table's
    HTTP API column sends both back with the enriched values. Each generation is posted at
    most once (``claim_clay_send``): a second run of the same generation posts nothing.
    """
    from wsctl import clay, worker
    from wsctl.db import tx

    config = config or {}
    entries = clay.webhook_entries(config)
    if not entries:
        raise RuntimeError(
            f"the client's config for {step} in workstream {workstream_slug} has no "
            "clay_table_webhook_url (or clay_table_webhook_urls)"
        )
    key = callback_secret(secret)
    if not key:
        raise RuntimeError(f"{SECRET_ENV} is not set: Clay's callback could not prove itself")
    item = load_item(conn, item_id)
    send = claim_clay_send(conn, item.item_id, step)
    if not send.posted:
        return f"sent before (state {send.state_id} generation {send.generation})"
    values = core_values(item.data, config)
    row = {
        "item_id": str(item.item_id),
        "state_id": str(send.state_id),
        "dispatch_generation": send.generation,
        "workflow": step,
        "workstream": workstream_slug,
        "callback_token": callback_token(send.state_id, send.generation, key),
        "callback_url": config.get("callback_url"),
        "record": values,
    }
    headers = {}
    if config.get("clay_webhook_auth_token"):
        headers["x-clay-webhook-auth"] = str(config["clay_webhook_auth_token"])
    fence = {"state_id": send.state_id, "generation": send.generation}
    timeout = float(config.get("timeout_seconds", 30))
    try:
        # wsctl.clay.send: the 100 KB check, a token under the step's limits just before
        # the POST, the first webhook source with capacity left, counted only when accepted.
        sent = clay.send(
            conn,
            config,
            row,
            post=lambda target, body: clay.http_post(
                target, body, headers=headers, timeout=timeout
            ),
            where=f"(client {item.client_id}, {step}, {workstream_slug})",
            limit_keys=worker.limit_keys(str(item.item_id), step, conn=conn),
            limit_wait=float(config.get("limit_wait_seconds", 30)),
        )
    except Exception as exc:
        try:
            with tx(conn):
                conn.execute(q("example_clay_send_failed"), {**fence, "error": str(exc)[:500]})
        except Exception as record_exc:  # the POST's error is the one to report
            log.warning("[ASYNC SENDER] could not record the failed POST: %s", record_exc)
        raise
    webhook = clay.digest(sent.entry)
    used = f"clay webhook {webhook[:12]} on {urlsplit(str(sent.entry)).hostname}"
    with tx(conn):
        posted = {**fence, "http_status": sent.http_status, "webhook_digest": webhook}
        conn.execute(q("example_clay_send_posted"), posted)
        record_step(
            conn,
            item.item_id,
            step,
            function=function,
            workstream_slug=workstream_slug,
            detail=used,
        )
    return used


@dataclass
class CallbackResponse:
    status: int
    body: dict = field(default_factory=dict)


def _unauthorized(why: str) -> CallbackResponse:
    log.warning("[RECEIVER] rejected callback: %s", why)
    return CallbackResponse(401, {"error": "unauthorized"})


def _bad_request(why: str) -> CallbackResponse:
    log.warning("[RECEIVER] malformed callback: %s", why)
    return CallbackResponse(400, {"error": why})


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds \\u0000, which PostgreSQL's jsonb cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (not UTF-8)"
    return None


def json_problem(value: Any, max_depth: int = MAX_ENRICHED_DEPTH) -> str | None:
    """Why ``value`` cannot be stored as jsonb as it is, or None. Iterative: any depth is safe."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            return f"is nested deeper than {max_depth} levels"
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if v.bit_length() > _MAX_INT_BITS:
                return "holds a number too large to store"
        elif isinstance(v, _HugeNumber):
            return "holds a number too large to store"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "holds NaN or Infinity, which JSON cannot carry"
        elif isinstance(v, str):
            if (problem := _text_problem(v)) is not None:
                return f"a string {problem}"
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    return "has a key that is not a string"
                if (problem := _text_problem(k)) is not None:
                    return f"a key {problem}"
                stack.append((x, depth + 1))
        else:
            return f"holds a {type(v).__name__}, which is not JSON"
    return None


class _HugeNumber:
    """An integer literal too long to store (Python would refuse to parse it at 4300 digits)."""


def _parse_int(text: str) -> int | _HugeNumber:
    # A proven callback with a 5000-digit number is malformed (400), not unreadable (401).
    return int(text) if len(text) <= _MAX_INT_BITS // 3 else _HugeNumber()


def _decode(body: Any) -> Any:
    """The JSON document in ``body`` (bytes, str or already decoded); ``_NOT_JSON`` if none."""
    if isinstance(body, bytes | bytearray | memoryview | str):
        text = body if isinstance(body, str) else bytes(body)
        try:
            return json.loads(text, parse_int=_parse_int)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _NOT_JSON
    return body


_NOT_JSON = object()


class _Refused(Exception):
    """Raised inside the transaction to roll it back and answer ``response``."""

    def __init__(self, response: CallbackResponse):
        super().__init__(response.status)
        self.response = response


def _refusal(
    c, state_id: uuid.UUID, generation: int, steps: tuple[str, ...] | None
) -> CallbackResponse:
    """The answer to a verified callback that the fence let through to nothing."""
    row = c.execute(q("example_callback_state"), (state_id,)).fetchone()
    if row is None:
        return CallbackResponse(404, {"error": "no such workflow state"})
    _sid, step, status, current = row
    body = {"state_id": str(state_id), "status": status, "completed": False}
    if steps and step not in steps:
        return CallbackResponse(409, {**body, "error": f"state belongs to step {step}"})
    if current != generation:
        why = f"the token is for dispatch generation {generation}, the state is at {current}"
    else:
        why = f"the state is {status}, not waiting for a callback"
    log.warning("[RECEIVER] refused callback for state %s: %s", state_id, why)
    return CallbackResponse(409, {**body, "error": why})


def handle_clay_callback(
    body: Any,
    *,
    secret: str | None = None,
    expected_steps: tuple[str, ...] | None = None,
    conn=None,
) -> CallbackResponse:
    """Clay's callback: verify its token, record ``enriched`` on the item, complete the step.

    ``body`` is the raw request body (bytes or str) or the decoded JSON: ``{"state_id",
    "callback_token", "enriched": {...}}``. Answers, in this order, and never raises for
    any input: 401 when it does not prove itself (nothing read or written); 400 when it does
    but is malformed; 404 for a state that no longer exists; 409 unless the token's dispatch
    generation is the state's current one and the state waits for it (DISPATCHING or
    DISPATCHED), so a replay, a callback of an earlier generation (after ``wsctl retry``) or
    for a finished state writes nothing; 200 when it recorded the payload and completed the
    state, in one transaction with the fence; 503 when the secret or the database is missing.
    """
    key = callback_secret(secret)
    if not key:
        return CallbackResponse(503, {"error": f"{SECRET_ENV} is not configured"})
    doc = _decode(body)
    if doc is _NOT_JSON:
        return _unauthorized("body is not JSON")
    if not isinstance(doc, dict):
        return _unauthorized("body is not a JSON object")
    proven = verify_callback_token(doc.get("state_id"), doc.get("callback_token"), key)
    if proven is None:
        return _unauthorized("no state_id and valid callback token")
    state_id, generation = proven
    enriched = doc.get("enriched")
    if not isinstance(enriched, dict):
        return _bad_request("enriched must be a JSON object")
    if (problem := json_problem(enriched)) is not None:
        return _bad_request(f"enriched {problem}")
    try:
        return _complete(state_id, generation, enriched, expected_steps, conn)
    except _Refused as refused:
        return refused.response
    except Exception as exc:
        return _database_failure(exc)


def _database_failure(exc: Exception) -> CallbackResponse:
    """A database that is away or busy is a 503 (Clay retries); nothing was written."""
    import psycopg

    from wsctl.errors import EnvError

    if isinstance(exc, psycopg.DataError):  # the validation above should leave none
        return _bad_request("enriched was refused by the database")
    if isinstance(exc, psycopg.OperationalError | EnvError):
        log.warning("[RECEIVER] database unavailable: %s", (str(exc).splitlines() or [""])[0])
        return CallbackResponse(503, {"error": "database unavailable, retry later"})
    raise exc


def _complete(
    state_id: uuid.UUID,
    generation: int,
    enriched: dict,
    expected_steps: tuple[str, ...] | None,
    conn,
) -> CallbackResponse:
    from psycopg.types.json import Jsonb

    from wsctl import worker
    from wsctl.db import tx

    fence = {
        "state_id": state_id,
        "generation": generation,
        "waiting": WAITING,
        "steps": list(expected_steps) if expected_steps else None,
    }
    with connect(conn) as c:
        with tx(
            c, statement_timeout=CALLBACK_STATEMENT_TIMEOUT, lock_timeout=CALLBACK_LOCK_TIMEOUT
        ):
            state = c.execute(q("example_callback_fence"), fence).fetchone()
            if state is None:
                raise _Refused(_refusal(c, state_id, generation, expected_steps))
            _sid, item_id, step = state
            c.execute(q("example_item_record_clay"), (step, Jsonb(enriched), item_id))
            # Under the fence's row lock nothing can have moved the state: this completes it.
            if not worker.complete_step(str(state_id), conn=c):  # pragma: no cover - defensive
                raise _Refused(CallbackResponse(409, {"error": "the state could not complete"}))
    log.info("[RECEIVER] %s completed for item=%s", step, item_id)
    return CallbackResponse(
        200, {"state_id": str(state_id), "completed": True, "dispatch_generation": generation}
    )


# --- the scheduled dispatch pass ------------------------------------------


def dispatch_pass(app_name: str, *, backend=None, conn=None, limit: int = 1000) -> dict:
    """One ``wsctl`` dispatch pass (what ``wsctl dispatch --once`` does), as JSON."""
    from wsctl.dispatch import PassOptions, run_pass

    if backend is None:
        from wsctl.dispatch.loop import make_backend

        backend = make_backend("modal", app=app_name)
    try:
        with connect(conn) as c:
            summary = run_pass(c, backend, PassOptions(limit=limit))
    finally:
        backend.close()
    return summary.to_json()
