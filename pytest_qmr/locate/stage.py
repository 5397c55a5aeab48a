"""The Locate stage: for each item the FP model solved and the quantized model failed, the first
faulty step of the quantized solution and its error type, decided by an ensemble of judges.

Rows are :class:`~pytest_qmr.locate.records.LocatedRow` records (``located.jsonl`` holds their
:meth:`~pytest_qmr.locate.records.LocatedRow.to_dict`). Input rows: ``id``, ``problem``,
``response`` (the quantized solution), ``gold_answer`` and, optionally, ``reference_response``
(the FP solution), as records or as mappings (a user's traces; :func:`validate_rows` checks
them). :func:`regression_set` builds them from two lists of
:class:`~pytest_qmr.records.SampleRecord`. Output rows are the input rows with the verdict set
(:meth:`~pytest_qmr.locate.records.LocatedRow.with_verdict`):

- ``first_error_step`` (1-indexed; -1 when none), ``primary_error_type``, ``category``,
  ``explanation``, ``confidence_score``: the verdict (for ``escalated`` rows the policy's best
  proposal, which is NOT final: only ``accepted`` and ``human`` rows are,
  :attr:`~pytest_qmr.locate.records.LocatedRow.final`);
- ``status``: ``accepted`` / ``escalated`` / ``unjudged`` (``human`` after a review import),
  ``reason`` (why), ``agreement`` (share of voters that agree with the verdict), ``verdict_by``;
- ``votes``: every judge's :class:`~pytest_qmr.locate.judges.Vote`, by judge name;
- ``n_steps``, ``policy``.

The error profile of the rows and its thresholds are in :mod:`.profile`.

Policies (:class:`Policy`), over the LLM judges' votes plus, with ``rule_vote`` on (the
default), a rule-judge ``computational_error`` at step k as one more vote (the rule judge never
votes "no error": finding no false equality is no evidence about the other six types). Two votes
agree when they name the same error type and (``match_step``, the default) the same step.

- ``paper`` (default with any LLM judge): the paper's protocol. A primary judge (``primary``,
  default the first LLM judge named) and the other voters as auxiliaries; accepted when at most
  ``max_dissent`` (1) auxiliaries disagree with the primary and at least one agrees (or there is
  no auxiliary at all); otherwise escalated to a human. An unjudged auxiliary counts as
  disagreeing; an unjudged primary escalates.
- ``majority``: accepted when one answer has more than half of all voters (unjudged included).
- ``unanimous``: accepted when every voter gives the same answer.
- ``rule-only`` (default with only the rule judge): the rule judge's error is accepted; when it
  finds none the case is escalated. LLM votes, if any, are recorded but not weighed.

A row is ``unjudged`` when no judge gave a verdict at all.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from concurrent.futures import as_completed
from dataclasses import dataclass, fields
from typing import Any

from .. import taxonomy
from ..errors import QmrError
from ..records import SampleRecord
from .judges import RULE, Case, Judge, Vote
from .records import INPUT_FIELDS, LocatedRow, as_rows

POLICIES = ("paper", "majority", "unanimous", "rule-only")
ROW_FIELDS = ("id", "problem", "response", "gold_answer")


class LocateError(QmrError, ValueError):
    """Bad input or configuration for the Locate stage (one line for the user)."""


# --------------------------------------------------------------------------------- policy


@dataclass
class Policy:
    name: str = "paper"
    primary: str | None = None  # default: the first LLM judge
    match_step: bool = True  # agreement needs the same step, not only the same type
    rule_vote: bool = True  # a rule-judge computational_error at step k is a vote
    max_dissent: int = 1  # paper: auxiliaries allowed to disagree with the primary

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise LocateError(f"unknown policy {self.name!r} (known: {', '.join(POLICIES)})")
        if self.max_dissent < 0:
            raise LocateError("policy max_dissent must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise LocateError(f"policy: unknown setting {sorted(unknown)[0]!r} (known: {', '.join(sorted(names))})")
        return cls(**dict(data))


@dataclass
class Decision:
    status: str  # accepted | escalated | unjudged
    first_error_step: int = -1
    primary_error_type: str | None = None
    explanation: str = ""
    confidence_score: float | None = None
    agreement: float | None = None
    reason: str = ""
    verdict_by: str | None = None


def _voters(votes: Mapping[str, Vote], policy: Policy) -> list[Vote]:
    """LLM votes (any status) and, with rule_vote, the rule judge's vote when it found an error."""
    out = [v for name, v in votes.items() if name != RULE]
    rule = votes.get(RULE)
    if policy.rule_vote and rule is not None and rule.status == "error":
        out.append(rule)
    return out


