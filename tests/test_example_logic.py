"""The example worker's business logic (examples/enrichment_logic.py): normalizers on the
messy values of the real Apollo export sample, the splitter, and the Clay receiver's
401s and idempotency on a real PostgreSQL."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import threading
import time
import uuid

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import table_snapshot
from tests.support import factories as f
from wsctl.dispatch.local import load_app
from wsctl.queries import example_path

APP = load_app(str(example_path("enrichment_app.py")))
logic = APP.logic

with example_path("apollo_export_sample.csv").open(encoding="utf-8", newline="") as _fh:
    SAMPLE = list(csv.DictReader(_fh))

SECRET = "test-callback-secret"
CLAY_STEP = "enrich_company_via_waterfall_in_clay"
NEXT_STEP = "enrich_person_via_waterfall_in_clay"


# --- company names ---------------------------------------------------------

# Every distinct "Company" value of the sample export, and what it should become.
SAMPLE_NAMES = {
    "  Hooli  ": "Hooli",
    "ACME Corporation": "Acme",
    "Acme, Inc.": "Acme",
    "Cyberdyne Systems Pty Ltd": "Cyberdyne Systems",
    "Dunder Mifflin Paper Company, Inc.": "Dunder Mifflin Paper Company",
    "Globex Corp.": "Globex",
    "Initech LLC": "Initech",
    "Oscorp": "Oscorp",
    "Pied Piper, Inc.": "Pied Piper",
    "Soylent S.A.": "Soylent",
    "Stark Industries": "Stark Industries",
    "Tyrell Corp": "Tyrell",
    "Umbrella Holdings GmbH": "Umbrella Holdings",
    "Vandelay Industries Ltd.": "Vandelay Industries",
    "Wayne Enterprises, Inc": "Wayne Enterprises",
}


def test_the_table_covers_every_company_in_the_sample():
    assert {r["Company"] for r in SAMPLE} == set(SAMPLE_NAMES)


@pytest.mark.parametrize(("raw", "expected"), sorted(SAMPLE_NAMES.items()))
def test_company_names_from_the_sample(raw, expected):
    assert logic.normalize_company_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("PIED PIPER, INC.", "Pied Piper"),  # all caps: title-cased
        ("pied piper inc", "Pied Piper"),  # all lower: title-cased
        ("iRobot Corp", "iRobot"),  # mixed case is kept
        ("Foo GmbH & Co. KG", "Foo"),  # stacked legal forms
        ("Foo Co., Ltd.", "Foo Co"),  # "Co" alone is not stripped (too often part of a name)
        ("Bar S.A.S.", "Bar"),
        ("Baz L.L.C.", "Baz"),
        ("Qux Limited", "Qux"),
        ("\u201cHooli\u201d", "Hooli"),  # curly quotes
        ("Hooli\u00a0 Inc", "Hooli"),  # no-break space
        ("  Globex ,  Corp. ", "Globex"),
        ("Oscorp", "Oscorp"),  # "corp" inside a word stays
        ("Incorporated", "Incorporated"),  # nothing would be left: kept
        ("Initech LLC;", "Initech"),
        ("", None),
        ("   ", None),
        (None, None),
        ("---", None),
    ],
)
def test_company_names_real_world_mess(raw, expected):
    assert logic.normalize_company_name(raw) == expected


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("smart", "Acme Widgets"),
        ("keep", "ACME widgets"),
        ("title", "Acme Widgets"),
        ("upper", "ACME WIDGETS"),
        ("lower", "acme widgets"),
    ],
)
def test_company_name_case_modes(case, expected):
    raw = "ACME widgets, Inc."
    if case == "smart":
        raw = "ACME WIDGETS, INC."
    assert logic.normalize_company_name(raw, case=case) == expected


def test_unknown_case_mode_is_refused():
    with pytest.raises(ValueError, match="case must be one of"):
        logic.normalize_company_name("Acme", case="shouty")


def test_suffix_stripping_can_be_turned_off():
    assert logic.normalize_company_name("Initech LLC", strip_legal_suffixes=False) == "Initech LLC"


def test_name_and_name_for_emails_agree_on_every_sample_row():
    """Apollo's two name columns differ only in legal forms and spacing."""
    for row in SAMPLE:
        assert logic.company_match_key(row["Company"]) == logic.company_match_key(
            row["Company Name for Emails"]
        ), row["Company"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_company_name_normalization_is_idempotent(text):
    once = logic.normalize_company_name(text)
    if once is not None:
        assert logic.normalize_company_name(once) == once


# --- domains ---------------------------------------------------------------

SAMPLE_WEBSITES = {
    "": None,
    "WWW.INITECH.COM": "initech.com",
    "acme.com": "acme.com",
    "cyberdyne.com.au": "cyberdyne.com.au",
    "dundermifflin.com": "dundermifflin.com",
    "hooli.xyz": "hooli.xyz",
    "http://globex.io/about": "globex.io",
    "https://stark.industries:443/": "stark.industries",
    "https://www.acme.com/": "acme.com",
    "piedpiper.com": "piedpiper.com",
    "soylent.fr": "soylent.fr",
    "tyrell-corp.com": "tyrell-corp.com",
    "umbrella.de.": "umbrella.de",
    "vandelay.co.uk": "vandelay.co.uk",
    "wayneenterprises.com/contact?ref=apollo": "wayneenterprises.com",
}


def test_the_table_covers_every_website_in_the_sample():
    assert {r["Website"] for r in SAMPLE} == set(SAMPLE_WEBSITES)


@pytest.mark.parametrize(("raw", "expected"), sorted(SAMPLE_WEBSITES.items()))
def test_domains_from_the_sample(raw, expected):
    assert logic.normalize_domain(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTPS://WWW.Acme.COM:8443/path/?q=1#top", "acme.com"),
        ("  acme.com  ", "acme.com"),
        ("//acme.com", "acme.com"),
        ("ftp://files.acme.com/", "files.acme.com"),
        ("https://user:pw@www.acme.com/", "acme.com"),
        ("www.www.acme.com", "acme.com"),
        ("ana@Hooli.XYZ", "hooli.xyz"),  # an email address: its domain
        ("acme.com.", "acme.com"),
        ("münchen.de", "xn--mnchen-3ya.de"),
        ("<https://acme.com>", "acme.com"),
        ("localhost", None),
        ("not a domain", None),
        ("http://", None),
        ("-acme.com", None),
        (None, None),
    ],
)
def test_domains_real_world_mess(raw, expected):
    assert logic.normalize_domain(raw) == expected


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["", "http://", "https://", "HTTPS://", "//"]),
    st.sampled_from(["", "www.", "WWW."]),
    st.lists(_label, min_size=1, max_size=3),
    st.sampled_from(["com", "io", "co.uk", "DE"]),
    st.sampled_from(["", ".", ":8080", "/", "/a/b?c=d", "?x=1#f"]),
)
def test_domain_normalization_strips_every_decoration(scheme, www, labels, tld, tail):
    host = ".".join(labels) + "." + tld
    got = logic.normalize_domain(f"{scheme}{www}{host}{tail}")
    expected = host.lower()
    while expected.startswith("www.") and expected.count(".") > 1:
        expected = expected[4:]
    assert got == expected
    assert logic.normalize_domain(got) == got


