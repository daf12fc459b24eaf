"""`wsctl db tune`: per-table autovacuum settings for workflow_states, printed or applied.

PostgreSQL's defaults start autovacuum on a table once 20% of it is dead (and
analyze at 10%): on a 10,000,000-row workflow_states that is 2,000,000 dead
versions that every claim's index scans walk past. The proposal starts it at
2% (plus 1,000 rows), vacuums after inserts at 2% too (which sets the
visibility map, so counts stay index-only) and analyzes at 1%. The values
live in ``sql/queries/prune.sql`` (``tune_apply``). Nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsctl.db import tx
from wsctl.jsondoc import JsonDoc
from wsctl.queries import q, scalar

if TYPE_CHECKING:
    import psycopg

TABLE = "public.workflow_states"
PROPOSED = {
    "autovacuum_vacuum_scale_factor": "0.02",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.02",
    "autovacuum_analyze_scale_factor": "0.01",
}


@dataclass(frozen=True)
class Setting(JsonDoc):
    table: str
    name: str
    current: str | None  # None: the server's default
    proposed: str

    @property
    def changes(self) -> bool:
        return self.current != self.proposed

    json_extra = ("changes",)


@dataclass(frozen=True)
class TuneReport(JsonDoc):
    settings: list[Setting]
    applied: bool
    statement: str


def _current(conn: psycopg.Connection) -> dict[str, str]:
    options = scalar(conn.execute(q("tune_current")))
    return dict(o.split("=", 1) for o in options)


def tune(conn: psycopg.Connection, *, apply: bool = False, lock_timeout: str = "5s") -> TuneReport:
    """What the settings are and would be; with ``apply``, set them (idempotent)."""
    with tx(conn, lock_timeout=lock_timeout):
        before = _current(conn)
        if apply and any(before.get(k) != v for k, v in PROPOSED.items()):
            conn.execute(q("tune_apply"))
    settings = [Setting(TABLE, k, before.get(k), v) for k, v in PROPOSED.items()]
    return TuneReport(settings=settings, applied=apply, statement=q("tune_apply") + ";")
