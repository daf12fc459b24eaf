"""Rendering for people (Rich on a terminal) and machines (plain lines, --json).

Plain output is used whenever stdout is not a terminal (cron mail, pipes,
log collectors): no ANSI codes, no spinners. Notices go to stderr so that
``--json`` leaves exactly one JSON document on stdout.

Everything wsctl writes passes through one redaction (``wsctl.redact``):
``redacting()``, entered by ``wsctl.cli.main``, replaces ``sys.stdout`` and
``sys.stderr`` by streams that mask each line before it is written, so
tables, notices, errors, tracebacks (``--debug``), log records and what a
local app prints are all covered, whoever writes them. JSON documents are
redacted value by value before they are serialised (a key such as
``dedupe_key`` is wsctl's, not a secret). ``--reveal`` lifts it on stdout only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar
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


class RedactingStream:
    """A text stream that masks secrets line by line before they reach ``target``.

    Whole lines are redacted (a secret is never split between two checks);
    ``flush`` redacts and writes a pending partial line (progress bars).
    Everything else (``isatty``, ``encoding``, ``fileno``) is the target's.
    """

    def __init__(self, target: Any, *, reveal: bool = False):
        self.target = target
        self.reveal = reveal
        self._pending = ""

    def _put(self, text: str) -> None:
        if not self.reveal:
            from wsctl.redact import redact_text

            text = "".join(redact_text(ln) for ln in text.splitlines(keepends=True))
        try:
            self.target.write(text)
        except UnicodeEncodeError:  # a lone surrogate from a non-UTF-8 name or file
            encoding = getattr(self.target, "encoding", None) or "utf-8"
            self.target.write(text.encode(encoding, "backslashreplace").decode(encoding))

    def write(self, text: str) -> int:
        data = self._pending + text
        cut = data.rfind("\n") + 1
        self._pending = data[cut:]
        if cut:
            self._put(data[:cut])
        return len(text)

    def write_redacted(self, text: str) -> None:
        """Write text already redacted (a JSON document redacted value by value)."""
        self.flush_pending()
        self.target.write(text)

    def flush_pending(self) -> None:
        if self._pending:
            text, self._pending = self._pending, ""
            self._put(text)

    def flush(self) -> None:
        self.flush_pending()
        self.target.flush()

    def writelines(self, lines: Iterable[str]) -> None:
        for text in lines:
            self.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


@contextmanager
def redacting(*, reveal: bool = False) -> Iterator[None]:
    """stdout and stderr masked for the duration (``reveal``: not stdout)."""
    from wsctl import redact

    redact.forget()
    old = sys.stdout, sys.stderr
    out, err = RedactingStream(old[0], reveal=reveal), RedactingStream(old[1])
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        for stream in (out, err):
            try:
                stream.flush_pending()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = old
        redact.forget()


def _revealed() -> bool:
    return isinstance(sys.stdout, RedactingStream) and sys.stdout.reveal


def _redacted(value: Any) -> Any:
    """``value`` as JSON types, every string through ``redact_text`` (keys are wsctl's)."""
    from wsctl.redact import redact_text

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return redact_text(v)
        if v is None or isinstance(v, bool | int | float):
            return v
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        return walk(_default(v))

    return walk(value)


def emit_json(doc: Any) -> None:
    """One JSON document on stdout, every string in it redacted (unless ``--reveal``)."""
    if not _revealed():
        doc = _redacted(doc)
    text = json.dumps(doc, default=_default, indent=2, sort_keys=False) + "\n"
    writer = getattr(sys.stdout, "write_redacted", sys.stdout.write)
    writer(text)


class _Doc(Protocol):
    def to_json(self) -> Any: ...


_D = TypeVar("_D", bound=_Doc)


def show(doc: _D, as_json: bool, text: Callable[[_D], None]) -> None:
    """A command's result: ``doc.to_json()`` as one JSON document with --json, else
    ``text(doc)``, its rendering for people."""
    if as_json:
        emit_json(doc.to_json())
    else:
        text(doc)


def line(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def notice(text: str) -> None:
    sys.stderr.write(f"wsctl: {' '.join(str(text).split())}\n")


def generated_secret_notice(text: str) -> None:
    """A notice that must show a credential wsctl itself just generated for the user (the
    dashboard's token): the one line that bypasses the redaction at the edge. Never for
    a value read from configs, the environment or the command line."""
    line = f"wsctl: {' '.join(str(text).split())}\n"
    stream = sys.stderr
    if isinstance(stream, RedactingStream):
        stream.write_redacted(line)
    else:
        stream.write(line)


def warn(*texts: str) -> None:
    """One ``wsctl: warning:`` line on stderr per text (each folded onto one line)."""
    for text in texts:
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
    if is_tty() and not _revealed():  # Rich may fold a cell over lines: mask cells first
        from wsctl.redact import redact_text

        rows = [[redact_text(v) for v in r] for r in rows]
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
