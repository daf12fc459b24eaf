"""Where wsctl's settings come from, highest first.

Database URL: the ``--database-url`` option, ``WSCTL_DATABASE_URL``,
``DATABASE_URL``, ``./wsctl.toml``, the user config file
(``<user config dir>/wsctl/wsctl.toml``), then the embedded PostgreSQL.
Other keys (``[database]`` and ``[dispatch]`` tables) come from
``./wsctl.toml`` over the user config file over the defaults here.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wsctl.errors import EnvError, UsageError

DISPATCH_DEFAULTS: dict[str, Any] = {
    "backend": "modal",
    "app": "enrichment-worker",
    "modal_environment": None,
    "limit": 1000,
    "concurrency": 32,
    "lease_seconds": 300,
    "spawn_timeout": 30.0,
    "max_attempts": 5,
    "callback_timeout": 3600,
    "interval": 10.0,
}

DATABASE_DEFAULTS: dict[str, Any] = {
    "pooler": "session",
    "connect_timeout": 10,
    "statement_timeout": "5min",
}


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    url_source: str  # which rule gave the URL: option, env:WSCTL_DATABASE_URL, file:..., embedded
    pooler: str = "session"
    connect_timeout: int = 10
    statement_timeout: str = "5min"
    dispatch: dict[str, Any] = field(default_factory=lambda: dict(DISPATCH_DEFAULTS))
    files: tuple[str, ...] = ()

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


def load(database_url: str | None = None, *, env: dict[str, str] | None = None) -> Settings:
    """Read settings; ``database_url`` is the command-line option (highest precedence)."""
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    for path in (user_config_path(), local_config_path()):
        data = _read_toml(path)
        if data:
            layers.append((str(path), data))

    db: dict[str, Any] = dict(DATABASE_DEFAULTS)
    dispatch: dict[str, Any] = dict(DISPATCH_DEFAULTS)
    file_url: tuple[str, str] | None = None
    for path, data in layers:  # lowest first, so later layers win
        section = data.get("database", {})
        if not isinstance(section, dict):
            raise UsageError(f"{path}: [database] must be a table")
        for key, value in section.items():
            if key == "url":
                if value:
                    file_url = (str(value), f"file:{path}")
            elif key in DATABASE_DEFAULTS:
                db[key] = value
            else:
                raise UsageError(f"{path}: unknown key database.{key}")
        section = data.get("dispatch", {})
        if not isinstance(section, dict):
            raise UsageError(f"{path}: [dispatch] must be a table")
        for key, value in section.items():
            if key not in DISPATCH_DEFAULTS:
                raise UsageError(f"{path}: unknown key dispatch.{key}")
            dispatch[key] = value

    if db["pooler"] not in ("session", "transaction"):
        raise UsageError(
            f"database.pooler must be 'session' or 'transaction', not {db['pooler']!r}"
        )

    url, source = None, "embedded"
    if database_url:
        url, source = database_url, "option --database-url"
    elif env.get("WSCTL_DATABASE_URL"):
        url, source = env["WSCTL_DATABASE_URL"], "env WSCTL_DATABASE_URL"
    elif env.get("DATABASE_URL"):
        url, source = env["DATABASE_URL"], "env DATABASE_URL"
    elif file_url:
        url, source = file_url

    return Settings(
        database_url=url,
        url_source=source,
        pooler=db["pooler"],
        connect_timeout=int(db["connect_timeout"]),
        statement_timeout=str(db["statement_timeout"]),
        dispatch=dispatch,
        files=tuple(p for p, _ in layers),
    )


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


def write_init_file(path: Path, database_url: str | None, *, force: bool) -> Path:
    """Write a commented wsctl.toml; refuse to overwrite without ``force``."""
    import tomli_w

    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    database: dict[str, Any] = {}
    if database_url:
        database["url"] = database_url
    database.update(DATABASE_DEFAULTS)
    dispatch = {k: v for k, v in DISPATCH_DEFAULTS.items() if v is not None}
    body = tomli_w.dumps({"database": database, "dispatch": dispatch})
    try:
        path.write_text(INIT_TEMPLATE_HEADER + "\n" + body, encoding="utf-8")
    except OSError as exc:
        raise EnvError(f"cannot write {path}: {exc.strerror}") from None
    return path