# --- emails, urls, amounts, all core values ---------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,200", 1200),
        ("$1.2M", 1_200_000),
        ("12000000", 12_000_000),
        ("5k+", 5000),
        ("€3.5 bn", 3_500_000_000),
        ("", None),
        ("11-50", None),
        ("n/a", None),
    ],
)
def test_amounts(raw, expected):
    assert logic.parse_amount(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://www.linkedin.com/in/rosa-o'neil-2", "https://www.linkedin.com/in/rosa-o'neil-2"),
        ("linkedin.com/in/grace-dubois-3/", "https://www.linkedin.com/in/grace-dubois-3"),
        ("https://de.linkedin.com/in/ana-m-52?trk=x", "https://www.linkedin.com/in/ana-m-52"),
        ("HTTP://WWW.LINKEDIN.COM/COMPANY/acme", "https://www.linkedin.com/company/acme"),
        ("https://twitter.com/acme", None),
        ("", None),
    ],
)
def test_linkedin_urls(raw, expected):
    assert logic.normalize_linkedin_url(raw) == expected


def test_all_core_values_of_a_sample_row():
    row = next(r for r in SAMPLE if r["Company"] == "Wayne Enterprises, Inc" and r["Email"])
    values = logic.normalize_core_values(row)
    assert values["company_name"] == "Wayne Enterprises"
    assert values["company_domain"] == "wayneenterprises.com"
    assert values["email"] == row["Email"].lower()
    assert values["full_name"] == f"{row['First Name']} {row['Last Name']}"
    assert values["person_linkedin_url"].startswith("https://www.linkedin.com/in/")
    assert values["company_linkedin_url"] == "https://www.linkedin.com/company/wayneenterprises"
    assert values["employees"] == logic.parse_amount(row["# Employees"])
    assert values["external_person_id"] == row["Apollo Contact Id"]


