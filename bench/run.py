"""`make bench`: Cosigner against a bare aiohttp proxy, side by side, in one run.

Starts on loopback: nginx answering every request with a Stripe-sized charge
(the upstream, never the bottleneck), bench/bare_proxy.py (the baseline) and
`python -m gateway serve` (Cosigner, rules in bench/rules). wrk drives each
scenario in alternating rounds (bare, Cosigner, Cosigner, bare, ...); the
table shows medians over rounds and, per round, paired ratios whose median
is the verdict, so a machine that gets busier mid-run hurts both sides alike.
Then a fresh Cosigner takes 100,000 held actions over HTTP (gateway RSS
sampled on the way) and the list and receipt pages are timed against that
store. Progress goes to stderr, the report to stdout. Every process started
is stopped on exit, error or Ctrl-C.

    make bench                               # the full run (< 10 minutes)
    .venv/bin/python bench/run.py --quick    # a smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from load import Call, LoadGenerator, Result
from procs import Process, Processes, StartError, free_port, wait_ready

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STARTED = time.monotonic()

CHARGE = "ch_3PbEnchAbCdEfGh1a2B3c4D"
AGENT_KEY = "sk_test_51BenchCosignerAgentKey0000000000"
ADMIN_TOKEN = "bench-admin-" + secrets.token_urlsafe(16)
SECRET_KEY = secrets.token_urlsafe(32)
AGENT_HEADERS = {
    "Authorization": f"Bearer {AGENT_KEY}",
    "Stripe-Version": "2024-06-20",
    "User-Agent": "Stripe/v1 PythonBindings/10.0.0",
}
FORM = {**AGENT_HEADERS, "Content-Type": "application/x-www-form-urlencoded"}
GET = Call("GET", f"/v1/charges/{CHARGE}", headers=AGENT_HEADERS)
# bench/rules allows exactly the refunds with metadata[bench]=allow and holds the rest.
ALLOWED = Call("POST", "/v1/refunds", f"charge={CHARGE}&amount=100&metadata%5Bbench%5D=allow", FORM)
HELD = Call("POST", "/v1/refunds", f"charge={CHARGE}&amount=100&reason=requested_by_customer", FORM)

# The targets.
GET_RATIO = 0.85
ADDED_P50_MS = 0.3
POST_RATIO = 0.75
HOLDS_PER_S = 1500.0
RSS_BAND = 0.10
LIST_P95_MS = 50.0
PAGES_RESERVE = 60.0  # seconds kept back from the fill for seeding, pages and cleanup


def say(message: str) -> None:
    """Progress, on stderr, with the time since start."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- tools ------------------------------------------------------------------------------


def which(name: str) -> str | None:
    """A program on PATH, or in the sbin folders a non-login root shell may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


@contextlib.contextmanager
def no_service_starts() -> Iterator[None]:
    """Keep apt from starting the packaged nginx service while it installs."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\n# bench/run.py: no service starts during install\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def ensure_installed(wanted: Mapping[str, Sequence[str]], install: bool) -> None:
    """Each tool of ``wanted`` not on PATH, from the first of its Debian packages that
    installs (root only); apt's own output goes to stderr, with the progress."""
    missing = [tool for tool in wanted if which(tool) is None]
    if not missing:
        return
    if not install:
        say(f"not installing {', '.join(missing)} (--no-install)")
    elif os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"{', '.join(missing)} missing and cannot install (need root and apt-get)")
    else:
        say(f"installing {', '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
        with no_service_starts():
            subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=sys.stderr, check=False)
            for tool in missing:
                for package in wanted[tool]:
                    done = subprocess.run([*apt, package], env=env, stdout=sys.stderr, check=False)
                    if done.returncode == 0:
                        break


NGINX_PACKAGES = ("nginx-light", "nginx")


def ensure_tools(install: bool) -> None:
    """nginx (required) and wrk (preferred), installed from Debian's packages when missing."""
    ensure_installed({"nginx": NGINX_PACKAGES, "wrk": ("wrk",)}, install)
    if which("nginx") is None:
        raise SystemExit("bench: nginx is required (apt-get install nginx-light)")
    if which("wrk") is None:
        say("wrk unavailable: using bench/loadgen.py (slower client, same for both proxies)")


def version_of(args: Sequence[str]) -> str:
    """First line a program prints about its version."""
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return ((out.stdout + out.stderr).strip().splitlines() or ["?"])[0]


# -- the processes under test -----------------------------------------------------------


@dataclass
class Stack:
    """What is running: ports and processes."""

    upstream_port: int
    bare_port: int
    gateway_port: int
    gateway: Process
    bare: Process
    loop: str


