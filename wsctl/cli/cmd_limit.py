"""`wsctl limit set|list|show|remove`: fleet-wide rates and in-flight caps per limit key."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import Json, LimitKey, state

limit_app = typer.Typer(
    help="Limits: how fast, and how many at once, the states under a limit key may run "
    "(bind registry rows to keys with `wsctl registry add ... --limit-key KEY`).",
    no_args_is_help=True,
)


def _describe(lim) -> str:
    """What a limit (``limits.Limit``) allows, in words."""
    from wsctl.limits import format_rate

    parts = []
    rate = format_rate(lim.rate_per_second)
    if rate:
        parts.append(f"rate {rate} (burst {lim.burst})")
    if lim.max_in_flight:
        parts.append(f"at most {lim.max_in_flight} in flight")
    return ", ".join(parts) or "nothing"


@limit_app.command("set")
def limit_set(
    ctx: typer.Context,
    key: str,
    rate: Annotated[str | None, typer.Option("--rate", metavar="N/s|N/m|N/h")] = None,
    burst: Annotated[int | None, typer.Option("--burst")] = None,
    max_in_flight: Annotated[int | None, typer.Option("--max-in-flight")] = None,
    no_rate: Annotated[bool, typer.Option("--no-rate")] = False,
    no_max_in_flight: Annotated[bool, typer.Option("--no-max-in-flight")] = False,
    as_json: Json = False,
) -> None:
    """Define a limit, or change the parts given.

    Args:
        key: The limit key, e.g. clay:acme-workspace.
        rate: Spawns per second, minute or hour.
        burst: Spawns allowed at once above the rate (default: 1 s worth).
        max_in_flight: States in flight at once under the key.
        no_rate: Drop the rate (keep the cap).
        no_max_in_flight: Drop the cap (keep the rate).
    """
    from wsctl import limits
    from wsctl.cli import output

    clear = frozenset(
        name for name, flag in (("rate", no_rate), ("max_in_flight", no_max_in_flight)) if flag
    )
    w = state(ctx).call(
        limits.set_limit, key, rate=rate, burst=burst, max_in_flight=max_in_flight, clear=clear
    )
    output.show(w, as_json, _render_set)


def _render_set(w) -> None:
    from wsctl.cli import output

    verb = "defined" if w.created else "changed"
    output.line(f"{verb} limit {w.limit.key}: {_describe(w.limit)}")


@limit_app.command("list")
def limit_list(ctx: typer.Context, as_json: Json = False) -> None:
    """Every limit, and the bound keys no limit defines."""
    from wsctl import limits
    from wsctl.cli import output

    with state(ctx).connect() as conn:
        rows = limits.list_limits(conn)
        undefined = sorted({b.key for b in limits.bound_keys(conn) if not b.defined})
    if as_json:
        output.emit_json({"limits": [r.to_json() for r in rows], "bound_but_undefined": undefined})
        return
    output.table(
        ["key", "rate", "burst", "max_in_flight", "updated_at"],
        [
            (r.key, limits.format_rate(r.rate_per_second), r.burst, r.max_in_flight, r.updated_at)
            for r in rows
        ],
    )
    for key in undefined:
        output.warn(
            f"key {key} is bound by the registry but no limit defines it: it limits nothing"
        )


@limit_app.command("show")
def limit_show(ctx: typer.Context, key: LimitKey, as_json: Json = False) -> None:
    """One limit: its definition, what is in flight under it now, what binds it."""
    from wsctl import limits
    from wsctl.cli import output

    report = state(ctx).call(limits.show_limit, key)
    output.show(report, as_json, _render_show)


def _render_show(report) -> None:
    from wsctl.cli import output

    if report.limit is None:
        output.line(
            f"limit {report.key}: not defined (bound by the registry, so it limits nothing)"
        )
    else:
        output.line(f"limit {report.key}: {_describe(report.limit)}")
    tokens = (
        "" if report.tokens_now is None else f", {report.tokens_now:.1f} spawn(s) available now"
    )
    output.line(f"in flight now: {report.in_flight}{tokens}")
    for b in report.bound_by:
        output.line(f"bound by {b.step} in {b.workstream} ({b.key_template})")


@limit_app.command("remove")
def limit_remove(ctx: typer.Context, key: LimitKey, as_json: Json = False) -> None:
    """Remove a limit (keys bound to it then limit nothing)."""
    from wsctl import limits
    from wsctl.cli import output

    gone = state(ctx).call(limits.remove_limit, key)
    if as_json:
        output.emit_json({**gone.to_json(), "removed": True})
        return
    output.line(f"removed limit {gone.key}")


def register(app: typer.Typer) -> None:
    app.add_typer(limit_app, name="limit")
