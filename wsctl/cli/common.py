"""What every command shares: settings, the connection, the global options."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    import psycopg

    from wsctl.settings import Settings


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


def state(ctx: typer.Context) -> CliState:
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


def choices(enum: type[Enum]) -> str:
    """The metavar of an option taking one of an Enum's values: ``[modal|local]``."""
    return "[" + "|".join(str(member.value) for member in enum) + "]"


JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document on stdout.")

# Options that several commands declare alike (one declaration, the same flag and help everywhere).
CLIENT_OPTION = typer.Option(..., "--client", help="Client name or id.")
WORKSTREAM_OPTION = typer.Option(..., "--workstream", help="Workstream slug.")
WORKSTREAM_FILTER_OPTION = typer.Option(None, "--workstream", help="Only this workstream.")
REVEAL_OPTION = typer.Option(False, "--reveal", help="Print secrets instead of ***.")
