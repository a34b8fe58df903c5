"""Read a gateway's /metrics the way Prometheus does: with prometheus-client's own parser."""

from __future__ import annotations

import time
from collections.abc import Callable

import requests
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str) -> Samples:
    """Every sample: (name, labels) → value."""
    resp = requests.get(base_url + "/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_metric(
    base_url: str,
    name: str,
    ok: Callable[[float], bool],
    timeout: float = 30,
    **labels: str,
) -> Samples:
    """Scrape until ``ok(value)``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base_url)
        if ok(value(samples, name, **labels)):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {value(samples, name, **labels)}")
        time.sleep(0.1)
