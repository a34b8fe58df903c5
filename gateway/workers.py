"""Background loops (expiry, forward recovery, outboxes), started and stopped from cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("cosigner.workers")


async def every(
    interval: float,
    name: str,
    step: Callable[[], Awaitable[Any]],
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Run ``step`` every ``interval`` seconds until ``stop`` is set or cancelled.

    Failures are logged, not fatal. Once ``stop`` is set the loop ends after
    the step it is in, so shutdown never cuts a delivery in half.
    """
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %s failed; retrying in %.1fs", name, interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
