"""Property: what the rules saw is exactly what the upstream received.

Generated requests, spelled the many ways an agent may spell them (percent-
escapes in any case, ``+`` or ``%20``, encoded brackets, ``[]`` or ``[0]`` lists,
lists out of order, ``//`` and ``/./`` in paths, trailing ``/``), go through a
real gateway with an allow-all rule to the fake Stripe upstream. For each one:

- the rules saw the generated method, the canonical path and the generated
  parameters (our parser agrees with what was meant);
- the upstream received the canonical bytes of exactly that (path, query,
  body), and its own independent parser (aiohttp + localstripe's) reads the
  same parameters the rules saw.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.canonical import encode_form
from gateway.keys import POLICY
from gateway.rules import RuleRequest
from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY, Upstream
from tests.support.rawhttp import RawResponse, build, send

RULES = Path(__file__).parent / "data" / "rules_allow_all"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
HTTP = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Recording:
    """Wraps the rule set in force and keeps every RuleRequest it is asked about."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[RuleRequest] = []

    def decide(self, req: RuleRequest, usage: Any = None) -> Any:
        self.seen.append(req)
        return self.inner.decide(req, usage)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fake_stripe: str) -> Iterator[GatewayThread]:
    tmp = tmp_path_factory.mktemp("canonical-forward")
    settings_ = settings_for(tmp, fake_stripe, RULES, rules_watch=0)
    with gateway_thread(settings_) as gateway:
        assert gateway.app is not None
        policy = gateway.app[POLICY]
        policy.current = Recording(policy.current)  # type: ignore[assignment]
        yield gateway


@pytest.fixture(scope="module")
def up(fake_stripe: str) -> Iterator[Upstream]:
    with Upstream(fake_stripe) as helper:
        helper.clear_faults()
        yield helper


# -- what an agent means ---------------------------------------------------------------

# Path segments: Stripe words (lower case, as Stripe spells them) and ids in any case.
_segments = st.sampled_from(
    ["customers", "products", "prices", "charges", "search", "cus_AbC123", "prod_Xy9Z", "a-b~c"]
)
_names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
_text = st.text(
    st.characters(exclude_categories=["Cs", "Cc"]) | st.sampled_from(["\n", "\t"]), max_size=10
)
_subkeys = st.text(
    st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="[]"), min_size=1, max_size=6
).filter(lambda s: not (s.isascii() and s.isdigit()))
_form_values = st.recursive(
    _text,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(_subkeys, inner, min_size=1, max_size=3)
    ),
    max_leaves=10,
)
_form_params = st.dictionaries(_names, _form_values, max_size=5)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_subkeys, inner, max_size=3),
    max_leaves=10,
)
_json_params = st.dictionaries(_names, _json_values, max_size=5)


# -- how an agent may spell it ------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")


def _escape(char: str, rnd: random.Random) -> str:
    text = "".join(f"%{byte:02X}" for byte in char.encode())
    return text.lower() if rnd.random() < 0.5 else text


def spell_text(text: str, rnd: random.Random) -> str:
    """Form-encode text, escaping unreserved characters or not, spaces as + or %20."""
    out = []
    for char in text:
        if char in _UNRESERVED:
            out.append(_escape(char, rnd) if rnd.random() < 0.2 else char)
        elif char == " ":
            out.append("+" if rnd.random() < 0.5 else _escape(char, rnd))
        else:
            out.append(_escape(char, rnd))
    return "".join(out)


def _bracket(sub: str, rnd: random.Random) -> str:
    open_, close = ("[", "]") if rnd.random() < 0.6 else (_escape("[", rnd), _escape("]", rnd))
    return f"{open_}{sub}{close}"


def spell_pairs(name: str, value: Any, rnd: random.Random) -> list[str]:
    """``name[sub]...=value`` pairs for one parameter, lists as [] or [i], maybe shuffled."""
    if isinstance(value, str):
        return [f"{name}={spell_text(value, rnd)}"]
    if isinstance(value, dict):
        return [
            pair
            for key, item in value.items()
            for pair in spell_pairs(name + _bracket(spell_text(key, rnd), rnd), item, rnd)
        ]
    if all(isinstance(item, str) for item in value) and rnd.random() < 0.5:
        return [f"{name}{_bracket('', rnd)}={spell_text(item, rnd)}" for item in value]
    groups = [spell_pairs(name + _bracket(str(i), rnd), item, rnd) for i, item in enumerate(value)]
    if rnd.random() < 0.3:
        rnd.shuffle(groups)  # indices say the order, not the position ([] pairs keep theirs)
    return [pair for group in groups for pair in group]


