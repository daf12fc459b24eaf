"""The one redaction for everything wsctl prints or logs (human and JSON), unless ``--reveal``.

Client configs hold Clay webhook URLs, API keys and tokens, and exception or
PostgreSQL error texts quote them. ``redact`` masks a config document;
``redact_text`` masks any text (a line, an error message, a log record). The
CLI passes everything it writes to stdout and stderr through ``redact_text``
(``wsctl.cli.output``), so a new command cannot forget to.

In a document:

* a value under a key that looks secret (its name contains key, token,
  secret, passw, pwd, auth, bearer, credential, hook (webhook), signature,
  cookie, session or private) is replaced by ``***``, recursively;
* a header list entry ``{"name": "X-Api-Key", "value": "..."}`` loses its value,
  an argument list ``["--token", "..."]`` the element after the option;
* a string holding a JSON document is redacted as a document;
* a secret reference ``{"$secret": "NAME"}`` (``wsctl.secrets``) is shown as is:
  it names the secret, it does not hold it.

In any text, only the credential goes and what says where it was stays:

* URLs: user info (``user:***@``; all of it when there is no ``:``), the value
  of token-like query and fragment parameters, a URL inside a parameter, the
  path of a webhook URL (``hook`` in its host or path: the path is the
  credential), the token of a Telegram-style ``/bot<token>/`` path segment;
* ``name: value``, ``name=value``, ``"name": "value"`` and ``--name value``
  where the name is a credential's (``X-Api-Key``, ``password``, ``token``,
  ``Authorization``, ...), keeping an auth scheme (``Bearer ***``);
* ``Bearer <token>`` anywhere, a string that is an Authorization value;
* tokens recognisable by their shape (``sk_live_...``, ``xoxb-...``,
  ``ghp_...``, ``AKIA...``, JWTs, Telegram bot tokens);
* every value the process has seen as a secret (``remember``): a config it
  resolved or showed, so that a PostgreSQL message quoting a config value
  (``invalid input syntax for type integer: "sk_..."``) is masked too.

The match on key names is deliberately broad (``monkey`` and ``author``
are hidden too): hiding a harmless value costs less than printing a secret.
Masked text stays valid JSON when the input was, and masking twice changes
nothing more.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

MASK = "***"
SECRET_REF = "$secret"  # a reference {"$secret": "NAME"}: see wsctl.secrets

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
# Names that announce a credential in free text (narrower than key names: in
# prose "key" alone is too common, e.g. "dedupe key").
_CRED_NAME = (
    r"[A-Za-z0-9_.-]*(?:token|secret|passw|pwd|passphrase|auth|bearer|credential|"
    r"api[_-]?key|access[_-]?key|private[_-]?key|signing[_-]?key|client[_-]?key|"
    r"signature|cookie|session[_-]?id)[A-Za-z0-9_.-]*"
)
_CRED_NAME_RE = re.compile(rf"{_CRED_NAME}|hook|private", re.IGNORECASE)
_SCHEME = r"(?:bearer|basic|token|digest)"
# A value in text: never a quote or a backslash (a masked JSON text stays JSON).
_BARE = r"[^\s\"\\<>,;&(){}\[\]]+"
# A bare value after "name=" or "name:": may hold a quote (pa'ss), not end with one.
_BARE_VALUE = r"(?P<v>[^\s\"\\<>,;&(){}\[\]][^\s\"\\<>,;&]*?)'?(?=[\s\"\\<>,;&)}\]]|$)"
_Q_DOUBLE = r'"(?P<dq>(?:[^"\\\n]|\\.)*)"'
_Q_SINGLE = r"'(?P<sq>[^'\\\n]*)'(?=[\s,;)}\]]|$)"

_RULES: list[re.Pattern[str]] = [
    # name: value, name=value, "name": "value", name = 'value' (header lines, libpq, JSON text);
    # never a URL's user name ("https://pwd:...@host": its user info has its own rule)
    re.compile(
        rf"(?<![A-Za-z0-9_.$/-])(?:{_CRED_NAME})[\"']?\s*[:=]\s*(?:{_SCHEME}\s+)?"
        rf"(?:{_Q_DOUBLE}|{_Q_SINGLE}|{_BARE_VALUE})",
        re.IGNORECASE,
    ),
    # --token VALUE (a command line quoted in a message)
    re.compile(rf"(?<![\w-])--(?:{_CRED_NAME})\s+(?P<v>[^\s\"\\-][^\s\"\\]*)", re.IGNORECASE),
    # Bearer <token> anywhere ("basic" and "token" are everyday words; "bearer" is not)
    re.compile(rf"\bbearer\s+(?P<v>{_BARE})", re.IGNORECASE),
    # a string that is an Authorization value: "Basic dXNlcjpwYXNz", "Token abc"
    re.compile(rf"^\s*{_SCHEME}\s+(?P<v>\S(?:.|\n)*)$", re.IGNORECASE),
    # tokens known by their shape
    re.compile(
        r"(?P<v>\b(?:[sr]k_(?:live|test)_[A-Za-z0-9]{6,}|sk-[A-Za-z0-9_-]{16,}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
        r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,}"
        r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"
        r"|\d{6,12}:[A-Za-z0-9_-]{30,}))"
    ),
]
# What any rule above needs to find in a text before it can match: most lines
# (ids, counts, timestamps) have none of it and skip the rules (one search of
# the lower-cased text for literals is several times faster than the rules).
_TRIGGER = re.compile(
    "token|secret|passw|pwd|auth|bearer|credential|key|signature|cookie|session|basic|"
    "digest|sk_|rk_|sk-|xox|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|akia|aiza|eyj"
)
_BOT_TOKEN_TAIL = re.compile(r":[A-Za-z0-9_-]{30}")  # the shape rule's 123456:<30+ chars>


def _triggered(text: str) -> bool:
    return bool(_TRIGGER.search(text.lower()) or _BOT_TOKEN_TAIL.search(text))


# A URL's user info: up to the last "@" before the path (quotes allowed: pa'ss).
_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?P<v>[^\s/?#\"\\<>]*)@")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?P<auth>[^\s/?#\"\\<>]*)(?P<rest>[^\s\"\\<>]*)")
_PARAM = re.compile(r"(?<=[?&#;])(?P<name>[^=&#\s\"\\]+)=(?P<v>[^&#\s\"\\<>]*)")
_BOT_SEGMENT = re.compile(r"/bot(?P<v>[^/?#\s\"\\]+)")
_MIN_KNOWN = 6  # shorter "secrets" would mask ordinary words

# Replaced, never changed in place: worker threads remember while output is written.
_known: frozenset[str] = frozenset()
_known_lock = threading.Lock()


def is_secret_key(key: Any) -> bool:
    """True when a mapping key's name looks like it holds a secret."""
    return isinstance(key, str) and _SECRET_KEY_RE.search(key) is not None


