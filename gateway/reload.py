"""Rule reloads without a restart: on SIGHUP, and when the rules folder changes.

The folder is polled (names, sizes, modification times and inodes of its rule
files) rather than watched through inotify: it is a handful of small files,
a stat each per second costs nothing, and polling works the same on every
platform and on bind-mounted or network volumes where change events go
missing. A change is acted on once the folder has looked the same for two
polls in a row, so an editor's half-written file is not loaded.

``Policy.reload`` validates the whole folder and swaps atomically; a broken
file keeps the old rules in force and logs what is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway import keys
from gateway.policy import Policy
from gateway.workers import every

log = logging.getLogger("cosigner.rules")

RULE_SUFFIXES = (".yaml", ".yml")
FolderState = tuple[tuple[str, int, int, int], ...]


def folder_state(directory: Path) -> FolderState:
    """What a change to the rule files changes: name, size, mtime and inode of each."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return ()
    state = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.lower().endswith(RULE_SUFFIXES):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue  # removed while we looked; the next poll sees it gone
        state.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(state))


class RulesReloader:
    """Reloads the rule set on request or on a settled change; one reload at a time."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._lock = asyncio.Lock()
        self._loaded = folder_state(policy.directory)  # what the rules in force were read from
        self._last_seen = self._loaded

    async def reload(self, why: str) -> bool:
        """Validate the folder whole and swap; False (old rules kept) if anything is wrong."""
        async with self._lock:
            log.info("reloading rules from %s (%s)", self._policy.directory, why)
            # Taken before reading, so a change made during the reload is seen next time.
            state = await asyncio.to_thread(folder_state, self._policy.directory)
            ok = await asyncio.to_thread(self._policy.reload)
            # A broken folder is not retried until it changes again: one error per edit.
            self._loaded = self._last_seen = state
            return ok

    async def poll(self) -> bool:
        """Reload if the folder changed and has settled since the last look."""
        state = await asyncio.to_thread(folder_state, self._policy.directory)
        previous, self._last_seen = self._last_seen, state
        if state == self._loaded or state != previous:
            return False
        await self.reload("the rules folder changed")
        return True


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the folder watcher and the SIGHUP handler; stop both on shutdown."""
    settings = app[keys.SETTINGS]
    tasks = app[keys.TASKS]
    reloader = RulesReloader(app[keys.POLICY])
    watcher = None
    if settings.rules_watch > 0:
        watcher = tasks.spawn(every(settings.rules_watch, "rules-watch", reloader.poll))
    loop = asyncio.get_running_loop()
    # Signal handlers can only be set from the main thread (`cosigner serve`); a gateway
    # run in a test thread has none, and its watcher still reloads.
    hangup = getattr(signal, "SIGHUP", None)
    handled = hangup is not None and _in_main_thread()
    if handled:
        assert hangup is not None
        loop.add_signal_handler(
            hangup, lambda: tasks.spawn(reloader.reload("SIGHUP"), name="rules-reload")
        )
    yield
    if handled:
        assert hangup is not None
        loop.remove_signal_handler(hangup)
    if watcher is not None:
        watcher.cancel()
