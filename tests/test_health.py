"""/healthz (alive) and /readyz (ready for traffic) are distinct and say what is wrong."""

from __future__ import annotations

from pathlib import Path

import requests

from gateway.keys import SHUTTING_DOWN, STORE
from gateway.web import ops
from tests.support.gateway import gateway_thread, settings_for
from tests.support.peers import free_port
from tests.support.scrape import scrape, value

RULES = Path(__file__).parent / "data" / "rules_core"


def test_both_probes_answer_200_when_all_is_well(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with gateway_thread(settings_for(tmp_path, closed, RULES)) as gw:
        health = requests.get(gw.url + "/healthz", timeout=10)
        ready = requests.get(gw.url + "/readyz", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok", "rules": 5}
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "rules": 5}
        assert health.headers["Cosigner-Request-Id"].startswith("req_")
        # Probes are the gateway's own: never forwarded upstream, even with a tail.
        assert requests.get(gw.url + "/readyz/x", timeout=10).status_code == 404
        assert requests.get(gw.url + "/metrics/x", timeout=10).status_code == 404


def test_shutting_down_is_not_ready_but_still_alive(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with gateway_thread(settings_for(tmp_path, closed, RULES)) as gw:
        assert gw.app is not None
        # aiohttp runs on_shutdown first on SIGTERM; the rest of shutdown is left to stop().
        assert ops.mark_shutting_down in gw.app.on_shutdown
        assert not gw.app[SHUTTING_DOWN].is_set()
        gw.call(ops.mark_shutting_down(gw.app))
        ready = requests.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["problems"] == ["shutting down"]
        assert requests.get(gw.url + "/healthz", timeout=10).status_code == 200


def test_an_unreachable_store_fails_both_probes_and_the_store_metrics(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with gateway_thread(settings_for(tmp_path, closed, RULES)) as gw:
        assert gw.app is not None
        gw.call(gw.app[STORE].close())
        health = requests.get(gw.url + "/healthz", timeout=10)
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unavailable"
        assert len(body["problems"]) == 1 and body["problems"][0].startswith("store unreachable")
        ready = requests.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "store unreachable" in ready.json()["problems"][0]
        samples = scrape(gw.url)  # still 200: process metrics must survive a store outage
        assert value(samples, "cosigner_store_up") == 0
        assert not any(name == "cosigner_actions" for name, _ in samples)
        assert value(samples, "cosigner_rules_loaded") == 5