def _is_secret_param(name: str) -> bool:
    name = unquote(name)
    return is_secret_key(name) or name.lower() in _SECRET_PARAMS


def is_reference(value: Any) -> bool:
    """True for a secret reference ``{"$secret": "NAME"}`` (it holds a name, not a value)."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(SECRET_REF), str)


# --- text ---------------------------------------------------------------------


def _placeholder(value: str) -> bool:
    return value in ("", MASK, "...", "…", "value", "VALUE") or value.strip("*.") == ""


def _url_spans(text: str) -> Iterable[tuple[int, int]]:
    for m in _USERINFO.finditer(text):
        start, end = m.span("v")
        user, colon, _ = m.group("v").partition(":")
        if colon:  # user:password -> user:***
            start += len(user) + 1
        if end > start:
            yield start, end
    for m in _URL.finditer(text):
        host = m.group("auth").rpartition("@")[2]
        rest = m.group("rest").rstrip("'),.;:!")  # the sentence's punctuation, not the URL's
        base = m.start("rest")
        path_end = min([i for i in (rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)])
        path = rest[:path_end]
        if ("hook" in host.lower() or "hook" in path.lower()) and len(path) > 1:
            yield base + 1, base + path_end  # the path is the credential
        for b in _BOT_SEGMENT.finditer(path):
            yield base + b.start("v"), base + b.end("v")
        for p in _PARAM.finditer(rest):
            value = p.group("v")
            decoded = unquote(value)
            if _is_secret_param(p.group("name")) or ("://" in decoded and "@" in decoded):
                yield base + p.start("v"), base + p.end("v")


def _known_spans(text: str) -> Iterable[tuple[int, int]]:
    for secret in _known:  # the frozenset of this moment
        for form in {secret, json.dumps(secret)[1:-1]}:
            start = text.find(form)
            while start >= 0:
                if not _escaped(text, start):
                    yield start, start + len(form)
                start = text.find(form, start + 1)


def _escaped(text: str, i: int) -> bool:
    """True when ``text[i]`` follows an odd number of backslashes (inside an escape)."""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def secret_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) spans of ``text`` that ``redact_text`` masks, merged and sorted."""
    spans: list[tuple[int, int]] = []
    for rule in _RULES if _triggered(text) else ():
        for m in rule.finditer(text):
            for group in ("v", "dq", "sq"):
                if group in rule.groupindex and m.group(group) is not None:
                    start, end = m.span(group)
                    if not _placeholder(m.group(group)):
                        spans.append((start, end))
    if "://" in text:
        spans.extend(_url_spans(text))
    if _known:
        spans.extend(_known_spans(text))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact_text(text: str) -> str:
    """``text`` with every credential in it replaced by ``***``."""
    if not text:
        return text
    stripped = text.strip()
    if stripped[:1] in ("{", "[") and stripped[-1:] in ("}", "]"):
        try:
            doc = json.loads(stripped)
        except (ValueError, RecursionError):
            pass
        else:  # JSON inside a string: redact it as a document
            shown = _redact(doc)
            if shown != doc:  # keep the whitespace around it (a line's newline)
                head = text[: len(text) - len(text.lstrip())]
                tail = text[len(text.rstrip()) :]
                return head + json.dumps(shown, ensure_ascii=False) + tail
    spans = secret_spans(text)
    if not spans:
        return text
    out, last = [], 0
    for start, end in spans:
        out.append(text[last:start])
        out.append(MASK)
        last = end
    out.append(text[last:])
    return "".join(out)


