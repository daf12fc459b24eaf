"""`wsctl client`, `wsctl registry` and `wsctl config`: the catalog and config resolution."""

from __future__ import annotations

from pathlib import Path

import typer

from wsctl.cli.common import (
    CLIENT_OPTION,
    JSON_OPTION,
    REVEAL_OPTION,
    WORKSTREAM_FILTER_OPTION,
    WORKSTREAM_OPTION,
    state,
)

client_app = typer.Typer(help="Clients (by name or id everywhere).", no_args_is_help=True)
registry_app = typer.Typer(
    help="Which Modal functions run a workflow step, per workstream.", no_args_is_help=True
)
config_app = typer.Typer(
    help="Per-client configs by (step, workstream), and how they resolve.",
    no_args_is_help=True,
)

STEP_OPTION = typer.Option(..., "--step", "--workflow", help="Workflow step slug.")
STEP_FILTER_OPTION = typer.Option(None, "--step", "--workflow", help="Only this step.")


# --- client -----------------------------------------------------------------


@client_app.command("add")
def client_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The client's name."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add a client and print its id (an existing name prints the existing id)."""
    from wsctl import catalog
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        row, created = catalog.add_client(conn, name)
    if as_json:
        output.emit_json({**row.to_json(), "created": created})
        return
    if not created:
        output.notice(f"client {row.name} already exists")
    output.line(str(row.id))


@client_app.command("list")
def client_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List clients with their number of configs and batches."""
    from wsctl import catalog
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        rows = catalog.list_clients(conn)
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
    step: str = STEP_OPTION,
    workstream: str = WORKSTREAM_OPTION,
    type_: str = typer.Option(..., "--type", help="sync or async."),
    sender: str = typer.Option(..., "--sender", help="Modal function that starts the step."),
    receiver: str | None = typer.Option(
        None, "--receiver", help="Modal function the webhook reaches (async steps)."
    ),
    limit_keys: list[str] | None = typer.Option(
        None,
        "--limit-key",
        metavar="KEY",
        help="Bind the row to a limit key (repeatable; a template such as "
        "clay:{config.clay_workspace}); replaces the row's keys.",
    ),
    no_limit_keys: bool = typer.Option(
        False, "--no-limit-keys", help="Unbind the row from every limit key."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a step's Modal functions in a workstream (upsert on the composite key)."""
    from wsctl import catalog
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        w = catalog.add_registry(
            conn,
            step=step,
            workstream=workstream,
            type=type_,
            sender=sender,
            receiver=receiver,
            limit_keys=[] if no_limit_keys else (limit_keys or None),
        )
    if as_json:
        output.emit_json(w.to_json())
        return
    r = w.row
    fns = r.sender + (f" -> {r.receiver}" if r.receiver else "")
    verb = "registered" if w.created else "updated" if w.changed else "unchanged:"
    keys = f"; limit keys {', '.join(r.limit_keys)}" if r.limit_keys else ""
    output.line(f"{verb} {r.step} in {r.workstream}: {r.type} {fns}{keys}")


