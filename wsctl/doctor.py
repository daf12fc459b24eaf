"""`wsctl doctor`: a diagnosis of the database, the schema, the data and Modal in one pass.

Every check reports OK, WARN, FAIL or SKIP with a one-line detail and hint;
all checks run even when some fail. A database that cannot be reached is a
FAIL of the first check (never an exception out of ``doctor``), and the
checks that need it are SKIP; checks that need wsctl's schema are SKIP while
migrations are pending. Every data check is one set-based count query with
a bounded sample (``top`` rows). Nothing here prints or exits.
"""

from __future__ import annotations

import asyncio
import functools
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.errors import WsctlError
from wsctl.jsondoc import JsonDoc
from wsctl.queries import named, one, q, scalar
from wsctl.redact import first_line, mask_url

if TYPE_CHECKING:
    import psycopg

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
STATUSES = (OK, WARN, FAIL, SKIP)

# Check names, in the order they run and are reported.
DATABASE = "database"
SCHEMA = "schema"
LEGACY_BATCHES = "legacy_batches"
UNREGISTERED_STATES = "unregistered_states"
MISSING_CONFIGS = "missing_configs"
PLAINTEXT_CREDENTIALS = "plaintext_credentials"
EXPIRED_LEASES = "expired_leases"
STALE_DISPATCHED = "stale_dispatched"
LIMIT_KEYS = "limit_keys"
CLAY_WEBHOOKS = "clay_webhooks"
STATES_BLOAT = "states_bloat"
VACUUM_HORIZON = "vacuum_horizon"
PRUNE_CANDIDATES = "prune_candidates"
API_EXPOSURE = "api_exposure"
MODAL_CREDENTIALS = "modal_credentials"
MODAL_FUNCTIONS = "modal_functions"


