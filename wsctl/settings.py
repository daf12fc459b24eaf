"""Where wsctl's settings come from, highest first.

Database URL: the ``--database-url`` option, ``WSCTL_DATABASE_URL``,
``DATABASE_URL``, ``./wsctl.toml``, the user config file
(``<user config dir>/wsctl/wsctl.toml``), then the embedded PostgreSQL.
Other keys (``[database]`` and ``[dispatch]`` tables) come from
``./wsctl.toml`` over the user config file over the defaults here.
"""

from __future__ import annotations

import math
import os
import re
import threading
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsctl.errors import EnvError, OperationalError, UsageError

if TYPE_CHECKING:
    from wsctl.dispatch.engine import PassOptions

DATABASE_DEFAULTS: dict[str, Any] = {
    "pooler": "session",
    "connect_timeout": 10,
    "statement_timeout": "5min",
    "lock_timeout": "5s",
    "prepared_statements": False,
}


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    url_source: str  # which rule gave the URL: option, env:WSCTL_DATABASE_URL, file:..., embedded
    pooler: str = "session"
    connect_timeout: int = 10
    statement_timeout: str = "5min"
    # How long any statement waits for a lock before it fails (SET LOCAL in each transaction).
    lock_timeout: str = "5s"
    # Server-side prepared statements: off by default, so that a transaction-mode pooler
    # on any port works undeclared; only ever on for a direct or session connection.
    prepared_statements: bool = False
    dispatch: DispatchSettings = field(default_factory=lambda: DispatchSettings())
    files: tuple[str, ...] = ()
    #: where each ``[database]`` key's value came from (absent: the default)
    database_sources: Mapping[str, str] = field(default_factory=dict)

    def database_source(self, key: str) -> str:
        return self.database_sources.get(key, DEFAULT_SOURCE)

    @property
    def transaction_pooler(self) -> bool:
        """True behind a transaction-mode pooler: explicit setting or Supabase's port 6543."""
        if self.pooler == "transaction":
            return True
        return self.database_url is not None and url_port(self.database_url) == 6543

    def with_url(self, url: str, source: str) -> Settings:
        return replace(self, database_url=url, url_source=source)


def user_config_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("wsctl", appauthor=False)) / "wsctl.toml"


def user_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("wsctl", appauthor=False))


def local_config_path() -> Path:
    return Path.cwd() / "wsctl.toml"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise EnvError(f"{path}: cannot read: {exc.strerror}") from None


def url_port(url: str) -> int | None:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        if parts.port:
            return parts.port
        port = parse_qs(parts.query).get("port")
        return int(port[0]) if port else None
    except ValueError:
        return None


# --- value checks ----------------------------------------------------------
# Each check returns the value to use, or the phrase the error puts after
# "must be" through _Invalid. Values are checked as each file is read, so the
# error names the file that holds the bad value.


class _Invalid(Exception):
    pass


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        return repr(value if len(value) <= 60 else f"{value[:57]}...")
    else:
        text = str(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _whole_number(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise _Invalid("a whole number >= 1")


def _seconds_check(at_least_zero: bool) -> Callable[[Any], float]:
    """A number of seconds: > 0, or >= 0 where zero means "at once" (as the option takes it)."""
    bound = "a number of seconds >= 0" if at_least_zero else "a number of seconds > 0"

    def check(value: Any) -> float:
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value >= 0 if at_least_zero else value > 0)
        ):
            return float(value)
        raise _Invalid(bound)

    return check


_positive_seconds = _seconds_check(at_least_zero=False)
#: interval (passes back to back), record_retry_seconds (no retry), grace (stop at once)
_seconds = _seconds_check(at_least_zero=True)


def _text(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise _Invalid("a non-empty string")


def _optional_text(value: Any) -> str | None:
    """A string; empty means unset (Modal's default environment)."""
    if isinstance(value, str):
        return value.strip() or None
    raise _Invalid("a string")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid("true or false")


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value in choices:
            return value
        raise _Invalid(" or ".join(repr(c) for c in choices))

    return check


# PostgreSQL's units for a time setting in milliseconds (statement_timeout).
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)?$")
_PG_INT_MAX = 2**31 - 1  # statement_timeout's upper bound, in ms


