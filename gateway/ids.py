"""Ids: request ids and object ids, from buffered reads of the system's randomness.

Every answered request gets a request id and every held one an action id; a
read of ``os.urandom`` per id is a system call on the hot path. The bytes
are the same (the operating system's CSPRNG), read 4 KiB at a time and each
handed out once. A forked child starts with an empty buffer, so parent and
child never hand out the same bytes.

Request ids and action ids start with the time in milliseconds, in an
alphabet whose order is ASCII order, so ids sort by when they were made. They
are primary keys (receipts, actions) and keys of indexes (an action's events,
outbox items and decisions): sorted ids are added at the end of each index,
where random ones would each land on a different page, and every page a
commit touches is a page written to the WAL and later copied back by a
checkpoint. Random characters follow (72 bits for a request id, 53 for an
action id), so ids made in the same millisecond, on any replica, do not
collide; nothing is granted by knowing an id (every read of an action checks
the caller's credential).
"""

from __future__ import annotations

import base64
import os
import string
import threading
import time

_CHUNK = 4096
_ALPHABET = string.ascii_letters + string.digits
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase  # in ASCII order
STAMP_CHARS = 7  # the time in ms in base 62: 62**7 ms after 1970 is in the year 2081
_UNBIASED = 256 - 256 % len(_ALPHABET)  # 248: the bytes that map evenly onto the alphabet
# base64url's 64 characters, re-ordered into ASCII order: encoded bytes sort as the bytes do.
_URLSAFE = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
_SORTED = bytes.maketrans(_URLSAFE.encode(), "".join(sorted(_URLSAFE)).encode())


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
    """``req_``, the time in ms and 72 random bits, URL-safe: the id of one answered request.

    Ids sort by time (to the millisecond; in random order within one).
    """
    raw = _ms().to_bytes(6, "big") + _pool.take(9)
    return "req_" + base64.urlsafe_b64encode(raw).translate(_SORTED).decode("ascii")


def _ms() -> int:
    return time.time_ns() // 1_000_000


def sortable_id(prefix: str, length: int = 16) -> str:
    """``act_VbcFeoz7TaglVXMD``-style: the time in ms (7 characters), then random ones.

    Letters and digits only, like :func:`new_id`; ids made later sort later.
    """
    stamp, digits = _ms(), []
    for _ in range(STAMP_CHARS):
        stamp, digit = divmod(stamp, 62)
        digits.append(_BASE62[digit])
    return new_id(prefix + "".join(reversed(digits)), length - STAMP_CHARS)


def new_id(prefix: str, length: int = 16) -> str:
    """``act_3QxKf0Yt9dWm2LbA``-style random ids: letters and digits, each equally likely."""
    chars: list[str] = []
    while len(chars) < length:
        # Bytes from _UNBIASED up are skipped, so that every character stays equally likely.
        chars += [_ALPHABET[b % len(_ALPHABET)] for b in _pool.take(length + 8) if b < _UNBIASED]
    return prefix + "".join(chars[:length])
