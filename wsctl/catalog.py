"""The catalog an operator maintains: clients, registry rows, client configs.

Registry rows say which Modal functions run a step in a workstream;
client configs hold one client's settings for a step in a workstream. Both
are keyed by the composite ``(step slug, workstream slug)``. Every write
validates all its input first and runs in one transaction.
"""

from __future__ import annotations

import json
import re
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.domain import Client, StepType, find_client, validate_filters, validate_slug
from wsctl.errors import OperationalError, UsageError
from wsctl.jsondoc import FLATTEN, JsonDoc, fields_doc
from wsctl.queries import named, one, q, rows_as
from wsctl.redact import first_line, key_path, remember
from wsctl.secret_refs import check_references, plaintext_credentials

if TYPE_CHECKING:
    import psycopg

STEP_TYPES = tuple(t.value for t in StepType)
# A Modal function name: a Python identifier, or Class.method for Modal classes.
_FN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
# Client names are free text in the dashboard; new ones stay printable and shell-safe.
_CLIENT_NAME_RE = re.compile(r"^[^\W_][\w .&',()+/-]*$")
MAX_NAME = 200


def _shown(value: Any) -> str:
    text = str(value)
    return repr(text if len(text) <= 80 else f"{text[:77]}...")


def _too_long(what: str, value: str) -> str:
    return (
        f"invalid {what} {value[:40] + '...'!r}: too long ({len(value)} characters; "
        f"at most {MAX_NAME})"
    )


# --- clients ---------------------------------------------------------------


@dataclass(frozen=True)
class ClientRow:
    id: uuid.UUID
    name: str
    created_at: datetime | None = None
    configs: int | None = None  # counted by list_clients only
    batches: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }
        if self.configs is not None:
            doc.update(configs=self.configs, batches=self.batches)
        return doc


def validate_client_name(name: str) -> str:
    """A new client's name: letters, digits, spaces and . & ' , ( ) + / _ - (no ';', quotes only ')."""
    value = name.strip() if isinstance(name, str) else ""
    if len(value) > MAX_NAME:
        raise OperationalError(_too_long("client name", value))
    if not value or not _CLIENT_NAME_RE.fullmatch(value):
        raise OperationalError(
            f"invalid client name {_shown(name)}: use letters, digits, spaces and . & ' , ( ) + / _ -, "
            "starting with a letter or digit"
        )
    return value


def add_client(conn: psycopg.Connection, name: str) -> tuple[ClientRow, bool]:
    """Add a client; returns ``(row, created)`` (an existing name is returned as is)."""
    value = validate_client_name(name)
    with tx(conn):
        row = rows_as(conn, ClientRow).execute(q("catalog_client_insert"), (value,)).fetchone()
        created = row is not None
        if row is None:
            row = one(rows_as(conn, ClientRow).execute(q("catalog_client_get"), (value,)))
    return row, created


def list_clients(conn: psycopg.Connection) -> list[ClientRow]:
    with tx(conn):  # read only; the transaction carries the statement timeout
        return rows_as(conn, ClientRow).execute(q("catalog_client_list")).fetchall()


# --- registry --------------------------------------------------------------


@dataclass(frozen=True)
class RegistryRow:
    """Which Modal functions run one step in one workstream."""

    step: str
    workstream: str
    type: str
    sender: str
    receiver: str | None = None
    id: uuid.UUID | None = None
    created_at: datetime | None = None
    # limit key templates bound to the row (None: not given, leave them as they are)
    limit_keys: tuple[str, ...] | None = None

    @property
    def stored_id(self) -> uuid.UUID:
        """The id of a row read from the database (a row parsed from a file has none yet)."""
        if self.id is None:
            raise RuntimeError("a registry row not read from the database has no id")
        return self.id

    def to_json(self) -> dict[str, Any]:
        return fields_doc(self) | {"limit_keys": list(self.limit_keys or ())}


