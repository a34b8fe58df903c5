"""The canonical reading of requests: attack tables, round trips, and what the real SDK sends."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import canonical
from gateway.canonical import (
    FORM,
    JSON,
    CanonicalRequest,
    build_params,
    encode_form,
    normalise_path,
    parse_pairs,
    read_request,
    with_params,
)
from gateway.errors import (
    CosignerError,
    DuplicateParameter,
    InvalidBody,
    InvalidPath,
    InvalidRequest,
    UnsupportedMediaType,
)

PROPERTY = settings(max_examples=200, deadline=None, database=None)


def post_form(body: str, query: str = "") -> CanonicalRequest:
    target = f"/v1/things?{query}" if query else "/v1/things"
    return read_request("POST", target, FORM, body.encode())


def reread(req: CanonicalRequest) -> CanonicalRequest:
    return read_request(req.method, req.target, req.content_type, req.body)


# --- paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("/v1/refunds", "/v1/refunds"),
        ("/v1/refunds/", "/v1/refunds"),
        ("/v1//refunds", "/v1/refunds"),
        ("/v1/refunds//", "/v1/refunds"),
        ("/v1/./refunds", "/v1/refunds"),
        ("/v1/refunds/.", "/v1/refunds"),
        ("/./", "/"),
        ("/v1/charges/ch_1%5F2", "/v1/charges/ch_1_2"),
        ("/v1/%63harges", "/v1/charges"),
        ("/v1/customers/cus_A-b~c:d@e!$&'()+,=", "/v1/customers/cus_A-b~c:d@e!$&'()+,="),
        ("/v1/a..b/.c", "/v1/a..b/.c"),
        ("/v2/core/events", "/v2/core/events"),
    ],
)
def test_paths_normalise(raw: str, canonical: str) -> None:
    assert normalise_path(raw) == canonical
    assert normalise_path(canonical) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "v1/refunds",
        "*",
        "http://evil.example/v1/refunds",
        "https:/v1/refunds",
        "//evil.example/v1/refunds",
        "///v1/refunds",
        "/v1/../v1/refunds",
        "/v1/refunds/..",
        "/..",
        "/v1/%2e%2e/refunds",
        "/v1/%2E%2E/refunds",
        "/v1/.%2e/refunds",
        "/v1/%2e/refunds",
        "/v1%2Frefunds",
        "/v1%2frefunds",
        "/v1/%5Crefunds",
        "/v1/%5crefunds",
        "/v1/a%252Fb",
        "/v1/a%252e%252e",
        "/v1/a%25",
        "/v1/a\\b",
        "/v1\\..\\x",
        "/v1/refunds;jsessionid=1",
        "/v1/a;b/c",
        "/v1/a%3Bb",
        "/v1/a b",
        "/v1/a%20b",
        "/v1/a\x00b",
        "/v1/a%00b",
        "/v1/a\tb",
        "/v1/a\r\nb",
        "/v1/a%0d%0ab",
        "/v1/caf\u00e9",
        "/v1/caf%C3%A9",
        "/v1/%FF",
        "/v1/a%zz",
        "/v1/a%4",
        "/v1/...",
        "/v1/%3F",
        "/v1/a#b",
        "/v1/a*b",
        "/v1/*",
        "/v1/a[0]",
        "/v1/a\ud800",
    ],
)
def test_paths_refused(raw: str) -> None:
    with pytest.raises(InvalidPath):
        normalise_path(raw)


def test_path_is_split_from_the_query() -> None:
    req = read_request("get", "/v1//charges/?limit=3", None, b"")
    assert (req.method, req.path, req.query, req.params) == (
        "GET",
        "/v1/charges",
        "limit=3",
        {"limit": "3"},
    )


@pytest.mark.parametrize("method", ["", "GE T", "GET\r\n", "PO\u00dfT"])
def test_bad_methods_refused(method: str) -> None:
    with pytest.raises(InvalidRequest):
        read_request(method, "/v1/charges", None, b"")


# --- parameters --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "params"),
    [
        ("a=1&b=2", {"a": "1", "b": "2"}),
        ("amount=0004999", {"amount": "0004999"}),
        ("a=", {"a": ""}),
        ("a==b", {"a": "=b"}),
        ("a=x+y", {"a": "x y"}),
        ("a=x%2By", {"a": "x+y"}),
        ("a+b=1", {"a b": "1"}),
        ("description=Jenny Rosen", {"description": "Jenny Rosen"}),
        ("name=caf\u00e9", {"name": "caf\u00e9"}),
        ("caf%C3%A9=%E2%82%AC", {"caf\u00e9": "\u20ac"}),
        ("a=%00", {"a": "\x00"}),
        ("a=1;b=2", {"a": "1;b=2"}),
        ("a=[x]", {"a": "[x]"}),
        ("metadata[k]=v&metadata[j]=w", {"metadata": {"k": "v", "j": "w"}}),
        ("metadata%5Bk%5D=v", {"metadata": {"k": "v"}}),
        ("metadata[a.b]=v", {"metadata": {"a.b": "v"}}),
        ("metadata[-1]=v", {"metadata": {"-1": "v"}}),
        ("metadata[1a]=v", {"metadata": {"1a": "v"}}),
        ("expand[]=a&expand[]=b", {"expand": ["a", "b"]}),
        ("a[b][]=x", {"a": {"b": ["x"]}}),
        ("expand[0]=a&expand[1]=b", {"expand": ["a", "b"]}),
        ("items[1][price]=y&items[0][price]=x", {"items": [{"price": "x"}, {"price": "y"}]}),
        ("items[0][price]=x&items[0][quantity]=2", {"items": [{"price": "x", "quantity": "2"}]}),
        ("a[b][c][0]=z", {"a": {"b": {"c": ["z"]}}}),
        ("0=x", {"0": "x"}),
        ("&".join(f"n[{i}]={i}" for i in range(12)), {"n": [str(i) for i in range(12)]}),
    ],
)
def test_form_params(body: str, params: dict[str, Any]) -> None:
    req = post_form(body)
    assert req.params == params
    assert req.content_type == FORM
    assert reread(req) == req


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("", "a=1&a=2"),
        ("", "metadata[k]=1&metadata[k]=2"),
        ("", "metadata%5Bk%5D=1&metadata[k]=2"),
        ("", "metadata%5bk%5d=1&metadata[k]=2"),
        ("", "a+b=1&a%20b=2"),
        ("", "%61=1&a=2"),
        ("", "a=1&a[b]=2"),
        ("", "a[b]=2&a=1"),
        ("", "a[b][c]=1&a[b]=2"),
        ("", "a[]=1&a[0]=2"),
        ("", "a[0]=1&a[]=2"),
        ("", "a[]=1&a=2"),
        ("", "a=1&a[]=2"),
        ("", "a[0]=1&a[0]=2"),
        ("", "a[b]=1&a[0]=2"),
        ("", "a[0]=1&a[b]=2"),
        ("amount=1&amount=2", ""),
        ("amount=1", "amount=2"),
        ("amount=1", "amount=1"),
        ("metadata[a]=1", "metadata[b]=2"),
        ("expand[]=a", "expand[]=b"),
    ],
)
def test_duplicates_refused(query: str, body: str) -> None:
    with pytest.raises(DuplicateParameter):
        post_form(body, query)


@pytest.mark.parametrize(
    "body",
    [
        "a",
        "a=1&b",
        "a=1&&b=2",
        "a=1&",
        "&a=1",
        "&",
        " ",
        "=1",
        "[a]=1",
        "a]=1",
        "a[b=1",
        "a[b]c=1",
        "a[b]]=1",
        "a[[b]]=1",
        "a[b][=1",
        "a[b][c]]=1",
        "a[b][[c]=1",
        "a]b[c]=1",
        "a][b]=1",
        "a[b][c=1",
        "a[b]x[c]=1",
        "a[b][c][=1",
        "a[][b]=1",
        "%5Ba%5D=1",
        "items[01]=x",
        "items[00]=x",
        "items[1]=x",
        "items[0]=a&items[2]=b",
        "items[1234567890]=x",
        "a=%zz",
        "a=%4",
        "a%=1",
        "a=%C3",
        "a=%FF",
        "a=%ED%A0%80",
        "a=\x01",
        "a=1\n",
        "a=1\r\nb=2",
        "a=\x7f",
        "amount%00=1",
        "metadata[k%0A]=1",
        "a%7F=1",
        "a" + "[b]" * 33 + "=1",
    ],
)
def test_malformed_form_refused(body: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        post_form(body)
    assert not isinstance(caught.value, DuplicateParameter)


@pytest.mark.parametrize(
    "body", ["amount%00=1", "metadata[k%0A]=1", "a%7F=1", "a%1f[b]=1", "a[b%0d]=1&a[c]=2"]
)
def test_control_characters_in_names_are_refused_as_such(body: str) -> None:
    with pytest.raises(InvalidRequest, match="Parameter names may not contain control"):
        post_form(body)
    with pytest.raises(InvalidRequest, match="Parameter names may not contain control"):
        build_params(parse_pairs(body))


def test_semicolon_is_data_and_is_escaped_on_the_forward() -> None:
    req = post_form("amount=100;amount=99999")
    assert req.params == {"amount": "100;amount=99999"}
    assert req.body == b"amount=100%3Bamount%3D99999"


def test_deepest_allowed_nesting_reads() -> None:
    req = post_form("a" + "[b]" * 32 + "=1")
    assert reread(req) == req


def test_parse_pairs_and_build_params_directly() -> None:
    assert parse_pairs("") == []
    assert parse_pairs("a%5B0%5D=x+y&b=") == [("a[0]", "x y"), ("b", "")]
    into: dict[str, Any] = {"a": "1"}
    assert build_params([("b[c]", "2")], into=into) is into
    assert into == {"a": "1", "b": {"c": "2"}}
    with pytest.raises(DuplicateParameter):
        build_params([("a[x]", "2")], into=into)


# --- query strings -----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "query", "params"),
    [
        ("/v1/customers", "", {}),
        ("/v1/customers?", "", {}),
        ("/v1/customers?limit=3", "limit=3", {"limit": "3"}),
        (
            "/v1/customers?expand[]=a&expand[]=b&limit=3",
            "expand[0]=a&expand[1]=b&limit=3",
            {"expand": ["a", "b"], "limit": "3"},
        ),
        ("/v1/customers?created%5Bgte%5D=1", "created[gte]=1", {"created": {"gte": "1"}}),
        (
            "/v1/search?query=email:%27a%40b.c%27",
            "query=email%3A%27a%40b.c%27",
            {"query": "email:'a@b.c'"},
        ),
        ("/v1/x?a=1;b=2", "a=1%3Bb%3D2", {"a": "1;b=2"}),
        ("/v1/x?a=b?c", "a=b%3Fc", {"a": "b?c"}),
    ],
)
def test_query_params(target: str, query: str, params: dict[str, Any]) -> None:
    req = read_request("GET", target, None, b"")
    assert (req.query, req.params, req.body, req.content_type) == (query, params, b"", None)
    assert reread(req) == req


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("/v1/x?a=1#frag", InvalidRequest),
        ("/v1/x?a=1&a=2", DuplicateParameter),
        ("/v1/x?a=%zz", InvalidRequest),
        ("/v1/x?a", InvalidRequest),
        ("/v1/x?a=caf\u00e9", InvalidRequest),
        ("/v1/x?a=\x00", InvalidRequest),
        ("/v1/x?a=\ud800", InvalidRequest),
        ("/v1/../x?a=1", InvalidPath),
    ],
)
def test_bad_queries_refused(target: str, error: type[CosignerError]) -> None:
    with pytest.raises(error):
        read_request("GET", target, None, b"")


def test_delete_params_come_from_the_query() -> None:
    req = read_request("DELETE", "/v1/customers/cus_1?expand[]=x", None, b"")
    assert req.params == {"expand": ["x"]}
    assert req.query == "expand[0]=x"


# --- bodies and content types ------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "get"])
def test_body_on_bodiless_methods_refused(method: str) -> None:
    with pytest.raises(InvalidRequest, match="may not have a body"):
        read_request(method, "/v1/charges", FORM, b"a=1")


@pytest.mark.parametrize(
    ("content_type", "body", "outcome"),
    [
        (None, b"", ({}, b"", None)),
        (FORM, b"", ({}, b"", None)),
        ("", b"", ({}, b"", None)),
        (FORM, b"a=1", ({"a": "1"}, b"a=1", FORM)),
        ("Application/X-WWW-Form-Urlencoded; charset=UTF-8", b"a=1", ({"a": "1"}, b"a=1", FORM)),
        (FORM + '; charset="utf-8"', b"a=1", ({"a": "1"}, b"a=1", FORM)),
        (FORM + ";", b"a=1", ({"a": "1"}, b"a=1", FORM)),
        (JSON, b'{"a": 1}', ({"a": 1}, b'{"a":1}', JSON)),
        (JSON + "; charset=utf-8", b"{}", ({}, b"{}", JSON)),
        (
            JSON,
            b'{"a": 1, "b": [true, null, 1.5], "c": {"d": "\xc3\xa9"}, "e": 1234567890123456789}',
            (
                {"a": 1, "b": [True, None, 1.5], "c": {"d": "\u00e9"}, "e": 1234567890123456789},
                '{"a":1,"b":[true,null,1.5],"c":{"d":"\u00e9"},"e":1234567890123456789}'.encode(),
                JSON,
            ),
        ),
        (None, b"a=1", UnsupportedMediaType),
        ("text/plain", b"a=1", UnsupportedMediaType),
        ("text/plain", b"", UnsupportedMediaType),
        ("multipart/form-data; boundary=x", b"--x--", UnsupportedMediaType),
        ("application/json-patch+json", b"{}", UnsupportedMediaType),
        (FORM + "; charset=latin-1", b"a=1", UnsupportedMediaType),
        (FORM + "; charset=utf8", b"a=1", UnsupportedMediaType),
        (FORM + "; charset", b"a=1", UnsupportedMediaType),
        (FORM + "; boundary=x", b"a=1", UnsupportedMediaType),
        (FORM, b"a=\xff", InvalidBody),
        (FORM, b"a=caf\xe9", InvalidBody),
        (JSON, b"", InvalidBody),
        (JSON, b" ", InvalidBody),
        (JSON, b"[1]", InvalidBody),
        (JSON, b'"x"', InvalidBody),
        (JSON, b"null", InvalidBody),
        (JSON, b"{", InvalidBody),
        (JSON, b'{"a":1} x', InvalidBody),
        (JSON, b'{"a":NaN}', InvalidBody),
        (JSON, b'{"a":-Infinity}', InvalidBody),
        (JSON, b'{"a":1e999}', InvalidBody),
        (JSON, b'{"a":"\\ud800"}', InvalidBody),
        (JSON, b'{"\\udfff":1}', InvalidBody),
        (JSON, b"\xef\xbb\xbf{}", InvalidBody),
        (JSON, b"\xff", InvalidBody),
        (JSON, b'{"a":' + b"1" * 5000 + b"}", InvalidBody),
        (JSON, b'{"a":' + b"[" * 33 + b"]" * 33 + b"}", InvalidBody),
        (JSON, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", InvalidBody),
        (JSON, b'{"a":1,"a":2}', DuplicateParameter),
        (JSON, b'{"m":{"k":1,"k":2}}', DuplicateParameter),
        (JSON, b'{"l":[{"k":1,"k":1}]}', DuplicateParameter),
        (JSON, b'{"a":1,"\\u0061":2}', DuplicateParameter),
    ],
)
def test_bodies_by_content_type(
    content_type: str | None, body: bytes, outcome: tuple[Any, bytes, str | None] | type[Exception]
) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            read_request("POST", "/v1/things", content_type, body)
        return
    req = read_request("POST", "/v1/things", content_type, body)
    assert (req.params, req.body, req.content_type) == outcome
    assert reread(req) == req


def test_json_body_and_query_merge_with_the_duplicate_rule() -> None:
    req = read_request("POST", "/v2/things?expand[]=a", JSON, b'{"name":"x"}')
    assert req.params == {"expand": ["a"], "name": "x"}
    assert (req.query, req.body) == ("expand[0]=a", b'{"name":"x"}')
    with pytest.raises(DuplicateParameter):
        read_request("POST", "/v2/things?name=y", JSON, b'{"name":"x"}')


def test_bodiless_get_ignores_content_type() -> None:
    req = read_request("GET", "/v1/charges", "text/plain", b"")
    assert (req.body, req.content_type) == (b"", None)


# --- encode_form and with_params ----------------------------------------------


@pytest.mark.parametrize(
    ("params", "encoded"),
    [
        ({"a": "x y", "b": "&=;+%"}, "a=x+y&b=%26%3D%3B%2B%25"),
        ({"a": "[x]", "m": {"k": "]["}}, "a=[x]&m[k]=]["),
        ({"metadata": {"order id": "\u00e9"}}, "metadata[order+id]=%C3%A9"),
        ({"expand": ["a", "b"]}, "expand[0]=a&expand[1]=b"),
        ({"items": [{"price": "p", "quantity": 2}]}, "items[0][price]=p&items[0][quantity]=2"),
        ({"flag": True, "off": False}, "flag=true&off=false"),
        ({}, ""),
    ],
)
def test_encode_form(params: dict[str, Any], encoded: str) -> None:
    assert encode_form(params) == encoded


@pytest.mark.parametrize(
    "params",
    [
        {"": "x"},
        {"a[b]": "x"},
        {"a]": "x"},
        {"a": {}},
        {"a": []},
        {"a": None},
        {"a": 1.5},
        {"a": {"0": "x"}},
        {"a": {"": "x"}},
        {"a": {"b[": "x"}},
        {"a\x00": "x"},
        {"a": {"k\n": "x"}},
        {"a": "\ud800"},
        {"a": b"x"},
    ],
)
def test_encode_form_refuses_what_cannot_read_back(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        encode_form(params)


def test_with_params_edits_body_and_keeps_the_rest() -> None:
    req = post_form(
        "charge=ch_1&amount=4999&metadata[k]=v&items[0][price]=p", query="expand[]=charge"
    )
    edited = with_params(req, {"amount": "2500", "metadata.new": "n", "items.0.price": "q"})
    assert edited.params == {
        "expand": ["charge"],
        "charge": "ch_1",
        "amount": "2500",
        "metadata": {"k": "v", "new": "n"},
        "items": [{"price": "q"}],
    }
    assert edited.body == b"charge=ch_1&amount=2500&metadata[k]=v&metadata[new]=n&items[0][price]=q"
    assert edited.query == "expand[0]=charge"
    assert req.params["amount"] == "4999"  # the original is untouched
    assert reread(edited) == edited


def test_with_params_edits_where_the_name_lives() -> None:
    req = post_form("amount=1", query="reason=x")
    edited = with_params(req, {"reason": "duplicate", "amount": 2})
    assert (edited.query, edited.body) == ("reason=duplicate", b"amount=2")
    get = read_request("GET", "/v1/charges?limit=3", None, b"")
    assert with_params(get, {"limit": "10"}).target == "/v1/charges?limit=10"
    bare = read_request("POST", "/v1/refunds", None, b"")
    added = with_params(bare, {"amount": "5"})
    assert (added.body, added.content_type) == (b"amount=5", FORM)


def test_with_params_on_json_keeps_types() -> None:
    req = read_request("POST", "/v2/things", JSON, b'{"amount":{"value":100,"currency":"usd"}}')
    edited = with_params(req, {"amount.value": 50})
    assert edited.params == {"amount": {"value": 50, "currency": "usd"}}
    assert edited.body == b'{"amount":{"value":50,"currency":"usd"}}'


@pytest.mark.parametrize(
    "changes",
    [
        {"amount.x": "1"},
        {"items.5.price": "1"},
        {"items.x": "1"},
        {"items.01.price": "1"},
        {"items." + "9" * 5000: "1"},
        {"": "1"},
        {"metadata.": "1"},
        {"amount": None},
        {"amount": 1.5},
        {"amount": "\ud800"},
    ],
)
def test_with_params_refuses_impossible_edits(changes: dict[str, Any]) -> None:
    req = post_form("amount=1&items[0][price]=p&items[1][price]=q")
    with pytest.raises(InvalidRequest):
        with_params(req, changes)


# --- the official SDK ------------------------------------------------------------


class CapturingClient(stripe.HTTPClient):
    """An SDK transport that records what the SDK would put on the wire."""

    name = "capturing"

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, str | None, str | None]] = []

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: dict[str, str], post_data: str | None = None
    ) -> tuple[str, int, dict[str, str]]:
        self.sent.append((method, url, headers.get("Content-Type"), post_data))
        return '{"id": "obj_1", "object": "refund"}', 200, {}

    def close(self) -> None:
        pass


BASE = "http://cosigner.test"


def sdk_sends(
    call: str, *args: Any, params: dict[str, Any]
) -> tuple[str, str, str | None, str | None]:
    transport = CapturingClient()
    client = stripe.StripeClient("sk_test_123", http_client=transport, base_addresses={"api": BASE})
    service: Any = client
    for name in call.split("."):
        service = getattr(service, name)
    service(*args, params=params)
    (sent,) = transport.sent
    return sent


SDK_CASES = [
    (
        "v1.refunds.create",
        (),
        {
            "charge": "ch_1",
            "amount": 4999,
            "reason": "requested_by_customer",
            "metadata": {"order id": "A&B=c;d+e", "caf\u00e9": "\u00fc [x]", "empty": ""},
            "expand": ["charge", "payment_intent"],
        },
        {
            "charge": "ch_1",
            "amount": "4999",
            "reason": "requested_by_customer",
            "metadata": {"order id": "A&B=c;d+e", "caf\u00e9": "\u00fc [x]", "empty": ""},
            "expand": ["charge", "payment_intent"],
        },
    ),
    (
        "v1.subscriptions.create",
        (),
        {
            "customer": "cus_1",
            "items": [{"price": "price_1", "quantity": 2}, {"price": "price_2"}],
            "off_session": True,
        },
        {
            "customer": "cus_1",
            "items": [{"price": "price_1", "quantity": "2"}, {"price": "price_2"}],
            "off_session": "true",
        },
    ),
    (
        "v1.customers.list",
        (),
        {"limit": 3, "expand": ["data.default_source"], "created": {"gte": 1}},
        {"limit": "3", "expand": ["data.default_source"], "created": {"gte": "1"}},
    ),
    ("v1.customers.delete", ("cus_1",), {}, {}),
    (
        "v2.core.event_destinations.create",
        (),
        {
            "name": "n\u00e9",
            "type": "webhook_endpoint",
            "enabled_events": ["a", "b"],
            "event_payload": "thin",
            "webhook_endpoint": {"url": "https://example.com/hook"},
        },
        {
            "name": "n\u00e9",
            "type": "webhook_endpoint",
            "enabled_events": ["a", "b"],
            "event_payload": "thin",
            "webhook_endpoint": {"url": "https://example.com/hook"},
        },
    ),
]


@pytest.mark.parametrize(("call", "args", "sdk_params", "params"), SDK_CASES)
def test_reads_what_the_stripe_sdk_sends(
    call: str, args: tuple[Any, ...], sdk_params: dict[str, Any], params: dict[str, Any]
) -> None:
    method, url, content_type, post_data = sdk_sends(call, *args, params=sdk_params)
    body = (post_data or "").encode()
    req = read_request(method, url.removeprefix(BASE), content_type, body)
    assert req.params == params
    assert reread(req) == req
    if content_type == JSON:
        assert json.loads(req.body) == json.loads(body)
    else:
        # Our canonical form is the SDK's own spelling, byte for byte.
        assert req.target == url.removeprefix(BASE)
        assert req.body == body


# --- properties --------------------------------------------------------------------

_name = st.text(
    st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="[]"),
    min_size=1,
    max_size=8,
)
_subkey = _name.filter(lambda s: not (s.isascii() and s.isdigit()))
_leaf = st.text(max_size=10)
_form_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(_subkey, inner, min_size=1, max_size=3)
    ),
    max_leaves=12,
)
_form_params = st.dictionaries(_name, _form_value, max_size=5)


@PROPERTY
@given(_form_params)
def test_form_round_trip(params: dict[str, Any]) -> None:
    encoded = encode_form(params)
    body = read_request("POST", "/v1/x", FORM, encoded.encode())
    assert body.params == params
    assert body.body == encoded.encode()
    assert reread(body) == body
    query = read_request("GET", f"/v1/x?{encoded}", None, b"")
    assert query.params == params
    assert query.query == encoded


_json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@PROPERTY
@given(st.dictionaries(st.text(max_size=6), _json_value, max_size=5))
def test_json_round_trip(params: dict[str, Any]) -> None:
    compact = json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()
    req = read_request("POST", "/v2/x", JSON, json.dumps(params).encode())
    assert req.params == params
    assert req.body == compact
    assert reread(req) == req


@PROPERTY
@given(_form_params, _name, _leaf)
def test_edits_round_trip(params: dict[str, Any], name: str, value: str) -> None:
    req = read_request("POST", "/v1/x", FORM, encode_form(params).encode())
    edited = with_params(req, {name.split(".")[0] or "x": value})
    assert reread(edited) == edited


_JUNK_PIECES = [*"/.%;?&=#[]+\\ ab0:_-", "%2e", "%2F", "%5B", "%5D", "%25", "%C3%A9", "%FF"]
_junk_chars = st.sampled_from([*_JUNK_PIECES, "\x00", "\u00e9", "\ud800"])
_junk = st.lists(_junk_chars, max_size=30).map("".join)
_content_types = st.sampled_from(
    [None, "", FORM, FORM + "; charset=utf-8", FORM + "; charset=x", JSON, "text/plain"]
)
_bodies = st.binary(max_size=40) | _junk.map(lambda s: s.encode("utf-8", "surrogatepass"))


@PROPERTY
@given(
    st.sampled_from(["GET", "POST", "DELETE", "post", "PATCH", "G T"]),
    _junk,
    _content_types,
    _bodies,
)
def test_junk_is_refused_cleanly_or_read_stably(
    method: str, target: str, content_type: str | None, body: bytes
) -> None:
    for candidate in (target, "/" + target, "/v1/x?" + target):
        try:
            req = read_request(method, candidate, content_type, body)
        except CosignerError:
            continue
        assert reread(req) == req
        assert normalise_path(req.path) == req.path


@PROPERTY
@given(_junk)
def test_normalised_paths_are_safe_and_stable(raw: str) -> None:
    try:
        path = normalise_path("/" + raw)
    except InvalidPath:
        return
    assert normalise_path(path) == path
    if path == "/":
        return
    assert not path.endswith("/")
    for segment in path.split("/")[1:]:
        assert segment and segment.strip(".") and "%" not in segment


@pytest.mark.parametrize("raw", ["/v1/refunds", "/v1//refunds/", "/v1/./charges/ch_1/"])
def test_a_path_read_again_reads_as_the_first_time(raw: str) -> None:
    first = read_request("GET", raw, None, b"").path
    assert read_request("GET", raw, None, b"").path == first == normalise_path(raw)


@pytest.mark.parametrize("raw", ["/v1/REFUNDS", "/v1/refunds.json", "/v1/../v1/refunds", "/v3/x"])
def test_a_refused_path_is_refused_every_time(raw: str) -> None:
    for _ in range(2):
        with pytest.raises(InvalidPath):
            read_request("GET", raw, None, b"")


def test_the_paths_remembered_are_few_and_short(monkeypatch: pytest.MonkeyPatch) -> None:
    remembered: dict[str, str] = {}
    monkeypatch.setattr(canonical, "_READ_PATHS", remembered)
    for n in range(canonical.MAX_READ_PATHS + 10):
        assert canonical.canonical_path(f"/v1/charges/ch_{n}") == f"/v1/charges/ch_{n}"
        assert len(remembered) <= canonical.MAX_READ_PATHS
    assert f"/v1/charges/ch_{canonical.MAX_READ_PATHS + 9}" in remembered  # the latest
    long = "/v1/charges/ch_" + "x" * canonical.MAX_REMEMBERED_PATH
    assert canonical.canonical_path(long) == long
    assert long not in remembered


# --- fast paths ----------------------------------------------------------------------
#
# read_request reads the usual form text by a faster way (canonical._read_usual_form: the
# whole text decoded at once, no per-name control check once it is printable, no quoting
# or no re-encoding at all for plain text) and leaves the rest to parse_pairs, build_params
# and encode_form. Both must give one result, or one error, for every text.


def _outcome(read: Callable[[], tuple[dict[str, Any], str]]) -> tuple[Any, ...]:
    try:
        params, encoded = read()
    except CosignerError as error:
        return ("refused", type(error), error.message, error.param)
    return ("read", repr(params), params, encoded)


def general_form(text: str) -> tuple[Any, ...]:
    def read() -> tuple[dict[str, Any], str]:
        params = build_params(parse_pairs(text))
        return params, encode_form(params)

    return _outcome(read)


def fast_form(text: str) -> tuple[Any, ...]:
    return _outcome(lambda: canonical._read_form(text))


FORM_EDGES = [
    # no decoding at all, "+" alone, escapes of "+" and of separators
    "a=1",
    "a=1&b=2",
    "a+b=c+d",
    "a=%2B&b=+%2b+",
    "a%2Bb=1",
    "a=%26&b=1",
    "a%26b=1",
    "a=%3D",
    "a=%3d&b==",
    "a%3Db=1",
    "a%3db=1",
    "a=x%26b=1",
    "a=x%26b%3D1",
    "a%3Db%3d=c",
    "a=b=c",
    # escaped brackets: structure in names, data in values
    "metadata%5Bk%5D=v",
    "metadata%5bk%5d=v&metadata[j]=w",
    "metadata[k]=v&metadata%5Bk%5D=w",
    "%5Ba%5D=1",
    "a=%5B%5D&b=[&c=]",
    "a%5B%5Bb%5D%5D=1",
    "a%%5Bb%5D=1",
    "a%5Bb%5%5D=1",
    "a%5Bb%5D=%C3%A9",
    "a%5Bb%5D=\u00e9",
    "a%5Bb%5D=x+y&c=%2B",
    # control characters, raw or escaped, in names and values; other unprintables
    "a=%0A",
    "a%0A=1",
    "a%0a=1",
    "metadata[k%0A]=1",
    "a=%00&b=1",
    "a%7f=1",
    "a=%7F",
    "a=\x01",
    "a\x7f=1",
    "a=\u00a0",
    "a\u00a0b=1",
    "a=\u2028",
    # bad escapes and UTF-8, backslashes (the decoder's own escape character)
    "%C3%A9=%E2%82%AC",
    "a=%C3",
    "a=%C3&b=%A9",
    "a=%FF",
    "a=%ED%A0%80",
    "a=%zz",
    "a=%4",
    "a=%",
    "a=%%41",
    "a=1&b=%zz&c",
    "a&b=%zz",
    "a=\\x41",
    "a=\\%41",
    "a=%5C%41",
    "a=\\",
    "a\\=\\N{DIGIT ONE}&b=\\u0041",
    "caf\u00e9=%C3%A9",
    "a=caf\u00e9",
    # empty names, values and parts
    "a=",
    "=",
    "=1",
    "a=1&&b=2",
    "a=1&",
    "&",
    "a",
    "a=1&b",
    # duplicates, and lists
    "a=1&a=2",
    "a=1&a[b]=2",
    "a[b]=1&a=2",
    "a[]=1&a[]=2&a[]=3",
    "a[]=1&a[0]=2",
    "a[0]=x&a[1]=y",
    "a[1]=y&a[0]=x",
    "a[0]=x&a[2]=y",
    "a[01]=x",
    "a[0]=x&a[b]=y",
    "a[][b]=1",
    "a[b][]=x&a[b][]=y",
    "a[]=1&a[b]=2",
    "a[b]=1&a[]=2",
    "a[b]=1&a[0]=2",
    "a[b]=1&a[b]=2",
    "a[b]=1&a[b][c]=2",
    "a[b][c]=1&a[b]=2",
    "a[b]=1&a[c]=2&a[d]=3",
    "a[b]=1&c=2&a[d]=3",
    "0=x&1a=y",
    # order: encode_form's, whatever the order the pairs came in
    "a[y]=1&ab=2&a[x]=3",
    "a[y]=1&a=2",
    "metadata[a]=1&x=2&metadata[b]=3",
    "metadata[a]=1&metadata[b]=2&x=3",
    "a[b][c]=1&a[b][d]=2",
    "a[b][c]=1&a[d]=2&a[b][e]=3",
    "a[b]=1&a[c][d]=2&a[e]=3",
    "a[b][c]=1&a[bb]=2&a[b][d]=3",
    "items[0][price]=p&items[0][quantity]=2",
    "items[1][price]=y&items[0][price]=x",
    "a[b]=1&c[d]=2&a[e]=3",
    # malformed names, nesting depth
    "a]=1",
    "a[b=1",
    "a[b]c=1",
    "a[b]]=1",
    "a[[b]]=1",
    "a[b][=1",
    "a" + "[b]" * 32 + "=1",
    "a" + "[b]" * 33 + "=1",
    "a" + "[b]" * 31 + "[]=1",
    "a" + "[b]" * 32 + "[]=1",
]


@pytest.mark.parametrize("text", FORM_EDGES)
def test_fast_form_reading_agrees_with_the_general_one(text: str) -> None:
    assert fast_form(text) == general_form(text)


@pytest.mark.parametrize(
    "text",
    [
        "charge=ch_1&amount=100&metadata%5Border%5D=allow",
        "a=x+y&b=%40&c=%C3%A9",
        "a[y]=1&ab=2&a[x]=3",
        "metadata[a]=1&x=2&metadata[b]=3",
        "expand[]=a&items[1][p]=y&items[0][p]=x",
    ],
)
def test_the_usual_text_takes_the_fast_path(text: str) -> None:
    usual = canonical._read_usual_form(text)
    assert usual is not None
    assert fast_form(text) == general_form(text)


_FORM_PIECES = [
    *"ab0129_.-~[]=&+ \\",
    *["[]", "[0]", "[1]", "[b]", "%5B", "%5D", "%5b", "%5d", "%26", "%3D", "%3d", "%2B", "%20"],
    *["%0A", "%00", "%7F", "%7f", "%C3%A9", "%C3", "%A9", "%25", "%5C", "%zz", "%4", "%"],
    *["\x00", "\n", "\x7f", "\u00a0", "\u00e9", "\\x", "\\N", "metadata", "items", "a=1&"],
]
_form_texts = st.lists(st.sampled_from(_FORM_PIECES), max_size=24).map("".join)
_plain_keys = st.builds(
    lambda name, subs, brackets: name + "".join(brackets[0] + s + brackets[1] for s in subs),
    st.sampled_from(["a", "ab", "b", "m"]),
    st.lists(st.sampled_from(["x", "y", "xy", "0", "1", ""]), max_size=3),
    st.sampled_from([("[", "]"), ("%5B", "%5D")]),
)
_plain_texts = st.lists(
    st.tuples(_plain_keys, st.text("ab1_.-~[]", max_size=3)), min_size=1, max_size=6
).map(lambda pairs: "&".join(f"{key}={value}" for key, value in pairs))


@PROPERTY
@given(_form_texts | _plain_texts)
def test_fast_form_reading_agrees_with_the_general_one_everywhere(text: str) -> None:
    assert fast_form(text) == general_form(text)


_ESCAPED = [
    "",
    "a",
    "%41",
    "%5B%5d",
    "%C3%A9",
    "%e2%82%ac%F0%9F%98%80",
    "\\",
    "\\%41",
    "\\x41",
    "%5C%41",
    "\\N{DIGIT ONE}\\u0041\\n\\",
    "%00%0a%7F%80",
    "%C3",
    "%C3%28",
    "%ED%A0%80",
    "%C0%80",
    "%zz",
    "%4",
    "%",
]


@pytest.mark.parametrize("text", _ESCAPED)
def test_unescape_is_strict_unquote(text: str) -> None:
    try:
        expected: str | type[Exception] = unquote(text, errors="strict")
    except UnicodeDecodeError:
        expected = UnicodeDecodeError
    if "%" in text and not re.fullmatch(r"(?:[^%]|%[0-9A-Fa-f]{2})*", text):
        expected = UnicodeDecodeError  # an invalid escape, which unquote would keep
    try:
        got: str | type[Exception] = canonical._unescape(text)
    except UnicodeDecodeError:
        got = UnicodeDecodeError
    assert got == expected


@PROPERTY
@given(st.lists(st.sampled_from([*"aZ09 \\x+~", "%41", "%5C", "%25", "%C3", "%A9", "%ff"])))
def test_unescape_is_strict_unquote_everywhere(pieces: list[str]) -> None:
    text = "".join(pieces)
    try:
        expected = unquote(text, errors="strict")
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            canonical._unescape(text)
        return
    assert canonical._unescape(text) == expected


def reference_read_json(body: bytes) -> dict[str, Any]:
    """JSON as json.loads reads it, and a full walk for depth: what _read_json must match."""
    try:
        value = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=canonical._unique_object,
            parse_float=canonical._finite_float,
            parse_constant=canonical._refuse_constant,
        )
    except UnicodeDecodeError:
        raise InvalidBody("The JSON body is not valid UTF-8.") from None
    except (ValueError, RecursionError):
        raise InvalidBody("The body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise InvalidBody("The JSON body must be an object.")
    canonical._check_depth(value)
    return value


def _json_outcome(read: Callable[[bytes], dict[str, Any]], body: bytes) -> tuple[Any, ...]:
    try:
        return ("read", repr(read(body)))
    except CosignerError as error:
        return ("refused", type(error), error.message)


def _nested(levels: int, inner: str) -> bytes:
    opens = ['{"k":' if level % 3 else "[" for level in range(levels)]
    closes = ["}" if opening.startswith("{") else "]" for opening in reversed(opens)]
    return ('{"top":' + "".join(opens) + inner + "".join(closes) + "}").encode()


JSON_EDGES = [
    b"{}",
    b' \t\n\r{"a":1} \t\n\r',
    b'\x0c{"a":1}',
    b'{"a":1}\x0c',
    b'{"a":1}\xc2\xa0',
    b"\xc2\xa0{}",
    b"\xef\xbb\xbf{}",
    b" \xef\xbb\xbf{}",
    b"{} {}",
    b"{}}",
    b"",
    b"   ",
    b'{"a":"[[[[{{{{"}',
    *(_nested(levels, inner) for levels in (30, 31, 32) for inner in ("1", "[]", "{}", "[1]")),
    b'{"a":' + b"[" * 31 + b"1" + b"]" * 31 + b"}",
    b'{"a":' + b"[" * 32 + b"]" * 32 + b"}",
    b'{"a":' + b"[" * 32 + b"1" + b"]" * 32 + b"}",
]


@pytest.mark.parametrize("body", JSON_EDGES)
def test_json_reading_agrees_with_json_loads(body: bytes) -> None:
    assert _json_outcome(canonical._read_json, body) == _json_outcome(reference_read_json, body)


_json_space = st.text(" \t\n\r\x0c\u00a0", max_size=2)


@PROPERTY
@given(_json_space, _json_value, _json_space)
def test_json_reading_agrees_with_json_loads_everywhere(
    before: str, value: Any, after: str
) -> None:
    body = (before + json.dumps(value, ensure_ascii=False) + after).encode()
    assert _json_outcome(canonical._read_json, body) == _json_outcome(reference_read_json, body)
    if isinstance(value, dict):
        expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        assert canonical._dump_json(value) == expected


def test_read_request_makes_a_true_canonical_request() -> None:
    req = read_request("POST", "/v1/x?q=1", FORM, b"a=1&m[k]=v")
    assert type(req) is CanonicalRequest
    assert req._replace() == req
    assert repr(req) == repr(CanonicalRequest(**req._asdict()))
    with pytest.raises(AttributeError):
        req.path = "/v1/y"  # type: ignore[misc]
