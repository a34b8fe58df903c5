"""A fake Stripe API for the test suite: localstripe plus a thin TEST LAYER.

THIS MODULE IS A TEST LAYER, NOT A STRIPE IMPLEMENTATION. The stateful fake is
localstripe (GPL, a test-only dependency, imported, never vendored); this file
only adds what Cosigner's tests need and localstripe lacks, so that the gateway
is tested against a real HTTP peer instead of mocks:

* Idempotency-Key replay, scoped per API key (and ``Stripe-Account``): a repeated
  POST gets the first response back with ``Idempotent-Replayed: true``; the same
  key with another method/path/body is a 400 ``idempotency_error``; while the
  first request is still running, a 409 ``idempotency_key_in_use``. As at
  Stripe, validation errors (4xx other than 402) are not saved.
* Refund ``reason`` (stripped before localstripe sees it, kept on the refund).
* Over-refund errors (``amount_too_large``, ``charge_already_refunded``), and a
  full refund (no ``amount``) refunds what remains, not the whole charge.
* Stripe-shaped fields localstripe lacks or gets wrong: ``Charge.amount_captured``,
  ``PaymentIntent.amount_received``, ``PaymentIntent.latest_charge`` as an id
  unless expanded, ``Refund.payment_intent`` for charges made by a payment intent.
* Minimal disputes: ``GET /v1/disputes``, ``GET|POST /v1/disputes/{id}``,
  ``POST /v1/disputes/{id}/close``; created by the test-control route below.
* Test control under ``/_test/`` (no auth, never recorded, never faulted):
  ``GET /_test/health``; ``GET|DELETE /_test/requests`` (what the upstream
  received); ``GET /_test/counts``; ``GET|POST|DELETE /_test/faults`` (answer the
  next matching requests with errors, drop their connection, or delay them);
  ``POST /_test/disputes``.

Requests that carry the header ``X-Fake-Stripe-Setup: 1`` (fixtures creating
charges and the like) are recorded with ``"setup": true``, left out of the
counts, and never faulted.

Persistence is off: localstripe's global store would otherwise be pickled to
the fixed file /tmp/localstripe.pickle on every write (shared between parallel
test workers). Run it as ``python -m tests.support.fake_stripe --port N``; it
binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

with warnings.catch_warnings():
    # localstripe registers bare (sync) handlers, which aiohttp deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from localstripe import resources as ls_resources
    from localstripe import server as ls_server
    from localstripe.errors import UserError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETUP_HEADER = "X-Fake-Stripe-Setup"
READY_LINE = "FAKE_STRIPE_READY"
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
_KEY_PREFIX = re.compile(r"^((?:sk|rk|pk)_(?:test|live)_|cos_)")


# ---------------------------------------------------------------------------
# Patches to localstripe (global, applied once at import, before any write)
# ---------------------------------------------------------------------------


def _no_persistence(self: Any) -> None:
    """Replaces Store.dump_to_disk / try_load_from_disk: keep state in memory only."""


ls_resources.Store.dump_to_disk = _no_persistence
ls_resources.Store.try_load_from_disk = _no_persistence

_Charge: Any = ls_resources.Charge
_PaymentIntent: Any = ls_resources.PaymentIntent
_Refund: Any = ls_resources.Refund
_original_refund_create = _Refund._api_create
_original_pi_export = _PaymentIntent._export


def _money(amount: int, currency: str) -> str:
    if currency.lower() == "usd":
        return f"${amount / 100:.2f}"
    return f"{amount / 100:.2f} {currency.upper()}"


def _refund_target(data: dict[str, Any]) -> Any:
    """The localstripe Charge a refund request is for, or None if localstripe should judge."""
    charge = data.get("charge")
    intent = data.get("payment_intent")
    if isinstance(charge, str) and charge.startswith("ch_"):
        return _Charge._api_retrieve(charge)
    if charge is None and isinstance(intent, str) and intent.startswith("pi_"):
        pi = _PaymentIntent._api_retrieve(intent)
        if pi.latest_charge is None:
            raise UserError(
                400,
                f"This PaymentIntent ({intent}) does not have a successful charge to refund.",
                {"code": "charge_not_refundable", "param": "payment_intent"},
            )
        return pi.latest_charge
    return None


def _refund_create(cls: Any, /, reason: Any = None, **data: Any) -> Any:
    """Refund creation with `reason` and Stripe's over-refund checks (test layer)."""
    if reason is not None and reason not in REFUND_REASONS:
        raise UserError(
            400,
            "Invalid reason: must be one of duplicate, fraudulent, or requested_by_customer",
            {"param": "reason"},
        )
    charge = _refund_target(data)
    if charge is not None and charge.status != "failed":
        remaining = charge.amount - charge.amount_refunded
        if remaining <= 0:
            raise UserError(
                400,
                f"Charge {charge.id} has already been refunded.",
                {"code": "charge_already_refunded", "charge": charge.id},
            )
        amount = ls_resources.try_convert_to_int(data.get("amount"))
        if data.get("amount") is None:
            data["amount"] = remaining
        elif isinstance(amount, int) and amount > remaining:
            raise UserError(
                400,
                f"Refund amount ({_money(amount, charge.currency)}) is greater than "
                f"unrefunded amount on charge ({_money(remaining, charge.currency)})",
                {"code": "amount_too_large", "param": "amount"},
            )
    refund = _original_refund_create(**data)
    refund.reason = reason
    if refund.payment_intent is None and charge is not None:
        refund.payment_intent = charge.payment_intent
    return refund


