"""One registry per extension point: a name -> implementation map that the schema, the pytest
markers, the CLI choices and every check are derived from.

An extension point is one :class:`Registry`; adding an implementation is one file that registers
itself, plus nothing else (the llmcompressor "a modifier is one file found by a factory" rule)::

    from pytest_qmr.registry import QUANT_METHODS

    @QUANT_METHODS.register("my-rtn")
    class MyRTN(RTN): ...

Where implementations come from, in this order, the first time a registry is read:

1. the built-in modules of the extension point (``builtins``: module names imported lazily, so
   reading the suite schema does not import torch);
2. installed distributions' entry points in the group ``pytest_qmr.<point>`` (e.g.
   ``[project.entry-points."pytest_qmr.quant_methods"] my-rtn = "mypkg.quant:MyRTN"``);
3. anything registered at run time — a project's ``conftest.py`` importing its own module is
   enough (pytest imports conftest files before it reads a suite, on every xdist worker too).

A name is registered once; registering it again is an error unless ``replace=True`` (a project
overriding a built-in says so). An unknown name is one line with a did-you-mean hint:
``unknown quantization method 'gtpq' (did you mean 'gptq'?)``.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .errors import QmrError

T = TypeVar("T")
_NAME = re.compile(r"[a-z0-9][a-z0-9.\-_]*")

__all__ = ["Registry", "RegistryError", "QUANT_METHODS", "JUDGES", "TEACHERS", "PROBLEM_SOURCES",
           "RESTORE_VARIANTS", "ENGINES", "REGISTRIES"]


class RegistryError(QmrError, ValueError):
    """An unknown or doubly registered name; one line for the user."""


class Registry(Generic[T]):
    """Names -> implementations of one extension point (``kind``, e.g. "quantization method")."""

    def __init__(self, kind: str, point: str, builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.point = point  # entry-point group suffix: pytest_qmr.<point>
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = False

    # ------------------------------------------------------------------ registering

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` over a class or function."""

        def decorate(obj: T) -> T:
            self.add(name, obj, replace=replace)
            return obj

        return decorate

    def add(self, name: str, obj: T, *, replace: bool = False) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RegistryError(f"{self.kind} name {name!r}: must be lowercase letters, digits, '.', '-' or '_'")
        if name in self._entries and not replace and self._entries[name] is not obj:
            raise RegistryError(f"{self.kind} {name!r} is already registered "
                                f"({_where(self._entries[name])}); pass replace=True to override it")
        self._entries[name] = obj

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests registering a temporary implementation clean up with this)."""
        self._entries.pop(name, None)

    # ------------------------------------------------------------------ reading

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before importing: a built-in module registering itself re-enters
        try:
            for module in self._builtins:
                importlib.import_module(module)
            for ep in entry_points(group=f"pytest_qmr.{self.point}"):
                if ep.name not in self._entries:
                    self.add(ep.name, ep.load())
        except BaseException:
            self._loaded = False
            raise

    def get(self, name: str, *, where: str = "") -> T:
        """The implementation named ``name``; :class:`RegistryError` (``where: unknown ...``) otherwise."""
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RegistryError(self.unknown(name, where)) from None

    def unknown(self, name: object, where: str = "", also: Iterable[str] = ()) -> str:
        """The one-line message for an unknown ``name`` (did-you-mean, else the known names);
        ``also``: names valid beside the registered ones (e.g. judges configured in a file)."""
        known = (*self.names(), *also)
        close = self.closest(name, known)
        hint = f"did you mean {close!r}?" if close else f"known: {', '.join(known)}"
        return f"{where + ': ' if where else ''}unknown {self.kind} {name!r} ({hint})"

    def closest(self, name: object, also: Iterable[str] = ()) -> str | None:
        """The registered name (or one of ``also``) that ``name`` is probably a typo of, if any."""
        close = difflib.get_close_matches(str(name), (*self.names(), *also), n=1)
        return close[0] if close else None

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(list(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


# One registry per extension point; the modules named register the built-in implementations.
QUANT_METHODS: Registry = Registry("quantization method", "quant_methods", ("pytest_qmr.quantize.methods",))
JUDGES: Registry = Registry("judge", "judges", ("pytest_qmr.locate.judges.rule",
                                                 "pytest_qmr.locate.judges.arith"))
TEACHERS: Registry = Registry("teacher", "teachers", ("pytest_qmr.restore.teachers",))
PROBLEM_SOURCES: Registry = Registry("training-problem source", "problem_sources", ("pytest_qmr.restore.problems",))
RESTORE_VARIANTS: Registry = Registry("Restore variant", "restore_variants", ("pytest_qmr.restore.variants",))
ENGINES: Registry = Registry("generation backend", "engines", ("pytest_qmr.engines.hf", "pytest_qmr.engines.vllm",
                                                             "pytest_qmr.engines.openai"))
REGISTRIES = (QUANT_METHODS, JUDGES, TEACHERS, PROBLEM_SOURCES, RESTORE_VARIANTS, ENGINES)