def redact_url(url: str) -> str:
    """``url`` with its user info and token-like query parameters masked."""
    return redact_text(url)


# --- documents ----------------------------------------------------------------


def _mask_all(value: Any) -> Any:
    """Everything under a secret key: keep the shape, hide every scalar but None and booleans."""
    if is_reference(value):
        return value
    if isinstance(value, dict):
        return {k: _mask_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_all(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    return MASK


_HEADER_NAME_KEYS = ("name", "key", "header", "field")
_HEADER_VALUE_KEYS = ("value", "val", "content")


def _header_entry(doc: dict) -> bool:
    """``{"name": "X-Api-Key", "value": ...}``: a header (or env) list entry naming a secret."""
    return any(is_secret_key(doc.get(k)) for k in _HEADER_NAME_KEYS if isinstance(doc.get(k), str))


def _secret_option(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value.startswith("-")
        and "=" not in value
        and is_secret_key(value.lstrip("-"))
    )


def redact(value: Any, *, reveal: bool = False) -> Any:
    """A redacted deep copy of ``value`` (dicts, lists, strings); ``reveal`` returns it as is.

    What it masks is remembered (``remember``): a later error quoting one of
    those values is masked too.
    """
    if reveal:
        return value
    if isinstance(value, dict | list | tuple):
        remember(value)
    return _redact(value)


def _redact(value: Any) -> Any:
    if is_reference(value):
        return value
    if isinstance(value, dict):
        header = _header_entry(value)
        out = {}
        for k, v in value.items():
            if is_secret_key(k) or (header and k in _HEADER_VALUE_KEYS):
                out[k] = _mask_all(v)
            else:
                out[k] = _redact(v)
        return out
    if isinstance(value, list | tuple):
        items = [_redact(v) for v in value]
        for i in range(1, len(items)):  # ["--token", "..."]: the option's argument
            if _secret_option(value[i - 1]) and not _secret_option(value[i]):
                items[i] = _mask_all(value[i])
        return items
    if isinstance(value, str):
        return redact_text(value)
    return value


# --- secrets this process has seen ---------------------------------------------


def key_path(parent: str, key: str | int) -> str:
    """``parent.key`` or ``parent[i]``: how wsctl names a place in a config document."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def is_credential_name(key: Any) -> bool:
    """True when a key names a credential for sure (``api_key``, ``token``, ``webhook_url``).

    Narrower than ``is_secret_key``, which also hides ``dedupe_key``: what is
    masked to be safe is not all worth a warning.
    """
    return isinstance(key, str) and _CRED_NAME_RE.search(key) is not None


def secret_findings(doc: Any) -> list[tuple[str, str, bool]]:
    """``(key path, value, sure)`` for every value ``redact`` masks in ``doc`` (not references).

    The key path reads ``headers[0].value``; a credential inside a string is
    reported with that string's path. ``sure`` is False for a value masked
    only because its key merely looks secret (``dedupe_key``, ``monkey``).
    """
    found: list[tuple[str, str, bool]] = []

    def scalars(path: str, v: Any, sure: bool = True) -> None:
        if is_reference(v):
            return
        if isinstance(v, dict):
            for k, x in v.items():
                scalars(key_path(path, k), x, sure)
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                scalars(key_path(path, i), x, sure)
        elif v is not None and not isinstance(v, bool) and str(v) not in ("", MASK):
            found.append((path, str(v), sure))

    def walk(path: str, v: Any) -> None:
        if is_reference(v):
            return
        if isinstance(v, dict):
            header = _header_entry(v)
            for k, x in v.items():
                if header and k in _HEADER_VALUE_KEYS:
                    scalars(key_path(path, k), x)
                elif is_secret_key(k):
                    scalars(key_path(path, k), x, is_credential_name(k))
                else:
                    walk(key_path(path, k), x)
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                if i and _secret_option(v[i - 1]) and not _secret_option(x):
                    scalars(key_path(path, i), x)
                else:
                    walk(key_path(path, i), x)
        elif isinstance(v, str):
            stripped = v.strip()
            if stripped[:1] in ("{", "["):
                try:
                    walk(path, json.loads(stripped))
                    return
                except (ValueError, RecursionError):
                    pass
            found.extend((path, v[s:e], True) for s, e in secret_spans(v) if v[s:e] != MASK)

    walk("", doc)
    return found


def secret_values(doc: Any) -> set[str]:
    """The values ``redact`` masks in ``doc``: what a message quoting the config must not show."""
    return {v for _, v, _ in secret_findings(doc) if len(v) >= _MIN_KNOWN}


def remember(doc: Any) -> None:
    """Mask the secrets of ``doc`` (a config) wherever this process prints them later."""
    remember_values(secret_values(doc))


def remember_values(values: Iterable[str]) -> None:
    """Mask these exact values (resolved secret references) wherever printed later."""
    global _known
    new = {v for v in values if isinstance(v, str) and len(v) >= _MIN_KNOWN}
    if not new <= _known:
        with _known_lock:
            _known = _known | new


def forget() -> None:
    """Forget every remembered value (the CLI starts each command with none)."""
    global _known
    with _known_lock:
        _known = frozenset()


# --- exceptions, database URLs and logs ------------------------------------------


def first_line(exc: BaseException, *, typed: bool = False, limit: int = 2000) -> str:
    """The first non-blank line of an exception's text, redacted and whitespace-collapsed.

    An exception without text gives its class name; ``typed`` puts the class
    name in front (``ValueError: ...``), for texts that mean little alone.
    """
    try:
        text = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
    except Exception:  # a broken __str__ must not hide the error itself
        text = ""
    text = " ".join(text.split())
    name = type(exc).__name__
    if not text:
        return name
    if typed:
        text = f"{name}: {text}"
    return redact_text(text)[:limit]


def mask_url(url: Any) -> str:
    """A database URL fit to print: ``redact_text``, and all user info when it is unclear.

    The one masker serves: ``user:***@``, ``password=***`` (query parameter or
    key=value conninfo). When the URL cannot be split where libpq would split
    it (one slash, no scheme, an "@" after a "/", an unterminated IPv6 host),
    everything before the host goes: when in doubt, print less. Never raises.
    """
    if url is None or url == "":
        return "<none>"
    if not isinstance(url, str):
        return f"<a {type(url).__name__}, not shown>"
    if "://" not in url:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/[^/]", url) and "@" in url:
            scheme, _, rest = url.partition(":")  # postgresql:/u:pw@host: one slash
            url = f"{scheme}:/{MASK}@{rest.rpartition('@')[2]}"
        elif "@" in url and "=" not in url.split("@", 1)[0]:
            url = f"{MASK}@{url.rpartition('@')[2]}"  # user:pw@host/db without a scheme
        return redact_text(url)
    scheme, _, rest = url.partition("://")
    cut = min(
        [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)]
    )
    authority, tail = rest[:cut], rest[cut:]
    if "@" in tail.split("?")[0] and "@" not in authority:  # "@" after a "/" in the user info
        url = f"{scheme}://{MASK}@{tail.rpartition('@')[2]}"
    elif "@" in authority:
        userinfo, _, hostport = authority.rpartition("@")
        if "[" in hostport and "]" not in hostport:  # unterminated IPv6 host
            url = f"{scheme}://{MASK}@{hostport}{tail}"
        elif ":" not in userinfo:  # a database user name alone is not a secret: keep it
            rest = redact_text(f"{scheme}://{hostport}{tail}")[len(scheme) + 3 :]
            return f"{scheme}://{userinfo}@{rest}"
    return redact_text(url)


class RedactingFilter(logging.Filter):
    """A logging filter that formats each record once and masks its text (worker-helper logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        record.msg, record.args = redact_text(message), None
        return True
