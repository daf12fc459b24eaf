"""One serialiser for the JSON documents wsctl prints (``--json``).

A result type is a dataclass; ``JsonDoc`` gives it ``to_json()``, which walks
its fields in order with ``to_doc``: uuids become strings, dates and times ISO
8601, enums their value, ``Decimal`` a float, paths strings, tuples and sets
lists, nested dataclasses their own documents. A field's metadata changes
what it becomes::

    key_template: str = field(metadata=rename("template"))  # printed as "template"
    warnings: list[str] = field(default_factory=list, metadata=OMIT)  # not printed
    row: RegistryRow = field(metadata=FLATTEN)  # its keys merged into this document

and ``json_extra`` names properties printed after the fields (computed keys
such as a total). A type whose document differs more (secrets redacted unless
``reveal``, keys that depend on the values) keeps a ``to_json`` of its own,
which ``to_doc`` calls wherever it meets one.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from pathlib import PurePath
from types import MappingProxyType
from typing import Any, ClassVar

_KEY = "wsctl.json"
OMIT: Mapping[str, Any] = MappingProxyType({_KEY: ("omit", None)})
FLATTEN: Mapping[str, Any] = MappingProxyType({_KEY: ("flatten", None)})


def rename(name: str) -> Mapping[str, Any]:
    """Field metadata: print the field under ``name`` instead of its attribute name."""
    return MappingProxyType({_KEY: ("key", name)})


class JsonDoc:
    """Mixin for a dataclass whose JSON document is its fields (see the module docstring)."""

    json_extra: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        return fields_doc(self)


def fields_doc(obj: Any) -> dict[str, Any]:
    """The document of a dataclass instance from its fields, ``json_extra`` after them."""
    doc: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        how, arg = f.metadata.get(_KEY, ("key", f.name))
        if how == "omit":
            continue
        value = to_doc(getattr(obj, f.name))
        if how == "flatten":
            if value is not None:
                doc.update(value)
            continue
        doc[arg] = value
    for name in getattr(obj, "json_extra", ()):
        doc[name] = to_doc(getattr(obj, name))
    return doc


def to_doc(obj: Any) -> Any:
    """``obj`` as plain JSON values (dict, list, str, int, float, bool, None)."""
    if obj is None or isinstance(obj, str | bool | int | float):
        return obj
    if isinstance(obj, Enum):
        return to_doc(obj.value)
    if isinstance(obj, uuid.UUID | PurePath):
        return str(obj)
    if isinstance(obj, datetime | date | time):
        return obj.isoformat()
    if isinstance(obj, Decimal):
        return float(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        own = getattr(type(obj), "to_json", None)
        if own is not None and own is not JsonDoc.to_json:
            return own(obj)
        return fields_doc(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_doc(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_doc(v) for v in obj]
    raise TypeError(f"cannot put a {type(obj).__name__} in a JSON document")
