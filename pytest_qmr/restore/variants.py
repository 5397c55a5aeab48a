"""Restore variants (paper Table 2): which judged rows become pairs, and where they are cut.

A variant is a small :class:`Variant` object registered by name in
:data:`pytest_qmr.registry.RESTORE_VARIANTS`; :func:`get_variant` finds it, and the suite's
``restore.variant``, ``qmr pairs --variant`` and :func:`pytest_qmr.restore.pairs.build_pairs`
all go through the registry. What a variant says:

``category``  the one error category whose cases it keeps (None: every category);
``resume``    whether the pair resumes at the cut, just before the first faulty step (False: the
              prompt is the problem, chosen the teacher's whole solution, rejected the whole
              quantized response; the cut is step 1);
:meth:`Variant.keeps`       whether one judged row is a case of the variant (default: a failure
              with a final, located first faulty step — :func:`is_case` — in ``category``);
:meth:`Variant.candidates`  how many pairs to make and from which rows, in the order tried
              (default: every case, in order; :class:`RandomDraw`: a seeded random draw of the
              pool, correct rows included, as many as ``size`` or as ``all-step`` would make).

Built in: ``all-step`` every located case; ``ce-step`` / ``me-step`` / ``ee-step`` only
conceptual / method / execution cases; ``all-ns`` every case, no resume; ``rand-ns`` as many
random training problems (failed or not) as ``all-ns`` has rows, no resume; ``rand-cut`` every
located case cut at a seeded random step at or before its first faulty one (the paper's
random-cut-point ablation: the same cases and teacher, the cut no longer at the fault). A variant of a
project's own is one subclass (or instance) registered under a new name::

    @dataclass(frozen=True)
    class FirstStepOnly(Variant):
        def keeps(self, row):
            return super().keeps(row) and int(row["first_error_step"]) == 1

    RESTORE_VARIANTS.add("first-only", FirstStepOnly())
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..registry import RESTORE_VARIANTS, RegistryError
from .records import RestoreError

FINAL_STATUSES = ("accepted", "human")  # as pytest_qmr.locate: only these verdicts are final
Row = Mapping[str, Any]


def is_case(row: Row) -> bool:
    """A failure with a final, located first faulty step (what step variants restore)."""
    try:
        step = int(row.get("first_error_step", -1))
    except (TypeError, ValueError):
        return False
    return step >= 1 and row.get("status") in FINAL_STATUSES and not row.get("correct", False)


@dataclass(frozen=True)
class Variant:
    """Which rows a variant keeps, whether it resumes at the cut, and how it picks candidates."""

    category: str | None = None  # the one category kept (None: all)
    resume: bool = True  # cut before the first faulty step (False: the whole solution)
    draws_from_pool: ClassVar[bool] = False  # candidates come from a pool, not from the cases

    def keeps(self, row: Row) -> bool:
        return is_case(row) and (self.category is None or row.get("category") == self.category)

    def select(self, rows: Sequence[Row]) -> list[Row]:
        """The variant's cases among ``rows``, in order."""
        return [r for r in rows if self.keeps(r)]

    def candidates(self, cases: Sequence[Row], pool: Sequence[Row] | None, size: int | None,
                   seed: int) -> tuple[int, list[Row]]:
        """(how many pairs to make, the rows to try in order until that many verify)."""
        located = self.select(cases)
        return len(located), located

    def describe(self) -> str:
        """What the variant restricts the cases to, for "nothing to restore" ("" when nothing)."""
        return f" in category {self.category}" if self.category else ""


@dataclass(frozen=True)
class RandomDraw(Variant):
    """Random rows of ``pool`` (default: the cases; correct or not), ``size`` of them (default: as
    many as ``all-step`` has cases), drawn with ``seed`` and tried in that order."""

    resume: bool = False
    draws_from_pool: ClassVar[bool] = True

    def candidates(self, cases: Sequence[Row], pool: Sequence[Row] | None, size: int | None,
                   seed: int) -> tuple[int, list[Row]]:
        rows = list(pool if pool is not None else cases)
        want = min(len(rows), size if size is not None else len(Variant().select(cases)))
        return want, random.Random(seed).sample(rows, len(rows))


@dataclass(frozen=True)
class RandomCut(Variant):
    """Every located case, cut at a step drawn (with ``seed``) uniformly from 1 to its first faulty
    step: the prefix stays correct, so a teacher resumes from it as from the true cut, but the pair
    no longer isolates the step that failed (rejected: the quantized model's continuation there)."""

    def candidates(self, cases: Sequence[Row], pool: Sequence[Row] | None, size: int | None,
                   seed: int) -> tuple[int, list[Row]]:
        rng = random.Random(seed)
        located = self.select(cases)
        return len(located), [{**r, "first_error_step": rng.randint(1, int(r["first_error_step"]))} for r in located]


def get_variant(name: str) -> Variant:
    """The registered variant ``name`` (a registered class is instantiated with no arguments);
    :class:`RestoreError` (did-you-mean) for an unknown one."""
    try:
        variant = RESTORE_VARIANTS.get(name)
    except RegistryError as exc:
        raise RestoreError(str(exc)) from None
    if isinstance(variant, type):
        variant = variant()
    if not (callable(getattr(variant, "candidates", None)) and hasattr(variant, "resume")):
        raise RestoreError(f"Restore variant {name!r}: {type(variant).__name__} is not a Variant "
                           "(keeps, candidates, resume)")
    return variant


RESTORE_VARIANTS.add("all-step", Variant())
RESTORE_VARIANTS.add("ce-step", Variant("conceptual"))
RESTORE_VARIANTS.add("me-step", Variant("method"))
RESTORE_VARIANTS.add("ee-step", Variant("execution"))
RESTORE_VARIANTS.add("all-ns", Variant(resume=False))
RESTORE_VARIANTS.add("rand-ns", RandomDraw())
RESTORE_VARIANTS.add("rand-cut", RandomCut())
