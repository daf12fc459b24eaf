"""What a new user hit on a first day (issue 10, part B), each fed the input they gave."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.commands import wsctl_argv

FIXTURES_APP = Path(__file__).parent / "fixtures" / "local_app.py"


@pytest.mark.parametrize("argv", [(), ("batch",), ("backfill",)])
def test_a_group_without_a_command_prints_its_help_like_help_does(run_cli, argv):
    bare = run_cli(*argv)
    helped = run_cli(*argv, "--help")
    assert bare.code == 0 and bare.err == ""
    assert bare.out == helped.out
    assert bare.out.startswith("Usage: wsctl")
    assert len(bare.out.splitlines()) > 5  # the help as printed, not squashed into one line


# --- item files -------------------------------------------------------------------


@pytest.fixture
def catalog(conn):
    from tests.test_batch_create import seed_catalog

    return seed_catalog(conn)


def _create(cli, path, *extra):
    from tests.test_batch_create import create_args

    return cli(*create_args(path, "--json", *extra))


def test_a_semicolon_separated_csv_is_refused_with_a_hint_and_loads_with_delimiter(
    cli, conn, catalog, tmp_path
):
    from tests.conftest import table_snapshot

    path = tmp_path / "leads.csv"
    path.write_text("company;domain\nAcme;acme.com\nGlobex;globex.com\n")
    before = table_snapshot(conn)
    r = _create(cli, path)
    assert r.code == 1 and "semicolon-separated" in r.err and "--delimiter ';'" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert table_snapshot(conn) == before
    r = _create(cli, path, "--delimiter", ";")
    assert r.code == 0, r.err
    rows = conn.execute(
        "SELECT data FROM public.batch_items WHERE batch_id = %s ORDER BY data->>'company'",
        (r.json()["batch_id"],),
    ).fetchall()
    assert [d for (d,) in rows] == [
        {"company": "Acme", "domain": "acme.com"},
        {"company": "Globex", "domain": "globex.com"},
    ]


def test_a_bad_delimiter_is_a_usage_error(cli, catalog, tmp_path):
    path = tmp_path / "leads.csv"
    path.write_text("a,b\n1,2\n")
    r = _create(cli, path, "--delimiter", ";;")
    assert r.code == 2 and "--delimiter" in r.err


def test_a_csv_cell_as_large_as_a_json_lines_value_is_accepted(cli, conn, catalog, tmp_path):
    big = "x" * (10 * 1024 * 1024)  # 10 MB: csv's default limit refused anything over 128 KiB
    csv_path = tmp_path / "big.csv"
    csv_path.write_text(f"name,notes\nacme,{big}\n")
    r = _create(cli, csv_path)
    assert r.code == 0, r.err
    (length,) = conn.execute(
        "SELECT length(data->>'notes') FROM public.batch_items WHERE batch_id = %s",
        (r.json()["batch_id"],),
    ).fetchone()
    assert length == len(big)


def test_one_field_is_singular(cli, catalog, tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("a,b,c\n1\n")
    r = _create(cli, path)
    assert r.code == 1 and "line 2: 1 field where the header has 3" in r.err


# --- the embedded server ------------------------------------------------------------


def test_embedded_status_and_stop(run_cli):
    from wsctl import embedded
    from wsctl.settings import user_data_dir

    data = user_data_dir()  # under this test's own XDG_DATA_HOME
    r = run_cli("embedded", "status", "--json")
    assert r.code == 0 and r.json()["initialized"] is False and r.json()["running"] is False
    server = embedded.ensure(data)
    try:
        r = run_cli("embedded", "status", "--json")
        doc = r.json()
        assert doc["running"] is True and doc["initialized"] is True and doc["pid"] > 0
        assert doc["pgdata"] == str(server.pgdata)
        human = run_cli("embedded", "status")
        assert human.out.startswith("running: pid") and "wsctl embedded stop" in human.out
        r = run_cli("embedded", "stop")
        assert r.code == 0 and r.out.startswith("stopped the embedded PostgreSQL")
        after = run_cli("embedded", "status", "--json").json()
        assert after["running"] is False and after["initialized"] is True
        again = run_cli("embedded", "stop", "--json")
        assert again.code == 0 and again.json()["stopped"] is False
    finally:
        embedded.stop(data)


# --- the command line ----------------------------------------------------------------


def test_version_has_a_short_flag(run_cli):
    from wsctl import __version__

    assert run_cli("-V").out.strip() == f"wsctl {__version__}"
    assert run_cli("--version").out == run_cli("-V").out


def test_shell_completion_is_offered_and_completes_commands():
    import os
    import subprocess

    script = subprocess.run(
        wsctl_argv(None, "--show-completion", "bash"),
        capture_output=True,
        text=True,
    )
    assert script.returncode == 0 and "_wsctl_completion" in script.stdout
    env = {**os.environ, "_WSCTL_COMPLETE": "complete_bash", "COMP_WORDS": "wsctl ba"}
    env["COMP_CWORD"] = "1"
    done = subprocess.run(wsctl_argv(None), capture_output=True, text=True, env=env)
    assert set(done.stdout.split()) == {"batch", "backfill"}


def test_help_names_what_to_type_not_click_type_names(run_cli):
    import re

    from tests.test_cli_basics import _commands
    from wsctl.cli.app import app

    for path, _cmd in _commands(app):
        text = run_cli(*path, "--help").out
        assert not re.search(r"<(str|int|float|int range|float range)>", text), (path, text)
    listing = run_cli("batch", "list", "--help").out
    assert "--client NAME" in listing and "--limit N" in listing


def test_database_url_is_accepted_after_any_command(run_cli, db_url):
    r = run_cli("migrate", "--status", "--json", "--database-url", db_url)
    assert r.code == 0, r.err
    assert r.json()["pending"] == []
    r = run_cli("batch", "list", f"--database-url={db_url}", "--json")
    assert r.code == 0 and r.json() == []


# --- configuration ---------------------------------------------------------------------


def test_init_without_a_url_writes_a_commented_placeholder_that_loads(run_cli, tmp_path):
    import tomllib

    from wsctl import settings

    r = run_cli("init")
    assert r.code == 0, r.err
    text = (tmp_path / "wsctl.toml").read_text()
    assert '# url = "postgresql://USER:PASSWORD@HOST:5432/DBNAME"' in text
    assert "url" not in tomllib.loads(text)["database"]  # commented out: the embedded default
    assert settings.load().url_source == "embedded"


def test_init_into_a_missing_directory_is_a_usage_error(run_cli, tmp_path):
    r = run_cli("init", "--path", str(tmp_path / "nonexistent" / "dir" / "x.toml"))
    assert r.code == 2 and "does not exist" in r.err and len(r.err.splitlines()) == 1
    assert not (tmp_path / "nonexistent").exists()


def test_config_set_refuses_a_workstream_typo_unless_it_is_said_to_be_new(cli, conn, catalog):
    from tests.conftest import table_snapshot

    before = table_snapshot(conn)
    args = ("config", "set", "--client", "acme", "--step", "normalize_company_name")
    r = cli(*args, "--workstream", "apolo_scrape", "--set", "x=1")
    assert r.code == 1 and "unknown workstream 'apolo_scrape'" in r.err
    assert "did you mean 'apollo_scrape'" in r.err and "--new-workstream" in r.err
    assert table_snapshot(conn) == before
    r = cli(*args, "--workstream", "brand_new", "--set", "x=1", "--new-workstream", "--json")
    assert r.code == 0, r.err
    assert r.json()["workstream"] == "brand_new"


# --- the shipped examples ------------------------------------------------------------


@pytest.mark.parametrize("name", ["items.csv", "items.jsonl"])
def test_the_example_items_carry_the_columns_the_example_normalizer_reads(name):
    """Every normalized value was null: the files' columns were not the ones it reads."""
    import csv
    import json
    import sys

    from wsctl.shipped import examples_dir

    folder = examples_dir()
    sys.path.insert(0, str(folder))
    try:
        import enrichment_logic
    finally:
        sys.path.remove(str(folder))
    path = folder / name
    if name.endswith(".csv"):
        with path.open(newline="") as fh:
            items = list(csv.DictReader(fh))
    else:
        items = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    assert items
    for item in items:
        values = enrichment_logic.normalize_core_values(item)
        assert values["company_name"] and values["company_domain"], (item, values)
    if name.endswith(".csv"):
        assert all(enrichment_logic.normalize_core_values(i)["first_name"] for i in items)


