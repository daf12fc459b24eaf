"""`wsctl secure` (what the Supabase Data API may reach) and `wsctl secure grant-worker`."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import Json, LockTimeout, state

secure_app = typer.Typer(
    help="Close the pipeline tables and wsctl's schema to the Data API roles (anon, "
    "authenticated): prints the lock-down, --apply applies it.",
    invoke_without_command=True,
)


@secure_app.callback()
def secure(
    ctx: typer.Context,
    apply: Annotated[bool, typer.Option("--apply")] = False,
    extra_roles: Annotated[list[str] | None, typer.Option("--role")] = None,
    leave_roles: Annotated[list[str] | None, typer.Option("--leave-role")] = None,
    extra_tables: Annotated[list[str] | None, typer.Option("--table")] = None,
    leave_tables: Annotated[list[str] | None, typer.Option("--leave-table")] = None,
    lock_timeout: LockTimeout = "5s",
    as_json: Json = False,
) -> None:
    """Revoke anon's privileges on the pipeline tables and wsctl's schema, and authenticated's on
    client_workflow_configs and wsctl's schema; policies are never dropped or changed.

    Args:
        apply: Apply it (one transaction, idempotent).
        extra_roles: Also lock this role out of every pipeline table (repeatable).
        leave_roles: Leave this role's privileges as they are (repeatable).
        extra_tables: Also lock down this table of public (repeatable).
        leave_tables: Leave this pipeline table as it is (repeatable).
    """
    if ctx.invoked_subcommand is not None:
        return
    from wsctl import security
    from wsctl.cli import output

    scope = security.Scope(
        extra_roles=extra_roles or (),
        leave_roles=leave_roles or (),
        extra_tables=extra_tables or (),
        leave_tables=leave_tables or (),
    )
    report = state(ctx).call(security.secure, scope, apply=apply, lock_timeout=lock_timeout)
    output.show(report, as_json, _render_secure)


def _render_secure(report) -> None:
    from wsctl.cli import output

    for role in report.absent_roles:
        output.notice(f"no role {role} in this database: nothing to do for it")
    if not report.revocations:
        output.line("nothing to change: the Data API roles hold nothing wsctl would revoke")
        output.warn(*report.remaining)
        return
    if not report.applied:
        output.line("-- the lock-down (nothing changed; run `wsctl secure --apply` to apply it):")
    for r in report.revocations:
        output.line(r.statement())
    verb = "lost" if report.applied else "would lose"
    for text in report.losses():
        output.line(f"{verb}: {text}")
    if report.applied:
        output.line(f"revoked {len(report.revocations)} grant(s); no policy was changed")
    output.warn(*report.remaining)


@secure_app.command("grant-worker")
def grant_worker(
    ctx: typer.Context,
    role: str,
    lock_timeout: LockTimeout = "5s",
    as_json: Json = False,
) -> None:
    """Grant ROLE what the worker helpers need (wsctl.worker, wsctl.complete_step, ...).

    Args:
        role: The role your Modal functions log in as.
    """
    from wsctl import security
    from wsctl.cli import output

    result = state(ctx).call(security.grant_worker, role, lock_timeout=lock_timeout)
    output.show(result, as_json, _render_granted)


def _render_granted(result) -> None:
    from wsctl.cli import output

    for stmt in result.statements:
        output.line(stmt + ";")
    output.line(f"granted {result.role} what the worker helpers need")


def register(app: typer.Typer) -> None:
    app.add_typer(secure_app, name="secure")