def test_every_sample_row_normalizes():
    for row in SAMPLE:
        v = logic.normalize_core_values(row)
        assert v["company_name"] and v["company_name"] == v["company_name"].strip()
        assert v["company_domain"] == SAMPLE_WEBSITES[row["Website"]]
        assert (v["email"] is None) == (row["Email"] == "")
        assert v["full_name"]


def test_another_layout_through_the_configs_field_map():
    item = {
        "full_name": "  ana   müller ",
        "company": "\u201cHooli\u201d",
        "company_website": "",
        "contact_email": "Ana.Mueller@HOOLI.xyz",
    }
    fields = {
        "full_name": "full_name",
        "company_name": "company",
        "website": "company_website",
        "email": "contact_email",
    }
    v = logic.normalize_core_values(item, {"fields": fields, "domain_from_email": True})
    assert (v["first_name"], v["last_name"], v["full_name"]) == ("Ana", "Müller", "Ana Müller")
    assert v["company_name"] == "Hooli"
    assert v["company_domain"] == "hooli.xyz"  # from the email, as the config allows
    assert logic.normalize_core_values(item, {"fields": fields})["company_domain"] is None


# --- split -------------------------------------------------------------------


def test_split_a_sample_row():
    row = next(r for r in SAMPLE if r["Website"] == "WWW.INITECH.COM" and r["Email"])
    company, person = logic.split_row(row)
    assert company["company_key"] == "initech.com"
    assert company["name"] == "Initech"
    assert person["email"] == row["Email"].lower()
    assert person["linkedin_url"].startswith("https://www.linkedin.com/in/")


def test_split_without_website_keys_the_company_by_name():
    row = next(r for r in SAMPLE if r["Website"] == "")
    company, person = logic.split_row(row)
    assert company["company_key"] == f"name:{logic.company_match_key(row['Company'])}"
    assert company["domain"] is None
    assert person is not None


def test_split_an_empty_row():
    assert logic.split_row({}) == (None, None)


def test_split_step_writes_example_tables_idempotently(conn):
    conn.execute(example_path("enrichment_schema.sql").read_text())
    client = f.add_client(conn)
    f.register(conn, logic.STEP_SPLIT, "apollo_scrape", "sync", "run_split_raw_apollo_scrape_data")
    batch = f.add_batch(conn, client, [logic.STEP_SPLIT], 0)
    rows = [r for r in SAMPLE if r["Company"] == "Acme, Inc."][:2] + [
        r for r in SAMPLE if r["Company"] == "ACME Corporation"
    ][:1]
    ids = [
        conn.execute(
            "INSERT INTO batch_items (batch_id, data) VALUES (%s, %s) RETURNING id",
            (batch, psycopg.types.json.Jsonb(r)),
        ).fetchone()[0]
        for r in rows
    ]
    for _ in range(2):
        for item in ids:
            logic.run_split_step(str(item), "apollo_scrape", "run_split", {}, conn=conn)
    assert conn.execute("SELECT count(*) FROM enrichment_example.people").fetchone()[0] == 3
    companies = conn.execute(
        "SELECT company_key, name FROM enrichment_example.companies ORDER BY 1"
    ).fetchall()
    # "Acme, Inc." (acme.com) and "ACME Corporation" share a domain or a name key.
    assert {c[1] for c in companies} == {"Acme"}
    trace = conn.execute(
        "SELECT data->'_trace' FROM batch_items WHERE id = %s", (ids[0],)
    ).fetchone()
    assert trace[0][logic.STEP_SPLIT]["detail"].startswith("company+person")