def validate_registry_row(
    step: str,
    workstream: str,
    type_: str,
    sender: str,
    receiver: str | None,
    limit_keys: list[str] | tuple[str, ...] | None = None,
) -> RegistryRow:
    """A checked registry row (slugs, type, function names; async needs a receiver)."""
    validate_slug(step, "step slug")
    validate_slug(workstream, "workstream slug")
    if type_ not in STEP_TYPES:
        raise OperationalError(f"invalid type {_shown(type_)}: use sync or async")
    for what, fn in (("sender", sender), ("receiver", receiver)):
        if fn is None and what == "receiver":
            continue
        if isinstance(fn, str) and len(fn) > MAX_NAME:
            raise OperationalError(_too_long(f"{what} function name", fn))
        if not isinstance(fn, str) or not _FN_RE.fullmatch(fn):
            raise OperationalError(
                f"invalid {what} function name {_shown(fn)}: expected a Python identifier "
                "(or Class.method)"
            )
    if type_ == "async" and not receiver:
        raise OperationalError(
            f"{step} in {workstream}: an async step needs a receiver (the function "
            "the outside service's webhook reaches)"
        )
    if type_ == "sync" and receiver:
        raise OperationalError(
            f"{step} in {workstream}: a sync step finishes itself; drop --receiver"
        )
    keys: tuple[str, ...] | None = None
    if limit_keys is not None:
        from wsctl.limits import validate_template

        if not all(isinstance(k, str) for k in limit_keys):
            raise OperationalError(f"{step} in {workstream}: every limit key must be a string")
        keys = tuple(sorted({validate_template(k) for k in limit_keys}))
    return RegistryRow(step, workstream, type_, sender, receiver or None, limit_keys=keys)


@dataclass(frozen=True)
class RegistryWrite(JsonDoc):
    row: RegistryRow = field(metadata=FLATTEN)
    created: bool
    changed: bool = True  # False: the row already said exactly this (nothing written)


def _upsert_registry(conn: psycopg.Connection, row: RegistryRow) -> RegistryWrite:
    key = (row.step, row.workstream)
    before = (
        rows_as(conn, RegistryRow).execute(q("catalog_registry_get_for_update"), key).fetchone()
    )
    params = {
        "workflow": row.step,
        "workstream": row.workstream,
        "type": row.type,
        "sender": row.sender,
        "receiver": row.receiver,
    }
    from wsctl.limits import bind_registry, registry_bindings

    if before is not None:
        bound = tuple(registry_bindings(conn, [before.stored_id])[before.stored_id])
        same = replace(before, limit_keys=bound)
        if (same.type, same.sender, same.receiver) == (row.type, row.sender, row.receiver) and (
            row.limit_keys is None or row.limit_keys == bound
        ):
            return RegistryWrite(same, created=False, changed=False)
    after = one(rows_as(conn, RegistryRow).execute(q("catalog_registry_upsert"), params))
    if row.limit_keys is not None:
        bind_registry(conn, after.stored_id, list(row.limit_keys))
    keys = tuple(registry_bindings(conn, [after.stored_id])[after.stored_id])
    return RegistryWrite(replace(after, limit_keys=keys), created=before is None)


def add_registry(
    conn: psycopg.Connection,
    *,
    step: str,
    workstream: str,
    type: str,
    sender: str,
    receiver: str | None = None,
    limit_keys: list[str] | None = None,
) -> RegistryWrite:
    """Register a step's Modal functions in a workstream (upsert on the composite key).

    ``limit_keys`` (templates, see ``wsctl.limits``) replace the row's bindings when
    given; None leaves them as they are.
    """
    row = validate_registry_row(step, workstream, type, sender, receiver, limit_keys)
    with tx(conn):
        return _upsert_registry(conn, row)


def list_registry(
    conn: psycopg.Connection, *, workstream: str | None = None, step: str | None = None
) -> list[RegistryRow]:
    validate_filters(workstream=workstream, step=step)
    from wsctl.limits import registry_bindings

    with tx(conn):  # read only; the transaction carries the statement timeout
        params = {"workstream": workstream, "workflow": step}
        rows = rows_as(conn, RegistryRow).execute(q("catalog_registry_list"), params).fetchall()
        bound = registry_bindings(conn, [r.id for r in rows if r.id is not None])
    return [replace(r, limit_keys=tuple(bound.get(r.stored_id, ()))) for r in rows]