def _duration(value: Any) -> str:
    """A statement_timeout: ``"5min"``, ``"30s"``, ``"500ms"``, ``"0"`` or an integer of ms."""
    why = "a PostgreSQL duration such as '5min', '30s', '500ms' or '0' (units ms, s, min, h, d)"
    ms: float
    if isinstance(value, int) and not isinstance(value, bool):
        ms, text = value, str(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        ms = float(m.group(1)) * _DURATION_UNITS_MS[m.group(2) or "ms"]
        text = value.strip()
    else:
        raise _Invalid(why)
    if not 0 <= ms <= _PG_INT_MAX:
        raise _Invalid(f"{why}, from 0 to {_PG_INT_MAX} ms")
    return text


def duration_ms(value: str | int) -> float:
    """Milliseconds of a PostgreSQL time setting (``"10s"``, ``"500ms"``, ``"0"``, ``250``)."""
    try:
        text = _duration(value)
    except _Invalid as exc:
        raise UsageError(f"{value!r} is not {exc}") from None
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:  # an integer of milliseconds
        return float(text)
    return float(m.group(1)) * _DURATION_UNITS_MS[m.group(2) or "ms"]


DATABASE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "pooler": _one_of("session", "transaction"),
    "connect_timeout": _whole_number,
    "statement_timeout": _duration,
    "lock_timeout": _duration,
    "prepared_statements": _boolean,
}

DEFAULT_SOURCE = "default"


class Backend(StrEnum):
    """Where ``wsctl dispatch`` runs the functions (``--backend``, ``dispatch.backend``)."""

    modal = "modal"
    local = "local"


def _setting(default: Any, check: Callable[[Any], Any], about: str) -> Any:
    """A ``[dispatch]`` field: its default, the check a wsctl.toml value must pass, and what
    it is in a few words (the option's help, the comment ``wsctl init`` writes beside it)."""
    return field(default=default, metadata={"check": check, "about": about})


@dataclass(frozen=True)
class DispatchSettings:
    """The ``[dispatch]`` settings, typed: each field's default is the one source of it.

    ``load`` lays wsctl.toml's ``[dispatch]`` tables over the defaults
    (``with_file``); a command lays its options over that (``resolve``) and
    hands the engine ``pass_options()``. Help texts, ``wsctl init`` and
    ``PassOptions`` read their defaults from here. ``sources`` says where each
    value not at its default came from: ``file:PATH`` or ``option --NAME``.
    """

    backend: str = _setting(
        Backend.modal.value, _one_of(*(b.value for b in Backend)), "Where functions run"
    )
    app: str = _setting(
        "enrichment-worker", _text, "The Modal app, or for the local backend a file or module"
    )
    modal_environment: str | None = _setting(
        None, _optional_text, "The Modal environment, Modal's default when unset"
    )
    limit: int = _setting(1000, _whole_number, "Most states claimed in a pass")
    concurrency: int = _setting(32, _whole_number, "Concurrent spawns/calls")
    lease_seconds: int = _setting(300, _whole_number, "Seconds a claim's lease lasts")
    spawn_timeout: float = _setting(30.0, _positive_seconds, "Seconds per spawn")
    # Modal queues at most 2,000 pending inputs per function
    modal_function_cap: int = _setting(
        2000,
        _whole_number,
        "Calls at Modal at once per function (a limit modal:FUNCTION says otherwise for one)",
    )
    max_attempts: int = _setting(5, _whole_number, "Attempts before FAILED")
    callback_timeout: int = _setting(
        3600, _whole_number, "Seconds a DISPATCHED state may wait for completion"
    )
    interval: float = _setting(10.0, _seconds, "Seconds between --loop passes")
    record_retry_seconds: float = _setting(
        30.0, _seconds, "Seconds a chunk's outcomes are retried on fresh connections"
    )
    journal_dir: str | None = _setting(
        None, _optional_text, "The journal of outcomes not yet recorded (unset: the user data dir)"
    )
    # 45 + 10 < cron's minute, with `timeout -s TERM 55` as the backstop
    max_seconds: float = _setting(
        45.0, _positive_seconds, "A pass stops claiming after this many seconds"
    )
    grace: float = _setting(
        10.0,
        _seconds,
        "Once stopping (SIGTERM/SIGINT, --max-seconds), seconds running functions get to finish",
    )
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The setting names, in declaration order (``sources`` is not one)."""
        return tuple(f.name for f in fields(cls) if "check" in f.metadata)

    @classmethod
    def default(cls, key: str) -> Any:
        return _DISPATCH_FIELDS[key].default

    @classmethod
    def about(cls, key: str) -> str:
        """What the setting is, in a few words (no final period)."""
        return str(_DISPATCH_FIELDS[key].metadata["about"])

    def source(self, key: str) -> str:
        """Where ``key``'s value came from: ``default``, ``file:PATH`` or ``option --NAME``."""
        if key not in _DISPATCH_FIELDS:
            raise KeyError(key)
        return self.sources.get(key, DEFAULT_SOURCE)

    def values(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.keys()}

    def with_file(self, path: str, table: Mapping[str, Any]) -> DispatchSettings:
        """This file's ``[dispatch]`` table over these values, each value checked
        (``UsageError`` naming the file and key)."""
        checked = {key: check_value(path, "dispatch", key, v) for key, v in table.items()}
        sources = {**self.sources, **dict.fromkeys(checked, f"file:{path}")}
        return replace(self, **checked, sources=sources)

    def resolve(self, **options: Any) -> DispatchSettings:
        """The command-line options (``None``: not given) over these values.

        A float setting given as an int is made a float, an Enum (``Backend``)
        its value; ranges are checked
        where the values are used (``PassOptions.validate``, ``make_backend``).
        """
        unknown = sorted(set(options) - set(_DISPATCH_FIELDS))
        if unknown:
            raise TypeError(f"unknown dispatch setting(s): {', '.join(unknown)}")
        given: dict[str, Any] = {
            key: _plain(v, float_=isinstance(_DISPATCH_FIELDS[key].default, float))
            for key, v in options.items()
            if v is not None
        }
        sources = {**self.sources, **{k: f"option --{k.replace('_', '-')}" for k in given}}
        return replace(self, **given, sources=sources)

    def pass_options(self, *, workstream: str | None = None, reconcile: bool = True) -> PassOptions:
        """What the engine takes for one pass (``wsctl.dispatch.engine.PassOptions``)."""
        from wsctl.dispatch.engine import PassOptions

        return PassOptions(
            limit=self.limit,
            concurrency=self.concurrency,
            workstream=workstream,
            lease_seconds=self.lease_seconds,
            max_attempts=self.max_attempts,
            callback_timeout=self.callback_timeout,
            reconcile=reconcile,
            record_retry_seconds=self.record_retry_seconds,
            max_seconds=self.max_seconds,
            grace=self.grace,
        )

    def journal_path(self) -> Path:
        """Where unrecorded outcomes are journaled: journal_dir, else the user data dir."""
        if self.journal_dir:
            return Path(self.journal_dir)
        return user_data_dir() / "dispatch-journal"


