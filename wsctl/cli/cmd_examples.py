"""`wsctl examples`: where the shipped example files are, or a copy of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsctl.cli.common import Json


def examples(
    copy_to: Annotated[Path | None, typer.Option("--copy")] = None,
    force: Annotated[bool, typer.Option("--force")] = False,
    as_json: Json = False,
) -> None:
    """Print where the example files (registry.toml, items, the example Modal app) are.

    Args:
        copy_to: Copy the example files into this directory.
        force: With --copy: overwrite existing files.
    """
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
