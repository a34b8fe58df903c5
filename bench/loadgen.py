"""A small closed-loop HTTP/1.1 load generator: the stand-in when wrk is not installed.

Each connection sends one pre-built keep-alive request, reads the whole answer
and sends the next, like wrk. Several processes share the connections so the
client is less of a bottleneck; it is still slower than wrk, so absolute figures
are lower, but both proxies are measured with the same client. Prints one line
``BENCH_RESULT {json}``; stops early, still printing, on SIGINT.

    python bench/loadgen.py --url http://127.0.0.1:9000/v1/charges/ch_1 -c 32 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import time
from collections import Counter
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

RESERVOIR = 200_000  # latencies kept per process for percentiles


def build_request(
    method: str, host: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    """The raw bytes of one keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _connection(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    stop: asyncio.Event,
    latencies: list[float],
    statuses: Counter[int],
    errors: Counter[str],
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        errors["connect"] += 1
        return
    try:
        while not stop.is_set() and time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            try:
                status = await asyncio.wait_for(_read_response(reader), 10)
            except TimeoutError:
                errors["timeout"] += 1
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                errors["read"] += 1
                break
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1
    finally:
        writer.close()


async def _run(
    host: str, port: int, request: bytes, connections: int, duration: float
) -> tuple[list[float], Counter[int], Counter[str], float]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(
            _connection(host, port, request, deadline, stop, latencies, statuses, errors)
            for _ in range(connections)
        )
    )
    return latencies, statuses, errors, time.perf_counter() - started


def _child(
    out: Connection, host: str, port: int, request: bytes, connections: int, duration: float
) -> None:
    latencies, statuses, errors, elapsed = asyncio.run(
        _run(host, port, request, connections, duration)
    )
    count = len(latencies)
    if count > RESERVOIR:  # an even sample keeps the percentiles honest
        latencies = latencies[:: count // RESERVOIR + 1]
    out.send((count, latencies, dict(statuses), dict(errors), elapsed))
    out.close()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def main() -> None:
    """Run, then print BENCH_RESULT like the wrk script does."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("-X", "--method", default="GET")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--body", default="", help="request body (latin-1 text)")
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("-p", "--processes", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = [tuple(h.split(":", 1)) for h in args.header]
    request = build_request(
        args.method,
        f"{host}:{port}",
        path,
        [(k.strip(), v.strip()) for k, v in headers],
        args.body.encode("latin-1"),
    )
    procs = max(1, min(args.processes, args.connections))
    shares = [args.connections // procs + (i < args.connections % procs) for i in range(procs)]
    signal.signal(signal.SIGINT, lambda *_: None)  # children stop themselves and report
    pipes, children = [], []
    for share in shares:
        parent, child = multiprocessing.Pipe(duplex=False)
        proc = multiprocessing.Process(
            target=_child, args=(child, host, port, request, share, args.duration)
        )
        proc.start()
        pipes.append(parent)
        children.append(proc)
    total = 0
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    elapsed = 0.0
    for pipe, proc in zip(pipes, children, strict=True):
        count, lat, st, err, secs = pipe.recv()
        proc.join()
        total += count
        latencies += lat
        statuses.update(st)
        errors.update(err)
        elapsed = max(elapsed, secs)
    latencies.sort()
    bad = sum(n for code, n in statuses.items() if code >= 400)
    us = 1_000_000
    result = {
        "requests": total,
        "duration_us": int(elapsed * us),
        "connect": errors["connect"],
        "read": errors["read"],
        "write": 0,
        "timeout": errors["timeout"],
        "status": bad,
        "p50": percentile(latencies, 50) * us,
        "p90": percentile(latencies, 90) * us,
        "p99": percentile(latencies, 99) * us,
        "max": (latencies[-1] if latencies else 0.0) * us,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