# --- the receiver -------------------------------------------------------------

GENERATION = 3  # the dispatch generation the fixtures' states are at (three claims so far)


def claim(conn, state_id) -> int:
    """What a dispatch claim does to a state (until wsctl's claim bumps the generation itself)."""
    return conn.execute(
        "UPDATE workflow_states SET dispatch_generation = dispatch_generation + 1,"
        " status = 'DISPATCHING' WHERE id = %s RETURNING dispatch_generation",
        (state_id,),
    ).fetchone()[0]


@pytest.fixture
def dispatched(conn):
    """An item whose Clay step was handed to Clay (DISPATCHED); returns (item_id, state_id)."""
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, [CLAY_STEP, NEXT_STEP], 1, first_status="DISPATCHED")
    item_id, state_id = conn.execute(
        "UPDATE workflow_states SET dispatch_generation = %s WHERE batch_id = %s"
        " RETURNING item_id, id",
        (GENERATION, batch),
    ).fetchone()
    return item_id, state_id


def _callback(state_id, *, generation=GENERATION, token=None, enriched=None):
    return {
        "state_id": str(state_id),
        "callback_token": (
            token if token is not None else logic.callback_token(state_id, generation, SECRET)
        ),
        "enriched": enriched if enriched is not None else {"employees": 120},
    }


def _nested(depth: int, leaf: str = "1") -> bytes:
    return b"[" * depth + leaf.encode() + b"]" * depth


def test_the_token_binds_the_state_and_the_generation():
    sid, other = uuid.uuid4(), uuid.uuid4()
    token = logic.callback_token(sid, 7, SECRET)
    assert token.startswith("v2.7.")
    assert logic.verify_callback_token(str(sid), token, SECRET) == (sid, 7)
    assert logic.verify_callback_token(str(other), token, SECRET) is None
    assert logic.verify_callback_token(str(sid), token, "other-secret") is None
    forged = token.replace("v2.7.", "v2.8.")  # another generation under the same MAC
    assert logic.verify_callback_token(str(sid), forged, SECRET) is None
    assert logic.callback_token(sid, 8, SECRET) != token


@pytest.mark.parametrize(
    "body",
    [
        "wrong-token",
        "missing-token",
        "other-state",
        "other-secret",
        "v1-token",
        "bad-state-id",
        "not-json",
        "not-an-object",
        "lone-surrogate-token",
        "lone-surrogate-state-id",
        "nested-100000-deep",
        "state-id-nested-100000-deep",
        "generation-past-bigint",
    ],
)
def test_receiver_rejects_a_callback_that_does_not_prove_itself(conn, dispatched, body):
    _item, state_id = dispatched
    other = uuid.uuid4()
    good = logic.callback_token(state_id, GENERATION, SECRET)
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    v1 = hmac.new(SECRET.encode(), f"wsctl-callback:v1:{state_id}".encode(), hashlib.sha256)
    bodies = {
        "wrong-token": _callback(state_id, token=f"v2.{GENERATION}." + "0" * 64),
        "missing-token": {"state_id": str(state_id), "enriched": {}},
        "other-state": _callback(state_id, token=logic.callback_token(other, GENERATION, SECRET)),
        "other-secret": _callback(state_id, token=logic.callback_token(state_id, 3, "guess")),
        "v1-token": _callback(state_id, token=v1.hexdigest()),  # the old format, no generation
        "bad-state-id": {"state_id": "'; DROP TABLE x", "callback_token": "x", "enriched": {}},
        "not-json": b"\xff{not json",
        "not-an-object": json.dumps([str(state_id)]).encode(),
        "lone-surrogate-token": _callback(state_id, token=good[:-1] + "\ud800"),
        "lone-surrogate-state-id": {**_callback(state_id), "state_id": str(state_id) + "\udc80"},
        "nested-100000-deep": b'{"state_id": ' + _nested(100_000) + b"}",
        "state-id-nested-100000-deep": {**_callback(state_id), "state_id": deep},
        "generation-past-bigint": _callback(state_id, token=f"v2.{2**63}." + good[-64:]),
    }
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(bodies[body], secret=SECRET, conn=conn)
    assert res.status == 401
    assert res.body == {"error": "unauthorized"}
    assert table_snapshot(conn) == before


