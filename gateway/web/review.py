"""Reviewer pages behind the emailed magic links (PRODUCT.md §6).

``GET /review/{token}`` only shows the action: mail scanners and link
previews open links, so a GET never decides anything. The page's form POSTs
back to the same URL; the token in it is the capability (bound to one action
and one reviewer, expiring with the action), so it needs no other CSRF token.
A token decides once: it is used as soon as its reviewer has a decision on
the action, by any route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import tokens
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.keys import ACTIONS, INFO, KEYRING, SETTINGS, STORE
from gateway.store.base import ActionRecord, DecisionRecord
from gateway.templating import context_rows, current_value, format_ts, param_rows
from gateway.views import receipt_url
from gateway.web.pages import MAX_NOTE, edits_from, field, message, now, page, read_form

BAD_LINK = (
    "This review link is not valid: it may have been cut off or changed. Open it again "
    "from the email, copying the whole address."
)


@dataclass(frozen=True, slots=True)
class Review:
    """A verified link and the action it is for."""

    token: str
    grant: tokens.ReviewToken
    action: ActionRecord
    decisions: list[DecisionRecord]


def _same(a: str, b: str) -> bool:
    # One reviewer counts once, whatever the case of the address (as the rules say).
    return a.strip().lower() == b.strip().lower()


async def _review(request: web.Request, *, deciding: bool) -> Review | web.Response:
    """The verified review, or the page that explains why there is nothing to decide."""
    token = request.match_info["token"]
    moment = now(request)
    try:
        grant = tokens.verify(request.app[KEYRING], token, moment)
    except tokens.ExpiredToken as exc:
        request[INFO].action_id = exc.grant.action_id
        return message(
            request,
            403,
            "This link has expired",
            "The action it was for was not decided in time, so it was never sent to Stripe. "
            "Nothing can be decided with this link any more.",
        )
    except tokens.BadToken:
        return message(request, 400, "This link is not valid", BAD_LINK)
    request[INFO].action_id = grant.action_id  # the canonical log line masks the token
    store = request.app[STORE]
    action = await store.get_action(grant.action_id)
    if action is None or not any(_same(grant.reviewer, r) for r in action.reviewers):
        return message(request, 403, "This link is not valid", BAD_LINK)
    decisions = await store.decisions(action.id)
    mine = next((d for d in decisions if _same(d.reviewer, grant.reviewer)), None)
    if mine is not None:
        verb = "approved" if mine.decision == "approve" else "rejected"
        return message(
            request,
            403,
            "This link has been used",
            f"You already {verb} this action ({format_ts(mine.created)}, via {mine.via}). "
            "Each reviewer decides once; a link cannot be used again.",
            action=action,
        )
    if action.status == "awaiting_approval" and action.expires_at <= moment:
        return message(
            request,
            403,
            "This link has expired",
            f"Nobody decided by {format_ts(action.expires_at)}, so the action expired and was "
            "never sent to Stripe.",
            action=action,
        )
    if action.status != "awaiting_approval":
        return message(
            request,
            409 if deciding else 200,
            "Nothing left to decide",
            f"This action is already {action.status}: {_outcome(action, decisions)}",
            tone="info",
            action=action,
        )
    return Review(token, grant, action, decisions)


def _outcome(action: ActionRecord, decisions: list[DecisionRecord]) -> str:
    rejected = next((d for d in decisions if d.decision == "reject"), None)
    if action.status == "rejected" and rejected is not None:
        return f"{rejected.reviewer} rejected it, so it will not be sent to Stripe."
    if action.status in ("pending", "completed"):
        names = ", ".join(d.reviewer for d in decisions if d.decision == "approve")
        return f"approved by {names or 'the required reviewers'}."
    return "it will not be sent to Stripe."


def _form_page(
    request: web.Request,
    review: Review,
    *,
    status: int = 200,
    error: str | None = None,
    error_field: str | None = None,
    typed: dict[str, str] | None = None,
    note: str = "",
) -> web.Response:
    action = review.action
    approvals = [d for d in review.decisions if d.decision == "approve"]
    editable = [
        {
            "name": name,
            "value": (typed or {}).get(name, current_value(action, name)),
            "original": current_value(action, name),
        }
        for name in action.editable
    ]
    return page(
        request,
        "review.html",
        status=status,
        title=action.summary,
        action=action,
        reviewer=review.grant.reviewer,
        token=review.token,
        params=param_rows(action),
        context_rows=context_rows(action),
        approvals=approvals,
        editable=editable,
        error=error,
        error_field=error_field,
        note=note,
        receipt_url=receipt_url(request.app[SETTINGS].base_url, action.id),
    )


async def show(request: web.Request) -> web.Response:
    """``GET /review/{token}``: the action and the form. Changes nothing."""
    review = await _review(request, deciding=False)
    if isinstance(review, web.Response):
        return review
    return _form_page(request, review)


async def decide(request: web.Request) -> web.Response:
    """``POST /review/{token}``: approve (maybe with edits) or reject, as the link's reviewer."""
    review = await _review(request, deciding=True)
    if isinstance(review, web.Response):
        return review
    form = await read_form(request)
    if form is None:
        return message(request, 400, "Unreadable form", "Please submit the review page's form.")
    decision = field(form, "decision")
    note = field(form, "note", MAX_NOTE)
    action, actions = review.action, request.app[ACTIONS]
    edits = edits_from(form, action) if decision == "approve" else {}
    try:
        if decision == "approve":
            updated = await actions.approve(
                action.id,
                reviewer=review.grant.reviewer,
                via="email",
                note=note or None,
                params=edits or None,
            )
        elif decision == "reject":
            updated = await actions.reject(
                action.id, reviewer=review.grant.reviewer, via="email", note=note or None
            )
        else:
            return message(request, 400, "Choose Approve or Reject", "No decision was recorded.")
    except InvalidRequest as exc:
        typed = {name: field(form, "param." + name) for name in action.editable}
        return _form_page(
            request,
            review,
            status=400,
            error=f"Not recorded: {exc.message}",
            error_field=exc.param,
            typed=typed,
            note=note,
        )
    except (Conflict, NotFound):
        # Someone else decided (or time ran out) between the page load and the click.
        again = await _review(request, deciding=True)
        if isinstance(again, web.Response):
            return again
        return message(request, 409, "Not recorded", "The action changed; reload and retry.")
    return _done(request, updated, decision)


def _done(request: web.Request, action: ActionRecord, decision: str) -> web.Response:
    extra: dict[str, Any] = {"action": action}
    if decision == "reject":
        text = "The action is rejected; it will not be sent to Stripe."
        return message(request, 200, "Rejected", text, tone="bad", **extra)
    if action.status == "awaiting_approval":
        text = (
            f"Your approval is recorded. It needs {action.approvals_required} approvals in "
            "all; it will be sent to Stripe once the other reviewers approve."
        )
    else:
        text = "That was the last approval needed: Cosigner is sending the request to Stripe now."
    if action.modified_params:
        changed = ", ".join(f"{k} = {v}" for k, v in action.modified_params.items())
        text += f" It will be sent with your change: {changed}."
    return message(request, 200, "Approved", text, tone="ok", **extra)


ROUTES = (
    web.get("/review/{token}", show),
    web.post("/review/{token}", decide),
)
