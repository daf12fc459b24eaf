"""`wsctl ui`: the read-only web dashboard (Starlette and uvicorn, imported only here)."""

from __future__ import annotations

import typer

from wsctl.cli.common import state


def ui(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port (0: any free one)."),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="WSCTL_UI_TOKEN",
        help="Required on every request (Bearer header, or once as ?token= in the URL). "
        "Off a loopback address one is generated and printed when none is given.",
        show_default=False,
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the dashboard in a browser."),
    refresh: int = typer.Option(5, "--refresh", min=0, help="Seconds between reloads (0: none)."),
    callback_timeout: int | None = typer.Option(
        None,
        "--callback-timeout",
        help="Seconds a DISPATCHED state may wait (default: dispatch.callback_timeout).",
    ),
) -> None:
    """Serve a read-only dashboard: batches, reasons, items, and /metrics for Prometheus."""
    import secrets

    from wsctl import db
    from wsctl.cli import output
    from wsctl.errors import UsageError
    from wsctl.ui.server import UiConfig, is_loopback, serve

    st = state(ctx)
    settings = st.settings()
    timeout = callback_timeout
    if timeout is None:
        timeout = settings.dispatch.callback_timeout
    if timeout < 1:
        raise UsageError("--callback-timeout must be at least 1 second")
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
