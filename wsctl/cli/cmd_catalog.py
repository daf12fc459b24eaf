"""`wsctl client`, `wsctl registry` and `wsctl config`: the catalog and config resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsctl.cli.common import (
    Client,
    Json,
    Reveal,
    Step,
    StepFilter,
    Workstream,
    WorkstreamFilter,
    choices,
    state,
)
from wsctl.domain import StepType

client_app = typer.Typer(help="Clients (by name or id everywhere).", no_args_is_help=True)
registry_app = typer.Typer(
    help="Which Modal functions run a workflow step, per workstream.", no_args_is_help=True
)
config_app = typer.Typer(
    help="Per-client configs by (step, workstream), and how they resolve.",
    no_args_is_help=True,
)


# --- client -----------------------------------------------------------------


@client_app.command("add")
def client_add(
    ctx: typer.Context,
    name: str,
    as_json: Json = False,
) -> None:
    """Add a client and print its id (an existing name prints the existing id).

    Args:
        name: The client's name.
    """
    from wsctl import catalog
    from wsctl.cli import output

    row, created = state(ctx).call(catalog.add_client, name)
    if as_json:
        output.emit_json({**row.to_json(), "created": created})
        return
    if not created:
        output.notice(f"client {row.name} already exists")
    output.line(str(row.id))


@client_app.command("list")
def client_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List clients with their number of configs and batches."""
    from wsctl import catalog
    from wsctl.cli import output

    rows = state(ctx).call(catalog.list_clients)
    if as_json:
        output.emit_json([r.to_json() for r in rows])
        return
    output.table(
        ["id", "name", "configs", "batches", "created_at"],
        [(r.id, r.name, r.configs, r.batches, r.created_at) for r in rows],
    )


# --- registry ---------------------------------------------------------------


def _registry_table(rows) -> None:
    from wsctl.cli import output

    output.table(
        ["step", "workstream", "type", "sender", "receiver", "limit_keys"],
        [
            (
                r.step,
                r.workstream,
                r.type,
                r.sender,
                r.receiver,
                ",".join(r.limit_keys or ()) or None,
            )
            for r in rows
        ],
    )


@registry_app.command("add")
def registry_add(
    ctx: typer.Context,
    step: Step,
    workstream: Workstream,
    type_: Annotated[StepType, typer.Option("--type", metavar=choices(StepType))],
    sender: Annotated[str, typer.Option("--sender")],
    receiver: Annotated[str | None, typer.Option("--receiver")] = None,
    limit_keys: Annotated[list[str] | None, typer.Option("--limit-key", metavar="KEY")] = None,
    no_limit_keys: Annotated[bool, typer.Option("--no-limit-keys")] = False,
    as_json: Json = False,
) -> None:
    """Register a step's Modal functions in a workstream (upsert on the composite key).

    Args:
        type_: How the step runs: sync (its sender returns the result) or async (its receiver
            gets it from the webhook).
        sender: Modal function that starts the step.
        receiver: Modal function the webhook reaches (async steps).
        limit_keys: Bind the row to a limit key (repeatable; a template such as
            clay:{config.clay_workspace}); replaces the row's keys.
        no_limit_keys: Unbind the row from every limit key.
    """
    from wsctl import catalog
    from wsctl.cli import output

    w = state(ctx).call(
        catalog.add_registry,
        step=step,
        workstream=workstream,
        type=type_.value,
        sender=sender,
        receiver=receiver,
        limit_keys=[] if no_limit_keys else (limit_keys or None),
    )
    output.show(w, as_json, _render_registered)


def _render_registered(w) -> None:
    from wsctl.cli import output

    r = w.row
    fns = r.sender + (f" -> {r.receiver}" if r.receiver else "")
    verb = "registered" if w.created else "updated" if w.changed else "unchanged:"
    keys = f"; limit keys {', '.join(r.limit_keys)}" if r.limit_keys else ""
    output.line(f"{verb} {r.step} in {r.workstream}: {r.type} {fns}{keys}")


@registry_app.command("list")
def registry_list(
    ctx: typer.Context,
    workstream: WorkstreamFilter = None,
    step: StepFilter = None,
    as_json: Json = False,
) -> None:
    """List registry rows (step, workstream, type, sender, receiver)."""
    from wsctl import catalog
    from wsctl.cli import output

    rows = state(ctx).call(catalog.list_registry, workstream=workstream, step=step)
    if as_json:
        output.emit_json([r.to_json() for r in rows])
        return
    _registry_table(rows)


