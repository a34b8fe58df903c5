"""Two or more versions of Cosigner side by side: which change made it faster, and by how much.

    .venv/bin/python bench/compare.py HEAD~1 HEAD
    .venv/bin/python bench/compare.py --scenarios held --rounds 6 main . --bare

Each revision is checked out (``git worktree``, detached, removed at the end;
``.`` is this working tree as it is, uncommitted changes included) and served
by its own Cosigner against one nginx. The versions take turns, round by
round (A B A B …), at 32 connections, and the table shows per version the
median throughput and the median CPU time per request, read from /proc: the
whole process and its main thread (the event loop). On a machine whose speed
drifts from one minute to the next, CPU per request is the steadier figure
and the turns keep the drift fair. ``--bare`` adds the bare proxy as a row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from load import Call, LoadGenerator
from procs import Process, Processes
from run import ALLOWED, GET, HELD, ROOT, ensure_tools, say, start_bare, start_gateway, start_nginx

SCENARIOS: dict[str, Call] = {"get": GET, "allowed": ALLOWED, "held": HELD}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, *, main_only: bool = False) -> float:
    """User + system CPU time of a process (every thread), or of its main thread only."""
    task = Path(f"/proc/{pid}/task")
    total = 0
    for tid in [str(pid)] if main_only else os.listdir(task):
        # Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
        fields = (task / tid / "stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


@dataclass
class Side:
    """One version under test and its measurements."""

    name: str
    proc: Process
    port: int
    runs: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    def measure(self, load: LoadGenerator, scenario: str, seconds: int) -> None:
        """One round: req/s, CPU µs per request (process, main thread)."""
        call = SCENARIOS[scenario]
        load.run(self.port, call, 32, 1)  # warm-up, unmeasured
        pid = self.proc.popen.pid
        cpu, main = cpu_seconds(pid), cpu_seconds(pid, main_only=True)
        result = load.run(self.port, call, 32, seconds)
        per_request = 1e6 / max(result.requests, 1)
        self.runs.setdefault(scenario, []).append(
            (
                result.rps,
                (cpu_seconds(pid) - cpu) * per_request,
                (cpu_seconds(pid, main_only=True) - main) * per_request,
            )
        )


def checkout(rev: str, into: Path) -> Path:
    """``.``: this working tree; anything else: a detached worktree of that revision."""
    if rev == ".":
        return ROOT
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(into), rev],
        check=True,
    )
    return into


def remove_worktrees(paths: Sequence[Path]) -> None:
    """Remove the worktrees ``checkout`` made (never this working tree)."""
    for path in paths:
        if path != ROOT:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                check=False,
                capture_output=True,
            )


def report(sides: Sequence[Side], scenarios: Sequence[str]) -> str:
    """Medians per side and scenario, with every round's req/s."""
    lines = [
        f"{'scenario':9} {'version':16} {'req/s':>7} {'CPU µs/req':>10} {'loop µs/req':>11}"
        "  rounds (req/s)"
    ]
    for scenario in scenarios:
        for side in sides:
            runs = side.runs.get(scenario)
            if not runs:
                continue
            rps, cpu, main = (statistics.median(r[i] for r in runs) for i in range(3))
            rounds = ", ".join(f"{r[0]:,.0f}" for r in runs)
            lines.append(
                f"{scenario:9} {side.name[:16]:16} {rps:7,.0f} {cpu:10.0f} {main:11.0f}  {rounds}"
            )
    return "\n".join(lines)


def versions_parser(doc: str | None, scenarios: str) -> argparse.ArgumentParser:
    """The arguments of a side-by-side run: revisions, scenarios, --bare, --no-install."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0] if doc else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("revs", nargs="+", help="git revisions; '.' is this working tree")
    parser.add_argument("--scenarios", default=scenarios, help="of get, allowed, held")
    parser.add_argument("--bare", action="store_true", help="add the bare proxy as a row")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install")
    return parser


def parse_versions(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse, with ``scenarios`` made a list of known ones."""
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = versions_parser(__doc__, "get,allowed,held")
    parser.add_argument("--rounds", type=int, default=4, help="turns per version")
    parser.add_argument("--duration", type=int, default=3, help="seconds per measured run")
    parser.add_argument(
        "--pin", action="store_true", help="proxies on CPU 1, nginx and wrk on CPU 0"
    )
    return parse_versions(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the turns; print the table."""
    args = parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("bench: Linux only (reads /proc for CPU time)")
    ensure_tools(install=not args.no_install)
    workdir = Path(tempfile.mkdtemp(prefix="cosigner-compare-"))
    workdir.chmod(0o711)
    roots: list[Path] = []
    try:
        for n, rev in enumerate(args.revs):
            roots.append(checkout(rev, workdir / f"tree{n}"))
        proxy_cpus = {1} if args.pin and (os.cpu_count() or 1) > 1 else None
        driver_cpus = {0} if proxy_cpus else None
        load = LoadGenerator(workdir, cpus=driver_cpus)
        with Processes() as procs:
            upstream = start_nginx(procs, workdir, driver_cpus)
            sides: list[Side] = []
            for n, (rev, root) in enumerate(zip(args.revs, roots, strict=True)):
                name = f"{n + 1}:{rev}"
                proc, port, _ = start_gateway(
                    procs, workdir, f"cosigner{n}", upstream, "WARNING", {}, proxy_cpus, root
                )
                sides.append(Side(name, proc, port))
            if args.bare:
                loop = "uvloop" if sides[0].proc.maps_mention("uvloop") else "asyncio"
                proc, port = start_bare(procs, workdir, upstream, loop, proxy_cpus)
                sides.append(Side("bare proxy", proc, port))
            for scenario in args.scenarios:
                for number in range(1, args.rounds + 1):
                    for side in sides:
                        if side.name == "bare proxy" and scenario == "held":
                            continue  # the bare proxy holds nothing
                        say(f"{scenario} round {number}/{args.rounds}: {side.name}")
                        side.measure(load, scenario, args.duration)
        print(report(sides, args.scenarios))
    finally:
        remove_worktrees(roots)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
