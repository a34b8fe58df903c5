"""The rule-file format (PRODUCT.md §2) as pydantic models.

Validation only: these models never reach the hot path. ``loader`` compiles
them into the frozen dataclasses of ``engine``. Every model forbids unknown
keys and is strict (no "5" for 5, no "yes" for true): a typo in a rule file
must stop startup, not quietly change what the gateway lets through.

Validators raise ``ValueError`` with a sentence a rule author can act on;
``loader`` turns pydantic's error locations into file / rule / field.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .engine import ActionKind, OpKind, compile_path

_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OPERATORS: tuple[OpKind, ...] = (
    "eq",
    "ne",
    "lt",
    "lte",
    "gt",
    "gte",
    "in",
    "not_in",
    "exists",
    "matches",
)
HOLD_ONLY = ("reviewers", "approvals", "expires_after", "editable", "callback")

# Names show up in receipts, URLs and dashboard filters; "defaults.*" is reserved
# for the default decisions, which the dot-free first character rules out.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_FIELD_PATH = re.compile(r"[^.\s]+(?:\.[^.\s]+)*")
_EMAIL = re.compile(r"[^@\s,<>]+@[^@\s,<>]+")
_DURATION = re.compile(r"([1-9][0-9]*)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 366 * 86400

Scalar = str | int | float | bool


def parse_duration(value: str | int) -> int:
    """Seconds from ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"`` or an int; always > 0."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a duration; use e.g. 90s, 30m, 24h or 7d")
    if isinstance(value, int):
        seconds = value
    else:
        found = _DURATION.fullmatch(value)
        if found is None:
            raise ValueError(f"{value!r} is not a duration; use e.g. 90s, 30m, 24h or 7d")
        seconds = int(found.group(1)) * _UNITS[found.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive, not {value!r}")
    # A cap keeps timestamp arithmetic in the store far from overflow.
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is longer than the limit of 366d")
    return seconds


def _duration(value: Any) -> int:
    return parse_duration(value)


Duration = Annotated[int, BeforeValidator(_duration)]


def check_field_path(path: object) -> str:
    """A dotted path into the params, e.g. ``metadata.order_id`` or ``items.0.price``."""
    if not isinstance(path, str) or _FIELD_PATH.fullmatch(path) is None:
        raise ValueError(
            f"{path!r} is not a field path; use names joined by dots, e.g. metadata.order_id"
        )
    return path


def _one_or_many(what: str) -> Any:
    def validate(value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ValueError(f"must be {what} or a non-empty list of them")
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"{item!r} is not {what}")
        return tuple(items)

    return BeforeValidator(validate)


def _methods(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("must be a method or a non-empty list of methods")
    methods: list[str] = []
    for item in items:
        # An unknown method would silently never match: a typo'd deny rule is no rule.
        if not isinstance(item, str) or item.upper() not in METHODS:
            known = ", ".join(sorted(METHODS))
            raise ValueError(f"unknown method {item!r}; use one of {known}")
        methods.append(item.upper())
    return tuple(methods)


def _scalar(value: Any) -> Scalar:
    if value is None:
        raise ValueError("null is not a value; to match a missing field use exists: false")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a usable value")
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"must be a string, a number or true/false, not {_kind(value)}")
    return value


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"must be a number, not {value!r}")
    return value


