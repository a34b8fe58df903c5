"""The Jinja2 environment and display helpers shared by reviewer emails and web pages.

HTML templates are autoescaped; text templates (``*.txt``) are not, so every
value an agent controls goes through ``oneline`` there: a parameter value
cannot start a fake line ("Approve here: ...") in a reviewer's email.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2

from gateway.store.base import ActionRecord
from gateway.summary import format_amount, strict_int

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


@cache
def environment() -> jinja2.Environment:
    """The one template environment (templates live in ``gateway/web/templates``)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway", "web/templates"),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html",), disabled_extensions=("txt",), default=True
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["ts"] = format_ts
    env.filters["oneline"] = oneline
    env.filters["pretty_json"] = pretty_json
    return env


def render(name: str, **context: Any) -> str:
    """Render one template."""
    return environment().get_template(name).render(**context)


def format_ts(value: float | int | None) -> str:
    """A Unix time as ``2024-11-19 07:06:40 UTC``."""
    if value is None:
        return "—"
    moment = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def oneline(value: Any, limit: int = 0) -> str:
    """A value on one line: control characters shown escaped, optionally shortened."""
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(value))
    if limit and len(text) > limit:
        return f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text


def pretty_json(value: str | None) -> str:
    """Stripe's body indented for reading; anything that is not JSON as it came."""
    if value is None:
        return ""
    try:
        return json.dumps(json.loads(value), indent=2, ensure_ascii=False, sort_keys=False)
    except ValueError:
        return value


def flatten(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested parameters as spelled on the wire: ``metadata[order]``, ``items[0][price]``."""
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from flatten(value, name)
        elif isinstance(value, list):
            yield from flatten({str(i): v for i, v in enumerate(value)}, name)
        else:
            yield name, value


def _is_amount(name: str) -> bool:
    leaf = name.rsplit("[", 1)[-1].rstrip("]")
    return leaf == "amount" or leaf.endswith("_amount")


@dataclass(frozen=True, slots=True)
class ParamRow:
    """One parameter as reviewers see it."""

    name: str
    value: str  # as the agent sent it
    shown: str  # with the amount in currency units where that applies
    modified: str | None = None  # a reviewer's new value, if any
    modified_shown: str | None = None
    editable: bool = False


def currency_of(action: ActionRecord) -> str | None:
    """The currency amounts are in: the request's own, or the one looked up at hold time."""
    value = action.params.get("currency") or action.context.get("currency")
    return str(value) if value else None


def show_value(name: str, value: Any, currency: str | None) -> str:
    """``4999`` → ``4999 ($49.99 USD)`` for amounts; other values as sent."""
    text = "" if value is None else str(value)
    if not _is_amount(name) or strict_int(value) is None:
        return text
    if not currency:  # e.g. a refund whose charge could not be looked up
        return f"{text} (minor units, currency unknown)"
    return f"{text} ({format_amount(value, currency)})"


def param_rows(action: ActionRecord) -> list[ParamRow]:
    """Every parameter, original and (if a reviewer changed it) modified."""
    currency = currency_of(action)
    modified = dict(flatten(action.modified_params or {}))
    rows = []
    seen: set[str] = set()
    for name, value in flatten(action.params):
        seen.add(name)
        new = modified.get(name)
        rows.append(
            ParamRow(
                name=name,
                value=str(value),
                shown=show_value(name, value, currency),
                modified=None if new is None else str(new),
                modified_shown=None if new is None else show_value(name, new, currency),
                editable=name in action.editable,
            )
        )
    for name, new in modified.items():
        if name not in seen:  # a reviewer set a field the agent left out
            rows.append(
                ParamRow(
                    name=name,
                    value="",
                    shown="(not sent)",
                    modified=str(new),
                    modified_shown=show_value(name, new, currency),
                    editable=name in action.editable,
                )
            )
    return rows


def context_rows(action: ActionRecord) -> list[tuple[str, str]]:
    """Facts looked up at hold time (the charge's amount, what is still refundable ...)."""
    looked_up = action.context.get("looked_up")
    if isinstance(looked_up, Mapping):
        facts = looked_up.get("facts")
        rows = [(str(k), str(v)) for k, v in (facts.items() if isinstance(facts, Mapping) else ())]
        if looked_up.get("error"):
            rows.append(("Lookup", f"failed: {looked_up['error']}"))
        if looked_up.get("from"):
            at = f" at {looked_up['at']}" if looked_up.get("at") else ""
            rows.append(("Source", f"{looked_up['from']}{at}"))
        return rows
    currency = currency_of(action)
    return [(k, show_value(k, v, currency)) for k, v in flatten(action.context)]


def current_value(action: ActionRecord, name: str) -> str:
    """A field's value as it would be forwarded now (reviewers' edits included)."""
    merged = {**action.params, **(action.modified_params or {})}
    value = merged.get(name)
    return "" if value is None or isinstance(value, dict | list) else str(value)
