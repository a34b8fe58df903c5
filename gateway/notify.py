"""Wake coroutines waiting on an action's state change, without polling.

``Notifier`` is in-process; a replica-spanning store (PostgreSQL
LISTEN/NOTIFY) calls ``publish`` when another replica changes an action.

Subscribe *before* reading the action: a change published between the read
and the wait is then kept on the subscription instead of being missed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Subscription:
    """Wake-ups for one action; a change published between waits is kept for the next one."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def _wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a change since the last wait; True if woken."""
        if not self._event.is_set() and timeout > 0:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                return False
        woken = self._event.is_set()
        self._event.clear()
        return woken


class Notifier:
    """Per-action wake-ups: subscribers are woken when ``publish`` is called."""

    def __init__(self) -> None:
        self._subscriptions: defaultdict[str, set[Subscription]] = defaultdict(set)
        self.closed = False

    def publish(self, action_id: str) -> None:
        """Wake everyone waiting on this action."""
        for sub in self._subscriptions.get(action_id, ()):
            sub._wake()

    @contextmanager
    def subscribe(self, action_id: str) -> Iterator[Subscription]:
        """Receive this action's wake-ups for the duration of the block."""
        sub = Subscription()
        if self.closed:
            sub._wake()
        subs = self._subscriptions[action_id]
        subs.add(sub)
        try:
            yield sub
        finally:
            subs.discard(sub)
            if not subs and self._subscriptions.get(action_id) is subs:
                del self._subscriptions[action_id]

    async def wait(self, action_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a change; True if woken."""
        with self.subscribe(action_id) as sub:
            return await sub.wait(timeout)

    def close(self) -> None:
        """Shutting down: wake every waiter now, and every later one at once."""
        self.closed = True
        for subs in self._subscriptions.values():
            for sub in subs:
                sub._wake()

    def waiting(self) -> int:
        """How many coroutines are subscribed (for metrics and tests)."""
        return sum(len(s) for s in self._subscriptions.values())

    def watched(self) -> list[str]:
        """Actions someone is waiting on (for a watcher that learns of changes elsewhere)."""
        return list(self._subscriptions)