def test_examples_says_where_the_files_are_and_copies_them(run_cli, tmp_path):
    r = run_cli("examples", "--json")
    assert r.code == 0
    doc = r.json()
    assert {"registry.toml", "items.csv", "enrichment_app.py"} <= set(doc["files"])
    dest = tmp_path / "mine"
    r = run_cli("examples", "--copy", str(dest))
    assert r.code == 0 and (dest / "registry.toml").is_file()
    (dest / "items.csv").write_text("mine\n")
    r = run_cli("examples", "--copy", str(dest))
    assert r.code == 1 and "--force" in r.err
    assert (dest / "items.csv").read_text() == "mine\n"
    assert run_cli("examples", "--copy", str(dest), "--force").code == 0
    assert (dest / "items.csv").read_text() != "mine\n"


def test_doctor_colours_its_statuses_on_a_terminal_only(db_url):
    import os
    import subprocess

    env = {**os.environ, "WSCTL_DATABASE_URL": db_url, "COLUMNS": "200"}
    args = wsctl_argv(None, "doctor", "--backend", "local")
    master, slave = os.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    term = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[32mOK" in term, term  # green
    plain = subprocess.run(args, capture_output=True, text=True, env=env)
    assert "\x1b" not in plain.stdout and plain.stdout.splitlines()[1].split("\t")[0] == "OK"


def test_a_one_column_file_whose_name_holds_a_semicolon_still_loads(cli, conn, catalog, tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text('note;s\n"plain text"\n')  # the first row does not split like the header
    r = _create(cli, path)
    assert r.code == 0, r.err


def test_dry_run_says_the_first_n_of_how_many_are_due(cli, conn):
    """`dispatch --dry-run` said "1000 state(s) due" when 1,495,000 were."""
    from tests.support import factories as f

    f.register_seed(conn)
    client = f.add_client(conn, "many")
    f.add_batch(conn, client, ["normalize_all_core_values"], 25)
    app = ("--app", str(FIXTURES_APP))
    r = cli("dispatch", "--dry-run", "--backend", "local", *app, "--limit", "10")
    assert r.code == 0, r.err
    assert "the first 10 of 25 states due" in r.out
    doc = cli("dispatch", "--dry-run", "--backend", "local", *app, "--limit", "10", "--json").json()
    assert doc["due"] == 25 and len(doc["plan"]) == 10
    all_of_them = cli("dispatch", "--dry-run", "--backend", "local", *app, "--json").json()
    assert all_of_them["due"] == 25 and len(all_of_them["plan"]) == 25


@pytest.mark.parametrize(
    ("app", "reason"),
    [
        (None, "No module named 'enrichment-worker'"),
        ("examples/registry.toml", "not a Python file"),
    ],
)
def test_a_local_backend_without_a_python_app_says_why_and_what_to_pass(cli, conn, app, reason):
    """`--backend local` without --app said No module named 'enrichment-worker' with no
    hint; `--app registry.toml` said `cannot import local app` with no reason."""
    from wsctl.shipped import examples_dir

    args = ["dispatch", "--once", "--backend", "local"]
    if app is not None:
        args += ["--app", str(examples_dir() / "registry.toml")]
    r = cli(*args)
    assert r.code == 3 and len(r.err.strip().splitlines()) == 1
    assert reason in r.err and "pass --app FILE.py" in r.err


def test_a_connection_error_names_where_the_url_came_from(run_cli, monkeypatch):
    """A DATABASE_URL set for another application silently beat ./wsctl.toml."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://other:s3cretpw@127.0.0.1:1/theirs")
    r = run_cli("batch", "list")
    assert r.code == 3 and len(r.err.strip().splitlines()) == 1
    assert "(from env DATABASE_URL)" in r.err and "s3cretpw" not in r.err
