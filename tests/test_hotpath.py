"""The request path made cheap, answering exactly as before: ids, keys, rules, logs, runtime."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import re
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import ids, jsontext, runtime
from gateway.app import create_app
from gateway.canonical import read_request
from gateway.crypto import Keyring
from gateway.errors import InvalidRequest, MethodNotAllowed
from gateway.forwarder import response_headers
from gateway.logs import JsonFormatter, TextFormatter
from gateway.rules import RuleRequest, RuleSet, parse_rules
from tests.support.gateway import SECRET_KEY, GatewayProcess, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY, free_port

ROOT = Path(__file__).resolve().parent.parent
CORE_RULES = ROOT / "tests" / "data" / "rules_core"

# --- ids --------------------------------------------------------------------------------


def test_request_ids_are_url_safe_do_not_repeat_and_sort_by_time() -> None:
    made = [ids.request_id() for _ in range(20_000)]  # several refills of the buffer
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"req_[A-Za-z0-9_-]{20}", rid) for rid in made)
    time.sleep(0.002)
    later = ids.request_id()
    assert all(rid < later for rid in made)
    # The random part (after the 8 characters of time) uses the whole alphabet.
    assert len(set("".join(rid[12:] for rid in made))) == 64


@pytest.mark.parametrize(
    "ms",
    [0, 4095, 4096, 1_763_760_001_023, 1_763_760_001_024, 2**47 - 1],
)
def test_a_request_ids_stamp_is_the_time_in_ms_encoded_whole(
    ms: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stamp is put together from its high 36 bits (kept for 4,096 ms) and a looked-up
    # pair for the low 12: the same 8 characters as encoding all 48 bits at once.
    monkeypatch.setattr(ids.time, "time_ns", lambda: ms * 1_000_000 + 999_999)
    whole = ids._encode(ms.to_bytes(6, "big"))
    assert ids.request_id()[:12] == "req_" + whole
    monkeypatch.setattr(ids.time, "time_ns", lambda: (ms + 1) * 1_000_000)
    if ms + 1 < 2**48:
        assert ids.request_id()[:12] == "req_" + ids._encode((ms + 1).to_bytes(6, "big"))
        assert whole < ids.request_id()[4:12]


def test_action_ids_keep_their_shape_and_sort_by_time() -> None:
    made = [ids.sortable_id("act_") for _ in range(2_000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"act_[A-Za-z0-9]{16}", aid) for aid in made)
    time.sleep(0.002)
    later = ids.sortable_id("act_")
    assert all(aid < later for aid in made)
    # The first 7 characters are the time in ms, in base 62 (digits, upper, lower case).
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    stamp = 0
    for char in later[4:11]:
        stamp = stamp * 62 + digits.index(char)
    assert abs(stamp - time.time() * 1000) < 5_000


def test_object_ids_use_every_character_evenly() -> None:
    made = [ids.new_id("act_") for _ in range(20_000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"act_[A-Za-z0-9]{16}", aid) for aid in made)
    counts = Counter("".join(aid[4:] for aid in made))
    assert len(counts) == 62
    # 320,000 characters, 5,161 expected each (give or take 72): mapping all 256 byte values
    # with b % 62 would give the first 8 characters 6,250 each and the others 5,000.
    assert max(counts.values()) - min(counts.values()) < 700
    assert ids.new_id("x_", 40)[2:].isalnum() and len(ids.new_id("x_", 40)) == 42


def _child_ids(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([ids.request_id() for _ in range(5)])


def test_a_forked_child_never_hands_out_the_parents_bytes() -> None:
    ids.request_id()  # the parent's buffer is filled: a fork copies it
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_child_ids, args=(queue,))
    child.start()
    try:
        theirs = queue.get(timeout=30)
    finally:
        child.join(timeout=30)
    ours = [ids.request_id() for _ in range(5)]
    assert not set(ours) & set(theirs)


# --- keys -------------------------------------------------------------------------------


def test_cached_purpose_keys_seal_open_and_rotate_as_before() -> None:
    old, new = b"o" * 32, b"n" * 32
    before = Keyring(old)
    sealed = before.seal("held-credential", b"sk_test_1", b"act_1")
    mac = before.mac("review", b"payload")
    for _ in range(2):  # the second time from the cached keys
        assert before.open("held-credential", sealed, b"act_1") == b"sk_test_1"
        assert before.mac("review", b"payload") == mac
    rotated = Keyring(new, [old])
    assert rotated.open("held-credential", sealed, b"act_1") == b"sk_test_1"
    assert rotated.verify_mac("review", b"payload", mac)
    assert rotated.mac("review", b"payload") != mac
    assert rotated.key("review") != before.key("review") != before.key("other")
    with pytest.raises(ValueError):
        rotated.open("held-credential", sealed, b"act_2")  # bound to its row
    with pytest.raises(ValueError):
        Keyring(new).open("held-credential", sealed, b"act_1")


# --- rules ------------------------------------------------------------------------------

RULES = textwrap.dedent(
    """
    version: 1
    defaults: {read: allow, write: hold}
    rules:
      - name: refunds-small
        match: {method: POST, path: /v1/refunds}
        when: {amount: {lte: 100}}
        action: allow
      - name: no-deletes
        match: {method: [DELETE, HEAD], path: /v1/**}
        action: deny
      - name: any-method-secret
        match: {path: /v1/secret/**}
        action: deny
    """
)


@pytest.mark.parametrize(
    ("method", "path", "params", "rule"),
    [
        ("GET", "/v1/charges/ch_1", {}, "defaults.read"),
        ("get", "/v1/charges/ch_1", {}, "defaults.read"),
        ("HEAD", "/v1/charges/ch_1", {}, "no-deletes"),
        ("GET", "/v1/secret/x", {}, "any-method-secret"),
        ("POST", "/v1/refunds", {"amount": "50"}, "refunds-small"),
        ("post", "/v1/refunds", {"amount": "500"}, "defaults.write"),
        ("DELETE", "/v1/customers/cus_1", {}, "no-deletes"),
        ("PATCH", "/v1/secret/x", {}, "any-method-secret"),
        ("PATCH", "/v1/refunds", {"amount": "50"}, "defaults.write"),
    ],
)
def test_rules_indexed_by_method_decide_what_every_rule_in_order_decides(
    method: str, path: str, params: dict[str, Any], rule: str
) -> None:
    ruleset = parse_rules({"10-test.yaml": RULES})
    req = RuleRequest(method, path, params)
    decision = ruleset.decide(req)
    assert decision.rule == rule
    # explain() walks every rule in order with no index: the same decision, reason and all.
    assert ruleset.explain(req).decision == decision
    assert ruleset.decide(req) == decision  # the cached default is the same answer again


def test_an_empty_rule_set_still_has_its_defaults() -> None:
    assert RuleSet().decide(RuleRequest("GET", "/v1/x", {})).action == "allow"
    assert RuleSet().decide(RuleRequest("DELETE", "/v1/x", {})).action == "hold"
    assert RuleSet() == RuleSet()


# --- canonical reading --------------------------------------------------------------------


def test_a_plain_read_is_read_as_before() -> None:
    req = read_request("GET", "/v1/charges/ch_1/", None, b"")
    assert (req.method, req.path, req.query, req.params, req.body) == (
        "GET",
        "/v1/charges/ch_1",
        "",
        {},
        b"",
    )
    assert read_request("get", "/v1/charges", None, b"").method == "GET"
    with pytest.raises(MethodNotAllowed):
        read_request("PATCH", "/v1/charges", None, b"")
    with pytest.raises(InvalidRequest):
        read_request("G T", "/v1/charges", None, b"")


def test_parameters_in_one_place_are_read_whole() -> None:
    form = "application/x-www-form-urlencoded"
    post = read_request("POST", "/v1/refunds", form, b"charge=ch_1&metadata[k]=v")
    assert post.params == {"charge": "ch_1", "metadata": {"k": "v"}}
    get = read_request("GET", "/v1/charges?limit=3&expand[]=data.customer", None, b"")
    assert get.params == {"limit": "3", "expand": ["data.customer"]}


# --- upstream headers -------------------------------------------------------------------


def test_a_cookie_stripe_sets_is_never_sent_back(tmp_path: Path) -> None:
    """Stripe's Set-Cookie for one agent's call must not ride along with the next call."""
    cookies: list[str | None] = []

    async def stripe(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("Cookie"))
        return web.json_response(
            {"id": "ch_1", "object": "charge"}, headers={"Set-Cookie": "session=first; Path=/"}
        )

    upstream = web.Application()
    upstream.router.add_get("/v1/charges/ch_1", stripe)
    runner = web.AppRunner(upstream, access_log=None)
    port = free_port()
    # By name: aiohttp's default jar keeps no cookies from IP addresses, Stripe has a name.
    settings = settings_for(tmp_path, f"http://localhost:{port}", CORE_RULES)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    with gateway_thread(settings) as gw:
        gw.call(start())
        try:
            for key in (TEST_STRIPE_KEY, TEST_STRIPE_KEY[:-4] + "0000"):
                resp = requests.get(
                    gw.url + "/v1/charges/ch_1",
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=30,
                )
                assert resp.status_code == 200
                assert resp.headers["Set-Cookie"] == "session=first; Path=/"  # passed on as is
        finally:
            gw.call(runner.cleanup())
    assert cookies == [None, None]


def test_hop_by_hop_headers_go_in_any_case_and_the_rest_stay_in_order() -> None:
    upstream = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Server", "nginx"),
                ("content-type", "application/json"),
                ("CONTENT-LENGTH", "10"),
                ("Set-Cookie", "a=1"),
                ("Transfer-Encoding", "chunked"),
                ("Set-Cookie", "b=2"),
                ("connection", "keep-alive"),
                ("Request-Id", "req_1"),
                ("Keep-Alive", "timeout=5"),
                ("Date", "today"),
            ]
        )
    )
    out = response_headers(upstream)
    assert list(out.items()) == [
        ("content-type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Request-Id", "req_1"),
    ]


# --- every route answers the gateway's way -----------------------------------------------


async def test_every_route_answers_with_a_request_id_and_no_middleware_runs(
    tmp_path: Path, fake_stripe: str
) -> None:
    # Each route's handler is wrapped where it is registered (create_app): no middleware,
    # whose two extra coroutine layers every proxied request would pay for.
    app = create_app(settings_for(tmp_path, fake_stripe, CORE_RULES))
    assert not app.middlewares
    filled = {"id": "act_missing", "token": "not-a-token", "name": "nope.css", "tail": "x"}
    server = TestServer(app)
    await server.start_server()
    seen = []
    try:
        async with aiohttp.ClientSession() as client:
            for route in app.router.routes():
                info = route.resource.get_info() if route.resource is not None else {}
                path = info.get("path") or info["formatter"].format(**filled)
                method = "GET" if route.method == "*" else route.method
                async with client.request(method, server.make_url(path)) as resp:
                    await resp.read()
                    seen.append((method, path, resp.status))
                    assert resp.headers["Cosigner-Request-Id"].startswith("req_"), seen[-1]
                    if (
                        method != "HEAD"
                        and resp.status >= 400
                        and resp.content_type.endswith("json")
                    ):
                        assert set((await resp.json())["error"]) >= {"type", "code", "message"}
    finally:
        await server.close()
    assert len(seen) == len(app.router.routes()) > 20


# --- the access line ----------------------------------------------------------------------


def _record(**extra: Any) -> logging.LogRecord:
    return logging.getLogger("cosigner.access").makeRecord(
        "cosigner.access", logging.INFO, __file__, 1, "request", (), None, extra=extra
    )


def test_the_access_line_reads_as_the_format_string_would_write_it() -> None:
    fields = {"request_id": "req_1", "agent": "ops team", "status": 200, "upstream_status": None}
    record = _record(fields=fields)
    line = TextFormatter().format(record)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s").format(record)
    assert line == f'{plain} request_id=req_1 agent="ops team" status=200 upstream_status=-'
    # Records without fields, or with arguments, go the general way.
    # (One record for both, so the two lines cannot straddle a millisecond.)
    bare = _record()
    assert TextFormatter().format(bare) == logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"
    ).format(bare)


def test_compact_json_is_what_json_dumps_writes_with_compact_separators() -> None:
    for value in (
        {"a": [1, 2.5, None, True], "é": "ü\u2028", "nested": {"x": {}}},
        [],
        "text",
        {"amount": 10**30},
    ):
        assert jsontext.compact(value) == json.dumps(value, separators=(",", ":"))


def test_timestamps_follow_the_clock_across_seconds() -> None:
    text, json_ = TextFormatter(), JsonFormatter()
    for created in (1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.5, 1_699_999_999.0):
        record = _record(fields={"status": 200})
        record.created, record.msecs = created, (created % 1) * 1000
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
        assert text.format(record).startswith(f"{stamp},{int(record.msecs):03d} INFO ")
        utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        assert f'"ts": "{utc}.{int(record.msecs):03d}Z"' in json_.format(record)


# --- how cosigner serve runs ----------------------------------------------------------------


@pytest.fixture
def interpreter() -> Iterator[None]:
    """The collector and the switch interval as the test found them, afterwards."""
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)


async def test_startup_freezes_what_it_made_and_shortens_the_switch_interval(
    interpreter: None,
) -> None:
    kept = [object() for _ in range(10)]
    assert sys.getswitchinterval() == pytest.approx(0.005)  # CPython's default, until then
    await runtime.settle_runtime(web.Application())
    assert gc.get_freeze_count() > len(kept)
    assert gc.get_threshold()[0] == runtime.YOUNG_THRESHOLD
    assert sys.getswitchinterval() == pytest.approx(runtime.SWITCH_INTERVAL)


def test_the_event_loop_is_uvloop_when_installed_unless_asked_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("uvloop")
    for choice, module in (("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")):
        loop = runtime.new_event_loop(choice)  # type: ignore[arg-type]
        try:
            assert type(loop).__module__.partition(".")[0] == module
        finally:
            loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    loop = runtime.new_event_loop("auto")
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()
    with pytest.raises(SystemExit, match="uvloop is not installed"):
        runtime.new_event_loop("uvloop")


@pytest.mark.slow
def test_serve_runs_on_uvloop_with_a_frozen_collector_and_a_short_switch_interval(
    tmp_path: Path,
) -> None:
    """``cosigner serve`` itself, as a process: what it loaded and what it says at startup."""
    pytest.importorskip("uvloop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGNER_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "COSIGNER_LISTEN": f"127.0.0.1:{free_port()}",
            "COSIGNER_UPSTREAM": f"http://127.0.0.1:{free_port()}",
            "COSIGNER_RULES": str(ROOT / "tests" / "data" / "rules_core"),
            "COSIGNER_DATABASE": f"sqlite:///{tmp_path / 'gw.db'}",
            "COSIGNER_SECRET_KEY": SECRET_KEY,
            "COSIGNER_LOG_LEVEL": "DEBUG",
        }
    )
    with GatewayProcess(env, tmp_path) as gw:
        assert gw.proc is not None
        maps = Path(f"/proc/{gw.proc.pid}/maps")
        if maps.exists():
            assert "uvloop" in maps.read_text()
        assert gw.terminate() == 0
    startup = re.search(
        r"event loop (\w+); switch interval ([\d.]+) ms; (\d+) startup objects frozen",
        gw.log.read_text(),
    )
    assert startup is not None, gw.log.read_text()[-2000:]
    assert startup.group(1) == "uvloop" and int(startup.group(3)) > 10_000
    assert float(startup.group(2)) == runtime.SWITCH_INTERVAL * 1000
