"""The dashboard's pages and the rules every request goes through.

Pages (all GET; HEAD is answered too):

* ``/``: the figures of `wsctl stats`, batches per workstream and client with a
  progress bar per step (one segment per status), BLOCKED and FAILED states per
  reason code with the commands that fix them; reloads itself every few seconds;
* ``/batch/{id}``: one batch, its steps, its reasons and its first items;
* ``/item/{id}``: where an item went and why, as `wsctl item show` says it,
  including the config row each step used (``used_resolution``);
* ``/search?q=ID``: an item or batch id leads to its page;
* ``/metrics``: exactly the text of `wsctl stats --prometheus`.

Rules: every query runs in a READ ONLY transaction (``wsctl.stats.read_only``);
any method but GET and HEAD gets 405; with a token (required on any address that
is not loopback) a request passes with ``Authorization: Bearer TOKEN``, or with
the token once in the URL (``?token=``), which then lives in an HttpOnly cookie;
secrets are redacted by ``wsctl.redact`` as in the CLI; an error page carries one
line, never a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from wsctl.errors import EnvError, NotFound, OperationalError, WsctlError
from wsctl.queries import one, q
from wsctl.redact import redact, redact_text
from wsctl.settings import DEFAULT_DISPATCH
from wsctl.states import ORDER
from wsctl.ui.fixes import ReasonGroup, fix_commands

if TYPE_CHECKING:
    import psycopg
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("wsctl.ui")

TEMPLATES = Path(__file__).resolve().parent / "templates"
COOKIE = "wsctl_ui_token"
ALLOWED_METHODS = ("GET", "HEAD")
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: the addresses that need no token."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class UiConfig:
    """What the app needs: a way to open a connection, the token, the stats settings."""

    connect: Callable[[], psycopg.Connection]
    token: str | None = None
    callback_timeout: int = 3600
    refresh_seconds: int = 5
    batches_limit: int = 50
    database_label: str = ""
    statement_timeout: str = "15s"
    modal_function_cap: int = DEFAULT_DISPATCH.modal_function_cap  # [dispatch] modal_function_cap


# --- the guard: methods, token, headers --------------------------------------------------


class Guard:
    """ASGI middleware: 405 for any method but GET/HEAD, the token check, security headers."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        if scope["method"] not in ALLOWED_METHODS:
            await _plain(
                send_with_headers,
                405,
                "405 Method Not Allowed: this dashboard is read only\n",
                [(b"allow", b"GET, HEAD")],
            )
            return
        if self.token is not None:
            verdict = self._check(scope)
            if verdict == "redirect":
                pairs = [
                    (k, v)
                    for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True)
                    if k != "token"
                ]
                target = scope.get("path", "/") + (f"?{urlencode(pairs)}" if pairs else "")
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                await _plain(
                    send_with_headers,
                    303,
                    "see other\n",
                    [(b"location", target.encode("latin-1")), (b"set-cookie", cookie.encode())],
                )
                return
            if verdict != "ok":
                await _plain(
                    send_with_headers,
                    401,
                    "401 Unauthorized: this dashboard needs its token (Authorization: Bearer "
                    "TOKEN, or open the URL `wsctl ui` printed once)\n",
                    [(b"www-authenticate", b'Bearer realm="wsctl ui"')],
                )
                return
        await self.app(scope, receive, send_with_headers)

    def _check(self, scope: dict) -> str:
        assert self.token is not None
        want = self.token.encode()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), want):
            return "ok"
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == COOKIE.encode() and hmac.compare_digest(value, want):
                return "ok"
        for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True):
            if k == "token" and hmac.compare_digest(v.encode("latin-1"), want):
                return "redirect"
        return "refused"


async def _plain(send: Callable, status: int, body: str, headers: list) -> None:
    data = body.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


# --- what the pages show -----------------------------------------------------------------


def _segments(counts: dict[str, int]) -> list[dict[str, Any]]:
    total = sum(counts.values())
    out = []
    for s in ORDER:
        n = counts.get(s, 0)
        if n:
            out.append({"status": str(s), "n": n, "pct": round(100.0 * n / total, 3)})
    for status, n in sorted(counts.items()):  # a status the dashboard invented
        if status not in ORDER and n:
            out.append({"status": status, "n": n, "pct": round(100.0 * n / total, 3)})
    return out


