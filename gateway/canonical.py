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
from codecs import unicode_escape_decode
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import quote_plus, unquote

from gateway.errors import (
    CosignerError,
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
# Plain form text (decoded): one "=" in each part, and every name, key and value spelled as
# encode_form spells it: unreserved characters, and brackets (structure in keys, and left
# literal in values).
_PLAIN = r"[A-Za-z0-9_.\-~\[\]]*"
_PLAIN_FORM = re.compile(rf"{_PLAIN}={_PLAIN}(?:&{_PLAIN}={_PLAIN})*")


class CanonicalRequest(NamedTuple):
    """A request as the rules judge it and as it will be forwarded, byte for byte.

    A NamedTuple, as the other immutable records on the per-request path are (see
    :class:`gateway.forwarder.Outbound`): as read-only as a frozen dataclass, and made
    without setting each field through ``object.__setattr__``.
    """

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
        return raw_path[:-1] if raw_path[-1] == "/" else raw_path
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


# Raw request paths read before, and their canonical form: most calls name a path that came
# before (``/v1/refunds``, an object polled again), and reading it again touches code (two
# regexes, the API's words) that a busy loop has long pushed out of its caches. Only short
# paths, and a bounded number of them, are remembered: what an agent sends cannot grow it.
_READ_PATHS: dict[str, str] = {}
MAX_READ_PATHS = 4096
MAX_REMEMBERED_PATH = 256


def canonical_path(raw_path: str) -> str:
    """``normalise_path(raw_path)``, then ``check_api_path``: InvalidPath if either refuses."""
    path = _READ_PATHS.get(raw_path)
    if path is None:
        path = normalise_path(raw_path)
        check_api_path(path)
        if len(raw_path) <= MAX_REMEMBERED_PATH:
            if len(_READ_PATHS) >= MAX_READ_PATHS:
                _READ_PATHS.clear()
            _READ_PATHS[raw_path] = path
    return path


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
    if not encoded.isprintable() and _RAW_FORBIDDEN.search(encoded):
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
        return _unescape(text) if text.isascii() else unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("Form data does not decode to UTF-8.") from None


def _unescape(text: str) -> str:
    """``unquote(text, errors="strict")`` for ASCII text, and UnicodeDecodeError for a bad escape.

    ``%XX`` becomes ``\\xXX``, which unicode_escape reads as the code point XX: as latin-1, the
    byte XX. The bytes then decode as UTF-8 (ASCII is already what it decodes to). Backslashes
    are doubled first to stay themselves.
    """
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    latin1 = unicode_escape_decode(text.replace("%", "\\x"))[0]
    return latin1 if latin1.isascii() else latin1.encode("latin-1").decode("utf-8")


def _read_form(text: str) -> tuple[dict[str, Any], str]:
    """``build_params(parse_pairs(text))`` and its ``encode_form``: the same, or the same error."""
    usual = _read_usual_form(text)
    if usual is not None:
        return usual
    params = build_params(parse_pairs(text))
    return params, encode_form(params)


def _read_usual_form(text: str) -> tuple[dict[str, Any], str] | None:
    """``_read_form(text)`` for the usual text, or None: then the general way reads it.

    The general way decodes each key and value alone. Decoding the whole text at once gives
    the same pairs when no escape decodes to a separator (``%26`` to ``&``, ``%3D`` to ``=``).
    Names in decoded text with no control character (nor anything else not printable) need
    no check of their own. Plain text (see _PLAIN_FORM) has nothing to escape, and is often
    its own encoding (see _build_usual). Anything else, and every invalid text, goes the
    general way, which raises its error in its order.
    """
    if "%5B" in text:
        # The escapes the Stripe SDK sends, its brackets, decoded by replacing them: no escape
        # spans one of them (a "[" or "]" is no hex digit), and decoding them leaves none.
        text = text.replace("%5B", "[").replace("%5D", "]")
    if "%" in text:
        if "%26" in text or "%3D" in text or "%3d" in text or not text.isascii():
            return None
        if "+" in text:
            text = text.replace("+", " ")
        try:
            text = _unescape(text)
        except UnicodeDecodeError:  # an invalid escape, or not UTF-8
            return None
    elif "+" in text:
        text = text.replace("+", " ")
    if _PLAIN_FORM.fullmatch(text):
        flat = iter(text.replace("&", "=").split("="))  # one "=" in each part
        built = _build_usual(zip(flat, flat, strict=True))
        if built is None:
            return None
        params, ordered = built
        return params, text if ordered else _encode_plain(params)
    if not text.isprintable():
        return None
    pairs: list[tuple[str, str]] = []
    for part in text.split("&"):
        key, eq, value = part.partition("=")
        if not eq:
            return None
        pairs.append((key, value))
    built = _build_usual(pairs)
    return None if built is None else (built[0], encode_form(built[0]))


def _build_usual(pairs: Iterable[tuple[str, str]]) -> tuple[dict[str, Any], bool] | None:
    """``build_params(pairs)`` for names known to hold no control character (or None where
    it would raise), and whether encode_form walks the params in the order the pairs came.

    It does when no value goes into a list, and each value that goes into a container
    already there goes into the one the value before it went into (so after that one).
    Plain pairs so ordered are spelled by encode_form just as they come.
    """
    root: dict[str, Any] = {}
    listed = False
    ordered = True
    previous = ""
    try:
        for key, value in pairs:
            if "[" in key:
                name, _, sub = key.partition("[")
                sub = sub[:-1] if key[-1] == "]" else ""
                # The usual nested name, ``metadata[order]``: one level, in an object (no
                # list index). What _add_nested does with it, without its walk.
                if (
                    sub
                    and not "0" <= sub[0] <= "9"
                    and name
                    and "]" not in name
                    and "[" not in sub
                    and "]" not in sub
                ):
                    node = root.get(name)
                    if node is None:
                        root[name] = {sub: value}
                        placed = _NEW
                    elif type(node) is dict and sub not in node:
                        node[sub] = value
                        placed = _INSIDE
                    else:
                        return None  # given before: a duplicate, or a list
                else:
                    placed = _add_nested(root, key, value)
                if placed == _LISTED:
                    listed = True
                elif placed == _INSIDE and ordered:
                    ordered = key.rpartition("[")[0] == previous.rpartition("[")[0]
            elif not key or "]" in key or key in root:
                return None
            else:
                root[key] = value
            previous = key
    except CosignerError:
        return None
    return (_finish_params(root), False) if listed else (root, ordered)


# While building, an object (``name[sub]`` keys) is a dict, a list of appended values
# (``name[]``) a list, and a list with indices (``name[0]``) an _Idx, until _finish.
class _Idx(dict[str, Any]):
    """A list built from ``name[0]`` keys, indexed by canonical decimal strings."""

    __slots__ = ()


def _malformed(key: str) -> InvalidRequest:
    return InvalidRequest(f"Malformed parameter name {_show(key)!r}.", param=_show(key))


def _is_index(sub: str) -> bool:
    return "0" <= sub[0] <= "9" and sub.isascii() and sub.isdigit()


def _container_for(sub: str, key: str) -> type[dict[str, Any]]:
    """Which container a parent needs, judged by the (non-empty) sub-key that follows it."""
    if not _is_index(sub):
        return dict
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
    listed = False
    for key, value in pairs:
        # SECURITY: no real name holds a control character, and a parser that stops at NUL
        # would read "amount%00" as a second "amount". (Printable text holds none.)
        if not key.isprintable() and _CONTROL.search(key):
            raise InvalidRequest("Parameter names may not contain control characters.")
        if "[" in key:
            if _add_nested(root, key, value) == _LISTED:
                listed = True
        elif not key or "]" in key:
            raise _malformed(key)
        elif key in root:
            raise _duplicate(key)
        else:
            root[key] = value
    built = _finish_params(root) if listed else root
    if into is None:
        return built
    _merge_disjoint(into, built)
    return into


# Where _add_nested put a value. _NEW: in containers it made for it, so last in the params
# (and in encode_form's order), spelled as encode_form spells it. _INSIDE: into a container
# that was there. _LISTED: into a list, and so spelled and ordered by encode_form and _finish.
_NEW, _INSIDE, _LISTED = 0, 1, 2


def _add_nested(root: dict[str, Any], key: str, value: str) -> int:
    """Add a ``name[sub]...`` key (one holding a '[', and no control character) to root."""
    name, _, tail = key.partition("[")
    subs = tail[:-1].split("][")
    # A name then "[sub]" groups: every bracket in the key is one of the groups'.
    if not name or "]" in name or key[-1] != "]":
        raise _malformed(key)
    for sub in subs:
        if "[" in sub or "]" in sub:
            raise _malformed(key)
    if "" in subs[:-1]:
        raise InvalidRequest(f"'[]' may only end a parameter name: {_show(key)!r}.")
    if len(subs) > MAX_DEPTH:
        raise InvalidRequest(f"Parameter {_show(key)!r} is nested too deeply.")
    placed = _NEW
    appending = not subs[-1]
    if appending:
        subs.pop()
        placed = _LISTED
    node: dict[str, Any] = root
    seg = name
    for sub in subs:  # seg is the parent's name in node, sub its own in the parent
        if "0" <= sub[0] <= "9":
            want = _container_for(sub, key)
            if want is _Idx:
                placed = _LISTED
        else:
            want = dict
        child = node.get(seg)
        if child is None:
            child = node[seg] = want()
        elif type(child) is not want:
            raise _duplicate(key)
        elif placed == _NEW:
            placed = _INSIDE
        node = child
        seg = sub
    if appending:
        listed = node.get(seg)
        if listed is None:
            node[seg] = [value]
        elif type(listed) is list:
            listed.append(value)
        else:
            raise _duplicate(key)
    elif seg in node:
        raise _duplicate(key)
    else:
        node[seg] = value
    return placed


def _finish_params(root: dict[str, Any]) -> dict[str, Any]:
    """Turn each _Idx in built params into its list (in place: the rest is already final)."""
    for name, value in root.items():
        if type(value) is not str:
            root[name] = _finish(value, name)
    return root


def _finish(node: Any, name: str) -> Any:
    """_finish_params for one value; name is where node is, for errors."""
    if type(node) is _Idx:
        ordered = sorted((int(index), value) for index, value in node.items())
        if ordered[-1][0] != len(ordered) - 1:
            raise InvalidRequest(f"List {_show(name)!r} has indices not contiguous from 0.")
        return [_finish(value, f"{name}[{index}]") for index, value in ordered]
    if type(node) is dict:
        for key, value in node.items():
            if type(value) is not str:
                node[key] = _finish(value, f"{name}[{key}]")
    return node  # a dict, a list of appended strings, or a string


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
        if type(name) is str and name.isascii() and (name.isalnum() or name.isidentifier()):
            prefix = name  # the usual name (see _quote): encodable, nothing to escape
        elif _encodable_name(name):
            prefix = _quote(name)
        else:
            raise InvalidRequest(f"Cannot form-encode the parameter name {name!r}.")
        if type(value) is str:  # the usual value, as _encode_value spells it
            out.append(f"{prefix}={_quote(value)}")
        else:
            _encode_value(prefix, value, out, 0)
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
    elif (type(value) is dict or isinstance(value, Mapping)) and value:
        for key, item in value.items():
            if type(key) is str and key.isascii() and key.isidentifier():
                sub = key  # the usual key: encodable (no index), nothing to escape
            elif _encodable_subkey(key):
                sub = _quote(key)
            else:
                raise InvalidRequest(f"Cannot form-encode the key {key!r} under {prefix!r}.")
            if type(item) is str:  # as the recursive call would spell it
                out.append(f"{prefix}[{sub}]={_quote(item)}")
            else:
                _encode_value(f"{prefix}[{sub}]", item, out, depth + 1)
    elif isinstance(value, list | tuple) and value:
        for index, item in enumerate(value):
            if type(item) is str:  # as the recursive call would spell it
                out.append(f"{prefix}[{index}]={_quote(item)}")
            else:
                _encode_value(f"{prefix}[{index}]", item, out, depth + 1)
    else:
        # Empty containers, None and floats have no form spelling that reads back the same.
        raise InvalidRequest(f"Cannot form-encode {type(value).__name__} at {prefix!r}.")


def _encode_plain(params: dict[str, Any]) -> str:
    """``encode_form(params)`` for params built from plain text (see _PLAIN_FORM).

    Their names, keys and values pass encode_form's checks (as all that build_params builds
    does) and hold only characters it leaves as they are: what is left is the structure.
    """
    out: list[str] = []
    for name, value in params.items():
        if type(value) is str:
            out.append(f"{name}={value}")
        else:
            _encode_plain_value(name, value, out)
    return "&".join(out)


def _encode_plain_value(prefix: str, value: dict[str, Any] | list[Any], out: list[str]) -> None:
    items = value.items() if type(value) is dict else enumerate(value)
    for key, item in items:
        if type(item) is str:
            out.append(f"{prefix}[{key}]={item}")
        else:
            _encode_plain_value(f"{prefix}[{key}]", item, out)


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
    # The common case, ids, amounts, currency codes: nothing to escape. On ASCII text isalnum
    # and isidentifier accept only unreserved characters, and cost less than the regex.
    if type(text) is str and text.isascii() and (text.isalnum() or text.isidentifier()):
        return text
    if _UNRESERVED.fullmatch(text):
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


# What json.loads and json.dumps build on each call with these arguments, built once. (loads
# also refuses a leading BOM itself; raw_decode refuses it as any other text that is not JSON.)
_JSON_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_object, parse_float=_finite_float, parse_constant=_refuse_constant
)
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_JSON_SPACE = " \t\n\r"  # what JSON counts as white space (json.decoder.WHITESPACE)


