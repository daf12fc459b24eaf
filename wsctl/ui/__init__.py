"""`wsctl ui`: a small read-only web dashboard (Starlette, uvicorn, Jinja2; server-rendered).

Imported only by `wsctl ui` (``wsctl --help`` never loads Starlette). See
``wsctl.ui.server`` for the pages and the rules it keeps: every query in a READ
ONLY transaction, GET and HEAD only, a token on any non-loopback address, secrets
redacted as the CLI redacts them, error pages without tracebacks.
"""
