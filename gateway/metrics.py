"""Prometheus metrics: counted as things happen, or read from the store at scrape time.

Counters and histograms are updated on the hot path (one dict lookup and one
add). The two that every request touches, requests by decision and upstream
latency, are plain numbers that become metric families at scrape time:
prometheus-client's own Counter and Histogram take a lock and look up their
child on every update, which cost more than the rest of the bookkeeping of a
request. Only the event loop updates them.

What the store already knows — actions by status, outbox depth — is read when
Prometheus scrapes, never kept in step by hand, so every replica reports the
same truth about the shared store.

Each app has its own ``CollectorRegistry`` (not prometheus-client's global
one): tests build many apps in one process, and two apps must never share counts.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from gateway.forwarder import Attempt
from gateway.policy import Policy
from gateway.store.base import STATUSES, OutboxStat

OUTBOX_KINDS = ("mail", "callback")
# Upstream answers are usually tens of milliseconds; retries and timeouts reach seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LE = (*(repr(bound) for bound in LATENCY_BUCKETS), "+Inf")  # as prometheus-client spells them


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """What the store says at scrape time; ``None`` when it could not be read."""

    actions: Mapping[str, int] | None
    outbox: Sequence[OutboxStat] | None


def status_class(status: int) -> str:
    """``2xx``, ``4xx`` ...: few enough label values to keep the series count small."""
    return f"{status // 100}xx"


class Metrics:
    """Every metric the gateway exports, in a registry of its own."""

    def __init__(self, policy: Policy) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        upstream_errors = Counter(
            "cosigner_upstream_errors",
            "Upstream attempts that got no HTTP answer (connection error or timeout).",
            registry=self.registry,
        )
        self._hot = _HotCollector(upstream_errors)
        self.registry.register(self._hot)
        # The hot collector's own methods, so every request makes one call, not two:
        # count one answered request (decision, rule, status); one upstream attempt took
        # ``seconds`` (``answered`` is False without an HTTP answer).
        self.request: Callable[[str, str, int], None] = self._hot.request
        self.upstream: Callable[[float, bool], None] = self._hot.upstream
        self._forward_attempts = Counter(
            "cosigner_forward_attempts",
            "Attempts to forward approved actions, by result: answered (final answer), "
            "retryable (409/429/5xx or Stripe-Should-Retry) or error (no answer).",
            ["result"],
            registry=self.registry,
        )
        self._forwards = Counter(
            "cosigner_forwards",
            "Approved actions whose forward ended, by outcome: completed or failed "
            "(no final answer after every attempt).",
            ["outcome"],
            registry=self.registry,
        )
        for result in ("answered", "retryable", "error"):
            self._forward_attempts.labels(result)
        for outcome in ("completed", "failed"):
            self._forwards.labels(outcome)
        self._state = _StateCollector(policy)
        self.registry.register(self._state)

    def forward_attempt(self, attempt: Attempt) -> None:
        """One attempt to forward an approved action."""
        if attempt.status is None:
            result = "error"
        elif attempt.error is not None:
            result = "retryable"
        else:
            result = "answered"
        self._forward_attempts.labels(result).inc()

    def forward_finished(self, completed: bool) -> None:
        """A forward got Stripe's final answer, or gave up."""
        self._forwards.labels("completed" if completed else "failed").inc()

    def render(self, snapshot: StoreSnapshot, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type (text format, or OpenMetrics if asked)."""
        encoder, content_type = choose_encoder(accept)
        # No await between setting the snapshot and encoding: concurrent scrapes can't mix.
        self._state.snapshot = snapshot
        return encoder(self.registry), content_type


class _HotCollector(Collector):
    """``cosigner_requests`` and ``cosigner_upstream_latency_seconds``, as plain numbers."""

    def __init__(self, upstream_errors: Counter) -> None:
        self._upstream_errors = upstream_errors
        self._created = time.time()
        # (decision, rule, status) -> [count, created]; label values are made at scrape time.
        self._requests: dict[tuple[str, str, int], list[float]] = {}
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self._latency_sum = 0.0

    def request(self, decision: str, rule: str, status: int) -> None:
        key = (decision, rule, status)
        counted = self._requests.get(key)
        if counted is None:  # a count per label set, kept for good, as a Counter would
            counted = self._requests[key] = [0, time.time()]
        counted[0] += 1

    def upstream(self, seconds: float, answered: bool) -> None:
        self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds
        if not answered:
            self._upstream_errors.inc()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "cosigner_requests",
            "Requests answered, by rule decision (none: decided before or without a rule), "
            "rule and HTTP status class.",
            labels=["decision", "rule", "code"],
        )
        totals: dict[tuple[str, str, str], list[float]] = {}
        for (decision, rule, status), (count, created) in list(self._requests.items()):
            labels = (
                "none" if decision == "-" else decision,
                "none" if rule == "-" else rule,
                status_class(status),
            )
            total = totals.setdefault(labels, [0, created])
            total[0] += count
            total[1] = min(total[1], created)
        for labels, (count, created) in totals.items():
            requests.add_metric(list(labels), count, created=created)
        yield requests
        name = "cosigner_upstream_latency_seconds"
        latency = HistogramMetricFamily(
            name, "Time of one upstream attempt (allowed calls and approved forwards)."
        )
        cumulative, buckets = 0, []
        for le, count in zip(_LE, self._buckets, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        latency.add_metric([], buckets, self._latency_sum)
        latency.add_sample(name + "_created", {}, self._created)
        yield latency


class _StateCollector(Collector):
    """Metrics read at scrape time: the store snapshot and the rule set in force."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.snapshot = StoreSnapshot(None, None)

    def describe(self) -> Iterable[Metric]:
        # Described without reading anything, so registering never touches the store.
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._store_metrics(self.snapshot)
        yield from self._rule_metrics(self._policy)

    def _store_metrics(self, snap: StoreSnapshot) -> Iterable[Metric]:
        reachable = snap.actions is not None and snap.outbox is not None
        yield GaugeMetricFamily(
            "cosigner_store_up",
            "1 if the store answered this scrape; without it the store metrics are left out.",
            value=1 if reachable else 0,
        )
        if snap.actions is None or snap.outbox is None:
            return
        actions = GaugeMetricFamily(
            "cosigner_actions",
            "Actions in the store by status (awaiting_approval: waiting for a reviewer).",
            labels=["status"],
        )
        for status in STATUSES:
            actions.add_metric([status], snap.actions.get(status, 0))
        yield actions

        depth = GaugeMetricFamily(
            "cosigner_outbox_depth",
            "Emails and callbacks waiting to be delivered.",
            labels=["kind"],
        )
        retrying = GaugeMetricFamily(
            "cosigner_outbox_retrying",
            "Waiting emails and callbacks whose last delivery attempt failed.",
            labels=["kind"],
        )
        items = GaugeMetricFamily(
            "cosigner_outbox_items",
            "Outbox items by kind and status (failed: given up after every retry).",
            labels=["kind", "status"],
        )
        waiting = dict.fromkeys(OUTBOX_KINDS, 0)
        failing = dict.fromkeys(OUTBOX_KINDS, 0)
        for stat in snap.outbox:
            items.add_metric([stat.kind, stat.status], stat.items)
            if stat.status == "pending":
                waiting[stat.kind] = waiting.get(stat.kind, 0) + stat.items
                failing[stat.kind] = failing.get(stat.kind, 0) + stat.with_error
        for kind in waiting:
            depth.add_metric([kind], waiting[kind])
            retrying.add_metric([kind], failing[kind])
        yield depth
        yield retrying
        yield items

    def _rule_metrics(self, policy: Policy) -> Iterable[Metric]:
        reloads = CounterMetricFamily(
            "cosigner_rule_reloads",
            "Rule reloads (SIGHUP or a change in the rules folder), by result.",
            labels=["result"],
        )
        reloads.add_metric(["ok"], policy.reloads)
        reloads.add_metric(["failed"], policy.failed_reloads)
        yield reloads
        yield GaugeMetricFamily(
            "cosigner_rules_loaded",
            "Rules in the rule set in force.",
            value=len(policy.current.rules),
        )
        yield GaugeMetricFamily(
            "cosigner_rules_last_reload_successful",
            "1 if the last reload succeeded (or none was tried), 0 if the previous rules "
            "stayed in force because a file is invalid.",
            value=0 if policy.last_error is not None else 1,
        )
