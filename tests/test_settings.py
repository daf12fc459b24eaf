"""Settings precedence, wsctl init, URL masking and pooler detection (no database needed)."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsctl import settings
from wsctl.errors import UsageError
from wsctl.redact import mask_url


def _write(path, url):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[database]\nurl = "{url}"\n')


def test_precedence_option_env_files_embedded(tmp_path, monkeypatch):
    user_file = settings.user_config_path()
    assert str(user_file).startswith(str(tmp_path))  # isolated by the autouse fixture
    assert settings.load().url_source == "embedded"
    assert settings.load().database_url is None

    _write(user_file, "postgresql://u@h/user_file")
    assert settings.load().database_url == "postgresql://u@h/user_file"

    _write(tmp_path / "wsctl.toml", "postgresql://u@h/local_file")
    assert settings.load().database_url == "postgresql://u@h/local_file"

    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/database_url")
    assert settings.load().database_url == "postgresql://u@h/database_url"

    monkeypatch.setenv("WSCTL_DATABASE_URL", "postgresql://u@h/wsctl_env")
    s = settings.load()
    assert s.database_url == "postgresql://u@h/wsctl_env"
    assert s.url_source == "env WSCTL_DATABASE_URL"

    s = settings.load("postgresql://u@h/option")
    assert s.database_url == "postgresql://u@h/option" and s.url_source == "option --database-url"


def test_dispatch_defaults_layered(tmp_path):
    user_file = settings.user_config_path()
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[dispatch]\nconcurrency = 8\nlimit = 50\n")
    (tmp_path / "wsctl.toml").write_text("[dispatch]\nconcurrency = 16\n")
    s = settings.load()
    assert s.dispatch.concurrency == 16
    assert s.dispatch.limit == 50
    assert s.dispatch.lease_seconds == 300


@pytest.mark.parametrize(
    "body, message",
    [
        ("[database\n", "not valid TOML"),
        ("[database]\nfoo = 1\n", "unknown key database.foo"),
        ("[dispatch]\nbogus = 1\n", "unknown key dispatch.bogus"),
        ('[database]\npooler = "sometimes"\n', "pooler"),
        ('[databse]\nurl = "postgresql://x"\n', "unknown entry 'databse'"),
        ('url = "postgresql://x"\n', "unknown entry 'url'"),
    ],
)
def test_bad_config_file_is_a_usage_error(tmp_path, body, message):
    (tmp_path / "wsctl.toml").write_text(body)
    with pytest.raises(UsageError, match=message):
        settings.load()


def test_transaction_pooler_detection(tmp_path):
    assert settings.load("postgresql://u:p@pooler.supabase.com:6543/postgres").transaction_pooler
    assert not settings.load("postgresql://u:p@db.supabase.co:5432/postgres").transaction_pooler
    (tmp_path / "wsctl.toml").write_text('[database]\npooler = "transaction"\n')
    assert settings.load("postgresql://u@h:5432/x").transaction_pooler


def test_init_writes_commented_toml_and_refuses_overwrite(run_cli, tmp_path):
    r = run_cli("init", "--database-url", "postgresql://app:pw@db:5432/postgres")
    assert r.code == 0, r.err
    text = (tmp_path / "wsctl.toml").read_text()
    assert text.startswith("# wsctl configuration")
    doc = tomllib.loads(text)
    assert doc["database"]["url"] == "postgresql://app:pw@db:5432/postgres"
    assert doc["dispatch"]["backend"] == "modal"
    assert "pw" not in r.out  # the URL is not echoed

    before = (tmp_path / "wsctl.toml").read_text()
    r = run_cli("init", "--database-url", "postgresql://other@db/x")
    assert r.code == 1  # refused (README: refused = 1), not a usage error
    assert "--force" in r.err and len(r.err.strip().splitlines()) == 1
    assert (tmp_path / "wsctl.toml").read_text() == before

    r = run_cli("init", "--force")
    assert r.code == 0
    assert "url" not in tomllib.loads((tmp_path / "wsctl.toml").read_text())["database"]
    # The file it wrote is read back by settings.load().
    assert settings.load().dispatch.lease_seconds == 300


def test_init_says_what_each_dispatch_setting_is_in_the_words_of_its_option(run_cli, tmp_path):
    """One description per dispatch setting (DispatchSettings): the comment `wsctl init`
    writes beside the key, and the help of the `dispatch` option of that name."""
    from wsctl.settings import DEFAULT_DISPATCH, DispatchSettings

    assert run_cli("init").code == 0
    lines = (tmp_path / "wsctl.toml").read_text().split("[dispatch]\n", 1)[1].splitlines()
    written = dict(line.split(" = ", 1) for line in lines if " = " in line)
    expected = {k for k, v in DEFAULT_DISPATCH.values().items() if v is not None}
    assert set(written) == expected
    for key in expected:
        assert written[key].endswith(f"  # {DispatchSettings.about(key)}"), written[key]
    help_text = " ".join(run_cli("dispatch", "--help").out.split())
    for key in ("limit", "lease_seconds", "grace", "callback_timeout"):
        assert " ".join(DispatchSettings.about(key).split()) in help_text, key
    assert tomllib.loads((tmp_path / "wsctl.toml").read_text())["dispatch"] == {
        k: DEFAULT_DISPATCH.values()[k] for k in expected
    }


@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
        (
            "postgresql://db/x?password=s3cret&sslmode=require",
            "postgresql://db/x?password=***&sslmode=require",
        ),
        ("host=db user=app password=s3cret dbname=x", "host=db user=app password=*** dbname=x"),
        (None, "<none>"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


@given(
    user=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
    password=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789!$-_.", min_size=4, max_size=30
    ),
)
def test_mask_url_never_shows_the_password(user, password):
    masked = mask_url(f"postgresql://{user}:{password}@db.example.com:5432/postgres")
    assert "***" in masked
    assert f":{password}@" not in masked


# --- every key of wsctl.toml is checked at load time ----------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ('[dispatch]\nlimit = "lots"\n', "dispatch.limit must be a whole number >= 1, not 'lots'"),
        ("[dispatch]\nlimit = 0\n", "dispatch.limit must be a whole number >= 1, not 0"),
        ("[dispatch]\nlimit = 2.5\n", "dispatch.limit must be a whole number >= 1, not 2.5"),
        ("[dispatch]\nconcurrency = true\n", "dispatch.concurrency must be a whole number >= 1, not true"),
        ("[dispatch]\nlease_seconds = -5\n", "dispatch.lease_seconds must be a whole number >= 1"),
        ("[dispatch]\nmax_attempts = [3]\n", "dispatch.max_attempts must be a whole number >= 1, not [3]"),
        ('[dispatch]\ncallback_timeout = "1h"\n', "dispatch.callback_timeout must be a whole number >= 1, not '1h'"),
        ('[dispatch]\nspawn_timeout = "fast"\n', "dispatch.spawn_timeout must be a number of seconds > 0, not 'fast'"),
        ("[dispatch]\nspawn_timeout = 0\n", "dispatch.spawn_timeout must be a number of seconds > 0, not 0"),
        ("[dispatch]\ninterval = nan\n", "dispatch.interval must be a number of seconds >= 0, not nan"),
        ("[dispatch]\ninterval = inf\n", "dispatch.interval must be a number of seconds >= 0, not inf"),
        ("[dispatch]\ngrace = -1\n", "dispatch.grace must be a number of seconds >= 0, not -1"),
        ("[dispatch]\nmax_seconds = 0\n", "dispatch.max_seconds must be a number of seconds > 0, not 0"),
        ('[dispatch]\nbackend = "cloud"\n', "dispatch.backend must be 'modal' or 'local', not 'cloud'"),
        ("[dispatch]\napp = 3\n", "dispatch.app must be a non-empty string, not 3"),
        ('[dispatch]\napp = ""\n', "dispatch.app must be a non-empty string, not ''"),
        ("[dispatch]\nmodal_environment = 1\n", "dispatch.modal_environment must be a string, not 1"),
        ('[database]\nconnect_timeout = "soon"\n', "database.connect_timeout must be a whole number >= 1, not 'soon'"),
        ("[database]\nconnect_timeout = 0\n", "database.connect_timeout must be a whole number >= 1, not 0"),
        ('[database]\nstatement_timeout = "banana"\n', "database.statement_timeout must be a PostgreSQL duration"),
        ('[database]\nstatement_timeout = "5 minutes"\n', "database.statement_timeout must be a PostgreSQL duration"),
        ('[database]\nstatement_timeout = "-1s"\n', "database.statement_timeout must be a PostgreSQL duration"),
        ("[database]\nstatement_timeout = -1\n", "from 0 to 2147483647 ms, not -1"),
        ('[database]\nstatement_timeout = "30d"\n', "from 0 to 2147483647 ms, not '30d'"),
        ("[database]\nstatement_timeout = 1.5\n", "database.statement_timeout must be a PostgreSQL duration"),
        ("[database]\nurl = 5432\n", "database.url must be a string, not an integer"),
        ("[database]\npooler = 1\n", "database.pooler must be 'session' or 'transaction', not 1"),
    ],
)  # fmt: skip
def test_wrong_value_types_are_a_usage_error_naming_file_and_key(
    cli, conn, tmp_path, body, message
):
    from tests.conftest import table_snapshot

    (tmp_path / "wsctl.toml").write_text(body)
    with pytest.raises(UsageError) as info:
        settings.load()
    error = info.value.one_line()
    assert error.startswith(f"{tmp_path / 'wsctl.toml'}: ") and message in error
    # Through the CLI: one line, exit 2, no traceback, and nothing written.
    before = table_snapshot(conn)
    for args in (["dispatch", "--dry-run"], ["client", "add", "acme"]):
        r = cli(*args)
        assert r.code == 2, (args, r.out, r.err)
        assert r.err.strip().splitlines() == [f"wsctl: error: {error}"]
        assert "Traceback" not in r.err and "internal error" not in r.err
    assert table_snapshot(conn) == before


def test_the_error_names_the_file_that_holds_the_bad_value(tmp_path):
    user_file = settings.user_config_path()
    user_file.parent.mkdir(parents=True)
    user_file.write_text('[dispatch]\nlimit = "lots"\n')
    (tmp_path / "wsctl.toml").write_text("[dispatch]\nlimit = 5\n")
    with pytest.raises(UsageError, match=f"^{user_file}: dispatch.limit"):
        settings.load()


def test_long_bad_values_are_shortened_in_the_error(tmp_path):
    (tmp_path / "wsctl.toml").write_text(f'[dispatch]\nlimit = "{"x" * 10_000}"\n')
    with pytest.raises(UsageError) as info:
        settings.load()
    assert len(info.value.one_line()) < len(str(tmp_path)) + 150


@pytest.mark.parametrize(
    "value, expected",
    [('"5min"', "5min"), ('"30s"', "30s"), ('"500ms"', "500ms"), ('"0"', "0"), ("0", "0"),
     ("30000", "30000"), ('"2h"', "2h"), ('"1d"', "1d"), ('"1.5s"', "1.5s"), ('" 5 min "', "5 min")],
)  # fmt: skip
def test_statement_timeout_accepts_postgres_durations(tmp_path, value, expected):
    (tmp_path / "wsctl.toml").write_text(f"[database]\nstatement_timeout = {value}\n")
    assert settings.load().statement_timeout == expected


def test_statement_timeout_values_are_accepted_by_postgres(conn, tmp_path):
    from wsctl.db import tx

    for value in ("5min", "30s", "500ms", "0", 30000, "1.5s", "5 min", "24d", 2147483647):
        literal = f'"{value}"' if isinstance(value, str) else str(value)
        (tmp_path / "wsctl.toml").write_text(f"[database]\nstatement_timeout = {literal}\n")
        timeout = settings.load().statement_timeout
        with tx(conn, statement_timeout=timeout):
            assert conn.execute("SHOW statement_timeout").fetchone()[0]


def test_zero_seconds_is_taken_in_the_file_where_the_option_takes_it(cli, tmp_path):
    """interval, record_retry_seconds and grace accept 0 on the command line; wsctl.toml too."""
    (tmp_path / "wsctl.toml").write_text(
        "[dispatch]\ninterval = 0\nrecord_retry_seconds = 0\ngrace = 0\n"
    )
    d = settings.load().dispatch
    assert (d.interval, d.record_retry_seconds, d.grace) == (0.0, 0.0, 0.0)
    shown = cli("settings", "--json")
    assert shown.code == 0, shown.err
    rows = {r["key"]: r for r in json.loads(shown.out)["settings"]}
    for key in ("dispatch.interval", "dispatch.record_retry_seconds", "dispatch.grace"):
        assert rows[key]["value"] == 0 and rows[key]["source"].startswith("file:"), rows[key]


def test_good_values_are_kept_with_their_types(tmp_path):
    (tmp_path / "wsctl.toml").write_text(
        "[dispatch]\nlimit = 7\nspawn_timeout = 2\ninterval = 0.5\n"
        'backend = "local"\napp = "w"\nmodal_environment = ""\n'
        "[database]\nconnect_timeout = 3\n"
    )
    s = settings.load()
    assert s.dispatch.limit == 7
    assert s.dispatch.spawn_timeout == 2.0 and isinstance(s.dispatch.spawn_timeout, float)
    assert s.dispatch.interval == 0.5 and s.dispatch.backend == "local"
    assert s.dispatch.modal_environment is None  # empty: Modal's default environment
    assert s.connect_timeout == 3


# --- wsctl init: private file, refusal is exit 1 ---------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_writes_the_file_readable_by_its_owner_only(run_cli, tmp_path):
    old_umask = os.umask(0o022)  # the usual umask, which made the file 0644 before
    try:
        r = run_cli("init", "--database-url", "postgresql://app:pw@db:5432/postgres")
        assert r.code == 0, r.err
        assert _mode(tmp_path / "wsctl.toml") == 0o600

        # --force over a world-readable file leaves a private one.
        (tmp_path / "wsctl.toml").chmod(0o644)
        r = run_cli("init", "--force", "--database-url", "postgresql://app:pw2@db:5432/postgres")
    finally:
        os.umask(old_umask)
    assert r.code == 0, r.err
    assert _mode(tmp_path / "wsctl.toml") == 0o600
    assert "pw2" in (tmp_path / "wsctl.toml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if "wsctl" in p.name) == ["wsctl.toml"]


def test_init_refuses_an_existing_file_with_exit_1_and_leaves_it_alone(run_cli, tmp_path):
    target = tmp_path / "wsctl.toml"
    target.write_text("# mine\n")
    target.chmod(0o644)
    r = run_cli("init", "--database-url", "postgresql://app:pw@db:5432/postgres")
    assert r.code == 1, (r.out, r.err)
    assert r.err.strip().splitlines() == [
        f"wsctl: error: {Path('wsctl.toml')} already exists; pass --force to overwrite it"
    ]
    assert target.read_text() == "# mine\n" and _mode(target) == 0o644


# --- typed dispatch settings: one source for each default, and where each value came from ----


def test_dispatch_settings_are_typed_and_say_where_each_value_came_from(tmp_path):
    user_file = settings.user_config_path()
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[dispatch]\nconcurrency = 8\nlimit = 50\n")
    (tmp_path / "wsctl.toml").write_text("[dispatch]\nconcurrency = 16\ngrace = 3\n")
    d = settings.load().dispatch
    assert isinstance(d, settings.DispatchSettings)
    assert (d.concurrency, d.limit, d.grace) == (16, 50, 3.0) and isinstance(d.grace, float)
    assert d.source("concurrency") == f"file:{tmp_path / 'wsctl.toml'}"  # the later file wins
    assert d.source("limit") == f"file:{user_file}"
    assert d.source("lease_seconds") == "default"
    with pytest.raises(KeyError):
        d.source("sources")  # not a setting

    r = d.resolve(limit=None, concurrency=4, spawn_timeout=2)
    assert r.limit == 50 and r.source("limit") == f"file:{user_file}"  # None: not given
    assert r.concurrency == 4 and r.source("concurrency") == "option --concurrency"
    assert r.spawn_timeout == 2.0 and isinstance(r.spawn_timeout, float)
    assert d.concurrency == 16  # frozen: resolve returns a new value
    with pytest.raises(TypeError, match="bogus"):
        d.resolve(bogus=1)


def test_pass_options_come_from_the_resolved_settings(tmp_path):
    from wsctl.dispatch.engine import PassOptions

    (tmp_path / "wsctl.toml").write_text("[dispatch]\nmax_attempts = 2\nrecord_retry_seconds = 4\n")
    opts = (
        settings.load()
        .dispatch.resolve(limit=9)
        .pass_options(workstream="apollo_scrape", reconcile=False)
    )
    assert isinstance(opts, PassOptions)
    assert (opts.limit, opts.max_attempts, opts.record_retry_seconds) == (9, 2, 4.0)
    assert opts.workstream == "apollo_scrape" and opts.reconcile is False
    # PassOptions' own defaults are the DispatchSettings defaults (one source).
    bare, defaults = PassOptions(), settings.DispatchSettings()
    for key in ("limit", "concurrency", "lease_seconds", "max_attempts", "callback_timeout"):
        assert (
            getattr(bare, key) == getattr(defaults, key) == settings.DispatchSettings.default(key)
        )
    assert (bare.max_seconds, bare.grace) == (defaults.max_seconds, defaults.grace)


def test_dispatch_help_shows_the_defaults_of_the_settings(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    r = run_cli("dispatch", "--help")
    assert r.code == 0
    d = settings.DEFAULT_DISPATCH
    text = " ".join(r.out.split())
    assert f"(default: dispatch.limit of wsctl.toml, else {d.limit})" in text
    assert f"dispatch.concurrency of wsctl.toml, else {d.concurrency})" in text
    assert f"dispatch.max_seconds of wsctl.toml, else {d.max_seconds:g})" in text
    assert f"dispatch.grace of wsctl.toml, else {d.grace:g})" in text
    assert "(default: dispatch.modal_environment of wsctl.toml)" in text  # no default: unset
    # doctor, stats and ui say their dispatch defaults in the same words
    for command in ("doctor", "stats", "ui"):
        shown = " ".join(run_cli(command, "--help").out.split())
        assert f"dispatch.callback_timeout of wsctl.toml, else {d.callback_timeout})" in shown


def test_journal_path_defaults_to_the_user_data_dir(tmp_path):
    assert settings.load().dispatch.journal_path() == settings.user_data_dir() / "dispatch-journal"
    (tmp_path / "wsctl.toml").write_text(f'[dispatch]\njournal_dir = "{tmp_path / "j"}"\n')
    assert settings.load().dispatch.journal_path() == tmp_path / "j"


# --- wsctl settings: the effective values and where each came from --------------------------


def _by_key(doc):
    return {r["key"]: (r["value"], r["source"]) for r in doc["settings"]}


def test_settings_command_names_each_source_and_masks_the_password(run_cli, tmp_path, monkeypatch):
    user_file = settings.user_config_path()
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[dispatch]\nlimit = 50\n")
    local = tmp_path / "wsctl.toml"
    local.write_text(
        '[database]\nurl = "postgresql://app:hunter2@db:5432/x"\npooler = "transaction"\n'
        '[dispatch]\nbackend = "local"\n'
    )
    r = run_cli("settings", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["files"] == [str(user_file), str(local)]  # lowest precedence first
    got = _by_key(doc)
    assert got["database.url"] == ("postgresql://app:***@db:5432/x", f"file:{local}")
    assert got["database.pooler"] == ("transaction", f"file:{local}")
    assert got["database.lock_timeout"] == ("5s", "default")
    assert got["dispatch.limit"] == (50, f"file:{user_file}")
    assert got["dispatch.backend"] == ("local", f"file:{local}")
    assert got["dispatch.concurrency"] == (32, "default")
    journal = str(settings.user_data_dir() / "dispatch-journal")
    assert got["dispatch.journal_dir"] == (journal, "default")
    # every setting is listed, once
    keys = [row["key"] for row in doc["settings"]]
    assert (
        len(keys)
        == len(set(keys))
        == 1 + len(settings.DATABASE_DEFAULTS) + len(settings.DispatchSettings.keys())
    )
    assert "hunter2" not in r.out + r.err

    monkeypatch.setenv("DATABASE_URL", "postgresql://env:pw-env@db/x")
    got = _by_key(run_cli("settings", "--json").json())
    assert got["database.url"] == ("postgresql://env:***@db/x", "env DATABASE_URL")
    monkeypatch.setenv("WSCTL_DATABASE_URL", "postgresql://w:pw-wsctl@db/x")
    assert _by_key(run_cli("settings", "--json").json())["database.url"][1] == (
        "env WSCTL_DATABASE_URL"
    )
    r = run_cli("settings", url="host=db user=app password=pw-option dbname=x")
    assert r.code == 0, r.err
    assert "host=db user=app password=*** dbname=x\toption --database-url" in r.out
    assert "dispatch.limit\t50\tfile:" in r.out and "pw-" not in r.out + r.err


def test_settings_command_without_any_configuration(run_cli):
    r = run_cli("settings", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["files"] == []
    got = _by_key(doc)
    assert got["database.url"] == (None, "embedded")  # nothing is started to show it
    assert all(source == "default" for k, (_v, source) in got.items() if k != "database.url")
    r = run_cli("settings")
    assert r.code == 0 and "none (no wsctl.toml found)" in r.err


def test_settings_command_refuses_a_bad_file_with_exit_2(run_cli, tmp_path):
    (tmp_path / "wsctl.toml").write_text("[dispatch]\nlimit = 0\n")
    r = run_cli("settings", "--json")
    assert r.code == 2 and "dispatch.limit must be a whole number >= 1, not 0" in r.err
    assert r.out == ""


@pytest.mark.parametrize("command", ["dispatch", "doctor"])
def test_backend_option_shows_and_takes_only_its_choices(run_cli, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "200")
    r = run_cli(command, "--help")
    assert r.code == 0 and "--backend [modal|local]" in r.out and "--backend TEXT" not in r.out
    r = run_cli(command, "--backend", "cloud")
    assert r.code == 2 and "'cloud' is not one of 'modal', 'local'" in r.err


def test_a_backend_given_as_the_enum_resolves_to_its_name():
    d = settings.DispatchSettings().resolve(backend=settings.Backend.local)
    assert d.backend == "local" and type(d.backend) is str
    assert d.source("backend") == "option --backend"


def test_settings_command_refuses_a_malformed_url_without_showing_its_password(
    run_cli, monkeypatch
):
    monkeypatch.setenv("WSCTL_DATABASE_URL", "app:hunter2@db/x")
    r = run_cli("settings", "--json")
    assert r.code == 3 and "(from env WSCTL_DATABASE_URL)" in r.err
    assert "hunter2" not in r.out + r.err and r.out == ""
