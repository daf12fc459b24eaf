"""One exception family for everything wsctl refuses or cannot do.

Each class carries the process exit code the CLI turns it into:
0 ok, 1 operational, 2 usage, 3 environment. The CLI prints ``str(error)``
as a single line on stderr; the library never prints or exits.
"""

from __future__ import annotations


class WsctlError(Exception):
    """Base class: an expected failure with a one-line message."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class OperationalError(WsctlError):
    """The request was understood but refused or failed (pending, invalid, not found)."""

    exit_code = 1


class NotFound(OperationalError):
    """No row with that id or key: ``NotFound("batch", bid)`` says "no batch with id BID"
    and, where a listing shows what there is, points to it."""

    LISTED_BY = {"batch": "wsctl batch list", "limit": "wsctl limit list"}

    def __init__(self, what: str, key: object, *, by: str | None = "id"):
        listed = self.LISTED_BY.get(what)
        shown = f"with {by} {key}" if by else repr(key)  # None: the key is the name
        super().__init__(f"no {what} {shown}", hint=f"see `{listed}`" if listed else None)


class UsageError(WsctlError):
    """The command line itself is wrong."""

    exit_code = 2


class EnvError(WsctlError):
    """The environment is not usable: database unreachable, credentials, schema not migrated."""

    exit_code = 3


class DatabaseUnavailable(EnvError):
    """The database could not be reached (the dispatch loop retries these)."""