def _batches(conn: psycopg.Connection, limit: int, batch_id: uuid.UUID | None = None) -> list:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        if batch_id is None:
            rows = cur.execute(q("ui_batches"), {"workstream": None, "limit": limit}).fetchall()
        else:
            rows = cur.execute(q("ui_batch"), {"batch_id": batch_id}).fetchall()
        ids = [r["id"] for r in rows]
        counts: dict[Any, dict[str, dict[str, int]]] = {}
        for c in cur.execute(q("ui_batch_step_counts"), {"batch_ids": ids}).fetchall():
            counts.setdefault(c["batch_id"], {}).setdefault(c["step"], {})[c["status"]] = c[
                "states"
            ]
    summaries = _pruned_summaries(conn, ids)
    for r in rows:
        per_step = counts.get(r["id"], {})
        steps = list(r["blueprint"] or [])
        r["items"] = sum(per_step.get(steps[0], {}).values()) if steps else 0
        r["pruned"] = summaries.get(r["id"])
        if r["pruned"] is not None:  # the states are gone (or going): the summary row's counts
            per_step = {step: dict(by) for step, by in r["pruned"].counts.items()}
            r["items"] = max(r["items"], r["pruned"].items)
        steps += sorted(s for s in per_step if s not in steps)
        r["steps"] = [
            {
                "step": s,
                "segments": _segments(per_step.get(s, {})),
                "total": sum(per_step.get(s, {}).values()),
            }
            for s in steps
        ]
    return rows


def _pruned_summaries(conn: psycopg.Connection, ids: list) -> dict[Any, Any]:
    from psycopg.rows import class_row

    from wsctl.prune import PruneSummary

    with conn.cursor(row_factory=class_row(PruneSummary)) as cur:
        found = cur.execute(q("ui_pruned_summaries"), {"batch_ids": ids}).fetchall()
    return {p.batch_id: p for p in found}


def _reasons(
    conn: psycopg.Connection, batch_id: uuid.UUID | None, limit: int = 100
) -> list[ReasonGroup]:
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(ReasonGroup)) as cur:
        return cur.execute(q("ui_reasons"), {"batch_id": batch_id, "limit": limit}).fetchall()