def _from_vote(status: str, vote: Vote, agreement: float | None, reason: str) -> Decision:
    return Decision(status, vote.error_step if vote.status == "error" else -1,
                    vote.primary_error_type if vote.status == "error" else None,
                    vote.explanation, vote.confidence_score, agreement, reason, vote.judge)


def _no_verdict(votes: Mapping[str, Vote]) -> Decision:
    why = "; ".join(f"{v.judge}: {v.reason or v.status}" for v in votes.values())
    return Decision("unjudged", reason=f"no judge gave a verdict ({why})" if why else "no judges")


def decide(votes: Mapping[str, Vote], policy: Policy) -> Decision:
    """The ensemble's decision on one case from its votes (judge name -> Vote)."""
    ms = policy.match_step
    if policy.name == "rule-only":
        rule = votes.get(RULE)
        if rule is None:
            raise LocateError("policy rule-only needs the rule judge")
        if rule.status == "error":
            return _from_vote("accepted", rule, 1.0, "rule judge found a false equality")
        if rule.status == "abstain":
            return Decision("escalated", reason=f"rule judge found no false equality ({rule.reason}): "
                                                "the error is not arithmetic, or not checkable")
        return _no_verdict(votes)

    llm = [name for name in votes if name != RULE]
    if not llm:
        raise LocateError(f"policy {policy.name} needs at least one LLM judge (use rule-only for the rule judge alone)")
    voters = _voters(votes, policy)
    valid = [v for v in voters if v.has_verdict]
    if not valid:
        return _no_verdict(votes)

    if policy.name == "paper":
        primary_name = policy.primary or llm[0]
        if primary_name not in votes:
            raise LocateError(f"primary judge {primary_name!r} is not among the judges ({', '.join(votes)})")
        primary = votes[primary_name]
        aux = [v for v in voters if v.judge != primary_name]
        if not primary.has_verdict:
            best = valid[0]
            return _from_vote("escalated", best, None, f"primary judge {primary_name} gave no verdict "
                                                       f"({primary.reason or primary.status})")
        agree = sum(v.has_verdict and v.key(ms) == primary.key(ms) for v in aux)
        dissent = len(aux) - agree
        share = (agree + 1) / (len(aux) + 1)
        if not aux:
            return _from_vote("accepted", primary, share, "primary judge alone (no auxiliary votes)")
        summary = f"{agree}/{len(aux)} auxiliaries agree with primary {primary_name}"
        if dissent <= policy.max_dissent and agree >= 1:
            return _from_vote("accepted", primary, share, summary)
        return _from_vote("escalated", primary, share, summary)

    counts = Counter(v.key(ms) for v in valid)
    (top_key, top), *rest = counts.most_common()
    tie = bool(rest) and rest[0][1] == top
    # the verdict's wording comes from the first judge (in the order given) that holds it
    holder = next(v for v in valid if v.key(ms) == top_key)
    share = top / len(voters)
    summary = f"{top}/{len(voters)} voters agree"
    if policy.name == "majority":
        ok = top * 2 > len(voters) and not tie
    else:  # unanimous
        ok = top == len(voters)
    return _from_vote("accepted" if ok else "escalated", holder, share,
                      summary + ("" if ok else f" ({policy.name} needed)"))