@dataclass
class Check(JsonDoc):
    """One check's outcome; ``rows`` is a bounded sample of what it found."""

    name: str
    status: str
    detail: str
    hint: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when any check FAILed (WARN and SKIP do not fail the diagnosis)."""
        return not any(c.status == FAIL for c in self.checks)

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for c in self.checks if c.status == s) for s in STATUSES}

    def get(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> dict[str, Any]:
        """The documented ``wsctl doctor --json`` document."""
        return {
            "ok": self.ok,
            "counts": self.counts(),
            "checks": [c.to_json() for c in self.checks],
        }


def _ws(value: str | None) -> str:
    return value if value is not None else "NULL"


def _age(since: datetime | None) -> str:
    if since is None:
        return "?"
    seconds = int((datetime.now(UTC) - since).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _more(shown: int, total: int) -> str:
    return f" (+{total - shown} more)" if total > shown else ""


# --- the checks that read the database ---------------------------------------


def _check_database(conn: psycopg.Connection) -> Check:
    version = scalar(conn.execute(q("server_version")))
    info = conn.info
    where = f"{info.user}@{info.host}:{info.port}/{info.dbname}"
    return Check(DATABASE, OK, f"connected to {where} (PostgreSQL {version})")


def _check_schema(conn: psycopg.Connection) -> tuple[Check, bool]:
    """The schema check, and whether the schema-dependent checks may run."""
    from wsctl import migrations

    st = migrations.status(conn)
    if st.changed:
        return (
            Check(
                SCHEMA,
                FAIL,
                st.changed_text(),
                "migrations are forward-only: restore the released files and add a new one",
                rows=st.changed,
            ),
            not st.pending,
        )
    if st.pending:
        return (
            Check(
                SCHEMA,
                FAIL,
                f"{st.pending_text()}; {len(st.applied)} applied",
                "run `wsctl migrate` (a direct or session-mode connection)",
                rows=st.pending,
            ),
            False,
        )
    last = st.applied[-1] if st.applied else None
    latest = f", latest {last['version']:04d}_{last['name']}" if last else ""
    return Check(SCHEMA, OK, f"{len(st.applied)} migration(s) applied{latest}"), True


def _check_legacy_batches(conn: psycopg.Connection, top: int) -> Check:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        row = one(cur.execute(q("doctor_legacy_batches"), {"top": top}))
    total, active, sample = row["total"], row["active"], row["sample"]
    if not total:
        return Check(LEGACY_BATCHES, OK, "every batch has a workstream_slug")
    return Check(
        LEGACY_BATCHES,
        WARN,
        f"{total} batch(es) have no workstream_slug ({active} active); their states are "
        "blocked until one is set",
        "wsctl backfill workstream-slug",
        rows=[{"batch_id": b} for b in sample],
    )


def _check_unregistered(conn: psycopg.Connection, top: int) -> Check:
    rows = named(conn).execute(q("doctor_unregistered_states"), {"top": top}).fetchall()
    if not rows:
        return Check(UNREGISTERED_STATES, OK, "every PENDING/BLOCKED state has a registry row")
    pairs = rows[0]["pairs"]
    out = [
        {"step": r["step_name"], "workstream": r["workstream_slug"], "states": r["states"]}
        for r in rows
    ]
    listed = ", ".join(f"({r['step']}, {_ws(r['workstream'])}): {r['states']}" for r in out)
    known = [(r["step"], r["workstream"]) for r in out if r["workstream"] is not None]
    hints = []
    if known:
        s, w = known[0]
        hints.append(
            f"wsctl registry add --step {s} --workstream {w} --type sync|async --sender FN"
        )
    if len(known) < len(rows):
        hints.append("workstream NULL (legacy batches): wsctl backfill workstream-slug")
    hint = "; ".join(hints)
    return Check(
        UNREGISTERED_STATES,
        FAIL,
        f"PENDING/BLOCKED states in {pairs} (step, workstream) pair(s) without a registry "
        f"row: {listed}{_more(len(rows), pairs)}",
        hint,
        rows=out,
    )


def _check_missing_configs(conn: psycopg.Connection, top: int) -> Check:
    rows = named(conn).execute(q("doctor_missing_configs"), {"top": top}).fetchall()
    if not rows:
        return Check(
            MISSING_CONFIGS,
            OK,
            "every active batch's client has a config for each (step, workstream) of its blueprint",
        )
    missing = rows[0]["missing"]
    out = [
        {
            "client": r["name"],
            "step": r["step"],
            "workstream": r["workstream_slug"],
            "batches": r["batches"],
        }
        for r in rows
    ]
    listed = ", ".join(f"({r['client']}, {r['step']}, {r['workstream']})" for r in out)
    first = out[0]
    return Check(
        MISSING_CONFIGS,
        WARN,
        f"{missing} (client, step, workstream) without a client config in active batches: "
        f"{listed}{_more(len(rows), missing)}",
        f"wsctl config set --client {shlex.quote(first['client'])} --step {first['step']} "
        f"--workstream {first['workstream']} --set key=value (for each step that needs a config)",
        rows=out,
    )


def _check_plaintext_credentials(conn: psycopg.Connection, top: int) -> Check:
    """Credentials held in clear in client configs (what `config show` masks), by key path."""
    from psycopg.rows import dict_row

    from wsctl.secret_refs import plaintext_credentials

    filters = {"client_id": None, "workstream": None, "workflow": None}
    with conn.cursor(row_factory=dict_row) as cur:
        configs = cur.execute(q("catalog_config_list"), filters).fetchall()
    found = []
    for c in configs:
        paths = plaintext_credentials(c["config"])
        if paths:
            found.append(
                {
                    "client": c["name"],
                    "step": c["workflow_slug"],
                    "workstream": c["workstream_slug"],
                    "keys": paths,
                }
            )
    if not found:
        return Check(
            PLAINTEXT_CREDENTIALS,
            OK,
            f"no credential in clear in the {len(configs)} client config(s)",
        )
    total = sum(len(f["keys"]) for f in found)
    listed = ", ".join(
        f"({f['client']}, {f['step']}, {f['workstream']}) {' '.join(f['keys'])}"
        for f in found[:top]
    )
    return Check(
        PLAINTEXT_CREDENTIALS,
        WARN,
        f"{total} plaintext credential(s) in {len(found)} of {len(configs)} client config(s): "
        f"{listed}{_more(min(len(found), top), len(found))}",
        'store each as a reference, {"$secret": "NAME"} (`wsctl config set ... --set '
        'KEY=\'{"$secret": "NAME"}\'`), with NAME in the Modal secret of the function',
        rows=found[:top],
    )


def _check_expired_leases(conn: psycopg.Connection) -> Check:
    leases = one(named(conn).execute(q("doctor_expired_leases")))
    n, oldest = leases["states"], leases["oldest"]
    if not n:
        return Check(EXPIRED_LEASES, OK, "no DISPATCHING state holds an expired lease")
    return Check(
        EXPIRED_LEASES,
        WARN,
        f"{n} DISPATCHING state(s) with an expired lease (oldest expired {_age(oldest)} ago): "
        "a dispatcher died mid-pass",
        "the next `wsctl dispatch` pass reclaims them",
        rows=[{"states": n, "oldest_expiry": oldest.isoformat() if oldest else None}],
    )


def _check_stale_dispatched(conn: psycopg.Connection, top: int, timeout: int) -> Check:
    params = {"top": top, "timeout": timeout}
    rows = named(conn).execute(q("doctor_stale_dispatched"), params).fetchall()
    if not rows:
        return Check(
            STALE_DISPATCHED,
            OK,
            f"no DISPATCHED state is older than the {timeout}s callback timeout",
        )
    total, undated, pairs = rows[0]["total"], rows[0]["undated"], rows[0]["pairs"]
    out = [
        {
            "step": r["step_name"],
            "workstream": r["workstream_slug"],
            "states": r["states"],
            "oldest": r["oldest"].isoformat(),
        }
        for r in rows
    ]
    listed = ", ".join(
        f"({r['step_name']}, {_ws(r['workstream_slug'])}): {r['states']}, oldest {_age(r['oldest'])}"
        for r in rows
    )
    detail = (
        f"{total} DISPATCHED state(s) older than the {timeout}s callback timeout: "
        f"{listed}{_more(len(rows), pairs)}"
    )
    hint = (
        "the next `wsctl dispatch` pass marks them FAILED; check the receivers, then `wsctl retry`"
    )
    if undated:
        detail += (
            f"; {undated} have no dispatched_at (dispatched before wsctl) and are never timed "
            "out by the dispatcher"
        )
        hint = (
            "states without dispatched_at need an operator: SELECT wsctl.fail_step(id, 'reason') "
            "on them, then `wsctl retry --batch ID`"
        )
    return Check(STALE_DISPATCHED, WARN, detail, hint, rows=out)


def _check_limit_keys(conn: psycopg.Connection, top: int) -> Check:
    """Bound limit keys that no limit defines: they limit nothing."""
    from wsctl.limits import bound_keys

    keys = bound_keys(conn)
    undefined = [b for b in keys if not b.defined]
    if not undefined:
        n = len({b.key for b in keys})
        return Check(LIMIT_KEYS, OK, f"{n} bound limit key(s), every one defined by a limit")
    names = sorted({b.key for b in undefined})
    return Check(
        LIMIT_KEYS,
        WARN,
        f"{len(names)} limit key(s) bound by the registry but defined by no limit, so they "
        f"limit nothing: {', '.join(names[:top])}" + (" ..." if len(names) > top else ""),
        "wsctl limit set KEY --rate N/s [--burst N] [--max-in-flight N]",
        rows=[b.to_json() for b in undefined[:top]],
    )


def _check_clay_webhooks(conn: psycopg.Connection, top: int) -> Check:
    """Clay webhook sources near their lifetime submission cap (WARN at 80 %)."""
    from wsctl import clay

    usage = clay.usage(conn)
    near = sorted((u for u in usage if u.share >= clay.WARN_AT), key=lambda u: -u.share)
    if not near:
        return Check(
            CLAY_WEBHOOKS, OK, f"{len(usage)} Clay webhook source(s), none at 80 % of its cap"
        )
    full = sum(1 for u in near if u.submitted >= u.cap)
    return Check(
        CLAY_WEBHOOKS,
        WARN,
        f"{len(near)} Clay webhook source(s) at 80 % or more of their submission cap"
        + (f", {full} full (their states are BLOCKED)" if full else "")
        + ": "
        + ", ".join(f"{u.client}/{u.step}/{u.workstream}#{u.index}" for u in near[:top]),
        "add a webhook source to the config's clay_table_webhook_urls "
        "(`wsctl config set ... --set clay_table_webhook_urls=[...]`)",
        rows=[u.to_json() for u in near[:top]],
    )


# --- long life: bloat, the vacuum horizon, history to prune ---------------------

BLOAT_MIN_DEAD = 100_000  # below this many dead tuples, bloat is noise
BLOAT_DEAD_RATIO = 0.2  # autovacuum's default scale factor: past it, vacuum is falling behind


def _mb(n: int) -> str:
    return f"{n / 1048576:.0f} MB"


def _check_states_bloat(conn: psycopg.Connection) -> Check:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        row = one(cur.execute(q("prune_doctor_bloat")))
    live, dead, last = row["live"], row["dead"], row["last_vacuum"]
    total, heap, options = row["total_bytes"], row["heap_bytes"], row["reloptions"]
    ratio = dead / live if live else (1.0 if dead else 0.0)
    when = f"last vacuumed {_age(last)} ago" if last else "never vacuumed"
    detail = (
        f"workflow_states: {live} live, {dead} dead tuple(s) ({ratio:.0%}), heap {_mb(heap)}, "
        f"with indexes {_mb(total)}; {when}"
    )
    sample = [
        {
            "live": live,
            "dead": dead,
            "total_bytes": total,
            "heap_bytes": heap,
            "last_vacuum": last.isoformat() if last else None,
            "reloptions": options,
        }
    ]
    if dead >= BLOAT_MIN_DEAD and ratio >= BLOAT_DEAD_RATIO:
        return Check(
            STATES_BLOAT,
            WARN,
            detail + ": vacuum is not keeping up, every claim and update reads past dead rows",
            "VACUUM (ANALYZE) public.workflow_states; let autovacuum start sooner on it "
            "(`wsctl db tune --apply`); check vacuum_horizon; prune old batches (`wsctl prune`)",
            rows=sample,
        )
    return Check(STATES_BLOAT, OK, detail)


def _check_vacuum_horizon(conn: psycopg.Connection, threshold: int) -> Check:
    row = named(conn).execute(q("prune_doctor_oldest_xmin")).fetchone()
    held = named(conn).execute(q("prune_doctor_held_xmin")).fetchall()
    seconds = row["seconds"] if row is not None else None
    found = []
    if row is not None and seconds is not None and seconds >= threshold:
        found.append(
            {
                "pid": row["pid"],
                "user": row["usename"],
                "application_name": row["application_name"],
                "state": row["state"],
                "seconds": seconds,
                "xmin_age": row["xmin_age"],
                "query": row["query"],
            }
        )
    old_held = [
        {"what": h["what"], "seconds": h["seconds"]}
        for h in held
        if h["seconds"] is None or h["seconds"] >= threshold
    ]
    if not found and not old_held:
        oldest = f"{_age_s(seconds)}" if seconds is not None else "none"
        return Check(
            VACUUM_HORIZON,
            OK,
            f"no snapshot older than {_age_s(threshold)} holds back vacuum (oldest: {oldest})",
        )
    parts = []
    hint = None
    if found:
        r = found[0]
        parts.append(
            f"backend pid {r['pid']} ({r['user']}, {r['application_name'] or '-'}, {r['state']}) "
            f"has held its snapshot for {_age_s(r['seconds'])} ({r['xmin_age']} transactions)"
        )
        hint = (
            f"end it if it is stuck: SELECT pg_terminate_backend({r['pid']}); set "
            "idle_in_transaction_session_timeout so it cannot recur"
        )
    if old_held:
        parts.append(", ".join(h["what"] for h in old_held) + " hold(s) back vacuum")
        hint = (hint + "; " if hint else "") + (
            "COMMIT PREPARED / ROLLBACK PREPARED the transaction, or drop an unused slot "
            "(pg_drop_replication_slot)"
        )
    return Check(
        VACUUM_HORIZON,
        WARN,
        "; ".join(parts) + ": no dead row newer than it can be removed, workflow_states bloats",
        hint,
        rows=found + old_held,
    )


def _age_s(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


PRUNE_SCAN_BATCHES = 5  # finished batches whose states doctor reads (oldest first)


def _check_prune_candidates(conn: psycopg.Connection, older_than: str, top: int) -> Check:
    from wsctl.prune import parse_duration

    rows = (
        named(conn)
        .execute(
            q("prune_candidates"),
            {
                "batch_ids": None,
                "older_than": parse_duration(older_than),
                "include_items": False,
                "max_batches": PRUNE_SCAN_BATCHES,
            },
        )
        .fetchall()
    )
    if not rows:
        return Check(
            PRUNE_CANDIDATES, OK, f"no batch finished more than {older_than} ago keeps its states"
        )
    states = sum(r["states"] for r in rows)
    interrupted = sum(1 for r in rows if r["resumed"])
    # Reading every finished batch's states costs a scan of the history: doctor reads
    # the oldest few only and says "at least" when there may be more.
    least = "at least " if rows[0]["examined"] >= PRUNE_SCAN_BATCHES else ""
    detail = (
        f"{least}{len(rows)} batch(es) finished more than {older_than} ago keep "
        f"{least}{states} state(s) (oldest finished {_age(rows[0]['finished_at'])} ago)"
    )
    if interrupted:
        detail += f"; {interrupted} of them were partly pruned by an interrupted prune"
    return Check(
        PRUNE_CANDIDATES,
        WARN,
        detail,
        f"wsctl prune --older-than {older_than} --dry-run, then without --dry-run "
        "(add --archive FILE.jsonl to keep the rows); or cron it",
        rows=[
            {
                "batch_id": str(r["batch_id"]),
                "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
                "states": r["states"],
            }
            for r in rows[:top]
        ],
    )


def _check_api_exposure(conn: psycopg.Connection) -> Check:
    """What the Supabase Data API's roles reach (see wsctl.security)."""
    from wsctl.security import api_exposure

    found = api_exposure(conn)
    return Check(API_EXPOSURE, found.level, found.detail, found.hint, rows=found.rows)


