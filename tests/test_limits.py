"""`wsctl limit ...` and registry limit keys (issue: pacing, part 1: limits as data)."""

from __future__ import annotations

import pytest

from tests.conftest import table_snapshot
from tests.support import factories as f

CLAY = "enrich_company_via_waterfall_in_clay"
TEMPLATE = "clay:{config.clay_workspace}"


def _refused(r, code, text):
    assert r.code == code, (r.out, r.err)
    assert len(r.err.strip().splitlines()) == 1 and text in r.err, r.err


def test_limit_set_list_show_remove(cli, conn):
    r = cli("limit", "set", "clay:acme", "--rate", "10/s", "--burst", "20", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert (doc["rate"], doc["rate_per_second"], doc["burst"], doc["created"]) == (
        "10/s",
        10.0,
        20,
        True,
    )
    assert doc["max_in_flight"] is None
    # Changing one part keeps the others.
    r = cli("limit", "set", "clay:acme", "--max-in-flight", "5", "--json")
    assert (r.json()["rate"], r.json()["burst"], r.json()["max_in_flight"]) == ("10/s", 20, 5)
    assert r.json()["created"] is False
    # A rate per minute, and a burst defaulting to one second's worth (at least 1).
    r = cli("limit", "set", "modal:fn", "--rate", "600/m", "--json")
    assert (r.json()["rate"], r.json()["rate_per_second"], r.json()["burst"]) == ("10/s", 10.0, 10)
    r = cli("limit", "set", "slow", "--rate", "30/h", "--json")
    assert (r.json()["rate"], r.json()["burst"]) == ("30/h", 1)
    listed = cli("limit", "list", "--json").json()
    assert [x["key"] for x in listed["limits"]] == ["clay:acme", "modal:fn", "slow"]
    plain = cli("limit", "list")
    assert plain.out.splitlines()[0].split("\t")[:4] == ["key", "rate", "burst", "max_in_flight"]
    shown = cli("limit", "show", "clay:acme", "--json").json()
    assert shown["defined"] is True and shown["in_flight"] == 0
    # a new bucket starts full: burst - 1 tokens (one kept for the take-to-arrival delay)
    assert shown["tokens_now"] == pytest.approx(19.0, abs=0.01)
    human = cli("limit", "show", "clay:acme")
    assert human.out.startswith("limit clay:acme: rate 10/s (burst 20), at most 5 in flight")
    r = cli("limit", "set", "clay:acme", "--no-max-in-flight", "--json")
    assert r.json()["max_in_flight"] is None and r.json()["rate"] == "10/s"
    assert cli("limit", "remove", "clay:acme").out.strip() == "removed limit clay:acme"
    assert [x["key"] for x in cli("limit", "list", "--json").json()["limits"]] == [
        "modal:fn",
        "slow",
    ]


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("set", "k", "--rate", "10"), 2, "use N/s, N/m or N/h"),
        (("set", "k", "--rate", "0/s"), 2, "more than 0"),
        (("set", "k", "--burst", "5"), 2, "--burst needs a --rate"),
        (("set", "k"), 2, "a limit needs --rate"),
        (("set", "k", "--rate", "1/s", "--burst", "0"), 2, "--burst must be at least 1"),
        (("set", "k", "--max-in-flight", "0"), 2, "--max-in-flight must be at least 1"),
        (("set", "has space", "--rate", "1/s"), 2, "no spaces"),
        (("remove", "nope"), 1, "no limit 'nope'"),
        (("show", "nope"), 1, "no limit 'nope'"),
    ],
)
def test_limit_refusals_write_nothing(cli, conn, args, code, text):
    before = conn.execute("SELECT count(*) FROM wsctl.limits").fetchone()
    _refused(cli("limit", *args), code, text)
    assert conn.execute("SELECT count(*) FROM wsctl.limits").fetchone() == before


def _world(conn):
    acme = f.add_client(conn, "acme")
    globex = f.add_client(conn, "globex")
    f.register(conn, CLAY, "apollo_scrape", "async", "start_clay", "receive_clay")
    f.add_config(conn, acme, CLAY, "apollo_scrape", {"clay_workspace": "ws-1", "api_key": "sk"})
    f.add_config(
        conn, globex, CLAY, "apollo_scrape", {"clay_workspace": {"$secret": "CLAY_WS_GLOBEX"}}
    )
    return acme, globex


