"""`wsctl demo`: the whole pipeline on this machine, with nothing configured."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import Json, state


def demo(
    ctx: typer.Context,
    database_url: Annotated[str | None, typer.Option("--database-url", show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout")] = 50.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    as_json: Json = False,
) -> None:
    """Run two workstreams' batches end to end: embedded PostgreSQL, local backend, Clay stand-in.

    Uses a database of its own (wsctl_demo in the embedded PostgreSQL); a
    configured database is never touched unless --database-url is given.
    Safe to run again.

    Args:
        database_url: Run in this database instead of the embedded one (beats the global option).
        timeout: Seconds before the demo gives up waiting for its batches.
        verbose: Also show the worker's log lines ([SYNC STEP], [ASYNC SENDER], [CONFIG]).
    """
    from wsctl import db, demo
    from wsctl.cli import output
    from wsctl.dispatch.run import stderr_log
    from wsctl.errors import UsageError
    from wsctl.settings import Settings

    if timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    # The options only (this command's, then the global one): WSCTL_DATABASE_URL,
    # DATABASE_URL and wsctl.toml are ignored here.
    url = database_url or state(ctx).database_url
    embedded_used = not url
    if url:
        label = db.mask_url(url)
    else:
        from wsctl import embedded
        from wsctl.settings import user_data_dir

        output.notice(f"using the embedded PostgreSQL (database {demo.DEMO_DBNAME})")
        server = embedded.ensure(user_data_dir(), demo.DEMO_DBNAME)
        url, label = server.url, db.mask_url(server.url)
    worker_log = stderr_log(
        verbose, ("enrichment_worker", "wsctl.worker"), "wsctl: worker: %(message)s"
    )
    with worker_log, db.connect(url, Settings(database_url=url, url_source="demo")) as conn:
        result = demo.run_demo(
            conn,
            database_url=url,
            database_label=label,
            timeout=timeout,
            on_progress=output.notice,
        )
    output.show(result, as_json, _render)
    if embedded_used:
        output.notice(
            "the embedded PostgreSQL keeps running for the next command; "
            "stop it with `wsctl embedded stop`"
        )
    if not result.ok:
        raise typer.Exit(1)


def _render(result) -> None:
    from wsctl.cli import output

    output.table(
        ["item", "workstream", "step", "status", "function", "config used", "detail"],
        [
            (
                r.item_id,  # whole: what `wsctl item show ID` takes
                r.workstream,
                r.step,
                r.status,
                r.ran_function or r.function,
                f"{r.config_workstream} ({r.config_id})"
                if r.config_id
                else "-",  # whole, as item show prints it
                r.detail,
            )
            for r in result.rows
        ],
    )
    verdict = (
        "every step ran with its own workstream's config"
        if result.ok
        else "some steps did not use their workstream's config (see the table)"
    )
    output.notice(
        f"{len(result.rows)} steps in {len(result.batches)} batches, {result.passes} "
        f"dispatch passes, {result.seconds:g} s: {verdict}"
    )
    output.notice(f"one item's story: wsctl --database-url '{result.database}' item show ITEM_ID")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
