"""Dashboard sign-in: signed, expiring session cookies, CSRF tokens and the bearer header.

The cookie never holds the admin token. It is ``<payload>.<mac>``: the
payload names a random session id, its expiry and the reviewer's name; the
mac is HMAC-SHA256 under a key derived from the master secret *and* the
admin token, so changing ``COSIGNER_ADMIN_TOKEN`` signs everyone out. Each
session's CSRF token is an HMAC of its id, checked in constant time on every
form that changes state. A request carrying the admin token as a bearer
header needs no CSRF token: browsers never add that header by themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from aiohttp import web

from gateway.crypto import constant_time_equal
from gateway.keys import CLOCK, KEYRING, SETTINGS

SESSION_COOKIE = "cosigner_session"
LOGIN_COOKIE = "cosigner_login"  # binds the sign-in form's CSRF token before there is a session
SESSION_TTL = 12 * 3600
LOGIN_TTL = 3600
MAX_COOKIE = 4096


@dataclass(frozen=True, slots=True)
class Auth:
    """Who is signed in, and how."""

    reviewer: str  # the name given at sign-in ('' if none), prefilled in decision forms
    session_id: str | None  # None when signed in by bearer header (no CSRF needed)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _admin_token(request: web.Request) -> str | None:
    token = request.app[SETTINGS].admin_token
    value = token.get_secret_value() if token is not None else ""
    return value or None


def dashboard_open(request: web.Request) -> bool:
    """Whether an admin token is configured at all (else nobody can sign in)."""
    return _admin_token(request) is not None


def token_matches(request: web.Request, candidate: str) -> bool:
    """True if ``candidate`` is the admin token (constant time)."""
    configured = _admin_token(request)
    return configured is not None and constant_time_equal(candidate, configured)


def _key(request: web.Request, purpose: str) -> bytes:
    configured = _admin_token(request) or ""
    return hmac.new(request.app[KEYRING].key(purpose), configured.encode(), hashlib.sha256).digest()


def _sign(request: web.Request, purpose: str, payload: bytes) -> str:
    mac = hmac.new(_key(request, purpose), payload, hashlib.sha256).digest()
    return _b64(payload) + "." + _b64(mac)


def _unsign(request: web.Request, purpose: str, value: str) -> bytes | None:
    if len(value) > MAX_COOKIE or value.count(".") != 1:
        return None
    body, _, mac = value.partition(".")
    try:
        payload, signature = _unb64(body), _unb64(mac)
    except (binascii.Error, ValueError):
        return None
    expected = hmac.new(_key(request, purpose), payload, hashlib.sha256).digest()
    return payload if hmac.compare_digest(expected, signature) else None


def _secure(request: web.Request) -> bool:
    return request.app[SETTINGS].base_url.startswith("https://")


def bearer_token(request: web.Request) -> str | None:
    """The bearer token of a request, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def current(request: web.Request) -> Auth | None:
    """The signed-in user: the admin token as a bearer header, or a valid session cookie."""
    if not dashboard_open(request):
        return None
    token = bearer_token(request)
    if token is not None:
        return Auth("", None) if token_matches(request, token) else None
    cookie = request.cookies.get(SESSION_COOKIE)
    payload = _unsign(request, "dashboard-session", cookie) if cookie else None
    if payload is None:
        return None
    try:
        sid, expires, reviewer = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if not isinstance(sid, str) or not isinstance(expires, int) or not isinstance(reviewer, str):
        return None
    if expires <= request.app[CLOCK]():
        return None
    return Auth(reviewer, sid)


def sign_in(request: web.Request, response: web.StreamResponse, reviewer: str) -> None:
    """Set a fresh session cookie (a new id every sign-in: no session fixation)."""
    expires = int(request.app[CLOCK]()) + SESSION_TTL
    payload = json.dumps([secrets.token_urlsafe(16), expires, reviewer], separators=(",", ":"))
    response.set_cookie(
        SESSION_COOKIE,
        _sign(request, "dashboard-session", payload.encode()),
        max_age=SESSION_TTL,
        path="/",
        httponly=True,
        samesite="Lax",  # Strict would sign reviewers out when they follow a receipt link
        secure=_secure(request),
    )
    response.del_cookie(LOGIN_COOKIE, path="/")


def sign_out(response: web.StreamResponse) -> None:
    """Forget the session in this browser."""
    response.del_cookie(SESSION_COOKIE, path="/")


def csrf_token(request: web.Request, auth: Auth | None) -> str:
    """The CSRF token for a signed-in session's forms ('' when none is needed)."""
    if auth is None or auth.session_id is None:
        return ""
    return _b64(request.app[KEYRING].mac("dashboard-csrf", auth.session_id.encode()))


def csrf_ok(request: web.Request, auth: Auth, submitted: str) -> bool:
    """True for bearer-header requests, or when the form carries this session's token."""
    if auth.session_id is None:
        return True
    return bool(submitted) and constant_time_equal(submitted, csrf_token(request, auth))


# -- the sign-in form's own CSRF protection (there is no session yet) ----------------------


def login_nonce(request: web.Request) -> tuple[str, str]:
    """This browser's login nonce (reused while valid) and the sign-in form's token for it."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not (16 <= len(nonce) <= 64):
        nonce = secrets.token_urlsafe(16)
    return nonce, _b64(request.app[KEYRING].mac("dashboard-login-csrf", nonce.encode()))


def remember_login_nonce(request: web.Request, response: web.StreamResponse, nonce: str) -> None:
    """Set the login cookie the sign-in form's token is bound to."""
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=LOGIN_TTL,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )


def login_nonce_ok(request: web.Request, submitted: str) -> bool:
    """True when the sign-in form was served to this browser by us."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not submitted:
        return False
    expected = _b64(request.app[KEYRING].mac("dashboard-login-csrf", nonce.encode()))
    return constant_time_equal(submitted, expected)
