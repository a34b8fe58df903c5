"""The benchmark's own pieces (no load, no timing): its rules, its baseline proxy, its parsing."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from gateway.canonical import read_request
from gateway.rules import RuleRequest, check_rules, load_rules

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _module(name: str) -> ModuleType:
    """Load bench/<name>.py the way `python bench/run.py` sees it (bench/ on sys.path)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return _module("run")


def test_bench_rules_are_valid() -> None:
    assert check_rules(BENCH / "rules") == []


@pytest.mark.parametrize(
    ("call", "action", "rule"),
    [
        ("GET", "allow", None),
        ("ALLOWED", "allow", "bench-allowed-refunds"),
        ("HELD", "hold", "bench-held-refunds"),
    ],
)
def test_each_scenario_takes_the_path_it_measures(
    run: ModuleType, call: str, action: str, rule: str | None
) -> None:
    c = getattr(run, call)
    content_type = c.headers.get("Content-Type") if c.body else None
    req = read_request(c.method, c.path, content_type, c.body.encode())
    decision = load_rules(BENCH / "rules").decide(
        RuleRequest(method=req.method, path=req.path, params=req.params, agent="bench")
    )
    assert decision.action == action
    if rule is not None:
        assert decision.rule == rule


async def test_bare_proxy_forwards_request_and_answer(
    aiohttp_server: Any, aiohttp_client: Any
) -> None:
    bare = _module("bare_proxy")
    seen: list[dict[str, object]] = []

    async def upstream_handler(request: web.Request) -> web.Response:
        seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "body": (await request.read()).decode(),
                "authorization": request.headers.get("Authorization"),
                "proxy_authorization": request.headers.get("Proxy-Authorization"),
            }
        )
        return web.Response(
            status=201,
            text='{"id":"re_1"}',
            content_type="application/json",
            headers={"Request-Id": "req_up", "Connection": "keep-alive"},
        )

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", upstream_handler)
    upstream = await aiohttp_server(upstream_app)
    client = await aiohttp_client(bare.build_app(str(upstream.make_url("")).rstrip("/")))

    resp = await client.post(
        "/v1/refunds?expand%5B%5D=charge",
        data="charge=ch_1&amount=100",
        headers={
            "Authorization": "Bearer sk_test_x",
            "Proxy-Authorization": "Basic secret",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )

    assert resp.status == 201
    assert json.loads(await resp.text()) == {"id": "re_1"}
    assert resp.headers["Request-Id"] == "req_up"
    assert seen == [
        {
            "method": "POST",
            "path_qs": "/v1/refunds?expand%5B%5D=charge",
            "body": "charge=ch_1&amount=100",
            "authorization": "Bearer sk_test_x",
            "proxy_authorization": None,  # hop-by-hop: not forwarded
        }
    ]


class _Recorder:
    """A load generator that records (port, seconds) of each run and answers 100 req/s."""

    def __init__(self) -> None:
        self.ran: list[tuple[int, int]] = []

    def run(self, port: int, call: Any, connections: int, seconds: int) -> Any:
        self.ran.append((port, seconds))
        return _module("load").Result(100 * seconds, seconds, 1.0, 1.0, 1.0, 1.0, 0)


def _measured(run: ModuleType, rounds: int, duration: int, warmup: int) -> tuple[Any, _Recorder]:
    scenario = run.Scenario("GET @32", run.GET, 32, ("upstream", "bare", "cosigner"))
    load = _Recorder()
    run.measure(
        scenario, {"upstream": 1, "bare": 2, "cosigner": 3}, load, rounds, 1, duration, warmup
    )
    return scenario, load


def test_rounds_alternate_the_sides_and_reverse_them_every_other_round(run: ModuleType) -> None:
    scenario, load = _measured(run, rounds=4, duration=3, warmup=0)
    # nginx alone once; then the pairs, each adjacent, in turn A B, B A, A B, B A.
    assert [port for port, _ in load.ran] == [1, 2, 3, 3, 2, 2, 3, 3, 2]
    assert len(scenario.results["bare"]) == len(scenario.results["cosigner"]) == 4
    assert scenario.ratio() == 1.0


def test_each_side_warms_up_once_before_its_first_round(run: ModuleType) -> None:
    scenario, load = _measured(run, rounds=3, duration=2, warmup=5)
    # A warm-up (5 s) before each side's first measured run (2 s), none after.
    assert load.ran == [
        (1, 5),
        (1, 2),
        (2, 5),
        (2, 2),
        (3, 5),
        (3, 2),
        (3, 2),
        (2, 2),
        (2, 2),
        (3, 2),
    ]
    assert all(r.seconds == 2 for runs in scenario.results.values() for r in runs)
    assert len(scenario.results["bare"]) == len(scenario.results["cosigner"]) == 3


def test_result_counts_only_successful_answers_as_throughput() -> None:
    load = _module("load")
    line = (
        'BENCH_RESULT {"requests":1000,"duration_us":2000000,"connect":0,"read":1,"write":0,'
        '"status":200,"timeout":0,"p50":250.0,"p90":900.0,"p99":4000.0,"max":9000.0}'
    )
    result = load.Result.parse("Running 2s test\n" + line + "\n")
    assert result.rps == 400.0  # (1000 - 200 answered 4xx/5xx) / 2 s
    assert result.errors == 201
    assert (result.p50_ms, result.p99_ms) == (0.25, 4.0)


def test_lua_strings_survive_any_body() -> None:
    load = _module("load")
    tricky = "a]]b]=]c\"'\\n"
    literal = load._lua_string(tricky)
    level = literal.index("[", 1)  # "[==[" -> opening bracket pair encloses the '=' run
    eq = literal[1:level]
    assert set(eq) <= {"="}
    assert literal == f"[{eq}[{tricky}]{eq}]"
    assert f"]{eq}]" not in tricky


# -- bench/compare.py: versions side by side ---------------------------------------------------


def test_cpu_per_process_and_per_main_thread_come_from_proc() -> None:
    compare = _module("compare")
    pid = os.getpid()
    before, before_main = compare.cpu_seconds(pid), compare.cpu_seconds(pid, main_only=True)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn CPU on this (the main) thread
        pass
    after, after_main = compare.cpu_seconds(pid), compare.cpu_seconds(pid, main_only=True)
    assert after_main - before_main >= 0.2
    assert after >= after_main and after - before >= after_main - before_main - 0.02


def test_revisions_are_checked_out_beside_and_removed_after(tmp_path: Path) -> None:
    compare = _module("compare")
    assert compare.checkout(".", tmp_path / "here") == compare.ROOT  # the working tree itself
    tree = compare.checkout("HEAD", tmp_path / "head")
    assert (tree / "gateway" / "proxy.py").is_file() and tree != compare.ROOT
    compare.remove_worktrees([compare.ROOT, tree])
    assert not tree.exists() and compare.ROOT.is_dir()
    listed = subprocess.run(
        ["git", "-C", str(compare.ROOT), "worktree", "list"], capture_output=True, text=True
    ).stdout
    assert str(tree) not in listed


def test_compare_reports_medians_of_its_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    compare = _module("compare")
    with pytest.raises(SystemExit):
        compare.parse_args(["HEAD", "--scenarios", "get,posts"])
    assert "unknown scenarios: posts" in capsys.readouterr().err
    a = compare.Side("1:HEAD~1", None, 0, {"get": [(100.0, 300.0, 250.0), (300.0, 100.0, 90.0)]})
    b = compare.Side("2:HEAD", None, 0, {"get": [(200.0, 200.0, 150.0)]})
    table = compare.report([a, b], ["get", "held"]).splitlines()
    assert len(table) == 3  # header, then one row per version that ran the scenario
    assert table[1].split()[:5] == ["get", "1:HEAD~1", "200", "200", "170"]
    assert table[2].split()[:5] == ["get", "2:HEAD", "200", "200", "150"]


# -- bench/instructions.py: instructions per request under callgrind ---------------------------


def test_instruction_totals_are_read_per_thread_from_callgrinds_dumps(tmp_path: Path) -> None:
    instructions = _module("instructions")
    dump = "# callgrind format\nversion: 1\npart: 1\nthread: {t}\n\nevents: Ir\nsummary: {n}\n"
    (tmp_path / "cg.out.1-01").write_text(dump.format(t=1, n=5000))
    (tmp_path / "cg.out.1-02").write_text(dump.format(t=2, n=700))
    (tmp_path / "cg.out.2-01").write_text(dump.format(t=1, n=1000))  # a second dump adds up
    (tmp_path / "cg.out.1-03").write_text("garbage")
    assert instructions.thread_totals(tmp_path / "cg.out") == {1: 6000, 2: 700}


def test_the_counting_client_sends_every_request_and_counts_2xx() -> None:
    instructions = _module("instructions")
    load = _module("load")
    seen: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(status=200 if len(seen) % 5 else 404, text="x" * len(seen))

    async def run() -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        call = load.Call("POST", "/v1/refunds", "amount=1", {"Authorization": "Bearer k"})
        try:
            return await instructions._client(port, call, 23, 4)
        finally:
            await runner.cleanup()

    ok = asyncio.run(run())
    assert len(seen) == 23 and set(seen) == {b"amount=1"}
    assert ok == 23 - 4  # every fifth answer was a 404


def test_instructions_report_shows_thousands_and_the_ratio_to_bare() -> None:
    instructions = _module("instructions")
    rows = [
        ("1:HEAD", {"get": (700_000.0, 3_000.0), "held": (2_000_000.0, 90_000.0)}),
        ("bare proxy", {"get": (560_000.0, 0.0)}),
    ]
    table = instructions.report(rows, ["get", "held"]).splitlines()
    assert table[1].split() == ["get", "1:HEAD", "700.0k", "3.0k", "0.80"]
    assert table[2].split() == ["get", "bare", "proxy", "560.0k", "0.0k", "1.00"]
    assert table[3].split() == ["held", "1:HEAD", "2,000.0k", "90.0k", "-"]
