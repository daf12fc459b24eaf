"""`wsctl item show` (where an item went and why) and `wsctl doctor` (a diagnosis)."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import CallbackTimeout, Json, Reveal, choices, setting_option, state
from wsctl.settings import Backend

item_app = typer.Typer(help="Batch items: where each one went and why.", no_args_is_help=True)


def _times(step) -> str:
    parts = []
    for key in ("created_at", "available_at", "dispatched_at", "completed_at", "updated_at"):
        value = step.times.get(key)
        if value is not None:
            parts.append(f"{key.removesuffix('_at')} {value.isoformat(timespec='seconds')}")
    lease = step.times.get("lease_expires_at")
    if lease is not None and step.status == "DISPATCHING":
        parts.append(f"lease expires {lease.isoformat(timespec='seconds')}")
    return ", ".join(parts) or "-"


def _config_cell(step) -> str:
    res = step.resolution
    if res is None:
        return "error" if step.resolution_error else "-"
    where = f" {res.workstream}" if res.workstream else ""
    return f"{res.status}{f' ({res.source}{where})' if res.source else ''}"


def _render_item(report, *, reveal: bool) -> None:
    import json

    from wsctl.cli import output
    from wsctl.redact import redact, redact_text

    output.line(f"item        {report.item_id}")
    output.line(f"batch       {report.batch_id} ({report.batch_status})")
    output.line(f"client      {report.client} ({report.client_id})")
    output.line(f"workstream  {report.batch_workstream or 'NULL (legacy batch)'}")
    output.line(f"blueprint   {' -> '.join(report.blueprint) or '-'}")
    output.line()
    output.table(
        ["#", "step", "status", "attempts", "workstream", "function", "modal_call_id", "config"],
        [
            (
                s.position if s.position is not None else "+",
                s.step,
                s.shown_status,
                s.attempts,
                s.workstream,
                s.function or "no registry row",
                s.modal_call_id,
                _config_cell(s),
            )
            for s in report.steps
        ],
    )
    for s in report.steps:
        output.line()
        pos = f"{s.position}." if s.position is not None else "+ (not in the blueprint)"
        output.line(f"{pos} {s.step}: {s.shown_status}")
        if s.registry:
            r = s.registry
            fns = r["sender"] + (f" -> receiver {r['receiver']}" if r["receiver"] else "")
            output.line(f"   function    {fns} ({r['type']}, workstream {s.workstream})")
        else:
            output.line(f"   function    {s.registry_note}")
        output.line(f"   call id     {s.modal_call_id or '-'}")
        if s.resolution is None:
            output.line(f"   config      {s.resolution_error or '-'}")
        else:
            res = s.resolution
            output.line(f"   config      {_config_cell(s)}")
            for i, t in enumerate(res.trace, start=1):
                output.line(f"     trace {i}. [{t.rule}] {t.why}")
            if res.config is not None:
                shown = json.dumps(redact(res.config, reveal=reveal), sort_keys=True, default=str)
                output.line(f"     value     {shown}")
            for w in res.warnings:
                output.line(f"     warning   {w}")
        u = s.used
        if u is None:
            output.line("   used        - (the worker helpers recorded no resolution)")
        elif u.config_id is None:
            output.line(f"   used        no config ({u.status}, {u.source or '-'})")
        else:
            when = u.config_updated_at.isoformat(timespec="seconds") if u.config_updated_at else "-"
            changed = ""
            if u.config_changed_since:
                changed = (
                    " (CHANGED since: the row was deleted)"
                    if not u.config_exists
                    else " (CHANGED since: updated "
                    f"{u.config_updated_at_now.isoformat(timespec='seconds')})"
                )
            output.line(f"   used        config {u.config_id} as of {when}{changed}")
            if u.registry_function:
                output.line(
                    f"               function {u.registry_function} (registry {u.registry_id})"
                )
        error = s.last_error
        if error and not reveal:
            error = redact_text(error)
        output.line(f"   last error  {' '.join(error.split()) if error else '-'}")
        for waiting in s.waiting_for:
            output.line(f"   {waiting}")
        output.line(f"   times       {_times(s)}")
    output.warn(*report.warnings)


@item_app.command("show")
def item_show(
    ctx: typer.Context,
    item_id: str,
    reveal: Reveal = False,
    as_json: Json = False,
) -> None:
    """Where an item went and why: per blueprint step, its state, function, call and config.

    Args:
        item_id: The batch item's id (a UUID).
    """
    from wsctl.cli import output
    from wsctl.item_report import item_report

    st = state(ctx)
    cap = st.settings().dispatch.modal_function_cap
    report = st.call(item_report, item_id, function_cap=cap)
    if as_json:
        output.emit_json(report.to_json(reveal=reveal))
        return
    _render_item(report, reveal=reveal)


def doctor(
    ctx: typer.Context,
    check_modal: Annotated[bool, typer.Option("--check-modal")] = False,
    app: Annotated[str | None, setting_option("--app")] = None,
    modal_environment: Annotated[str | None, setting_option("--modal-environment")] = None,
    backend: Annotated[
        Backend | None,
        setting_option(
            "--backend", about="The backend to judge credentials for", metavar=choices(Backend)
        ),
    ] = None,
    callback_timeout: CallbackTimeout = None,
    top: Annotated[int, typer.Option("--top", min=1)] = 10,
    as_json: Json = False,
) -> None:
    """Check the database, schema, data and Modal; exit 1 when any check FAILs.

    Args:
        check_modal: Also look every registry function up in the Modal app.
        top: Most rows listed per check.
    """
    from wsctl.cli import output
    from wsctl.doctor import doctor as run_doctor

    st = state(ctx)
    settings = st.settings()
    cfg = settings.dispatch.resolve(backend=backend, app=app, modal_environment=modal_environment)
    report = run_doctor(
        lambda: st.connect(require_schema=False),
        backend=cfg.backend,
        backend_source=_backend_source(cfg.source("backend")),
        callback_timeout=st.callback_timeout(callback_timeout),
        check_modal=check_modal,
        modal_app=cfg.app,
        modal_environment=cfg.modal_environment,
        top=top,
        url=settings.database_url,
    )
    output.show(report, as_json, _render_doctor)
    if not report.ok:
        raise typer.Exit(1)


def _render_doctor(report) -> None:
    from wsctl.cli import output

    output.table(
        ["status", "check", "detail", "hint"],
        [(output.status_cell(c.status), c.name, c.detail, c.hint) for c in report.checks],
    )
    counts = report.counts()
    output.line("doctor: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))


def _backend_source(source: str) -> str:
    """Where doctor's backend came from (``DispatchSettings.source``), for its messages."""
    if source.startswith("option"):
        return "--backend"
    if source.startswith("file:"):
        return "dispatch.backend in wsctl.toml"
    return "the default; --backend local if you dispatch locally"


def register(app: typer.Typer) -> None:
    app.add_typer(item_app, name="item")
    app.command("doctor")(doctor)
