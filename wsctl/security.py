"""What the Supabase Data API may reach, and how wsctl keeps it closed.

On Supabase every table in ``public`` is served over HTTP to whoever holds the
public anon key, as far as the roles ``anon`` and ``authenticated`` may read
or write it; default privileges grant them everything created there. So:

- ``wsctl migrate`` creating the pipeline tables itself (a fresh database)
  revokes everything from PUBLIC and the API roles in 0001's own transaction,
  and records the fact in ``wsctl.created_tables`` (a later migration cannot
  tell a created table from an adopted one). An adopted database's grants and
  policies are left alone: ``wsctl secure`` changes them when asked.
- wsctl's own schema and objects are reachable by their owner and the roles
  given them explicitly (``grant_worker``) only: every object a migration
  creates loses what default privileges gave anyone else.
- Privileges, not row level security: with RLS on, ``COPY FROM`` fails for
  every role but the owner and BYPASSRLS roles, and a worker role's updates
  would silently match no rows.

The API role names come from the database settings ``wsctl.anon_role`` and
``wsctl.authenticated_role`` (default ``anon`` and ``authenticated``). Nothing
here prints or exits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wsctl.errors import OperationalError, UsageError
from wsctl.jsondoc import JsonDoc, fields_doc
from wsctl.queries import one, q, scalar

if TYPE_CHECKING:
    import psycopg

PIPELINE_TABLES = (
    "clients",
    "enrichment_registry",
    "client_workflow_configs",
    "batches",
    "batch_items",
    "workflow_states",
)
CONFIGS = "client_workflow_configs"
PUBLIC = "PUBLIC"


@dataclass(frozen=True)
class ApiRoles:
    """The Data API's roles in this database (names from settings; ``present``: those that exist)."""

    anon: str
    authenticated: str
    present: tuple[str, ...] = ()

    def exists(self, role: str) -> bool:
        return role in self.present


def api_roles(conn: psycopg.Connection) -> ApiRoles:
    """The API role names (``wsctl.anon_role``/``wsctl.authenticated_role``) and which exist."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        names = one(cur.execute(q("security_api_roles")))
    present = existing_roles(conn, [names["anon"], names["authenticated"]])
    return ApiRoles(names["anon"], names["authenticated"], tuple(present))


def existing_roles(conn: psycopg.Connection, names: list[str]) -> list[str]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q("security_existing_roles"), (list(names),)).fetchall()
    return [r["rolname"] for r in rows]


def _role(name: str):
    from psycopg import sql

    return sql.SQL(PUBLIC) if name == PUBLIC else sql.Identifier(name)


# --- the migration runner's part -------------------------------------------------------


def missing_pipeline_tables(conn: psycopg.Connection) -> list[str]:
    """The pipeline tables that do not exist (asked while 0001 is pending)."""
    return missing_tables(conn, list(PIPELINE_TABLES))


def close_created_tables(conn: psycopg.Connection, created: list[str], migration: int) -> None:
    """In the transaction that created ``created``: nothing for PUBLIC and the API roles, and
    the fact recorded in ``wsctl.created_tables``. Other grantees (service_role) keep theirs."""
    from psycopg import sql

    gone = set(missing_pipeline_tables(conn)) if created else set()
    created = [t for t in created if t not in gone]  # what the migration did create
    if not created:
        return
    roles = api_roles(conn)
    for table in created:
        for grantee in (PUBLIC, *roles.present):
            conn.execute(
                sql.SQL(q("security_revoke_table")).format(
                    sql.Identifier("public", table), _role(grantee)
                )
            )
    conn.execute(q("security_created_tables_ensure"))
    conn.execute(q("security_record_created"), (sorted(created), migration))


@dataclass(frozen=True)
class WsctlObject:
    kind: str  # SCHEMA, TABLE, SEQUENCE or ROUTINE (the GRANT/REVOKE object word)
    identity: str  # server-quoted SQL: wsctl.complete_step(state_id uuid)
    owner: str
    grantees: list[str]


def wsctl_objects(conn: psycopg.Connection) -> list[WsctlObject]:
    """wsctl's schema and its objects, with who besides the owner holds anything on them."""
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(WsctlObject)) as cur:
        return cur.execute(q("security_wsctl_objects")).fetchall()


def worker_roles(conn: psycopg.Connection) -> list[str]:
    if not scalar(conn.execute(q("security_worker_roles_exists"))):
        return []
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        return [r["role_name"] for r in cur.execute(q("security_worker_roles")).fetchall()]