def _read_json(body: bytes) -> dict[str, Any]:
    try:
        # JSONDecoder.decode, without its two regex calls: white space, a value, white space.
        text = body.decode("utf-8").lstrip(_JSON_SPACE)
        value, end = _JSON_DECODER.raw_decode(text)
        if end != len(text) and text[end:].strip(_JSON_SPACE):
            raise ValueError("Extra data")
    except UnicodeDecodeError:
        raise InvalidBody("The JSON body is not valid UTF-8.") from None
    except (ValueError, RecursionError):
        raise InvalidBody("The body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise InvalidBody("The JSON body must be an object.")
    # Each level of nesting opens with a "{" or "[" of its own: with fewer of them in the whole
    # text than MAX_DEPTH, nothing can be nested too deeply.
    if text.count("{") + text.count("[") >= MAX_DEPTH:
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
        return _JSON_ENCODER.encode(params).encode("utf-8")
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise InvalidBody("The parameters cannot be encoded as JSON.") from None


# --- requests --------------------------------------------------------------


def _media_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    if content_type == FORM:  # as clients usually send them
        return FORM
    if content_type == JSON:
        return JSON
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
    if "?" in raw_target:
        raw_path, _, raw_query = raw_target.partition("?")
    else:  # the usual request target: cheaper than partition
        raw_path, raw_query = raw_target, ""
    path = canonical_path(raw_path)
    query_params: dict[str, Any] = {}
    query = ""
    if raw_query:
        if _QUERY_FORBIDDEN.search(raw_query):
            raise InvalidRequest("The query string contains characters that are not allowed.")
        query_params, query = _read_form(raw_query)
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
        body_params, encoded = _read_form(text)
        canonical_body = encoded.encode("ascii")
    if not body_params:  # the usual case: parameters in one place, nothing to merge
        params = query_params
    elif not query_params:
        params = body_params
    else:
        params = dict(query_params)
        _merge_disjoint(params, body_params)
    return CanonicalRequest(
        method, path, query, params, canonical_body, media if canonical_body else None
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
