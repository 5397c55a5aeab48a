"""The Locate stage's row record: :class:`LocatedRow`, one line of ``located.jsonl`` /
``judged.jsonl``, and of the rows :func:`~pytest_qmr.locate.regression_set` hands to the judges.

A row has three groups of fields:

- input (:data:`INPUT_FIELDS`): ``id``, ``doc_index``, ``problem``, ``response`` (the quantized
  solution), ``gold_answer``, ``reference_response`` (the FP solution), ``extracted``;
- verdict (:data:`VERDICT_FIELDS`), set by :meth:`LocatedRow.with_verdict`: ``n_steps``,
  ``first_error_step`` (1-indexed; -1 when none), ``primary_error_type``, ``category``,
  ``explanation``, ``confidence_score``, ``status`` (``accepted`` / ``escalated`` / ``unjudged``,
  ``human`` after a review; only :data:`FINAL_STATUSES` are final), ``reason``, ``agreement``,
  ``verdict_by``, ``policy`` and ``votes`` (judge name -> :class:`~pytest_qmr.locate.judges.Vote`);
- review (:data:`REVIEW_FIELDS`), set by :meth:`LocatedRow.reviewed`: ``pre_review_status``,
  ``human_review`` (``{"reviewer", "file"}``).

Any other key of a row read from a file (``qmr judge --input`` takes a user's rows with fields
of their own) is kept in :attr:`LocatedRow.extra` and written back. Values are kept as read: an
``id`` or ``gold_answer`` given as a number is written back as a number.

On disk the row is the JSON object of :meth:`LocatedRow.to_dict`, the same object the stage
wrote before these records existed: the keys a row was read with come first, in their order
(:attr:`LocatedRow.keys`), then the keys a stage added, in the order it added them (the verdict
fields in :data:`VERDICT_FIELDS` order, a review's in the order :meth:`LocatedRow.reviewed`
gives). A field that is neither read nor set is not written (a trace with no
``reference_response`` gets none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from .. import taxonomy
from .judges import Vote

INPUT_FIELDS = ("id", "doc_index", "problem", "response", "gold_answer", "reference_response", "extracted")
VERDICT_FIELDS = ("n_steps", "first_error_step", "primary_error_type", "category", "explanation",
                  "confidence_score", "status", "reason", "agreement", "verdict_by", "policy", "votes")
REVIEW_FIELDS = ("pre_review_status", "human_review")
OUTPUT_FIELDS = (*VERDICT_FIELDS, *REVIEW_FIELDS)  # what redecide drops before deciding again
FINAL_STATUSES = ("accepted", "human")
# the fields a review sets, in the order today's files have them when the row lacked them
_REVIEWED = ("first_error_step", "primary_error_type", "category", "explanation", "confidence_score", "status",
             "verdict_by", "reason", "human_review")


def _default(f: Any) -> Any:
    """A dataclass field's default (MISSING for a required one)."""
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def _merge(keys: Iterable[str], more: Iterable[str]) -> tuple[str, ...]:
    """``keys`` then those of ``more`` not in it (a dict update's key order)."""
    out = dict.fromkeys(keys)
    out.update(dict.fromkeys(more))
    return tuple(out)


