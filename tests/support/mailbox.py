"""Reading reviewer emails and receipts in tests: links, parts, timeline events."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import requests

from gateway.keys import STORE
from gateway.store.base import EventRecord
from tests.support.gateway import GatewayThread
from tests.support.peers import TEST_STRIPE_KEY, SmtpSink

# The link stands on a line of its own in the text part (agent text never starts a line).
REVIEW_LINK = re.compile(r"^(https?://\S+/review/[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)\r?$", re.M)


def text_of(message: EmailMessage) -> str:
    """The plain-text part."""
    part = message.get_body(("plain",))
    assert isinstance(part, EmailMessage), "no text/plain part"
    return str(part.get_content())


def html_of(message: EmailMessage) -> str:
    """The HTML part."""
    part = message.get_body(("html",))
    assert isinstance(part, EmailMessage), "no text/html part"
    return str(part.get_content())


def review_link(message: EmailMessage) -> str:
    """The magic link in a reviewer email (the same in both parts)."""
    links = set(REVIEW_LINK.findall(text_of(message)))
    assert len(links) == 1, links
    (link,) = links
    assert link in html_of(message)
    return link


def links_by_reviewer(messages: list[EmailMessage], action_id: str) -> dict[str, str]:
    """``{reviewer address: review link}`` for one action's emails."""
    return {str(m["To"]): review_link(m) for m in messages if m["X-Cosigner-Action"] == action_id}


def wait_links(sink: SmtpSink, action_id: str, count: int, timeout: float = 15) -> dict[str, str]:
    """``{reviewer: link}`` once ``count`` reviewers of the action got their email (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        links = links_by_reviewer(sink.messages, action_id)
        if len(links) >= count:
            return links
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(links)}/{count} review emails for {action_id}")
        time.sleep(0.05)


def events(gw: GatewayThread, action_id: str) -> list[EventRecord]:
    """The action's timeline as stored."""
    assert gw.app is not None
    result: list[EventRecord] = gw.call(gw.app[STORE].events(action_id))
    return result


def wait_events(
    gw: GatewayThread,
    action_id: str,
    until: Callable[[list[EventRecord]], bool],
    timeout: float = 15,
) -> list[EventRecord]:
    """Poll the timeline until ``until(events)`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = events(gw, action_id)
        if until(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timeline of {action_id}: {[e.kind for e in found]}")
        time.sleep(0.05)


def hold(gw: GatewayThread, path: str, data: dict[str, Any], **headers: str) -> dict[str, Any]:
    """Make a held request as the agent; the 202 body."""
    resp = requests.post(
        gw.url + path,
        data=data,
        headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}", **headers},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body
