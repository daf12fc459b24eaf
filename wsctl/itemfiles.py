"""Streaming readers for batch item files: CSV with a header row, or JSON Lines.

Each item comes out as the text of one JSON object, ready for COPY, so a file
of any size is read in constant memory. Every refusal names the line it found
the problem on (``items.csv line 50001: ...``); the caller's transaction rolls
back, so a bad row anywhere writes nothing.

CSV values stay strings (``""`` for an empty cell). A UTF-8 byte order mark is
accepted. Blank lines are skipped in both formats.

A CSV row's keys are written in jsonb's own order (shorter keys first, then
bytewise): jsonb keeps no key order, so the stored value is the same, and
PostgreSQL's sort of each object's keys finds them already in order
(measured: about a fifth less server time for a 26-column item COPY). A JSON
Lines object goes to PostgreSQL as written, once validated here: re-encoding
it in Python would cost the client more than the sort costs the server, and
would round its numbers.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from operator import itemgetter
from pathlib import Path
from typing import IO

from wsctl.errors import OperationalError, UsageError

FORMATS = ("csv", "jsonl")
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_BOM = codecs.BOM_UTF8.decode("utf-8")


class ItemFileError(OperationalError):
    """A malformed item file: the message names the file, the line and the reason."""


def detect_format(source: str, fmt: str | None = None) -> str:
    """``csv`` or ``jsonl``, from ``fmt`` when given, else from the file's extension."""
    if fmt:
        value = fmt.strip().lower()
        if value in ("ndjson", "jsonlines"):
            value = "jsonl"
        if value not in FORMATS:
            raise UsageError(f"unknown item format {fmt!r}: use csv or jsonl")
        return value
    if source == "-":
        raise UsageError("cannot tell the format of stdin: pass --format csv or --format jsonl")
    found = _EXTENSIONS.get(Path(source).suffix.lower())
    if found is None:
        raise UsageError(
            f"cannot tell the format of {source!r} from its extension "
            "(.csv, .jsonl, .ndjson): pass --format csv or --format jsonl"
        )
    return found