def _pi_export(self: Any, expand: Any = None) -> Any:
    obj = _original_pi_export(self, expand=expand)
    paths = expand if isinstance(expand, list) else []
    expanded = any(p == "latest_charge" or str(p).startswith("latest_charge.") for p in paths)
    if isinstance(obj.get("latest_charge"), dict) and not expanded:
        obj["latest_charge"] = obj["latest_charge"]["id"]
    return obj


def _pi_amount_received(self: Any) -> int:
    charge = self.latest_charge
    if charge is None or charge.status != "succeeded" or not charge.captured:
        return 0
    return int(charge.amount)


_Refund._api_create = classmethod(_refund_create)
_Refund.reason = None  # every refund shows `reason`, null unless given
_Charge.amount_captured = property(
    lambda self: self.amount if self.captured and self.status == "succeeded" else 0
)
_PaymentIntent._export = _pi_export
_PaymentIntent.amount_received = property(_pi_amount_received)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        data, status=status, headers=headers, dumps=lambda x: json.dumps(x, indent=2) + "\n"
    )


def _stripe_error(
    status: int, message: str, type_: str = "invalid_request_error", **extra: Any
) -> web.Response:
    return _json({"error": {"type": type_, "message": message, **extra}}, status=status)


def _api_key(request: web.BaseRequest) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return None
        return decoded.split(":", 1)[0] or None
    return None


def key_fingerprint(key: str | None) -> str | None:
    """`sk_test_…6789`: the key's type prefix and last four characters, nothing more."""
    if not key:
        return None
    match = _KEY_PREFIX.match(key)
    return f"{match.group(1) if match else ''}…{key[-4:]}"


def _is_test_route(request: web.BaseRequest) -> bool:
    return request.path.startswith("/_test/")


def _is_setup(request: web.BaseRequest) -> bool:
    return request.headers.get(SETUP_HEADER, "") == "1"


async def _decode_params(request: web.BaseRequest) -> dict[str, Any]:
    """The request's body parameters, nested the way localstripe reads them."""
    raw = await request.read()
    if not raw:
        return {}
    if request.content_type == "application/json":
        try:
            data = json.loads(raw)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {"_json": data}
    form = await request.post()
    params: dict[str, Any] = ls_server.unflatten_data(form)
    return params


def _default_error(status: int) -> dict[str, Any]:
    if status == 402:
        return {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}
    if status == 404:
        return {"type": "invalid_request_error", "code": "resource_missing", "message": "Not Found"}
    if status == 409:
        return {
            "type": "invalid_request_error",
            "code": "lock_timeout",
            "message": "This object cannot be accessed right now (injected fault).",
        }
    if status == 429:
        return {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "Too many requests hit the API too quickly (injected fault).",
        }
    if status >= 500:
        return {"type": "api_error", "message": f"Injected upstream fault (HTTP {status})."}
    return {"type": "invalid_request_error", "message": f"Injected fault (HTTP {status})."}


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

