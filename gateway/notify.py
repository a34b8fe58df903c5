"""Wake coroutines waiting on an action's state change, without polling.

``Notifier`` is in-process; a replica-spanning store (PostgreSQL
LISTEN/NOTIFY) calls ``publish`` when another replica changes an action.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Notifier:
    """Per-action wake-ups: ``wait`` returns when ``publish`` is called or on timeout."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)

    def publish(self, action_id: str) -> None:
        """Wake everyone waiting on this action."""
        for fut in self._waiters.pop(action_id, ()):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, action_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a change; True if woken."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters[action_id]
        waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiters.discard(fut)
            if not waiters and self._waiters.get(action_id) is waiters:
                del self._waiters[action_id]

    def waiting(self) -> int:
        """How many coroutines are waiting (for metrics and tests)."""
        return sum(len(w) for w in self._waiters.values())
