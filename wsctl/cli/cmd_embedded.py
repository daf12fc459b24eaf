"""`wsctl embedded status|stop`: the embedded PostgreSQL used when no URL is configured."""

from __future__ import annotations

import typer

from wsctl.cli.common import Json

embedded_app = typer.Typer(
    help="The embedded PostgreSQL (used when no database URL is configured): "
    "see whether it runs, stop it.",
    no_args_is_help=True,
)


@embedded_app.command("status")
def embedded_status(as_json: Json = False) -> None:
    """Whether the embedded server runs, where its data is, and as which system user."""
    from wsctl import embedded
    from wsctl.cli import output
    from wsctl.settings import user_data_dir

    st = embedded.status(user_data_dir())
    output.show(st, as_json, _render_status)


def _render_status(st) -> None:
    from wsctl.cli import output

    if st.running:
        output.line(
            f"running: pid {st.pid}, port {st.port}, as {st.os_user or '?'}, data in {st.pgdata}"
        )
        output.line("stop it with `wsctl embedded stop` (the data is kept)")
    elif st.initialized:
        output.line(f"stopped: data in {st.pgdata} (the next command that needs it starts it)")
    else:
        output.line(f"not created: no data in {st.pgdata}")


@embedded_app.command("stop")
def embedded_stop(as_json: Json = False) -> None:
    """Stop the embedded server (fast shutdown; its data is kept)."""
    from wsctl import embedded
    from wsctl.cli import output
    from wsctl.settings import user_data_dir

    before = embedded.stop(user_data_dir())
    if as_json:
        output.emit_json(
            {"stopped": before.running, "pid": before.pid, "pgdata": str(before.pgdata)}
        )
        return
    if before.running:
        output.line(
            f"stopped the embedded PostgreSQL (pid {before.pid}); data kept in {before.pgdata}"
        )
    else:
        output.line("the embedded PostgreSQL was not running")


def register(app: typer.Typer) -> None:
    app.add_typer(embedded_app, name="embedded")