# --- Modal --------------------------------------------------------------------


def _check_modal_credentials(backend: str, source: str, wanted: bool) -> tuple[Check, bool]:
    """``wanted``: --check-modal asks for Modal lookups whatever the backend."""
    try:
        from wsctl.dispatch.modal_backend import credentials_present

        present = credentials_present()
    except Exception as exc:  # a broken modal installation or ~/.modal.toml
        status = FAIL if backend == "modal" else WARN
        return Check(
            MODAL_CREDENTIALS, status, f"cannot read Modal's configuration: {first_line(exc)}"
        ), False
    if present:
        return Check(MODAL_CREDENTIALS, OK, "Modal token found (env or ~/.modal.toml)"), True
    if backend != "modal" and not wanted:  # the local backend needs no token
        return (
            _skip(
                MODAL_CREDENTIALS,
                f"no Modal token, and none needed: the dispatch backend is {backend} ({source})",
            ),
            False,
        )
    status = FAIL if backend == "modal" else WARN
    why = (
        f"the dispatch backend is modal ({source})"
        if backend == "modal"
        else f"--check-modal looks the functions up at Modal (dispatch backend: {backend})"
    )
    return (
        Check(
            MODAL_CREDENTIALS,
            status,
            f"no Modal token in MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or ~/.modal.toml ({why})",
            "modal token set --token-id ... --token-secret ... (or set the two env vars)",
        ),
        False,
    )