@dataclass(frozen=True)
class RegistryNeeds:
    """What still needs a registry row (``catalog_registry_needed_by``)."""

    waiting: int  # PENDING, DISPATCHING, DISPATCHED states of the step
    blocked: int  # BLOCKED states of the step (a retry would need the row)
    batches_to_reach: int  # batches whose items are still at an earlier step

    @property
    def any(self) -> bool:
        return bool(self.waiting or self.blocked or self.batches_to_reach)

    def describe(self) -> str:
        parts = []
        if self.waiting:
            parts.append(f"{self.waiting} pending or dispatched state(s)")
        if self.blocked:
            parts.append(f"{self.blocked} BLOCKED state(s)")
        if self.batches_to_reach:
            parts.append(f"{self.batches_to_reach} active batch(es) that have not reached the step")
        return ", ".join(parts)


@dataclass(frozen=True)
class RegistryRemoval:
    row: RegistryRow
    needs: RegistryNeeds  # what still needed the row (removed anyway with force)

    @property
    def needed_by(self) -> int:
        return self.needs.waiting + self.needs.blocked

    def to_json(self) -> dict[str, Any]:
        return {
            **self.row.to_json(),
            "removed": True,
            "needed_by": self.needed_by,
            "needed_by_blocked": self.needs.blocked,
            "batches_to_reach": self.needs.batches_to_reach,
        }


def remove_registry(
    conn: psycopg.Connection, *, step: str, workstream: str, force: bool = False
) -> RegistryRemoval:
    """Remove a registry row; refused while states (waiting, in flight or BLOCKED) or
    active batches that have not reached the step yet need it, unless ``force``."""
    validate_slug(step, "step slug")
    validate_slug(workstream, "workstream slug")
    with tx(conn):
        found = (
            rows_as(conn, RegistryRow)
            .execute(q("catalog_registry_get_for_update"), (step, workstream))
            .fetchone()
        )
        if found is None:
            raise OperationalError(
                f"{step} is not registered in workstream {workstream}",
                hint="see `wsctl registry list`",
            )
        row = found
        from psycopg.rows import class_row

        with conn.cursor(row_factory=class_row(RegistryNeeds)) as cur:
            needs = cur.execute(
                q("catalog_registry_needed_by"), {"workflow": step, "workstream": workstream}
            ).fetchone()
        assert needs is not None
        if needs.any and not force:
            raise OperationalError(
                f"refused: {needs.describe()} of {step} in workstream {workstream} "
                "still need this registry row",
                hint="let them finish, cancel them, or pass --force",
            )
        conn.execute(q("catalog_registry_delete"), (row.id,))
    return RegistryRemoval(row=row, needs=needs)


_IMPORT_KEYS = {"step", "workstream", "type", "sender", "receiver", "limit_keys"}
_OLD_IMPORT_KEYS = {"workflow": "step"}  # still read (the README's "Renamed" list)


