"""An attacker who controls the agent's requests: no unapproved refund, no other host.

Table-driven: every attack is sent as raw bytes (so nothing normalises it on
the way) to a real gateway whose rules ALLOW some writes with wildcards
(tests/data/rules_attack). Each must end held (202), denied (403) or refused
(4xx), and the stateful upstream must show that no money moved: no refund on
the charge, and no write request received at all — except where the rules read a
value exactly as Stripe does and allow it (``amount=-500`` is the integer -500): then
Stripe's own refusal is the end, and still no money moves.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import stripe

from gateway.stripe_api import PATH_WORDS
from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY, Upstream
from tests.support.rawhttp import RecordingServer, build, send

RULES = Path(__file__).parent / "data" / "rules_attack"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
AUTH = ("Authorization", f"Bearer {TEST_STRIPE_KEY}")
HELD, DENIED, BAD, NOT_ALLOWED, UNSUPPORTED = 202, 403, 400, 405, 415
REFUND = "charge={ch}&amount=5000"  # over the small-refunds limit: only a misreading allows it


@dataclass(frozen=True)
class Attack:
    """One request an attacker sends, and how the gateway must end it."""

    id: str
    target: str
    expect: int
    method: str = "POST"
    body: str | bytes | None = REFUND
    content_type: str | None = FORM
    headers: tuple[tuple[str, str], ...] = ()
    # The rules read it as Stripe does and allow it; Stripe itself refuses it.
    stripe_refuses: bool = False

    def request(self, charge: str) -> bytes:
        headers = [AUTH, *self.headers]
        body = self.body
        if isinstance(body, str):
            body = body.replace("{ch}", charge).encode()
        if body is not None and self.content_type is not None:
            headers.append(("Content-Type", self.content_type))
        return build(self.method, self.target.replace("{ch}", charge), headers=headers, body=body)


def _paths() -> list[Attack]:
    refused = [
        ("dotdot", "/v1/customers/../refunds"),
        ("dotdot-deep", "/v1/products/x/../../refunds"),
        ("dotdot-encoded", "/v1/products/%2e%2e/%2e%2e/refunds"),
        ("dotdot-encoded-upper", "/v1/products/%2E%2E/%2E%2E/refunds"),
        ("dotdot-half-encoded", "/v1/products/.%2e/.%2E/refunds"),
        ("slash-encoded", "/v1/customers/..%2Frefunds"),
        ("slash-encoded-lower", "/v1/customers/x%2f..%2f..%2frefunds"),
        ("slash-double-encoded", "/v1/customers/..%252Frefunds"),
        ("dots-double-encoded", "/v1/products/%252e%252e/%252e%252e/refunds"),
        ("backslash", "/v1/products/..\\..\\refunds"),
        ("backslash-encoded", "/v1/products/..%5C..%5Crefunds"),
        ("semicolon-segment", "/v1/products/x;/../../refunds"),
        ("semicolon-param", "/v1/refunds;amount=500"),
        ("semicolon-encoded", "/v1/customers/cus_1%3Bx"),
        ("nul", "/v1/customers/cus_1%00/../../refunds"),
        ("authority-form-slashes", "//v1/refunds"),
        ("triple-slash", "///v1/refunds"),
        ("case-upper", "/v1/REFUNDS"),
        ("case-title", "/v1/Refunds"),
        ("case-root", "/V1/refunds"),
        ("case-under-wildcard", "/v1/customers/cus_1/../REFUNDS"),
        ("suffix-json", "/v1/refunds.json"),
        ("suffix-under-wildcard", "/v1/customers/refunds.json"),
        ("outside-api-root", "/refunds"),
        ("above-root", "/%2e%2e/v1/refunds"),
        ("fullwidth-letter", "/v1/%EF%BD%92efunds"),
        ("trailing-space", "/v1/refunds%20"),
        ("trailing-tab", "/v1/refunds%09"),
        ("fragment", "/v1/customers/cus_1#/../../refunds"),
        ("glob", "/v1/customers/*"),
        ("absolute-form", "http://api.stripe.com/v1/customers/cus_1"),
        ("absolute-form-https", "https://api.stripe.com/v1/refunds"),
    ]
    normalised_then_held = [
        ("double-slash-inside", "/v1//refunds"),
        ("dot-segment", "/v1/./refunds"),
        ("trailing-slash", "/v1/refunds/"),
        ("encoded-letter", "/v1/%72efunds"),
        ("empty-query", "/v1/refunds?"),
    ]
    return [Attack(f"path-{name}", target, BAD) for name, target in refused] + [
        Attack(f"path-{name}", target, HELD) for name, target in normalised_then_held
    ]


def _params() -> list[Attack]:
    duplicates = [
        ("twice", "charge={ch}&amount=500&amount=5000"),
        ("twice-reversed", "charge={ch}&amount=5000&amount=500"),
        ("encoded-key", "charge={ch}&amount=500&am%6Funt=5000"),
        ("encoded-brackets", "charge={ch}&amount=5000&metadata[k]=1&metadata%5Bk%5D=2"),
        ("scalar-and-list", "charge={ch}&amount=500&amount[]=5000"),
        ("scalar-and-object", "charge={ch}&amount=500&amount[x]=5000"),
        ("charge-twice", "charge={ch}&charge=ch_other&amount=500"),
    ]
    strict_numbers = [
        ("plus", "%2B500"),
        ("plus-as-space", "+500"),
        ("hex", "0x10"),
        ("leading-space", "%20500"),
        ("trailing-space", "500%20"),
        ("trailing-nul", "500%00"),
        ("leading-zero", "0500"),
        ("leading-zeros", "05000"),
        ("exponent", "5e2"),
        ("decimal", "500.0"),
        ("decimal-zeros", "500.00"),
        ("decimal-zero", "0.0"),
        ("fullwidth-digits", "%EF%BC%95%EF%BC%90%EF%BC%90"),
        ("devanagari-digits", "%E0%A5%AB%E0%A5%A6%E0%A5%A6"),
        ("huge", "9" * 400),
        ("empty", ""),
        ("underscore", "5_00"),
    ]
    shapes = [
        ("list", "charge={ch}&amount[]=500"),
        ("list-indexed", "charge={ch}&amount[0]=500"),
        ("object", "charge={ch}&amount[value]=500"),
        ("missing-full-refund", "charge={ch}"),
    ]
    malformed = [
        ("no-equals", "charge={ch}&amount"),
        ("bad-escape", "charge={ch}&amount=5%zz"),
        ("empty-pair", "charge={ch}&&amount=500"),
        ("bad-list-index", "charge={ch}&amount[01]=500"),
        ("method-param", "charge={ch}&amount=5000&_method=GET"),
    ]
    return (
        [Attack(f"dup-{name}", "/v1/refunds", BAD, body=body) for name, body in duplicates]
        + [
            Attack(f"number-{name}", "/v1/refunds", HELD, body=f"charge={{ch}}&amount={value}")
            for name, value in strict_numbers
        ]
        + [Attack(f"shape-{name}", "/v1/refunds", HELD, body=body) for name, body in shapes]
        + [Attack(f"form-{name}", "/v1/refunds", BAD, body=body) for name, body in malformed]
        + [
            Attack("split-query-amount", "/v1/refunds?amount=500", BAD, body="charge={ch}"),
            Attack("split-query-dup", "/v1/refunds?amount=500", BAD),
            Attack("all-in-query", "/v1/refunds?charge={ch}&amount=500", BAD, body=None),
            Attack("bad-utf8", "/v1/refunds", BAD, body=b"charge=\xff&amount=500"),
            # "-500" IS an integer, so it passes 'amount: {lte: 1000}' as -500, exactly as
            # Stripe reads it; Stripe refuses a negative refund, so no money moves.
            Attack(
                "number-negative",
                "/v1/refunds",
                BAD,
                body="charge={ch}&amount=-500",
                stripe_refuses=True,
            ),
            Attack(
                "json-to-v1",
                "/v1/refunds",
                UNSUPPORTED,
                body='{"charge": "{ch}", "amount": 500}',
                content_type=JSON,
            ),
            Attack(
                "json-to-v1-charge-in-query",
                "/v1/refunds?charge={ch}",
                UNSUPPORTED,
                body='{"amount": 500}',
                content_type=JSON,
            ),
        ]
    )


def _bodies() -> list[Attack]:
    gz = gzip.compress(b"charge={ch}&amount=5000")
    return [
        Attack("type-text-plain", "/v1/refunds", UNSUPPORTED, content_type="text/plain"),
        Attack("type-multipart", "/v1/refunds", UNSUPPORTED, content_type="multipart/form-data"),
        Attack("type-missing", "/v1/refunds", UNSUPPORTED, content_type=None),
        Attack("type-latin1", "/v1/refunds", UNSUPPORTED, content_type=FORM + "; charset=latin-1"),
        Attack("type-json-as-form", "/v1/refunds", BAD, body='{"amount": 500}'),
        Attack(
            "encoding-unknown",
            "/v1/refunds",
            UNSUPPORTED,
            headers=(("Content-Encoding", "x-custom"),),
        ),
        # A compressed body is read (decompressed) and judged, never ignored as "empty".
        Attack("encoding-gzip-judged", "/v1/refunds", HELD, body=gz, headers=_gzip()),
    ]


def _gzip() -> tuple[tuple[str, str], ...]:
    return (("Content-Encoding", "gzip"),)


def _methods() -> list[Attack]:
    overrides = [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-Original-Method",
    ]
    return (
        [
            Attack("method-put", "/v1/refunds", NOT_ALLOWED, method="PUT"),
            Attack("method-patch", "/v1/customers/cus_1", NOT_ALLOWED, method="PATCH"),
            Attack("method-options", "/v1/refunds", NOT_ALLOWED, method="OPTIONS", body=None),
            Attack("method-trace", "/v1/refunds", NOT_ALLOWED, method="TRACE", body=None),
            Attack("method-propfind", "/v1/refunds", NOT_ALLOWED, method="PROPFIND", body=None),
            Attack("get-with-body", "/v1/refunds", BAD, method="GET"),
            Attack("head-with-body", "/v1/refunds", BAD, method="HEAD"),
            Attack("delete-with-body", "/v1/customers/cus_1", BAD, method="DELETE"),
            Attack("method-param-query", "/v1/charges?_method=POST", BAD, method="GET", body=None),
            Attack(
                "method-param-body",
                "/v1/customers/cus_1",
                BAD,
                body="_method=DELETE",
            ),
            Attack("denied-delete", "/v1/customers/cus_1", DENIED, method="DELETE", body=None),
            Attack(
                "denied-delete-normalised",
                "/v1//customers/./cus_1/",
                DENIED,
                method="DELETE",
                body=None,
            ),
        ]
        + [
            Attack(
                f"override-{h}", "/v1/customers/cus_1", BAD, body="name=x", headers=((h, "DELETE"),)
            )
            for h in overrides
        ]
        + [
            Attack(
                f"override-{h}-on-refund",
                "/v1/refunds",
                BAD,
                body="charge={ch}&amount=500",
                headers=((h, "GET"),),
            )
            for h in overrides
        ]
    )


ATTACKS = _paths() + _params() + _bodies() + _methods()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fake_stripe: str) -> Iterator[GatewayThread]:
    tmp = tmp_path_factory.mktemp("attacks")
    with gateway_thread(settings_for(tmp, fake_stripe, RULES)) as gateway:
        yield gateway


def no_money_moved(upstream: Upstream, charge: str) -> None:
    """No refund on the charge, and the upstream received no write at all."""
    assert [r for r in upstream.refunds(charge) if r["charge"] == charge] == []
    writes = [r for r in upstream.requests() if r["method"] not in ("GET", "HEAD")]
    assert writes == [], writes


def stripe_refused(upstream: Upstream, charge: str) -> None:
    """No refund on the charge; the one write the upstream received, it refused."""
    assert [r for r in upstream.refunds(charge) if r["charge"] == charge] == []
    writes = [r for r in upstream.requests() if r["method"] not in ("GET", "HEAD")]
    assert [(w["method"], w["path"]) for w in writes] == [("POST", "/v1/refunds")], writes
    assert 400 <= writes[0]["status"] < 500, writes


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
def test_attack_ends_held_denied_or_refused(
    gw: GatewayThread, upstream: Upstream, attack: Attack
) -> None:
    charge = upstream.create_charge(amount=5000)["id"]
    resp = send(gw.settings.port, attack.request(charge))
    assert resp.status == attack.expect, resp.raw[:600]
    if attack.method != "HEAD":
        body = resp.json()
        if resp.status == HELD:
            assert body["object"] == "cosigner.action" and body["status"] == "awaiting_approval"
            assert body["path"] == "/v1/refunds"
        else:
            # The gateway's own refusals carry a code; Stripe's pass through as it wrote them.
            fields = {"type", "message"} if attack.stripe_refuses else {"type", "code", "message"}
            assert set(body["error"]) >= fields
    if attack.stripe_refuses:
        stripe_refused(upstream, charge)
    else:
        no_money_moved(upstream, charge)


def test_the_attack_rules_do_allow_writes(gw: GatewayThread, upstream: Upstream) -> None:
    """Controls: the wildcard rules really forward writes, so the attacks above could fail."""
    charge = upstream.create_charge(amount=5000)["id"]
    small = send(
        gw.settings.port,
        Attack("ok", "/v1/refunds", 200, body="charge={ch}&amount=500").request(charge),
    )
    assert small.status == 200, small.raw[:600]
    assert [r["amount"] for r in upstream.refunds(charge)] == [500]
    customer = upstream.client().v1.customers.create({"email": "a@example.com"})
    updated = send(
        gw.settings.port,
        Attack("ok", f"/v1/customers/{customer.id}", 200, body="name=Ann").request(charge),
    )
    assert updated.status == 200 and updated.json()["name"] == "Ann"


def test_a_body_cut_short_is_never_read_as_what_arrived(
    gw: GatewayThread, upstream: Upstream
) -> None:
    charge = upstream.create_charge(amount=5000)["id"]
    body = f"charge={charge}&amount=500".encode()
    data = build(
        "POST",
        "/v1/refunds",
        headers=[AUTH, ("Content-Type", FORM), ("Content-Length", str(len(body) + 40))],
        body=body,
    )
    resp = send(gw.settings.port, data, half_close=True)
    assert resp.status in (0, BAD), resp.raw[:600]  # the client is gone; nothing is sent
    no_money_moved(upstream, charge)


# -- the upstream is fixed ---------------------------------------------------------------


@pytest.fixture
def evil() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


HOST_HEADERS = [
    ("Host", "{evil}"),
    ("X-Forwarded-Host", "{evil}"),
    ("X-Forwarded-Server", "{evil}"),
    ("X-Host", "{evil}"),
    ("Forwarded", "host={evil};proto=http"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Port", "{port}"),
    ("X-Original-URL", "/v1/refunds"),
    ("X-Rewrite-URL", "/v1/refunds"),
]


@pytest.mark.parametrize(("header", "value"), HOST_HEADERS, ids=[h for h, _ in HOST_HEADERS])
def test_headers_never_change_where_a_request_goes(
    gw: GatewayThread, upstream: Upstream, evil: RecordingServer, header: str, value: str
) -> None:
    charge = upstream.create_charge(amount=4200)["id"]
    value = value.format(evil=evil.authority, port=evil.port)
    headers = [AUTH, (header, value)]
    if header == "Host":  # the Host line itself is the attack: replace the default one
        data = build("GET", f"/v1/charges/{charge}", headers=[AUTH], host=value)
    else:
        data = build("GET", f"/v1/charges/{charge}", headers=headers)
    resp = send(gw.settings.port, data)
    assert resp.status == 200, resp.raw[:600]
    assert resp.json()["id"] == charge and resp.json()["amount"] == 4200
    assert evil.requests == []
    seen = upstream.requests(method="GET", path=f"/v1/charges/{charge}")
    assert len(seen) == 1
    forwarded = {name.lower() for name in seen[0]["headers"]}
    assert header.lower() not in forwarded or header == "Host"
    assert seen[0]["headers"].get("Host", "").endswith(upstream.url.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    "target",
    [
        "http://{evil}/v1/charges/{ch}",
        "http://{evil}/v1/refunds",
        "https://{evil}/v1/charges/{ch}",
        "//{evil}/v1/charges/{ch}",
        "/v1/charges/{ch}/..%2F..%2F..%2F@{evil}",
        "/%2F{evil}/v1/charges/{ch}",
    ],
)
def test_request_targets_never_name_another_host(
    gw: GatewayThread, upstream: Upstream, evil: RecordingServer, target: str
) -> None:
    charge = upstream.create_charge(amount=4200)["id"]
    target = target.format(evil=evil.authority, ch=charge)
    method = "POST" if target.endswith("/refunds") else "GET"
    body = f"charge={charge}&amount=500".encode() if method == "POST" else None
    headers = [AUTH, ("Content-Type", FORM)] if body else [AUTH]
    resp = send(gw.settings.port, build(method, target, headers=headers, body=body))
    assert resp.status == BAD, resp.raw[:600]
    assert evil.requests == []
    assert upstream.requests() == []


def test_at_sign_in_a_path_stays_in_the_path(
    gw: GatewayThread, upstream: Upstream, evil: RecordingServer
) -> None:
    """``/v1/charges/@evil`` is a path segment: it goes to the one upstream (404 there)."""
    resp = send(gw.settings.port, build("GET", f"/v1/charges/@{evil.authority}", headers=[AUTH]))
    assert resp.status == 404
    assert evil.requests == []
    assert [r["path"] for r in upstream.requests()] == [f"/v1/charges/@{evil.authority}"]


def test_connect_is_never_a_tunnel(
    gw: GatewayThread, upstream: Upstream, evil: RecordingServer
) -> None:
    resp = send(
        gw.settings.port, build("CONNECT", evil.authority, headers=[AUTH], host=evil.authority)
    )
    assert 400 <= resp.status < 500, resp.raw[:600]
    assert evil.requests == [] and upstream.requests() == []


# -- the list of Stripe's path words tracks the SDK -----------------------------------------


def test_every_fixed_segment_the_stripe_sdk_calls_is_a_known_word() -> None:
    """A newer SDK with new resources: this names the words to add to gateway/stripe_api.py."""
    root = Path(stripe.__file__).parent
    words: set[str] = set()
    for source in root.rglob("*.py"):
        for match in re.finditer(r'"(/v[0-9]+/[^"]*)"', source.read_text(encoding="utf-8")):
            for segment in match.group(1).split("/")[2:]:
                if segment and "{" not in segment and "%" not in segment:
                    words.add(segment)
    assert len(words) > 100
    assert words - PATH_WORDS == set()
    assert all(word == word.lower() for word in PATH_WORDS)


def test_ids_keep_their_case(gw: GatewayThread, upstream: Upstream) -> None:
    """Only Stripe's words are case-checked: an id in any case reaches Stripe as sent."""
    charge = upstream.create_charge(amount=4200)["id"]
    assert charge != charge.lower()
    resp = send(gw.settings.port, build("GET", f"/v1/charges/{charge}", headers=[AUTH]))
    assert resp.status == 200 and resp.json()["id"] == charge
