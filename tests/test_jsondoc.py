"""wsctl.jsondoc: the one serialiser of the documents wsctl prints.

The documents themselves are checked end to end against a real database by
tests/test_docs.py (every ``--json`` command's keys) and the command tests; these
tests pin the rules each of those documents relies on.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path

import pytest

from wsctl.jsondoc import FLATTEN, OMIT, JsonDoc, rename, to_doc


class Colour(Enum):
    RED = "red"


@dataclass(frozen=True)
class Inner(JsonDoc):
    id: uuid.UUID
    at: datetime | None


@dataclass(frozen=True)
class Bespoke:
    secret: str

    def to_json(self) -> dict:
        return {"secret": "***"}


@dataclass
class Outer(JsonDoc):
    workstream_slug: str = field(metadata=rename("workstream"))
    inner: Inner = field(metadata=FLATTEN)
    rows: list[Inner] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list, metadata=OMIT)
    bespoke: Bespoke | None = None
    extra: dict = field(default_factory=dict)

    json_extra = ("total",)

    @property
    def total(self) -> int:
        return len(self.rows)


ID = uuid.UUID("01a2314c-53d6-786f-afe2-956e00000001")
AT = datetime(2026, 12, 1, 11, 10, 13, tzinfo=UTC)


def test_fields_in_order_renamed_omitted_flattened_then_the_extras():
    doc = Outer(
        "apollo_scrape",
        Inner(ID, AT),
        rows=[Inner(ID, None)],
        warnings=["not printed"],
        bespoke=Bespoke("sk-live-1"),
    ).to_json()
    assert list(doc) == ["workstream", "id", "at", "rows", "bespoke", "extra", "total"]
    assert doc == {
        "workstream": "apollo_scrape",
        "id": str(ID),
        "at": "2026-12-01T11:10:13+00:00",
        "rows": [{"id": str(ID), "at": None}],
        "bespoke": {"secret": "***"},  # a type with its own to_json keeps it, nested too
        "extra": {},
        "total": 1,
    }
    assert json.loads(json.dumps(doc)) == doc  # plain JSON values only


def test_values_are_converted_once_everywhere():
    value = {
        "id": ID,
        1: (date(2026, 12, 1), Decimal("0.5")),
        "colour": Colour.RED,
        "path": Path("/tmp/x"),
        "set": frozenset({"a"}),
        "nested": [{"at": AT}],
    }
    assert to_doc(value) == {
        "id": str(ID),
        "1": ["2026-12-01", 0.5],
        "colour": "red",
        "path": "/tmp/x",
        "set": ["a"],
        "nested": [{"at": "2026-12-01T11:10:13+00:00"}],
    }


def test_a_flattened_field_that_is_none_adds_nothing():
    @dataclass
    class Maybe(JsonDoc):
        inner: Inner | None = field(default=None, metadata=FLATTEN)
        n: int = 0

    assert Maybe().to_json() == {"n": 0}


def test_a_value_json_cannot_hold_is_refused_by_name():
    with pytest.raises(TypeError, match="cannot put a object in a JSON document"):
        to_doc({"x": object()})
