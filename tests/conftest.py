"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import stripe

from tests.support import postgres
from tests.support.peers import FakeStripeProcess, SmtpSink, Upstream

# ---------------------------------------------------------------------------
# Real peers: fake Stripe upstream and SMTP sink (see tests/support/peers.py)
# ---------------------------------------------------------------------------

stripe.enable_telemetry = False


@pytest.fixture(scope="session")
def fake_stripe() -> Iterator[str]:
    """URL of a fake Stripe (localstripe + test layer) subprocess, one per xdist worker."""
    with FakeStripeProcess() as process:
        yield process.url


@pytest.fixture
def upstream(fake_stripe: str) -> Iterator[Upstream]:
    """Drive/observe the fake Stripe; starts each test with no recorded requests or faults."""
    with Upstream(fake_stripe) as helper:
        helper.clear_faults()
        helper.clear_requests()
        yield helper
        helper.clear_faults()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    """A plain SMTP sink on 127.0.0.1 (no AUTH, no TLS) collecting EmailMessage objects."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped after); skipped if unreachable, except under CI."""
    reason = postgres.unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests")
        pytest.skip(reason)
    with postgres.fresh_database() as url:
        yield url