def test_receiver_without_a_configured_secret_refuses_everything(conn, dispatched, monkeypatch):
    monkeypatch.delenv(logic.SECRET_ENV, raising=False)
    _item, state_id = dispatched
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(_callback(state_id), conn=conn)
    assert res.status == 503
    assert table_snapshot(conn) == before


def test_receiver_refuses_a_callback_for_another_step(conn, dispatched):
    _item, state_id = dispatched
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(
        _callback(state_id), secret=SECRET, expected_steps=(NEXT_STEP,), conn=conn
    )
    assert res.status == 409
    assert res.body["error"] == f"state belongs to step {CLAY_STEP}"
    assert table_snapshot(conn) == before


def _deep_dict(depth: int) -> dict:
    doc: dict = {}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


@pytest.mark.parametrize(
    ("enriched", "why"),
    [
        ([1], "must be a JSON object"),
        ("text", "must be a JSON object"),
        ({"employees": float("nan")}, "NaN or Infinity"),
        ({"employees": float("inf")}, "NaN or Infinity"),
        ({"name": "Acme\x00"}, "\\u0000"),
        ({"name\x00": "Acme"}, "\\u0000"),
        ({"name": "Acme\ud800"}, "lone surrogate"),
        ({"\udfff": 1}, "lone surrogate"),
        ({"n": 10**1000}, "too large"),
        ({1: "one"}, "not a string"),
        ({"when": object()}, "not JSON"),
        (_deep_dict(logic.MAX_ENRICHED_DEPTH), "nested deeper"),
        (_deep_dict(100_000), "nested deeper"),
    ],
)
def test_receiver_answers_400_to_a_proven_but_malformed_payload(conn, dispatched, enriched, why):
    _item, state_id = dispatched
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(
        _callback(state_id, enriched=enriched), secret=SECRET, conn=conn
    )
    assert res.status == 400
    assert why in res.body["error"]
    assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    "raw_enriched",
    [
        b'{"employees": NaN}',
        b'{"x": -Infinity}',
        b'{"x": 1e999}',
        b'{"name": "a\\u0000b"}',
        b'{"name": "\\ud800"}',
        b'{"n": ' + b"9" * 5000 + b"}",  # past what Python parses: still a proven callback
    ],
)
def test_receiver_answers_400_to_a_raw_body_postgresql_would_refuse(conn, dispatched, raw_enriched):
    """As Clay sends it: JSON text that Python parses but jsonb cannot store (was a 500)."""
    _item, state_id = dispatched
    head = json.dumps(_callback(state_id))[: -len(json.dumps({"employees": 120})) - 1]
    raw = head.encode() + raw_enriched + b"}"
    assert json.loads(raw, parse_int=len)["callback_token"]  # the test's body is what it says
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(raw, secret=SECRET, conn=conn)
    assert res.status == 400
    assert table_snapshot(conn) == before


def test_a_payload_just_inside_the_limits_is_stored(conn, dispatched):
    item_id, state_id = dispatched
    enriched = {"deep": _deep_dict(logic.MAX_ENRICHED_DEPTH - 2), "big": 10**800, "u": "\u00e9"}
    res = logic.handle_clay_callback(
        _callback(state_id, enriched=enriched), secret=SECRET, conn=conn
    )
    assert res.status == 200
    data = conn.execute("SELECT data FROM batch_items WHERE id = %s", (item_id,)).fetchone()[0]
    assert data["clay"][CLAY_STEP] == enriched