def start_nginx(procs: Processes, workdir: Path, cpus: set[int] | None) -> int:
    """nginx in the foreground with a private prefix; returns its port."""
    prefix = workdir / "nginx"
    prefix.mkdir()
    prefix.chmod(0o755)  # the worker may run as nobody
    body = (HERE / "charge.json").read_text()
    # Inside nginx's single-quoted string `$` would start a variable, `'` and `\` escape.
    assert not set(body) & set("$'\\"), "charge.json must not contain $, ' or \\"
    port = free_port()
    conf = (HERE / "nginx.conf.template").read_text()
    conf = conf.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port))
    (prefix / "nginx.conf").write_text(conf.replace("@BODY@", body))
    nginx = which("nginx") or "nginx"
    args = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    proc = procs.start("nginx", args, log=workdir / "nginx.log", cpus=cpus)
    wait_ready(proc, port, f"/v1/charges/{CHARGE}", timeout=20)
    return port


def gateway_env(
    db: Path,
    port: int,
    upstream_port: int,
    log_level: str,
    extra: dict[str, str],
    root: Path = ROOT,
) -> dict[str, str]:
    """Cosigner's settings: only COSIGNER_* variables chosen here (plus --gateway-env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGNER_")}
    env.update(
        PYTHONPATH=str(root),  # that checkout's gateway (this one's by default), installed or not
        COSIGNER_LISTEN=f"127.0.0.1:{port}",
        COSIGNER_UPSTREAM=f"http://127.0.0.1:{upstream_port}",
        COSIGNER_DATABASE=f"sqlite:///{db}",
        COSIGNER_RULES=str(HERE / "rules"),
        COSIGNER_SECRET_KEY=SECRET_KEY,
        COSIGNER_ADMIN_TOKEN=ADMIN_TOKEN,
        COSIGNER_LOG_LEVEL=log_level,
        COSIGNER_PUBLIC_URL=f"http://127.0.0.1:{port}",
        COSIGNER_REVIEWERS="",
        COSIGNER_SHUTDOWN_GRACE="2",
        # One agent at full speed is the point here, not abuse: no per-agent buckets.
        COSIGNER_RATE_LIMIT_READS="off",
        COSIGNER_RATE_LIMIT_WRITES="off",
    )
    env.update(extra)
    return env


def start_gateway(
    procs: Processes,
    workdir: Path,
    name: str,
    upstream_port: int,
    log_level: str,
    extra: dict[str, str],
    cpus: set[int] | None,
    root: Path = ROOT,
) -> tuple[Process, int, Path]:
    """``python -m gateway serve`` (from ``root``) with a fresh database; process, port, db."""
    home = workdir / name
    home.mkdir()
    db = home / "bench.db"
    port = free_port()
    env = gateway_env(db, port, upstream_port, log_level, extra, root)
    # cwd is the empty home folder, so no stray .env file is read.
    proc = procs.start(
        name,
        [sys.executable, "-m", "gateway", "serve"],
        log=home / "gateway.log",
        env=env,
        cwd=home,
        cpus=cpus,
    )
    wait_ready(proc, port, "/healthz", timeout=60)
    return proc, port, db


def start_bare(
    procs: Processes, workdir: Path, upstream_port: int, loop: str, cpus: set[int] | None
) -> tuple[Process, int]:
    """The baseline proxy on the same event loop as Cosigner."""
    port = free_port()
    args = [
        sys.executable,
        str(HERE / "bare_proxy.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--loop",
        loop,
    ]
    proc = procs.start("bare proxy", args, log=workdir / "bare.log", cpus=cpus)
    wait_ready(proc, port, GET.path, timeout=30)
    return proc, port


def request(port: int, call: Call) -> tuple[int, dict[str, str], bytes]:
    """One request (for the checks before the load, and to show why a run failed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(call.method, call.path, body=call.body or None, headers=call.headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def preflight(stack: Stack) -> None:
    """Each path does what the table claims, or the numbers would mean nothing."""
    charge = json.loads((HERE / "charge.json").read_text())
    for name, port in (("bare proxy", stack.bare_port), ("cosigner", stack.gateway_port)):
        status, _, body = request(port, GET)
        if status != 200 or json.loads(body) != charge:
            raise SystemExit(f"bench: GET through {name} answered {status}: {body[:300]!r}")
    status, headers, body = request(stack.gateway_port, ALLOWED)
    if status != 200 or "cosigner-action" in headers:
        raise SystemExit(f"bench: the allowed POST was not forwarded ({status}): {body[:300]!r}")
    status, headers, body = request(stack.gateway_port, HELD)
    if status != 202 or "cosigner-action" not in headers:
        raise SystemExit(f"bench: the held POST was not held ({status}): {body[:300]!r}")


# -- measurements -----------------------------------------------------------------------


@dataclass
class Scenario:
    """One row of the table."""

    name: str
    call: Call
    connections: int
    sides: tuple[str, ...]  # upstream, bare, cosigner (in round order)
    results: dict[str, list[Result]] = field(default_factory=dict)
    target: str = ""
    verdict: str = ""
    note: str = ""

    def median(self, side: str, metric: Callable[[Result], float]) -> float | None:
        """Median of one metric over one side's rounds."""
        runs = self.results.get(side) or []
        return statistics.median(metric(r) for r in runs) if runs else None

    def paired(self, metric: Callable[[Result, Result], float]) -> float | None:
        """Median over rounds of metric(bare round i, cosigner round i)."""
        bare, cos = self.results.get("bare") or [], self.results.get("cosigner") or []
        values = [metric(b, c) for b, c in zip(bare, cos, strict=False)]
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        """Cosigner's throughput over the bare proxy's."""
        return self.paired(lambda b, c: c.rps / b.rps if b.rps else 0.0)

    def added_p50(self) -> float | None:
        """Milliseconds Cosigner adds to the bare proxy's median latency."""
        return self.paired(lambda b, c: c.p50_ms - b.p50_ms)

    def errors(self) -> int:
        """Failed requests over every run of the row."""
        return sum(r.errors for runs in self.results.values() for r in runs)


def measure(
    scenario: Scenario,
    ports: dict[str, int],
    load: LoadGenerator,
    rounds: int,
    upstream_rounds: int,
    duration: int,
    warmup: int,
) -> None:
    """Alternate the sides round by round; an unmeasured warm-up before each side's first.

    Every other round runs the sides in reverse (bare, Cosigner, Cosigner, bare, ...):
    a machine that speeds up or slows down steadily during a scenario then favours
    neither side's position in the pairs. The rounds are short and follow each other
    without a pause, so the two runs of a pair see the machine as alike as it gets.
    """
    warm: set[str] = set()
    for number in range(1, rounds + 1):
        order = scenario.sides if number % 2 else scenario.sides[::-1]
        for side in order:
            if side == "upstream" and number > upstream_rounds:
                continue
            port = ports[side]
            if warmup and side not in warm:
                load.run(port, scenario.call, scenario.connections, warmup)
                warm.add(side)
            result = load.run(port, scenario.call, scenario.connections, duration)
            scenario.results.setdefault(side, []).append(result)
            errors = f", {result.errors} FAILED" if result.errors else ""
            say(
                f"{scenario.name} round {number}/{rounds} {side}: {result.rps:,.0f} req/s,"
                f" p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms{errors}"
            )
            if result.errors and not scenario.note:
                scenario.note = sample_failure(side, port, scenario.call)
                say(f"  {scenario.note}")


def sample_failure(side: str, port: int, call: Call) -> str:
    """What one more request of a failing run gets, to say why the run failed."""
    try:
        status, _, body = request(port, call)
    except OSError as exc:
        return f"{side}: {exc}"
    text = body[:160].decode(errors="replace").replace("\n", " ")
    return f"{side} answered e.g. HTTP {status}: {text}"


def judge(scenario: Scenario) -> None:
    """Set target and verdict for the rows that have one."""
    if scenario.errors():
        why = f"; {scenario.note}" if scenario.note else ""
        scenario.note = f"{scenario.errors()} failed requests{why}"
    ratio, added = scenario.ratio(), scenario.added_p50()
    holds = scenario.median("cosigner", lambda r: r.rps)
    name = scenario.name
    if name.startswith("GET") and scenario.connections == 32 and "INFO" not in name:
        scenario.target = f"ratio >= {GET_RATIO}"
        scenario.verdict = verdict(ratio is not None and ratio >= GET_RATIO)
    elif name.startswith("GET") and scenario.connections == 1:
        scenario.target = f"added p50 <= {ADDED_P50_MS} ms"
        scenario.verdict = verdict(added is not None and added <= ADDED_P50_MS)
    elif name.startswith("allowed") and scenario.connections == 32:
        scenario.target = f"ratio >= {POST_RATIO}"
        scenario.verdict = verdict(ratio is not None and ratio >= POST_RATIO)
    elif name.startswith("held"):
        scenario.target = f">= {HOLDS_PER_S:,.0f} holds/s"
        scenario.verdict = verdict(holds is not None and holds >= HOLDS_PER_S)
    if scenario.verdict and scenario.errors():
        scenario.verdict = "FAIL"


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


class ActionCounter:
    """Counts held actions straight from the gateway's SQLite file (read-only)."""

    def __init__(self, db: Path) -> None:
        self._conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)

    def count(self) -> int:
        """Actions in the store now."""
        row = self._conn.execute("SELECT count(*) FROM actions").fetchone()
        return int(row[0])

    def approx(self) -> int:
        """Cheap while polling (no deletes during a run, so the highest rowid is the count)."""
        row = self._conn.execute("SELECT max(rowid) FROM actions").fetchone()
        return int(row[0] or 0)

    def sample_ids(self, n: int) -> list[str]:
        """Random action ids, for receipt requests."""
        rows = self._conn.execute("SELECT id FROM actions ORDER BY random() LIMIT ?", (n,))
        return [r[0] for r in rows]

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


@dataclass
class MemorySample:
    """Gateway memory after some number of held actions."""

    actions: int
    rss_kib: int
    hwm_kib: int


@dataclass
class Fill:
    """How the store got its actions, and what memory did meanwhile."""

    samples: list[MemorySample] = field(default_factory=list)
    held_over_http: int = 0
    seconds: float = 0.0
    seeded: int = 0
    errors: int = 0

    @property
    def rate(self) -> float:
        """Held actions per second over the whole fill."""
        return self.held_over_http / self.seconds if self.seconds else 0.0


def fill(
    gateway: Process,
    port: int,
    counter: ActionCounter,
    load: LoadGenerator,
    checkpoints: Sequence[int],
    connections: int,
    budget: float,
) -> Fill:
    """Hold actions over HTTP up to each checkpoint, sampling the gateway's RSS at each."""
    out = Fill()
    start_count = counter.count()
    deadline = time.monotonic() + budget
    for checkpoint in checkpoints:
        remaining = deadline - time.monotonic()
        if remaining < 1 or counter.count() >= checkpoint:
            continue
        began = time.monotonic()
        running = load.start(port, HELD, connections, int(remaining) + 1)
        try:
            while running.alive() and time.monotonic() < deadline:
                if counter.approx() >= checkpoint:
                    break
                time.sleep(0.1)
            running.stop()
            result = running.result()
        finally:
            running.kill()
        out.seconds += time.monotonic() - began
        out.errors += result.errors
        time.sleep(1.0)  # let the last answers go out before reading memory
        count = counter.count()
        sample = MemorySample(count, gateway.rss_kib(), gateway.status("VmHWM"))
        out.samples.append(sample)
        say(
            f"held {count:,} actions ({result.rps:,.0f}/s in this step):"
            f" gateway RSS {sample.rss_kib / 1024:.1f} MiB"
        )
    out.held_over_http = counter.count() - start_count
    return out


def seed(db: Path, total: int) -> int:
    """Top the store up to ``total`` actions by copying a held one in SQL; returns the count.

    Only for the page-latency part when the HTTP fill ran out of time: copies
    whatever columns the schema has, so it follows migrations.
    """
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        have = int(conn.execute("SELECT count(*) FROM actions").fetchone()[0])
        need = total - have
        row = conn.execute("SELECT id FROM actions ORDER BY created LIMIT 1").fetchone()
        if need <= 0 or row is None:
            return 0
        new_id = "printf('act_seed%012d', seq.i)"
        counting = "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < ?)"
        cols = [r[1] for r in conn.execute("PRAGMA table_info(actions)")]
        pick = ", ".join(new_id if c == "id" else f"a.{c}" for c in cols)
        ev_cols = [r[1] for r in conn.execute("PRAGMA table_info(events)") if r[1] != "id"]
        ev_pick = ", ".join(new_id if c == "action_id" else f"e.{c}" for c in ev_cols)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            f"{counting} INSERT INTO actions ({', '.join(cols)})"
            f" SELECT {pick} FROM seq, actions AS a WHERE a.id = ?",
            (need, row[0]),
        )
        conn.execute(
            f"{counting} INSERT INTO events ({', '.join(ev_cols)})"
            f" SELECT {ev_pick} FROM seq, events AS e WHERE e.action_id = ?",
            (need, row[0]),
        )
        conn.execute("COMMIT")
        return need
    finally:
        conn.close()


