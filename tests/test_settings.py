"""Settings precedence, wsctl init, URL masking and pooler detection (no database needed)."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsctl import settings
from wsctl.db import mask_url
from wsctl.errors import UsageError


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
    assert s.dispatch["concurrency"] == 16
    assert s.dispatch["limit"] == 50
    assert s.dispatch["lease_seconds"] == 300


@pytest.mark.parametrize(
    "body, message",
    [
        ("[database\n", "not valid TOML"),
        ("[database]\nfoo = 1\n", "unknown key database.foo"),
        ("[dispatch]\nbogus = 1\n", "unknown key dispatch.bogus"),
        ('[database]\npooler = "sometimes"\n', "pooler"),
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
    assert r.code == 2
    assert "--force" in r.err and len(r.err.strip().splitlines()) == 1
    assert (tmp_path / "wsctl.toml").read_text() == before

    r = run_cli("init", "--force")
    assert r.code == 0
    assert "url" not in tomllib.loads((tmp_path / "wsctl.toml").read_text())["database"]
    # The file it wrote is read back by settings.load().
    assert settings.load().dispatch["lease_seconds"] == 300


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