def _status(conn, state_id) -> str:
    return conn.execute("SELECT status FROM workflow_states WHERE id = %s", (state_id,)).fetchone()[
        0
    ]


def test_receiver_records_and_completes_once(conn, dispatched, monkeypatch):
    item_id, state_id = dispatched
    monkeypatch.setenv(logic.SECRET_ENV, SECRET)  # the Modal secret's way in
    raw = json.dumps(_callback(state_id, enriched={"employees": 120})).encode()
    res = logic.handle_clay_callback(raw, conn=conn)
    assert res.status == 200
    assert res.body == {
        "state_id": str(state_id),
        "completed": True,
        "dispatch_generation": GENERATION,
    }
    assert _status(conn, state_id) == "COMPLETED"
    data = conn.execute("SELECT data FROM batch_items WHERE id = %s", (item_id,)).fetchone()[0]
    assert data["clay"][CLAY_STEP] == {"employees": 120}
    nxt = conn.execute(
        "SELECT status FROM workflow_states WHERE item_id = %s AND step_name = %s",
        (item_id, NEXT_STEP),
    ).fetchone()
    assert nxt == ("PENDING",)

    # Clay retries the same callback, or sends another payload: 409, nothing changes.
    before = table_snapshot(conn)
    again = logic.handle_clay_callback(raw, conn=conn)
    assert (again.status, again.body["completed"], again.body["status"]) == (
        409,
        False,
        "COMPLETED",
    )
    other = logic.handle_clay_callback(
        _callback(state_id, enriched={"employees": 1}), secret=SECRET, conn=conn
    )
    assert other.status == 409
    assert table_snapshot(conn) == before


def test_a_fast_callback_completes_a_state_still_dispatching(conn, dispatched):
    """Clay may answer before the pass has recorded DISPATCHED."""
    _item, state_id = dispatched
    conn.execute("UPDATE workflow_states SET status = 'DISPATCHING' WHERE id = %s", (state_id,))
    res = logic.handle_clay_callback(_callback(state_id), secret=SECRET, conn=conn)
    assert res.status == 200
    assert _status(conn, state_id) == "COMPLETED"


@pytest.mark.parametrize("status", ["PENDING", "BLOCKED", "FAILED", "COMPLETED", "CANCELLED"])
def test_a_valid_token_for_a_state_not_waiting_is_409(conn, dispatched, status):
    _item, state_id = dispatched
    conn.execute("UPDATE workflow_states SET status = %s WHERE id = %s", (status, state_id))
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(_callback(state_id), secret=SECRET, conn=conn)
    assert res.status == 409
    assert res.body["status"] == status
    assert "not waiting" in res.body["error"]
    assert table_snapshot(conn) == before


@pytest.mark.parametrize("generation", [0, GENERATION - 1, GENERATION + 1])
def test_a_valid_token_for_another_generation_is_409(conn, dispatched, generation):
    _item, state_id = dispatched
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(
        _callback(state_id, generation=generation), secret=SECRET, conn=conn
    )
    assert res.status == 409
    assert f"generation {generation}" in res.body["error"]
    assert table_snapshot(conn) == before


def test_a_callback_replayed_after_retry_completes_nothing(cli, conn, dispatched):
    """The callback of a generation that timed out, replayed after `wsctl retry` and after
    the next claim: 409 each time; only the new generation's callback completes."""
    _item, state_id = dispatched
    conn.execute(
        "UPDATE workflow_states SET status = 'FAILED', last_error = 'no completion within the"
        " callback timeout' WHERE id = %s",
        (state_id,),
    )
    batch = conn.execute("SELECT batch_id FROM workflow_states WHERE id = %s", (state_id,))
    res = cli("retry", "--batch", str(batch.fetchone()[0]))
    assert res.code == 0, res.err
    assert _status(conn, state_id) == "PENDING"
    late = _callback(state_id)  # the first generation's token
    before = table_snapshot(conn)
    assert logic.handle_clay_callback(late, secret=SECRET, conn=conn).status == 409
    assert table_snapshot(conn) == before

    new_generation = claim(conn, state_id)
    assert new_generation == GENERATION + 1
    before = table_snapshot(conn)
    refused = logic.handle_clay_callback(late, secret=SECRET, conn=conn)
    assert refused.status == 409
    assert f"generation {GENERATION}, the state is at {new_generation}" in refused.body["error"]
    assert table_snapshot(conn) == before
    fresh = _callback(state_id, generation=new_generation)
    assert logic.handle_clay_callback(fresh, secret=SECRET, conn=conn).status == 200
    assert _status(conn, state_id) == "COMPLETED"


