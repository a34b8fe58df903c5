"""How ``cosigner serve`` runs: its event loop, the interpreter lock, the garbage collector.

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
- **The switch interval.** The SQLite store's writer thread needs the
  interpreter lock back after each call into SQLite (a batch of receipts
  takes it three times: to wake, after its INSERT and COMMIT, after the
  statement's reset). A busy event loop lets go of the lock between libuv
  callbacks and takes it straight back; a waiting thread is only sure to get
  it after the switch interval, 5 ms by default. Allowed writes waited on
  those hand-overs: at 32 connections the loop ran out of work while their
  receipts sat ready to commit. At 1 ms (``bench/compare.py --scenarios
  held,allowed``, 6 alternating rounds): allowed POSTs 2,462 -> 2,779/s, the
  loop's CPU per request 377 -> 341 µs; held POSTs 1,411 -> 1,442/s, their
  CPU per hold up 7 %. Shorter intervals (0.5 to 0.05 ms) shortened a
  receipt batch's trip to the writer (1.8 -> 0.6-0.9 ms at 0.1 ms) but, in
  later A/Bs, moved neither allowed POSTs nor holds beyond the noise.

Only the serving process does this: tests build many apps in one process and
keep the standard loop and collector.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
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
SWITCH_INTERVAL = 0.001  # seconds; CPython's default is 0.005


async def settle_runtime(app: web.Application) -> None:
    """An ``on_startup`` hook, appended last: the switch interval, and the collector.

    Freezes what startup made and raises the young generation's threshold.
    """
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.debug(
        "event loop %s; switch interval %g ms; %d startup objects frozen",
        _loop_name(),
        sys.getswitchinterval() * 1000,
        gc.get_freeze_count(),
    )


def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
