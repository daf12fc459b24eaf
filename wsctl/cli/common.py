"""What every command shares: settings, the connection, the global options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Concatenate, ParamSpec, TypeVar

import typer

if TYPE_CHECKING:
    import psycopg

    from wsctl.settings import Settings

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass
class CliState:
    database_url: str | None = None
    debug: bool = False
    _settings: Settings | None = field(default=None, repr=False)
    _embedded_url: str | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        if self._settings is None:
            from wsctl import settings

            self._settings = settings.load(self.database_url)
        return self._settings

    def resolved_url(self, *, embedded_dbname: str | None = None) -> str:
        """The configured URL, or the embedded server's (started on demand, said on stderr)."""
        s = self.settings()
        if s.database_url:
            return s.database_url
        if self._embedded_url is not None and embedded_dbname is None:
            return self._embedded_url
        from wsctl import embedded
        from wsctl.cli.output import notice
        from wsctl.settings import user_data_dir

        server = embedded.ensure(user_data_dir(), embedded_dbname or embedded.DEFAULT_DBNAME)
        notice(
            f"no database URL configured: using the embedded PostgreSQL in {server.pgdata} "
            "(set WSCTL_DATABASE_URL or run `wsctl init` to use another)"
        )
        if embedded_dbname is None:
            self._embedded_url = server.url
        return server.url

    def resolved_settings(self) -> Settings:
        """The settings with the URL resolved (the embedded server started on demand)."""
        s = self.settings()
        return s if s.database_url else s.with_url(self.resolved_url(), s.url_source)

    def connect(
        self, *, require_schema: bool = True, autocommit: bool = True
    ) -> psycopg.Connection:
        from wsctl import db, migrations

        conn = db.connect(self.resolved_url(), self.settings(), autocommit=autocommit)
        if require_schema:
            try:
                migrations.require_up_to_date(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def callback_timeout(self, given: int | None) -> int:
        """``--callback-timeout`` when given, else ``[dispatch] callback_timeout``: how long
        a DISPATCHED state may wait (stats, doctor and the dashboard count it); at least 1 s."""
        from wsctl.errors import UsageError

        timeout = given if given is not None else self.settings().dispatch.callback_timeout
        if timeout < 1:
            raise UsageError("--callback-timeout must be at least 1 second")
        return timeout

    def call(
        self,
        fn: Callable[Concatenate[psycopg.Connection, _P], _R],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _R:
        """``fn(conn, *args, **kwargs)`` on a connection of its own, closed when it returns: a
        command that calls one library function."""
        with self.connect() as conn:
            return fn(conn, *args, **kwargs)


def state(ctx: typer.Context) -> CliState:
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


def _split_commas(values: list[str] | None) -> list[str] | None:
    """A repeatable option's values, each of which may list several, comma-separated.

    Given but empty (``--batch ""``, an unset shell variable) is a usage error, never "not
    given": for prune, no ``--batch`` means every finished batch."""
    if not values:
        return None
    parts = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not parts:
        raise typer.BadParameter("names no id (an empty value?)")
    return parts


def choices(enum: type[Enum]) -> str:
    """The metavar of an option taking one of an Enum's values: ``[modal|local]``."""
    return "[" + "|".join(str(member.value) for member in enum) + "]"


def setting_option(flag: str, *, about: str | None = None, **kwargs: Any) -> Any:
    """The option that overrides a ``[dispatch]`` setting for one command (None: not given).

    The setting is the flag's name (``--lease-seconds``: ``lease_seconds``); the help says
    what it is in the setting's own words (``DispatchSettings.about``, or ``about``) and
    the default it falls back to."""
    from wsctl.settings import DispatchSettings

    key = flag.removeprefix("--").replace("-", "_")
    default = DispatchSettings.default(key)
    shown = f"{default:g}" if isinstance(default, float) else default
    fallback = f", else {shown}" if default is not None else ""
    text = about or DispatchSettings.about(key)
    return typer.Option(
        flag, help=f"{text} (default: dispatch.{key} of wsctl.toml{fallback}).", **kwargs
    )


# The parameters several commands share, each declared once (the same flag, help and type
# everywhere) as an ``Annotated`` type; a command gives the default, if any, in its signature:
# ``as_json: Json = False``, ``client: Client`` (required). Command modules import these at
# module level: Typer reads the string annotations (``from __future__ import annotations``)
# with the module's globals. A command's own parameters carry no help here: it is in the
# ``Args:`` section of the command's docstring (``app.param_docs``), which may also give a
# shared one a help of its own.
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Reveal = Annotated[bool, typer.Option("--reveal", help="Print secrets instead of ***.")]
Client = Annotated[str, typer.Option("--client", help="Client name or id.")]
Workstream = Annotated[str, typer.Option("--workstream", help="Workstream slug.")]
WorkstreamFilter = Annotated[str | None, typer.Option("--workstream", help="Only this workstream.")]
# `--workflow`: the old name of --step, parsed but shown nowhere (app.HIDDEN_ALIASES)
Step = Annotated[str, typer.Option("--step", "--workflow", help="Workflow step slug.")]
StepFilter = Annotated[str | None, typer.Option("--step", "--workflow", help="Only this step.")]
BatchId = Annotated[str, typer.Argument(help="Batch id.")]
BatchIds = Annotated[
    list[str] | None,
    typer.Option(
        "--batch",
        callback=_split_commas,
        help="Only this batch (repeat, or comma-separate, for several).",
    ),
]
LimitKey = Annotated[str, typer.Argument(help="The limit key.")]
LockTimeout = Annotated[
    str,
    typer.Option(
        "--lock-timeout",
        help="Longest wait for a lock (PostgreSQL interval); then nothing changes.",
    ),
]
CallbackTimeout = Annotated[int | None, setting_option("--callback-timeout")]
