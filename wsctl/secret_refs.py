"""Secrets by reference: a client config names a secret instead of holding it.

Anywhere in a config, ``{"$secret": "CLAY_AUTH_ACME"}`` stands for the value
of the environment variable ``CLAY_AUTH_ACME`` where the step runs (a Modal
secret attached to the function). The database, ``config show``, ``item
show`` and the dispatcher only ever see the name; ``wsctl.worker`` resolves
references inside the function (``resolve``), and a reference its environment
cannot resolve is ``MissingSecret``: permanent for the item until an operator
adds the secret (then ``wsctl retry``).

``as_names`` is what code outside the function evaluates (a limit key built
from config fields, a plan): each reference becomes the string
``"$secret:NAME"``, never the value. ``plaintext_credentials`` lists the key
paths holding a credential in clear (what ``config set`` warns about and
``doctor`` counts): exactly what ``redact`` would mask.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from wsctl.errors import OperationalError
from wsctl.redact import (
    SECRET_REF,
    is_reference,
    key_path,
    remember_values,
    secret_findings,
)
from wsctl.states import ErrorClass

# An environment variable name (what a Modal secret's keys are).
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")


class MissingSecret(OperationalError):
    """A config references secrets the function's environment does not hold.

    Permanent for the item, not for the pass (another client's secret may be
    there): the dispatcher BLOCKs the state (``error_class`` operator); after
    adding the secret to the function, ``wsctl retry`` requeues it.
    """

    error_class = ErrorClass.OPERATOR
    reason_code = "missing_secret"

    def __init__(self, missing: list[tuple[str, str]], *, where: str = "the config"):
        self.missing = list(missing)
        self.where = where
        self.names = sorted({name for _, name in missing})
        listed = ", ".join(f"{name} (key {path})" for path, name in missing)
        super().__init__(
            f"{where} references secret(s) not set in this function's environment: {listed}",
            hint="add them to the Modal secret attached to the function, then `wsctl retry`",
        )

    def __reduce__(self):  # Modal pickles a function's exception back to the caller
        return (_missing_secret, (self.missing, self.where))


def _missing_secret(missing: list[tuple[str, str]], where: str) -> MissingSecret:
    return MissingSecret(missing, where=where)


def references(doc: Any) -> list[tuple[str, str]]:
    """``(key path, secret name)`` of every reference in ``doc``, in document order."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if is_reference(value):
            out.append((path, value[SECRET_REF]))
        elif isinstance(value, dict):
            stack.extend((key_path(path, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list | tuple):
            stack.extend((key_path(path, i), v) for i, v in reversed(list(enumerate(value))))
    return out


def check_references(doc: Any, source: str) -> None:
    """Refuse a malformed reference (``{"$secret": 5}``, extra keys, a bad name), naming the key."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            if SECRET_REF in value:
                where = f"{source}: key {path}" if path else source
                name = value[SECRET_REF]
                if len(value) != 1:
                    raise OperationalError(
                        f'{where}: a secret reference is {{"$secret": "NAME"}} and nothing else'
                    )
                if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                    raise OperationalError(
                        f"{where}: secret name {name!r} must be an environment variable name "
                        "(letters, digits and _, not starting with a digit)"
                    )
                continue
            stack.extend((key_path(path, k), v) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((key_path(path, i), v) for i, v in enumerate(value))


def _replace(doc: Any, fn: Callable[[str], Any]) -> Any:
    if is_reference(doc):
        return fn(doc[SECRET_REF])
    if isinstance(doc, dict):
        return {k: _replace(v, fn) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_replace(v, fn) for v in doc]
    return doc


def resolve(doc: Any, env: Mapping[str, str] | None = None, *, where: str = "the config") -> Any:
    """``doc`` with every reference replaced by its value from ``env`` (default: os.environ).

    All missing names are reported at once (``MissingSecret``); the resolved
    values are remembered by the redaction, so an error quoting one is masked.
    """
    env = os.environ if env is None else env
    refs = references(doc)
    if not refs:
        return doc
    missing = [(path, name) for path, name in refs if not env.get(name)]
    if missing:
        raise MissingSecret(missing, where=where)
    remember_values(env[name] for _, name in refs)
    return _replace(doc, lambda name: Resolved(env[name], name))


class Resolved(str):
    """A secret reference's value: a plain ``str`` that still knows the reference's name
    (``wsctl.clay`` counts a webhook by the reference, as the dispatcher side sees it)."""

    secret_name: str

    def __new__(cls, value: str, name: str) -> Resolved:
        out = super().__new__(cls, value)
        out.secret_name = name
        return out


def as_names(doc: Any) -> Any:
    """``doc`` with every reference replaced by ``"$secret:NAME"``: what the dispatcher sees."""
    return _replace(doc, lambda name: f"{SECRET_REF}:{name}")


def plaintext_credentials(doc: Any) -> list[str]:
    """Key paths of ``doc`` that hold a credential in clear.

    What ``redact`` masks, less what it masks only because a key merely looks
    secret (``dedupe_key``): those are hidden, not worth a warning.
    """
    seen: dict[str, None] = {}
    for path, _, sure in secret_findings(doc):
        if sure:
            seen.setdefault(path or "(the document)", None)
    return list(seen)
