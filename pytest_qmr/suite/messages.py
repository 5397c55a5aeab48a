"""Every suite problem as ONE line: ``<file>: <dotted.key.path>: <problem> (got <value>)``.

:class:`SuiteError` carries that line.  :func:`pydantic_message` turns the first error of a
pydantic :class:`~pydantic.ValidationError` into it: the key path as written in the file
(``quantizers[1].bits``), the problem in the suite's words (an unknown key gets a did-you-mean
over the keys valid at that place, found by :func:`_type_at` in :class:`~.schema.SuiteSpec`; a
literal lists its choices; a bound says whether it is inclusive), and the value shortened to one
line by :func:`show_value`.  :func:`yaml_message` does the same for a YAML syntax error with its
line and column, and :func:`fail` raises one for the checks that run after the schema.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import QmrError
from .schema import SuiteSpec


class SuiteError(QmrError, ValueError):
    """A suite file that cannot be used; ``str(err)`` is one line for the user."""


def fail(source: str, key: str, problem: str, value: Any, *, raw: bool = False) -> None:
    shown = value if raw else show_value(value)
    raise SuiteError(f"{source}: {key}: {problem} (got {shown})")


def show_value(value: Any, limit: int = 70) -> str:
    """A short, single-line rendering of a YAML value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a mapping " + repr(value)
    elif isinstance(value, (list, tuple)):
        text = "a list " + repr(list(value))
    else:
        text = f"{type(value).__name__} {value!r}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _type_at(loc: tuple) -> Any:
    """The annotation of the field at ``loc`` in :class:`SuiteSpec` (None if not a field)."""
    tp: Any = SuiteSpec
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            if get_origin(tp) is list:
                tp = get_args(tp)[0]
                continue
            return None
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
            continue
        return None
    return _unwrap(tp)


_TYPE_PROBLEMS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "none_required": "must be null",
}


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _problem(error: dict) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _type_at(loc[:-1])
        valid = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        if close:
            return f"unknown key, did you mean {close[0]!r}?"
        return "unknown key (valid keys: " + ", ".join(valid) + ")" if valid else "unknown key"
    if kind == "missing":
        return "missing required key"
    if kind == "literal_error":
        field = _type_at(loc)
        if get_origin(field) is Literal:
            return "must be one of " + ", ".join(str(a) for a in get_args(field))
        return "must be one of " + str(ctx.get("expected", ""))
    if kind in _TYPE_PROBLEMS:
        problem = _TYPE_PROBLEMS[kind]
        if kind in ("int_type", "int_parsing") and isinstance(error.get("input"), float):
            problem += " (no decimal point)"
        return problem
    if kind == "greater_than":
        return f"must be greater than {_num(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"must be at least {_num(ctx['ge'])}"
    if kind in ("less_than", "less_than_equal"):
        bound = _num(ctx.get("lt", ctx.get("le")))
        problem = f"must be less than {bound}" if kind == "less_than" else f"must be at most {bound}"
        if loc and loc[-1] in ("max_abs_drop", "max_rel_drop"):
            problem += " (a fraction: 0.05 means 5 points)"
        return problem
    if kind == "too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    msg = str(error.get("msg", kind))
    return msg[:1].lower() + msg[1:]


def pydantic_message(source: str, exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    problem = _problem(error)
    value = error.get("input")
    if error["type"] == "missing":
        keys = list(value) if isinstance(value, dict) else []
        shown = ("keys: " + ", ".join(map(str, keys))) if keys else "an empty mapping"
    else:
        shown = show_value(value)
    return " ".join(f"{source}: {_key_path(loc)}: {problem} (got {shown})".split())


def yaml_message(source: str, exc: yaml.YAMLError, text: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and "duplicate key" not in str(problem):
        problem = f"{problem} {context}"
    problem = " ".join(str(problem).split())
    if mark is None:
        return f"{source}: (yaml): invalid YAML: {problem} (got unparseable text)"
    lines = text.splitlines()
    line = lines[mark.line].strip() if mark.line < len(lines) else ""
    return (
        f"{source}: line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem} "
        f"(got {show_value(line)})"
    )
