"""The command line of a wsctl run in a process of its own (cron's shape, signals, fleets)."""

from __future__ import annotations

import sys


def wsctl_argv(url: str | None, *args: str) -> list[str]:
    """``python -m wsctl [--database-url URL] ARGS...`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", "wsctl", *(("--database-url", url) if url else ()), *args]
