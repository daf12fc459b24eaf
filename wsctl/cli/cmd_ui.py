"""`wsctl ui`: the read-only web dashboard (Starlette and uvicorn, imported only here)."""

from __future__ import annotations

from typing import Annotated

import typer

from wsctl.cli.common import CallbackTimeout, state


def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8765,
    token: Annotated[
        str | None, typer.Option("--token", envvar="WSCTL_UI_TOKEN", show_default=False)
    ] = None,
    open_browser: Annotated[bool, typer.Option("--open")] = False,
    refresh: Annotated[int, typer.Option("--refresh", min=0)] = 5,
    callback_timeout: CallbackTimeout = None,
) -> None:
    """Serve a read-only dashboard: batches, reasons, items, and /metrics for Prometheus.

    Args:
        host: Address to listen on.
        port: Port (0: any free one).
        token: Required on every request (Bearer header, or once as ?token= in the URL). Off a
            loopback address one is generated and printed when none is given.
        open_browser: Open the dashboard in a browser.
        refresh: Seconds between reloads (0: none).
    """
    import secrets

    from wsctl import db
    from wsctl.cli import output
    from wsctl.errors import UsageError
    from wsctl.ui.server import UiConfig, is_loopback, serve

    st = state(ctx)
    settings = st.settings()
    timeout = st.callback_timeout(callback_timeout)
    if token is not None and len(token) < 16:
        raise UsageError("--token must be at least 16 characters")
    generated = token is None and not is_loopback(host)
    if generated:
        token = secrets.token_urlsafe(24)
        output.generated_secret_notice(
            f"{host} is not a loopback address: requests need this token: {token}"
        )
    url = st.resolved_url()
    # check the connection and the schema once, before listening
    st.connect().close()
    cfg = UiConfig(
        connect=lambda: db.connect(url, settings, application_name="wsctl-ui"),
        token=token,
        callback_timeout=timeout,
        refresh_seconds=refresh,
        database_label=db.mask_url(url),
        modal_function_cap=settings.dispatch.modal_function_cap,
    )

    def ready(base: str) -> None:
        shown = base if token is None else f"{base}?token={token}"
        # a token given with --token stays masked; one wsctl generated must be seen once
        say = output.generated_secret_notice if generated else output.notice
        say(f"ui: serving {shown} (read only; Ctrl-C stops)")
        if open_browser:
            import webbrowser

            webbrowser.open(shown)

    serve(cfg, host=host, port=port, on_ready=ready)


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