FailAction = int | str | None  # HTTP status, "drop", "drop_after", or None (handle normally)


@dataclass
class FaultRule:
    """Answer the next `times` requests matching (method, path prefix) specially.

    The n-th match gets ``fail[n]``: an HTTP status (Stripe error body, never
    reaches localstripe), ``"drop"`` (connection closed before handling),
    ``"drop_after"`` (handled by localstripe, then the connection is closed
    without an answer: the ambiguous case) or ``None`` (handled normally).
    Every match first sleeps ``delay`` seconds. The handler is not cancelled
    if the client gives up, so a delayed request still takes effect.
    """

    id: str
    path_prefix: str
    method: str | None
    fail: list[FailAction]
    delay: float
    should_retry: bool | None
    error: dict[str, Any] | None
    times: int
    used: int = 0

    @classmethod
    def from_json(cls, data: Any) -> FaultRule:
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        unknown = set(data) - {
            "path_prefix",
            "method",
            "fail",
            "delay",
            "should_retry",
            "error",
            "times",
        }
        if unknown:
            raise ValueError(f"unknown fields: {sorted(unknown)}")
        prefix = data.get("path_prefix", "/")
        method = data.get("method")
        fail = data.get("fail", [])
        if isinstance(fail, int | str):
            fail = [fail]
        delay = data.get("delay", 0.0)
        should_retry = data.get("should_retry")
        error = data.get("error")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError("path_prefix must be a string starting with /")
        if method is not None and not isinstance(method, str):
            raise ValueError("method must be a string")
        if not isinstance(fail, list) or not all(
            x is None or x in ("drop", "drop_after") or (type(x) is int and 400 <= x <= 599)
            for x in fail
        ):
            raise ValueError('fail must list HTTP statuses (400-599), "drop", "drop_after", null')
        if type(delay) not in (int, float) or not 0 <= delay <= 600:
            raise ValueError("delay must be a number of seconds (0-600)")
        if should_retry is not None and not isinstance(should_retry, bool):
            raise ValueError("should_retry must be a boolean")
        if error is not None and not isinstance(error, dict):
            raise ValueError("error must be an object")
        times = data.get("times", max(len(fail), 1))
        if type(times) is not int or times < 1:
            raise ValueError("times must be a positive integer")
        return cls(
            id="fault_" + secrets.token_hex(6),
            path_prefix=prefix,
            method=method.upper() if method else None,
            fail=list(fail),
            delay=float(delay),
            should_retry=should_retry,
            error=error,
            times=times,
        )

    def matches(self, method: str, path: str) -> bool:
        return (
            self.used < self.times
            and (self.method is None or self.method == method)
            and path.startswith(self.path_prefix)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path_prefix": self.path_prefix,
            "method": self.method,
            "fail": self.fail,
            "delay": self.delay,
            "should_retry": self.should_retry,
            "error": self.error,
            "times": self.times,
            "used": self.used,
        }


@dataclass
class _Saved:
    """One idempotency key's first request and, once it finished, its response."""

    method: str
    path: str
    params: dict[str, Any]
    request_id: str
    done: bool = False
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"


@dataclass
class State:
    requests: list[dict[str, Any]] = field(default_factory=list)
    faults: list[FaultRule] = field(default_factory=list)
    idempotency: dict[tuple[str, str, str], _Saved] = field(default_factory=dict)
    disputes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seq: int = 0

    def take_fault(self, method: str, path: str) -> tuple[FaultRule, FailAction] | None:
        for rule in self.faults:
            if rule.matches(method, path):
                action = rule.fail[rule.used] if rule.used < len(rule.fail) else None
                rule.used += 1
                if rule.used >= rule.times:
                    self.faults.remove(rule)
                return rule, action
        return None

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for entry in self.requests:
            if entry["setup"]:
                continue
            c = out.setdefault(
                f"{entry['method']} {entry['path']}",
                {"received": 0, "faulted": 0, "replayed": 0, "handled": 0},
            )
            c["received"] += 1
            c["faulted"] += entry["fault"] is not None
            c["replayed"] += entry["replayed"]
            c["handled"] += entry["handled"]
        return out


