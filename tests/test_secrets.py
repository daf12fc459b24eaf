"""Secrets by reference: stored and shown as names, resolved only inside the function."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from tests.conftest import FIXTURES, table_snapshot
from tests.support import factories as f
from wsctl import db, settings, worker
from wsctl.errors import OperationalError
from wsctl.secret_refs import (
    MissingSecret,
    as_names,
    check_references,
    plaintext_credentials,
    references,
    resolve,
)
from wsctl.states import ErrorClass

STEP = "normalize_all_core_values"
WS = "apollo_scrape"
APP = str(FIXTURES / "secret_app.py")
VALUE = "ZQ7rT2vX9kLm4NpW"  # what the environment holds


def _ref(name: str) -> dict:
    return {"$secret": name}


# --- the library (no database) ----------------------------------------------


def test_references_resolve_and_render_as_names():
    doc = {"auth": _ref("CLAY_AUTH_ACME"), "hooks": [{"url": _ref("HOOK_1")}], "table": "x"}
    assert references(doc) == [("auth", "CLAY_AUTH_ACME"), ("hooks[0].url", "HOOK_1")]
    env = {"CLAY_AUTH_ACME": VALUE, "HOOK_1": "https://hook.example.com/abc"}
    assert resolve(doc, env) == {
        "auth": VALUE,
        "hooks": [{"url": "https://hook.example.com/abc"}],
        "table": "x",
    }
    assert doc["auth"] == _ref("CLAY_AUTH_ACME")  # the stored document is untouched
    # What the dispatcher may evaluate (a limit key from config fields): names only.
    assert as_names(doc) == {
        "auth": "$secret:CLAY_AUTH_ACME",
        "hooks": [{"url": "$secret:HOOK_1"}],
        "table": "x",
    }
    assert VALUE not in json.dumps(as_names(doc))
    assert resolve({"plain": 1}, {}) == {"plain": 1}


def test_a_missing_secret_is_a_permanent_clearly_worded_failure():
    doc = {"auth": _ref("CLAY_AUTH_ACME"), "n": [_ref("OTHER")], "ok": _ref("SET")}
    with pytest.raises(MissingSecret) as info:
        resolve(doc, {"SET": "x", "OTHER": ""}, where="the config of acme")
    exc = info.value
    assert exc.names == ["CLAY_AUTH_ACME", "OTHER"]
    assert exc.error_class == ErrorClass.OPERATOR  # BLOCKED until an operator adds it
    assert isinstance(exc, OperationalError) and exc.exit_code == 1
    line = exc.one_line()
    assert "the config of acme references secret(s) not set in this function's environment" in line
    assert "CLAY_AUTH_ACME (key auth)" in line and "OTHER (key n[0])" in line
    assert "wsctl retry" in line
    import pickle  # Modal sends a function's exception back pickled

    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is MissingSecret and again.one_line() == line


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"a": {"$secret": 5}}, "key a: secret name 5 must be an environment variable name"),
        ({"a": {"$secret": "has space"}}, "secret name 'has space' must be"),
        ({"a": [{"$secret": "1ABC"}]}, "key a[0]: secret name '1ABC'"),
        ({"a": {"$secret": "X", "b": 1}}, 'a secret reference is {"$secret": "NAME"} and nothing'),
    ],
)
def test_malformed_references_are_refused_naming_the_key(doc, message):
    with pytest.raises(OperationalError) as info:
        check_references(doc, "cfg.json")
    assert info.value.one_line().startswith("cfg.json: ") and message in info.value.one_line()


def test_plaintext_credentials_are_what_redaction_masks():
    doc = {
        "api_key": "sk-abc",
        "auth": _ref("A"),
        "headers": [{"name": "X-Api-Key", "value": "v123456"}],
        "argv": ["--token", "t123456"],
        "url": "https://u:pw@example.com/x",
        "plain": "https://example.com/x",
        "flag": True,
        "empty_token": "",
        "dedupe_key": "email",  # hidden by config show, not a credential to warn about
        "webhook_url": "https://example.com/x",
    }
    assert plaintext_credentials(doc) == [
        "api_key",
        "headers[0].value",
        "argv[1]",
        "url",
        "webhook_url",
    ]
    assert plaintext_credentials({"auth": _ref("A"), "token": {"$secret": "B"}}) == []


# --- the worker helpers and the dispatcher (real PostgreSQL) -----------------


@pytest.fixture
def wconn(db_url):
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="test")) as c:
        yield c


def _item(conn, config: dict, steps=(STEP,)) -> tuple[uuid.UUID, uuid.UUID]:
    f.register_seed(conn)
    client = f.add_client(conn, f"acme-{uuid.uuid4().hex[:6]}")
    f.add_config(conn, client, steps[0], WS, config)
    batch = f.add_batch(conn, client, list(steps), 1, workstream=WS)
    item = conn.execute("SELECT id FROM batch_items WHERE batch_id = %s", (batch,)).fetchone()[0]
    return item, batch


def test_worker_resolves_references_from_its_environment(wconn, monkeypatch, caplog):
    item, _ = _item(wconn, {"clay_auth": _ref("CLAY_AUTH_T1"), "table": "companies"})
    monkeypatch.setenv("CLAY_AUTH_T1", VALUE)
    config = worker.get_client_config(str(item), STEP, WS, conn=wconn)
    assert config == {"clay_auth": VALUE, "table": "companies"}
    stored = wconn.execute("SELECT config FROM client_workflow_configs").fetchone()[0]
    assert stored == {"clay_auth": _ref("CLAY_AUTH_T1"), "table": "companies"}

    monkeypatch.delenv("CLAY_AUTH_T1")
    with pytest.raises(MissingSecret, match="CLAY_AUTH_T1 \\(key clay_auth\\)"):
        worker.get_client_config(str(item), STEP, WS, conn=wconn)


def test_worker_log_lines_are_redacted(caplog):
    caplog.set_level(logging.INFO, logger="wsctl.worker")
    worker.log.info("calling %s with %s", "https://u:PWSECRET1@h/x", "Authorization: Bearer TOK1")
    text = caplog.text
    assert "PWSECRET1" not in text and "TOK1" not in text and "https://u:***@h/x" in text


def test_dispatch_blocks_a_state_whose_secret_is_missing(cli, conn, monkeypatch):
    item, batch = _item(conn, {"hook": _ref("CLAY_HOOK_MISSING_T2")})
    r = cli("dispatch", "--once", "--backend", "local", "--app", APP, "--json")
    assert r.code == 1, r.err
    doc = r.json()
    assert doc["blocked"] == 1 and doc["retried"] == 0
    (error,) = doc["errors"]
    assert "CLAY_HOOK_MISSING_T2 (key hook)" in error["reason"]
    assert "not set in this function's environment" in error["reason"]
    status, last_error = conn.execute(
        "SELECT status, last_error FROM workflow_states WHERE item_id = %s", (item,)
    ).fetchone()
    assert status == "BLOCKED" and "CLAY_HOOK_MISSING_T2" in last_error
    # Once the secret is there, retry runs the function, which now gets the value
    # (and then fails as the test app always does, quoting it: masked).
    monkeypatch.setenv("CLAY_HOOK_MISSING_T2", "https://hooks.example.com/T2HOOKVALUE")
    assert cli("retry", "--batch", str(batch)).code == 0
    again = cli("dispatch", "--once", "--backend", "local", "--app", APP, "--json")
    (error,) = again.json()["errors"]
    assert error["reason"].startswith("ValueError: not an http(s) URL: ")
    assert "T2HOOKVALUE" not in again.out + again.err


def test_config_show_shows_the_reference_never_the_value(cli, conn, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAY_AUTH_T3", VALUE)
    f.add_client(conn, "acme")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"clay_auth": _ref("CLAY_AUTH_T3"), "table": "companies"}))
    r = cli("config", "set", "--client", "acme", "--step", STEP, "--workstream", WS, "--new-workstream",
            "--file", str(path))  # fmt: skip
    assert r.code == 0 and "in clear" not in r.err  # a reference is not a plaintext credential
    for args in (["--json"], ["--json", "--reveal"], []):
        shown = cli("config", "show", "--client", "acme", "--step", STEP, "--workstream", WS,
                    *args)  # fmt: skip
        assert shown.code == 0, shown.err
        assert "CLAY_AUTH_T3" in shown.out and VALUE not in shown.out + shown.err
    doc = cli("config", "list", "--json").json()
    assert doc[0]["config"]["clay_auth"] == _ref("CLAY_AUTH_T3")


def test_config_set_warns_on_plaintext_credentials(cli, conn):
    f.add_client(conn, "acme")
    r = cli("config", "set", "--client", "acme", "--step", STEP, "--workstream", WS, "--new-workstream",
            "--set", "api_key=sk-live-T4SECRET", "--set", "table=companies", "--json")  # fmt: skip
    assert r.code == 0, r.err
    (warning,) = [w for w in r.json()["warnings"] if "in clear" in w]
    assert "1 value(s) look like credentials given in clear (api_key)" in warning
    assert '{"$secret": "NAME"}' in warning and "T4SECRET" not in r.out + r.err
    human = cli("config", "set", "--client", "acme", "--step", STEP, "--workstream", WS, "--new-workstream",
                "--set", 'api_key={"$secret": "ACME_KEY"}')  # fmt: skip
    assert human.code == 0 and "in clear" not in human.err


def test_doctor_warns_with_the_count_of_plaintext_credentials(cli, conn):
    client = f.add_client(conn, "acme")
    f.add_config(conn, client, STEP, WS, {"api_key": "sk-1", "auth": _ref("A")})
    f.add_config(
        conn, client, "enrich_company_via_waterfall_in_clay", WS,
        {"headers": [{"name": "X-Api-Key", "value": "k-T5SECRET"}], "token": "t-T5SECRET"},
    )  # fmt: skip
    r = cli("doctor", "--backend", "local", "--json")
    check = next(c for c in r.json()["checks"] if c["name"] == "plaintext_credentials")
    assert check["status"] == "WARN"
    assert check["detail"].startswith("3 plaintext credential(s) in 2 of 2 client config(s)")
    assert '{"$secret": "NAME"}' in check["hint"]
    assert {tuple(sorted(row["keys"])) for row in check["rows"]} == {
        ("api_key",),
        ("headers[0].value", "token"),
    }
    assert "T5SECRET" not in r.out + r.err
    conn.execute("UPDATE client_workflow_configs SET config = %s", ('{"auth": {"$secret": "A"}}',))
    r = cli("doctor", "--backend", "local", "--json")
    check = next(c for c in r.json()["checks"] if c["name"] == "plaintext_credentials")
    assert check["status"] == "OK" and "2 client config(s)" in check["detail"]


# --- text that is not valid UTF-8 --------------------------------------------


def test_a_lone_surrogate_in_a_config_names_the_file_and_key(cli, conn, tmp_path):
    f.add_client(conn, "acme")
    before = table_snapshot(conn)
    bad_value = tmp_path / "value.json"
    bad_value.write_text('{"outer": {"name": "Caf\\udce9"}}')
    bad_key = tmp_path / "key.json"
    bad_key.write_text('{"Caf\\udce9": 1}')
    for path, where in ((bad_value, "key outer.name"), (bad_key, "key Caf\\udce9")):
        r = cli("config", "set", "--client", "acme", "--step", STEP, "--workstream", WS, "--new-workstream", "--new-workstream",
                "--file", str(path))  # fmt: skip
        assert r.code == 1, r.err
        (line,) = r.err.strip().splitlines()
        assert line.startswith(f"wsctl: error: {path}: {where}: ")
        assert "lone surrogate (\\udce9)" in line and "database error" not in line
    assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    "args, what",
    [
        (["batch", "list", "--client", "Caf\udce9"], "the value of --client"),
        (["config", "list", "--client", "Caf\udce9"], "the value of --client"),
        (["config", "show", "--step", STEP, "--client", "Caf\udce9"], "the value of --client"),
        (
            [
                "batch",
                "create",
                "--client",
                "Caf\udce9",
                "--workstream",
                WS,
                "--blueprint",
                STEP,
                "--items",
                "x.csv",
            ],
            "the value of --client",
        ),  # fmt: skip
        (
            [
                "batch",
                "create",
                "--client",
                "acme",
                "--workstream",
                WS,
                "--blueprint",
                STEP,
                "--items",
                "caf\udce9.csv",
            ],
            "the value of --items",
        ),  # fmt: skip
        (["batch", "list", "--client=Caf\udce9"], "the value of --client"),
        (["item", "show", "Caf\udce9"], "argument 5"),  # after --database-url URL
    ],
)
def test_arguments_that_are_not_utf8_are_a_one_line_usage_error(cli, conn, args, what):
    before = table_snapshot(conn)
    r = cli(*args)
    assert r.code == 2
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"wsctl: error: {what} is not valid UTF-8: ")
    assert "\\xe9" in line and "Traceback" not in r.err and r.out == ""
    assert table_snapshot(conn) == before


def test_the_example_config_holds_references_only():
    from wsctl.catalog import load_config_file
    from wsctl.queries import example_path

    doc = load_config_file(example_path("acme-apollo-clay.json"))
    assert plaintext_credentials(doc) == []
    assert [name for _, name in references(doc)] == [
        "CLAY_WEBHOOK_ACME_APOLLO_COMPANIES",
        "CLAY_AUTH_ACME",
    ]


def test_the_demo_configs_hold_references_only():
    from wsctl import demo

    configs = demo.demo_configs("http://127.0.0.1:1", "http://127.0.0.1:2")
    values = demo.demo_secrets("http://127.0.0.1:1")
    for config in configs.values():
        assert plaintext_credentials(config) == []
        resolve(config, values)  # every reference has its value in the demo's "Modal secret"
    assert any(references(c) for c in configs.values())