def _plain(value: Any, *, float_: bool) -> Any:
    """An option's value as the settings hold it: an Enum's value, a float for seconds."""
    if isinstance(value, Enum):
        return value.value
    return float(value) if float_ else value


_DISPATCH_FIELDS = {f.name: f for f in fields(DispatchSettings) if "check" in f.metadata}
_DISPATCH_CHECKS: dict[str, Callable[[Any], Any]] = {
    name: f.metadata["check"] for name, f in _DISPATCH_FIELDS.items()
}
#: the defaults, typed (``DEFAULT_DISPATCH.spawn_timeout``)
DEFAULT_DISPATCH = DispatchSettings()


def check_value(path: str, table: str, key: str, value: Any) -> Any:
    """``value`` of ``[table] key`` as wsctl uses it; ``UsageError`` naming file and key if not."""
    checks = DATABASE_CHECKS if table == "database" else _DISPATCH_CHECKS
    if key not in checks:
        raise UsageError(f"{path}: unknown key {table}.{key}")
    try:
        return checks[key](value)
    except _Invalid as exc:
        raise UsageError(f"{path}: {table}.{key} must be {exc}, not {_shown(value)}") from None


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", list: "an array"}
    if isinstance(value, dict):
        return "a table"
    return names.get(type(value), f"a {type(value).__name__}")


_URL_SCHEMES = ("postgresql", "postgres")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ONE_SLASH = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)")