async def _lookup_all(
    app: str, environment: str | None, names: list[str], timeout: float, concurrency: int
) -> dict[str, BaseException | None]:
    import modal

    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(name: str) -> tuple[str, BaseException | None]:
        async with sem:
            fn = modal.Function.from_name(app, name, environment_name=environment)
            try:
                await asyncio.wait_for(fn.hydrate.aio(), timeout)
            except Exception as exc:
                return name, exc
            return name, None

    return dict(await asyncio.gather(*(one(n) for n in names)))


def _check_modal_functions(
    used_by: dict[str, list[str]],
    *,
    app: str,
    environment: str | None,
    top: int,
    timeout: float,
) -> Check:
    """Look every registry function up in the deployed app (no transaction is held meanwhile)."""
    import modal.exception as mexc

    where = f"Modal app {app}" + (f" (environment {environment})" if environment else "")
    if not used_by:
        return Check(MODAL_FUNCTIONS, OK, f"the registry names no function to look up in {where}")
    results = asyncio.run(_lookup_all(app, environment, list(used_by), timeout, 16))
    missing = [n for n, e in results.items() if isinstance(e, mexc.NotFoundError)]
    rejected = [
        n for n, e in results.items() if isinstance(e, mexc.AuthError | mexc.PermissionDeniedError)
    ]
    errors = {
        n: e for n, e in results.items() if e is not None and n not in missing and n not in rejected
    }
    if rejected:
        return Check(
            MODAL_FUNCTIONS,
            FAIL,
            f"Modal rejected the credentials looking up {len(rejected)} function(s) in {where}",
            "check the token: `modal token set`, or MODAL_TOKEN_ID/MODAL_TOKEN_SECRET",
        )
    if not missing and not errors:
        return Check(
            MODAL_FUNCTIONS, OK, f"all {len(used_by)} registry function(s) found in {where}"
        )
    sample = [{"function": n, "used_by": used_by[n], "error": None} for n in missing[:top]]
    sample += [
        {"function": n, "used_by": used_by[n], "error": first_line(e)}
        for n, e in list(errors.items())[: max(0, top - len(sample))]
    ]
    parts = []
    if missing:
        listed = ", ".join(f"{n} (used by {', '.join(used_by[n])})" for n in missing[:top])
        parts.append(
            f"{len(missing)} of {len(used_by)} registry function(s) not found in {where}: "
            f"{listed}{_more(min(len(missing), top), len(missing))}"
        )
    if errors:
        n, e = next(iter(errors.items()))
        parts.append(f"{len(errors)} lookup(s) failed, e.g. {n}: {first_line(e)}")
    return Check(
        MODAL_FUNCTIONS,
        FAIL,
        "; ".join(parts),
        f"deploy the functions in app {app} (`modal deploy`), or fix the registry "
        "(`wsctl registry add`)",
        rows=sample,
    )