def spell_path(segments: list[str], rnd: random.Random, root: str = "v1") -> str:
    path = ""
    for segment in [root, *segments]:
        # A leading "//" would name a host (refused): the first separator is always one "/".
        path += rnd.choice(["/", "/", "/", "//", "/./"]) if path else "/"
        path += "".join(
            _escape(char, rnd) if char != "." and rnd.random() < 0.15 else char for char in segment
        )
    return path + ("/" if rnd.random() < 0.3 else "")


def _only(up: Upstream) -> dict[str, Any]:
    received = up.requests()
    assert len(received) == 1, received
    return received[0]


def _send(
    gw: GatewayThread, method: str, target: str, content_type: str | None, body: bytes | None
) -> RawResponse:
    headers = [("Authorization", f"Bearer {TEST_STRIPE_KEY}")]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    return send(gw.settings.port, build(method, target, headers=headers, body=body))


@HTTP
@given(
    st.sampled_from(["GET", "DELETE", "POST"]),
    st.lists(_segments, min_size=1, max_size=3),
    _form_params,
    st.randoms(use_true_random=False),
)
def test_form_and_query_requests_are_forwarded_as_the_rules_saw_them(
    gw: GatewayThread,
    up: Upstream,
    method: str,
    segments: list[str],
    params: dict[str, Any],
    rnd: random.Random,
) -> None:
    names = list(params)
    rnd.shuffle(names)
    encoded = "&".join(pair for name in names for pair in spell_pairs(name, params[name], rnd))
    path = spell_path(segments, rnd)
    canonical_path = "/v1/" + "/".join(segments)
    up.clear_requests()
    recording: Recording = gw.app[POLICY].current  # type: ignore[assignment,index]
    recording.seen.clear()
    if method == "POST":
        resp = _send(gw, method, path, FORM if encoded else None, encoded.encode() or None)
    else:
        resp = _send(gw, method, f"{path}?{encoded}" if encoded else path, None, None)
    # Refused by the gateway, the rules would have seen nothing.
    assert len(recording.seen) == 1, resp.raw[:600]
    [seen] = recording.seen
    assert (seen.method, seen.path, seen.params) == (method, canonical_path, params)
    received = _only(up)
    assert (received["method"], received["path"]) == (method, canonical_path)
    canonical = encode_form(seen.params)  # in the order the rules saw the parameters
    if method == "POST":
        assert received["target"] == canonical_path
        assert received["body"] == canonical
        assert received["params"] == params  # the upstream's own parser agrees
    else:
        assert received["target"] == canonical_path + (f"?{canonical}" if canonical else "")
        assert received["body"] == ""
        assert received["query"] == params


@HTTP
@given(
    st.lists(_segments, min_size=1, max_size=2),
    _json_params,
    st.randoms(use_true_random=False),
)
def test_json_requests_are_forwarded_as_the_rules_saw_them(
    gw: GatewayThread,
    up: Upstream,
    segments: list[str],
    params: dict[str, Any],
    rnd: random.Random,
) -> None:
    path = spell_path(segments, rnd, root="v2")
    canonical_path = "/v2/" + "/".join(segments)
    body = json.dumps(params, ensure_ascii=rnd.random() < 0.5, indent=rnd.choice([None, 2]))
    up.clear_requests()
    recording: Recording = gw.app[POLICY].current  # type: ignore[assignment,index]
    recording.seen.clear()
    resp = _send(gw, "POST", path, JSON, body.encode())
    assert len(recording.seen) == 1, resp.raw[:600]
    [seen] = recording.seen
    assert (seen.method, seen.path, seen.params) == ("POST", canonical_path, params)
    received = _only(up)
    assert (received["method"], received["target"]) == ("POST", canonical_path)
    compact = json.dumps(seen.params, separators=(",", ":"), ensure_ascii=False)
    assert received["body"] == compact
    assert received["params"] == params


def test_spelling_helpers_are_honest() -> None:
    """The spellings really vary and still mean the same thing (guards the generator)."""
    rnd = random.Random(7)
    spelled = {spell_text("a b&c", rnd) for _ in range(50)}
    assert len(spelled) > 3
    assert all(quote("&") in s or "%26" in s.upper() for s in spelled)
