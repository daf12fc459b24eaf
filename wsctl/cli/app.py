"""The root command and its sub-commands (each module registers its own)."""

from __future__ import annotations

import typer

from wsctl import __version__
from wsctl.cli.common import CliState

app = typer.Typer(
    name="wsctl",
    help="Operations CLI for the lead-enrichment pipeline: schema, batches, "
    "workstream-aware config resolution and dispatch to Modal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"wsctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="PostgreSQL URL (beats WSCTL_DATABASE_URL, DATABASE_URL and wsctl.toml).",
        show_default=False,
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also WSCTL_DEBUG=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    ctx.obj = CliState(database_url=database_url, debug=debug)


def _register() -> None:
    from wsctl.cli import cmd_setup

    cmd_setup.register(app)
    __import__("wsctl.cli.cmd_dispatch", fromlist=["register"]).register(app)
    __import__("wsctl.cli.cmd_catalog", fromlist=["register"]).register(app)
    __import__("wsctl.cli.cmd_batch", fromlist=["register"]).register(app)
    __import__("wsctl.cli.cmd_inspect", fromlist=["register"]).register(app)
    __import__("wsctl.cli.cmd_demo", fromlist=["register"]).register(app)
    __import__("wsctl.cli.cmd_security", fromlist=["register"]).register(app)


_register()
