"""Per-purpose keys derived from the master secret (HKDF), AES-GCM sealing, HMAC helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.ids import random_bytes

_VERSION = b"\x01"


def derive(master: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose; keys for different purposes are independent."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(
        master
    )


MAX_PURPOSES = 64  # purposes are constants in the code; the bound is only a backstop


class Keyring:
    """The master secret (and a previous one, for rotation) turned into purpose keys."""

    def __init__(self, master: bytes, previous: Iterable[bytes] = ()) -> None:
        self._masters = [master, *previous]
        # Derived once per purpose (HKDF, and AES-GCM's key setup, cost more than the
        # sealing itself): keyed by (which master, purpose).
        self._keys: dict[tuple[int, str], bytes] = {}
        self._aeads: dict[tuple[int, str], AESGCM] = {}

    def __repr__(self) -> str:
        return "Keyring(**********)"

    def _derived(self, index: int, purpose: str) -> bytes:
        key = self._keys.get((index, purpose))
        if key is None:
            if len(self._keys) >= MAX_PURPOSES:
                self._keys.clear()
                self._aeads.clear()
            key = self._keys[(index, purpose)] = derive(self._masters[index], purpose)
        return key

    def _aead(self, index: int, purpose: str) -> AESGCM:
        aead = self._aeads.get((index, purpose))
        if aead is None:
            aead = AESGCM(self._derived(index, purpose))
            self._aeads[(index, purpose)] = aead
        return aead

    def key(self, purpose: str) -> bytes:
        """The current key for a purpose."""
        return self._derived(0, purpose)

    def seal(self, purpose: str, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate with AES-GCM; ``aad`` binds the ciphertext to its row.

        The nonce is 96 bits from the system's CSPRNG, read in chunks (``random_bytes``):
        a system call per hold released the GIL, and taking it back from the store's
        writer thread cost the event loop far more than the call itself.
        """
        nonce = random_bytes(12)
        return _VERSION + nonce + self._aead(0, purpose).encrypt(nonce, plaintext, aad)

    def open(self, purpose: str, sealed: bytes, aad: bytes) -> bytes:
        """Decrypt with the current key, then with previous ones (key rotation)."""
        if not sealed.startswith(_VERSION):
            raise ValueError("unknown ciphertext version")
        nonce, ct = sealed[1:13], sealed[13:]
        for index in range(len(self._masters)):
            try:
                return self._aead(index, purpose).decrypt(nonce, ct, aad)
            except InvalidTag:
                continue
        raise ValueError("ciphertext does not open with any configured secret key")

    def mac(self, purpose: str, data: bytes) -> bytes:
        """HMAC-SHA256 under the purpose key."""
        return hmac.new(self.key(purpose), data, hashlib.sha256).digest()

    def verify_mac(self, purpose: str, data: bytes, mac: bytes) -> bool:
        """True if ``mac`` is data's HMAC under the current or a previous key (rotation)."""
        ok = False
        for index in range(len(self._masters)):
            expected = hmac.new(self._derived(index, purpose), data, hashlib.sha256).digest()
            ok |= hmac.compare_digest(expected, mac)
        return ok

    def fingerprint(self, credential: str) -> str:
        """Keyed hash of a credential: identifies the same credential without storing it."""
        return base64.urlsafe_b64encode(self.mac("credential-id", credential.encode())).decode()[
            :32
        ]


def constant_time_equal(a: str, b: str) -> bool:
    """Compare secrets without leaking where they differ, or how long the secret is."""
    # Digests first: compare_digest on unequal lengths returns early, telling the length.
    return hmac.compare_digest(
        hashlib.sha256(a.encode()).digest(), hashlib.sha256(b.encode()).digest()
    )


def mask_key(key: str) -> str:
    """Show a Stripe-style key as ``sk_test_…6789``; never more than its prefix and last 4."""
    if not key:
        return ""
    parts = key.split("_")
    prefix = "_".join(parts[:2]) + "_" if len(parts) >= 3 and parts[1] in ("test", "live") else ""
    if not prefix and len(parts) >= 2:
        prefix = parts[0] + "_"
    return f"{prefix}…{key[-4:]}" if len(key) > len(prefix) + 8 else f"{prefix}…"
