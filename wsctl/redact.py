"""Secret redaction for everything wsctl prints (human and JSON), unless ``--reveal``.

Client configs hold Clay webhook URLs, API keys and tokens. Three rules:

* a value under a key that looks secret (its name contains key, token,
  secret, passw, pwd, auth, bearer, credential, hook (webhook), signature,
  cookie, session or private) is replaced by ``***``, recursively for nested
  values;
* a string that is an Authorization header value (``Bearer ...``,
  ``Basic ...``, ``Token ...``, ``Digest ...``, any case), or contains
  ``Authorization: <scheme> <credential>`` or ``Bearer <token>`` anywhere,
  keeps the scheme and loses the credential: ``Bearer ***``;
* any URL inside any string has its user info and its token-like query
  parameters replaced by ``***``, and a webhook URL (``hook`` in its host
  or path) its whole path, since the path is the credential.

The match on key names is deliberately broad (``monkey`` and ``author``
are hidden too): hiding a harmless value costs less than printing a secret.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

_SECRET_WORDS = (
    "key",
    "token",
    "secret",
    "passw",
    "pwd",
    "auth",
    "bearer",
    "credential",
    "hook",  # webhook URLs are credentials: whoever has one can post to it
    "signature",
    "cookie",
    "session",
    "private",
)
_SECRET_KEY_RE = re.compile("|".join(_SECRET_WORDS), re.IGNORECASE)
# Query parameters that carry credentials even though their names are short.
_SECRET_PARAMS = {"sig", "code", "pass", "jwt", "hmac", "x-amz-security-token"}
_URL_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")
# libpq key=value connection strings: password=... anywhere in a string.
# A quoted value counts only when it ends there (else the whole token is masked,
# so masking twice gives the same text).
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'(?=\s|$)|\S+)", re.IGNORECASE)
# An Authorization header value: the scheme stays, the credential goes.
_AUTH_SCHEMES = r"(?:bearer|basic|token|digest)"
_AUTH_VALUE = re.compile(rf"^(\s*{_AUTH_SCHEMES}\s+)\S.*$", re.IGNORECASE | re.DOTALL)
_AUTH_HEADER = re.compile(
    rf"(\bauthorization\s*[:=]\s*(?:{_AUTH_SCHEMES}\s+)?)[^\s\"'<>]+", re.IGNORECASE
)
# "Bearer <token>" anywhere ("basic" and "token" are everyday words; "bearer" is not).
_BEARER_ANYWHERE = re.compile(r"(\bbearer\s+)[^\s\"'<>]+", re.IGNORECASE)


def is_secret_key(key: Any) -> bool:
    """True when a mapping key's name looks like it holds a secret."""
    return isinstance(key, str) and _SECRET_KEY_RE.search(key) is not None


def _is_secret_param(name: str) -> bool:
    return is_secret_key(name) or name.lower() in _SECRET_PARAMS


def redact_url(url: str) -> str:
    """``url`` with its user info and token-like query parameters masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.partition(":")[0]
            userinfo = f"{user}:{MASK}"
        else:  # a bare token as the user name (https://TOKEN@host)
            userinfo = MASK
        netloc = f"{userinfo}@{hostport}"
    path = parts.path
    if "hook" in parts.netloc.lower() or "hook" in path.lower():
        path = f"/{MASK}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret_param(k) for k, _ in pairs):
            query = urlencode(
                [(k, MASK if _is_secret_param(k) else v) for k, v in pairs], safe="/:*,"
            )
    fragment = parts.fragment
    if (
        fragment
        and ("=" in fragment)
        and any(_is_secret_param(k) for k, _ in parse_qsl(fragment, keep_blank_values=True))
    ):
        fragment = MASK  # OAuth implicit flow: #access_token=...
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def redact_text(text: str) -> str:
    """Mask credentials inside URLs, ``password=`` pairs and Authorization values in a string."""
    text = _AUTH_VALUE.sub(rf"\g<1>{MASK}", text)
    text = _AUTH_HEADER.sub(rf"\g<1>{MASK}", text)
    text = _BEARER_ANYWHERE.sub(rf"\g<1>{MASK}", text)
    if "://" in text:
        text = _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    if "=" in text:
        text = _KV_PASSWORD.sub(rf"\g<1>{MASK}", text)
    return text


def _mask_all(value: Any) -> Any:
    """Everything under a secret key: keep the shape, hide every scalar but None and booleans."""
    if isinstance(value, dict):
        return {k: _mask_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_all(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    return MASK


def redact(value: Any, *, reveal: bool = False) -> Any:
    """A redacted deep copy of ``value`` (dicts, lists, strings); ``reveal`` returns it as is."""
    if reveal:
        return value
    if isinstance(value, dict):
        return {k: (_mask_all(v) if is_secret_key(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