@dataclass
class PageTiming:
    """Latency of one page or API call, requested one after another."""

    name: str
    requests: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    target: str = ""
    verdict: str = ""
    note: str = ""


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    rank = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def time_pages(
    name: str,
    port: int,
    paths: Sequence[str],
    headers: dict[str, str],
    warmup: int = 10,
    max_seconds: float = 10.0,
) -> PageTiming:
    """Sequential GETs over one keep-alive connection, after a few unmeasured ones.

    ``paths`` are requested in turn; a slow page stops after ``max_seconds``
    (warm-up: a quarter of that) so one slow endpoint cannot stall the run.
    """
    timing = PageTiming(name)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies: list[float] = []
    try:
        for phase, count, limit in (
            ("warm-up", warmup, max_seconds / 4),
            ("timed", len(paths), max_seconds),
        ):
            began = time.monotonic()
            for i in range(count):
                if time.monotonic() - began > limit:
                    if phase == "timed":
                        timing.note = f"stopped after {max_seconds:.0f} s"
                    break
                path = paths[i % len(paths)]
                started = time.perf_counter()
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                elapsed = (time.perf_counter() - started) * 1000
                first = phase == "warm-up" and i == 0
                if resp.status == 404 and first and name.startswith("dashboard"):
                    timing.note = "n/a (no dashboard yet)"
                    return timing
                if resp.status != 200:
                    timing.note = f"HTTP {resp.status} for {path}"
                    return timing
                if phase == "timed":
                    latencies.append(elapsed)
    finally:
        conn.close()
    if not latencies:
        timing.note = timing.note or "no measured request"
        return timing
    latencies.sort()
    timing.requests = len(latencies)
    timing.p50_ms = percentile(latencies, 50)
    timing.p95_ms = percentile(latencies, 95)
    timing.p99_ms = percentile(latencies, 99)
    return timing