STATE = web.AppKey("fake_stripe_state", State)


# ---------------------------------------------------------------------------
# Middlewares (outermost first)
# ---------------------------------------------------------------------------


def _observe(state: State) -> Any:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record every request the upstream receives (never /_test/ ones)."""
        if _is_test_route(request):
            return await handler(request)
        state.seq += 1
        key = _api_key(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        entry: dict[str, Any] = {
            "seq": state.seq,
            "request_id": "req_" + secrets.token_hex(7),
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "target": request.raw_path,  # exactly as sent: path and query, still encoded
            "query": ls_server.unflatten_data(request.query),
            "params": {},
            "body": "",
            "headers": headers,
            "idempotency_key": request.headers.get("Idempotency-Key"),
            "stripe_account": request.headers.get("Stripe-Account"),
            "api_key": key_fingerprint(key),
            "api_key_last4": key[-4:] if key else None,
            "setup": _is_setup(request),
            "status": None,
            "fault": None,
            "replayed": False,
            "handled": False,
            "duration": None,
        }
        request["fake_stripe_entry"] = entry
        state.requests.append(entry)
        started = time.monotonic()
        try:
            entry["body"] = (await request.read()).decode("utf-8", "replace")
            entry["params"] = await _decode_params(request)
            response = await handler(request)
            if entry["fault"] not in ("drop", "drop_after"):
                entry["status"] = response.status
            response.headers["Request-Id"] = entry["request_id"]
            return response
        except web.HTTPException as exc:
            entry["status"] = exc.status
            raise
        except BaseException:
            entry["status"] = 500
            raise
        finally:
            entry["duration"] = round(time.monotonic() - started, 4)

    return observe


def _drop_connection(request: web.Request) -> web.Response:
    """Close the client's connection without an answer (the response is never sent)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)


def _faults(state: State) -> Any:
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Injected delays, errors and dropped connections (see FaultRule)."""
        if _is_test_route(request) or _is_setup(request):
            return await handler(request)
        taken = state.take_fault(request.method, request.path)
        if taken is None:
            return await handler(request)
        rule, action = taken
        entry = request["fake_stripe_entry"]
        if rule.delay:
            await asyncio.sleep(rule.delay)
        if action is None:
            return await handler(request)
        entry["fault"] = action
        if action == "drop":
            entry["status"] = None
            return _drop_connection(request)
        if action == "drop_after":
            handled = await handler(request)
            entry["status"] = handled.status
            return _drop_connection(request)
        assert isinstance(action, int)
        error = {**_default_error(action), **(rule.error or {})}
        response = _json({"error": error}, status=action)
        if rule.should_retry is not None:
            response.headers["Stripe-Should-Retry"] = "true" if rule.should_retry else "false"
        return response

    return faults


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """localstripe's own auth check, except for the /_test/ control routes."""
    if _is_test_route(request):
        return await handler(request)
    response: web.StreamResponse = await ls_server.auth_middleware(request, handler)
    return response


def _is_saved_outcome(status: int) -> bool:
    # Stripe saves a result once the endpoint began executing: successes, card
    # errors and server errors, not validation errors.
    return status < 400 or status == 402 or status >= 500