@registry_app.command("remove")
def registry_remove(
    ctx: typer.Context,
    step: Step,
    workstream: Workstream,
    force: Annotated[bool, typer.Option("--force")] = False,
    as_json: Json = False,
) -> None:
    """Remove a registry row (refused while states or active batches still need it).

    Args:
        force: Remove even while states (waiting, in flight, BLOCKED) or active batches need it.
    """
    from wsctl import catalog
    from wsctl.cli import output

    removed = state(ctx).call(
        catalog.remove_registry, step=step, workstream=workstream, force=force
    )
    output.show(removed, as_json, _render_removed)


def _render_removed(removed) -> None:
    from wsctl.cli import output

    if removed.needs.any:
        output.warn(f"{removed.needs.describe()} needed this row; the dispatcher will block them")
    output.line(f"removed {removed.row.step} from {removed.row.workstream}")


@registry_app.command("import")
def registry_import(
    ctx: typer.Context,
    file: Path,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    as_json: Json = False,
) -> None:
    """Upsert many registry rows from a TOML file, all or nothing.

    Args:
        file: TOML file of [[registry]] tables.
        dry_run: Validate only; write nothing.
    """
    from wsctl import catalog
    from wsctl.cli import output

    result = state(ctx).call(catalog.import_registry, file, dry_run=dry_run)
    output.show(result, as_json, _render_imported)


def _render_imported(result) -> None:
    from wsctl.cli import output

    _registry_table([w.row for w in result.rows])
    if result.dry_run:
        output.notice(f"{len(result.rows)} row(s) valid; nothing written (--dry-run)")
    else:
        output.notice(
            f"imported {len(result.rows)} row(s): {result.created} new, {result.updated} "
            f"updated, {result.unchanged} unchanged"
        )


# --- config -----------------------------------------------------------------


def _dump(doc) -> str:
    import json

    return json.dumps(doc, indent=2, sort_keys=True, default=str)


@config_app.command("set")
def config_set(
    ctx: typer.Context,
    client: Client,
    step: Step,
    workstream: Workstream,
    file: Annotated[Path | None, typer.Option("--file")] = None,
    assignments: Annotated[list[str] | None, typer.Option("--set")] = None,
    new_workstream: Annotated[bool, typer.Option("--new-workstream")] = False,
    submitted: Annotated[int | None, typer.Option("--submitted", metavar="N")] = None,
    reveal: Reveal = False,
    as_json: Json = False,
) -> None:
    """Create or update a client config (--file replaces it, --set merges keys).

    Args:
        file: A .json or .toml file: replaces the whole config.
        assignments: key=value merged into the config (repeatable; JSON values parse).
        new_workstream: The workstream has no registry rows yet: store the config anyway.
        submitted: Clay webhook URLs this change adds already took N submissions (of Clay's 50,000
            per source) before wsctl counted them.
    """
    from wsctl import catalog
    from wsctl.cli import output
    from wsctl.errors import UsageError
    from wsctl.redact import redact

    if (file is None) == (not assignments):
        raise UsageError("give either --file F.json|F.toml or one or more --set key=value")
    doc = catalog.load_config_file(file) if file is not None else None
    merge = catalog.parse_assignments(assignments) if assignments else None
    w = state(ctx).call(
        catalog.set_config,
        client=client,
        step=step,
        workstream=workstream,
        config=doc,
        merge=merge,
        new_workstream=new_workstream,
        submitted=submitted,
    )
    if as_json:
        output.emit_json(w.to_json(reveal=reveal))
        return
    output.warn(*w.warnings)
    r = w.row
    verb = "created" if w.created else "updated"
    output.line(f"{verb} config of {r.client.name} for {r.step} in {r.workstream}")
    output.line(_dump(redact(r.config, reveal=reveal)))


