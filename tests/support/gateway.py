"""Run a real gateway for tests: in a thread with its own event loop, or as `cosigner serve`.

The agent in tests is the (blocking) official stripe SDK, so the gateway
runs on its own loop in a background thread and listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests
from aiohttp import web

from gateway.app import create_app
from gateway.keys import ACTIONS, STORE
from gateway.settings import Settings
from tests.support.peers import REPO_ROOT, free_port

T = TypeVar("T")
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
SECRET_KEY = "secret-key-for-tests-0123456789abcdef"


class GatewayThread:
    """A gateway app served from a background thread on 127.0.0.1."""

    def __init__(self, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.url = f"http://{settings.listen}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the gateway's loop and return its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def start(self) -> GatewayThread:
        """Start serving; returns once the port accepts requests."""
        self._thread.start()

        async def _start() -> None:
            if self.clock is not None:
                self.app = create_app(self.settings, clock=self.clock)
            else:
                self.app = create_app(self.settings)
            self._runner = web.AppRunner(self.app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
            await site.start()

        self.call(_start())
        return self

    def stop(self) -> None:
        """Graceful shutdown (cleanup contexts run), then stop the thread."""
        if self._runner is not None:
            self.call(self._runner.cleanup(), timeout=60)
            self._runner = None
        # Let what is still running (a handler answering at shutdown, a store call in
        # aiosqlite's thread) finish on a live loop: a result set on a closed loop is an error.
        self.call(_settle(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # Conveniences for assertions.
    def action(self, action_id: str) -> Any:
        """The stored action record."""
        assert self.app is not None
        return self.call(self.app[STORE].get_action(action_id))

    def actions_service(self) -> Any:
        """The ActionService (to drive workers deterministically)."""
        assert self.app is not None
        return self.app[ACTIONS]

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call the JSON API as the admin."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def wait_status(self, action_id: str, statuses: set[str], timeout: float = 30) -> Any:
        """Poll the store until the action reaches one of ``statuses``."""
        deadline = time.monotonic() + timeout
        while True:
            action = self.action(action_id)
            if action is not None and action.status in statuses:
                return action
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{action_id} is {action.status if action else None}, wanted {statuses}"
                )
            time.sleep(0.05)


async def _settle() -> None:
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current]
    if pending:
        _, still = await asyncio.wait(pending, timeout=10)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=5)
    await asyncio.sleep(0.05)


def clean_env(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its COSIGNER_* settings, plus ``settings``; the
    gateway imported from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGNER_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(settings or {})
    return env


def run_cosigner(
    *args: str,
    cwd: Path,
    settings: Mapping[str, str] | None = None,
    stdin: str = "",
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` as a separate process, with only the COSIGNER_* variables
    in ``settings`` (full names) and ``stdin`` as its input."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=clean_env(settings),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def settings_for(
    tmp: Path, upstream: str, rules: Path, port: int | None = None, **extra: Any
) -> Settings:
    """Settings a test gateway runs with: its own database, rules, loopback port."""
    values: dict[str, Any] = {
        "listen": f"127.0.0.1:{port or free_port()}",
        "upstream": upstream,
        "database": f"sqlite:///{tmp / 'cosigner.db'}",
        "rules": rules,
        "secret_key": SECRET_KEY,
        "admin_token": ADMIN_TOKEN,
        "worker_interval": 0.2,
        "forward_timeout": 10.0,
        **extra,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def gateway_thread(
    settings: Settings, clock: Callable[[], float] | None = None
) -> Iterator[GatewayThread]:
    """A started GatewayThread (with an injected clock, if given), always stopped."""
    gw = GatewayThread(settings, clock).start()
    try:
        yield gw
    finally:
        gw.stop()


class GatewayProcess:
    """``python -m gateway serve`` as a real process (restarts, signals, kill -9)."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = {**os.environ, **env}
        self.cwd = cwd
        self.url = "http://" + env["COSIGNER_LISTEN"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cwd / "gateway.log"

    def start(self, timeout: float = 30) -> GatewayProcess:
        """Start and wait for /healthz."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log.read_text()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"gateway did not become healthy:\n{self.log.read_text()}")

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for a graceful exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(10)
            except subprocess.TimeoutExpired:
                self.kill()
