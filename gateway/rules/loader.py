"""Read a folder of rule files into a ``RuleSet``, or say everything wrong with it.

Every problem in every file is collected before anything is raised, so one
``cosigner rules check`` lists them all. Each problem names the file, the rule
(its name, or ``#N`` for the N-th rule of the file when it has none) and the
field path, e.g. ``when.amount.lessthan``.

YAML is read with a stricter loader than PyYAML's default: a duplicate key is
an error (PyYAML would keep the last one silently), and scalars follow YAML 1.2
(``no`` and ``on`` stay strings, ``010`` is ten, dates stay strings).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .engine import (
    ActionKind,
    Budget,
    CompiledRule,
    Condition,
    Operand,
    RuleSet,
    compile_path,
    make_operand,
)
from .schema import (
    OPERATORS,
    BudgetModel,
    ConditionModel,
    DefaultsModel,
    MatchModel,
    RuleFileModel,
    RuleModel,
    SumModel,
    parse_duration,
)

__all__ = [
    "RuleProblem",
    "RulesError",
    "check_rules",
    "compile_rule",
    "load_rules",
    "parse_duration",
    "parse_rules",
]

_SUFFIXES = (".yaml", ".yml")
_ACTIONS = ("allow", "hold", "deny")


@dataclass(frozen=True)
class RuleProblem:
    """One thing wrong with the rule files."""

    file: str
    rule: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        parts = [self.file]
        if self.rule is not None:
            parts.append(
                f"rule {self.rule}" if self.rule.startswith("#") else f"rule '{self.rule}'"
            )
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)


class RulesError(Exception):
    """The rule files are invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: Iterable[RuleProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def load_rules(directory: str | Path) -> RuleSet:
    """Load every rule file in ``directory``; raise RulesError listing every problem."""
    sources, problems = _read_folder(Path(directory))
    ruleset, more = _build(sources)
    problems.extend(more)
    if problems or ruleset is None:
        raise RulesError(problems)
    return ruleset


def check_rules(directory: str | Path) -> list[RuleProblem]:
    """Every problem with the rule files in ``directory``; [] when they are fine."""
    sources, problems = _read_folder(Path(directory))
    problems.extend(_build(sources)[1])
    return problems


def parse_rules(sources: Mapping[str, str]) -> RuleSet:
    """A RuleSet from file name → YAML text, evaluated in file-name order."""
    ruleset, problems = _build(sorted(sources.items()))
    if problems or ruleset is None:
        raise RulesError(problems)
    return ruleset


def _read_folder(directory: Path) -> tuple[list[tuple[str, str]], list[RuleProblem]]:
    if not directory.exists():
        return [], [RuleProblem(str(directory), None, None, "rules folder does not exist")]
    if not directory.is_dir():
        return [], [RuleProblem(str(directory), None, None, "is not a folder")]
    # Dotfiles are editors' swap and lock files, not rules.
    paths = sorted(
        (
            path
            for path in directory.iterdir()
            if path.suffix.lower() in _SUFFIXES and not path.name.startswith(".")
        ),
        key=lambda path: path.name,
    )
    sources: list[tuple[str, str]] = []
    problems: list[RuleProblem] = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            sources.append((path.name, path.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as exc:
            problems.append(RuleProblem(path.name, None, None, f"is not UTF-8 text: {exc}"))
        except OSError as exc:
            problems.append(RuleProblem(path.name, None, None, f"cannot be read: {exc.strerror}"))
    return sources, problems


def _build(sources: Iterable[tuple[str, str]]) -> tuple[RuleSet | None, list[RuleProblem]]:
    """Validate every file, then check across files; compile only when all is well."""
    problems: list[RuleProblem] = []
    files: list[tuple[str, RuleFileModel]] = []
    first_name: dict[str, tuple[str, int]] = {}
    first_default: dict[str, tuple[str, str]] = {}
    for filename, text in sources:
        data, problem = _parse_yaml(filename, text)
        if problem is not None:
            problems.append(problem)
            continue
        if data is None:
            problems.append(
                RuleProblem(filename, None, None, "is empty; a rule file starts with version: 1")
            )
            continue
        if not isinstance(data, dict):
            problems.append(
                RuleProblem(
                    filename,
                    None,
                    None,
                    f"must be a mapping with version and rules, not {_kind(data)}",
                )
            )
            continue
        raw_rules = data.get("rules")
        raw_rules = raw_rules if isinstance(raw_rules, list) else []
        try:
            files.append((filename, RuleFileModel.model_validate(data)))
        except ValidationError as exc:
            problems.extend(
                _problem_from_error(filename, raw_rules, error)
                for error in exc.errors(include_url=False)
            )
        # Cross-file checks read the raw data too, so that a file with other problems
        # still reports its duplicate names and conflicting defaults in the same run.
        for index, raw in enumerate(raw_rules, 1):
            name = raw.get("name") if isinstance(raw, dict) else None
            if not isinstance(name, str):
                continue
            if name in first_name:
                where, at = first_name[name]
                earlier = "earlier in this file" if where == filename else f"in {where}"
                message = f"duplicate rule name; first defined {earlier} (rule #{at})"
                problems.append(RuleProblem(filename, name, "name", message))
            else:
                first_name[name] = (filename, index)
        raw_defaults = data.get("defaults")
        if isinstance(raw_defaults, dict):
            for kind in ("read", "write"):
                action = raw_defaults.get(kind)
                if action not in _ACTIONS:
                    continue
                if kind not in first_default:
                    first_default[kind] = (filename, action)
                elif first_default[kind][1] != action:
                    where, earlier = first_default[kind]
                    message = (
                        f"{action} conflicts with {kind}: {earlier} in {where};"
                        " declare defaults in one file"
                    )
                    problems.append(RuleProblem(filename, None, f"defaults.{kind}", message))
    if problems:
        return None, problems
    return _compile(files), []


def _compile(files: list[tuple[str, RuleFileModel]]) -> RuleSet:
    rules: list[CompiledRule] = []
    read: ActionKind = "allow"
    write: ActionKind = "hold"
    defaults_source: str | None = None
    for filename, model in files:
        if model.defaults is not None:
            if model.defaults.read is not None:
                read = model.defaults.read
            if model.defaults.write is not None:
                write = model.defaults.write
            defaults_source = defaults_source or filename
        rules.extend(
            compile_rule(rule, filename, index) for index, rule in enumerate(model.rules, 1)
        )
    return RuleSet(tuple(rules), read, write, defaults_source)


def compile_rule(model: RuleModel, source: str, index: int = 1) -> CompiledRule:
    """Compile one validated rule into its hot-path form."""
    match = model.match
    budget: Budget | None = None
    sum_parts: tuple[str, ...] = ()
    if model.budget is not None:
        spec = model.budget
        budget = Budget(
            count=spec.count,
            sum_field=spec.sum.field if spec.sum else None,
            sum_max=spec.sum.max if spec.sum else None,
            per=spec.per,
            scope=spec.scope,
        )
        sum_parts = tuple(spec.sum.field.split(".")) if spec.sum else ()
    return CompiledRule(
        name=model.name,
        source=source,
        action=model.action,
        index=index,
        description=model.description,
        methods=frozenset(match.method) if match.method is not None else None,
        path=match.path,
        path_regex=compile_path(match.path) if match.path is not None else None,
        agents=frozenset(match.agent) if match.agent is not None else None,
        accounts=frozenset(match.account) if match.account is not None else None,
        conditions=tuple(
            condition
            for field, spec_ in model.when.items()
            for condition in _compile_conditions(field, spec_)
        ),
        budget=budget,
        sum_parts=sum_parts,
        message=model.message,
        reviewers=tuple(model.reviewers or ()),
        approvals=model.approvals if model.approvals is not None else 1,
        expires_after=model.expires_after if model.expires_after is not None else 86400,
        editable=tuple(model.editable or ()),
        callback=model.callback,
    )


def _compile_conditions(field: str, spec: ConditionModel) -> list[Condition]:
    parts = tuple(field.split("."))
    conditions: list[Condition] = []
    for op, value in spec.operators():
        if op == "exists":
            conditions.append(Condition(field, parts, "exists", flag=value))
        elif op == "matches":
            conditions.append(Condition(field, parts, "matches", regex=re.compile(value)))
        elif op in ("in", "not_in"):
            operands: tuple[Operand, ...] = tuple(make_operand(item) for item in value)
            conditions.append(Condition(field, parts, op, operands))
        else:
            conditions.append(Condition(field, parts, op, (make_operand(value),)))
    return conditions


# --- YAML ------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # Only decimal reaches here (see the resolver below); PyYAML would read 010 as 8.
        return int(self.construct_scalar(node))


_REPLACED = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
}
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789")
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _parse_yaml(filename: str, text: str) -> tuple[Any, RuleProblem | None]:
    try:
        return yaml.load(text, Loader=_StrictLoader), None  # a SafeLoader: builds no objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "unreadable"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        return None, RuleProblem(filename, None, None, f"invalid YAML{where}: {what}{context}")
    except (yaml.YAMLError, ValueError) as exc:
        return None, RuleProblem(filename, None, None, f"invalid YAML: {exc}")


# --- pydantic errors as rule problems ----------------------------------------------------


def _problem_from_error(filename: str, raw_rules: list[Any], error: ErrorDetails) -> RuleProblem:
    loc = error["loc"]
    rule: str | None = None
    field_loc = loc
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        index = loc[1]
        raw = raw_rules[index] if index < len(raw_rules) else None
        name = raw.get("name") if isinstance(raw, dict) else None
        rule = name if isinstance(name, str) and name else f"#{index + 1}"
        field_loc = loc[2:]
    field = _join(field_loc)
    return RuleProblem(filename, rule, field or None, _message(error))


def _join(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


_HINTS = {
    "version": "is required: a rule file starts with version: 1",
    "match": "is required (use path: /** to match every request)",
    "action": "is required: allow, hold or deny",
    "per": "is required: the budget's window, e.g. 24h",
}


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    loc = error["loc"]
    key = str(loc[-1]) if loc else ""
    if kind == "missing":
        return _HINTS.get(key, "is required")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        if model is ConditionModel:
            return f"unknown operator {key!r}; use one of {', '.join(OPERATORS)}"
        if model is None:
            return f"unknown key {key!r}"
        return f"unknown key {key!r}; expected one of {', '.join(_keys(model))}"
    message = error["msg"]
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind in ("model_type", "dict_type"):
        return f"must be a mapping, not {_kind(error['input'])}"
    if kind == "list_type":
        return f"must be a list, not {_kind(error['input'])}"
    message = message.replace("Input should be", "must be")
    value = error.get("input")
    if isinstance(value, str | int | float | bool):
        message += f", not {value!r}"
    return message


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Which part of the format a location points into, for 'expected one of' hints."""
    if not loc:
        return RuleFileModel
    if loc == ("defaults",):
        return DefaultsModel
    if len(loc) < 2 or loc[0] != "rules":
        return None
    rest = loc[2:]
    shapes: dict[tuple[int | str, ...], type[BaseModel]] = {
        (): RuleModel,
        ("match",): MatchModel,
        ("budget",): BudgetModel,
        ("budget", "sum"): SumModel,
    }
    if len(rest) == 2 and rest[0] == "when":
        return ConditionModel
    return shapes.get(rest)


def _keys(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
