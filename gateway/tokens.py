"""Signed magic-link tokens: one action, one reviewer, expiring with the action.

A token is ``<payload>.<mac>``, both base64url without padding, where the
payload is ``[1, action_id, reviewer, expires_at]`` as compact JSON and the
mac is HMAC-SHA256 under the keyring's ``review-token`` key. Tokens are
capabilities: whoever holds one can decide as that reviewer, so they are
never logged (except by the development log mailer, whose only job is to
show them). "Decide once" is not in the token: a token is used once its
reviewer has a decision on the action (see ``gateway.web.review``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from gateway.crypto import Keyring

PURPOSE = "review-token"
_VERSION = 1
MAX_TOKEN_LENGTH = 2048


class BadToken(ValueError):
    """The token is malformed or its signature does not verify."""


class ExpiredToken(BadToken):
    """The token is authentic but its action's time is up."""

    def __init__(self, grant: ReviewToken) -> None:
        super().__init__("token expired")
        self.grant = grant


@dataclass(frozen=True, slots=True)
class ReviewToken:
    """What a verified token grants: deciding ``action_id`` as ``reviewer`` until ``expires_at``."""

    action_id: str
    reviewer: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(keyring: Keyring, action_id: str, reviewer: str, expires_at: int) -> str:
    """A URL-safe token for one reviewer of one action."""
    payload = json.dumps(
        [_VERSION, action_id, reviewer, int(expires_at)], separators=(",", ":")
    ).encode()
    return _b64(payload) + "." + _b64(keyring.mac(PURPOSE, payload))


def verify(keyring: Keyring, token: str, now: float) -> ReviewToken:
    """The token's grant; ``BadToken`` if forged or malformed, ``ExpiredToken`` if past its time."""
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise BadToken("malformed token")
    body, _, mac = token.partition(".")
    try:
        payload, signature = _unb64(body), _unb64(mac)
    except (binascii.Error, ValueError) as exc:
        raise BadToken("malformed token") from exc
    # Check the signature before looking inside: nothing unauthenticated is parsed.
    if not keyring.verify_mac(PURPOSE, payload, signature):
        raise BadToken("signature does not verify")
    try:
        version, action_id, reviewer, expires_at = json.loads(payload)
    except (ValueError, TypeError) as exc:
        raise BadToken("malformed payload") from exc
    if (
        version != _VERSION
        or not isinstance(action_id, str)
        or not isinstance(reviewer, str)
        or not isinstance(expires_at, int)
        or isinstance(expires_at, bool)
    ):
        raise BadToken("malformed payload")
    grant = ReviewToken(action_id, reviewer, expires_at)
    if expires_at <= now:
        raise ExpiredToken(grant)
    return grant
