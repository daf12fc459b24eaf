"""`wsctl batch create/status/list/cancel` and `wsctl backfill workstream-slug`."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import (
    BatchId,
    BatchIds,
    Client,
    Json,
    Workstream,
    WorkstreamFilter,
    state,
)

batch_app = typer.Typer(
    help="Batches: create one from a CSV or JSON Lines file, see where it stands, cancel it.",
    no_args_is_help=True,
)
backfill_app = typer.Typer(help="Bring legacy rows up to date.", no_args_is_help=True)


@batch_app.command("create")
def batch_create(
    ctx: typer.Context,
    client: Client,
    workstream: Workstream,
    blueprint: Annotated[str, typer.Option("--blueprint")],
    items: Annotated[str, typer.Option("--items")],
    fmt: Annotated[str | None, typer.Option("--format")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    dedupe_key: Annotated[str | None, typer.Option("--dedupe-key")] = None,
    delimiter: Annotated[str, typer.Option("--delimiter")] = ",",
    check_every_row: Annotated[bool, typer.Option("--check-every-row")] = False,
    as_json: Json = False,
) -> None:
    """Create a batch with its workstream, its items and their first PENDING states.

    Args:
        blueprint: Ordered workflow steps: step1,step2,...
        items: Item file: CSV with a header row or JSON Lines; - reads stdin.
        fmt: csv or jsonl (default: from the file's extension).
        dry_run: Validate and parse the whole file; write nothing.
        dedupe_key: A retried create with the same key returns the first batch instead of a copy.
        delimiter: The CSV field separator (one character, e.g. ';').
        check_every_row: Let PostgreSQL check each row's foreign keys even where they hold by
            construction (slower; see README).
    """
    import sys

    from wsctl import batches
    from wsctl.cli import output

    size = _file_size(items)
    with (
        state(ctx).connect() as conn,
        output.progress("loading items", size, unit="bytes") as bar,
    ):

        def on_progress(n_items: int, bytes_read: int) -> None:
            done = size is not None and bytes_read >= size
            what = "writing states, committing" if done and not dry_run else "loading items"
            bar.set(bytes_read, f"{what} ({n_items:,} items)")

        result = batches.create_batch(
            conn,
            client=client,
            workstream=workstream,
            blueprint=blueprint,
            items=items,
            fmt=fmt,
            dry_run=dry_run,
            dedupe_key=dedupe_key,
            delimiter=delimiter,
            stdin=sys.stdin,
            on_progress=on_progress,
            fk_checks="server" if check_every_row else "auto",
        )
    output.warn(*result.warnings)
    if result.deduplicated:
        output.notice(f"dedupe key {dedupe_key!r} already made batch {result.batch_id}")
    output.show(result, as_json, _render_created)


def _render_created(result) -> None:
    from wsctl.cli import output

    if result.dry_run:
        output.line(
            f"dry run: would create a batch of {result.items} items for client "
            f"{result.client} in workstream {result.workstream}, blueprint "
            f"{','.join(result.blueprint)} ({result.items} PENDING {result.blueprint[0]} states)"
        )
        return
    verb = "existing batch" if result.deduplicated else "created batch"
    output.line(
        f"{verb} {result.batch_id}: {result.items} items, workstream "
        f"{result.workstream}, blueprint {','.join(result.blueprint)}"
    )


def _file_size(items: str) -> int | None:
    """The item file's size when it is a regular file (the progress bar's total)."""
    import os
    import stat

    try:
        st = os.stat(items) if items != "-" else None
    except (OSError, ValueError):
        return None
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) and st.st_size else None


LIST_PAGE = 50  # `batch list` without --all: a page a terminal can show


@batch_app.command("status")
def batch_status(ctx: typer.Context, batch_id: BatchId, as_json: Json = False) -> None:
    """Per blueprint step, how many states are in each status."""
    from wsctl import batches
    from wsctl.cli import output

    st = state(ctx).call(batches.batch_status, batch_id)
    output.show(st, as_json, _render_status)


def _render_status(st) -> None:
    from wsctl.cli import output

    b = st.batch
    output.line(f"batch {b.batch_id}  status {b.status}")
    output.line(f"client {b.client}  workstream {b.workstream or '- (none: see backfill)'}")
    output.line(f"items {st.items}  created {b.created_at.isoformat() if b.created_at else '-'}")
    if st.pruned is not None:
        output.line(f"{st.pruned.describe()}; the counts below are as they were then")
    statuses: list[str] = []
    for s in st.steps:
        statuses += [k for k in s.counts if k not in statuses]
    order = ["PENDING", "DISPATCHING", "DISPATCHED", "COMPLETED", "FAILED", "BLOCKED", "CANCELLED"]
    statuses = [k for k in order if k in statuses] + sorted(k for k in statuses if k not in order)
    output.table(
        ["#", "step", *statuses, "total"],
        [
            (s.position or "-", s.step, *(s.counts.get(k, 0) for k in statuses), s.total)
            for s in st.steps
        ],
    )


@batch_app.command("list")
def batch_list(
    ctx: typer.Context,
    client: Annotated[str | None, typer.Option("--client")] = None,
    workstream: WorkstreamFilter = None,
    missing_workstream: Annotated[bool, typer.Option("--missing-workstream")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1)] = LIST_PAGE,
    all_: Annotated[bool, typer.Option("--all")] = False,
    as_json: Json = False,
) -> None:
    """List batches, newest first (a page of them unless --all).

    Args:
        client: Only this client's batches.
        missing_workstream: Only batches without a workstream (legacy).
        limit: At most this many, newest first.
        all_: Every batch (no --limit).
    """
    from wsctl import batches
    from wsctl.cli import output

    rows = state(ctx).call(
        batches.list_batches,
        client=client,
        workstream=workstream,
        missing_workstream=missing_workstream,
        limit=None if all_ else limit + 1,
    )
    more = not all_ and len(rows) > limit
    rows = rows[:limit] if more else rows
    if as_json:
        output.emit_json([r.to_json() for r in rows])
    else:
        output.table(
            ["id", "client", "workstream", "status", "blueprint", "created_at"],
            [
                (r.batch_id, r.client, r.workstream, r.status, ",".join(r.blueprint), r.created_at)
                for r in rows
            ],
        )
    if more:
        output.notice(f"showing the newest {limit}; --all or --limit N for more")


@batch_app.command("cancel")
def batch_cancel(ctx: typer.Context, batch_id: BatchId, as_json: Json = False) -> None:
    """Cancel a batch: its PENDING and BLOCKED states are never dispatched."""
    from wsctl import batches
    from wsctl.cli import output

    result = state(ctx).call(batches.cancel_batch, batch_id)
    output.show(result, as_json, _render_cancelled)


def _render_cancelled(result) -> None:
    from wsctl.cli import output

    if result.previous_status == "CANCELLED":
        output.line(
            f"batch {result.batch_id} was already cancelled: {result.cancelled_states} "
            f"state(s) enqueued since cancelled, {result.in_flight} in flight left to finish"
        )
        return
    output.line(
        f"cancelled batch {result.batch_id}: {result.cancelled_states} waiting state(s) "
        f"cancelled, {result.in_flight} in flight left to finish"
    )


@backfill_app.command("workstream-slug")
def backfill_workstream_slug(
    ctx: typer.Context,
    default: Annotated[str | None, typer.Option("--default")] = None,
    batch: BatchIds = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size")] = 1000,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    enforce: Annotated[bool, typer.Option("--enforce")] = False,
    as_json: Json = False,
) -> None:
    """Infer and set batches.workstream_slug where it is NULL (exit 1 while any stays unresolved).

    Args:
        default: Workstream to set where inference cannot decide.
        chunk_size: Batches per transaction.
        dry_run: Report what would be set; write nothing.
        enforce: Then require a workstream on every batch (CHECK ... NOT NULL); refused, writing
            nothing, if any batch would still lack one.
    """
    from wsctl.backfill import ChunkReport, backfill_workstream_slug
    from wsctl.cli import output
    from wsctl.errors import OperationalError

    with state(ctx).connect() as conn, output.progress("backfilling", None) as bar:
        # --enforce's read-only check pass, then the walk: one bar over both.
        phases: list[str] = []
        done = [0]

        def on_chunk(chunk: ChunkReport) -> None:
            if chunk.phase == "sweep":
                return
            if chunk.phase not in phases:
                phases.append(chunk.phase)
                bar.update_total(done[0] + chunk.total)
            bar.advance(len(chunk.batch_ids))
            done[0] += len(chunk.batch_ids)

        report = backfill_workstream_slug(
            conn,
            default=default,
            batch_ids=batch,
            chunk_size=chunk_size,
            dry_run=dry_run,
            enforce=enforce,
            on_chunk=on_chunk,
            on_resume=_notice_resumed,
        )
    if report.default_unregistered:
        sample = ", ".join(str(b) for b in report.default_unregistered[:5])
        more = len(report.default_unregistered) - 5
        output.warn(
            f"workstream {report.default} does not register every blueprint step of "
            f"{len(report.default_unregistered)} defaulted batch(es): {sample}"
            + (f" and {more} more" if more > 0 else "")
        )
    output.show(report, as_json, _render_backfill)
    if report.enforce and not report.enforce.ok:
        raise OperationalError(report.enforce.message)
    if report.unresolved:
        raise typer.Exit(1)


def _notice_resumed(report) -> None:
    from wsctl.cli import output

    output.notice(
        f"resuming after batch {report.resumed_after} "
        f"(checkpoint of {report.resumed_checkpoint_at:%Y-%m-%d %H:%M:%S %Z})"
    )


def _render_backfill(report) -> None:
    from wsctl.cli import output

    hypothetical = report.dry_run or report.refused_before_writing
    would = "would set" if hypothetical else "set"
    n_set = report.inferred + report.defaulted if hypothetical else report.updated
    output.line(
        f"inferred {report.inferred}, defaulted {report.defaulted}, "
        f"{would} {n_set}, unresolved {len(report.unresolved)}"
        + (
            f", left alone {report.set_meanwhile} (set by another writer meanwhile)"
            if report.set_meanwhile
            else ""
        )
    )
    if report.unresolved:
        output.table(
            ["batch_id", "reason", "candidates"],
            [(u.batch_id, u.reason, ",".join(u.candidates) or "-") for u in report.unresolved],
        )
    if report.enforce and report.enforce.ok:
        output.line(report.enforce.message)


def register(app: typer.Typer) -> None:
    app.add_typer(batch_app, name="batch")
    app.add_typer(backfill_app, name="backfill")
