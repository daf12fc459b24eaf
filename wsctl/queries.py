"""Every SQL statement wsctl sends lives under ``sql/``.

``sql/queries/*.sql`` hold named blocks in procrastinate's style::

    -- claim_states --
    -- one line saying what it does
    SELECT ...;

Rows are read by name, never by position: ``rows_as(conn, Cls)`` fills a
dataclass from columns named as its fields (the query renames a column that
says it otherwise: ``slug AS step``), ``named(conn)`` gives dicts.

``sql/migrations/NNNN_name.sql`` hold schema changes (see ``wsctl.migrations``).
In a wheel the directory is mapped to ``wsctl/sql``; in a checkout it is the
top-level ``sql/``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import psycopg

Row = TypeVar("Row")

_BLOCK = re.compile(r"^-- ([a-z0-9_]+) --\s*$", re.MULTILINE)


@cache
def sql_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise RuntimeError("wsctl's sql/ directory is missing from the installation")


def parse_blocks(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: statement}``; the leading comment lines are kept out."""
    out: dict[str, str] = {}
    parts = _BLOCK.split(text)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines()]
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        stmt = "\n".join(lines).strip().rstrip(";").strip()
        if name in out:
            raise RuntimeError(f"query {name!r} is defined twice")
        out[name] = stmt
    return out


@cache
def _all() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        for name, stmt in parse_blocks(path.read_text(encoding="utf-8")).items():
            if name in out:
                raise RuntimeError(f"query {name!r} is defined twice ({path.name})")
            out[name] = stmt
    return out


def q(name: str) -> str:
    """The statement named ``name``."""
    try:
        return _all()[name]
    except KeyError:
        raise RuntimeError(f"no SQL query named {name!r} under sql/queries") from None


def one(cur: psycopg.Cursor[Row]) -> Row:
    """The one row a statement returns (an aggregate, or ``RETURNING`` of a row known to exist).

    psycopg's ``fetchone()`` says ``None`` when there is no row; for these
    statements that is a broken invariant (a row deleted under us), reported
    as such instead of a ``TypeError`` further on.
    """
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("a statement that returns one row returned none")
    return row


def named(conn: psycopg.Connection) -> psycopg.Cursor[dict[str, Any]]:
    """A cursor whose rows are read by column name (``psycopg.rows.dict_row``)."""
    from psycopg.rows import dict_row

    return conn.cursor(row_factory=dict_row)


def rows_as(conn: psycopg.Connection, cls: type[Row]) -> psycopg.Cursor[Row]:
    """A cursor whose rows are ``cls`` built from the columns of the same names
    (``psycopg.rows.class_row``: a column ``cls`` has no field for is an error)."""
    from psycopg.rows import class_row

    return conn.cursor(row_factory=class_row(cls))


def column(cur: psycopg.Cursor[dict[str, Any]], name: str) -> list[Any]:
    """The values of the column ``name``, one per row, of a ``named`` cursor's result."""
    return [r[name] for r in cur]


def scalar(cur: psycopg.Cursor[Any]) -> Any:
    """The single value of a one-row, one-column result (``SELECT count(*) ...``)."""
    row = one(cur)
    return row[0] if isinstance(row, tuple | list) else next(iter(row.values()))


def names() -> list[str]:
    return sorted(_all())


def example_path(name: str) -> Path:
    """A file from ``examples/`` (shipped inside the wheel as ``wsctl/examples``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "examples" / name, here.parent / "examples" / name):
        if candidate.exists():
            return candidate
    raise RuntimeError(f"example file {name!r} is missing from the installation")
