"""The command that fixes a group of BLOCKED/FAILED states, per reason code.

Keyed on the codes of the one error table (``wsctl.states.REASONS``) and the Clay
helpers' codes (``wsctl.clay``), never on words guessed from a message. Every operator
and permanent code has a fix (a test holds the table to that); a transient code that
ended FAILED (attempts used up), an unknown code and a state with none get the item's
page (``wsctl item show``) instead. The retry of the group always follows.

Placeholders: ``{client}`` (shell-quoted), ``{step}``, ``{workstream}``, ``{item}``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import datetime
from typing import Any

CONFIG_SET = "wsctl config set --client {client} --step {step} --workstream {workstream} --set "

#: reason code -> the command(s) that remove the cause (before the retry).
FIXES: dict[str, tuple[str, ...]] = {
    # operator: BLOCKED until fixed
    "no_workstream": ("wsctl backfill workstream-slug",),
    "no_registry_row": (
        "wsctl registry add --step {step} --workstream {workstream} --type sync --sender FUNCTION",
    ),
    "function_not_found": (
        "modal deploy APP_FILE  # deploy the function the registry names, or:",
        "wsctl registry add --step {step} --workstream {workstream} --type TYPE --sender FUNCTION",
    ),
    "missing_config_key": (CONFIG_SET + "KEY=VALUE",),
    "missing_secret": (
        "modal secret create SECRET_NAME KEY=VALUE  # the secret the function names",
    ),
    "config_unresolved": (
        "wsctl config show --item {item} --step {step}  # why it is ambiguous",
        CONFIG_SET + "KEY=VALUE",
    ),
    "credentials_rejected": ("modal token new  # or set MODAL_TOKEN_ID / MODAL_TOKEN_SECRET",),
    "worker_environment": (
        "modal secret create SECRET_NAME WSCTL_DATABASE_URL=...  # the workers' database URL",
    ),
    "clay_webhook_cap": (CONFIG_SET + "'clay_table_webhook_urls=[...]'  # add a webhook source",),
    # permanent: FAILED, fixed outside the state, then retried
    "missing_relation": ("wsctl migrate  # or create the table the function reads",),
    "missing_column": ("wsctl migrate  # or add the column the function reads",),
    "client_error": ("wsctl item show {item}  # the request the service refused",),
    "payload_refused": ("wsctl item show {item}  # the payload the service refused",),
    "lease_expired": ("wsctl item show {item}  # its dispatcher died holding the lease",),
    "callback_timeout": (
        "wsctl registry list  # the step's receiver must call back within the timeout",
    ),
    "clay_record_too_large": ("wsctl item show {item}  # the record over Clay's 100 KB",),
    "clay_bad_url": (CONFIG_SET + "clay_table_webhook_url=https://...",),
}


@dataclass(frozen=True)
class ReasonGroup:
    """BLOCKED or FAILED states of one (batch, step, status, reason code): a ``ui_reasons`` row."""

    batch_id: Any
    workstream: str | None
    client: str
    step: str
    status: str
    reason: str | None
    error_class: str | None = None
    states: int = 0
    sample_item_id: Any = None  # the group's newest item
    newest_at: datetime | None = None

    @property
    def reason_label(self) -> str:
        from wsctl.stats import UNCLASSIFIED

        return self.reason or UNCLASSIFIED

    @property
    def commands(self) -> list[str]:
        return fix_commands(self)


def fix_commands(group: ReasonGroup) -> list[str]:
    """The commands an operator runs for a group of BLOCKED/FAILED states: the fix, then retry."""
    reason, workstream, sample_item_id = group.reason, group.workstream, group.sample_item_id
    if workstream is None:
        fixes: tuple[str, ...] = FIXES["no_workstream"]
    elif reason in FIXES:
        fixes = FIXES[reason]
    else:
        fixes = ("wsctl item show {item}",) if sample_item_id is not None else ()
    values = {
        "client": shlex.quote(group.client),
        "step": group.step,
        "workstream": workstream or "WORKSTREAM",
        "item": sample_item_id if sample_item_id is not None else "ITEM_ID",
    }
    cmds = [f.format(**values) for f in fixes]
    cmds.append(f"wsctl retry --batch {group.batch_id} --step {group.step} --status {group.status}")
    return cmds