@config_app.command("list")
def config_list(
    ctx: typer.Context,
    client: Annotated[str | None, typer.Option("--client")] = None,
    workstream: WorkstreamFilter = None,
    step: StepFilter = None,
    reveal: Reveal = False,
    as_json: Json = False,
) -> None:
    """List client configs (secrets redacted unless --reveal).

    Args:
        client: Only this client (name or id).
    """
    import json

    from wsctl import catalog
    from wsctl.cli import output
    from wsctl.redact import redact

    rows = state(ctx).call(catalog.list_configs, client=client, workstream=workstream, step=step)
    if as_json:
        output.emit_json([r.to_json(reveal=reveal) for r in rows])
        return
    output.table(
        ["client", "step", "workstream", "config", "updated_at"],
        [
            (
                r.client.name,
                r.step,
                r.workstream,
                json.dumps(redact(r.config, reveal=reveal), sort_keys=True),
                r.updated_at,
            )
            for r in rows
        ],
    )


@config_app.command("unset")
def config_unset(
    ctx: typer.Context,
    client: Client,
    step: Step,
    workstream: Workstream,
    keys: Annotated[list[str] | None, typer.Option("--key")] = None,
    reveal: Reveal = False,
    as_json: Json = False,
) -> None:
    """Delete a client config, or only some of its keys.

    Args:
        keys: Remove only this top-level key (repeatable); default: the whole row.
    """
    from wsctl import catalog
    from wsctl.cli import output

    removed = state(ctx).call(
        catalog.unset_config, client=client, step=step, workstream=workstream, keys=keys or None
    )
    if as_json:
        output.emit_json(removed.to_json(reveal=reveal))
        return
    r = removed.row
    what = f"{r.client.name} / {r.step} / {r.workstream}"
    if removed.deleted:
        output.line(f"deleted config {what}")
        return
    if removed.missing_keys:
        output.warn(f"not in the config: {', '.join(removed.missing_keys)}")
    output.line(f"removed key(s) {', '.join(removed.removed_keys) or '(none)'} from {what}")


def _row_text(row: dict | None) -> str:
    if not row:
        return "-"
    table = row.get("table", "")

    def shown(v) -> str:
        if v is None:
            return "NULL"
        return ",".join(map(str, v)) or "[]" if isinstance(v, list) else str(v)

    rest = " ".join(f"{k}={shown(v)}" for k, v in row.items() if k != "table")
    return f"{table}({rest})"


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    step: Step,
    item: Annotated[str | None, typer.Option("--item")] = None,
    client: Annotated[str | None, typer.Option("--client")] = None,
    workstream: Annotated[str | None, typer.Option("--workstream")] = None,
    reveal: Reveal = False,
    as_json: Json = False,
) -> None:
    """Resolve a client config and show how (exit 0 only when found).

    Args:
        item: Batch item id (client and workstream from its batch).
        client: Client name or id.
        workstream: Explicit workstream slug.
    """
    from wsctl.cli import output
    from wsctl.errors import UsageError
    from wsctl.redact import redact
    from wsctl.resolve import resolve_config

    if (item is None) == (client is None):
        raise UsageError("give either --item ID or --client C")
    res = state(ctx).call(
        resolve_config, step=step, item_id=item, client=client, workstream=workstream
    )
    if as_json:
        output.emit_json(res.to_json(reveal=reveal))
    else:
        output.line(f"step:       {res.step}")
        if res.client:
            output.line(f"client:     {res.client.name} ({res.client.id})")
        if res.item_id:
            output.line(f"item:       {res.item_id} (batch {res.batch_id})")
        output.line(f"status:     {res.status}")
        output.line(f"source:     {res.source or '-'}")
        output.line(f"workstream: {res.workstream or '-'}")
        if res.candidates:
            output.line(f"candidates: {', '.join(res.candidates)}")
        output.line("trace:")
        for i, t in enumerate(res.trace, start=1):
            output.line(f"  {i}. [{t.rule}] {t.why}")
            if t.row:
                output.line(f"     row: {_row_text(t.row)}")
        if res.config is not None:
            output.line("config:")
            output.line(_dump(redact(res.config, reveal=reveal)))
    output.warn(*res.warnings)
    if not res.found:
        from wsctl.errors import OperationalError

        # the document (or the trace) is on stdout; stderr says in one line why it failed
        raise OperationalError(
            f"no config resolved for {res.step}: {res.status}"
            + (f" (candidates: {', '.join(res.candidates)})" if res.candidates else ""),
            hint="see the trace" if not as_json else "see the document's trace",
        )


def register(app: typer.Typer) -> None:
    app.add_typer(client_app, name="client")
    app.add_typer(registry_app, name="registry")
    app.add_typer(config_app, name="config")
