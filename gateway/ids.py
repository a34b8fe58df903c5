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
from collections import deque

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


class _RandomText:
    """Runs of random base64url characters (sorted alphabet), cut from one encoded read.

    A request id's 72 random bits are 12 characters of 6 bits each: encoding 3 KiB of
    randomness at once and handing out 12 characters at a time gives the same ids as
    encoding 9 bytes per id, for a fraction of the work. Each run is handed out once
    (``deque.popleft`` is atomic); a forked child starts with none.
    """

    def __init__(self, chars: int) -> None:
        assert chars % 4 == 0, "a run must encode whole bytes, with no padding"
        self._chars = chars
        self._runs: deque[str] = deque()

    def take(self) -> str:
        try:
            return self._runs.popleft()
        except IndexError:
            count = _CHUNK // self._chars
            text = _encode(_pool.take(count * self._chars * 3 // 4))
            self._runs.extend(text[i : i + self._chars] for i in range(0, len(text), self._chars))
            return self._runs.popleft()

    def forget(self) -> None:
        self._runs = deque()


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).translate(_SORTED).decode("ascii")


_request_tails = _RandomText(12)  # 9 random bytes' worth
os.register_at_fork(after_in_child=_request_tails.forget)
# The time in ms is 48 bits, 8 characters of 6 bits each: the first 6 characters are its
# bits above the lowest 12 (they change every 4,096 ms), the last 2 its lowest 12 bits.
_LOW_STAMPS = tuple(_encode(low.to_bytes(6, "big"))[6:] for low in range(4096))
_request_high = (-1, "")  # the last 4,096 ms a request id was made in, encoded


def request_id() -> str:
    """``req_``, the time in ms and 72 random bits, URL-safe: the id of one answered request.

    Ids sort by time (to the millisecond; in random order within one): the 6 bytes of the
    time in ms encode to 8 characters on their own, the first 6 of them encoded once
    every 4 seconds and the last 2 looked up.
    """
    ms = time.time_ns() // 1_000_000
    global _request_high
    high = _request_high
    if high[0] != ms >> 12:
        high = _request_high = (ms >> 12, "req_" + _encode(ms.to_bytes(6, "big"))[:6])
    return high[1] + _LOW_STAMPS[ms & 0xFFF] + _request_tails.take()


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
