"""The JSON API under ``/cosigner/v1`` (PRODUCT.md §5)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.crypto import constant_time_equal
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound
from gateway.keys import ACTIONS, AGENTS, SETTINGS, STORE
from gateway.store.base import STATUSES, ActionFilter, ActionRecord
from gateway.views import action_object

M = TypeVar("M", bound=BaseModel)


class ApproveBody(BaseModel):
    """``POST /cosigner/v1/actions/{id}/approve``."""

    model_config = ConfigDict(extra="forbid")
    reviewer: str = Field(min_length=1, max_length=320)
    note: str | None = Field(None, max_length=2000)
    params: dict[str, str | int] | None = None


class RejectBody(BaseModel):
    """``POST /cosigner/v1/actions/{id}/reject``."""

    model_config = ConfigDict(extra="forbid")
    reviewer: str = Field(min_length=1, max_length=320)
    note: str | None = Field(None, max_length=2000)


def bearer(request: web.Request) -> str | None:
    """The bearer token of a request, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def is_admin(request: web.Request) -> bool:
    """True when the request carries COSIGNER_ADMIN_TOKEN (compared in constant time)."""
    configured = request.app[SETTINGS].admin_token
    token = bearer(request)
    if configured is None or token is None:
        return False
    return constant_time_equal(token, configured.get_secret_value())


def require_admin(request: web.Request) -> None:
    """401 unless the admin token is presented."""
    if not is_admin(request):
        if request.app[SETTINGS].admin_token is None:
            raise AuthenticationFailed(
                "The admin API is closed: set COSIGNER_ADMIN_TOKEN to open it.",
                code="admin_disabled",
            )
        raise AuthenticationFailed("A valid admin token is required.", code="admin_token_invalid")


async def _owned_action(request: web.Request) -> ActionRecord:
    """The action, if the caller is an admin or the agent that made it (same credential)."""
    action_id = request.match_info["id"]
    admin = is_admin(request)
    if not admin:
        # Raises 401 without a credential; an unknown or foreign action reads as 404.
        agent = await request.app[AGENTS].resolve(request.headers.get("Authorization"))
    action = await request.app[ACTIONS].get(action_id)
    if not admin and not constant_time_equal(action.credential_id, agent.credential_id):
        raise NotFound(f"No such action: '{action_id}'", param="id")
    return action


async def _render(request: web.Request, action: ActionRecord) -> web.Response:
    decisions = await request.app[STORE].decisions(action.id)
    return web.json_response(action_object(action, decisions, request.app[SETTINGS].base_url))


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    return data


def _validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(
            f"{field}: {first['msg']}" if field else first["msg"], param=field
        ) from exc


async def get_action(request: web.Request) -> web.Response:
    """``GET /cosigner/v1/actions/{id}``."""
    return await _render(request, await _owned_action(request))


async def list_actions(request: web.Request) -> web.Response:
    """``GET /cosigner/v1/actions?status=&limit=&starting_after=``."""
    require_admin(request)
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}.", param="status")
    try:
        limit = int(q.get("limit", "10"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be an integer between 1 and 100.", param="limit")
    flt = ActionFilter(
        status=status,
        agent=q.get("agent") or None,
        rule=q.get("rule") or None,
        limit=limit,
        starting_after=q.get("starting_after") or None,
    )
    store = request.app[STORE]
    if flt.starting_after and await store.get_action(flt.starting_after) is None:
        raise InvalidRequest("starting_after names no action.", param="starting_after")
    actions, has_more = await store.list_actions(flt)
    base = request.app[SETTINGS].base_url
    data = [action_object(a, await store.decisions(a.id), base) for a in actions]
    return web.json_response(
        {"object": "list", "url": "/cosigner/v1/actions", "data": data, "has_more": has_more}
    )


async def approve(request: web.Request) -> web.Response:
    """``POST /cosigner/v1/actions/{id}/approve``."""
    require_admin(request)
    body = _validate(ApproveBody, await _json_body(request))
    action = await request.app[ACTIONS].approve(
        request.match_info["id"],
        reviewer=body.reviewer,
        note=body.note,
        params=body.params,
        via="api",
    )
    return await _render(request, action)


async def reject(request: web.Request) -> web.Response:
    """``POST /cosigner/v1/actions/{id}/reject``."""
    require_admin(request)
    body = _validate(RejectBody, await _json_body(request))
    action = await request.app[ACTIONS].reject(
        request.match_info["id"], reviewer=body.reviewer, note=body.note, via="api"
    )
    return await _render(request, action)


async def cancel(request: web.Request) -> web.Response:
    """``POST /cosigner/v1/actions/{id}/cancel`` — by the agent that made it, or an admin."""
    action = await _owned_action(request)
    by = "admin" if is_admin(request) else action.agent
    return await _render(request, await request.app[ACTIONS].cancel(action.id, by=by))


ROUTES = (
    web.get("/cosigner/v1/actions", list_actions),
    web.get("/cosigner/v1/actions/{id}", get_action),
    web.post("/cosigner/v1/actions/{id}/approve", approve),
    web.post("/cosigner/v1/actions/{id}/reject", reject),
    web.post("/cosigner/v1/actions/{id}/cancel", cancel),
)
