"""Clay's webhook realities, for the worker helpers and the example senders.

- A webhook source accepts at most 50,000 submissions in its lifetime (deleted rows
  included) and then stops accepting, silently. A config may list several webhook URLs
  for one table (``clay_table_webhook_urls``; the single ``clay_table_webhook_url``
  still works). wsctl counts the submissions each accepted in ``wsctl.clay_webhooks``,
  keyed by a digest of the URL (never the URL: it carries a secret), and a sender uses
  the first URL with capacity left under the threshold (45,000 by default,
  ``clay_webhook_submission_cap`` in the config). When every URL is used up the state
  is BLOCKED and nothing is posted.
- A record may be at most 100 KB: a body over 102,400 bytes as sent
  (``clay_max_record_bytes`` in the config) is FAILED before sending, with its size.
- 429 and 5xx answers are transient (``Retry-After`` is the backoff); other 4xx are
  permanent; network errors and timeouts are transient.

A webhook URL in a config may be a secret reference (``{"$secret": NAME}``): its digest
is then the reference's (``$secret:NAME``), which the dispatcher side can compute too,
and the value is resolved only inside the function.

Each failure raises an error carrying ``error_class`` and ``reason_code`` (the
project's one error table, ``wsctl.states``), which the dispatcher records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsctl.db import tx
from wsctl.errors import OperationalError
from wsctl.jsondoc import fields_doc
from wsctl.queries import q

if TYPE_CHECKING:
    import psycopg

DEFAULT_SUBMISSION_CAP = 45_000  # of Clay's 50,000: room for what was not counted
SOURCE_LIFETIME = 50_000
MAX_RECORD_BYTES = 102_400
WARN_AT = 0.8  # doctor WARNs at 80 % of capacity


class ClayError(OperationalError):
    """A Clay submission that did not happen; ``error_class`` says what the state does."""

    error_class = "transient"
    reason_code = "clay_error"
    retry_after: float | None = None


class WebhookCapacityExhausted(ClayError):
    error_class = "operator"  # BLOCKED: an operator adds a webhook source
    reason_code = "clay_webhook_cap"


class RecordTooLarge(ClayError):
    error_class = "permanent"
    reason_code = "clay_record_too_large"


class BadWebhookURL(ClayError):
    error_class = "permanent"
    reason_code = "clay_bad_url"


class ClayAnswer(ClayError):
    """Clay answered with a status other than 2xx."""

    def __init__(self, status: int, retry_after: float | None = None):
        self.status = status
        self.retry_after = retry_after
        # the one error table's HTTP reasons (wsctl.states.http_reason)
        if status == 429:
            self.error_class, self.reason_code = "transient", "rate_limited"
        elif status == 408:
            self.error_class, self.reason_code = "transient", "http_timeout"
        elif status >= 500:
            self.error_class, self.reason_code = "transient", "server_error"
        else:
            self.error_class, self.reason_code = "permanent", "client_error"
        wait = f" (Retry-After {retry_after:g} s)" if retry_after is not None else ""
        super().__init__(f"Clay webhook answered HTTP {status}{wait}")


def webhook_entries(config: dict[str, Any]) -> list[Any]:
    """The webhook URLs of a config, in order (each a URL string or a secret reference)."""
    many = config.get("clay_table_webhook_urls")
    if many is not None:
        if not isinstance(many, list) or not many:
            raise OperationalError("clay_table_webhook_urls must be a non-empty list of URLs")
        return list(many)
    one = config.get("clay_table_webhook_url")
    return [one] if one else []


def digest(entry: Any) -> str:
    """The counter key of a webhook entry: a URL's SHA-256, or a secret reference's."""
    if isinstance(entry, dict) and isinstance(entry.get("$secret"), str):
        text = f"$secret:{entry['$secret']}"
    elif isinstance(getattr(entry, "secret_name", None), str):
        # resolved from a reference inside the function: counted under the reference
        text = f"$secret:{entry.secret_name}"
    elif isinstance(entry, str):
        text = entry.strip()
    else:
        raise OperationalError("a Clay webhook URL must be a string or a secret reference")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def submission_cap(config: dict[str, Any]) -> int:
    cap = config.get("clay_webhook_submission_cap", DEFAULT_SUBMISSION_CAP)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise OperationalError("clay_webhook_submission_cap must be a positive whole number")
    return cap


def encode_record(row: dict[str, Any], config: dict[str, Any]) -> bytes:
    """The JSON body as sent; refused before sending when over Clay's record size."""
    body = json.dumps(row, default=str, separators=(",", ":")).encode("utf-8")
    limit = config.get("clay_max_record_bytes", MAX_RECORD_BYTES)
    if len(body) > limit:
        raise RecordTooLarge(
            f"the record is {len(body):,} bytes as sent; Clay takes at most {limit:,}"
        )
    return body


@dataclass(frozen=True)
class Reservation:
    """One counted submission to one webhook (``index`` in the config's list)."""

    index: int
    entry: Any  # the config's entry (a URL or a secret reference)
    digest: str
    submitted: int  # counted so far, this one included
    http_status: int | None = None  # Clay's answer, once posted (2xx)