def database_url_problem(url: str) -> str | None:
    """What is wrong with a database URL, in words, or None when libpq may take it.

    Checked before libpq sees it, because libpq's own messages quote the URL
    (password included) and rarely name the problem. A key=value conninfo
    string (``host=db dbname=x``) is left to libpq.
    """
    if "://" not in url:
        if _ONE_SLASH.match(url):
            return "one slash after the scheme (write postgresql://host/dbname)"
        if "=" in url.split("@", 1)[0]:
            return None  # key=value pairs: libpq parses them
        return (
            "no scheme: expected postgresql://USER@HOST:PORT/DBNAME "
            "(or key=value pairs such as host=... dbname=...)"
        )
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in _URL_SCHEMES:
        return f"unknown scheme {scheme[:20]!r} (a PostgreSQL URL starts with postgresql://)"
    cut = min(
        [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)]
    )
    authority, tail = rest[:cut], rest[cut:]
    if "@" in tail.split("?", 1)[0]:
        return (
            "an '@' after the host part: a user name or password holding '/', '?', '#' or '@' "
            "must be percent-encoded (%2F, %3F, %23, %40)"
        )
    userinfo, _, hostport = authority.rpartition("@")
    if _BAD_PERCENT.search(userinfo):
        return "bad percent-encoding in the user name or password (write a '%' as %25)"
    if _BAD_PERCENT.search(hostport + tail):
        return "bad percent-encoding (a '%' must be followed by two hex digits; write '%' as %25)"
    for host in hostport.split(","):  # libpq takes host1:port1,host2:port2
        if host.count("[") != host.count("]"):
            return "unterminated IPv6 host (a '[' without its ']')"
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
        if port and not port.isdigit():
            return "the port is not a number"
    return None


def check_database_url(url: str, source: str) -> None:
    """Refuse a malformed database URL with the problem named and its user info masked.

    On the command line it is a usage error (exit 2), from the environment or
    a file an environment error (exit 3).
    """
    from wsctl.redact import mask_url

    problem = database_url_problem(url)
    if problem is None:
        return
    error = UsageError if source.startswith("option") else EnvError
    raise error(f"invalid database URL {mask_url(url)} (from {source}): {problem}")


# The settings a bare ``load()`` returns while a dispatcher runs the app's functions
# in this process (``--backend local``, the demo): the worker helpers call ``load()``
# for their connection, and get the dispatcher's database (URL and [database] keys)
# from here instead of through os.environ. See ``in_process_workers``.
_in_process: list[Settings] = []
_in_process_lock = threading.Lock()


@contextmanager
def in_process_workers(s: Settings) -> Iterator[None]:
    """Within this block a bare ``load()`` (what the worker helpers call, from any
    thread) returns ``s``: the dispatcher hands its own database to the functions it
    runs in-process, scoped to the run, with os.environ untouched. Nested blocks stack."""
    if not s.database_url:
        raise ValueError("in_process_workers needs settings with a database URL")
    with _in_process_lock:
        _in_process.append(s)
    try:
        yield
    finally:
        with _in_process_lock:
            _in_process.remove(s)


