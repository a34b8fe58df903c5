"""The action object as agents, the API and callbacks see it (PRODUCT.md §3–§4)."""

from __future__ import annotations

import json
from typing import Any

from gateway.store.base import ActionRecord, DecisionRecord


def receipt_url(base_url: str, action_id: str) -> str:
    """Where a human reads the action's receipt."""
    return f"{base_url}/dashboard/actions/{action_id}"


def poll_message(action: ActionRecord) -> str:
    """The agent-facing note in every 202: exactly how to find out what happened."""
    return (
        f"Held for human approval. Poll GET /cosigner/v1/actions/{action.id}. "
        "Use the same API key; the action is final once its status is completed, rejected, "
        "expired, cancelled or failed. Re-sending this request with the same Idempotency-Key "
        "returns the outcome instead of a new action; add the header Cosigner-Wait: <seconds> "
        "to wait for the decision."
    )


def hold_body(action: ActionRecord, base_url: str) -> dict[str, Any]:
    """The 202 body."""
    return {
        "object": "cosigner.action",
        "id": action.id,
        "status": action.status,
        "method": action.method,
        "path": action.path,
        "params": action.params,
        "summary": action.summary,
        "rule": action.rule,
        "approvals_required": action.approvals_required,
        "created": action.created,
        "expires_at": action.expires_at,
        "receipt_url": receipt_url(base_url, action.id),
        "message": poll_message(action),
    }


def action_object(
    action: ActionRecord, decisions: list[DecisionRecord], base_url: str
) -> dict[str, Any]:
    """The full action: every field of the 202 plus its history. Never credentials."""
    body = hold_body(action, base_url)
    body.update(
        agent=action.agent,
        justification=action.justification,
        decisions=[
            {
                "reviewer": d.reviewer,
                "decision": d.decision,
                "note": d.note,
                "via": d.via,
                "created": d.created,
            }
            for d in decisions
        ],
        modified_params=action.modified_params,
        response_code=action.response_code,
        response_body=_json_or_text(action.response_body),
        last_error=action.last_error,
        attempts=action.attempts,
        completed_at=action.completed_at,
        callback_url=action.callback_url,
        reason=action.reason,
        context=action.context or None,
    )
    return body


def _json_or_text(body: str | None) -> Any:
    if body is None:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body
