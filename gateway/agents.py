"""Who is calling: the agent behind a request's API key."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from gateway.crypto import Keyring, mask_key
from gateway.errors import AuthenticationFailed

RAW_KEY_PREFIXES = ("sk_", "rk_")
GATEWAY_KEY_PREFIX = "cos_"


@dataclass(frozen=True, slots=True)
class Agent:
    """An authenticated caller. ``upstream_key`` is what Stripe will see."""

    name: str
    credential_id: str
    upstream_key: str = field(repr=False)
    gateway_key: bool = False


def credential_from_header(value: str | None) -> str | None:
    """The API key in ``Authorization: Bearer KEY`` or Basic ``KEY:``, as the SDK sends it."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer":
        return token or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None


class AgentResolver:
    """Turns a credential into an Agent (raw Stripe keys; gateway keys via the key store)."""

    def __init__(self, keyring: Keyring, *, require_agent_keys: bool) -> None:
        self._keyring = keyring
        self._require_agent_keys = require_agent_keys
        self._cache: dict[str, Agent] = {}

    def credential_id(self, credential: str) -> str:
        """Keyed fingerprint of a credential ("the same credential" without storing it)."""
        return self._keyring.fingerprint(credential)

    async def resolve(self, authorization: str | None) -> Agent:
        """The agent, or AuthenticationFailed (401) — never held."""
        credential = credential_from_header(authorization)
        if credential is None:
            raise AuthenticationFailed(
                "You did not provide an API key. Provide it as a Bearer token in the "
                "Authorization header.",
                code="api_key_missing",
            )
        agent = self._cache.get(credential)
        if agent is not None:
            return agent
        if credential.startswith(RAW_KEY_PREFIXES):
            if self._require_agent_keys:
                raise AuthenticationFailed(
                    "This gateway only accepts gateway-issued agent keys (cos_...), not Stripe "
                    "keys."
                )
            agent = Agent(mask_key(credential), self.credential_id(credential), credential)
        else:
            raise AuthenticationFailed("Invalid API key provided.")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[credential] = agent
        return agent
