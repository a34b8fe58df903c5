"""Load generation: wrk with a Lua script, or bench/loadgen.py when wrk is missing.

Both print one ``BENCH_RESULT {json}`` line (wrk from the script's ``done``
hook) with the request count, duration, error counts and latency
percentiles in microseconds; ``Result`` is that line, parsed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from procs import pinned

HERE = Path(__file__).resolve().parent

# wrk's Lua `done` hook: one machine-readable line instead of scraping the text report.
WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class Call:
    """One request shape, sent over and over."""

    method: str
    path: str
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """What one load run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # connect/read/write/timeout errors and 4xx/5xx answers
    bad_answers: int = 0  # the 4xx/5xx answers among ``requests``

    @property
    def rps(self) -> float:
        """Successful (2xx/3xx) answers per second: a fast 429 or 502 is not throughput."""
        ok = self.requests - self.bad_answers
        return ok / self.seconds if self.seconds else 0.0

    @classmethod
    def parse(cls, output: str) -> Result:
        """From the ``BENCH_RESULT`` line of a run's output."""
        for line in output.splitlines():
            if line.startswith("BENCH_RESULT "):
                d = json.loads(line.removeprefix("BENCH_RESULT "))
                ms = 1000.0
                return cls(
                    requests=int(d["requests"]),
                    seconds=d["duration_us"] / 1e6,
                    p50_ms=d["p50"] / ms,
                    p90_ms=d["p90"] / ms,
                    p99_ms=d["p99"] / ms,
                    max_ms=d["max"] / ms,
                    errors=sum(
                        int(d[k]) for k in ("connect", "read", "write", "timeout", "status")
                    ),
                    bad_answers=int(d["status"]),
                )
        raise RuntimeError(f"load generator printed no result:\n{output[-2000:]}")


def _lua_string(value: str) -> str:
    """A Lua long-bracket string literal that needs no escaping."""
    level = 0
    while f"]{'=' * level}]" in value:
        level += 1
    eq = "=" * level
    return f"[{eq}[{value}]{eq}]"


class Running:
    """A load run in the background: stop it early with ``stop()``, then ``result()``."""

    def __init__(self, args: list[str], timeout: float, cpus: set[int] | None = None) -> None:
        self._timeout = timeout
        self._popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=pinned(cpus),
        )

    def alive(self) -> bool:
        """Still running."""
        return self._popen.poll() is None

    def stop(self) -> None:
        """Ask the generator to finish now (both print their result on SIGINT)."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGINT)

    def result(self) -> Result:
        """Wait for the run and parse its result."""
        try:
            out, _ = self._popen.communicate(timeout=self._timeout)
        except BaseException:
            self._popen.kill()
            self._popen.wait()
            raise
        return Result.parse(out)

    def kill(self) -> None:
        """End the run without a result (cleanup)."""
        if self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()


class LoadGenerator:
    """Builds and runs load against ``http://127.0.0.1:<port>``."""

    def __init__(
        self, workdir: Path, *, kind: str = "auto", threads: int = 1, cpus: set[int] | None = None
    ) -> None:
        wrk = shutil.which("wrk")
        if kind == "auto":
            kind = "wrk" if wrk else "python"
        if kind == "wrk" and not wrk:
            raise RuntimeError("wrk is not installed")
        self.kind = kind
        self._wrk = wrk or "wrk"
        self._workdir = workdir
        self._threads = threads
        self._cpus = cpus
        self._scripts = 0

    def describe(self) -> str:
        """Name and version, for the report."""
        if self.kind == "wrk":
            out = subprocess.run([self._wrk, "-v"], capture_output=True, text=True).stdout
            return (out.splitlines() or ["wrk"])[0].split(" [")[0].strip()
        return "bench/loadgen.py (Python load generator)"

    def _wrk_args(self, port: int, call: Call, connections: int, duration: int) -> list[str]:
        self._scripts += 1
        script = self._workdir / f"call{self._scripts}.lua"
        lines = [f"wrk.method = {_lua_string(call.method)}"]
        if call.body:
            lines.append(f"wrk.body = {_lua_string(call.body)}")
        for name, value in call.headers.items():
            lines.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")
        script.write_text("\n".join(lines) + "\n" + WRK_DONE)
        threads = max(1, min(self._threads, connections))
        return [
            self._wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{call.path}",
        ]

    def _python_args(self, port: int, call: Call, connections: int, duration: int) -> list[str]:
        args = [
            sys.executable,
            str(HERE / "loadgen.py"),
            "--url",
            f"http://127.0.0.1:{port}{call.path}",
            "-X",
            call.method,
            "-c",
            str(connections),
            "-d",
            str(duration),
            "--body",
            call.body,
        ]
        for name, value in call.headers.items():
            args += ["-H", f"{name}: {value}"]
        return args

    def start(self, port: int, call: Call, connections: int, duration: int) -> Running:
        """Start a run of at most ``duration`` seconds in the background."""
        build = self._wrk_args if self.kind == "wrk" else self._python_args
        return Running(
            build(port, call, connections, duration), timeout=duration + 60, cpus=self._cpus
        )

    def run(self, port: int, call: Call, connections: int, duration: int) -> Result:
        """One run of ``duration`` seconds."""
        running = self.start(port, call, connections, duration)
        try:
            return running.result()
        finally:
            running.kill()
