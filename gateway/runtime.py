"""How ``cosigner serve`` runs: its event loop, and the garbage collector after startup.

- **uvloop** when it is installed (a default dependency on Linux and macOS):
  the same asyncio API on libuv, with cheaper socket reads and writes on the
  proxy's path. ``COSIGNER_EVENT_LOOP=asyncio`` chooses the standard loop
  (``uvloop`` requires uvloop; ``auto``, the default, uses it when installed).
- **The collector.** After startup the process holds some 60,000 long-lived
  objects (settings, rules, templates, the libraries' modules) that no
  collection will ever free, and a busy gateway ran a full collection (30 ms,
  walking all of them) every second or so. ``gc.freeze()`` moves them out of
  the collector's sight once the app has started. And the youngest
  generation's threshold goes from 700 to 10,000 tracked objects: requests
  in flight hold more than 700 between them (32 concurrent GETs, about
  1,000), so the default threshold ran a young collection every few dozen
  requests that found almost nothing to free (each request's objects go by
  reference counting) and moved the requests in flight to older
  generations. Cycles still get collected; each young collection walks at
  most 10,000 objects (about 2 ms).

Only the serving process does this: tests build many apps in one process and
keep the standard loop and collector.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Literal

from aiohttp import web

log = logging.getLogger("cosigner")


def new_event_loop(
    choice: Literal["auto", "uvloop", "asyncio"] = "auto",
) -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (``auto``) or asked for, else asyncio's."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit(
                    "COSIGNER_EVENT_LOOP=uvloop, but uvloop is not installed"
                ) from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


YOUNG_THRESHOLD = 10_000


async def settle_collector(app: web.Application) -> None:
    """An ``on_startup`` hook, appended last: freeze what startup made, raise the threshold."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.debug("event loop %s; %d startup objects frozen", _loop_name(), gc.get_freeze_count())


def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