@registry_app.command("list")
def registry_list(
    ctx: typer.Context,
    workstream: str | None = WORKSTREAM_FILTER_OPTION,
    step: str | None = STEP_FILTER_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List registry rows (step, workstream, type, sender, receiver)."""
    from wsctl import catalog
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        rows = catalog.list_registry(conn, workstream=workstream, step=step)
    if as_json:
        output.emit_json([r.to_json() for r in rows])
        return
    _registry_table(rows)


@registry_app.command("remove")
def registry_remove(
    ctx: typer.Context,
    step: str = STEP_OPTION,
    workstream: str = WORKSTREAM_OPTION,
    force: bool = typer.Option(
        False,
        "--force",
        help="Remove even while states (waiting, in flight, BLOCKED) or active batches need it.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove a registry row (refused while states or active batches still need it)."""
    from wsctl import catalog
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        removed = catalog.remove_registry(conn, step=step, workstream=workstream, force=force)
    if as_json:
        output.emit_json(removed.to_json())
        return
    if removed.needs.any:
        output.warn(f"{removed.needs.describe()} needed this row; the dispatcher will block them")
    output.line(f"removed {removed.row.step} from {removed.row.workstream}")


@registry_app.command("import")
def registry_import(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="TOML file of [[registry]] tables."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate only; write nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Upsert many registry rows from a TOML file, all or nothing."""
    from wsctl import catalog
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        result = catalog.import_registry(conn, file, dry_run=dry_run)
    if as_json:
        output.emit_json(result.to_json())
        return
    _registry_table([w.row for w in result.rows])
    if dry_run:
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
    client: str = CLIENT_OPTION,
    step: str = STEP_OPTION,
    workstream: str = WORKSTREAM_OPTION,
    file: Path | None = typer.Option(
        None, "--file", help="A .json or .toml file: replaces the whole config."
    ),
    assignments: list[str] | None = typer.Option(
        None, "--set", help="key=value merged into the config (repeatable; JSON values parse)."
    ),
    new_workstream: bool = typer.Option(
        False,
        "--new-workstream",
        help="The workstream has no registry rows yet: store the config anyway.",
    ),
    submitted: int | None = typer.Option(
        None,
        "--submitted",
        metavar="N",
        help="Clay webhook URLs this change adds already took N submissions (of Clay's "
        "50,000 per source) before wsctl counted them.",
    ),
    reveal: bool = REVEAL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create or update a client config (--file replaces it, --set merges keys)."""
    from wsctl import catalog
    from wsctl.cli import output
    from wsctl.errors import UsageError
    from wsctl.redact import redact

    if (file is None) == (not assignments):
        raise UsageError("give either --file F.json|F.toml or one or more --set key=value")
    doc = catalog.load_config_file(file) if file is not None else None
    merge = catalog.parse_assignments(assignments) if assignments else None
    with state(ctx).connect() as conn:
        w = catalog.set_config(
            conn,
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
    for warning in w.warnings:
        output.warn(warning)
    r = w.row
    verb = "created" if w.created else "updated"
    output.line(f"{verb} config of {r.client.name} for {r.step} in {r.workstream}")
    output.line(_dump(redact(r.config, reveal=reveal)))


@config_app.command("list")
def config_list(
    ctx: typer.Context,
    client: str | None = typer.Option(None, "--client", help="Only this client (name or id)."),
    workstream: str | None = WORKSTREAM_FILTER_OPTION,
    step: str | None = STEP_FILTER_OPTION,
    reveal: bool = REVEAL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List client configs (secrets redacted unless --reveal)."""
    import json

    from wsctl import catalog
    from wsctl.cli import output
    from wsctl.redact import redact

    with state(ctx).connect() as conn:
        rows = catalog.list_configs(conn, client=client, workstream=workstream, step=step)
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
    client: str = CLIENT_OPTION,
    step: str = STEP_OPTION,
    workstream: str = WORKSTREAM_OPTION,
    keys: list[str] | None = typer.Option(
        None, "--key", help="Remove only this top-level key (repeatable); default: the whole row."
    ),
    reveal: bool = REVEAL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete a client config, or only some of its keys."""
    from wsctl import catalog
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        removed = catalog.unset_config(
            conn, client=client, step=step, workstream=workstream, keys=keys or None
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
    step: str = STEP_OPTION,
    item: str | None = typer.Option(
        None, "--item", help="Batch item id (client and workstream from its batch)."
    ),
    client: str | None = typer.Option(None, "--client", help="Client name or id."),
    workstream: str | None = typer.Option(None, "--workstream", help="Explicit workstream slug."),
    reveal: bool = REVEAL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Resolve a client config and show how (exit 0 only when found)."""
    from wsctl.cli import output
    from wsctl.errors import UsageError
    from wsctl.redact import redact
    from wsctl.resolve import resolve_config

    if (item is None) == (client is None):
        raise UsageError("give either --item ID or --client C")
    with state(ctx).connect() as conn:
        res = resolve_config(conn, step=step, item_id=item, client=client, workstream=workstream)
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
    for warning in res.warnings:
        output.warn(warning)
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
