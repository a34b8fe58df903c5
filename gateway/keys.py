"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.actions import ActionService
from gateway.agents import AgentResolver
from gateway.crypto import Keyring
from gateway.forwarder import Forwarder
from gateway.notify import Notifier
from gateway.policy import Policy
from gateway.settings import Settings
from gateway.store.base import Store
from gateway.tasks import TaskSet


@dataclass(slots=True)
class RequestInfo:
    """What the canonical log line says about one request, filled in as it is handled."""

    request_id: str
    agent: str = "-"
    rule: str = "-"
    decision: str = "-"
    action_id: str = "-"
    upstream_status: int | None = None


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
KEYRING = web.AppKey("keyring", Keyring)
POLICY = web.AppKey("policy", Policy)
AGENTS = web.AppKey("agents", AgentResolver)
NOTIFIER = web.AppKey("notifier", Notifier)
TASKS = web.AppKey("tasks", TaskSet)
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
FORWARDER = web.AppKey("forwarder", Forwarder)
ACTIONS = web.AppKey("actions", ActionService)
INFO = web.RequestKey("info", RequestInfo)
