"""Background loops (expiry, forward recovery, outboxes), started and stopped from cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("cosigner.workers")


async def every(interval: float, name: str, step: Callable[[], Awaitable[Any]]) -> None:
    """Run ``step`` every ``interval`` seconds until cancelled; failures are logged, not fatal."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %s failed; retrying in %.1fs", name, interval)
        await asyncio.sleep(interval)
