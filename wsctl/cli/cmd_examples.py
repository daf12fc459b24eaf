"""`wsctl examples`: where the shipped example files are, or a copy of them."""

from __future__ import annotations

from pathlib import Path

import typer

from wsctl.cli.common import JSON_OPTION


def examples(
    copy_to: Path | None = typer.Option(
        None, "--copy", help="Copy the example files into this directory."
    ),
    force: bool = typer.Option(False, "--force", help="With --copy: overwrite existing files."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print where the example files (registry.toml, items, the example Modal app) are."""
    from wsctl import shipped
    from wsctl.cli import output

    if copy_to is not None:
        result = shipped.copy_examples(copy_to, force=force)
        if as_json:
            output.emit_json(result.to_json())
        else:
            output.line(f"copied {len(result.copied)} file(s) to {result.destination}")
        return
    folder = shipped.examples_dir()
    files = [p.name for p in shipped.example_files()]
    if as_json:
        output.emit_json({"path": str(folder), "files": files})
        return
    output.line(str(folder))
    for name in files:
        output.notice(name)


def register(app: typer.Typer) -> None:
    app.command("examples")(examples)