class _Pages:
    def __init__(self, cfg: UiConfig) -> None:
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        self.cfg = cfg
        self.env = Environment(
            loader=FileSystemLoader(str(TEMPLATES)),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["redact"] = lambda v: redact_text(str(v)) if v is not None else ""
        self.env.filters["ts"] = lambda v: v.isoformat(timespec="seconds") if v else "-"
        self.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True)
        self.env.filters["age"] = _age_text

    def render(self, name: str, status_code: int = 200, **ctx: Any) -> Response:
        from starlette.responses import HTMLResponse

        ctx.setdefault("refresh", None)
        ctx.setdefault("database", self.cfg.database_label)
        html = self.env.get_template(name).render(statuses=[str(s) for s in ORDER], **ctx)
        return HTMLResponse(html, status_code=status_code)

    def error(self, status_code: int, message: str) -> Response:
        return self.render(
            "error.html",
            status_code=status_code,
            title=f"{status_code}",
            message=redact_text(" ".join(str(message).split())),
        )

    def read(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        """Run ``fn`` on a new connection inside one READ ONLY transaction."""
        from wsctl.stats import read_only

        with self.cfg.connect() as conn:
            with read_only(conn, statement_timeout=self.cfg.statement_timeout):
                return fn(conn)

    def stats(self):
        from wsctl.stats import collect

        with self.cfg.connect() as conn:
            # collect() runs its queries in its own READ ONLY transaction
            return collect(
                conn,
                callback_timeout=self.cfg.callback_timeout,
                statement_timeout=self.cfg.statement_timeout,
            )

    # the endpoints (sync: Starlette runs them in its thread pool)

    def dashboard(self, request: Request) -> Response:
        st = self.stats()

        def more(conn: psycopg.Connection) -> tuple[list, list]:
            return _batches(conn, self.cfg.batches_limit), _reasons(conn, None)

        batches, reasons = self.read(more)
        groups: dict[tuple[str, str], list] = {}
        for b in batches:
            groups.setdefault((b["workstream"] or "", b["client"]), []).append(b)
        refresh = None if request.query_params.get("refresh") == "0" else self.cfg.refresh_seconds
        return self.render(
            "dashboard.html",
            title="wsctl dashboard",
            st=st,
            totals=st.totals_by_status(),
            recent=st.recent_totals(),
            overdue=sum(o.states for o in st.overdue),
            groups=sorted(groups.items()),
            reasons=reasons,
            changed=[u for u in st.config_use if u.changed_since],
            limits=[_limit_row(lim) for lim in st.limits],
            webhooks=[_webhook_card(c) for c in st.webhook_capacity()],
            refresh=refresh,
        )

    def batch(self, request: Request) -> Response:
        from wsctl.domain import parse_uuid

        batch_id = parse_uuid(request.path_params["batch_id"], "batch id")

        def load(conn: psycopg.Connection) -> tuple[list, list, list]:
            from psycopg.rows import dict_row

            rows = _batches(conn, 1, batch_id)
            if not rows:
                raise NotFound("batch", batch_id)
            with conn.cursor(row_factory=dict_row) as cur:
                items = cur.execute(
                    q("ui_batch_items"), {"batch_id": batch_id, "limit": 200}
                ).fetchall()
            return rows, _reasons(conn, batch_id), items

        rows, reasons, items = self.read(load)
        return self.render(
            "batch.html", title=f"batch {batch_id}", b=rows[0], reasons=reasons, items=items
        )

    def item(self, request: Request) -> Response:
        from wsctl.item_report import item_report

        item_id, cap = request.path_params["item_id"], self.cfg.modal_function_cap
        report = self.read(lambda conn: item_report(conn, item_id, function_cap=cap))
        # the document `item show --json` prints, redacted as the CLI redacts it
        doc = redact(report.to_json(reveal=False))
        return self.render("item.html", title=f"item {report.item_id}", doc=doc)

    def search(self, request: Request) -> Response:
        from starlette.responses import RedirectResponse

        from wsctl.domain import parse_uuid

        text = (request.query_params.get("q") or "").strip()
        if not text:
            return self.render(
                "error.html", 400, title="search", message="give an item or batch id"
            )
        found_id = parse_uuid(text, "id")

        def find(conn: psycopg.Connection) -> dict:
            from psycopg.rows import dict_row

            with conn.cursor(row_factory=dict_row) as cur:
                return one(cur.execute(q("ui_find_id"), {"id": found_id}))

        hit = self.read(find)
        if hit["item"]:
            return RedirectResponse(f"/item/{found_id}", status_code=303)
        if hit["batch"]:
            return RedirectResponse(f"/batch/{found_id}", status_code=303)
        raise OperationalError(f"no item or batch with id {found_id}")

    def metrics(self, request: Request) -> Response:
        from starlette.responses import Response as PlainResponse

        from wsctl.stats import render_prometheus

        return PlainResponse(render_prometheus(self.stats()), media_type=PROMETHEUS_CONTENT_TYPE)


def _limit_row(lim: Any) -> dict[str, Any]:
    from wsctl.limits import format_rate

    return {**lim.to_json(), "tokens_now": lim.tokens_now, "rate": format_rate(lim.rate_per_second)}


def _webhook_card(c: Any) -> dict[str, Any]:
    """A (workstream, step)'s webhook capacity; it warns when one config has less than 20 %
    of one webhook's default cap left (doctor warns at 80 % used)."""
    from dataclasses import asdict

    from wsctl import clay

    return {**asdict(c), "warn_below": int(clay.DEFAULT_SUBMISSION_CAP * (1 - clay.WARN_AT))}


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _status_for(exc: BaseException) -> int:
    if isinstance(exc, OperationalError) and str(exc).startswith("no "):
        return 404
    if isinstance(exc, EnvError):
        return 503
    if isinstance(exc, WsctlError):
        return 400
    return 500


def create_app(cfg: UiConfig) -> Starlette:
    """The dashboard as an ASGI app (wrapped by the guard)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    pages = _Pages(cfg)

    def guarded(fn: Callable[[Request], Response]) -> Callable[[Request], Awaitable[Response]]:
        from starlette.concurrency import run_in_threadpool

        async def endpoint(request: Request) -> Response:
            try:
                return await run_in_threadpool(fn, request)
            except WsctlError as exc:
                return pages.error(_status_for(exc), exc.one_line())
            except Exception as exc:  # a database error, a bug: one line, no traceback
                from wsctl.db import first_line

                mod = type(exc).__module__ or ""
                code = 503 if mod.startswith("psycopg") else 500
                log.error(
                    "wsctl ui: %s on %s: %s",
                    type(exc).__name__,
                    request.url.path,
                    redact_text(first_line(exc)),
                )
                what = "database error" if code == 503 else "internal error"
                return pages.error(code, f"{what}: {first_line(exc)}")

        return endpoint

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # registered for HTTPException only
        return pages.error(exc.status_code, exc.detail or "not found")

    async def server_error(request: Request, exc: Exception) -> Response:
        return pages.error(500, "internal error")

    routes = [
        Route("/", guarded(pages.dashboard), methods=["GET"]),
        Route("/batch/{batch_id}", guarded(pages.batch), methods=["GET"]),
        Route("/item/{item_id}", guarded(pages.item), methods=["GET"]),
        Route("/search", guarded(pages.search), methods=["GET"]),
        Route("/metrics", guarded(pages.metrics), methods=["GET"]),
    ]
    app = Starlette(
        debug=False,
        routes=routes,
        exception_handlers={HTTPException: not_found, Exception: server_error},
    )
    return Guard(app, cfg.token)  # type: ignore[return-value]


def serve(
    cfg: UiConfig,
    *,
    host: str,
    port: int,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's own handlers); ``on_ready(url)`` once listening."""
    import uvicorn

    app = create_app(cfg)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    if on_ready is not None:
        original = server.startup

        async def startup(sockets: Any = None) -> None:
            await original(sockets=sockets)
            if server.started:
                shown = host if ":" not in host else f"[{host}]"
                on_ready(f"http://{shown}:{bound}/")

        server.startup = startup  # type: ignore[method-assign]
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _bind(host: str, port: int):
    """The listening socket, bound here so that a taken port is one line (EnvError, exit 3)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except (OSError, UnicodeError) as exc:  # taken, not ours, or not an address
        sock.close()
        why = getattr(exc, "strerror", None) or exc
        raise EnvError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


__all__ = ["UiConfig", "create_app", "fix_commands", "is_loopback", "serve"]
