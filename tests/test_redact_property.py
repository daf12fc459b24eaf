"""No command prints a secret: configs with secrets in every shape, nested, quoted in errors.

A hypothesis property over real PostgreSQL and the real CLI: each example
stores configs holding distinctive secrets in every shape issue 12 lists
(quoted user info, a URL inside a query parameter, header lists and header
lines, a bot token in a URL path, JSON inside a string, argument lists, a
plain secret key, a secret reference resolved from the environment), nested
at a random depth. A local-backend app (tests/fixtures/secret_app.py) fails
with exception and PostgreSQL error texts quoting them. Every command that
shows configs, states or errors then runs, human and --json, and no output
may contain any secret. ``config show --reveal`` and the app's own record of
what it raised prove the secrets were really there to leak.
"""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES
from tests.support import factories as f

STEPS = ["normalize_all_core_values", "enrich_company_via_waterfall_in_clay"]
WS = "apollo_scrape"
APP = str(FIXTURES / "secret_app.py")

# Distinctive, and never a number (PostgreSQL must refuse it as an integer).
secrets = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=14, max_size=30).map(
    lambda t: f"Z{t}"
)


def _shapes(s: list[str], ref_name: str) -> dict:
    """One config with a secret in each shape (``s`` holds ten distinct secrets)."""
    return {
        "api_key": s[0],
        "callback": f"https://user:pa'{s[1]}@api.example.com/v1",
        "redirect": f"https://app.example.com/cb?next=https://u:{s[2]}@internal/x&page=2",
        "headers": [{"name": "X-Api-Key", "value": s[3]}, {"name": "Accept", "value": "json"}],
        "header_lines": [f"X-Api-Key: {s[4]}", "Accept: application/json"],
        "notify": f"https://api.telegram.org/bot123456789:{s[5]}/sendMessage",
        "payload": json.dumps({"client_secret": s[6], "table": "companies"}),
        "argv": ["run", "--token", s[7], "--verbose"],
        "hook": f"https://api.clay.com/v3/sources/webhook/{s[8]}",
        "clay_auth": {"$secret": ref_name},  # s[9], from the function's environment
        "table": "companies",
    }


def _nest(doc: dict, depth: int) -> dict:
    """The shapes at the top (the app reads them there) and again ``depth`` levels down."""
    inner: object = {k: v for k, v in doc.items() if k != "clay_auth"}
    for i in range(depth):
        inner = {"level": i, "nested": inner} if i % 2 == 0 else [inner, {"n": i}]
    return {**doc, "deep": inner}


@pytest.fixture
def world(conn):
    f.register_seed(conn)
    return conn


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(s=st.lists(secrets, min_size=10, max_size=10, unique=True), depth=st.integers(0, 3))
def test_no_command_prints_a_secret(cli, world, tmp_path, monkeypatch, s, depth):
    conn = world
    ref_name = f"CLAY_AUTH_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(ref_name, s[9])
    raised = tmp_path / f"raised-{uuid.uuid4().hex}.jsonl"
    monkeypatch.setenv("WSCTL_TEST_RAISED", str(raised))
    client = f"client-{uuid.uuid4().hex[:8]}"
    assert cli("client", "add", client).code == 0
    doc = _nest(_shapes(s, ref_name), depth)
    cfg = tmp_path / f"{client}.json"
    cfg.write_text(json.dumps(doc))

    outputs: list[tuple[str, str, str]] = []

    def run(*args: str):
        r = cli(*args)
        assert "Traceback" not in r.err, r.err
        outputs.append((" ".join(args), r.out, r.err))
        return r

    for step in STEPS:
        set_ = run(
            "config", "set", "--client", client, "--step", step, "--workstream", WS,
            "--file", str(cfg),
        )  # fmt: skip
        assert set_.code == 0, set_.err
        assert "look like credentials given in clear" in set_.err
        run(
            "config", "set", "--client", client, "--step", step, "--workstream", WS,
            "--file", str(cfg), "--json",
        )  # fmt: skip
    client_id = conn.execute("SELECT id FROM clients WHERE name = %s", (client,)).fetchone()[0]
    b1 = f.add_batch(conn, client_id, STEPS, 1, workstream=WS)
    b2 = f.add_batch(conn, client_id, STEPS[1:], 1, workstream=WS)
    items = [
        str(r[0])
        for r in conn.execute(
            "SELECT id FROM batch_items WHERE batch_id = ANY(%s)", ([b1, b2],)
        ).fetchall()
    ]

    for fmt in ([], ["--json"]):
        run("config", "list", "--client", client, *fmt)
        run("config", "show", "--client", client, "--step", STEPS[0], "--workstream", WS, *fmt)
        run("dispatch", "--dry-run", "--backend", "local", "--app", APP, *fmt)
    r = run("dispatch", "--once", "--backend", "local", "--app", APP)
    assert "ValueError" in r.out and "InvalidTextRepresentation" in r.out, r.out
    run("dispatch", "--once", "--backend", "local", "--app", APP, "--json")
    for fmt in ([], ["--json"]):
        for item in items:
            run("item", "show", item, *fmt)
        run("batch", "status", str(b1), *fmt)
        run("doctor", "--backend", "local", *fmt)

    # The secrets were there to leak: in the stored config, and in what the app raised.
    shown = cli("config", "show", "--client", client, "--step", STEPS[0], "--workstream", WS,
                "--reveal", "--json").out  # fmt: skip
    for secret in s[:9]:
        assert secret in shown
    assert ref_name in shown and s[9] not in shown  # a reference is shown, never resolved
    raised_text = raised.read_text()
    assert "invalid input syntax for type integer" in raised_text
    for secret in s:
        assert secret in raised_text, secret

    for command, out, err in outputs:
        for secret in s:
            assert secret not in out + err, (command, secret, out, err)
        if "--json" in command:
            json.loads(out)  # redaction keeps --json documents valid