def _modal_functions_check(
    conn: psycopg.Connection | None,
    have_credentials: bool,
    *,
    app: str | None,
    environment: str | None,
    top: int,
    timeout: float,
) -> Check:
    """The registry's functions looked up at Modal, or why they cannot be."""
    if conn is None:
        return _skip(MODAL_FUNCTIONS, "no database connection")
    if not have_credentials:
        return Check(
            MODAL_FUNCTIONS,
            FAIL,
            "cannot look up the registry functions: no Modal credentials",
            "modal token set --token-id ... --token-secret ...",
        )
    if not app:
        return Check(MODAL_FUNCTIONS, FAIL, "no Modal app name", "pass --app NAME")
    return _guarded(
        None,
        MODAL_FUNCTIONS,
        lambda: _check_modal_functions(
            _registry_functions(conn), app=app, environment=environment, top=top, timeout=timeout
        ),
    )


def _registry_functions(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Each function the registry names, with the (step (workstream)) rows that use it."""
    with tx(conn):
        rows = named(conn).execute(q("doctor_registry_functions")).fetchall()
    return {r["fn"]: list(r["uses"]) for r in rows}


# --- the pass -------------------------------------------------------------------


def _guarded(conn: psycopg.Connection | None, name: str, fn: Callable[[], Check]) -> Check:
    """Run one check (in its own read transaction with a connection); a failure FAILs it only."""
    import psycopg

    try:
        if conn is None:
            return fn()
        with tx(conn):
            return fn()
    except psycopg.errors.LockNotAvailable as exc:
        return Check(
            name,
            FAIL,
            f"query failed: {first_line(exc)}",
            "another session holds the lock: try again when it ends, or raise "
            "[database] lock_timeout",
        )
    except psycopg.errors.QueryCanceled as exc:
        return Check(
            name,
            FAIL,
            f"query failed: {first_line(exc)}",
            "raise [database] statement_timeout in wsctl.toml, or look for a lock held elsewhere",
        )
    except psycopg.Error as exc:
        return Check(
            name,
            FAIL,
            f"query failed: {first_line(exc)}",
            "check the role's privileges and `wsctl migrate --status`",
        )
    except WsctlError as exc:
        return Check(name, FAIL, exc.one_line())
    except Exception as exc:  # one broken check (e.g. a modal client error) must not stop the rest
        return Check(name, FAIL, f"check raised {type(exc).__name__}: {first_line(exc)}")


def _skip(name: str, why: str) -> Check:
    return Check(name, SKIP, f"skipped: {why}")


def doctor(
    connect: Callable[[], psycopg.Connection],
    *,
    backend: str = "modal",
    backend_source: str = "the default",
    callback_timeout: int = 3600,
    check_modal: bool = False,
    modal_app: str | None = "enrichment-worker",
    modal_environment: str | None = None,
    lookup_timeout: float = 30.0,
    top: int = 10,
    url: str | None = None,
    xmin_threshold: int = 3600,
    prune_after: str = "30d",
) -> DoctorReport:
    """Run every check once and return them in order (never raises for a failed check).

    ``connect`` opens the connection (the CLI's, without the schema
    requirement); a failure to connect is the ``database`` check's FAIL.
    ``url``, when known, is only used to mask it out of error messages.
    ``xmin_threshold`` (seconds) is how long a snapshot may hold back vacuum;
    ``prune_after`` the age past which a finished batch is a prune candidate.
    """
    report = DoctorReport()
    add = report.checks.append
    conn = None
    try:
        conn = connect()
    except Exception as exc:  # unreachable, refused, bad URL, embedded server failed
        text = (
            exc.one_line() if isinstance(exc, WsctlError) else f"cannot connect: {first_line(exc)}"
        )
        if url:
            text = text.replace(url, mask_url(url))
        add(
            Check(
                DATABASE,
                FAIL,
                text,
                "check the URL (--database-url, WSCTL_DATABASE_URL, wsctl.toml) and that the "
                "server accepts connections",
            )
        )
    try:
        schema_ok = False
        if conn is not None:
            add(_guarded(conn, DATABASE, lambda: _check_database(conn)))
            schema: list[bool] = []

            def schema_check() -> Check:
                check, ready = _check_schema(conn)
                schema.append(ready)
                return check

            add(_guarded(conn, SCHEMA, schema_check))
            # A schema check that could not run (a lock, a timeout) is its own FAIL: the
            # data checks still run, each in its own bounded transaction.
            schema_ok = schema[0] if schema else True
        else:
            add(_skip(SCHEMA, "no database connection"))

        data_checks: list[tuple[str, Callable[[psycopg.Connection], Check]]] = [
            (LEGACY_BATCHES, lambda c: _check_legacy_batches(c, top)),
            (UNREGISTERED_STATES, lambda c: _check_unregistered(c, top)),
            (MISSING_CONFIGS, lambda c: _check_missing_configs(c, top)),
            (PLAINTEXT_CREDENTIALS, lambda c: _check_plaintext_credentials(c, top)),
            (EXPIRED_LEASES, lambda c: _check_expired_leases(c)),
            (STALE_DISPATCHED, lambda c: _check_stale_dispatched(c, top, callback_timeout)),
            (LIMIT_KEYS, lambda c: _check_limit_keys(c, top)),
            (CLAY_WEBHOOKS, lambda c: _check_clay_webhooks(c, top)),
            (STATES_BLOAT, lambda c: _check_states_bloat(c)),
            (VACUUM_HORIZON, lambda c: _check_vacuum_horizon(c, xmin_threshold)),
            (PRUNE_CANDIDATES, lambda c: _check_prune_candidates(c, prune_after, top)),
            (API_EXPOSURE, lambda c: _check_api_exposure(c)),
        ]
        for name, fn in data_checks:
            if conn is None:
                add(_skip(name, "no database connection"))
            elif not schema_ok:
                add(_skip(name, "the schema is not migrated (`wsctl migrate`)"))
            else:
                add(_guarded(conn, name, functools.partial(fn, conn)))

        credentials, have_credentials = _check_modal_credentials(
            backend, backend_source, check_modal
        )
        add(credentials)
        if check_modal:
            add(
                _modal_functions_check(
                    conn,
                    have_credentials,
                    app=modal_app,
                    environment=modal_environment,
                    top=top,
                    timeout=lookup_timeout,
                )
            )
    finally:
        if conn is not None:
            conn.close()
    return report
