"""The error taxonomy of "Quantization Meets Reasoning" (arXiv 2505.11574).

Four categories, seven types. When several types apply to one faulty step, the one that comes
EARLIEST in :data:`TYPES` is the step's primary type: a conceptual mistake explains whatever
reasoning, method and execution mistakes follow from it, a reasoning mistake explains the
method and execution ones, and so on.
"""

from __future__ import annotations

from collections.abc import Iterable

CATEGORIES: dict[str, tuple[str, ...]] = {
    "conceptual": ("conceptual_misunderstanding", "contextual_oversight"),
    "reasoning": ("logical_reasoning_error",),
    "method": ("procedural_error", "formula_rule_error"),
    "execution": ("computational_error", "symbolic_manipulation_error"),
}

#: All seven types, earliest (highest priority) first.
TYPES: tuple[str, ...] = tuple(t for types in CATEGORIES.values() for t in types)

#: type -> category
CATEGORY_OF: dict[str, str] = {t: cat for cat, types in CATEGORIES.items() for t in types}

_RANK = {t: i for i, t in enumerate(TYPES)}


def validate(error_type: str) -> str:
    """``error_type`` itself when it is one of :data:`TYPES`; ValueError otherwise."""
    if error_type not in _RANK:
        raise ValueError(f"unknown error type {error_type!r}; expected one of: {', '.join(TYPES)}")
    return error_type


def earliest(types: Iterable[str]) -> str:
    """The primary type among ``types``: the one that comes first in :data:`TYPES`."""
    found = [validate(t) for t in types]
    if not found:
        raise ValueError("earliest() needs at least one error type")
    return min(found, key=_RANK.__getitem__)
