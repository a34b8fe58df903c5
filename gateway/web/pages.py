"""What every server-rendered page shares: headers, the stylesheet, error pages, form reading.

Pages answer their own errors as HTML (the errors middleware would answer in
Stripe's JSON shape, which is right for agents and wrong for people).
"""

from __future__ import annotations

import urllib.parse
from importlib import resources
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from gateway.errors import RateLimited
from gateway.keys import CLOCK, SETTINGS
from gateway.store.base import ActionRecord
from gateway.templating import render

MAX_FORM = 64 * 1024
MAX_NOTE = 2000
MAX_FIELD = 5000
PARAM_PREFIX = "param."

# SECURITY: no scripts at all, no framing, forms only to ourselves, and no Referer, so a
# review link (a capability) never leaks to another site through a click.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".css": "text/css", ".svg": "image/svg+xml", ".ico": "image/x-icon"}


def root(request: web.Request) -> str:
    """The path prefix of COSIGNER_PUBLIC_URL (``""`` unless served under a sub-path)."""
    return urllib.parse.urlsplit(request.app[SETTINGS].base_url).path.rstrip("/")


def now(request: web.Request) -> float:
    """The application's clock."""
    return request.app[CLOCK]()


def page(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> web.Response:
    """Render a page with the security headers every page carries."""
    context.setdefault("signed_in", False)
    context.setdefault("csrf", "")
    context.setdefault("refresh", None)
    html = render(template, root=root(request), **context)
    response = web.Response(status=status, text=html, content_type="text/html", charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    if headers:
        response.headers.update(headers)
    return response


def message(
    request: web.Request,
    status: int,
    title: str,
    text: str,
    *,
    tone: str = "bad",
    action: ActionRecord | None = None,
    **context: Any,
) -> web.Response:
    """A page that says one thing clearly (an error, or a decision's outcome)."""
    return page(
        request,
        "message.html",
        status=status,
        title=title,
        text=text,
        tone=tone,
        action=action,
        **context,
    )


def too_many_requests(request: web.Request, exc: RateLimited) -> web.Response:
    """The rate limiter's 429 as a page: why, and how long to wait (also in Retry-After)."""
    seconds = exc.retry_after
    wait = f"{seconds} second{'' if seconds == 1 else 's'}"
    if seconds >= 120:
        wait += f" (about {round(seconds / 60)} minutes)"
    return message(
        request,
        429,
        "Too many requests",
        f"{exc.reason} Please wait {wait}, then try again.",
        headers={"Retry-After": str(seconds)},
    )


async def read_form(request: web.Request) -> MultiDictProxy[Any] | None:
    """The posted form, or None when it is too large or not a form."""
    if request.content_length is not None and request.content_length > MAX_FORM:
        return None
    if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return None
    return await request.post()


def field(form: MultiDictProxy[Any], name: str, limit: int = MAX_FIELD) -> str:
    """One text field, trimmed and capped ('' when absent)."""
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


def edits_from(form: MultiDictProxy[Any], action: ActionRecord) -> dict[str, str]:
    """New values for ``editable`` fields that differ from what would be forwarded now."""
    merged = {**action.params, **(action.modified_params or {})}
    edits = {}
    for name in action.editable:
        value = field(form, PARAM_PREFIX + name)
        current = merged.get(name)
        if value and value != ("" if current is None else str(current)):
            edits[name] = value
    return edits


def _static_files() -> dict[str, bytes]:
    folder = resources.files("gateway.web").joinpath("static")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and "." + entry.name.rpartition(".")[2] in STATIC_TYPES
    }


def static_routes() -> list[web.RouteDef]:
    """Serve the stylesheet (and friends) from the package: pages render offline, no CDN."""
    files = _static_files()

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            return message(request, 404, "Not found", "There is no such file.")
        kind = STATIC_TYPES["." + name.rpartition(".")[2]]
        return web.Response(
            body=files[name],
            content_type=kind,
            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    return [web.get("/dashboard/static/{name}", static)]
