"""Instructions per request, counted by callgrind: a measure that does not drift.

    .venv/bin/python bench/instructions.py HEAD~1 HEAD
    .venv/bin/python bench/instructions.py --scenarios get --bare .

On a shared VM the same code measures ±10-20 % from one minute to the next in
req/s and in CPU time. This counts what the gateway's event loop executes
instead: each version (and ``--bare``, the bare proxy) runs under
``valgrind --tool=callgrind`` against one nginx, takes a warm-up, and then a
fixed number of requests from a small client on keep-alive connections with
instrumentation on; the table shows the main thread's instructions per request
(the event loop, the one that bounds throughput) and the other threads' (the
SQLite writer). Counts repeat to within about 1 % (hash seed fixed).

It is a proxy for CPU time, not a replacement: kernel work (system calls,
fsync) is not counted, and under valgrind the threads take turns, so batches
are smaller than at full speed. Use it to see what a change to Python code
bought; use ``compare.py`` and ``run.py`` for req/s. Needs valgrind (Debian's
``valgrind`` package; installed when missing, as root).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from compare import SCENARIOS, checkout, parse_versions, remove_worktrees, versions_parser
from load import Call
from procs import Processes, free_port, wait_ready
from run import HERE, NGINX_PACKAGES, ensure_installed, gateway_env, say, start_nginx, which


async def _client(port: int, call: Call, requests: int, connections: int) -> int:
    """``requests`` requests over ``connections`` keep-alive connections; how many got 2xx."""
    body = call.body.encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in call.headers.items())
    raw = (
        f"{call.method} {call.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    ok = 0

    async def one_connection(count: int) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(raw)
                await writer.drain()
                answer = await reader.readuntil(b"\r\n\r\n")
                status = int(answer.split(b" ", 2)[1])
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
                await reader.readexactly(int(length.group(1)) if length else 0)
                ok += 200 <= status < 300
        finally:
            writer.close()

    share, extra = divmod(requests, connections)
    await asyncio.gather(*(one_connection(share + (i < extra)) for i in range(connections)))
    return ok


def send(port: int, call: Call, requests: int, connections: int) -> int:
    """Run the client to completion (from this process, not under valgrind)."""
    return asyncio.run(_client(port, call, requests, connections))


def thread_totals(prefix: Path) -> dict[int, int]:
    """Instructions per thread (1 is the main thread) from callgrind's dump files."""
    totals: dict[int, int] = {}
    for path in glob.glob(f"{prefix}*"):
        text = Path(path).read_text(errors="replace")
        thread = re.search(r"^thread: (\d+)", text, re.M)
        summary = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if thread and summary:
            number = int(thread.group(1))
            totals[number] = totals.get(number, 0) + int(summary.group(1))
    return totals


def measure(
    name: str,
    args: list[str],
    env: dict[str, str],
    port: int,
    ready: str | None,
    home: Path,
    scenarios: Sequence[str],
    requests: int,
    connections: int,
) -> dict[str, tuple[float, float]]:
    """(main thread, other threads) instructions per request, per scenario."""
    out: dict[str, tuple[float, float]] = {}
    for scenario in scenarios:
        call = SCENARIOS[scenario]
        prefix = home / f"callgrind-{scenario}.out"
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",  # startup and warm-up are not counted
            "--separate-threads=yes",
            f"--callgrind-out-file={prefix}",
        ]
        with Processes() as procs:
            proc = procs.start(
                name, valgrind + args, log=home / f"{scenario}.log", env=env, cwd=home
            )
            wait_ready(proc, port, ready or call.path, timeout=300)
            send(port, call, max(200, requests // 10), connections)  # warm-up
            pid = str(proc.popen.pid)
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
            ok = send(port, call, requests, connections)
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        if ok != requests:
            raise SystemExit(f"{name}, {scenario}: only {ok} of {requests} answers were 2xx")
        totals = thread_totals(prefix)
        main = totals.pop(1, 0)
        out[scenario] = (main / requests, sum(totals.values()) / requests)
        say(f"{name}, {scenario}: {main / requests / 1000:,.1f}k instructions per request")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = versions_parser(__doc__, "get,allowed")
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per run")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    return parse_versions(parser, argv)


def ensure_valgrind(install: bool) -> None:
    """valgrind and nginx, from Debian's packages when missing (root only)."""
    ensure_installed({"valgrind": ("valgrind",), "nginx": NGINX_PACKAGES}, install)
    missing = [tool for tool in ("valgrind", "nginx") if not which(tool)]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} not found")


def main(argv: Sequence[str] | None = None) -> int:
    """Count each version in turn; print the table."""
    args = parse_args(argv)
    ensure_valgrind(install=not args.no_install)
    workdir = Path(tempfile.mkdtemp(prefix="cosigner-instructions-"))
    workdir.chmod(0o711)
    roots: list[Path] = []
    rows: list[tuple[str, dict[str, tuple[float, float]]]] = []
    try:
        for n, rev in enumerate(args.revs):
            roots.append(checkout(rev, workdir / f"tree{n}"))
        with Processes() as upstream_procs:
            upstream = start_nginx(upstream_procs, workdir, None)
            sides: list[tuple[str, Path | None]] = [
                (f"{n + 1}:{rev}", root)
                for n, (rev, root) in enumerate(zip(args.revs, roots, strict=True))
            ]
            if args.bare:
                sides.append(("bare proxy", None))
            for n, (name, root) in enumerate(sides):
                home = workdir / f"side{n}"
                home.mkdir()
                port = free_port()
                if root is None:
                    env = dict(os.environ)
                    cmd = [sys.executable, str(HERE / "bare_proxy.py"), "--loop", "uvloop"]
                    cmd += ["--listen", f"127.0.0.1:{port}"]
                    cmd += ["--upstream", f"http://127.0.0.1:{upstream}"]
                else:
                    env = gateway_env(home / "bench.db", port, upstream, "WARNING", {}, root)
                    cmd = [sys.executable, "-m", "gateway", "serve"]
                env.update(PYTHONHASHSEED="0", PYTHONMALLOC="malloc")  # repeatable counts
                scenarios = [s for s in args.scenarios if root is not None or s != "held"]
                rows.append(
                    (
                        name,
                        measure(
                            name,
                            cmd,
                            env,
                            port,
                            None if root is None else "/healthz",
                            home,
                            scenarios,
                            args.requests,
                            args.connections,
                        ),
                    )
                )
                time.sleep(0.2)
        print(report(rows, args.scenarios))
    finally:
        remove_worktrees(roots)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(
    rows: Sequence[tuple[str, dict[str, tuple[float, float]]]], scenarios: Sequence[str]
) -> str:
    """One line per scenario and version: thousands of instructions per request."""
    bare = dict(rows).get("bare proxy", {})
    lines = [
        f"{'scenario':9} {'version':16} {'event loop':>12} {'other threads':>14} {'bare/this':>10}"
    ]
    for scenario in scenarios:
        for name, figures in rows:
            if scenario not in figures:
                continue
            main, other = figures[scenario]
            ratio = f"{bare[scenario][0] / main:.2f}" if scenario in bare else "-"
            figures_k = f"{main / 1000:11,.1f}k {other / 1000:13,.1f}k"
            lines.append(f"{scenario:9} {name[:16]:16} {figures_k} {ratio:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
