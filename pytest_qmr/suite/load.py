"""Reading a suite file: YAML (a repeated key is an error, not the last one silently kept), then
the schema (:mod:`.schema`), then the checks across fields (:mod:`.checks`).

:func:`load_suite` reads a file, :func:`parse_suite` validates data already parsed; both raise
:class:`~.messages.SuiteError` with one line on the first problem (a missing, unreadable or
non-UTF-8 file, invalid YAML with its line and column, a top level that is not a mapping, a
schema or semantic error) and return a :class:`~.cells.Suite`.  Task folders, recipes and judge
files are not looked at here: that is :func:`~.checks.check_references`, at collection.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .cells import Suite
from .checks import check_semantics
from .messages import SuiteError, pydantic_message, show_value, yaml_message
from .schema import SuiteSpec


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # let construct_mapping report it
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_suite(path: str | os.PathLike, extra_tasks: Sequence[str | os.PathLike] = ()) -> Suite:
    """Read and validate a suite file; raise :class:`SuiteError` (one line) on any problem.
    ``extra_tasks``: more lm-eval task folders (``--qmr-tasks``), relative to the working directory."""
    source = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{source}: suite file not found (got {str(file.resolve())!r})") from None
    except IsADirectoryError:
        raise SuiteError(f"{source}: is a directory, not a suite file (got {str(file.resolve())!r})") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{source}: not UTF-8 text "
                         f"(got byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise SuiteError(f"{source}: cannot read suite file: {exc.strerror} (got {str(file.resolve())!r})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise SuiteError(yaml_message(source, exc, text)) from None
    suite = parse_suite(data, source=source, path=file)
    return dataclasses.replace(suite, extra_tasks=tuple(Path(p).expanduser().resolve() for p in extra_tasks))


def parse_suite(data: Any, *, source: str = "<suite>", path: str | os.PathLike | None = None) -> Suite:
    """Validate already-parsed suite data (``path`` anchors a relative ``data_dir``)."""
    suite_path = Path(path).resolve() if path is not None else Path.cwd() / "<suite>"
    if data is None:
        raise SuiteError(f"{source}: (top level): must be a mapping of suite keys (got an empty file)")
    if not isinstance(data, dict):
        raise SuiteError(f"{source}: (top level): must be a mapping of suite keys (got {show_value(data)})")
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        raise SuiteError(pydantic_message(source, exc)) from None
    check_semantics(source, spec)
    return Suite(spec=spec, path=suite_path, source=source)