def parse_registry_toml(text: str, source: str = "registry file") -> list[RegistryRow]:
    """Every ``[[registry]]`` row of a TOML document, all validated (the first error stops)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OperationalError(f"{source}: not valid TOML: {exc}") from None
    extra = set(doc) - {"registry"}
    if extra:
        raise OperationalError(f"{source}: unknown top-level key(s): {', '.join(sorted(extra))}")
    entries = doc.get("registry")
    if not isinstance(entries, list) or not entries:
        raise OperationalError(f"{source}: expected one or more [[registry]] tables")
    rows: list[RegistryRow] = []
    seen: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(entries, start=1):
        where = f"{source}: registry row {i}"
        if not isinstance(entry, dict):
            raise OperationalError(f"{where}: expected a table")
        for old, new in _OLD_IMPORT_KEYS.items():
            if old in entry:
                if new in entry:
                    raise OperationalError(f"{where}: give {new} or {old} (its old name), not both")
                entry = {(new if k == old else k): v for k, v in entry.items()}
        unknown = set(entry) - _IMPORT_KEYS
        if unknown:
            raise OperationalError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
        missing = [k for k in ("step", "workstream", "type", "sender") if k not in entry]
        if missing:
            raise OperationalError(f"{where}: missing {', '.join(missing)}")
        keys = entry.get("limit_keys")
        if keys is not None and not isinstance(keys, list):
            raise OperationalError(f"{where}: limit_keys must be a list of strings")
        if not all(isinstance(v, str) for k, v in entry.items() if k != "limit_keys"):
            raise OperationalError(f"{where}: every value must be a string")
        try:
            row = validate_registry_row(
                entry["step"],
                entry["workstream"],
                entry["type"],
                entry["sender"],
                entry.get("receiver") or None,
                keys,
            )
        except (OperationalError, UsageError) as exc:
            raise OperationalError(f"{where}: {exc}") from None
        key = (row.step, row.workstream)
        if key in seen:
            raise OperationalError(
                f"{where}: {key[0]} in {key[1]} is already defined by row {seen[key]}"
            )
        seen[key] = i
        rows.append(row)
    return rows


@dataclass(frozen=True)
class RegistryImport(JsonDoc):
    rows: list[RegistryWrite] = field(default_factory=list)
    dry_run: bool = False

    @property
    def created(self) -> int:
        return sum(1 for w in self.rows if w.created)

    @property
    def unchanged(self) -> int:
        return sum(1 for w in self.rows if not w.changed)

    @property
    def updated(self) -> int:
        return len(self.rows) - self.created - self.unchanged

    json_extra = (
        "created",
        "updated",
        "unchanged",
    )


def import_registry(
    conn: psycopg.Connection, path: Path, *, dry_run: bool = False
) -> RegistryImport:
    """Upsert every row of a registry TOML file in one transaction: all rows or none."""
    text = _read_text(path)
    rows = parse_registry_toml(text, str(path))
    if dry_run:
        return RegistryImport(rows=[RegistryWrite(r, created=False) for r in rows], dry_run=True)
    with tx(conn):
        written = [_upsert_registry(conn, r) for r in rows]
    return RegistryImport(rows=written)


# --- client configs --------------------------------------------------------


@dataclass(frozen=True)
class ConfigRow:
    id: uuid.UUID
    client: Client
    step: str
    workstream: str
    config: dict[str, Any]
    updated_at: datetime | None = None

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        from wsctl.redact import redact

        return {
            "id": str(self.id),
            "client": self.client.name,
            "client_id": str(self.client.id),
            "step": self.step,
            "workstream": self.workstream,
            "config": redact(self.config, reveal=reveal),
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def _config_row(client: Client, r: dict[str, Any]) -> ConfigRow:
    """A ``client_workflow_configs`` row read by ``queries.named``."""
    return ConfigRow(
        id=r["id"],
        client=client,
        step=r["workflow_slug"],
        workstream=r["workstream_slug"],
        config=r["config"],
        updated_at=r["updated_at"],
    )


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OperationalError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OperationalError(f"{path}: cannot read: {exc}") from None


def load_config_file(path: Path) -> dict[str, Any]:
    """A config document from a .json or .toml file; it must be an object/table that
    PostgreSQL's jsonb can store (see ``check_config_values``)."""
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
            raise OperationalError(f"{path}: not valid JSON: {_reason(exc)}") from None
    elif suffix == ".toml":
        try:
            doc = tomllib.loads(text)
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
            raise OperationalError(f"{path}: not valid TOML: {_reason(exc)}") from None
    else:
        raise OperationalError(f"{path}: expected a .json or .toml file")
    if not isinstance(doc, dict):
        raise OperationalError(f"{path}: the config must be a JSON object")
    check_config_values(doc, str(path))
    return doc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return first_line(exc).split(";")[0]


def _shown_path(path: str) -> str:
    path = path.replace("\x00", "\\u0000")
    return path if len(path) <= 80 else f"{path[:77]}..."


_NUL = "a NUL character (\\u0000), which PostgreSQL cannot store"