# wsctl's tables only the operator's commands use: no worker role gets them.
OPERATOR_TABLES = (
    "wsctl.schema_migrations",
    "wsctl.created_tables",
    "wsctl.worker_roles",
    "wsctl.batch_dedupe_keys",
    "wsctl.backfill_progress",
    # retention and the limits' definitions are the operator's (`wsctl prune`,
    # `wsctl limit`, `wsctl registry`); a worker only counts Clay submissions
    "wsctl.pruned_batches",
    "wsctl.prune_archives",
    "wsctl.registry_limit_keys",
)


def _bookkeeping(obj: WsctlObject) -> bool:
    """wsctl's operator-side tables stay the owner's (no worker helper touches them)."""
    return obj.identity in OPERATOR_TABLES


def _grant_object(conn: psycopg.Connection, obj: WsctlObject, role: str) -> None:
    from psycopg import sql

    conn.execute(
        sql.SQL(q("security_grant_object")).format(
            sql.SQL(WORKER_OBJECT_PRIVILEGES[obj.kind]),
            sql.SQL(obj.kind),
            sql.SQL(obj.identity),
            sql.Identifier(role),
        )
    )


def _default_grantees(conn: psycopg.Connection) -> set[tuple[str, str, str]]:
    """(owner, kind, grantee) that default privileges give on new wsctl objects; PUBLIC's
    EXECUTE on a routine is PostgreSQL's own default."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q("security_default_grantees")).fetchall()
    return {(r["owner"], r["kind"], r["grantee"]) for r in rows}


def close_new_wsctl_objects(conn: psycopg.Connection, before: set[tuple[str, str]]) -> list[str]:
    """After wsctl created objects (those not in ``before``): what default privileges gave
    anyone but the owner and the recorded worker roles is taken back (a grant the migration
    made itself stays); the worker roles get what they need. Returns the objects changed."""
    from psycopg import sql

    keep = set(worker_roles(conn))
    defaults = _default_grantees(conn)
    changed = []
    for obj in wsctl_objects(conn):
        if (obj.kind, obj.identity) in before:
            continue
        for grantee in obj.grantees:
            from_default = (obj.owner, obj.kind, grantee) in defaults or (
                grantee == PUBLIC and obj.kind == "ROUTINE"
            )
            if grantee in keep or not from_default:
                continue
            conn.execute(
                sql.SQL(q("security_revoke_object")).format(
                    sql.SQL(obj.kind), sql.SQL(obj.identity), _role(grantee)
                )
            )
            changed.append(obj.identity)
        for role in keep if not _bookkeeping(obj) else ():
            _grant_object(conn, obj, role)
    return sorted(set(changed))


def object_keys(conn: psycopg.Connection) -> set[tuple[str, str]]:
    """What exists in wsctl's schema now (the runner's 'before')."""
    return {(o.kind, o.identity) for o in wsctl_objects(conn)}


# --- wsctl secure grant-worker ------------------------------------------------------------


# What the worker helpers (wsctl.worker) and wsctl.complete_steps/fail_step touch, which run
# with the caller's privileges: reads for resolution, the state transitions, the batch's
# completion (FOR NO KEY UPDATE needs UPDATE).
WORKER_TABLE_PRIVILEGES = {
    "clients": "SELECT",
    "enrichment_registry": "SELECT",
    "client_workflow_configs": "SELECT",
    "batches": "SELECT, UPDATE",
    "batch_items": "SELECT",
    "workflow_states": "SELECT, INSERT, UPDATE",
}
# On wsctl's own objects (its counters and tables later features add included).
WORKER_OBJECT_PRIVILEGES = {
    "SCHEMA": "USAGE",
    "TABLE": "SELECT, INSERT, UPDATE, DELETE",
    "SEQUENCE": "USAGE, SELECT",
    "ROUTINE": "EXECUTE",
}


@dataclass
class WorkerGrant(JsonDoc):
    role: str
    statements: list[str] = field(default_factory=list)


def grant_worker(conn: psycopg.Connection, role: str, *, lock_timeout: str = "5s") -> WorkerGrant:
    """Give ``role`` what the worker helpers need, in one transaction, and remember it so that
    objects later migrations create are granted to it too. Idempotent."""
    if not existing_roles(conn, [role]):
        raise OperationalError(f"no role named {role!r} in this database's cluster")
    roles = api_roles(conn)
    if role in (roles.anon, roles.authenticated):
        raise UsageError(
            f"{role} is a Data API role: anyone holding the public key would get the worker's "
            "privileges; grant them to the role your Modal functions log in as"
        )
    result = WorkerGrant(role)
    with _one_transaction(conn, lock_timeout, "nothing granted"):
        _grant_worker(conn, role, result)
    return result


@contextmanager
def _one_transaction(conn: psycopg.Connection, lock_timeout: str, undone: str) -> Iterator[None]:
    """A transaction that waits at most ``lock_timeout`` for a lock; past it, an
    ``OperationalError`` saying what the rollback left ``undone``."""
    import psycopg

    from wsctl.db import tx

    try:
        with tx(conn, lock_timeout=lock_timeout):
            yield
    except psycopg.errors.LockNotAvailable as exc:
        raise OperationalError(
            f"waited over {lock_timeout} for a lock held by another transaction; {undone}",
            hint="retry when it ends, or raise --lock-timeout",
        ) from exc


def _grant_worker(conn: psycopg.Connection, role: str, result: WorkerGrant) -> None:
    from psycopg import sql

    for table, privileges in WORKER_TABLE_PRIVILEGES.items():
        stmt = sql.SQL(q("security_grant_table")).format(
            sql.SQL(privileges), sql.Identifier("public", table), sql.Identifier(role)
        )
        conn.execute(stmt)
        result.statements.append(stmt.as_string(conn))
    for obj in wsctl_objects(conn):
        if _bookkeeping(obj):
            continue
        _grant_object(conn, obj, role)
        result.statements.append(
            f"GRANT {WORKER_OBJECT_PRIVILEGES[obj.kind]} ON {obj.kind} {obj.identity} "
            f"TO {sql.Identifier(role).as_string(conn)}"
        )
    conn.execute(q("security_record_worker"), (role,))


# --- wsctl secure ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    """One REVOKE ALL the lock-down runs: ``role`` (or PUBLIC) loses ``privileges`` on ``object``."""

    role: str
    kind: str
    object: str
    privileges: list[str]
    reason: str

    def statement(self) -> str:
        role = PUBLIC if self.role == PUBLIC else '"' + self.role.replace('"', '""') + '"'
        return f"REVOKE ALL ON {self.kind} {self.object} FROM {role};"

    def to_json(self) -> dict[str, Any]:
        return fields_doc(self) | {"statement": self.statement()}


_VERBS = (("SELECT", "read"), ("INSERT", "insert"), ("UPDATE", "update"), ("DELETE", "delete"))


@dataclass
class SecureReport:
    """What ``wsctl secure`` would change (``applied`` False) or changed."""

    applied: bool
    roles: list[str]
    absent_roles: list[str]
    tables: list[str]
    configs_only: list[str] = field(default_factory=list)  # roles that lose the configs only
    revocations: list[Revocation] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)
    created_by_wsctl: list[str] = field(default_factory=list)

    def losses(self) -> list[str]:
        """Per role, what a dashboard or app using it loses through the Data API."""
        out = []
        for role in dict.fromkeys(r.role for r in self.revocations):
            mine = [r for r in self.revocations if r.role == role]
            held = {p.split("(")[0] for r in mine if r.reason != "wsctl" for p in r.privileges}
            verbs = [v for p, v in _VERBS if p in held] or ["use"]
            tables = [r.object for r in mine if r.reason != "wsctl"]
            wsctl = [r.object for r in mine if r.reason == "wsctl"]
            who = "every role" if role == PUBLIC else f"a dashboard or app using the {role} role"
            parts = []
            if tables:
                said = ", ".join(verbs[:-1]) + " or " + verbs[-1] if len(verbs) > 1 else verbs[0]
                parts.append(f"can no longer {said} {', '.join(tables)}")
            if wsctl:
                parts.append(f"loses wsctl's own {len(wsctl)} object(s) ({', '.join(wsctl[:3])})")
            out.append(f"{who} " + " and ".join(parts))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "changed": bool(self.revocations) and self.applied,
            "roles": self.roles,
            "absent_roles": self.absent_roles,
            "tables": self.tables,
            "configs_only": self.configs_only,
            "revocations": [r.to_json() for r in self.revocations],
            "statements": [r.statement() for r in self.revocations],
            "losses": self.losses(),
            "remaining": self.remaining,
            "created_by_wsctl": self.created_by_wsctl,
        }


def _created_tables(conn: psycopg.Connection) -> list[str]:
    from psycopg.rows import dict_row

    if not scalar(conn.execute(q("security_created_tables_exists"))):
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        return [r["table_name"] for r in cur.execute(q("security_created_list")).fetchall()]


@dataclass(frozen=True)
class Scope:
    """What a lock-down covers besides the defaults (``wsctl secure --role/--table``) and
    what it leaves as it is (``--leave-role/--leave-table``)."""

    extra_roles: Sequence[str] = ()
    leave_roles: Sequence[str] = ()
    extra_tables: Sequence[str] = ()
    leave_tables: Sequence[str] = ()


def _plan(conn: psycopg.Connection, scope: Scope) -> SecureReport:
    from psycopg.rows import dict_row

    roles = api_roles(conn)
    wanted_full = [roles.anon, *scope.extra_roles, PUBLIC]
    wanted_configs = [roles.authenticated]
    named = [r for r in dict.fromkeys(wanted_full + wanted_configs) if r != PUBLIC]
    present = set(existing_roles(conn, named))
    left = set(scope.leave_roles)
    full = [
        r for r in dict.fromkeys(wanted_full) if r not in left and (r == PUBLIC or r in present)
    ]
    configs_only = [r for r in wanted_configs if r in present and r not in left and r not in full]
    wanted_tables = dict.fromkeys([*PIPELINE_TABLES, *scope.extra_tables])
    tables = [t for t in wanted_tables if t not in scope.leave_tables]
    report = SecureReport(
        applied=False,
        roles=[r for r in full + configs_only if r != PUBLIC],
        absent_roles=[r for r in named if r not in present],
        tables=tables,
        configs_only=configs_only,
        created_by_wsctl=_created_tables(conn),
    )
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            q("security_direct_grants"),
            {"tables": tables, "grantees": full + configs_only},
        ).fetchall()
    for row in rows:
        role = row["grantee"]
        if role in configs_only and row["table_name"] != CONFIGS:
            continue
        reason = "configs" if row["table_name"] == CONFIGS else "pipeline"
        report.revocations.append(
            Revocation(role, "TABLE", row["identity"], list(row["privileges"]), reason)
        )
    targets = set(full + configs_only)
    for obj in wsctl_objects(conn):
        for grantee in obj.grantees:
            if grantee in targets:
                report.revocations.append(
                    Revocation(grantee, obj.kind, obj.identity, ["ALL"], "wsctl")
                )
    return report


def _remaining(conn: psycopg.Connection, report: SecureReport) -> list[str]:
    """What the locked-down roles can still do (through PUBLIC or a role they belong to)."""
    from psycopg.rows import dict_row

    out = []
    for role in report.roles:
        tables = report.tables
        if role in report.configs_only:
            tables = [t for t in tables if t == CONFIGS]
        with conn.cursor(row_factory=dict_row) as cur:
            reach = cur.execute(q("security_role_reach"), {"role": role, "tables": tables})
            for row in reach.fetchall():
                held = [
                    p
                    for p in ("select", "insert", "update", "delete", "truncate")
                    if row[f"can_{p}"]
                ]
                if held:
                    out.append(
                        f"{role} can still {'/'.join(p.upper() for p in held)} "
                        f"public.{row['table_name']} (through PUBLIC or a role it belongs to)"
                    )
    return out


def secure(
    conn: psycopg.Connection,
    scope: Scope = Scope(),
    *,
    apply: bool = False,
    lock_timeout: str = "5s",
) -> SecureReport:
    """The minimal lock-down for the API roles that exist: ``anon`` (and the scope's extra
    roles, and PUBLIC) lose their privileges on the pipeline tables, ``authenticated`` on the
    client configs, all of them on wsctl's schema. Read only unless ``apply``; then one
    transaction with a bounded lock wait, idempotent. Never drops or changes a policy."""

    from wsctl.db import tx

    unknown = [t for t in scope.leave_tables if t not in PIPELINE_TABLES]
    unknown += [t for t in scope.extra_tables if t in missing_tables(conn, [t])]
    if unknown:
        raise UsageError(f"no table public.{unknown[0]} to include or leave")
    absent = [r for r in scope.extra_roles if not existing_roles(conn, [r])]
    if absent:
        raise UsageError(f"no role named {absent[0]!r} (--role)")
    if not apply:
        with tx(conn):
            return _plan(conn, scope)
    with _one_transaction(conn, lock_timeout, "nothing changed"):
        report = _plan(conn, scope)
        for r in report.revocations:
            conn.execute(_revoke_sql(r))
        report.applied = True
        report.remaining = _remaining(conn, report)
    return report


def missing_tables(conn: psycopg.Connection, names: list[str]) -> list[str]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        return [r["name"] for r in cur.execute(q("security_missing_tables"), (names,)).fetchall()]


def _revoke_sql(r: Revocation):
    from psycopg import sql

    return sql.SQL(q("security_revoke_object")).format(
        sql.SQL(r.kind), sql.SQL(r.object), _role(r.role)
    )


# --- doctor's api_exposure -------------------------------------------------------------------


@dataclass
class Exposure:
    """The ``api_exposure`` finding: ``level`` OK, WARN or FAIL, as doctor reports it."""

    level: str
    detail: str
    hint: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


_WRITES = (("insert", "a"), ("update", "w"), ("delete", "d"))


def _allowed(row: dict[str, Any], privilege: bool, cmd: str) -> bool:
    """A privilege the role can use through the Data API: the schema is usable and row level
    security is off, bypassed, or has a policy for that command applying to the role (whose
    expression is not judged: a policy that applies is taken to let rows through)."""
    policies = set(row["policy_commands"])
    limited = row["rls"] and not row["bypass_rls"]
    open_ = not limited or cmd in policies or "*" in policies
    return bool(privilege and row["schema_usage"] and open_)


def _reach(conn: psycopg.Connection, role: str) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            q("security_role_reach"), {"role": role, "tables": list(PIPELINE_TABLES)}
        ).fetchall()
    out = []
    for row in rows:
        usable = row["schema_usage"]
        unlimited = not row["rls"] or row["bypass_rls"]
        writes = [name.upper() for name, cmd in _WRITES if _allowed(row, row[f"can_{name}"], cmd)]
        if row["can_truncate"] and usable:
            writes.append("TRUNCATE")  # row level security does not apply to TRUNCATE
        out.append(
            {
                "role": role,
                "table": row["table_name"],
                "read": _allowed(row, row["can_select"], "r"),
                "read_unlimited": bool(row["can_select"] and usable and unlimited),
                "writes": writes,
                "rls": row["rls"],
            }
        )
    return out


def _wsctl_reach(conn: psycopg.Connection, role: str) -> list[str]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        row = one(cur.execute(q("security_role_wsctl_reach"), {"role": role}))
    if not row["schema_usage"]:
        return []
    return list(row["tables"]) + list(row["routines"])


def api_exposure(conn: psycopg.Connection) -> Exposure:
    """FAIL when the anon role can read the client configs, write a pipeline table or reach
    wsctl's schema; WARN when authenticated can read the configs unlimited by row level security
    (or reach wsctl's schema); OK otherwise, or when no API role exists."""
    roles = api_roles(conn)
    if not roles.present:
        return Exposure(
            "OK",
            f"no Data API roles ({roles.anon}, {roles.authenticated}) in this database: nothing "
            "exposed over HTTP",
        )
    fails, warns, rows = [], [], []
    if roles.exists(roles.anon):
        written = []
        for r in _reach(conn, roles.anon):
            if r["read"] and r["table"] == CONFIGS:
                fails.append(f"{roles.anon} can read public.{CONFIGS} (every client's config)")
            if r["writes"]:
                written.append(f"public.{r['table']} ({'/'.join(r['writes'])})")
            if (r["read"] and r["table"] == CONFIGS) or r["writes"]:
                rows.append(r)
        if written:
            fails.append(f"{roles.anon} can write {', '.join(written)}")
        reached = _wsctl_reach(conn, roles.anon)
        if reached:
            fails.append(f"{roles.anon} can use schema wsctl ({', '.join(reached[:3])})")
    if roles.exists(roles.authenticated):
        for r in _reach(conn, roles.authenticated):
            if r["table"] == CONFIGS and r["read_unlimited"]:
                warns.append(
                    f"{roles.authenticated} can read public.{CONFIGS} with no row level "
                    "security policy limiting it"
                )
                rows.append(r)
        reached = _wsctl_reach(conn, roles.authenticated)
        if reached:
            warns.append(f"{roles.authenticated} can use schema wsctl ({', '.join(reached[:3])})")
    hint = (
        "`wsctl secure` shows the minimal lock-down and `wsctl secure --apply` applies it "
        "(revokes the API roles' privileges; policies untouched); open to a dashboard only what "
        "it needs"
    )
    if fails:
        return Exposure("FAIL", "; ".join(fails + warns), hint, rows)
    if warns:
        return Exposure("WARN", "; ".join(warns), hint, rows)
    present = ", ".join(roles.present)
    return Exposure("OK", f"the Data API roles ({present}) reach no secret and write nothing")
