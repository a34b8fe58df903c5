"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from gateway.actions import ActionService
from gateway.agents import AgentResolver
from gateway.budgets import Budgets
from gateway.callbacks import CallbackSender
from gateway.crypto import Keyring
from gateway.forwarder import Forwarder
from gateway.mail import Mailer, MailOutbox
from gateway.metrics import Metrics
from gateway.notify import Notifier
from gateway.policy import Policy
from gateway.ratelimit import Guard, RateLimiter
from gateway.settings import Settings
from gateway.store.base import Store
from gateway.tasks import TaskSet


class RequestInfo:
    """What the canonical log line says about one request, filled in as it is handled.

    The defaults are the class's: a request sets only what it learns (one attribute on
    a GET, where a dataclass's __init__ would set all seven).
    """

    agent: str = "-"
    rule: str = "-"
    decision: str = "-"
    action_id: str = "-"
    upstream_status: int | None = None
    path: str = ""  # the canonical path, once the proxy has read the request

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"RequestInfo({vars(self)!r})"


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
CALLBACKS = web.AppKey("callbacks", CallbackSender)
METRICS = web.AppKey("metrics", Metrics)
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)  # set on shutdown: not ready
MAILER: web.AppKey[Mailer] = web.AppKey("mailer")
MAIL_OUTBOX = web.AppKey("mail_outbox", MailOutbox)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")  # the injected clock
BUDGETS = web.AppKey("budgets", Budgets)
LIMITS = web.AppKey("limits", RateLimiter)
ADDRESS_LIMITS: web.AppKey[Guard] = web.AppKey("address_limits")  # errors_middleware calls it
INFO = web.RequestKey("info", RequestInfo)