@dataclass
class ItemStream:
    """One open item file. Iterate ``json_rows()`` once; counters follow the reading."""

    name: str
    format: str
    _lines: Iterator[str] = field(repr=False)
    size: int | None = None  # bytes, when the source is a regular file
    delimiter: str = ","  # the CSV field separator
    columns: list[str] = field(default_factory=list)  # the CSV header
    line: int = 0  # physical lines read so far
    items: int = 0
    item_line: int = 0  # the line the last item yielded starts on
    bytes_read: int = 0
    _suspect: str | None = field(default=None, repr=False)  # a separator the header hints at

    def error(self, line: int, reason: str) -> ItemFileError:
        return ItemFileError(f"{self.name} line {line}: {reason}")

    def json_rows(self) -> Iterator[str]:
        """The text of one JSON object per item, in file order."""
        if self.format == "csv":
            yield from self._csv_rows()
        else:
            yield from self._jsonl_rows()
        if self.items == 0:
            what = "only a header row" if self.columns else "no items"
            raise ItemFileError(f"{self.name}: empty file ({what})")

    # -- CSV ---------------------------------------------------------------

    def _csv_rows(self) -> Iterator[str]:
        reader = csv.reader(self._lines, strict=True, delimiter=self.delimiter)
        header: list[str] | None = None
        template = ""
        start = 1
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise self.error(reader.line_num, f"bad CSV: {exc}") from None
            if not row:
                continue  # a blank line
            if header is None:
                header = self._check_header(row, start)
                order = jsonb_key_order(header)
                # One %-template per file: '{"a":%s,"b":%s}' (a key's own % doubled).
                template = (
                    "{"
                    + ",".join(
                        encode_basestring(header[i]).replace("%", "%%") + ":%s" for i in order
                    )
                    + "}"
                )
                pick = _picker(order)
                continue
            if self._suspect is not None:
                sep, self._suspect = self._suspect, None
                if len(row) == 1 and row[0].count(sep) == header[0].count(sep):
                    name, shown = _OTHER_SEPARATORS[sep]
                    raise self.error(
                        start - 1 if start > 1 else 1,
                        f"the header is one column {header[0][:60]!r} and so is the first "
                        f"row: the file looks {name}-separated; pass --delimiter {shown}",
                    )
            if len(row) != len(header):
                raise self.error(
                    start,
                    f"{_count(len(row), 'field')} where the header has {len(header)}",
                )
            text = template % tuple(map(encode_basestring, pick(row)))
            if "\\u0000" in text and any("\x00" in v for v in row):
                raise self.error(start, "a NUL character (PostgreSQL text cannot hold it)")
            self.items += 1
            self.item_line = start
            yield text
        if header is None:
            raise ItemFileError(f"{self.name}: empty file (no header row)")

    def _check_header(self, row: list[str], line: int) -> list[str]:
        seen: set[str] = set()
        for name in row:
            if name in seen:
                raise self.error(line, f"duplicate column name {name!r} in the header")
            if "\x00" in name:
                raise self.error(line, "a NUL character in the header")
            seen.add(name)
        self._suspect = None
        if len(row) == 1:
            for sep in _OTHER_SEPARATORS:
                parts = [p for p in row[0].split(sep) if p.strip()]
                if sep != self.delimiter and len(parts) >= 2:
                    self._suspect = sep  # confirmed (or not) by the first data row
                    break
        self.columns = list(row)
        return self.columns

    # -- JSON Lines --------------------------------------------------------

    def _jsonl_rows(self) -> Iterator[str]:
        """Each object as written: validated here, stored by PostgreSQL from its own text.

        Numbers are kept as literals (``parse_int``/``parse_float``), so jsonb's numeric
        stores them exactly (``1.10`` stays ``1.10``, a 40-digit integer stays whole)
        and only a number numeric cannot hold is refused, with its line.
        """
        for text in self._lines:
            n = self.line
            if not text.strip():
                continue
            try:
                obj = json.loads(
                    text,
                    parse_constant=_reject_constant,
                    parse_int=_json_number,
                    parse_float=_json_number,
                )
            except json.JSONDecodeError as exc:
                raise self.error(n, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            except (ValueError, RecursionError) as exc:
                raise self.error(n, f"invalid JSON: {_reason(exc)}") from None
            if not isinstance(obj, dict):
                raise self.error(n, f"expected a JSON object, got {_kind(obj, text)}")
            if "\\u" in text:  # escapes PostgreSQL's jsonb refuses: \u0000, lone surrogates
                if _has_nul(obj):
                    raise self.error(n, "a \\u0000 character (PostgreSQL jsonb cannot hold it)")
                try:
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise self.error(
                        n, "a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
                    ) from None
            self.items += 1
            self.item_line = n
            yield text.rstrip("\r\n")


# PostgreSQL's numeric: at most 131072 digits before the decimal point, 16383 after, and
# an exponent below 1073741823 either way (a zero included).
_NUMERIC_MAX_WHOLE_DIGITS = 131072
_NUMERIC_MAX_SCALE = 16383
_NUMERIC_MAX_EXPONENT = 1073741822
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")


def _json_number(literal: str) -> str:
    """A JSON number's literal, kept as written; refused when PostgreSQL's numeric cannot hold it."""
    if len(literal) <= 30 and "e" not in literal and "E" not in literal:
        return literal  # the common case: plainly within range
    m = _NUMBER.fullmatch(literal)
    if m is None:  # pragma: no cover - json.loads only passes JSON number literals
        raise ValueError(f"the number {_clip(literal)} is not a JSON number")
    whole, frac, exp = m.group(1), m.group(2) or "", m.group(3) or "0"
    magnitude = exp.lstrip("+-").lstrip("0") or "0"
    if len(magnitude) > 10:
        raise _out_of_range(literal)
    exponent = -int(magnitude) if exp.startswith("-") else int(magnitude)
    if abs(exponent) > _NUMERIC_MAX_EXPONENT or len(frac) - exponent > _NUMERIC_MAX_SCALE:
        raise _out_of_range(literal)
    digits = (whole + frac).lstrip("0")
    if digits:  # not a zero: where its first significant digit lands
        leading_zeros = len(whole) + len(frac) - len(digits)
        if len(whole) + exponent - leading_zeros > _NUMERIC_MAX_WHOLE_DIGITS:
            raise _out_of_range(literal)
    return literal


def _out_of_range(literal: str) -> ValueError:
    return ValueError(f"the number {_clip(literal)} is out of PostgreSQL's numeric range")


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def jsonb_key_order(keys: list[str]) -> list[int]:
    """Indexes of ``keys`` in the order jsonb stores an object's keys: by UTF-8 length, then bytes.

    (UTF-8 byte order is code point order, so Python's string order serves for ties.)
    """
    return sorted(range(len(keys)), key=lambda i: (len(keys[i].encode("utf-8")), keys[i]))


def _picker(order: list[int]):
    """A CSV row's values at ``order``'s indexes, always as a tuple (``itemgetter`` of a
    single index returns the bare value)."""
    if len(order) == 1:
        (only,) = order
        return lambda row: (row[only],)
    return itemgetter(*order)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _kind(obj, text: str) -> str:
    """What a non-object line holds (numbers come back as their literal text)."""
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string" if text.lstrip().startswith('"') else "a number"
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    return "a number"


def _has_nul(obj) -> bool:
    if isinstance(obj, str):
        return "\x00" in obj
    if isinstance(obj, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_nul(v) for v in obj)
    return False


def _decoded_lines(stream: ItemStream, raw: IO[bytes]) -> Iterator[str]:
    """Decode line by line so an invalid byte is reported on its own line."""
    for chunk in raw:
        stream.line += 1
        stream.bytes_read += len(chunk)
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise stream.error(stream.line, f"not valid UTF-8 (byte {exc.start + 1})") from None
        if stream.line == 1 and text.startswith(_BOM):
            text = text[1:]
        yield text


def _text_lines(stream: ItemStream, text_io: IO[str]) -> Iterator[str]:
    """A text stream without a binary buffer (e.g. a test's StringIO stdin)."""
    for text in text_io:
        stream.line += 1
        stream.bytes_read += len(text)
        if stream.line == 1 and text.startswith(_BOM):
            text = text[1:]
        yield text


def item_line(
    source: str | Path, fmt: str | None, number: int, *, delimiter: str = ","
) -> int | None:
    """The line item ``number`` (1-based) of a file starts on, read again; None for stdin
    or anything but a regular file (a pipe cannot be read twice)."""
    if str(source) == "-" or not Path(source).is_file():
        return None
    try:
        with open_items(source, fmt, delimiter=delimiter) as stream:
            for _ in stream.json_rows():
                if stream.items == number:
                    return stream.item_line
    except (OSError, OperationalError):  # changed since: the item number will do
        return None
    return None


# Separators a CSV exported elsewhere often uses: a one-column header and first row that
# both split on one of them the same way mean the file was not comma-separated.
_OTHER_SEPARATORS = {";": ("semicolon", "';'"), "\t": ("tab", "'\\t'"), "|": ("pipe", "'|'")}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# A CSV cell may be as large as a JSON Lines value (csv's default limit is 128 KiB);
# PostgreSQL's own limit on a jsonb value (about 255 MB) is the real bound.
_CSV_FIELD_LIMIT = 256 * 1024 * 1024


@contextmanager
def open_items(
    source: str | Path,
    fmt: str | None = None,
    *,
    stdin: IO | None = None,
    delimiter: str = ",",
) -> Iterator[ItemStream]:
    """Open an item file (``-`` is stdin) for streaming; the format is checked first."""
    source = str(source)
    kind = detect_format(source, fmt)
    if len(delimiter) != 1 or delimiter in ('"', "\r", "\n"):
        raise UsageError(f"--delimiter must be one character (not a quote), not {delimiter!r}")
    if delimiter != "," and kind != "csv":
        raise UsageError("--delimiter applies to CSV item files only")
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    if source == "-":
        text_in = stdin if stdin is not None else sys.stdin
        stream = ItemStream(name="stdin", format=kind, _lines=iter(()), delimiter=delimiter)
        raw = getattr(text_in, "buffer", None)
        stream._lines = (
            _decoded_lines(stream, raw) if raw is not None else _text_lines(stream, text_in)
        )
        yield stream
        return
    path = Path(source)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise OperationalError(f"no such item file: {source}") from None
    except IsADirectoryError:
        raise OperationalError(f"{source} is a directory, not an item file") from None
    except OSError as exc:
        raise OperationalError(f"cannot read {source}: {exc.strerror}") from None
    with handle:
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError:
            size = None
        stream = ItemStream(
            name=path.name, format=kind, _lines=iter(()), size=size, delimiter=delimiter
        )
        stream._lines = _decoded_lines(stream, handle)
        yield stream
