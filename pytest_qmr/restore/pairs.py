"""Pairs: judged rows cut at the first faulty step become Silver Bullet preference pairs.

For every case of a variant (:mod:`.variants`) the quantized trace is cut just before its first
faulty step (:func:`cut_case`). The prompt is the problem, chat-formatted exactly as the model
saw it, plus the correct prefix; **rejected** is the quantized model's own continuation from
there (``rejected_scope="step"``: only its faulty step) and **chosen** a teacher's continuation
(:mod:`.teachers`) from the same point, kept only when its final answer verifies against the gold
(:func:`pytest_qmr.answers.is_equivalent`). A variant that does not resume cuts at the start.

Pairs come from a training split: :func:`check_leakage` refuses pairs whose items are evaluation
items and, unless ``allow_test_split``, items whose ids say they are test items.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .. import answers, taxonomy
from ..steps import cut_before, segment
from .problems import row_prompt
from .records import LeakageError, PreferencePair, RestoreError
from .teachers import Cut, Teacher
from .variants import get_variant, is_case

__all__ = ["REJECTED_SCOPES", "build_pairs", "check_leakage", "cut_case", "first_step_of", "is_case",
           "select_cases"]

#: how much of the quantized model's continuation a pair rejects: all of it (the paper) or its faulty step
REJECTED_SCOPES = ("rest", "step")


def cut_case(row: Mapping[str, Any], tokenizer=None, kind: str = "number", resume: bool = True) -> Cut | None:
    """The case cut before its first faulty step (``resume=False``: at the very start).
    None when the step index does not fit the response."""
    response = str(row["response"])
    step = int(row["first_error_step"]) if resume else 1
    try:
        prefix = cut_before(response, step) if resume else ""
    except ValueError:
        return None
    prompt, user = row_prompt(row, tokenizer, kind)
    t = row.get("primary_error_type")
    return Cut(str(row["id"]), prompt, user, prefix, response[len(prefix):], step, str(row["gold_answer"]),
               str(row.get("kind") or kind), t, row.get("category") or (taxonomy.CATEGORY_OF.get(t) if t else None),
               row.get("solution"))


def select_cases(rows: Sequence[Mapping[str, Any]], variant: str) -> list[Mapping[str, Any]]:
    """The cases of ``variant`` (a registered Restore variant's name) among ``rows``."""
    return get_variant(variant).select(rows)


def check_leakage(pair_ids: Sequence[str], eval_ids: Sequence[str]) -> None:
    """Raise :class:`LeakageError` naming the items that are both training pairs and evaluation
    items (ids: arith problem ids, GSM8K question hashes, MATH ``unique_id``s)."""
    overlap = sorted(set(map(str, pair_ids)) & set(map(str, eval_ids)))
    if overlap:
        shown = ", ".join(overlap[:5]) + (f", ... ({len(overlap)} in all)" if len(overlap) > 5 else "")
        raise LeakageError(f"preference pairs overlap the evaluation items: {shown}")


def _check_split(ids: Sequence[str]) -> None:
    test = sorted(i for i in ids if re.match(r"^arith-test-", i) or i.startswith("test/"))
    if test:
        raise LeakageError(f"pairs must come from a training split, not test items ({', '.join(test[:3])}"
                           f"{', ...' if len(test) > 3 else ''}); pass allow_test_split=True to override")


def build_pairs(cases: Sequence[Mapping[str, Any]], teacher: Teacher, variant: str = "all-step", *,
                tokenizer=None, kind: str = "number", pool: Sequence[Mapping[str, Any]] | None = None,
                size: int | None = None, seed: int = 0, eval_ids: Sequence[str] | None = None,
                allow_test_split: bool = False, rejected_scope: str = "rest") -> list[PreferencePair]:
    """Preference pairs of ``variant`` from judged rows (Locate output or :func:`mine_traces`).

    The variant (:func:`pytest_qmr.restore.variants.get_variant`) picks the rows tried: ``rand-ns``
    draws ``size`` (default: the number of located cases) random rows of ``pool`` (default
    ``cases``; correct or not) and pairs the teacher's whole solution with the model's whole
    response. Teacher continuations whose final answer is not the gold are dropped.
    ``rejected_scope="step"`` keeps only the faulty step of the rejected continuation (Step-DPO
    style): what follows an error is often correct arithmetic on a wrong value, and DPO would
    push that down too. Raises :class:`RestoreError` when nothing is left, :class:`LeakageError`
    on leakage."""
    if rejected_scope not in REJECTED_SCOPES:
        raise RestoreError(f"rejected_scope must be one of {', '.join(REJECTED_SCOPES)}, got {rejected_scope!r}")
    chosen_variant = get_variant(variant)
    want, candidates = chosen_variant.candidates(cases, pool, size, seed)  # tried until ``want`` pairs are made
    if not want:
        where = chosen_variant.describe()
        raise RestoreError(f"nothing to restore: none of {len(cases)} cases has a final, located first faulty "
                           f"step{where} (variant {variant})")
    pairs: list[PreferencePair] = []
    tried = 0
    while len(pairs) < want and tried < len(candidates):
        batch = candidates[tried:tried + want - len(pairs)]
        tried += len(batch)
        pairs += _pairs_of(batch, teacher, variant, tokenizer, kind, eval_ids, allow_test_split, rejected_scope,
                           chosen_variant.resume)
    if not pairs:
        raise RestoreError(f"teacher {teacher.name} gave no continuation whose final answer verifies for any of "
                           f"{tried} cases (variant {variant}); no pairs")
    return pairs


def _pairs_of(rows: Sequence[Mapping[str, Any]], teacher: Teacher, variant: str, tokenizer, kind: str,
              eval_ids: Sequence[str] | None, allow_test_split: bool, rejected_scope: str = "rest",
              resume: bool = True) -> list[PreferencePair]:
    ids = [str(r["id"]) for r in rows]
    if not allow_test_split:
        _check_split(ids)
    if eval_ids is not None:
        check_leakage(ids, eval_ids)
    cuts = [c for r in rows if (c := cut_case(r, tokenizer, kind, resume=resume))]
    step_only = rejected_scope == "step" and resume  # no-resume rows have no cut
    pairs = []
    for cut, chosen in zip(cuts, teacher.continue_many(cuts), strict=True):
        if chosen is None or not chosen.strip() or chosen == cut.rejected:
            continue
        if not answers.is_equivalent(answers.extract_answer(cut.prefix + chosen, cut.kind), cut.gold_answer, cut.kind):
            continue
        rejected = first_step_of(cut.rejected) if step_only else cut.rejected
        pairs.append(PreferencePair(cut.prompt + cut.prefix, chosen, rejected, cut.item_id, cut.error_type,
                                    cut.category, cut.first_step, teacher.name, variant))
    return pairs


def first_step_of(continuation: str) -> str:
    """``continuation`` up to the end of its first step (all of it when it has no step, e.g. a
    bare answer line written where a step was missing)."""
    steps = segment(continuation)
    return continuation[:steps[0].end_char] if steps else continuation


