"""One canonical reading of every request: what the rules judge is what Stripe receives.

The proxy reads a request once with :func:`read_request`; the rules see its
``params`` and the forwarder sends its ``path``, ``query`` and ``body``. Those
bytes are *re-encoded* from the parsed parameters, never copied from the
agent, so no parser upstream can read them differently from ours.

Decisions (each refusal is a 4xx from :mod:`gateway.errors`):

- Paths are percent-decoded once; ``//`` collapses, ``/./`` resolves, one
  trailing ``/`` goes. Refused: ``..`` segments (never resolved), encoded
  ``/ . \\`` and double encoding (``%2F %2E %5C %25``), matrix parameters
  (``;``), backslashes, spaces, control or non-ASCII characters, and targets
  that do not start with exactly one ``/`` (absolute-form, ``//authority``).
  A canonical segment holds only ``A-Z a-z 0-9 _ . - ~ : @ ! $ & ' ( ) + ,
  =`` and is never all dots. ``*`` is left out: it is the glob of rule
  paths and no Stripe path has it. Requests must then be under ``/v1`` or
  ``/v2`` and spell Stripe's fixed segments in lower case without suffixes
  (``/v1/REFUNDS``, ``/v1/refunds.json`` are refused: see
  :mod:`gateway.stripe_api`); ids keep their case.
- Methods: only GET, HEAD, POST and DELETE (Stripe uses no others; 405).
  Method overrides (headers, Rack's ``_method`` parameter) are the proxy's
  to refuse, with the other checks of :func:`gateway.stripe_api.check_api_request`.
- Query string and body (form) are ``&``-separated ``key=value`` pairs. ``;``
  is data, never a separator: the re-encoding escapes it (``%3B``), so an
  upstream that would split on it receives one value, the one the rules saw.
  ``+`` is a space. Every pair needs ``=``; empty pairs (``a=1&&b=2``, a
  trailing ``&``) are refused. Raw control characters are refused; raw
  spaces and raw UTF-8 in a body are accepted (``curl -d`` sends them).
- Keys are percent-decoded *before* brackets are read, so ``metadata%5Bk%5D``
  and ``metadata[k]`` are the same key (and twice is a duplicate). Grammar:
  ``name`` then ``[sub]`` groups; ``[]`` (append) only last; all-digit subs
  are list indices (canonical decimal, contiguous from 0). At most 32 levels.
  Names hold no control characters (values may: ``%0A`` in a description).
- A name is one parameter in one place: a top-level name in both the query
  string and the body is a duplicate even if the leaves differ, because
  upstream may merge the two shallowly (Rack does ``GET.merge(POST)``).
- Values stay strings as sent (form) or JSON types (JSON bodies).
- Re-encoding: ``quote_plus(..., safe="")`` for key segments and values,
  then ``[`` ``]`` left literal, lists always as ``key[0]=…&key[1]=…``: the
  Stripe SDK's own spelling, byte for byte. JSON: compact,
  ``ensure_ascii=False``. Forward ``target`` and ``body`` as they are (already
  encoded; a client that re-quotes them would change them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any
from urllib.parse import quote_plus, unquote

from gateway.errors import (
    DuplicateParameter,
    InvalidBody,
    InvalidPath,
    InvalidRequest,
    MethodNotAllowed,
    UnsupportedMediaType,
)
from gateway.stripe_api import check_api_path

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
MAX_DEPTH = 32

_NO_BODY = frozenset({"GET", "HEAD", "DELETE"})
# The methods Stripe's API uses; anything else (PUT, PATCH, OPTIONS, TRACE ...) is refused.
METHODS = ("GET", "HEAD", "POST", "DELETE")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SEGMENT_CHARS = r"A-Za-z0-9_.\-~:@!$&'()+,="
_SAFE_SEGMENT = re.compile(rf"[{_SEGMENT_CHARS}]+")
# The common case: one "/" per segment, no "%", and no segment starting with "." (so no "."/"..").
_FAST_PATH = re.compile(rf"(?:/[A-Za-z0-9_\-~:@!$&'()+,=][{_SEGMENT_CHARS}]*)+/?")
_DANGEROUS_ESCAPES = ("%2f", "%2e", "%5c", "%25")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_RAW_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUERY_FORBIDDEN = re.compile(r"[^\x21-\x7e]|#")
_UNRESERVED = re.compile(r"[A-Za-z0-9_.\-~]*")
_KEY_TAIL = re.compile(r"(?:\[[^\[\]]*\])+")
_SUBKEY = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True, slots=True)
class CanonicalRequest:
    """A request as the rules judge it and as it will be forwarded, byte for byte."""

    method: str
    path: str
    query: str
    params: dict[str, Any]
    body: bytes
    content_type: str | None

    @property
    def target(self) -> str:
        """The canonical request target: path plus ``?query`` when there is one."""
        return f"{self.path}?{self.query}" if self.query else self.path


def _show(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


# --- paths -----------------------------------------------------------------


def normalise_path(raw_path: str) -> str:
    """Normalise a still-encoded request path, or raise InvalidPath."""
    if _FAST_PATH.fullmatch(raw_path):
        return raw_path[:-1] if raw_path.endswith("/") else raw_path
    if raw_path == "/":
        return raw_path
    # SECURITY: anything but one leading "/" could name another host once joined to the upstream.
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise InvalidPath("The request path must start with a single '/'.")
    segments: list[str] = []
    for raw in raw_path.split("/")[1:]:
        if raw in ("", "."):
            continue
        # SECURITY: ".." is refused, not resolved: it could climb out of /v1 past the rules.
        if raw == "..":
            raise InvalidPath("The request path may not contain '..' segments.")
        segment = _decode_segment(raw) if "%" in raw else raw
        if not _SAFE_SEGMENT.fullmatch(segment) or not segment.strip("."):
            raise InvalidPath(_path_complaint(segment))
        segments.append(segment)
    return "/" + "/".join(segments)


def _decode_segment(raw: str) -> str:
    lowered = raw.lower()
    # SECURITY: an encoded "/", ".", "\" or "%" disguises a separator or a second decoding.
    if any(escape in lowered for escape in _DANGEROUS_ESCAPES):
        raise InvalidPath("The request path may not encode '/', '.', '\\' or '%'.")
    if _BAD_ESCAPE.search(raw):
        raise InvalidPath("The request path has an invalid percent-escape.")
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidPath("The request path is not valid UTF-8.") from None


def _path_complaint(segment: str) -> str:
    if ";" in segment:
        return "The request path may not carry ';' parameters."
    if "\\" in segment:
        return "The request path may not contain '\\'."
    if not segment.strip("."):
        return "The request path may not contain segments made only of dots."
    return "The request path contains characters that are not allowed."


# --- form encoding ---------------------------------------------------------


def parse_pairs(encoded: str) -> list[tuple[str, str]]:
    """Split application/x-www-form-urlencoded text into decoded (key, value) pairs, strictly."""
    if not encoded:
        return []
    if _RAW_FORBIDDEN.search(encoded):
        raise InvalidRequest("Form data may not contain raw control characters.")
    if "%" in encoded and _BAD_ESCAPE.search(encoded):
        raise InvalidRequest("Form data has an invalid percent-escape.")
    pairs: list[tuple[str, str]] = []
    for part in encoded.split("&"):
        key, eq, value = part.partition("=")
        if not eq:
            raise InvalidRequest(f"Every parameter needs '=': got {_show(part)!r}.")
        pairs.append((_decode_form(key), _decode_form(value)))
    return pairs


def _decode_form(text: str) -> str:
    if "+" in text:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("Form data does not decode to UTF-8.") from None


class _Obj(dict[str, Any]):
    """An object built from ``name[sub]`` keys."""

    __slots__ = ()


class _Idx(dict[str, Any]):
    """A list built from ``name[0]`` keys, indexed by canonical decimal strings."""

    __slots__ = ()


class _App(list[Any]):
    """A list built from ``name[]`` keys."""

    __slots__ = ()


def _split_key(key: str) -> list[str]:
    # SECURITY: no real name holds a control character, and a parser that stops at NUL
    # would read "amount%00" as a second "amount".
    if _CONTROL.search(key):
        raise InvalidRequest("Parameter names may not contain control characters.")
    start = key.find("[")
    if start < 0:
        if key and "]" not in key:
            return [key]
        raise InvalidRequest(f"Malformed parameter name {_show(key)!r}.", param=_show(key))
    name, tail = key[:start], key[start:]
    if not name or "]" in name or not _KEY_TAIL.fullmatch(tail):
        raise InvalidRequest(f"Malformed parameter name {_show(key)!r}.", param=_show(key))
    subs: list[str] = _SUBKEY.findall(tail)
    if "" in subs[:-1]:
        raise InvalidRequest(f"'[]' may only end a parameter name: {_show(key)!r}.")
    if len(subs) > MAX_DEPTH:
        raise InvalidRequest(f"Parameter {_show(key)!r} is nested too deeply.")
    return [name, *subs]


def _is_index(sub: str) -> bool:
    return "0" <= sub[0] <= "9" and sub.isascii() and sub.isdigit()


def _container_for(sub: str, key: str) -> type[_Obj | _Idx]:
    """Which container a parent needs, judged by the (non-empty) sub-key that follows it."""
    if not _is_index(sub):
        return _Obj
    if (sub[0] == "0" and len(sub) > 1) or len(sub) > 9:
        raise InvalidRequest(f"List index {_show(sub)!r} in {_show(key)!r} is not canonical.")
    return _Idx


def _duplicate(key: str) -> DuplicateParameter:
    return DuplicateParameter(
        f"The parameter {_show(key)!r} was given more than once.", param=_show(key)
    )


def build_params(
    pairs: Iterable[tuple[str, str]], into: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Decode Stripe bracket notation into nested params; any key given twice is a duplicate.

    With ``into``, the result is added to it, and a top-level name already
    there is a duplicate (see the module notes on query and body).
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        segments = _split_key(key)
        appending = segments[-1] == ""
        if appending:
            segments.pop()
        node: dict[str, Any] = root
        for seg, sub in pairwise(segments):
            want = _container_for(sub, key)
            child = node.get(seg)
            if child is None:
                child = node[seg] = want()
            elif type(child) is not want:
                raise _duplicate(key)
            node = child
        last = segments[-1]
        if appending:
            listed = node.get(last)
            if listed is None:
                node[last] = _App((value,))
            elif type(listed) is _App:
                listed.append(value)
            else:
                raise _duplicate(key)
        elif last in node:
            raise _duplicate(key)
        else:
            node[last] = value
    built = {name: _finish(value, name) for name, value in root.items()}
    if into is None:
        return built
    _merge_disjoint(into, built)
    return into


def _finish(node: Any, name: str) -> Any:
    if type(node) is str:
        return node
    if type(node) is _App:
        return list(node)
    if type(node) is _Idx:
        ordered = sorted((int(index), value) for index, value in node.items())
        if ordered[-1][0] != len(ordered) - 1:
            raise InvalidRequest(f"List {_show(name)!r} has indices not contiguous from 0.")
        return [_finish(value, f"{name}[{index}]") for index, value in ordered]
    return {key: _finish(value, f"{name}[{key}]") for key, value in node.items()}


def _merge_disjoint(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    # SECURITY: one name in two places may be merged differently upstream; refuse, don't pick.
    for name in extra:
        if name in into:
            raise DuplicateParameter(
                f"The parameter {_show(name)!r} was given in both the query string and the body.",
                param=_show(name),
            )
    into.update(extra)


def encode_form(params: Mapping[str, Any]) -> str:
    """Encode nested params in Stripe bracket notation; the inverse of build_params."""
    out: list[str] = []
    for name, value in params.items():
        if not _encodable_name(name):
            raise InvalidRequest(f"Cannot form-encode the parameter name {name!r}.")
        _encode_value(_quote(name), value, out, 0)
    return "&".join(out)


def _encode_value(prefix: str, value: Any, out: list[str], depth: int) -> None:
    if isinstance(value, str):
        out.append(f"{prefix}={_quote(value)}")
    elif isinstance(value, bool):  # before int: bool is an int; the SDK sends "true"/"false"
        out.append(f"{prefix}={'true' if value else 'false'}")
    elif isinstance(value, int):
        out.append(f"{prefix}={value}")
    elif depth >= MAX_DEPTH:
        raise InvalidRequest("Parameters are nested too deeply to form-encode.")
    elif isinstance(value, Mapping) and value:
        for key, item in value.items():
            if not _encodable_subkey(key):
                raise InvalidRequest(f"Cannot form-encode the key {key!r} under {prefix!r}.")
            _encode_value(f"{prefix}[{_quote(key)}]", item, out, depth + 1)
    elif isinstance(value, list | tuple) and value:
        for index, item in enumerate(value):
            _encode_value(f"{prefix}[{index}]", item, out, depth + 1)
    else:
        # Empty containers, None and floats have no form spelling that reads back the same.
        raise InvalidRequest(f"Cannot form-encode {type(value).__name__} at {prefix!r}.")


def _encodable_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and "[" not in name
        and "]" not in name
        and not _CONTROL.search(name)
    )


def _encodable_subkey(key: Any) -> bool:
    # An all-digit key would read back as a list index.
    return _encodable_name(key) and not _is_index(key)


def _quote(text: str) -> str:
    if _UNRESERVED.fullmatch(text):  # the common case: ids, amounts, currency codes
        return text
    try:
        quoted = quote_plus(text, safe="")
    except UnicodeEncodeError:
        raise InvalidRequest("Parameters must be valid Unicode text.") from None
    # Literal brackets, as the Stripe SDK spells them: keys' own text never holds one
    # (build_params refuses it), so each bracket in a key is structure and in a value is data.
    if "%5B" in quoted or "%5D" in quoted:
        quoted = quoted.replace("%5B", "[").replace("%5D", "]")
    return quoted


# --- JSON ------------------------------------------------------------------


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _duplicate(key)
            seen.add(key)
    return obj


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # "1e999" parses to inf, which JSON cannot spell back
        raise InvalidBody("JSON numbers must be finite.")
    return number


def _refuse_constant(name: str) -> Any:
    raise InvalidBody(f"{name} is not valid JSON.")


def _read_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_unique_object,
            parse_float=_finite_float,
            parse_constant=_refuse_constant,
        )
    except UnicodeDecodeError:
        raise InvalidBody("The JSON body is not valid UTF-8.") from None
    except (ValueError, RecursionError):
        raise InvalidBody("The body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise InvalidBody("The JSON body must be an object.")
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidBody("The JSON body is nested too deeply.")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def _dump_json(params: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(params, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise InvalidBody("The parameters cannot be encoded as JSON.") from None


# --- requests --------------------------------------------------------------


def _media_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    media, _, rest = content_type.partition(";")
    media = media.strip().lower()
    if not media:
        return None
    if media not in (FORM, JSON):
        raise UnsupportedMediaType(f"Content-Type {_show(media)!r} is not supported.")
    for param in rest.split(";"):
        name, _, value = param.partition("=")
        if not name.strip() and not value:
            continue
        if name.strip().lower() != "charset" or value.strip().strip('"').lower() != "utf-8":
            raise UnsupportedMediaType(f"Only charset=utf-8 is supported, not {_show(param)!r}.")
    return media


def read_request(
    method: str, raw_target: str, content_type: str | None, body: bytes
) -> CanonicalRequest:
    """Read a request as received into its one canonical form, or raise a CosignerError."""
    if method not in METHODS:  # as every client spells them: a valid token, already upper case
        if not _METHOD.fullmatch(method):
            raise InvalidRequest("The request method is not a valid token.")
        method = method.upper()
        if method not in METHODS:
            raise MethodNotAllowed(
                f"The method {_show(method)} is not used by the Stripe API.",
                headers={"Allow": ", ".join(METHODS)},
            )
    raw_path, _, raw_query = raw_target.partition("?")
    path = normalise_path(raw_path)
    check_api_path(path)
    query_params: dict[str, Any] = {}
    if raw_query:
        if _QUERY_FORBIDDEN.search(raw_query):
            raise InvalidRequest("The query string contains characters that are not allowed.")
        query_params = build_params(parse_pairs(raw_query))
    if method in _NO_BODY:
        # SECURITY: a body Stripe ignores could still sway a rule; refuse it outright.
        if body:
            raise InvalidRequest(f"{method} requests may not have a body.")
        media = None
    else:
        media = _media_type(content_type)
    body_params: dict[str, Any] = {}
    canonical_body = b""
    if media == JSON:
        # An empty JSON body is undecodable, never "no parameters".
        body_params = _read_json(body)
        canonical_body = _dump_json(body_params)
    elif body:
        if media is None:
            raise UnsupportedMediaType("A request body needs a Content-Type.")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidBody("The form body is not valid UTF-8.") from None
        body_params = build_params(parse_pairs(text))
        canonical_body = encode_form(body_params).encode("ascii")
    if not body_params:  # the usual case: parameters in one place, nothing to merge
        params = query_params
    elif not query_params:
        params = body_params
    else:
        params = dict(query_params)
        _merge_disjoint(params, body_params)
    return CanonicalRequest(
        method=method,
        path=path,
        query=encode_form(query_params) if query_params else "",
        params=params,
        body=canonical_body,
        content_type=media if canonical_body else None,
    )


def with_params(req: CanonicalRequest, changes: Mapping[str, Any]) -> CanonicalRequest:
    """Apply reviewer edits (``amount`` or dotted ``metadata.k``) and re-encode the request."""
    query_params = build_params(parse_pairs(req.query))
    if req.content_type == JSON:
        body_params = _read_json(req.body)
    else:
        body_params = build_params(parse_pairs(req.body.decode("ascii")))
    for dotted, value in changes.items():
        segments = dotted.split(".") if isinstance(dotted, str) else [""]
        if "" in segments:
            raise InvalidRequest(f"Cannot edit the parameter {dotted!r}.")
        in_query = segments[0] in query_params or (
            req.method in _NO_BODY and segments[0] not in body_params
        )
        _set_path(query_params if in_query else body_params, segments, value, dotted)
    content_type = req.content_type
    if content_type == JSON:
        body = _dump_json(body_params)
    else:
        body = encode_form(body_params).encode("ascii")
        content_type = FORM if body else None
    query = encode_form(query_params)
    # Re-read what will be sent, so params can only ever describe these exact bytes.
    target = f"{req.path}?{query}" if query else req.path
    return read_request(req.method, target, content_type, body)


def _set_path(params: dict[str, Any], segments: list[str], value: Any, dotted: str) -> None:
    node: Any = params
    *parents, last = segments
    for seg in parents:
        if isinstance(node, dict):
            child = node.get(seg)
            if child is None and seg not in node:
                child = node[seg] = {}  # a reviewer may add e.g. a metadata key
            node = child
        elif isinstance(node, list) and (slot := _slot(node, seg)) is not None:
            node = node[slot]
        else:
            raise InvalidRequest(f"Cannot edit {dotted!r}: {seg!r} is not inside an object.")
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and (slot := _slot(node, last)) is not None:
        node[slot] = value
    else:
        raise InvalidRequest(f"Cannot edit {dotted!r}: there is no such place to set it.")


def _slot(items: list[Any], seg: str) -> int | None:
    """The list position a dotted segment names, if it names an existing one."""
    canonical = _is_index(seg) and (seg == "0" or seg[0] != "0") and len(seg) < 10
    if canonical and int(seg) < len(items):
        return int(seg)
    return None
