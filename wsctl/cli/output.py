"""Rendering for people (Rich on a terminal) and machines (plain lines, --json).

Plain output is used whenever stdout is not a terminal (cron mail, pipes,
log collectors): no ANSI codes, no spinners. Notices go to stderr so that
``--json`` leaves exactly one JSON document on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID


def _default(obj: Any) -> Any:
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, UUID):
        return str(obj)
    if isinstance(obj, Decimal):
        return float(obj)
    if hasattr(obj, "to_json"):
        return obj.to_json()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def is_tty(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=_default, indent=2, sort_keys=False) + "\n")


def line(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def notice(text: str) -> None:
    sys.stderr.write(f"wsctl: {' '.join(str(text).split())}\n")


def warn(text: str) -> None:
    sys.stderr.write(f"wsctl: warning: {' '.join(str(text).split())}\n")


_STATUS_STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


def status_cell(status: str) -> str:
    """A check's status, coloured on a terminal (plain text otherwise)."""
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style and is_tty() else status


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, dict | list):
        return json.dumps(value, default=_default, sort_keys=True)
    return str(value)


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None
) -> None:
    """A Rich table on a terminal; tab-separated lines with a header otherwise."""
    rows = [[_cell(v) for v in r] for r in rows]
    if is_tty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_lines=False)
        for c in columns:
            t.add_column(c, overflow="fold")  # ids must stay whole to be copied
        for r in rows:
            t.add_row(*r)
        Console().print(t)
        return
    if title:
        line(f"# {title}")
    line("\t".join(columns))
    for r in rows:
        line("\t".join(v.replace("\t", " ").replace("\n", " ") for v in r))


@contextmanager
def progress(description: str, total: int | None, *, unit: str = "items"):
    """A progress bar on a terminal (stderr); a no-op otherwise.

    With a total it shows a percentage; ``unit="bytes"`` counts bytes (an item file
    whose size is known). ``set(completed, description)`` moves it and renames the
    phase, so a long final step (writing, committing) is never silent.
    """
    if not is_tty(sys.stderr):

        class _Null:
            def advance(self, n: int = 1) -> None:
                pass

            def update_total(self, total: int | None) -> None:
                pass

            def set(self, completed: int | None = None, description: str | None = None) -> None:
                pass

        yield _Null()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TimeElapsedColumn,
    )

    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        count,
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        class _Bar:
            def advance(self, n: int = 1) -> None:
                bar.advance(task, n)

            def update_total(self, total: int | None) -> None:
                bar.update(task, total=total)

            def set(self, completed: int | None = None, description: str | None = None) -> None:
                bar.update(task, completed=completed, description=description)

        yield _Bar()
