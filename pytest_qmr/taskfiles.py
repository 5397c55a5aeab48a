"""lm-eval task files as a user writes them: where a task is defined, which files do not parse,
and one line for a task lm-eval cannot build.

lm-eval indexes a task folder by parsing every YAML file and skips a file that does not parse
without a word (its ``TaskIndex.build`` logs it at debug level), and a task name defined in two
folders silently takes the later one. Building a task then fails deep inside lm-eval or
``datasets`` with a traceback that names a folder at best: a ``!function`` whose module does not
import, a ``dataset_kwargs.data_files`` entry that is not there, a ``doc_to_text`` template that
reads a field the data does not have. Each of these is one :class:`~pytest_qmr.errors.TaskError`
line here, naming the YAML file, the key and the value:

- :func:`definitions`: the YAML files that define a task, per folder (our ``tasks/`` and the
  suite's folders), so that a name defined twice is refused at collection;
- :func:`broken_files`: the files of the folders that mention a task name but do not parse;
- :func:`building`: a context in which lm-eval builds (and reads the data of) a task, turning
  the failures above into one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import QmrError, TaskError


class _TaskYaml:
    """YAML as lm-eval writes it: ``!function module.name`` kept as the text ``!function module.name``."""

    @staticmethod
    def load(text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


@lru_cache(maxsize=32)
def _index(folder: Path) -> dict[str, Path | None]:
    """task name -> its YAML file, of one folder alone (lm-eval's own index of it)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(folder)], include_defaults=False)
    return {name: entry.yaml_path for name, entry in manager.task_index.items()}


def definitions(task: str, folders: Iterable[Path]) -> list[Path]:
    """The YAML files that define ``task``, one per folder that does (in the folders' order)."""
    found = []
    for folder in folders:
        path = _index(Path(folder)).get(task)
        if path is not None:
            found.append(Path(path))
    return found


def broken_files(task: str, folders: Iterable[Path]) -> list[tuple[Path, str]]:
    """``(file, why)`` for each YAML file of ``folders`` that names ``task`` but does not parse."""
    import yaml

    pattern = re.compile(rf"^\s*task\s*:\s*['\"]?{re.escape(task)}['\"]?\s*(#.*)?$", re.MULTILINE)
    broken = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                broken.append((path, f"unreadable ({type(exc).__name__})"))
                continue
            if not pattern.search(text):
                continue
            try:
                _TaskYaml.load(text)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(exc, "problem", None) or type(exc).__name__
                broken.append((path, f"does not parse as YAML{where}: {problem}"))
    return broken


def _key_of(data: Any, needle: str, prefix: str = "") -> str | None:
    """The dotted key of the first string value in ``data`` that contains ``needle``."""
    if isinstance(data, dict):
        for key, value in data.items():
            found = _key_of(value, needle, f"{prefix}.{key}" if prefix else str(key))
            if found is not None:
                return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found = _key_of(value, needle, f"{prefix}[{i}]")
            if found is not None:
                return found
    elif isinstance(data, str) and needle in data:
        return prefix
    return None


def _located(path: Path | None, needle: str | None) -> tuple[str, str | None]:
    """(the file as shown, the key in it whose value holds ``needle``)."""
    if path is None:
        return "(no YAML file)", None
    key = None
    if needle:
        try:
            key = _key_of(_TaskYaml.load(Path(path).read_text(encoding="utf-8")), needle)
        except Exception:  # noqa: BLE001 - a file that does not parse names no key; the line still names the file
            key = None
    return str(path), key


def describe(task: str, path: Path | None, exc: BaseException) -> str:
    """One line for a task lm-eval could not build: the file, the key and the value at fault."""
    text = " ".join(str(exc).split())
    if match := re.search(r"Cannot import module '([^']+)' for function '([^']+)'", text):
        value = f"!function {match[1]}.{match[2]}"
        file, key = _located(path, value)
        return f"{file}: {key or 'a !function'}: module {match[1]!r} cannot be imported (got {value!r})"
    if isinstance(exc, FileNotFoundError):
        missing = next(iter(re.findall(r"'([^']+)'", text)), None)
        file, key = _located(path, missing)
        shown = missing or text
        return f"{file}: {key or 'dataset'}: no such data file for task {task} (got {shown!r})"
    if type(exc).__name__ == "UndefinedError":
        name = next(iter(re.findall(r"'([^']+)' is undefined", text)), None)
        file, key = _located(path, name)
        return f"{file}: {key or 'a template'}: {text} (the task's docs have no field {name!r})"
    if isinstance(exc, ConnectionError):
        file, _ = _located(path, None)
        return (f"{file}: dataset_path: task {task}'s dataset cannot be fetched here ({type(exc).__name__}); "
                "point dataset_kwargs.data_files at local files")
    file, _ = _located(path, None)
    return f"{file}: task {task} cannot be built ({type(exc).__name__}: {text[:200]})"


# what lm-eval and datasets raise for a task file or its data (not for a bug of ours)
BUILD_ERRORS: tuple[type[BaseException], ...] = (ImportError, FileNotFoundError, ConnectionError)


def _build_errors() -> tuple[type[BaseException], ...]:
    try:
        from jinja2.exceptions import UndefinedError
    except ImportError:  # pragma: no cover - jinja2 comes with lm-eval
        return BUILD_ERRORS
    return (*BUILD_ERRORS, UndefinedError)


@contextmanager
def building(task: str, manager) -> Iterator[None]:
    """lm-eval builds ``task`` (through ``manager``, a ``TaskManager``) in this block: a failure
    of the task's file or data is one :class:`TaskError` line naming its YAML file."""
    try:
        yield
    except QmrError:
        raise
    except _build_errors() as exc:
        entry = manager.task_index.get(task)
        raise TaskError(describe(task, getattr(entry, "yaml_path", None), exc)) from None