def test_a_claim_committed_while_the_callback_waits_for_the_row_fences_it(conn, db_url, dispatched):
    """No check-then-act: the callback's fence waits for the claim's row lock, then re-checks
    the newest row version and finds another generation."""
    item_id, state_id = dispatched
    results: list = []
    with psycopg.connect(db_url) as claimer:  # a transaction: holds the row lock until commit
        claimer.execute(
            "UPDATE workflow_states SET dispatch_generation = dispatch_generation + 1,"
            " status = 'DISPATCHING' WHERE id = %s",
            (state_id,),
        )
        with psycopg.connect(db_url, autocommit=True) as receiver_conn:
            t = threading.Thread(
                target=lambda: results.append(
                    logic.handle_clay_callback(
                        _callback(state_id), secret=SECRET, conn=receiver_conn
                    )
                )
            )
            t.start()
            _wait_for_lock_wait(conn, db_url)
            claimer.commit()
            t.join(10)
    assert [r.status for r in results] == [409]
    assert _status(conn, state_id) == "DISPATCHING"
    data = conn.execute("SELECT data FROM batch_items WHERE id = %s", (item_id,)).fetchone()[0]
    assert "clay" not in data


def _wait_for_lock_wait(conn, db_url, timeout: float = 10.0) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (dbname,),
        ).fetchone()[0]
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError("the callback never waited for the row lock")


def test_concurrent_deliveries_of_one_callback_complete_it_once(conn, db_url, dispatched):
    item_id, state_id = dispatched
    n = 6
    barrier = threading.Barrier(n)
    statuses: list[int] = []

    def deliver(i: int) -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            body = _callback(state_id, enriched={"delivery": i})
            statuses.append(logic.handle_clay_callback(body, secret=SECRET, conn=c).status)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(statuses) == [200] + [409] * (n - 1)
    nxt = conn.execute(
        "SELECT count(*) FROM workflow_states WHERE item_id = %s AND step_name = %s",
        (item_id, NEXT_STEP),
    ).fetchone()[0]
    assert nxt == 1


def test_receiver_unknown_state_with_a_valid_token_is_404(conn):
    ghost = uuid.uuid4()
    before = table_snapshot(conn)
    res = logic.handle_clay_callback(_callback(ghost), secret=SECRET, conn=conn)
    assert res.status == 404
    assert table_snapshot(conn) == before


def test_receiver_without_its_database_answers_503(dispatched, monkeypatch):
    """A database that cannot be reached is a 503 (Clay retries it later), not a 500."""
    _item, state_id = dispatched
    monkeypatch.setenv("WSCTL_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    res = logic.handle_clay_callback(_callback(state_id), secret=SECRET)
    assert res.status == 503


def test_receiver_behind_a_held_lock_answers_503_and_writes_nothing(
    conn, db_url, dispatched, monkeypatch
):
    """The fence waits for the row at most its lock timeout, then Clay is told to retry."""
    item_id, state_id = dispatched
    monkeypatch.setattr(logic, "CALLBACK_LOCK_TIMEOUT", "200ms")
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM workflow_states WHERE id = %s FOR UPDATE", (state_id,))
        with psycopg.connect(db_url, autocommit=True) as c:
            started = time.monotonic()
            res = logic.handle_clay_callback(_callback(state_id), secret=SECRET, conn=c)
            elapsed = time.monotonic() - started
        holder.rollback()
    assert res.status == 503
    assert 0.15 < elapsed < 2.0
    assert _status(conn, state_id) == "DISPATCHED"
    data = conn.execute("SELECT data FROM batch_items WHERE id = %s", (item_id,)).fetchone()[0]
    assert "clay" not in data
