"""Compact JSON text, from one encoder built once.

``json.dumps(value, separators=(",", ":"))`` builds a new ``JSONEncoder`` on every
call (only a call with every argument at its default reuses one); a hold writes
several JSON columns and answers with a JSON body, so the gateway keeps its own.
"""

from __future__ import annotations

import json
from typing import Any

_COMPACT = json.JSONEncoder(separators=(",", ":"))


def compact(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))``: the same text."""
    return _COMPACT.encode(value)
