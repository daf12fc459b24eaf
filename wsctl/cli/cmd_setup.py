"""`wsctl init`, `wsctl migrate` and `wsctl settings`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsctl.cli.common import Json, state


def init(
    ctx: typer.Context,
    database_url: Annotated[str | None, typer.Option("--database-url")] = None,
    force: Annotated[bool, typer.Option("--force")] = False,
    path: Annotated[Path, typer.Option("--path")] = Path("wsctl.toml"),
) -> None:
    """Write a commented wsctl.toml in the current directory (mode 0600: it may hold a password).

    Args:
        database_url: URL to write into the file (default: the global option).
        force: Overwrite an existing wsctl.toml.
        path: Where to write the file.
    """
    from wsctl.cli.output import line
    from wsctl.settings import write_init_file

    url = database_url or state(ctx).database_url
    written = write_init_file(path, url, force=force)
    line(f"wrote {written}")


def show_settings(ctx: typer.Context, as_json: Json = False) -> None:
    """Show the effective settings and where each came from (the database URL masked)."""
    from wsctl import settings
    from wsctl.cli import output

    s = state(ctx).settings()
    rows = settings.effective(s)
    if as_json:
        output.emit_json({"files": list(s.files), "settings": [r.to_json() for r in rows]})
        return
    output.table(["setting", "value", "source"], [(r.key, r.value, r.source) for r in rows])
    read = ", ".join(s.files) if s.files else "none (no wsctl.toml found)"
    output.notice(f"files read, lowest precedence first: {read}")


def migrate(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    show_status: Annotated[bool, typer.Option("--status")] = False,
    lock_timeout: Annotated[float, typer.Option("--lock-timeout")] = 60.0,
    ddl_lock_timeout: Annotated[str, typer.Option("--ddl-lock-timeout")] = "10s",
    as_json: Json = False,
) -> None:
    """Bring the database schema up to date (needs a direct or session-mode connection).

    Args:
        dry_run: Print the SQL of pending files.
        show_status: List applied, pending and changed migrations (exit 1 if any pending).
        lock_timeout: Seconds to wait for another migrate's lock.
        ddl_lock_timeout: Longest wait of a schema change for a table lock (PostgreSQL interval).
    """
    from wsctl import migrations
    from wsctl.cli import output
    from wsctl.errors import EnvError
    from wsctl.redact import mask_url

    st = state(ctx)
    settings = st.settings()
    if settings.transaction_pooler and not (show_status or dry_run):
        raise EnvError(
            f"migrations cannot run through a transaction-mode pooler "
            f"({mask_url(settings.database_url)})",
            hint="use the direct connection (Supabase: port 5432) for `wsctl migrate`",
        )
    with st.connect(require_schema=False) as conn:
        if show_status:
            status = migrations.status(conn)
            if as_json:
                output.emit_json(status.to_json())
            else:
                rows = [
                    (a["version"], a["name"], "applied", a["applied_at"]) for a in status.applied
                ]
                rows += [(p["version"], p["name"], "pending", None) for p in status.pending]
                rows += [(c["version"], c["name"], "CHANGED", c["file"]) for c in status.changed]
                output.table(["version", "name", "state", "applied_at/file"], rows)
            if not status.up_to_date:
                raise typer.Exit(1)
            return
        if dry_run:
            pending = migrations.pending_sql(conn)
            if as_json:
                output.emit_json(
                    {
                        "pending": [
                            {"version": m.version, "name": m.name, "sql": m.sql} for m in pending
                        ]
                    }
                )
            elif not pending:
                output.line("-- nothing pending: schema is up to date")
            else:
                for m in pending:
                    output.line(f"-- {m.filename}")
                    output.line(m.sql.rstrip())
                    output.line()
            return
        result = migrations.migrate(
            conn,
            lock_timeout=lock_timeout,
            ddl_lock_timeout=ddl_lock_timeout,
            on_apply=None if as_json else (lambda m: output.notice(f"applying {m.filename}")),
        )
    if as_json:
        output.emit_json({"applied": result.applied, "rebuilt_indexes": result.rebuilt_indexes})
        return
    for name in result.rebuilt_indexes:
        output.notice(f"rebuilt invalid index {name}")
    if not result.applied:
        output.line("schema is up to date: nothing to apply")
    for a in result.applied:
        output.line(f"applied {a['version']:04d}_{a['name']} ({a['duration_ms']} ms)")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("migrate")(migrate)
    app.command("settings")(show_settings)
