"""Random ids: request ids and object ids, from buffered reads of the system's randomness.

Every answered request gets a request id and every held one an action id; a
read of ``os.urandom`` per id is a system call on the hot path. The bytes
are the same (the operating system's CSPRNG), read 4 KiB at a time and each
handed out once. A forked child starts with an empty buffer, so parent and
child never hand out the same bytes.
"""

from __future__ import annotations

import base64
import os
import string
import threading

_CHUNK = 4096
_ALPHABET = string.ascii_letters + string.digits
_UNBIASED = 256 - 256 % len(_ALPHABET)  # 248: the bytes that map evenly onto the alphabet


class _Randomness:
    """Bytes from os.urandom, read in chunks; never the same byte twice."""

    def __init__(self) -> None:
        self._buffer = b""
        self._at = 0
        self._lock = threading.Lock()  # a test's thread and a gateway thread may share it

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._at + n > len(self._buffer):
                self._buffer, self._at = os.urandom(max(_CHUNK, n)), 0
            out = self._buffer[self._at : self._at + n]
            self._at += n
            return out

    def forget(self) -> None:
        self._lock = threading.Lock()
        self._buffer, self._at = b"", 0


_pool = _Randomness()
os.register_at_fork(after_in_child=_pool.forget)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the system's CSPRNG (as ``secrets.token_bytes``)."""
    return _pool.take(n)


def request_id() -> str:
    """``req_`` and 96 random bits, URL-safe: the id of one answered request."""
    return "req_" + base64.urlsafe_b64encode(_pool.take(12)).decode("ascii")


def new_id(prefix: str, length: int = 16) -> str:
    """``act_3QxKf0Yt9dWm2LbA``-style random ids: letters and digits, each equally likely."""
    chars: list[str] = []
    while len(chars) < length:
        # Bytes from _UNBIASED up are skipped, so that every character stays equally likely.
        chars += [_ALPHABET[b % len(_ALPHABET)] for b in _pool.take(length + 8) if b < _UNBIASED]
    return prefix + "".join(chars[:length])