def _scalars(value: Any) -> tuple[Scalar, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of values, e.g. [usd, eur]")
    return tuple(_scalar(item) for item in value)


def _regex(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a regular expression string, not {_kind(value)}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regular expression {value!r}: {exc}") from None
    return value


def _exists(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class _Model(BaseModel):
    model_config = _CONFIG

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # An explicit null would read as "not given": `method: null` would match every
        # method. Say so instead of guessing.
        if value is None:
            if cls is ConditionModel:
                raise ValueError("null is not a value; to match a missing field use exists: false")
            raise ValueError("must not be null; leave the key out instead")
        return value


class DefaultsModel(_Model):
    """``defaults:`` what happens when no rule matches."""

    read: ActionKind | None = None
    write: ActionKind | None = None


class MatchModel(_Model):
    """``match:`` which requests a rule is about."""

    method: Annotated[tuple[str, ...], BeforeValidator(_methods)] | None = None
    path: str | None = None
    agent: Annotated[tuple[str, ...], _one_or_many("an agent name")] | None = None
    account: Annotated[tuple[str, ...], _one_or_many("an account id")] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        compile_path(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> MatchModel:
        # A rule that matches everything should say so, not get there by omission.
        if not self.model_fields_set:
            raise ValueError("match needs method, path, agent or account (path: /** matches all)")
        return self


class ConditionModel(_Model):
    """One ``when:`` entry: every operator given must hold."""

    eq: Annotated[Scalar, BeforeValidator(_scalar)] | None = None
    ne: Annotated[Scalar, BeforeValidator(_scalar)] | None = None
    lt: Annotated[int | float, BeforeValidator(_number)] | None = None
    lte: Annotated[int | float, BeforeValidator(_number)] | None = None
    gt: Annotated[int | float, BeforeValidator(_number)] | None = None
    gte: Annotated[int | float, BeforeValidator(_number)] | None = None
    in_: Annotated[tuple[Scalar, ...], BeforeValidator(_scalars)] | None = Field(None, alias="in")
    not_in: Annotated[tuple[Scalar, ...], BeforeValidator(_scalars)] | None = None
    exists: Annotated[bool, BeforeValidator(_exists)] | None = None
    matches: Annotated[str, BeforeValidator(_regex)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> ConditionModel:
        if not self.model_fields_set:
            raise ValueError(f"needs an operator: {', '.join(OPERATORS)}")
        return self

    def operators(self) -> list[tuple[OpKind, Any]]:
        """The operators given, in the fixed order of OPERATORS."""
        given = self.model_dump(by_alias=True, exclude_unset=True)
        return [(op, given[op]) for op in OPERATORS if op in given]


def _bare_to_eq(value: Any) -> Any:
    """``currency: usd`` is short for ``currency: {eq: usd}``."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        raise ValueError("a list needs an operator: use {in: [...]} or {not_in: [...]}")
    return {"eq": value}


Conditions = dict[str, Annotated[ConditionModel, BeforeValidator(_bare_to_eq)]]


class SumModel(_Model):
    """``budget.sum:`` a cap on the total of one integer field."""

    field: str
    max: int = Field(ge=1)

    @field_validator("field")
    @classmethod
    def _field(cls, value: str) -> str:
        return check_field_path(value)


class BudgetModel(_Model):
    """``budget:`` the rule matches only while the request fits."""

    count: int | None = Field(None, ge=1)
    sum: SumModel | None = None
    per: Duration
    scope: Literal["agent", "global"] = "agent"

    @model_validator(mode="after")
    def _something_to_count(self) -> BudgetModel:
        if self.count is None and self.sum is None:
            raise ValueError("a budget needs count, sum or both")
        return self


class RuleModel(_Model):
    """One entry of ``rules:``."""

    # Field order matters: the validators below read ``action`` from info.data,
    # so it is declared before every field whose validity depends on it.
    name: str
    description: str | None = None
    match: MatchModel
    when: Conditions = Field(default_factory=dict)
    action: ActionKind
    budget: BudgetModel | None = None
    message: str | None = None
    reviewers: list[str] | None = None
    approvals: int | None = Field(None, ge=1)
    expires_after: Duration | None = None
    editable: list[str] | None = None
    callback: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if _NAME.fullmatch(value) is None:
            raise ValueError(
                f"{value!r} is not a rule name: letters, digits, '-', '_', '.'; at most 100"
            )
        return value

    @field_validator("when")
    @classmethod
    def _when(cls, value: Conditions) -> Conditions:
        for path in value:
            check_field_path(path)
        return value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: BudgetModel | None, info: ValidationInfo) -> BudgetModel | None:
        # Over budget a rule stops matching: on a deny, that would let the rest through.
        if value is not None and info.data.get("action") == "deny":
            raise ValueError("a deny rule cannot have a budget: once spent, it would stop denying")
        return value

    @field_validator("message")
    @classmethod
    def _message(cls, value: str | None, info: ValidationInfo) -> str | None:
        action = info.data.get("action")
        if action is not None and action != "deny":
            raise ValueError(f"only a deny rule takes a message (this rule is {action})")
        if value is not None and not value.strip():
            raise ValueError("message must not be empty")
        return value

    @field_validator(
        "reviewers", "approvals", "expires_after", "editable", "callback", mode="before"
    )
    @classmethod
    def _hold_only(cls, value: Any, info: ValidationInfo) -> Any:
        action = info.data.get("action")
        if action is not None and action != "hold":
            raise ValueError(f"only a hold rule takes {info.field_name} (this rule is {action})")
        return value

    @field_validator("reviewers")
    @classmethod
    def _reviewers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("list a reviewer, or leave reviewers out to use COSIGNER_REVIEWERS")
        seen: set[str] = set()
        for item in value:
            if _EMAIL.fullmatch(item) is None:
                raise ValueError(f"{item!r} is not an email address")
            # One reviewer counts once toward a quorum, whatever the case of the address.
            if item.lower() in seen:
                raise ValueError(f"{item!r} is listed twice")
            seen.add(item.lower())
        return value

    @field_validator("approvals")
    @classmethod
    def _approvals(cls, value: int | None, info: ValidationInfo) -> int | None:
        reviewers = info.data.get("reviewers")
        if value is not None and reviewers and value > len(reviewers):
            raise ValueError(
                f"needs {value} distinct reviewers but the rule lists only {len(reviewers)}"
            )
        return value

    @field_validator("editable")
    @classmethod
    def _editable(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must list at least one field name")
        for item in value:
            check_field_path(item)
        if len(set(value)) != len(value):
            raise ValueError("lists a field twice")
        return value

    @field_validator("callback")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or value != value.strip():
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class RuleFileModel(_Model):
    """One rule file."""

    version: Literal[1]
    defaults: DefaultsModel | None = None
    rules: list[RuleModel] = Field(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # Strict mode alone lets true and 1.0 through as 1.
        if type(value) is not int or value != 1:
            raise ValueError(f"unsupported version {value!r}; this gateway reads version: 1")
        return value