@dataclass
class LocatedRow:
    """One Locate row (see the module doc). ``status`` None: not judged yet (an input row)."""

    id: str | int
    doc_index: int | None = None
    problem: str | None = None
    response: str | None = None
    gold_answer: str | int | float | None = None
    reference_response: str | None = None
    extracted: str | None = None
    n_steps: int | None = None
    first_error_step: int | None = None
    primary_error_type: str | None = None
    category: str | None = None
    explanation: str | None = None
    confidence_score: float | None = None
    status: str | None = None
    reason: str | None = None
    agreement: float | None = None
    verdict_by: str | None = None
    policy: str | None = None
    votes: dict[str, Vote] = field(default_factory=dict)
    pre_review_status: str | None = None
    human_review: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # a user's own fields, written back as read
    # the row's keys in the order to_dict writes them first (those read, then those a stage set)
    keys: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def item_id(self) -> str:
        """``id`` as a string (what ids are compared as)."""
        return str(self.id)

    @property
    def final(self) -> bool:
        """The verdict is final: accepted by the policy or given by a human."""
        return self.status in FINAL_STATUSES

    @property
    def is_located(self) -> bool:
        """A final verdict naming a first faulty step and its error type (what the error profile
        counts as located; a final row that is neither located nor :attr:`is_untyped` is a
        "no error" case)."""
        return (self.final and self.primary_error_type in taxonomy.CATEGORY_OF
                and isinstance(self.first_error_step, int) and self.first_error_step >= 1)

    @property
    def is_untyped(self) -> bool:
        """A final verdict naming a first faulty step but no error type: the response stops
        following the step format there (the arith judge's ``format_collapse``)."""
        return (self.final and self.primary_error_type is None
                and isinstance(self.first_error_step, int) and self.first_error_step >= 1)

    def with_verdict(self, *, n_steps: int, first_error_step: int, primary_error_type: str | None,
                     category: str | None, explanation: str, confidence_score: float | None, status: str, reason: str,
                     agreement: float | None, verdict_by: str | None, policy: str,
                     votes: dict[str, Vote]) -> "LocatedRow":
        """This row with a verdict: every one of :data:`VERDICT_FIELDS` set (and written)."""
        return replace(self, n_steps=n_steps, first_error_step=first_error_step, primary_error_type=primary_error_type,
                       category=category, explanation=explanation, confidence_score=confidence_score, status=status,
                       reason=reason, agreement=agreement, verdict_by=verdict_by, policy=policy, votes=votes,
                       keys=_merge(self.keys, VERDICT_FIELDS))

    def without_verdict(self) -> "LocatedRow":
        """The input row again: verdict and review fields cleared (for deciding once more)."""
        cleared = {f.name: _default(f) for f in fields(self) if f.name in OUTPUT_FIELDS}
        return replace(self, **cleared, keys=tuple(k for k in self.keys if k not in OUTPUT_FIELDS))

    def reviewed(self, *, first_error_step: int, primary_error_type: str | None, category: str | None,
                 explanation: str | None, confidence_score: float | None, reason: str,
                 human_review: dict[str, Any]) -> "LocatedRow":
        """This row with a human's verdict: status ``human``, the votes kept, the status before the
        (first) review in ``pre_review_status``."""
        first = self.status != "human"
        return replace(
            self, first_error_step=first_error_step, primary_error_type=primary_error_type, category=category,
            explanation=explanation, confidence_score=confidence_score, status="human", verdict_by="human",
            reason=reason, human_review=human_review,
            pre_review_status=self.status if first else self.pre_review_status,
            keys=_merge(self.keys, (*(("pre_review_status",) if first else ()), *_REVIEWED)))

    def to_dict(self) -> dict[str, Any]:
        """The row's JSON object (see the module doc for which keys, in which order)."""
        out: dict[str, Any] = {}
        values = {f.name: f for f in fields(self) if f.name not in ("extra", "keys")}
        order = _merge(self.keys, (*INPUT_FIELDS, *self.extra, *OUTPUT_FIELDS))
        for key in order:
            if key in self.extra:
                out[key] = self.extra[key]
                continue
            f = values.get(key)
            if f is None:
                continue
            value = getattr(self, key)
            if key in self.keys or (value is not None and value != _default(f)):
                out[key] = {n: v.to_dict() for n, v in value.items()} if key == "votes" else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LocatedRow":
        """A row as read (a trace, a judged row, a review's output); unknown keys go to ``extra``."""
        if isinstance(data, LocatedRow):
            return data
        names = {f.name for f in fields(cls)} - {"extra", "keys"}
        known = {k: v for k, v in data.items() if k in names}
        if "votes" in known:
            known["votes"] = {name: v if isinstance(v, Vote) else Vote.from_dict(v)
                              for name, v in (known["votes"] or {}).items()}
        known.setdefault("id", None)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names}, keys=tuple(data))


def as_rows(rows: Iterable[LocatedRow | Mapping[str, Any]]) -> list[LocatedRow]:
    """Records from records or mappings (rows a user or an older writer handed us)."""
    return [LocatedRow.from_dict(r) for r in rows]