def page_timings(port: int, counter: ActionCounter, n: int) -> list[PageTiming]:
    """API and dashboard list and receipt latency, p95 over ``n`` requests each."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ids = counter.sample_ids(n) or ["act_missing"]
    timings = [
        time_pages(
            "API list  GET /cosigner/v1/actions?limit=10",
            port,
            ["/cosigner/v1/actions?limit=10"] * n,
            admin,
        ),
        time_pages(
            "API list  ?status=awaiting_approval&limit=100",
            port,
            ["/cosigner/v1/actions?status=awaiting_approval&limit=100"] * n,
            admin,
        ),
        time_pages(
            "dashboard list  GET /dashboard/actions", port, ["/dashboard/actions"] * n, admin
        ),
        time_pages(
            "API receipt  GET /cosigner/v1/actions/{id}",
            port,
            [f"/cosigner/v1/actions/{i}" for i in ids],
            admin,
        ),
        time_pages(
            "dashboard receipt  GET /dashboard/actions/{id}",
            port,
            [f"/dashboard/actions/{i}" for i in ids],
            admin,
        ),
    ]
    for t in timings:
        if t.name.startswith(("API list  GET", "dashboard list")):
            t.target = f"p95 < {LIST_P95_MS:.0f} ms"
            if t.p95_ms is not None:
                t.verdict = verdict(t.p95_ms < LIST_P95_MS)
            elif not t.note.startswith("n/a"):
                t.verdict = "FAIL"
    return timings


# -- profiling --------------------------------------------------------------------------


def profile(
    gateway: Process,
    port: int,
    load: LoadGenerator,
    call: Call,
    conns: int,
    seconds: int,
    out: Path,
) -> list[str]:
    """py-spy samples the gateway under load; returns the hottest functions (by own time)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists() and not shutil.which("py-spy"):
        return ["py-spy not installed (.venv/bin/pip install py-spy)"]
    raw = out.with_suffix(".txt")
    spy = subprocess.Popen(
        [
            pyspy,
            "record",
            "--pid",
            str(gateway.pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            "--function",  # one line per function, not per source line
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        load.run(port, call, conns, seconds)
        _, err = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        return [f"py-spy failed: {err.strip()[-300:]}"]
    return hot_spots(raw)


def hot_spots(raw: Path, top: int = 15) -> list[str]:
    """Own-time and total-time leaders from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    if not samples:
        return ["no samples"]
    lines = [f"{samples} samples; own time:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    lines.append("total time (function and what it calls):")
    for frame, count in sorted(total.items(), key=lambda kv: -kv[1])[: top + 10]:
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    lines.append("our code (gateway/, bench/bare_proxy.py), total time:")
    ours = [
        kv
        for kv in total.items()
        if ("(gateway/" in kv[0] or "bare_proxy.py" in kv[0])
        and not kv[0].startswith(("<module>", "main ", "cmd_serve "))
    ]
    for frame, count in sorted(ours, key=lambda kv: -kv[1])[: top + 10]:
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    return lines


# -- report -----------------------------------------------------------------------------


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """A number for the table, or a dash."""
    return "—" if value is None else format(value, spec) + suffix


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), line]
    for row in rows:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def report(
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    filled: Fill | None,
    rss_row: tuple[str, str, str] | None,
    pages: Sequence[PageTiming],
    profiles: dict[str, list[str]],
) -> str:
    """The whole report as text."""
    out = [
        "Cosigner benchmark",
        f"  command:  {meta['command']}",
        f"  commit:   {meta['commit']}",
        f"  machine:  {meta['machine']}",
        f"  software: {meta['software']}",
        f"  method:   {meta['method']}",
        "",
        "Throughput and latency (medians over rounds; ratio and added p50 are medians of"
        " per-round pairs)",
    ]
    rows = []
    for s in scenarios:
        rps = {side: s.median(side, lambda r: r.rps) for side in ("upstream", "bare", "cosigner")}
        p50 = {side: s.median(side, lambda r: r.p50_ms) for side in ("bare", "cosigner")}
        rows.append(
            [
                s.name,
                fmt(rps["upstream"], ",.0f"),
                fmt(rps["bare"], ",.0f"),
                fmt(rps["cosigner"], ",.0f"),
                fmt(s.ratio(), ".2f", "x"),
                fmt(p50["bare"], ".2f"),
                fmt(p50["cosigner"], ".2f"),
                fmt(s.added_p50(), "+.2f"),
                s.target or "—",
                (s.verdict or "—") + (f" ({s.note})" if s.note else ""),
            ]
        )
    out.append(
        render_table(
            [
                "scenario",
                "nginx req/s",
                "bare req/s",
                "cosigner req/s",
                "ratio",
                "bare p50 ms",
                "cos p50 ms",
                "added p50 ms",
                "target",
                "result",
            ],
            rows,
        )
    )
    if filled is not None:
        out += ["", "Memory: gateway RSS while holding actions over HTTP (32 connections)"]
        mem_rows = [
            [f"{m.actions:,}", f"{m.rss_kib / 1024:.1f}", f"{m.hwm_kib / 1024:.1f}"]
            for m in filled.samples
        ]
        out.append(render_table(["held actions", "RSS MiB", "peak RSS MiB"], mem_rows))
        seeded = f"; {filled.seeded:,} more copied in by SQL for the page timings"
        out.append(
            f"  held {filled.held_over_http:,} actions over HTTP in {filled.seconds:.0f} s"
            f" ({filled.rate:,.0f}/s sustained, {filled.errors} failed requests)"
            + (seeded if filled.seeded else "")
        )
        if rss_row:
            out.append(f"  {rss_row[0]}   target: {rss_row[1]}   {rss_row[2]}")
    if pages:
        count = meta.get("store_actions", 0)
        out += ["", f"Pages with {count:,} actions in the store (sequential requests)"]
        page_rows = [
            [
                p.name,
                str(p.requests or "—"),
                fmt(p.p50_ms, ".1f"),
                fmt(p.p95_ms, ".1f"),
                fmt(p.p99_ms, ".1f"),
                p.target or "—",
                " ".join(x for x in (p.verdict, f"({p.note})" if p.note else "") if x) or "—",
            ]
            for p in pages
        ]
        out.append(
            render_table(
                ["request", "n", "p50 ms", "p95 ms", "p99 ms", "target", "result"], page_rows
            )
        )
    for name, lines in profiles.items():
        out += ["", f"Profile: {name}", *lines]
    verdicts = [s.verdict for s in scenarios if s.verdict]
    verdicts += [p.verdict for p in pages if p.verdict]
    if rss_row:
        verdicts.append(rss_row[2])
    passed = sum(v.startswith("PASS") for v in verdicts)
    out += ["", f"Targets: {passed} of {len(verdicts)} PASS"]
    return "\n".join(out)


def git_commit() -> str:
    """The checkout's commit, marked when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (" (uncommitted changes)" if dirty else "")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=21, help="measured rounds per side")
    p.add_argument(
        "--upstream-rounds", type=int, default=1, help="rounds of nginx alone (the ceiling)"
    )
    p.add_argument("--duration", type=int, default=1, help="seconds per measured run")
    p.add_argument(
        "--warmup", type=int, default=1, help="unmeasured seconds before each side's first run"
    )
    p.add_argument("--actions", type=int, default=100_000, help="held actions for memory/pages")
    p.add_argument("--fill-connections", type=int, default=32)
    p.add_argument(
        "--fill-budget",
        type=float,
        default=0,
        help="max seconds to hold --actions over HTTP (0: what --time-budget leaves)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=570,
        help="seconds the whole run aims for; the HTTP fill gets what is left (at least 60)",
    )
    p.add_argument("--page-requests", type=int, default=200, help="requests per page timing")
    p.add_argument("--no-info", action="store_true", help="skip the log-level INFO run")
    p.add_argument("--skip-throughput", action="store_true", help="only memory and pages")
    p.add_argument("--skip-fill", action="store_true", help="only throughput")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument(
        "--pin",
        action="store_true",
        help="proxies on CPU 1, nginx and the load generator on CPU 0",
    )
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for Cosigner (e.g. COSIGNER_FORWARD_TIMEOUT=10)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, py-spy samples Cosigner under GET and held-POST load",
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, dbs)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round of 2 s, 20,000 actions, 50 page requests",
    )
    # --quick changes the defaults only: options given explicitly still win.
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(
            rounds=1, duration=2, warmup=1, actions=20_000, page_requests=50, no_info=True
        )
    return p.parse_args(argv)


def checkpoints_for(total: int) -> list[int]:
    """10 % (the 10,000 of the target), then quarters up to the total."""
    marks = {max(1, total // 10), total // 4, total // 2, 3 * total // 4, total}
    return sorted(m for m in marks if m > 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; print the report; 0 unless --strict and a target failed."""
    args = parse_args(argv)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # Even when started with SIGINT ignored (a background job), Ctrl-C must clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.platform != "linux":
        raise SystemExit("bench: Linux only (reads /proc for memory)")
    extra = dict(item.split("=", 1) for item in args.gateway_env)
    ensure_tools(install=not args.no_install)
    proxy_cpus = {1} if args.pin and (os.cpu_count() or 1) > 1 else None
    driver_cpus = {0} if proxy_cpus else None

    workdir = Path(tempfile.mkdtemp(prefix="cosigner-bench-"))
    workdir.chmod(0o711)
    load = LoadGenerator(workdir, kind=args.loadgen, threads=args.threads, cpus=driver_cpus)
    scenarios: list[Scenario] = []
    filled: Fill | None = None
    rss_row: tuple[str, str, str] | None = None
    pages: list[PageTiming] = []
    profiles: dict[str, list[str]] = {}
    store_actions = 0
    loop = "asyncio"
    ok = interrupted = False
    try:
        with Processes() as procs:
            say(f"workdir {workdir}; load generator: {load.describe()}")
            upstream_port = start_nginx(procs, workdir, driver_cpus)
            say(f"nginx on 127.0.0.1:{upstream_port}")
            if not args.skip_throughput:
                gateway, gateway_port, _ = start_gateway(
                    procs, workdir, "cosigner", upstream_port, "WARNING", extra, proxy_cpus
                )
                loop = "uvloop" if gateway.maps_mention("uvloop") else "asyncio"
                bare, bare_port = start_bare(procs, workdir, upstream_port, loop, proxy_cpus)
                say(f"cosigner on :{gateway_port}, bare proxy on :{bare_port} ({loop})")
                stack = Stack(upstream_port, bare_port, gateway_port, gateway, bare, loop)
                preflight(stack)
                ports = {"upstream": upstream_port, "bare": bare_port, "cosigner": gateway_port}
                three = ("upstream", "bare", "cosigner")
                scenarios = [
                    Scenario("GET passthrough @1", GET, 1, three),
                    Scenario("GET passthrough @32", GET, 32, three),
                    Scenario("allowed POST + receipt @1", ALLOWED, 1, three),
                    Scenario("allowed POST + receipt @32", ALLOWED, 32, three),
                    Scenario("held POST (202) @32", HELD, 32, ("cosigner",)),
                ]
                for scenario in scenarios:
                    measure(
                        scenario,
                        ports,
                        load,
                        args.rounds,
                        args.upstream_rounds,
                        args.duration,
                        args.warmup,
                    )
                if args.profile:
                    for n, (label, proc, port, call) in enumerate(
                        (
                            ("cosigner, GET passthrough @32", gateway, gateway_port, GET),
                            ("bare proxy, GET passthrough @32", bare, bare_port, GET),
                            ("cosigner, allowed POST @32", gateway, gateway_port, ALLOWED),
                            ("cosigner, held POST @32", gateway, gateway_port, HELD),
                        )
                    ):
                        say(f"profiling {label}")
                        seconds = max(args.duration, 5)
                        out = workdir / f"profile{n}"
                        profiles[label] = profile(proc, port, load, call, 32, seconds, out)
                procs.stop(gateway)
                if not args.no_info:
                    info, info_port, _ = start_gateway(
                        procs, workdir, "cosigner-info", upstream_port, "INFO", extra, proxy_cpus
                    )
                    extra_row = Scenario(
                        "GET passthrough @32, log INFO", GET, 32, ("bare", "cosigner")
                    )
                    measure(
                        extra_row,
                        {"bare": bare_port, "cosigner": info_port},
                        load,
                        args.rounds,
                        0,
                        args.duration,
                        args.warmup,
                    )
                    scenarios.append(extra_row)
                    procs.stop(info)
                procs.stop(bare)
                for scenario in scenarios:
                    judge(scenario)
            if not args.skip_fill:
                gateway, gateway_port, db = start_gateway(
                    procs, workdir, "cosigner-fill", upstream_port, "WARNING", extra, proxy_cpus
                )
                budget = args.fill_budget or max(
                    60.0, args.time_budget - (time.monotonic() - STARTED) - PAGES_RESERVE
                )
                say(f"holding {args.actions:,} actions over HTTP (budget {budget:.0f} s)")
                counter = ActionCounter(db)
                try:
                    filled = fill(
                        gateway,
                        gateway_port,
                        counter,
                        load,
                        checkpoints_for(args.actions),
                        args.fill_connections,
                        budget,
                    )
                    rss_row = memory_verdict(filled, args.actions)
                    if counter.count() < args.actions:
                        filled.seeded = seed(db, args.actions)
                        say(f"out of fill time: copied {filled.seeded:,} actions in by SQL")
                    store_actions = counter.count()
                    say(f"timing pages with {store_actions:,} actions in the store")
                    pages = page_timings(gateway_port, counter, args.page_requests)
                finally:
                    counter.close()
            ok = True
    except KeyboardInterrupt:
        say("interrupted: every process stopped")
        interrupted = True
        return 130
    except StartError as exc:
        say(f"a process did not start: {exc}")
        return 2
    except RuntimeError as exc:
        say(f"bench failed: {exc}")
        return 2
    finally:
        if args.keep or not (ok or interrupted):  # logs help when something broke
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    meta = {
        "command": "bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs,"
        f" load average at start {os.getloadavg()[0]:.2f}",
        "software": f"Python {platform.python_version()}, aiohttp {aiohttp_version()},"
        f" {version_of([which('nginx') or 'nginx', '-v'])}, {load.describe()}, event loop {loop}",
        "method": f"{args.rounds} rounds x {args.duration} s per side ({args.warmup} s warm-up"
        f" before a side's first), sides alternating; {'pinned' if args.pin else 'unpinned'}",
        "store_actions": store_actions,
    }
    text = report(meta, scenarios, filled, rss_row, pages, profiles)
    print(text, flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "meta": meta,
                    "scenarios": [
                        {
                            "name": s.name,
                            "connections": s.connections,
                            "runs": {k: [asdict(r) for r in v] for k, v in s.results.items()},
                            "ratio": s.ratio(),
                            "added_p50_ms": s.added_p50(),
                            "target": s.target,
                            "verdict": s.verdict,
                        }
                        for s in scenarios
                    ],
                    "fill": asdict(filled) if filled else None,
                    "rss": rss_row,
                    "pages": [asdict(p) for p in pages],
                },
                indent=2,
            )
        )
    verdicts = [s.verdict for s in scenarios] + [p.verdict for p in pages]
    verdicts.append(rss_row[2] if rss_row else "")
    failed = any(v.startswith("FAIL") for v in verdicts)
    return 1 if args.strict and failed else 0


def memory_verdict(filled: Fill, total: int) -> tuple[str, str, str] | None:
    """RSS at the last checkpoint over RSS at the first (10 %): within the band, or FAIL."""
    if len(filled.samples) < 2:
        return None
    first, last = filled.samples[0], filled.samples[-1]
    ratio = last.rss_kib / first.rss_kib if first.rss_kib else 0.0
    text = (
        f"RSS {last.rss_kib / 1024:.1f} MiB at {last.actions:,} vs {first.rss_kib / 1024:.1f} MiB"
        f" at {first.actions:,}: {ratio:.2f}x"
    )
    ok = abs(ratio - 1) <= RSS_BAND and last.actions >= total
    why = "" if last.actions >= total else f" (only {last.actions:,} held in the time budget)"
    return text, f"within ±{RSS_BAND:.0%}", verdict(ok) + why


def aiohttp_version() -> str:
    """The installed aiohttp's version."""
    try:
        import aiohttp

        return aiohttp.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