def _lone_surrogate(text: str) -> str | None:
    """How a lone surrogate in ``text`` reads (``\\udce9``), or None when it is valid text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None


def _surrogate_message(found: str) -> str:
    return (
        f"a lone surrogate ({found}), which is not valid UTF-8 and not JSON text PostgreSQL "
        "can store (a \\ud800-\\udfff escape without its pair, or a file that is not UTF-8)"
    )


def _non_finite_name(value: float) -> str:
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def check_config_values(doc: Any, source: str) -> None:
    """Refuse, before any write, what a jsonb column cannot hold, naming the key path.

    TOML dates, times and datetimes have no JSON type (quoting them is explicit;
    a silent ISO string would come back as a string, not a date); NaN and
    +-Infinity are not JSON numbers (``1e999`` parses to Infinity); PostgreSQL
    refuses NUL characters (``\\u0000``) in jsonb strings and key names.
    """
    import datetime as dt
    import math

    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:  # iterative: a deeply nested document cannot exhaust the stack
        path, value = stack.pop()
        where = f"{source}: key {_shown_path(path)}" if path else source
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise OperationalError(f"{where}: key {k!r} is not a string")
                if "\x00" in k:
                    shown = _shown_path(key_path(path, k))
                    raise OperationalError(f"{source}: key {shown}: the key name contains {_NUL}")
                if found := _lone_surrogate(k):
                    shown = _shown_path(
                        key_path(path, k).encode("utf-8", "backslashreplace").decode()
                    )
                    raise OperationalError(
                        f"{source}: key {shown}: the key name contains {_surrogate_message(found)}"
                    )
                stack.append((key_path(path, k), v))
        elif isinstance(value, list | tuple):
            stack.extend((key_path(path, i), v) for i, v in enumerate(value))
        elif isinstance(value, str):
            if "\x00" in value:
                raise OperationalError(f"{where}: the string contains {_NUL}")
            if found := _lone_surrogate(value):
                raise OperationalError(f"{where}: the string contains {_surrogate_message(found)}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise OperationalError(
                    f"{where}: {_non_finite_name(value)} is not a JSON number (numbers must be "
                    "finite; 1e999 and beyond overflow to Infinity); quote it to store a string"
                )
        elif isinstance(value, dt.datetime | dt.date | dt.time):
            kind = "datetime" if isinstance(value, dt.datetime) else type(value).__name__
            raise OperationalError(
                f"{where}: a TOML {kind} cannot be stored in a JSON config; quote it as a string"
            )
        elif value is not None and not isinstance(value, bool | int):
            raise OperationalError(
                f"{where}: a {type(value).__name__} cannot be stored in a JSON config"
            )
    check_references(doc, source)


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is JSON when it parses as JSON, else the plain string."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OperationalError(f"invalid --set {_shown(item)}: expected key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        except (ValueError, RecursionError) as exc:  # valid JSON that Python cannot hold
            raise OperationalError(
                f"--set: key {_shown_path(key)}: cannot read the value: {_reason(exc)}"
            ) from None
        check_config_values({key: value}, "--set")
        out[key] = value
    return out


@dataclass(frozen=True)
class ConfigWrite:
    row: ConfigRow
    created: bool
    warnings: list[str] = field(default_factory=list)

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        return {
            **self.row.to_json(reveal=reveal),
            "created": self.created,
            "warnings": self.warnings,
        }


def _plaintext_warnings(doc: dict[str, Any]) -> list[str]:
    paths = plaintext_credentials(doc)
    if not paths:
        return []
    shown = ", ".join(paths[:5]) + (f" (+{len(paths) - 5} more)" if len(paths) > 5 else "")
    return [
        f"{len(paths)} value(s) look like credentials given in clear ({shown}): store a "
        'reference instead, {"$secret": "NAME"}, and set NAME in the Modal secret of the '
        "function (it is resolved there)"
    ]


def set_config(
    conn: psycopg.Connection,
    *,
    client: str,
    step: str,
    workstream: str,
    config: dict[str, Any] | None = None,
    merge: dict[str, Any] | None = None,
    new_workstream: bool = False,
    submitted: int | None = None,
) -> ConfigWrite:
    """Upsert a client config: ``config`` replaces the document, ``merge`` adds/overwrites keys.

    A workstream with no registry rows is refused (a typo would be stored and never
    read) unless ``new_workstream`` says it is new. ``submitted``: the Clay webhook URLs
    this change adds already took that many submissions before wsctl counted them
    (``wsctl.clay.record_prior``, in the same transaction).
    """
    from psycopg.types.json import Jsonb

    validate_slug(step, "step slug")
    validate_slug(workstream, "workstream slug")
    if (config is None) == (merge is None):
        raise UsageError("give either a whole config (--file) or keys to merge (--set)")
    doc = config if config is not None else merge
    if not isinstance(doc, dict):
        raise OperationalError("the config must be a JSON object")
    check_config_values(doc, "config")
    remember(doc)  # a PostgreSQL error quoting one of its values is masked
    warnings = _plaintext_warnings(doc)
    with tx(conn):
        found = find_client(conn, client)
        from wsctl.batches import known_workstreams

        known = known_workstreams(conn)
        if workstream not in known and not new_workstream:
            import difflib

            close = difflib.get_close_matches(workstream, known, n=1)
            listed = ", ".join(known) if known else "none: the registry is empty"
            raise OperationalError(
                f"unknown workstream {workstream!r} (no registry rows)"
                + (f"; did you mean {close[0]!r}?" if close else f"; known workstreams: {listed}"),
                hint="pass --new-workstream to store a config for a workstream not registered yet",
            )
        registered = conn.execute(q("resolve_registry"), (step, workstream)).fetchone()
        if registered is None:
            warnings.append(
                f"{step} is not registered in workstream {workstream} "
                "(see `wsctl registry list`); the config is stored anyway"
            )
        key = (found.id, step, workstream)
        before = named(conn).execute(q("catalog_config_get_for_update"), key).fetchone()
        name = "catalog_config_replace" if config is not None else "catalog_config_merge"
        row = one(named(conn).execute(q(name), (*key, Jsonb(doc))))
        result = ConfigWrite(_config_row(found, row), created=before is None, warnings=warnings)
        if submitted is not None:
            was = _config_row(found, before).config if before is not None else {}
            _record_prior_submissions(conn, was, result, submitted)
    return result


def _record_prior_submissions(
    conn: psycopg.Connection, was: dict[str, Any], result: ConfigWrite, submitted: int
) -> None:
    """``config set --submitted N``: count N earlier submissions for each webhook URL added."""
    from wsctl import clay

    if submitted < 0:
        raise UsageError("--submitted must be zero or more")
    old = {clay.digest(e) for e in clay.webhook_entries(was)}
    added = [e for e in clay.webhook_entries(result.row.config) if clay.digest(e) not in old]
    if not added:
        raise UsageError(
            "--submitted N counts the submissions of webhook URLs this change adds; it adds "
            "none (set clay_table_webhook_urls or clay_table_webhook_url)"
        )
    for entry in added:
        clay.record_prior(conn, entry, submitted)
    result.warnings.append(
        f"recorded {submitted:,} earlier submission(s) for {len(added)} added webhook URL(s)"
    )


@dataclass(frozen=True)
class ConfigRemoval:
    row: ConfigRow  # the row as it was (whole removal) or as it is now (some keys)
    deleted: bool
    removed_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        return {
            **self.row.to_json(reveal=reveal),
            "deleted": self.deleted,
            "removed_keys": self.removed_keys,
            "missing_keys": self.missing_keys,
        }


def unset_config(
    conn: psycopg.Connection,
    *,
    client: str,
    step: str,
    workstream: str,
    keys: list[str] | None = None,
) -> ConfigRemoval:
    """Delete a client config row, or only some of its top-level keys."""
    validate_slug(step, "step slug")
    validate_slug(workstream, "workstream slug")
    with tx(conn):
        found = find_client(conn, client)
        before = (
            named(conn)
            .execute(q("catalog_config_get_for_update"), (found.id, step, workstream))
            .fetchone()
        )
        if before is None:
            raise OperationalError(
                f"client {found.name} has no config for {step} in workstream {workstream}",
                hint="see `wsctl config list`",
            )
        if not keys:
            conn.execute(q("catalog_config_delete"), (before["id"],))
            return ConfigRemoval(_config_row(found, before), deleted=True)
        present = [k for k in keys if k in before["config"]]
        missing = [k for k in keys if k not in before["config"]]
        after = before
        if present:
            after = one(
                named(conn).execute(q("catalog_config_remove_keys"), (present, before["id"]))
            )
    return ConfigRemoval(
        _config_row(found, after), deleted=False, removed_keys=present, missing_keys=missing
    )


def list_configs(
    conn: psycopg.Connection,
    *,
    client: str | None = None,
    workstream: str | None = None,
    step: str | None = None,
) -> list[ConfigRow]:
    validate_filters(workstream=workstream, step=step)
    with tx(conn):  # read only; the transaction carries the statement timeout
        client_id = find_client(conn, client).id if client is not None else None
        rows = (
            named(conn)
            .execute(
                q("catalog_config_list"),
                {"client_id": client_id, "workstream": workstream, "workflow": step},
            )
            .fetchall()
        )
    return [_config_row(Client(id=r["client_id"], name=r["name"]), r) for r in rows]
