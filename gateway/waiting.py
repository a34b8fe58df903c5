"""``Cosigner-Wait: N``: hold an agent's answer until its action is decided (PRODUCT.md §3).

A waiting request costs one subscription on the ``Notifier`` and one timer:
no polling loop, no database connection or lock held while it waits. It is
woken by every state change of its action (approve → pending → completed,
reject, cancel, expiry) and re-reads the action once per wake-up.
"""

from __future__ import annotations

import asyncio
import time

from gateway.actions import ActionService
from gateway.errors import InvalidRequest
from gateway.store.base import TERMINAL, ActionRecord

HEADER = "Cosigner-Wait"
MAX_HEADER_DIGITS = 6


def parse_wait(value: str | None, max_wait: int) -> int:
    """Seconds to wait: the header as a whole number ≥ 0, capped by COSIGNER_MAX_WAIT."""
    if value is None:
        return 0
    text = value.strip()
    # isdecimal rejects signs, fractions, exponents and non-ASCII digits alike.
    if not text.isascii() or not text.isdecimal() or len(text) > MAX_HEADER_DIGITS:
        raise InvalidRequest(
            f"{HEADER} must be a whole number of seconds (at most {max_wait} are honoured).",
            param=HEADER,
        )
    return min(int(text), max_wait)


async def wait_for_outcome(
    actions: ActionService, action: ActionRecord, seconds: float
) -> ActionRecord:
    """The action once terminal, or as it stands after ``seconds``; a pending one keeps waiting."""
    if seconds <= 0 or action.status in TERMINAL:
        return action
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    notifier = actions.notifier
    with notifier.subscribe(action.id) as changes:
        # Re-read once subscribed: a change between the caller's read and now is not lost.
        action = await actions.get(action.id)
        while action.status not in TERMINAL and not notifier.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await changes.wait(min(remaining, _until_expiry(action)))
            # Woken, at expiry or at the deadline: read the action as it stands now (this also
            # catches a change nobody published here, e.g. one made by `cosigner actions`).
            # ActionService.get also expires an undecided action whose time is up.
            action = await actions.get(action.id)
    return action


def _until_expiry(action: ActionRecord) -> float:
    """Wake at the action's expiry so the agent hears ``expired`` at once, not a poll later."""
    left = action.expires_at - time.time()
    # Past (or at) expiry by the wall clock but not yet by the store's: no wake-up to wait for.
    return left + 0.05 if action.status == "awaiting_approval" and left > 0 else float("inf")
