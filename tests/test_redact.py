"""Secret redaction and slug validation: examples and hypothesis properties (no database)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsctl.domain import MAX_SLUG, SLUG_RE, validate_slug
from wsctl.errors import OperationalError
from wsctl.redact import MASK, is_secret_key, redact, redact_text, redact_url

SECRET_WORDS = ["key", "token", "secret", "password", "auth", "credential", "webhook"]

# A secret: long and distinctive, so "does it appear in the output" is meaningful.
secrets = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=12, max_size=40)
plain_keys = st.sampled_from(["clay_table", "threshold", "fields", "name", "mapping", "limit"])
secret_keys = st.builds(
    lambda pre, word, post, upper: (pre + word + post).upper() if upper else pre + word + post,
    st.sampled_from(["", "api_", "clay_", "x-", "my"]),
    st.sampled_from(SECRET_WORDS),
    st.sampled_from(["", "_url", "s", "_id", "Value"]),
    st.booleans(),
)
json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def test_examples():
    config = {
        "clay_table": "companies",
        "webhook_url": "https://api.clay.com/v3/sources/webhook/abc",
        "api_key": "sk-live-123",
        "nested": {"Authorization": "Bearer xyz", "fields": ["a", "b"]},
        "callback": "https://user:hunter2@example.com/cb?token=T0K&page=2",
        "endpoints": ["https://TOKEN123@github.com/org/repo", "https://example.com/?a=1"],
        "note": "use postgresql://app:pw@db:5432/x or host=db password=pw dbname=x",
        "retries": 3,
        "credentials": {"user": "u", "pass": "p", "enabled": True, "expires": None},
    }
    out = redact(config)
    assert out["clay_table"] == "companies" and out["retries"] == 3
    assert out["webhook_url"] == MASK and out["api_key"] == MASK
    assert out["nested"] == {"Authorization": MASK, "fields": ["a", "b"]}
    assert out["callback"] == "https://user:***@example.com/cb?token=***&page=2"
    assert out["endpoints"] == ["https://***@github.com/org/repo", "https://example.com/?a=1"]
    assert "pw" not in out["note"] and "app:***@db" in out["note"] and "password=***" in out["note"]
    # shape kept under a secret key; booleans and None carry nothing
    assert out["credentials"] == {"user": MASK, "pass": MASK, "enabled": True, "expires": None}
    assert redact(config, reveal=True) is config
    assert config["api_key"] == "sk-live-123"  # the input is not modified


def test_webhook_urls_hide_their_path():
    out = redact_text(
        "post to https://hooks.slack.com/services/T0/B0/XYZ and https://x.io/webhook/abc"
    )
    assert out == "post to https://hooks.slack.com/*** and https://x.io/***"


def test_url_fragment_tokens_are_hidden():
    assert "abc" not in redact_url("https://app.example.com/cb#access_token=abc&x=1")


@given(key=secret_keys, value=secrets)
def test_values_under_secret_keys_never_show(key, value):
    assert is_secret_key(key)
    doc = {"outer": [{key: value}, {"deeper": {key: [value, {"x": value}]}}]}
    assert value not in json.dumps(redact(doc))
    assert value in json.dumps(redact(doc, reveal=True))


@given(user=st.from_regex(r"[a-z]{1,8}", fullmatch=True), password=secrets, token=secrets)
def test_credentials_in_urls_never_show(user, password, token):
    url = f"https://{user}:{password}@hooks.example.com/p/{user}?access_token={token}&page=2"
    doc = {"plain": url, "list": [f"see {url} now"]}
    text = json.dumps(redact(doc))
    assert password not in text and token not in text
    assert "hooks.example.com" in text and "page=2" in text


@given(key=plain_keys, value=st.text(max_size=30).filter(lambda s: "://" not in s and "=" not in s))
def test_plain_values_are_left_alone(key, value):
    assert redact({key: value}) == {key: value}
    assert redact_text(value) == value


@given(doc=json_values)
def test_redaction_is_idempotent_and_keeps_json_shape(doc):
    once = redact(doc)
    assert redact(once) == once
    json.dumps(once)  # still serialisable
    assert type(once) is type(doc) or (isinstance(doc, tuple) and isinstance(once, list))


# --- slugs -----------------------------------------------------------------


@given(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,60}", fullmatch=True))
def test_valid_slugs_pass(slug):
    assert validate_slug(slug, "workflow slug") == slug


@given(st.text(max_size=40).filter(lambda s: not SLUG_RE.fullmatch(s)))
def test_invalid_slugs_are_refused_with_one_line(value):
    with pytest.raises(OperationalError) as info:
        validate_slug(value, "workstream slug")
    assert "invalid workstream slug" in info.value.one_line()
    assert "\n" not in info.value.one_line()


@pytest.mark.parametrize(
    "value",
    ["acme'; DROP TABLE batches; --", "Apollo", "_x", "-x", "a b", "a;b", "", "é", "a" * 201],
)
def test_hostile_and_odd_slugs(value):
    with pytest.raises(OperationalError, match="invalid slug"):
        validate_slug(value)


@given(st.integers(min_value=MAX_SLUG + 1, max_value=20_000))
def test_overlong_slugs_say_too_long_in_one_short_line(length):
    with pytest.raises(OperationalError) as info:
        validate_slug("a" * length, "workflow slug")
    message = info.value.one_line()
    assert f"too long ({length} characters; at most {MAX_SLUG})" in message
    assert "lower-case" not in message and len(message) < 150


def test_slug_of_exactly_max_length_passes():
    assert validate_slug("a" * MAX_SLUG) == "a" * MAX_SLUG


# --- bearer keys and Authorization header values ---------------------------

auth_schemes = st.builds(
    lambda word, case: getattr(word, case)(),
    st.sampled_from(["bearer", "basic", "token"]),
    st.sampled_from(["lower", "upper", "title"]),
)
bearer_keys = st.builds(
    lambda pre, post, upper: (pre + "bearer" + post).upper() if upper else pre + "bearer" + post,
    st.sampled_from(["", "api_", "x-", "my"]),
    st.sampled_from(["", "_token", "s", "Value"]),
    st.booleans(),
)


def test_bearer_examples():
    config = {
        "bearer": "xyz-SECRET",
        "headers": {"X-Api": "Bearer abc123", "Accept": "application/json"},
        "plan": "Basic",  # a scheme word alone carries nothing
        "curl": 'curl -H "Authorization: Bearer t0ken" https://api.example.com/v1',
        "list": ["basic dXNlcjpwYXNz", "TOKEN  abc", "Digest d1"],
    }
    out = redact(config)
    assert out["bearer"] == MASK
    assert out["headers"] == {"X-Api": "Bearer ***", "Accept": "application/json"}
    assert out["plan"] == "Basic"
    assert out["curl"] == 'curl -H "Authorization: Bearer ***" https://api.example.com/v1'
    assert out["list"] == ["basic ***", "TOKEN  ***", "Digest ***"]
    assert redact(config, reveal=True) == config


@given(key=bearer_keys, value=secrets)
def test_values_under_bearer_keys_never_show(key, value):
    assert is_secret_key(key)
    doc = {"outer": [{key: value}, {"deeper": {key: [value, {"x": value}]}}]}
    assert value not in json.dumps(redact(doc))
    assert value in json.dumps(redact(doc, reveal=True))


@given(
    key=plain_keys,
    scheme=auth_schemes,
    space=st.sampled_from([" ", "  ", "\t"]),
    lead=st.sampled_from(["", " "]),
    credential=secrets,
    tail=st.sampled_from(["", " trailing words", "==", "\nsecond line"]),
)
def test_authorization_values_never_show_their_credential(
    key, scheme, space, lead, credential, tail
):
    value = f"{lead}{scheme}{space}{credential}{tail}"
    doc = {key: value, "list": [value], "nested": {key: [{"v": value}]}}
    out = redact(doc)
    text = json.dumps(out)
    assert credential not in text
    assert out[key] == f"{lead}{scheme}{space}{MASK}"  # the scheme is kept
    assert redact(out) == out
    assert redact(doc, reveal=True) == doc


@given(
    prefix=st.sampled_from(["", "curl -H '", "headers: ", '-H "']),
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "Token ", ""]),
    credential=secrets,
    sep=st.sampled_from([": ", ":", "=", " = "]),
)
def test_authorization_headers_inside_text_never_show_their_credential(
    prefix, scheme, credential, sep
):
    text = f"{prefix}Authorization{sep}{scheme}{credential}' and more"
    out = redact_text(text)
    assert credential not in out and "and more" in out
    assert redact_text(out) == out


@given(before=st.sampled_from(["", "use ", "-H '"]), credential=secrets)
def test_bearer_tokens_anywhere_never_show(before, credential):
    out = redact_text(f"{before}Bearer {credential}' please")
    assert credential not in out and "Bearer ***" in out


@pytest.mark.parametrize(
    "text", ["password=''Bearer x", "password='a'b", "Authorization: Bearer ***", "bearer  ***"]
)
def test_masking_twice_changes_nothing_more(text):
    once = redact_text(text)
    assert redact_text(once) == once


# --- every shape issue 12 lists, and exception texts --------------------------

S = "Z7QK2M9XW4RT8BPL"  # a distinctive secret


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"https://user:pa'{S}@api.example.com/v1", "https://user:***@api.example.com/v1"),
        (
            f"https://app.example.com/cb?next=https://u:{S}@internal/x&page=2",
            "https://app.example.com/cb?next=***&page=2",
        ),
        (
            f"https://app.example.com/cb?next=https%3A%2F%2Fu%3A{S}%40internal",
            "https://app.example.com/cb?next=***",
        ),
        (f"X-Api-Key: {S}", "X-Api-Key: ***"),
        (f'curl -H "X-Api-Key: {S}" https://api.example.com', 'curl -H "X-Api-Key: ***" https://api.example.com'),
        (
            f"https://api.telegram.org/bot123456789:{S}/sendMessage",
            "https://api.telegram.org/bot***/sendMessage",
        ),
        (f'{{"client_secret": "{S}", "n": 1}}', '{"client_secret": "***", "n": 1}'),
        (f"run --token {S} --verbose", "run --token *** --verbose"),
        (
            f"ValueError: not an http(s) URL: 'htps://api.clay.com/v3/sources/webhook/{S}'",
            "ValueError: not an http(s) URL: 'htps://api.clay.com/***'",
        ),
        ('invalid input syntax for type integer: "sk_live_PGSECRET1"', 'invalid input syntax for type integer: "***"'),
        (f'config {{"password": "{S}"}} refused', 'config {"password": "***"} refused'),
        ('"$secret": "CLAY_AUTH_ACME"', '"$secret": "CLAY_AUTH_ACME"'),  # a name, not a value
        ("expected key=value", "expected key=value"),
        ("dedupe_key: email", "dedupe_key: email"),
    ],
)  # fmt: skip
def test_every_shape_in_text(text, shown):
    assert redact_text(text) == shown
    assert redact_text(shown) == shown


def test_every_shape_in_a_document():
    doc = {
        "headers": [{"name": "X-Api-Key", "value": S}, {"name": "Accept", "value": "json"}],
        "argv": ["run", "--token", S, "--verbose"],
        "payload": json.dumps({"token": S, "table": "t"}),
        "auth": {"$secret": "CLAY_AUTH"},
        "api_key": {"$secret": "CLAY_KEY"},
    }
    out = redact(doc)
    assert out["headers"] == [{"name": "X-Api-Key", "value": MASK}, doc["headers"][1]]
    assert out["argv"] == ["run", "--token", MASK, "--verbose"]
    assert json.loads(out["payload"]) == {"token": MASK, "table": "t"}
    assert out["auth"] == doc["auth"] and out["api_key"] == doc["api_key"]


def test_known_values_are_masked_wherever_they_appear_later():
    from wsctl import redact as r

    r.forget()
    try:
        redact({"threshold_token": "Q9W8E7R6T5Y4"})  # shown once: now known
        assert redact_text('invalid input syntax for type integer: "Q9W8E7R6T5Y4"') == (
            'invalid input syntax for type integer: "***"'
        )
        r.remember_values(["V1V2V3V4V5"])
        assert redact_text("escaped \\V1V2V3V4V5 stays, plain V1V2V3V4V5 goes") == (
            "escaped \\V1V2V3V4V5 stays, plain *** goes"
        )
    finally:
        r.forget()
    assert redact_text("Q9W8E7R6T5Y4") == "Q9W8E7R6T5Y4"


@given(
    doc=st.dictionaries(
        st.sampled_from(["a", "api_key", "headers", "note"]),
        st.builds(
            lambda pre, s, post: f"{pre}{s}{post}",
            st.sampled_from(
                ["X-Api-Key: ", "https://u:", "Bearer ", '"token": "', "--token ", '\\"']
            ),
            secrets,
            st.sampled_from(["@h/x", '"', "\\", "", " rest", '\\"']),
        ),
        max_size=4,
    )
)
def test_masked_json_text_stays_json(doc):
    text = json.dumps(doc)
    assert json.loads(redact_text(text)).keys() == doc.keys()


def test_first_line_is_the_one_exception_helper():
    from wsctl.redact import first_line

    assert first_line(ValueError("\n  first   line \nsecond")) == "first line"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("boom"), typed=True) == "ValueError: boom"
    assert (
        first_line(RuntimeError(f"POST https://u:{S}@h/x failed"))
        == "POST https://u:***@h/x failed"
    )
    assert len(first_line(ValueError("x" * 5000))) == 2000


def test_the_stream_edge_masks_a_secret_split_between_writes(capsys):
    import sys

    from wsctl.cli.output import redacting

    with redacting():
        sys.stdout.write("Authorization: Bea")
        sys.stdout.write(f"rer {S[:5]}")
        sys.stdout.write(f"{S[5:]} done\npartial X-Api-Key: {S}")
        sys.stderr.write(f"err https://u:{S}@h\n")
    out, err = capsys.readouterr()
    assert S not in out + err
    assert out == "Authorization: Bearer *** done\npartial X-Api-Key: ***"
    assert err == "err https://u:***@h\n"


def test_reveal_lifts_the_edge_on_stdout_only(capsys):
    import sys

    from wsctl.cli.output import redacting

    with redacting(reveal=True):
        sys.stdout.write(f"token={S}\n")
        sys.stderr.write(f"token={S}\n")
    out, err = capsys.readouterr()
    assert out == f"token={S}\n" and err == "token=***\n"


# --- database URLs: masked whatever their shape, the problem named -----------

URL_CASES = [
    ("postgresq://u:hunter2@127.0.0.1:1/x", "postgresq://u:***@127.0.0.1:1/x", "unknown scheme 'postgresq'"),
    ("mysql://u:hunter2@127.0.0.1:1/x", "mysql://u:***@127.0.0.1:1/x", "unknown scheme 'mysql'"),
    ("postgresql:/u:hunter2@127.0.0.1:1/x", "postgresql:/***@127.0.0.1:1/x", "one slash after the scheme"),
    ("u:hunter2@127.0.0.1:1/x", "***@127.0.0.1:1/x", "no scheme"),
    ("postgresql://u:hunter2%zz@127.0.0.1:1/x", "postgresql://u:***@127.0.0.1:1/x", "bad percent-encoding in the user name or password"),
    ("postgresql://u:hunter2@127.0.0.1:1/x%zz", "postgresql://u:***@127.0.0.1:1/x%zz", "bad percent-encoding"),
    ("postgresql://u:hunter2@[::1:1/x", "postgresql://***@[::1:1/x", "unterminated IPv6 host"),
    ("postgresql://u:hun/ter2@127.0.0.1:1/x", "postgresql://***@127.0.0.1:1/x", "must be percent-encoded"),
    ("postgresql://u:hunter2@127.0.0.1:port/x", "postgresql://u:***@127.0.0.1:port/x", "the port is not a number"),
]  # fmt: skip


@pytest.mark.parametrize("url, masked, problem", URL_CASES)
def test_malformed_database_urls_name_the_problem_and_never_the_password(
    run_cli, monkeypatch, url, masked, problem
):
    from wsctl.redact import mask_url
    from wsctl.settings import database_url_problem

    assert mask_url(url) == masked
    assert problem in database_url_problem(url)
    r = run_cli("batch", "list", url=url)  # the option: a usage error
    assert r.code == 2, r.err
    (line,) = r.err.strip().splitlines()
    assert line == (
        f"wsctl: error: invalid database URL {masked} (from option --database-url): "
        + line.split("--database-url): ", 1)[1]
    )
    assert problem in line and "hunter2" not in r.err + r.out
    monkeypatch.setenv("WSCTL_DATABASE_URL", url)  # the environment: exit 3
    r = run_cli("config", "list")
    assert r.code == 3 and "(from env WSCTL_DATABASE_URL)" in r.err and "hunter2" not in r.err


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@127.0.0.1:5432/x?sslmode=require",
        "postgres://u@[::1]:5432/x",
        "postgresql://h1:5432,h2:5433/x",
        "postgresql:///x?host=/tmp",
        "host=127.0.0.1 dbname=x password=pw",
    ],
)
def test_good_database_urls_pass_the_check(url):
    from wsctl.settings import database_url_problem

    assert database_url_problem(url) is None


def test_a_non_string_url_in_wsctl_toml_is_never_echoed(run_cli, tmp_path):
    (tmp_path / "wsctl.toml").write_text('[database]\nurl = ["postgresql://u:hunter2@h/x"]\n')
    r = run_cli("batch", "list")
    assert r.code == 2
    (line,) = r.err.strip().splitlines()
    assert line == (
        f"wsctl: error: {tmp_path / 'wsctl.toml'}: database.url must be a string, not an array "
        "(its value is not shown: it may hold a password)"
    )


def test_a_user_name_that_reads_like_a_credential_keeps_the_host():
    """Found by hypothesis: "https://pwd:...@host" was taken for a "pwd: value" header line
    and the host and the rest of the URL were masked with the password."""
    url = "https://pwd:222222222222@hooks.example.com/p?access_token=222222222222&page=2"
    text = json.dumps(redact({"plain": url}))
    assert "222222222222" not in text
    assert "hooks.example.com" in text and "page=2" in text
