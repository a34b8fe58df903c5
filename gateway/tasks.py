"""A registry of background tasks so none is fire-and-forget and shutdown can drain them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("cosigner.tasks")


class TaskSet:
    """Keeps a reference to every spawned task; ``drain`` waits for them on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        self.stopping = asyncio.Event()  # set by drain: background loops end after their step

    def spawn(
        self, coro: Coroutine[Any, Any, Any], *, name: str | None = None
    ) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, logging (not losing) its failure."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> None:
        """Stop loops, let running tasks finish for up to ``grace`` seconds, cancel the rest."""
        self.closing = True
        self.stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Tasks may spawn follow-ups while finishing (a callback after a forward): wait too.
        while self._tasks and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