def _idempotency(state: State) -> Any:
    @web.middleware
    async def idempotency(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Idempotency-Key replay, scoped to the API key and Stripe-Account, like Stripe."""
        idem_key = request.headers.get("Idempotency-Key")
        if _is_test_route(request):
            return await handler(request)
        if request.method != "POST" or not idem_key or not request.path.startswith("/v1/"):
            return await _handle(request, handler)
        entry = request["fake_stripe_entry"]
        scope = (_api_key(request) or "", request.headers.get("Stripe-Account", ""), idem_key)
        params = entry["params"]
        saved = state.idempotency.get(scope)
        if saved is not None:
            if (saved.method, saved.path, saved.params) != (request.method, request.path, params):
                return _stripe_error(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    f"they were first used with. Try using a key other than '{idem_key}' if "
                    "you meant to execute a different request.",
                    "idempotency_error",
                )
            if not saved.done:
                return _stripe_error(
                    409,
                    "There is currently another in-progress request using this "
                    f"Idempotent Key ('{idem_key}'). Please try again later.",
                    code="idempotency_key_in_use",
                )
            entry["replayed"] = True
            return web.Response(
                status=saved.status,
                body=saved.body,
                content_type=saved.content_type,
                headers={
                    "Idempotent-Replayed": "true",
                    "Idempotency-Key": idem_key,
                    "Original-Request": saved.request_id,
                },
            )
        saved = _Saved(request.method, request.path, params, entry["request_id"])
        state.idempotency[scope] = saved
        try:
            response = await _handle(request, handler)
        except BaseException:
            state.idempotency.pop(scope, None)
            raise
        if isinstance(response, web.Response) and _is_saved_outcome(response.status):
            saved.done = True
            saved.status = response.status
            saved.body = bytes(response.body) if isinstance(response.body, bytes) else b""
            saved.content_type = response.content_type
        else:
            state.idempotency.pop(scope, None)
        response.headers["Idempotency-Key"] = idem_key
        return response

    return idempotency


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Hand the request to localstripe (or a layer route), errors as Stripe-shaped responses."""
    entry = request.get("fake_stripe_entry")
    if entry is not None:
        entry["handled"] = True
    try:
        return await handler(request)
    except UserError as exc:
        response: web.Response = exc.to_response()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _stripe_error(
            exc.status, f"Unrecognized request URL ({request.method}: {request.path})."
        )


# ---------------------------------------------------------------------------
# Disputes (not in localstripe)
# ---------------------------------------------------------------------------


def _dispute_routes(state: State) -> list[web.RouteDef]:
    def get_dispute(dispute_id: str) -> dict[str, Any]:
        dispute = state.disputes.get(dispute_id)
        if dispute is None:
            raise UserError(
                404,
                f"No such dispute: '{dispute_id}'",
                {"code": "resource_missing", "param": "dispute"},
            )
        return dispute

    async def create(request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("charge"), str):
            return _stripe_error(400, 'expected JSON {"charge": "ch_...", ...}')
        try:
            charge = _Charge._api_retrieve(data["charge"])
        except UserError as exc:
            return exc.to_response()  # type: ignore[no-any-return]
        now = int(time.time())
        dispute = {
            "id": "dp_" + secrets.token_hex(7),
            "object": "dispute",
            "amount": int(data.get("amount", charge.amount)),
            "balance_transactions": [],
            "charge": charge.id,
            "created": now,
            "currency": charge.currency,
            "evidence": {},
            "evidence_details": {
                "due_by": now + 7 * 86400,
                "has_evidence": False,
                "past_due": False,
                "submission_count": 0,
            },
            "is_charge_refundable": False,
            "livemode": False,
            "metadata": dict(data.get("metadata") or {}),
            "payment_intent": charge.payment_intent,
            "reason": data.get("reason", "fraudulent"),
            "status": data.get("status", "needs_response"),
        }
        state.disputes[dispute["id"]] = dispute
        return _json(dispute)

    async def retrieve(request: web.Request) -> web.Response:
        return _json(get_dispute(request.match_info["id"]))

    async def update(request: web.Request) -> web.Response:
        dispute = get_dispute(request.match_info["id"])
        data = await _decode_params(request)
        unknown = set(data) - {"evidence", "metadata", "submit", "expand"}
        if unknown:
            raise UserError(400, f"Received unknown parameter: {sorted(unknown)[0]}")
        if dispute["status"] in ("won", "lost"):
            raise UserError(400, "This dispute is already closed.")
        for name in ("evidence", "metadata"):
            value = data.get(name)
            if isinstance(value, dict):
                dispute[name] = {**dispute[name], **value}
        dispute["evidence_details"]["has_evidence"] = bool(dispute["evidence"])
        if str(data.get("submit", "")).lower() == "true":
            dispute["status"] = "under_review"
            dispute["evidence_details"]["submission_count"] += 1
        return _json(dispute)

    async def close(request: web.Request) -> web.Response:
        dispute = get_dispute(request.match_info["id"])
        if dispute["status"] in ("won", "lost"):
            raise UserError(400, "This dispute is already closed.")
        dispute["status"] = "lost"
        return _json(dispute)

    async def list_all(request: web.Request) -> web.Response:
        query = request.query
        items = sorted(state.disputes.values(), key=lambda d: (d["created"], d["id"]), reverse=True)
        for name in ("charge", "payment_intent"):
            if name in query:
                items = [d for d in items if d[name] == query[name]]
        if "starting_after" in query:
            ids = [d["id"] for d in items]
            if query["starting_after"] in ids:
                items = items[ids.index(query["starting_after"]) + 1 :]
        try:
            limit = int(query.get("limit", "10"))
        except ValueError:
            raise UserError(400, "Invalid integer: limit") from None
        return _json(
            {
                "object": "list",
                "url": "/v1/disputes",
                "has_more": len(items) > limit,
                "data": items[:limit],
            }
        )

    return [
        web.post("/_test/disputes", create),
        web.get("/v1/disputes", list_all),
        web.get("/v1/disputes/{id}", retrieve),
        web.post("/v1/disputes/{id}", update),
        web.post("/v1/disputes/{id}/close", close),
    ]


# ---------------------------------------------------------------------------
# Test-control routes
# ---------------------------------------------------------------------------


def _control_routes(state: State) -> list[web.RouteDef]:
    async def health(request: web.Request) -> web.Response:
        return _json({"ok": True, "pid": os.getpid()})

    async def list_requests(request: web.Request) -> web.Response:
        return _json(state.requests)

    async def clear_requests(request: web.Request) -> web.Response:
        state.requests.clear()
        return _json({"cleared": True})

    async def counts(request: web.Request) -> web.Response:
        return _json(state.counts())

    async def list_faults(request: web.Request) -> web.Response:
        return _json([rule.to_json() for rule in state.faults])

    async def add_fault(request: web.Request) -> web.Response:
        try:
            rule = FaultRule.from_json(await request.json())
        except ValueError as exc:
            return _stripe_error(400, f"bad fault: {exc}")
        state.faults.append(rule)
        return _json(rule.to_json())

    async def clear_faults(request: web.Request) -> web.Response:
        state.faults.clear()
        return _json({"cleared": True})

    return [
        web.get("/_test/health", health),
        web.get("/_test/requests", list_requests),
        web.delete("/_test/requests", clear_requests),
        web.get("/_test/counts", counts),
        web.get("/_test/faults", list_faults),
        web.post("/_test/faults", add_fault),
        web.delete("/_test/faults", clear_faults),
    ]


# ---------------------------------------------------------------------------
# Application and launcher
# ---------------------------------------------------------------------------


def build_app() -> web.Application:
    """localstripe's routes behind the test layer. The Stripe objects live in
    localstripe's process-global store; the layer's own state is per app."""
    state = State()
    app = web.Application(
        middlewares=[
            _observe(state),
            _faults(state),
            ls_server.error_middleware,
            _auth,
            _idempotency(state),
        ]
    )
    app[STATE] = state
    app.router.add_routes(_control_routes(state))
    app.router.add_routes(_dispute_routes(state))
    for route in ls_server.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path:
            app.router.add_route(route.method, path, route.handler)
    return app


async def _watch_parent(parent_pid: int) -> None:
    """Stop when the process that started us is gone (never outlive the test run)."""
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Stripe for tests (localstripe + layer)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    app = build_app()
    watchers: list[asyncio.Task[None]] = []

    async def on_startup(app: web.Application) -> None:
        if args.parent_pid:
            watchers.append(asyncio.create_task(_watch_parent(args.parent_pid)))

    async def on_cleanup(app: web.Application) -> None:
        for watcher in watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=lambda _: print(f"{READY_LINE} http://127.0.0.1:{args.port}", flush=True),
        shutdown_timeout=1.0,
        handle_signals=True,
    )


if __name__ == "__main__":
    main()
