"""The processes `make bench` starts — nginx, the bare proxy, Cosigner — and their cleanup.

Every process runs in its own session (process group) with its output in a
log file, so a stuck pipe can never stall it and one ``killpg`` ends it and
its children (nginx's worker). ``Processes`` stops everything it started on
exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType


class StartError(RuntimeError):
    """A process did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec hook that pins the child (and every thread it starts) to ``cpus``."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


class Process:
    """One started process with its log file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=pinned(cpus),
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        """Still running."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the process's output, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def status(self, field: str) -> int:
        """A kB figure from /proc/<pid>/status (VmRSS, VmHWM), 0 when unknown."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def rss_kib(self) -> int:
        """Resident memory now."""
        return self.status("VmRSS")

    def maps_mention(self, needle: str) -> bool:
        """True when a mapped file's path contains ``needle`` (which event loop is loaded)."""
        try:
            return needle in Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL if it lingers."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # The group may outlive its leader (nginx workers): make sure it is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


class Processes:
    """Starts processes and stops every one of them, newest first, on exit."""

    def __init__(self) -> None:
        self._started: list[Process] = []

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> Process:
        """Start one process and remember it."""
        proc = Process(name, args, log=log, env=env, cwd=cwd, cpus=cpus)
        self._started.append(proc)
        return proc

    def stop(self, proc: Process) -> None:
        """Stop one process now."""
        proc.stop()
        if proc in self._started:
            self._started.remove(proc)

    def stop_all(self) -> None:
        """Stop everything still running."""
        while self._started:
            self._started.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Ignore a second Ctrl-C while cleaning up: leaving processes behind is worse.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)


def http_get(
    port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One GET on loopback: status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def wait_ready(
    proc: Process,
    port: int,
    path: str = "/",
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> None:
    """Poll ``GET path`` until it answers 200; StartError (with the log) if it never does."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(
                f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        try:
            status, _, body = http_get(port, path, headers, timeout=2.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.1)
    raise StartError(f"{proc.name} not ready after {timeout:.0f} s ({last}):\n{proc.log_tail()}")
