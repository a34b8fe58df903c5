"""How ``cosigner serve`` runs: its event loop, and the garbage collector after startup.

- **uvloop** when it is installed (a default dependency on Linux and macOS):
  the same asyncio API on libuv, with cheaper socket reads and writes on the
  proxy's path. ``COSIGNER_EVENT_LOOP=asyncio`` chooses the standard loop
  (``uvloop`` requires uvloop; ``auto``, the default, uses it when installed).
- **The collector** walks every tracked object on each full collection. After
  startup the process holds some 60,000 long-lived objects (settings, rules,
  templates, the libraries' modules) that no collection will ever free, and
  a busy gateway runs a full collection every second or so. ``gc.freeze()``
  moves them out of the collector's sight once the app has started, so a
  collection costs what the requests in flight cost. Nothing stops being
  collected that could have been: frozen objects are the ones alive at startup.

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


async def freeze_startup_objects(app: web.Application) -> None:
    """An ``on_startup`` hook, appended last: collect once, then freeze what survived."""
    gc.collect()
    gc.freeze()
    log.debug("event loop %s; %d startup objects frozen", _loop_name(), gc.get_freeze_count())


def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