def reserve(
    conn: psycopg.Connection, config: dict[str, Any], *, where: str = "this step"
) -> Reservation:
    """Count a submission to the first webhook with capacity left (one short transaction)."""
    entries = webhook_entries(config)
    if not entries:
        raise WebhookCapacityExhausted(f"the client config for {where} has no Clay webhook URL")
    cap = submission_cap(config)
    from wsctl.queries import named

    with tx(conn, lock_timeout="5s"), named(conn) as cur:
        for i, entry in enumerate(entries):
            d = digest(entry)
            row = cur.execute(q("clay_reserve"), {"digest": d, "cap": cap}).fetchone()
            if row is not None:
                return Reservation(index=i, entry=entry, digest=d, submitted=row["submitted"])
    raise WebhookCapacityExhausted(
        f"Clay webhook sources for {where} are at their submission cap "
        f"({len(entries)} source(s), {cap:,} each); add one with `wsctl config set ... "
        "--set clay_table_webhook_urls=[...]`"
    )


def release(conn: psycopg.Connection, reservation: Reservation) -> None:
    """Take back a submission Clay did not accept."""
    with tx(conn, lock_timeout="5s"):
        conn.execute(q("clay_release"), {"digest": reservation.digest})


def send(
    conn: psycopg.Connection,
    config: dict[str, Any],
    row: dict[str, Any],
    *,
    post: Callable[[str, bytes], tuple[int, float | None]],
    resolve: Callable[[Any], str] = lambda entry: entry,
    where: str = "this step",
    limit_keys: list[str] | None = None,
    limit_wait: float = 30.0,
) -> Reservation:
    """Size-check, take a token under the limits, reserve a webhook, POST, and keep the
    count only for a 2xx answer.

    ``post(url, body)`` returns (HTTP status, Retry-After seconds or None) and raises
    ``OSError`` on network trouble; ``resolve`` turns an entry (a secret reference,
    say) into its URL inside the function. ``limit_keys`` (``wsctl.worker.limit_keys``)
    are the limits the state is under: a token is taken under each just before the
    POST, waiting at most ``limit_wait`` seconds (``LimitWait``: transient, no attempt
    counted).
    """
    body = encode_record(row, config)
    if limit_keys:
        from wsctl.dispatch.pacing import take_call_token

        take_call_token(conn, limit_keys, max_wait=limit_wait)
    reservation = reserve(conn, config, where=where)
    try:
        status, retry_after = post(resolve(reservation.entry), body)
    except OSError as exc:
        release(conn, reservation)
        raise ClayError(f"Clay webhook unreachable: {type(exc).__name__}") from None
    except BaseException:
        release(conn, reservation)
        raise
    if not 200 <= status < 300:
        release(conn, reservation)
        raise ClayAnswer(status, retry_after)
    from dataclasses import replace

    return replace(reservation, http_status=status)


def http_post(
    url: str, body: bytes, *, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, float | None]:
    """POST a JSON body; (status, Retry-After seconds or None). Network errors raise OSError."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    if urlsplit(url).scheme not in ("http", "https"):
        raise BadWebhookURL("the Clay webhook URL is not an http(s) URL")
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, _retry_after(exc.headers.get("Retry-After"))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            from datetime import UTC, datetime

            when = parsedate_to_datetime(value)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError):
            return None


def record_prior(conn: psycopg.Connection, entry: Any, submitted: int) -> int:
    """Record submissions a webhook had before wsctl counted them (never lowers the count)."""
    if submitted < 0:
        raise OperationalError("a submission count cannot be negative")
    from wsctl.queries import named

    with tx(conn, lock_timeout="5s"), named(conn) as cur:
        row = cur.execute(
            q("clay_set_submitted"), {"digest": digest(entry), "submitted": submitted}
        ).fetchone()
    assert row is not None
    return int(row["submitted"])


@dataclass(frozen=True)
class WebhookUsage:
    client: str
    step: str
    workstream: str
    index: int
    digest: str
    submitted: int
    cap: int

    @property
    def share(self) -> float:
        return self.submitted / self.cap

    def to_json(self) -> dict[str, Any]:
        """Its fields (the digest's first 12 characters, as everywhere) and what is left."""
        left = max(self.cap - self.submitted, 0)
        return fields_doc(self) | {"digest": self.digest[:12], "left": left}


def usage(conn: psycopg.Connection) -> list[WebhookUsage]:
    """Every configured webhook's count against its cap (inside the caller's transaction)."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        configs = cur.execute(q("clay_configs_with_webhooks")).fetchall()
    found: list[tuple[dict, int, str, int]] = []
    for cfg in configs:
        try:
            entries = webhook_entries(cfg["config"])
            cap = submission_cap(cfg["config"])
            found += [(cfg, i, digest(e), cap) for i, e in enumerate(entries)]
        except OperationalError:
            continue  # a malformed config: the sender reports it where it runs
    with conn.cursor(row_factory=dict_row) as cur:
        counts = {
            r["digest"]: r["submitted"]
            for r in cur.execute(q("clay_counts"), {"digests": [d for _, _, d, _ in found]})
        }
    return [
        WebhookUsage(cfg["client"], cfg["step"], cfg["workstream"], i, d, counts.get(d, 0), cap)
        for cfg, i, d, cap in found
    ]