def default_policy(judges: Sequence[Judge]) -> Policy:
    return Policy("paper" if any(j.name != RULE for j in judges) else "rule-only")


@contextmanager
def ensemble(names: Sequence[str], policy: Mapping[str, Any] | None = None,
             judge_config: str | os.PathLike | None = None) -> Iterator[tuple[list[Judge], Policy]]:
    """(judges, policy) as a suite's ``locate:`` names them — built-in judges by name, LLM judges from
    ``judge_config`` — and closed afterwards: the one place a cell's Locate and Restore's mining
    get their ensemble, so both decide alike."""
    from .judges import build_judges, load_judge_settings

    settings = load_judge_settings(judge_config) if judge_config is not None else None
    judges = build_judges(names, settings)
    try:
        yield judges, Policy.from_dict(policy) if policy else default_policy(judges)
    finally:
        for judge in judges:
            judge.close()


# --------------------------------------------------------------------------------- the stage


def validate_rows(rows: Sequence[LocatedRow | Mapping[str, Any]]) -> None:
    """LocateError (one line, naming the row) for a row that is not an object, lacks a field or repeats an id."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if isinstance(row, LocatedRow):
            row = row.to_dict()
        if not isinstance(row, Mapping):
            raise LocateError(f"row {i + 1}: not an object")
        for name in ROW_FIELDS:
            if row.get(name) is None:
                raise LocateError(f"row {i + 1}: missing field {name!r}")
        key = str(row["id"])
        if key in seen:
            raise LocateError(f"row {i + 1}: duplicate id {key!r}")
        seen.add(key)


def _case(row: LocatedRow) -> Case:
    return Case(row.item_id, str(row.problem), str(row.response), str(row.gold_answer), row.reference_response)


def _same_case(old: LocatedRow, row: LocatedRow) -> bool:
    return all(getattr(old, k) == getattr(row, k) for k in ("problem", "response", "gold_answer", "reference_response"))


def output_row(row: LocatedRow | Mapping[str, Any], case: Case, votes: Mapping[str, Vote], decision: Decision,
               policy: Policy) -> LocatedRow:
    """``row`` with the ensemble's verdict on it."""
    t = decision.primary_error_type
    return LocatedRow.from_dict(row).with_verdict(
        n_steps=case.n_steps,
        first_error_step=decision.first_error_step,
        primary_error_type=t,
        category=taxonomy.CATEGORY_OF.get(t) if t else None,
        explanation=decision.explanation,
        confidence_score=decision.confidence_score,
        status=decision.status,
        reason=decision.reason,
        agreement=None if decision.agreement is None else round(decision.agreement, 4),
        verdict_by=decision.verdict_by,
        policy=policy.name,
        votes=dict(votes),
    )


def redecide(rows: Sequence[LocatedRow | Mapping[str, Any]], policy: Policy) -> list[LocatedRow]:
    """Apply another policy to judged rows (their votes are kept; no judge is asked again)."""
    out = []
    for row in as_rows(rows):
        base = row.without_verdict()
        out.append(output_row(base, _case(row), row.votes, decide(row.votes, policy), policy))
    return out


