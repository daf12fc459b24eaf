"""`wsctl client`, `wsctl registry` and `wsctl config` end to end against real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest

from tests.conftest import table_snapshot
from tests.test_resolve import (
    APOLLO,
    APOLLO_CFG,
    ENRICH,
    LINKEDIN,
    LINKEDIN_CFG,
    NORMALIZE,
    add_config,
    add_item,
    add_state,
    seed_world,
)
from wsctl.queries import example_path

HOSTILE = "acme'; DROP TABLE batches; --"
SECRET = "sk-live-SUPERSECRET123"
HOOK = "https://api.clay.com/v3/sources/webhook/HOOKSECRET456"


def assert_refused(r, code: int = 1, text: str | None = None):
    assert r.code == code, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsctl: error: "), r.err
    assert "Traceback" not in r.err + r.out
    if text:
        assert text in lines[0]


@pytest.fixture
def world(conn):
    return seed_world(conn)


# --- client -----------------------------------------------------------------


def test_client_add_prints_the_id_and_is_idempotent(cli, conn):
    r = cli("client", "add", "Acme Corp")
    assert r.code == 0, r.err
    cid = uuid.UUID(r.out.strip())
    assert conn.execute("SELECT name FROM clients WHERE id = %s", (cid,)).fetchone() == (
        "Acme Corp",
    )
    again = cli("client", "add", "Acme Corp", "--json")
    assert again.code == 0
    doc = again.json()
    assert doc["id"] == str(cid) and doc["name"] == "Acme Corp" and doc["created"] is False
    assert set(doc) == {"id", "name", "created_at", "created"}
    assert conn.execute("SELECT count(*) FROM clients").fetchone() == (1,)


@pytest.mark.parametrize("name", [HOSTILE, "", "   ", "-acme", "a\nb", "x" * 201])
def test_client_add_refuses_bad_names(cli, conn, name):
    before = table_snapshot(conn)
    assert_refused(cli("client", "add", "--", name), 1, "invalid client name")
    assert table_snapshot(conn) == before


def test_client_list(cli, conn, world):
    add_item(conn, world["acme"], [NORMALIZE], APOLLO)
    r = cli("client", "list", "--json")
    assert r.code == 0
    doc = {c["name"]: c for c in r.json()}
    assert set(doc) == {"acme", "beta"}
    assert doc["acme"]["configs"] == 2 and doc["acme"]["batches"] == 1
    assert set(doc["acme"]) == {"id", "name", "created_at", "configs", "batches"}
    text = cli("client", "list")
    assert text.code == 0
    lines = text.out.splitlines()
    assert lines[0].split("\t") == ["id", "name", "configs", "batches", "created_at"]
    assert lines[1].split("\t")[1:4] == ["acme", "2", "1"]


# --- registry ---------------------------------------------------------------


def test_registry_add_and_upsert(cli, conn):
    r = cli(
        "registry", "add", "--step", ENRICH, "--workstream", APOLLO, "--type", "async",
        "--sender", "start_enrich", "--receiver", "receive_enrich",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert r.out.strip() == f"registered {ENRICH} in {APOLLO}: async start_enrich -> receive_enrich"
    r = cli(
        "registry", "add", "--step", ENRICH, "--workstream", APOLLO, "--type", "sync",
        "--sender", "run_enrich", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["created"] is False
    assert (doc["step"], doc["workstream"], doc["type"], doc["sender"], doc["receiver"]) == (
        ENRICH, APOLLO, "sync", "run_enrich", None,
    )  # fmt: skip
    rows = conn.execute(
        "SELECT type, modal_sender_fn, modal_receiver_fn FROM enrichment_registry"
    ).fetchall()
    assert rows == [("sync", "run_enrich", None)]


@pytest.mark.parametrize(
    "args, text",
    [
        (["--step", HOSTILE, "--workstream", APOLLO, "--type", "sync", "--sender", "f"], "invalid step slug"),
        (["--step", ENRICH, "--workstream", HOSTILE, "--type", "sync", "--sender", "f"], "invalid workstream slug"),
        (["--step", ENRICH, "--workstream", APOLLO, "--type", "sync", "--sender", HOSTILE], "invalid sender"),
        (["--step", ENRICH, "--workstream", APOLLO, "--type", "async", "--sender", "f"], "needs a receiver"),
        (["--step", ENRICH, "--workstream", APOLLO, "--type", "sync", "--sender", "f", "--receiver", "g"], "drop --receiver"),
    ],
)  # fmt: skip
def test_registry_add_refuses_bad_input(cli, conn, world, args, text):
    before = table_snapshot(conn)
    assert_refused(cli("registry", "add", *args), 1, text)
    assert table_snapshot(conn) == before


def test_registry_add_type_is_a_choice(cli, conn, world):
    """--type takes sync or async, shown in help; anything else is a usage error (exit 2)
    and nothing is written."""
    assert "--type [sync|async]" in cli("registry", "add", "--help").out
    before = table_snapshot(conn)
    args = ["--step", ENRICH, "--workstream", APOLLO, "--type", "batch", "--sender", "f"]
    assert_refused(cli("registry", "add", *args), 2, "'batch' is not one of 'sync', 'async'")
    assert table_snapshot(conn) == before


def test_registry_list(cli, world):
    r = cli("registry", "list", "--json")
    assert r.code == 0
    rows = r.json()
    assert len(rows) == 13
    assert {"step", "workstream", "type", "sender", "receiver"} <= set(rows[0])
    r = cli("registry", "list", "--workstream", LINKEDIN, "--json")
    rows = r.json()
    assert len(rows) == 6 and {x["workstream"] for x in rows} == {LINKEDIN}
    text = cli("registry", "list", "--workstream", APOLLO)
    lines = text.out.splitlines()
    assert lines[0].split("\t") == [
        "step",
        "workstream",
        "type",
        "sender",
        "receiver",
        "limit_keys",
    ]
    enrich = next(ln for ln in lines if ln.startswith(ENRICH))
    assert enrich.split("\t") == [
        ENRICH, APOLLO, "async", "start_enrich_company_via_waterfall_in_clay",
        "receive_enrich_company_via_waterfall_in_clay", "clay:{config.clay_workspace}",
    ]  # fmt: skip
    assert_refused(cli("registry", "list", "--workstream", HOSTILE), 1, "invalid workstream slug")


def test_registry_remove_refused_while_states_need_it(cli, conn, world):
    batch, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    state = add_state(conn, item, batch, ENRICH, "PENDING")
    before = table_snapshot(conn)
    args = ("registry", "remove", "--step", ENRICH, "--workstream", APOLLO)
    assert_refused(cli(*args), 1, "1 pending or dispatched state(s)")
    conn.execute("UPDATE workflow_states SET status = 'DISPATCHED' WHERE id = %s", (state,))
    before = table_snapshot(conn)
    assert_refused(cli(*args), 1, "still need this registry row")
    assert table_snapshot(conn) == before
    # the same step in the other workstream is not needed by that state
    r = cli("registry", "remove", "--step", ENRICH, "--workstream", LINKEDIN, "--json")
    assert r.code == 0, r.err
    assert r.json()["removed"] is True and r.json()["needed_by"] == 0
    # --force removes it anyway and says how many states needed it
    r = cli(*args, "--force")
    assert r.code == 0, r.err
    assert "1 pending or dispatched state(s) needed this row" in r.err
    assert conn.execute(
        "SELECT count(*) FROM enrichment_registry WHERE slug = %s", (ENRICH,)
    ).fetchone() == (0,)


def test_registry_remove_refused_while_blocked_states_or_unreached_batches_need_it(
    cli, conn, world
):
    args = ("registry", "remove", "--step", ENRICH, "--workstream", APOLLO)
    batch, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    blocked = add_state(conn, item, batch, ENRICH, "BLOCKED")
    before = table_snapshot(conn)
    assert_refused(cli(*args), 1, "1 BLOCKED state(s) of")
    assert table_snapshot(conn) == before
    # An active batch whose items are still at the earlier step reaches ENRICH later.
    conn.execute("DELETE FROM workflow_states WHERE id = %s", (blocked,))
    add_state(conn, item, batch, NORMALIZE, "PENDING")
    before = table_snapshot(conn)
    assert_refused(cli(*args), 1, "1 active batch(es) that have not reached the step")
    assert table_snapshot(conn) == before
    r = cli(*args, "--force", "--json")
    assert r.code == 0, r.err
    assert (r.json()["batches_to_reach"], r.json()["needed_by"]) == (1, 0)


def test_registry_remove_allowed_when_states_are_done(cli, conn, world):
    batch, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    add_state(conn, item, batch, ENRICH, "COMPLETED")
    r = cli("registry", "remove", "--step", ENRICH, "--workstream", APOLLO)
    assert r.code == 0 and r.out.strip() == f"removed {ENRICH} from {APOLLO}"


def test_registry_remove_unknown_row_and_hostile_input(cli, conn, world):
    before = table_snapshot(conn)
    assert_refused(
        cli("registry", "remove", "--step", "rank_lead", "--workstream", LINKEDIN),
        1,
        "is not registered in workstream linkedin_scrape",
    )
    assert_refused(
        cli("registry", "remove", "--step", HOSTILE, "--workstream", APOLLO),
        1,
        "invalid step slug",
    )
    assert table_snapshot(conn) == before


def test_registry_import_example_file(cli, conn):
    path = str(example_path("registry.toml"))
    r = cli("registry", "import", path, "--dry-run", "--json")
    assert r.code == 0 and r.json()["dry_run"] is True and len(r.json()["rows"]) == 12
    assert conn.execute("SELECT count(*) FROM enrichment_registry").fetchone() == (0,)
    r = cli("registry", "import", path, "--json")
    assert r.code == 0, r.err
    assert (r.json()["created"], r.json()["updated"]) == (12, 0)
    # Re-importing an unchanged file writes nothing and says so (it said "12 updated").
    before = table_snapshot(conn)
    r = cli("registry", "import", path)
    assert r.code == 0 and "0 new, 0 updated, 12 unchanged" in r.err
    assert table_snapshot(conn) == before
    conn.execute(
        "UPDATE enrichment_registry SET modal_sender_fn = 'old_fn' WHERE id = "
        "(SELECT id FROM enrichment_registry ORDER BY id LIMIT 1)"
    )
    r = cli("registry", "import", path, "--json")
    assert (r.json()["created"], r.json()["updated"], r.json()["unchanged"]) == (0, 1, 11)
    rows = conn.execute(
        "SELECT workstream_slug, count(*), count(*) FILTER (WHERE type = 'async'), "
        "count(modal_receiver_fn) FROM enrichment_registry GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [(APOLLO, 6, 2, 2), (LINKEDIN, 6, 2, 2)]


GOOD_ROW = '[[registry]]\nstep = "a"\nworkstream = "w"\ntype = "sync"\nsender = "run_a"\n'


@pytest.mark.parametrize(
    "text, error",
    [
        (GOOD_ROW + '[[registry]]\nstep = "b"\nworkstream = "w"\ntype = "async"\nsender = "s"\n', "row 2: b in w: an async step needs a receiver"),
        (GOOD_ROW + '[[registry]]\nstep = "B!"\nworkstream = "w"\ntype = "sync"\nsender = "s"\n', "row 2: invalid step slug"),
        (GOOD_ROW + '[[registry]]\nstep = "c"\nworkstream = "w"\ntype = "sync"\n', "row 2: missing sender"),
        (GOOD_ROW + '[[registry]]\nstep = "c"\nworkstream = "w"\ntype = "sync"\nsender = "s"\ncolour = "x"\n', "unknown key(s): colour"),
        (GOOD_ROW + GOOD_ROW, "already defined by row 1"),
        (GOOD_ROW + '[[registry]]\nstep = "c"\nworkstream = "w"\ntype = "batch"\nsender = "s"\n', "registry row 2: invalid type 'batch': use sync or async"),
        (GOOD_ROW + f'[[registry]]\nstep = "c"\nworkstream = "w"\ntype = "sync"\nsender = "{HOSTILE}"\n', "invalid sender"),
        (GOOD_ROW + '[[registry]]\nstep = "c"\nworkflow = "c"\nworkstream = "w"\ntype = "sync"\nsender = "s"\n', "row 2: give step or workflow (its old name), not both"),
        ('registry = "nope"', "expected one or more [[registry]] tables"),
        ("[[registry]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_registry_import_is_all_or_nothing(cli, conn, world, tmp_path, text, error):
    path = tmp_path / "reg.toml"
    path.write_text(text)
    before = table_snapshot(conn)
    assert_refused(cli("registry", "import", str(path)), 1, error)
    assert table_snapshot(conn) == before


def test_registry_import_missing_file(cli, conn):
    assert_refused(cli("registry", "import", "nope.toml"), 1, "no such file")


# --- config set / list / unset ------------------------------------------------


def test_config_set_from_files_and_merge(cli, conn, world, tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"api_key": SECRET, "threshold": 0.5}))
    base = ("config", "set", "--client", "acme", "--step", NORMALIZE, "--workstream", APOLLO)
    r = cli(*base, "--file", str(f))
    assert r.code == 0, r.err
    assert r.out.startswith(f"created config of acme for {NORMALIZE} in {APOLLO}")
    assert SECRET not in r.out and '"api_key": "***"' in r.out
    r = cli(*base, "--set", "threshold=0.8", "--set", "mode=strict", "--set", 'cols=["a","b"]',
            "--set", "enabled=true", "--json")  # fmt: skip
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["created"] is False and doc["config"]["api_key"] == "***"
    stored = conn.execute(
        "SELECT config FROM client_workflow_configs WHERE workflow_slug = %s AND workstream_slug = %s",
        (NORMALIZE, APOLLO),
    ).fetchone()[0]
    assert stored == {
        "api_key": SECRET,
        "threshold": 0.8,
        "mode": "strict",
        "cols": ["a", "b"],
        "enabled": True,
    }
    t = tmp_path / "c.toml"
    t.write_text('clay_table = "t"\n[mapping]\nname = "company"\n')
    r = cli(*base, "--file", str(t), "--reveal", "--json")
    assert r.code == 0 and r.json()["config"] == {"clay_table": "t", "mapping": {"name": "company"}}
    # by id, and the other workstream stays separate
    r = cli("config", "set", "--client", str(world["acme"]), "--step", NORMALIZE,
            "--workstream", LINKEDIN, "--set", "x=1")  # fmt: skip
    assert r.code == 0
    assert conn.execute(
        "SELECT count(*) FROM client_workflow_configs WHERE workflow_slug = %s", (NORMALIZE,)
    ).fetchone() == (2,)


def test_config_set_bumps_updated_at(cli, conn, world):
    conn.execute("UPDATE client_workflow_configs SET updated_at = now() - interval '1 day'")
    r = cli("config", "set", "--client", "acme", "--step", ENRICH, "--workstream", APOLLO,
            "--set", "x=1")  # fmt: skip
    assert r.code == 0
    fresh = conn.execute(
        "SELECT updated_at > now() - interval '1 hour' FROM client_workflow_configs "
        "WHERE workflow_slug = %s AND workstream_slug = %s AND client_id = %s",
        (ENRICH, APOLLO, world["acme"]),
    ).fetchone()
    assert fresh == (True,)


def test_config_set_warns_when_the_step_is_not_registered(cli, conn, world):
    r = cli("config", "set", "--client", "acme", "--step", "unregistered_step",
            "--workstream", APOLLO, "--set", "a=1")  # fmt: skip
    assert r.code == 0 and "is not registered in workstream apollo_scrape" in r.err


@pytest.mark.parametrize(
    "extra, code, text",
    [
        (["--client", HOSTILE, "--step", ENRICH, "--workstream", APOLLO, "--set", "a=1"], 1, "no client named"),
        (["--client", "acme", "--step", HOSTILE, "--workstream", APOLLO, "--set", "a=1"], 1, "invalid step slug"),
        (["--client", "acme", "--step", ENRICH, "--workstream", HOSTILE, "--set", "a=1"], 1, "invalid workstream slug"),
        (["--client", "acme", "--step", ENRICH, "--workstream", APOLLO, "--set", "novalue"], 1, "expected key=value"),
        (["--client", "acme", "--step", ENRICH, "--workstream", APOLLO, "--set", "=1"], 1, "expected key=value"),
        (["--client", "acme", "--step", ENRICH, "--workstream", APOLLO], 2, "give either --file"),
        (["--client", "acme", "--step", ENRICH, "--workstream", APOLLO, "--file", "x.json", "--set", "a=1"], 2, "give either --file"),
        (["--client", "acme", "--step", ENRICH, "--workstream", APOLLO, "--file", "missing.json"], 1, "no such file"),
    ],
)  # fmt: skip
def test_config_set_refuses_bad_input(cli, conn, world, extra, code, text):
    before = table_snapshot(conn)
    assert_refused(cli("config", "set", *extra), code, text)
    assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    "name, content, text",
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("list.json", "[1, 2]", "must be a JSON object"),
        ("bad.toml", "a = ", "not valid TOML"),
        ("c.yaml", "a: 1", "expected a .json or .toml file"),
    ],
)
def test_config_set_refuses_bad_files(cli, conn, world, tmp_path, name, content, text):
    (tmp_path / name).write_text(content)
    before = table_snapshot(conn)
    r = cli("config", "set", "--client", "acme", "--step", ENRICH, "--workstream", APOLLO,
            "--file", str(tmp_path / name))  # fmt: skip
    assert_refused(r, 1, text)
    assert table_snapshot(conn) == before


def test_config_list_redacts_unless_reveal(cli, conn, world):
    add_config(
        conn,
        world["beta"],
        NORMALIZE,
        APOLLO,
        {"api_key": SECRET, "hook": HOOK + "?token=QUERYTOKEN7"},
    )
    r = cli("config", "list", "--json")
    assert r.code == 0
    rows = r.json()
    assert len(rows) == 4 and SECRET not in r.out and "HOOKSECRET456" not in r.out
    assert "QUERYTOKEN7" not in r.out  # (not "T1": a timestamp at 10:00 holds it)
    mine = next(x for x in rows if x["step"] == NORMALIZE)
    assert mine["config"] == {"api_key": "***", "hook": "***"}
    assert set(mine) >= {
        "id",
        "client",
        "client_id",
        "step",
        "workstream",
        "config",
        "updated_at",
    }
    text = cli("config", "list")
    assert text.code == 0 and SECRET not in text.out and "HOOKSECRET456" not in text.out
    assert "api.clay.com/hook/" not in text.out  # webhook_url values are hidden as a whole
    shown = cli("config", "list", "--reveal", "--json")
    assert SECRET in shown.out and "HOOKSECRET456" in shown.out
    assert SECRET in cli("config", "list", "--reveal").out
    filt = cli("config", "list", "--client", "acme", "--workstream", LINKEDIN, "--json").json()
    assert [(x["client"], x["step"], x["workstream"]) for x in filt] == [("acme", ENRICH, LINKEDIN)]
    assert_refused(cli("config", "list", "--client", HOSTILE), 1, "no client named")


def test_config_unset_keys_and_row(cli, conn, world):
    base = ("config", "unset", "--client", "acme", "--step", ENRICH, "--workstream", APOLLO)
    r = cli(*base, "--key", "clay_table", "--key", "nope", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["removed_keys"] == ["clay_table"] and doc["missing_keys"] == ["nope"]
    assert doc["deleted"] is False and doc["config"] == {"webhook_url": "***"}
    r = cli(*base)
    assert r.code == 0 and r.out.strip() == f"deleted config acme / {ENRICH} / {APOLLO}"
    left = conn.execute(
        "SELECT workstream_slug FROM client_workflow_configs WHERE client_id = %s", (world["acme"],)
    ).fetchall()
    assert left == [(LINKEDIN,)]
    before = table_snapshot(conn)
    assert_refused(cli(*base), 1, "has no config for")
    assert_refused(
        cli("config", "unset", "--client", HOSTILE, "--step", ENRICH, "--workstream", APOLLO),
        1,
        "no client named",
    )
    assert table_snapshot(conn) == before


# --- config show --------------------------------------------------------------


def test_config_show_found_by_item(cli, conn, world):
    _, item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], LINKEDIN)
    r = cli("config", "show", "--step", ENRICH, "--item", str(item), "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert list(doc)[:6] == ["status", "source", "workstream", "config", "candidates", "trace"]
    assert (doc["status"], doc["source"], doc["workstream"]) == ("found", "batch", LINKEDIN)
    assert doc["config"] == {"clay_table": "linkedin-companies", "webhook_url": "***"}
    assert [t["rule"] for t in doc["trace"]] == ["item", "b:batch"]
    assert doc["client"] == "acme" and doc["step"] == ENRICH and doc["config_id"]
    r = cli("config", "show", "--step", ENRICH, "--item", str(item))
    assert r.code == 0
    assert "status:     found" in r.out and "[b:batch] exact composite key" in r.out
    assert "row: client_workflow_configs(id=" in r.out
    assert '"clay_table": "linkedin-companies"' in r.out and "BBB" not in r.out
    shown = cli("config", "show", "--step", ENRICH, "--item", str(item), "--reveal")
    assert LINKEDIN_CFG["webhook_url"] in shown.out
    shown = cli("config", "show", "--step", ENRICH, "--item", str(item), "--reveal", "--json")
    assert shown.json()["config"] == LINKEDIN_CFG


def test_config_show_exit_codes_for_every_outcome(cli, conn, world):
    _, apollo_item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], APOLLO)
    _, legacy_item = add_item(conn, world["acme"], [NORMALIZE, ENRICH], None)
    _, beta_legacy = add_item(conn, world["beta"], [NORMALIZE, ENRICH], None)
    cases = [
        (["--client", "acme", "--workstream", APOLLO], 0, "found", "explicit"),
        (["--item", str(apollo_item), "--workstream", LINKEDIN], 1, "mismatch", "explicit"),
        (["--item", str(legacy_item)], 1, "ambiguous", None),
        (["--client", "acme"], 1, "ambiguous", None),
        (["--item", str(beta_legacy)], 0, "found", "inferred"),
        (["--client", "beta", "--workstream", APOLLO], 1, "not_found", "explicit"),
    ]
    for args, code, status, source in cases:
        r = cli("config", "show", "--step", ENRICH, *args, "--json")
        assert (r.code, r.json()["status"], r.json()["source"]) == (code, status, source), args
    r = cli("config", "show", "--step", ENRICH, "--item", str(legacy_item))
    assert r.code == 1 and "status:     ambiguous" in r.out
    assert "candidates: apollo_scrape, linkedin_scrape" in r.out
    # a failure says so in one line on stderr (it said nothing: issue 10 B.7)
    assert r.err.strip().splitlines() == [
        f"wsctl: error: no config resolved for {ENRICH}: ambiguous (candidates: "
        "apollo_scrape, linkedin_scrape) (hint: see the trace)"
    ]
    r = cli("config", "show", "--step", ENRICH, "--item", str(beta_legacy))
    assert r.code == 0 and "source:     inferred" in r.out
    assert "wsctl: warning: workstream linkedin_scrape is inferred" in r.err


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--step", ENRICH, "--client", HOSTILE], 1, "no client named"),
        (["--step", HOSTILE, "--client", "acme"], 1, "invalid step slug"),
        (["--step", ENRICH, "--client", "acme", "--workstream", HOSTILE], 1, "invalid workstream slug"),
        (["--step", ENRICH, "--item", HOSTILE], 1, "invalid item id"),
        (["--step", ENRICH, "--item", "00000000-0000-0000-0000-000000000000"], 1, "no batch item"),
        (["--step", ENRICH], 2, "give either --item"),
    ],
)  # fmt: skip
def test_config_show_refuses_bad_input(cli, conn, world, args, code, text):
    before = table_snapshot(conn)
    r = cli("config", "show", *args)
    assert_refused(r, code, text)
    assert r.out == ""
    assert table_snapshot(conn) == before
    assert conn.execute("SELECT to_regclass('public.batches') IS NOT NULL").fetchone() == (True,)


def test_config_show_redacts_urls_with_credentials(cli, conn, world):
    add_config(conn, world["acme"], NORMALIZE, APOLLO,
               {"endpoint": "https://bot:pa55word@api.example.com/x?apikey=K9&page=1"})  # fmt: skip
    r = cli(
        "config",
        "show",
        "--step",
        NORMALIZE,
        "--client",
        "acme",
        "--workstream",
        APOLLO,
        "--json",
    )
    assert r.code == 0
    assert r.json()["config"]["endpoint"] == "https://bot:***@api.example.com/x?apikey=***&page=1"
    text = cli("config", "show", "--step", NORMALIZE, "--client", "acme", "--workstream", APOLLO)
    assert "pa55word" not in text.out and "K9" not in text.out and "api.example.com" in text.out


def test_every_command_has_help(run_cli):
    for group, commands in {
        "client": ["add", "list"],
        "registry": ["add", "list", "remove", "import"],
        "config": ["set", "list", "unset", "show"],
    }.items():
        for c in commands:
            r = run_cli(group, c, "--help")
            assert r.code == 0 and "Usage" in r.out, (group, c)


def test_apollo_config_is_untouched_by_linkedin_writes(cli, conn, world):
    r = cli("config", "set", "--client", "acme", "--step", ENRICH, "--workstream", LINKEDIN,
            "--set", "clay_table=changed")  # fmt: skip
    assert r.code == 0
    res = cli("config", "show", "--step", ENRICH, "--client", "acme", "--workstream", APOLLO,
              "--reveal", "--json")  # fmt: skip
    assert res.json()["config"] == APOLLO_CFG


# --- overlong input: the right reason, one short line ------------------------

LONG = "a" * 10_000


@pytest.mark.parametrize(
    "args, text",
    [
        (["registry", "add", "--step", LONG, "--workstream", APOLLO, "--type", "sync", "--sender", "f"],
         "invalid step slug 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...': too long (10000 characters; at most 200)"),
        (["registry", "add", "--step", ENRICH, "--workstream", LONG, "--type", "sync", "--sender", "f"],
         "invalid workstream slug"),
        (["registry", "add", "--step", ENRICH, "--workstream", APOLLO, "--type", "sync", "--sender", LONG],
         "invalid sender function name"),
        (["config", "set", "--client", "acme", "--step", LONG, "--workstream", APOLLO, "--set", "a=1"],
         "invalid step slug"),
        (["client", "add", LONG], "invalid client name"),
    ],
)  # fmt: skip
def test_overlong_input_is_refused_as_too_long(cli, conn, world, args, text):
    before = table_snapshot(conn)
    r = cli(*args)
    assert_refused(r, 1, text)
    assert "too long (10000 characters; at most 200)" in r.err
    assert "use lower-case letters" not in r.err and "expected a Python identifier" not in r.err
    assert len(r.err) < 200  # the 10,000 characters are not echoed
    assert table_snapshot(conn) == before


# --- values a jsonb column cannot hold: refused before any write -------------

SET_BASE = ("config", "set", "--client", "acme", "--step", ENRICH, "--workstream", APOLLO)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.toml", "b = 2020-01-01T00:00:00Z\n",
         "key b: a TOML datetime cannot be stored in a JSON config; quote it as a string"),
        ("x.toml", "a = 1\n[x]\nwhen = 1979-05-27T07:32:00\n",
         "key x.when: a TOML datetime cannot be stored in a JSON config; quote it as a string"),
        ("x.toml", "[x]\nday = 1979-05-27\n",
         "key x.day: a TOML date cannot be stored in a JSON config; quote it as a string"),
        ("x.toml", "times = [1, 07:32:00]\n",
         "key times[1]: a TOML time cannot be stored in a JSON config; quote it as a string"),
        ("x.toml", "ratio = nan\n", "key ratio: NaN is not a JSON number"),
        ("x.toml", "[[rows]]\nlimit = -inf\n", "key rows[0].limit: -Infinity is not a JSON number"),
        ("x.toml", 'name = "a\\u0000b"\n',
         "key name: the string contains a NUL character (\\u0000), which PostgreSQL cannot store"),
        ("x.toml", f"big = {'9' * 5000}\n", "not valid TOML: Exceeds the limit (4300 digits)"),
        ("x.json", '{"a": {"b": [NaN]}}', "key a.b[0]: NaN is not a JSON number"),
        ("x.json", '{"a": Infinity}', "key a: Infinity is not a JSON number"),
        ("x.json", '{"a": 1e999}', "key a: Infinity is not a JSON number"),
        ("x.json", '{"a": "x\\u0000y"}', "key a: the string contains a NUL character (\\u0000)"),
        ("x.json", '{"a\\u0000b": 1}', "key a\\u0000b: the key name contains a NUL character"),
        ("x.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON: nested too deeply"),
        ("x.json", '{"a": ' + "9" * 5000 + "}", "not valid JSON: Exceeds the limit (4300 digits)"),
    ],
)  # fmt: skip
def test_config_set_refuses_file_values_jsonb_cannot_hold(
    cli, conn, world, tmp_path, name, content, message
):
    path = tmp_path / name
    path.write_text(content)
    before = table_snapshot(conn)
    r = cli(*SET_BASE, "--file", str(path))
    assert_refused(r, 1, f"{path}: {message}")
    assert "internal error" not in r.err and len(r.err) < 400
    assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("k=NaN", "--set: key k: NaN is not a JSON number"),
        ("k=Infinity", "--set: key k: Infinity is not a JSON number"),
        ("k=-Infinity", "--set: key k: -Infinity is not a JSON number"),
        ("k=1e999", "--set: key k: Infinity is not a JSON number (numbers must be finite; 1e999"),
        ('k={"a": [1, NaN]}', "--set: key k.a[1]: NaN is not a JSON number"),
        ('k="a\\u0000b"', "--set: key k: the string contains a NUL character (\\u0000)"),
        ('k={"x\\u0000": 1}', "--set: key k.x\\u0000: the key name contains a NUL character"),
        ("k=" + "9" * 5000, "--set: key k: cannot read the value: Exceeds the limit (4300 digits)"),
        ("k=" + "[" * 100_000, "--set: key k: cannot read the value: nested too deeply"),
    ],
)  # fmt: skip
def test_config_set_refuses_assignments_jsonb_cannot_hold(cli, conn, world, assignment, message):
    before = table_snapshot(conn)
    # A good --set before the bad one: nothing of it is written either.
    r = cli(*SET_BASE, "--set", "fine=1", "--set", assignment)
    assert_refused(r, 1, message)
    assert "internal error" not in r.err and len(r.err) < 400
    assert table_snapshot(conn) == before


def test_quoted_dates_and_big_finite_numbers_are_stored(cli, conn, world, tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('b = "2020-01-01T00:00:00Z"\nbig = 1e300\nn = 12345678901234567890\n')
    r = cli(*SET_BASE, "--file", str(path), "--json", "--reveal")
    assert r.code == 0, r.err
    config = r.json()["config"]
    assert config["b"] == "2020-01-01T00:00:00Z" and config["n"] == 12345678901234567890
    assert config["big"] == 10**300  # jsonb numerics are exact: it comes back as an integer


def test_the_library_refuses_non_json_values_too(conn, world):
    import datetime as dt

    from wsctl import catalog
    from wsctl.errors import OperationalError

    before = table_snapshot(conn)
    for bad, text in [
        ({"when": dt.date(2020, 1, 1)}, "config: key when: a TOML date"),
        ({"x": {"y": float("nan")}}, "config: key x.y: NaN"),
        ({"s": {1, 2}}, "config: key s: a set cannot be stored"),
    ]:
        with pytest.raises(OperationalError, match=text):
            catalog.set_config(conn, client="acme", step=ENRICH, workstream=APOLLO, config=bad)
    assert table_snapshot(conn) == before


def test_bearer_keys_and_authorization_values_are_redacted_everywhere(cli, conn, world):
    config = {
        "bearer": "BEARERSECRET1",
        "headers": {"X-Custom": "Bearer HEADERSECRET2", "Accept": "text/plain"},
        "fallback": ["basic BASICSECRET3", "Token TOKENSECRET4"],
    }
    secrets = ["BEARERSECRET1", "HEADERSECRET2", "BASICSECRET3", "TOKENSECRET4"]
    add_config(conn, world["beta"], NORMALIZE, APOLLO, config)
    runs = {
        "list": ("config", "list", "--client", "beta"),
        "show": ("config", "show", "--step", NORMALIZE, "--client", "beta",
                 "--workstream", APOLLO),
        "set": ("config", "set", "--client", "beta", "--step", NORMALIZE,
                "--workstream", APOLLO, "--set", "other=1"),
    }  # fmt: skip
    for name, args in runs.items():
        for extra in ([], ["--json"]):
            r = cli(*args, *extra)
            assert r.code == 0, (name, r.err)
            assert not any(s in r.out + r.err for s in secrets), (name, extra, r.out)
            assert "Bearer ***" in r.out and "basic ***" in r.out, (name, r.out)
        r = cli(*args, "--json", "--reveal")
        assert all(s in r.out for s in secrets), (name, r.out)
    doc = cli(*runs["list"], "--json").json()[0]["config"]
    assert doc["bearer"] == "***" and doc["headers"]["Accept"] == "text/plain"


# --- reads carry the statement timeout ---------------------------------------------


@pytest.mark.parametrize(
    ("table", "args"),
    [
        ("clients", ("client", "list")),
        ("enrichment_registry", ("registry", "list")),
        ("client_workflow_configs", ("config", "list")),
        (
            "client_workflow_configs",
            ("config", "show", "--client", "acme", "--step", ENRICH, "--workstream", LINKEDIN),
        ),
    ],
    ids=["client-list", "registry-list", "config-list", "config-show"],
)
def test_a_read_blocked_behind_a_lock_gives_up_at_the_statement_timeout(
    cli, db_url, world, tmp_path, table, args
):
    """A read waiting on a table another session locked (a dashboard migration, say)
    stops at [database] statement_timeout with exit 1, instead of hanging a cron job."""
    import psycopg

    (tmp_path / "wsctl.toml").write_text('[database]\nstatement_timeout = "300ms"\n')
    # Should the read ever wait without a timeout again, the server ends the holder's
    # session after 10 s: the test then fails instead of hanging.
    with psycopg.connect(db_url, options="-c idle_in_transaction_session_timeout=10s") as holder:
        holder.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")
        r = cli(*args)
        with contextlib.suppress(psycopg.Error):
            holder.rollback()
    assert_refused(r, 1, "statement timeout")
    assert cli(*args).code == 0


# --- the old names (README: "Renamed") -------------------------------------------


STEP_COMMANDS = [
    ("registry", "add"),
    ("registry", "list"),
    ("registry", "remove"),
    ("config", "set"),
    ("config", "list"),
    ("config", "unset"),
    ("config", "show"),
    ("retry",),
]


@pytest.mark.parametrize("path", STEP_COMMANDS, ids=" ".join)
def test_help_shows_step_and_never_the_old_workflow_option(run_cli, path):
    r = run_cli(*path, "--help")
    assert r.code == 0, r.err
    assert "--step STEP" in r.out
    assert "--workflow" not in r.out


def test_the_old_workflow_option_still_works_everywhere(cli, conn, world):
    old = cli(
        "registry", "add", "--workflow", "rank_lead", "--workstream", APOLLO, "--type", "sync",
        "--sender", "run_score", "--json",
    )  # fmt: skip
    assert old.code == 0, old.err
    assert old.json()["step"] == "rank_lead" and old.json()["created"] is True
    listed = cli("registry", "list", "--workflow", "rank_lead", "--json")
    assert [(x["step"], x["workstream"]) for x in listed.json()] == [("rank_lead", APOLLO)]
    key = ("--client", "acme", "--workflow", "rank_lead", "--workstream", APOLLO)
    assert cli("config", "set", *key, "--set", "a=1").code == 0
    shown = cli("config", "show", *key, "--json")
    assert shown.code == 0, shown.err
    assert (shown.json()["step"], shown.json()["config"]) == ("rank_lead", {"a": 1})
    assert [
        x["step"] for x in cli("config", "list", "--workflow", "rank_lead", "--json").json()
    ] == ["rank_lead"]
    assert cli("config", "unset", *key).code == 0
    assert cli("registry", "remove", "--workflow", "rank_lead", "--workstream", APOLLO).code == 0
    assert conn.execute(
        "SELECT count(*) FROM enrichment_registry WHERE slug = 'rank_lead'"
    ).fetchone() == (0,)


def test_a_missing_step_names_only_the_new_option(cli, world):
    r = cli("config", "show", "--client", "acme")
    assert_refused(r, 2, "Missing option '--step'")
    assert "--workflow" not in r.err


def test_the_old_workflow_key_of_a_registry_file_still_imports(cli, conn, world, tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(GOOD_ROW.replace("step =", "workflow ="))
    r = cli("registry", "import", str(path), "--json")
    assert r.code == 0, r.err
    assert [(x["step"], x["workstream"]) for x in r.json()["rows"]] == [("a", "w")]
