"""The root command and its sub-commands (each module registers its own)."""

from __future__ import annotations

from typing import Annotated, cast

import typer
from typer.core import TyperOption

from wsctl import __version__
from wsctl.cli.common import CliState

app = typer.Typer(
    name="wsctl",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"wsctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    database_url: Annotated[str | None, typer.Option("--database-url", show_default=False)] = None,
    debug: Annotated[bool, typer.Option("--debug")] = False,
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Operations CLI for the lead-enrichment pipeline: schema, batches, workstream-aware
    config resolution and dispatch to Modal.

    Args:
        database_url: PostgreSQL URL (beats WSCTL_DATABASE_URL, DATABASE_URL and wsctl.toml).
        debug: Show tracebacks (also WSCTL_DEBUG=1).
        version: Print the version.
    """
    ctx.obj = CliState(database_url=database_url, debug=debug)


# Metavars in help: what to type, not click's type names (`<str>`, `<int range>`).
# An option that sets its own metavar (a list of choices, say) keeps it.
_SECONDS = ("seconds", "timeout", "interval", "grace")
_NAMED = {"client": "NAME", "workstream": "SLUG", "step": "STEP"}

# Old spellings of options that still parse but that help, completion and error messages
# no longer show (the README's "Renamed" list): `--workflow` is `--step` everywhere now.
HIDDEN_ALIASES = frozenset({"--workflow"})


class _AliasedOption(TyperOption):
    """An option whose old names (``hidden_opts``) parse but are shown nowhere."""

    hidden_opts: list[str]

    def add_to_parser(self, parser, ctx) -> None:
        shown = self.opts
        self.opts = [*shown, *self.hidden_opts]  # the parser knows every name ...
        try:
            super().add_to_parser(parser, ctx)
        finally:
            self.opts = shown  # ... help, completion and errors only the current one


def _hide_aliases(param) -> None:
    """Keep an option's old names for parsing only: declared ``typer.Option(..., "--step",
    "--workflow")``, it shows ``--step`` alone and ``--workflow X`` still works."""
    hidden = [o for o in param.opts if o in HIDDEN_ALIASES]
    if not hidden or len(hidden) == len(param.opts) or type(param) is not TyperOption:
        return
    param.opts = [o for o in param.opts if o not in HIDDEN_ALIASES]
    param.__class__ = _AliasedOption  # only add_to_parser differs
    cast(_AliasedOption, param).hidden_opts = hidden


def _metavar(param) -> str | None:
    kind = type(param.type).__name__
    name = param.name or ""
    if kind in ("IntParamType", "IntRange", "FloatParamType", "FloatRange"):
        return "SECONDS" if any(w in name for w in _SECONDS) else "N"
    if kind in ("StringParamType", "UUIDParameterType"):
        if any(w in name for w in _SECONDS):
            return "DURATION"
        for word, metavar in _NAMED.items():
            if word in name:
                return metavar
        if "url" in name:
            return "URL"
        if name in ("items", "path", "file", "archive", "app"):
            return "FILE" if name != "app" else "APP"
        return "TEXT"
    return None


def param_docs(doc: str) -> tuple[str, dict[str, str]]:
    """A command's docstring split into its help text and the help of each parameter.

    The parameters are documented as in a Google-style docstring, in an ``Args:`` section
    at its end (``name: text``, a longer text indented further on the next lines), so a
    signature stays a table of names, types and flags and the prose reads as prose."""
    text, found, section = doc.partition("\nArgs:\n")
    if not found:
        return doc, {}
    docs: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        entry = line[4:] if line.startswith("    ") and not line.startswith("     ") else ""
        if entry and ":" in entry:
            name, _, about = entry.partition(":")
            if name in docs:
                raise ValueError(f"Args: {name!r} documented twice")
            docs[name] = about.strip()
        elif line.startswith("        ") and name:
            docs[name] = f"{docs[name]} {line.strip()}".strip()
        elif line.strip():
            raise ValueError(f"Args: cannot read {line.strip()!r}")
    return text.rstrip(), docs


def _document(cmd) -> None:
    """Give each parameter of ``cmd`` the help its callback's docstring has for it."""
    import inspect

    callback = getattr(cmd, "callback", None)
    doc = inspect.getdoc(callback) if callback is not None else None
    if not doc:
        return
    text, docs = param_docs(doc)
    if cmd.help == doc:  # the help is the docstring (not a help= of its own): drop Args:
        cmd.help = text
    params = {param.name: param for param in cmd.params}
    for name, about in docs.items():
        if name not in params:
            raise ValueError(f"{cmd.name}: Args: documents {name!r}, which it does not take")
        params[name].help = about


def command():
    """The click command of the app: help from the docstrings' ``Args:`` sections, readable
    metavars, old option names hidden (built on each call)."""
    import typer.main

    root = typer.main.get_command(app)
    stack = [root]
    while stack:
        cmd = stack.pop()
        stack.extend(getattr(cmd, "commands", {}).values())
        _document(cmd)
        for param in cmd.params:
            if type(param).__name__.endswith("Option"):
                _hide_aliases(param)
            if getattr(param, "metavar", None) is None and not getattr(param, "is_flag", False):
                if type(param).__name__.endswith("Option"):
                    param.metavar = _metavar(param)
    return root


def _register() -> None:
    # Each command module imports at its top only typer and wsctl's light modules (settings,
    # domain: no psycopg, modal or rich; the work is imported lazily inside each command),
    # so registering all of them costs a few milliseconds.
    from wsctl.cli import (
        cmd_batch,
        cmd_catalog,
        cmd_demo,
        cmd_dispatch,
        cmd_embedded,
        cmd_examples,
        cmd_inspect,
        cmd_limit,
        cmd_prune,
        cmd_security,
        cmd_setup,
        cmd_stats,
        cmd_ui,
    )

    for module in (
        cmd_setup,
        cmd_dispatch,
        cmd_catalog,
        cmd_batch,
        cmd_inspect,
        cmd_demo,
        cmd_embedded,
        cmd_examples,
        cmd_limit,
        cmd_prune,
        cmd_security,
        cmd_stats,
        cmd_ui,
    ):
        module.register(app)


_register()