def load(database_url: str | None = None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings; ``database_url`` is the command-line option (highest precedence).

    Every key of every file is checked for its type and range here, so a bad
    value is a usage error (exit 2) naming the file and key, never a traceback
    in the command that uses it. Inside ``in_process_workers`` a call without
    arguments returns the settings given there.
    """
    if database_url is None and env is None:
        handed = _in_process[-1:]  # one read: the block may end in another thread meanwhile
        if handed:
            return handed[0]
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    for config_file in (user_config_path(), local_config_path()):
        data = _read_toml(config_file)
        if data:
            layers.append((str(config_file), data))

    db: dict[str, Any] = dict(DATABASE_DEFAULTS)
    db_sources: dict[str, str] = {}
    dispatch = DispatchSettings()
    file_url: tuple[str, str] | None = None
    for path, data in layers:  # lowest first, so later layers win
        for name in data:
            if name not in ("database", "dispatch"):  # a typo must not be ignored silently
                raise UsageError(
                    f"{path}: unknown entry {name!r} (wsctl reads the [database] and "
                    "[dispatch] tables)"
                )
        section = data.get("database", {})
        if not isinstance(section, dict):
            raise UsageError(f"{path}: [database] must be a table")
        for key, value in section.items():
            if key == "url":
                if not isinstance(value, str):  # never echoed: it may hold a password
                    raise UsageError(
                        f"{path}: database.url must be a string, not {_toml_type(value)} "
                        "(its value is not shown: it may hold a password)"
                    )
                if value:
                    file_url = (value, f"file:{path}")
            else:
                db[key] = check_value(path, "database", key, value)
                db_sources[key] = f"file:{path}"
        section = data.get("dispatch", {})
        if not isinstance(section, dict):
            raise UsageError(f"{path}: [dispatch] must be a table")
        dispatch = dispatch.with_file(path, section)

    url, source = None, "embedded"
    if database_url:
        url, source = database_url, "option --database-url"
    elif env.get("WSCTL_DATABASE_URL"):
        url, source = env["WSCTL_DATABASE_URL"], "env WSCTL_DATABASE_URL"
    elif env.get("DATABASE_URL"):
        url, source = env["DATABASE_URL"], "env DATABASE_URL"
    elif file_url:
        url, source = file_url
    if url:
        check_database_url(url, source)

    return Settings(
        database_url=url,
        url_source=source,
        pooler=db["pooler"],
        connect_timeout=db["connect_timeout"],
        statement_timeout=db["statement_timeout"],
        lock_timeout=db["lock_timeout"],
        prepared_statements=db["prepared_statements"],
        dispatch=dispatch,
        files=tuple(p for p, _ in layers),
        database_sources=db_sources,
    )


@dataclass(frozen=True)
class EffectiveSetting:
    """One setting as a command would use it, and where its value came from."""

    key: str  # "database.url", "dispatch.limit", ...
    value: Any
    source: str  # default, file:PATH, env NAME, option --NAME, embedded

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "source": self.source}


def effective(s: Settings) -> list[EffectiveSetting]:
    """Every setting of ``s`` with its source, the database URL masked (never a password).

    An unset URL is shown as ``None`` from ``embedded``: nothing is started to
    find the embedded server's address. ``dispatch.journal_dir`` is the
    directory used (by default under the user data dir).
    """
    from wsctl.redact import mask_url

    url = mask_url(s.database_url) if s.database_url else None
    rows = [EffectiveSetting("database.url", url, s.url_source)]
    for key in DATABASE_DEFAULTS:
        rows.append(EffectiveSetting(f"database.{key}", getattr(s, key), s.database_source(key)))
    for key in s.dispatch.keys():
        value = getattr(s.dispatch, key)
        if key == "journal_dir":  # the directory the journal is in, default or not
            value = str(s.dispatch.journal_path())
        rows.append(EffectiveSetting(f"dispatch.{key}", value, s.dispatch.source(key)))
    return rows


INIT_TEMPLATE_HEADER = """\
# wsctl configuration. Precedence, highest first: --database-url,
# WSCTL_DATABASE_URL, DATABASE_URL, ./wsctl.toml, the user config file,
# then an embedded PostgreSQL started on demand.
#
# database.url: a direct or session-mode URL (Supabase: port 5432) is needed
#   for `wsctl migrate`; other commands also work through the transaction
#   pooler (port 6543) when pooler = "transaction".
# dispatch.*: defaults for `wsctl dispatch`; command-line options win.
"""


def _with_abouts(body: str) -> str:
    """The ``[dispatch]`` keys of a written wsctl.toml, each with what it is as a comment."""
    out, section = [], ""
    for line in body.splitlines():
        if line.startswith("["):
            section = line
        key = line.split(" = ", 1)[0]
        if section == "[dispatch]" and " = " in line and key in _DISPATCH_FIELDS:
            line = f"{line}  # {DispatchSettings.about(key)}"
        out.append(line)
    return "\n".join(out) + "\n"


def write_init_file(path: Path, database_url: str | None, *, force: bool) -> Path:
    """Write a commented wsctl.toml, readable by its owner only (mode 0600: it may hold a
    password); refuse to overwrite an existing file without ``force`` (exit 1)."""
    import tomli_w

    path = Path(path)
    database: dict[str, Any] = {}
    if database_url:
        database["url"] = database_url
    database.update(DATABASE_DEFAULTS)
    dispatch = {k: v for k, v in DEFAULT_DISPATCH.values().items() if v is not None}
    body = _with_abouts(tomli_w.dumps({"database": database, "dispatch": dispatch}))
    if not database_url:  # a placeholder to fill in, commented out until then
        body = body.replace(
            "[database]\n",
            "[database]\n"
            '# url = "postgresql://USER:PASSWORD@HOST:5432/DBNAME"  '
            "# unset: an embedded PostgreSQL\n",
            1,
        )
    text = INIT_TEMPLATE_HEADER + "\n" + body
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: the directory {path.parent} does not exist")
    try:
        if force:
            _replace_private(path, text)
        else:
            _create_private(path, text)
    except FileExistsError:
        raise OperationalError(f"{path} already exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise EnvError(f"cannot write {path}: {exc.strerror}") from None
    return path


def _create_private(path: Path, text: str) -> None:
    # O_EXCL: an existing file (or one created meanwhile) is never touched.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def _replace_private(path: Path, text: str) -> None:
    # A private temporary file renamed over the old one: never half-written, never 0644.
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise
