"""Who is calling: the agent behind a request's API key (PRODUCT.md §3a).

Two kinds of credential:

- Gateway keys ``cos_...`` issued by ``cosigner keys create NAME``. Only their
  SHA-256 is stored; the agent is named by the key's name, and Stripe sees the
  real key substituted for it (the key's own sealed Stripe key, else
  ``COSIGNER_STRIPE_KEY``). A looked-up key is trusted for at most
  ``GATEWAY_KEY_TTL`` seconds before the store is asked again, so a revocation
  (made by the CLI in another process, or on another replica) takes effect
  everywhere within that time.
- Raw Stripe keys ``sk_...``/``rk_...``, passed through; the agent is named by
  the masked key (``sk_test_…6789``). Refused with COSIGNER_REQUIRE_AGENT_KEYS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import SecretStr

from gateway.crypto import Keyring, mask_key
from gateway.errors import AuthenticationFailed, StripeKeyMissing
from gateway.store.base import AgentKeyRecord, Store

log = logging.getLogger("cosigner.agents")

RAW_KEY_PREFIXES = ("sk_", "rk_")
GATEWAY_KEY_PREFIX = "cos_"
STRIPE_KEY_PURPOSE = "agent-stripe-key"
GATEWAY_KEY_TTL = 5.0
MAX_CACHED = 10_000
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# Stripe keys are letters, digits and '_'. Anything else is refused before it could reach a
# header (or an exception message about one) on the way upstream.
RAW_KEY = re.compile(r"(?:sk|rk)_[A-Za-z0-9_]{4,250}")
_INVALID_GATEWAY_KEY = "Invalid API key provided: unknown or revoked gateway key."


@dataclass(frozen=True, slots=True)
class Agent:
    """An authenticated caller. ``upstream_key`` is what Stripe will see."""

    name: str
    credential_id: str
    upstream_key: str = field(repr=False)
    gateway_key: bool = False


def new_gateway_key() -> str:
    """A fresh gateway key: ``cos_`` and 256 random bits, URL-safe."""
    return GATEWAY_KEY_PREFIX + secrets.token_urlsafe(32)


def gateway_key_hash(key: str) -> str:
    """What the store keeps of a gateway key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def mask_gateway_key(record: AgentKeyRecord) -> str:
    """A stored key for display: ``cos_…abcd``."""
    return f"{record.prefix}…{record.last4}"


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
    """Turns a credential into an Agent: raw Stripe keys, or gateway keys via the store."""

    def __init__(
        self,
        keyring: Keyring,
        store: Store,
        *,
        require_agent_keys: bool,
        stripe_key: SecretStr | None = None,
        ttl: float = GATEWAY_KEY_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keyring = keyring
        self._store = store
        self._require_agent_keys = require_agent_keys
        self._stripe_key = stripe_key
        self._ttl = ttl
        self._clock = clock
        # Authorization header -> (agent, trusted until): a raw key for good, a gateway key
        # for ``ttl`` seconds (then it is looked up again: a revoked key stops working).
        self._known: dict[str, tuple[Agent, float]] = {}

    def credential_id(self, credential: str) -> str:
        """Keyed fingerprint of a credential ("the same credential" without storing it)."""
        return self._keyring.fingerprint(credential)

    def known(self, authorization: str | None) -> Agent | None:
        """The agent of a header seen before and still trusted, or None: then ``resolve``."""
        known = self._known.get(authorization) if authorization else None
        if known is not None and known[1] > self._clock():
            return known[0]
        return None

    async def resolve(self, authorization: str | None) -> Agent:
        """The agent, or AuthenticationFailed (401) — never held."""
        agent = self.known(authorization)
        if agent is not None:
            return agent
        now = self._clock()
        credential = credential_from_header(authorization)
        if credential is None:
            raise AuthenticationFailed(
                "You did not provide an API key. Provide it as a Bearer token in the "
                "Authorization header.",
                code="api_key_missing",
            )
        assert authorization is not None  # it carried a credential
        if credential.startswith(GATEWAY_KEY_PREFIX):
            try:
                agent = await self._gateway_agent(credential)
            except AuthenticationFailed:
                self._known.pop(authorization, None)
                raise
            until = now + self._ttl
        elif RAW_KEY.fullmatch(credential):
            agent, until = self._raw_agent(credential), math.inf
        else:
            raise AuthenticationFailed("Invalid API key provided.")
        if len(self._known) >= MAX_CACHED:
            self._known.clear()
        self._known[authorization] = (agent, until)
        return agent

    def _raw_agent(self, credential: str) -> Agent:
        if self._require_agent_keys:
            raise AuthenticationFailed(
                "This gateway only accepts gateway-issued agent keys (cos_...), not Stripe keys.",
                code="agent_key_required",
            )
        return Agent(mask_key(credential), self.credential_id(credential), credential)

    async def _gateway_agent(self, credential: str) -> Agent:
        digest = gateway_key_hash(credential)
        record = await self._store.agent_key_by_hash(digest)
        # The lookup is by hash, so its timing tells nothing about the key itself; the
        # comparison is constant-time all the same. Unknown and revoked read the same.
        if (
            record is None
            or not hmac.compare_digest(record.key_hash, digest)
            or record.revoked_at is not None
        ):
            raise AuthenticationFailed(_INVALID_GATEWAY_KEY)
        return Agent(
            record.name,
            self.credential_id(credential),
            self._upstream_key(record),
            gateway_key=True,
        )

    def _upstream_key(self, record: AgentKeyRecord) -> str:
        """The real Stripe key substituted for a gateway key."""
        if record.stripe_key_sealed is not None:
            try:
                return open_stripe_key(self._keyring, record)
            except ValueError:
                log.error(
                    "the Stripe key of agent %s does not decrypt with COSIGNER_SECRET_KEY "
                    "(or COSIGNER_SECRET_KEY_PREVIOUS)",
                    record.name,
                )
                raise StripeKeyMissing(
                    f"The Stripe key configured for agent {record.name} cannot be decrypted "
                    "by this gateway."
                ) from None
        if self._stripe_key is not None:
            return self._stripe_key.get_secret_value()
        raise StripeKeyMissing(
            f"No Stripe key is configured for agent {record.name}: set COSIGNER_STRIPE_KEY, or "
            "create the agent's key with --stripe-key."
        )


def seal_stripe_key(keyring: Keyring, name: str, stripe_key: str) -> bytes:
    """Encrypt an agent's own Stripe key, bound to the agent's name."""
    return keyring.seal(STRIPE_KEY_PURPOSE, stripe_key.encode(), name.encode())


def open_stripe_key(keyring: Keyring, record: AgentKeyRecord) -> str:
    """Decrypt an agent's own Stripe key; ValueError if no configured secret opens it."""
    assert record.stripe_key_sealed is not None
    return keyring.open(STRIPE_KEY_PURPOSE, record.stripe_key_sealed, record.name.encode()).decode()