def test_registry_rows_bind_key_templates_filled_per_state(cli, conn):
    acme, globex = _world(conn)
    base = ("registry", "add", "--step", CLAY, "--workstream", "apollo_scrape")
    fns = ("--type", "async", "--sender", "start_clay", "--receiver", "receive_clay")
    r = cli(*base, *fns, "--limit-key", TEMPLATE, "--limit-key", "clay-all", "--json")
    assert r.code == 0, r.err
    assert r.json()["limit_keys"] == ["clay-all", TEMPLATE] and r.json()["changed"] is True
    listed = cli("registry", "list", "--json").json()
    assert listed[0]["limit_keys"] == ["clay-all", TEMPLATE]
    # The template fills in per client config; a secret reference fills in as its name.
    doc = cli("limit", "list", "--json").json()
    assert doc["bound_but_undefined"] == ["clay-all", "clay:CLAY_WS_GLOBEX", "clay:ws-1"]
    warned = cli("limit", "list")
    assert "key clay:ws-1 is bound by the registry but no limit defines it" in warned.err
    # States in flight count under the key their config gives.
    batch = f.add_batch(conn, acme, [CLAY], 3, first_status="DISPATCHED")
    f.add_batch(conn, globex, [CLAY], 2, first_status="DISPATCHED")
    conn.execute(
        "UPDATE workflow_states SET status = 'DISPATCHING', lease_expires_at = now() - interval '1s'"
        " WHERE id = (SELECT id FROM workflow_states WHERE batch_id = %s LIMIT 1)",
        (batch,),
    )  # an expired lease holds no slot
    assert cli("limit", "set", "clay:ws-1", "--max-in-flight", "10").code == 0
    shown = cli("limit", "show", "clay:ws-1", "--json").json()
    assert shown["in_flight"] == 2 and shown["tokens_now"] is None
    assert [(b["step"], b["template"]) for b in shown["bound_by"]] == [(CLAY, TEMPLATE)]
    undefined = cli("limit", "show", "clay:CLAY_WS_GLOBEX", "--json").json()
    assert undefined["defined"] is False and undefined["in_flight"] == 2
    assert cli("limit", "show", "clay-all", "--json").json()["in_flight"] == 4
    # Re-adding the same keys changes nothing; --no-limit-keys unbinds.
    again = cli(*base, *fns, "--limit-key", "clay-all", "--limit-key", TEMPLATE, "--json")
    assert again.json()["changed"] is False
    r = cli(*base, *fns, "--no-limit-keys", "--json")
    assert r.json()["limit_keys"] == []
    assert cli("limit", "list", "--json").json()["bound_but_undefined"] == []


@pytest.mark.parametrize(
    ("template", "text"),
    [
        ("clay:{config.api_key}", "looks like a secret"),
        ("clay:{tenant}", "unknown placeholder {tenant}"),
        ("clay:{config.x", "unbalanced braces"),
    ],
)
def test_a_bad_template_is_refused_and_writes_nothing(cli, conn, template, text):
    _world(conn)
    before = table_snapshot(conn)
    r = cli(
        "registry", "add", "--step", CLAY, "--workstream", "apollo_scrape",
        "--type", "async", "--sender", "s", "--receiver", "r", "--limit-key", template,
    )  # fmt: skip
    _refused(r, 2, text)
    assert table_snapshot(conn) == before
    assert conn.execute("SELECT count(*) FROM wsctl.registry_limit_keys").fetchone() == (0,)


def test_registry_import_binds_limit_keys_and_leaves_them_when_absent(cli, conn, tmp_path):
    _world(conn)
    row = (
        f'[[registry]]\nstep = "{CLAY}"\nworkstream = "apollo_scrape"\ntype = "async"\n'
        'sender = "start_clay"\nreceiver = "receive_clay"\n'
    )
    path = tmp_path / "r.toml"
    path.write_text(row + f'limit_keys = ["{TEMPLATE}"]\n')
    r = cli("registry", "import", str(path), "--json")
    assert r.code == 0, r.err
    assert r.json()["rows"][0]["limit_keys"] == [TEMPLATE]
    path.write_text(row)  # no limit_keys: the bindings stay
    r = cli("registry", "import", str(path), "--json")
    assert r.json()["unchanged"] == 1 and r.json()["rows"][0]["limit_keys"] == [TEMPLATE]
    path.write_text(row + "limit_keys = []\n")
    assert cli("registry", "import", str(path), "--json").json()["rows"][0]["limit_keys"] == []
    path.write_text(row + 'limit_keys = "clay"\n')
    _refused(cli("registry", "import", str(path)), 1, "limit_keys must be a list")


def test_the_example_registry_binds_its_clay_steps_to_the_workspace_key(cli, conn):
    from wsctl.shipped import examples_dir

    r = cli("registry", "import", str(examples_dir() / "registry.toml"), "--json")
    assert r.code == 0, r.err
    clay = [x for x in r.json()["rows"] if "clay" in x["step"]]
    assert clay and all(x["limit_keys"] == [TEMPLATE] for x in clay)
    others = [x for x in r.json()["rows"] if "clay" not in x["step"]]
    assert all(x["limit_keys"] == [] for x in others)


def test_doctor_warns_about_bound_keys_no_limit_defines(cli, conn):
    _world(conn)
    cli(
        "registry", "add", "--step", CLAY, "--workstream", "apollo_scrape",
        "--type", "async", "--sender", "start_clay", "--receiver", "receive_clay",
        "--limit-key", TEMPLATE,
    )  # fmt: skip
    r = cli("doctor", "--json", "--backend", "local")
    check = {c["name"]: c for c in r.json()["checks"]}["limit_keys"]
    assert check["status"] == "WARN" and "clay:ws-1" in check["detail"]
    assert "clay:CLAY_WS_GLOBEX" in check["detail"] and check["hint"].startswith("wsctl limit set")
    cli("limit", "set", "clay:ws-1", "--rate", "10/s", "--burst", "20")
    cli("limit", "set", "clay:CLAY_WS_GLOBEX", "--rate", "10/s", "--burst", "20")
    r = cli("doctor", "--json", "--backend", "local")
    check = {c["name"]: c for c in r.json()["checks"]}["limit_keys"]
    assert check["status"] == "OK" and "2 bound limit key(s)" in check["detail"]
