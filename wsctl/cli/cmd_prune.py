"""`wsctl prune`: retention for dispatch bookkeeping (see wsctl/prune.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsctl.cli.common import BatchIds, Json, state


def prune(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option("--older-than", show_default=False)],
    batch: BatchIds = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    archive: Annotated[Path | None, typer.Option("--archive")] = None,
    include_items: Annotated[bool, typer.Option("--include-items")] = False,
    chunk_size: Annotated[int, typer.Option("--chunk-size")] = 5000,
    as_json: Json = False,
) -> None:
    """Remove the workflow_states of batches finished longer ago than --older-than.

    Finished: every state COMPLETED, CANCELLED or FAILED. batch_items stay unless
    --include-items. Each chunk is its own short transaction; rerun to resume.

    Args:
        older_than: Prune batches that finished longer ago than this (30d, 12h, 2w, 1d12h).
        batch: Only this batch (repeat, or comma-separate, for several); refused if it is not
            prunable.
        dry_run: List what would be pruned; write nothing.
        archive: Append every removed row to this JSON Lines file, fsynced before the delete (an
            interrupted prune resumes it: each row exactly once).
        include_items: ALSO DELETE THE BATCHES' batch_items, which hold the enrichment results.
            Without it only workflow_states rows are removed.
        chunk_size: Rows per transaction.
    """
    from wsctl import prune as lib
    from wsctl.cli import output

    if include_items and not dry_run:
        output.warn(
            "--include-items: the batches' batch_items (enrichment results) are deleted too"
        )
    with state(ctx).connect() as conn, output.progress("pruning", None) as bar:
        seen = [False]

        def on_chunk(chunk: lib.ChunkProgress) -> None:
            if not seen[0]:
                bar.update_total(chunk.total_states)
                seen[0] = True
            if chunk.table == "workflow_states":
                bar.advance(chunk.rows)

        report = lib.prune(
            conn,
            older_than,
            batch_ids=batch,
            dry_run=dry_run,
            archive=archive,
            include_items=include_items,
            chunk_size=chunk_size,
            on_chunk=on_chunk,
            on_resume=_notice_resumed,
        )
    output.show(report, as_json, _render_pruned)
    if report.skipped:
        raise typer.Exit(1)


def _notice_resumed(report) -> None:
    from wsctl.cli import output

    output.notice(
        f"resuming archive {report.archive}: cut {report.archive_truncated_bytes} byte(s) an "
        "interrupted run wrote but never committed"
    )


def _render_pruned(report) -> None:
    from wsctl.cli import output

    verb = "would prune" if report.dry_run else "pruned"
    output.table(
        [
            "batch_id",
            "finished_at",
            "states",
            "status",
            "states_pruned",
            "items_pruned",
            "note",
        ],
        [
            (
                b.batch_id,
                b.finished_at,
                b.states,
                b.status,
                b.states_pruned,
                b.items_pruned,
                b.reason or ("resumed" if b.resumed else None),
            )
            for b in report.batches
        ],
    )
    if report.dry_run:
        n = sum(b.states for b in report.batches)
        output.line(f"{verb} {len(report.batches)} batch(es), {n} state(s)")
    else:
        output.line(
            f"{verb} {report.states_pruned} state(s)"
            + (f" and {report.items_pruned} item(s)" if report.include_items else "")
            + f" of {len(report.batches) - len(report.skipped)} batch(es)"
            + (f"; {len(report.skipped)} skipped (rerun later)" if report.skipped else "")
        )


db_app = typer.Typer(help="Database upkeep for a long-lived pipeline.", no_args_is_help=True)


@db_app.command("tune")
def db_tune(
    ctx: typer.Context,
    apply: Annotated[bool, typer.Option("--apply")] = False,
    as_json: Json = False,
) -> None:
    """Per-table autovacuum settings for workflow_states: print them, or --apply them.

    Args:
        apply: Set them (otherwise only print).
    """
    from wsctl import tune
    from wsctl.cli import output

    report = state(ctx).call(tune.tune, apply=apply)
    output.show(report, as_json, _render_tune)


def _render_tune(report) -> None:
    from wsctl import tune
    from wsctl.cli import output

    output.table(
        ["table", "setting", "current", "proposed"],
        [(s.table, s.name, s.current or "(server default)", s.proposed) for s in report.settings],
    )
    if report.applied:
        output.line(f"applied to {tune.TABLE}")
    else:
        output.line(report.statement)


def register(app: typer.Typer) -> None:
    app.command("prune")(prune)
    app.add_typer(db_app, name="db")