def locate(rows: Sequence[LocatedRow | Mapping[str, Any]], judges: Sequence[Judge], policy: Policy | None = None, *,
           previous: Mapping[str, LocatedRow | Mapping[str, Any]] | None = None,
           on_row: Callable[[LocatedRow], None] | None = None, progress: bool = False) -> list[LocatedRow]:
    """Judge every row with every judge and decide with ``policy``; rows come back in input order.

    Each LLM judge works through the rows on its own pool (``concurrency`` at a time). A failing
    judge only produces ``unjudged`` votes. ``previous`` (id -> an earlier output row, e.g. from
    an interrupted run) supplies votes that are reused when the case is unchanged and the vote
    was not ``unjudged``. ``on_row`` sees each output row as soon as all its votes are in.
    """
    if not judges:
        raise LocateError("no judges given")
    validate_rows(rows)
    policy = policy or default_policy(judges)
    names = [j.name for j in judges]
    if policy.name == "rule-only" and RULE not in names:
        raise LocateError("policy rule-only needs the rule judge in --judges")
    if policy.name != "rule-only" and all(n == RULE for n in names):
        raise LocateError(f"policy {policy.name} needs at least one LLM judge (use rule-only for the rule judge alone)")
    if policy.primary is not None and policy.primary not in names:
        raise LocateError(f"primary judge {policy.primary!r} is not among the judges ({', '.join(names)})")
    rows = as_rows(rows)
    earlier = {key: LocatedRow.from_dict(row) for key, row in (previous or {}).items()}
    cases = [_case(r) for r in rows]
    votes: list[dict[str, Vote]] = [{} for _ in rows]
    futures = {}
    # LLM judges first, so their requests are in flight while the rule judge runs inline.
    for judge in sorted(judges, key=lambda j: j.name == RULE):
        for i, case in enumerate(cases):
            old = earlier.get(case.id)
            old_vote = old.votes.get(judge.name) if old is not None and _same_case(old, rows[i]) else None
            if old_vote is not None and old_vote.status != "unjudged":
                votes[i][judge.name] = old_vote
                continue
            futures[judge.submit(case)] = (i, judge.name)
    out: list[LocatedRow | None] = [None] * len(rows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="judging", unit="row", file=sys.stderr, dynamic_ncols=True)

    def finish(i: int) -> None:
        ordered = {name: votes[i][name] for name in names}
        decision = decide(ordered, policy)
        row = out[i] = output_row(rows[i], cases[i], ordered, decision, policy)
        if on_row:
            on_row(row)
        if bar is not None:
            bar.update(1)

    for i in range(len(rows)):
        if len(votes[i]) == len(names):
            finish(i)
    try:
        for future in as_completed(futures):
            i, name = futures[future]
            votes[i][name] = future.result()  # judges never raise
            if len(votes[i]) == len(names):
                finish(i)
    finally:
        if bar is not None:
            bar.close()
    return [r for r in out if r is not None]


def locate_cell(fp_items: Mapping[str, Mapping[str, Any]], quant_samples: Sequence[SampleRecord],
                judges: Sequence[Judge], policy: Policy | None = None) -> list[LocatedRow]:
    """Judged regression rows of one cell: FP side from the baseline's items (``correct``, ``response``)."""
    fp = [SampleRecord(item_id, int(v.get("doc_index", 0)), "", str(v.get("response", "")), v.get("extracted"), "",
                       bool(v.get("correct"))) for item_id, v in fp_items.items()]
    rows = regression_set(fp, quant_samples)
    return locate(rows, judges, policy) if rows else []


def regression_set(fp_samples: Iterable[SampleRecord], quant_samples: Iterable[SampleRecord],
                   problems: Mapping[str, str] | None = None) -> list[LocatedRow]:
    """Locate input rows for the items the FP model solved and the quantized model failed.

    Items are paired by ``item_id``; the FP response becomes ``reference_response``. The problem
    text is ``problems[item_id]`` when given, else the quantized sample's prompt.
    """
    fp = {}
    for s in fp_samples:
        s = SampleRecord.from_dict(s) if isinstance(s, dict) else s
        fp[s.item_id] = s
    rows = []
    for q in quant_samples:
        q = SampleRecord.from_dict(q) if isinstance(q, dict) else q
        base = fp.get(q.item_id)
        if base is None or not base.correct or q.correct:
            continue
        rows.append(LocatedRow(q.item_id, q.doc_index, (problems or {}).get(q.item_id, q.prompt), q.response, q.gold,
                               base.response, q.extracted, keys=INPUT_FIELDS))
    return rows


