"""The Locate stage: for each item the FP model solved and the quantized model failed, the first
faulty step of the quantized solution and its error type, decided by an ensemble of judges.

Input rows: ``id``, ``problem``, ``response`` (the quantized solution), ``gold_answer`` and,
optionally, ``reference_response`` (the FP solution). :func:`regression_set` builds them from
two lists of :class:`~pytest_qmr.records.SampleRecord`. Output rows are the input rows plus

- ``first_error_step`` (1-indexed; -1 when none), ``primary_error_type``, ``category``,
  ``explanation``, ``confidence_score``: the verdict (for ``escalated`` rows the policy's best
  proposal, which is NOT final: only ``accepted`` and ``human`` rows are);
- ``status``: ``accepted`` / ``escalated`` / ``unjudged`` (``human`` after a review import),
  ``reason`` (why), ``agreement`` (share of voters that agree with the verdict), ``verdict_by``;
- ``votes``: every judge's :class:`~pytest_qmr.locate.judges.Vote` as a dict, by judge name;
- ``n_steps``, ``policy``.

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

import math
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, fields
from typing import Any

from .. import taxonomy
from ..errors import QmrError
from ..records import SampleRecord
from .judges import NO_ERROR, RULE, Case, Judge, Vote

POLICIES = ("paper", "majority", "unanimous", "rule-only")
FINAL_STATUSES = ("accepted", "human")
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


# --------------------------------------------------------------------------------- the stage


def validate_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """LocateError (one line, naming the row) for a row that is not an object, lacks a field or repeats an id."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise LocateError(f"row {i + 1}: not an object")
        for name in ROW_FIELDS:
            if row.get(name) is None:
                raise LocateError(f"row {i + 1}: missing field {name!r}")
        key = str(row["id"])
        if key in seen:
            raise LocateError(f"row {i + 1}: duplicate id {key!r}")
        seen.add(key)


def _same_case(old: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    return all(old.get(k) == row.get(k) for k in ("problem", "response", "gold_answer", "reference_response"))


def output_row(row: Mapping[str, Any], case: Case, votes: Mapping[str, Vote], decision: Decision,
               policy: Policy) -> dict[str, Any]:
    t = decision.primary_error_type
    return {
        **row,
        "n_steps": case.n_steps,
        "first_error_step": decision.first_error_step,
        "primary_error_type": t,
        "category": taxonomy.CATEGORY_OF.get(t) if t else None,
        "explanation": decision.explanation,
        "confidence_score": decision.confidence_score,
        "status": decision.status,
        "reason": decision.reason,
        "agreement": None if decision.agreement is None else round(decision.agreement, 4),
        "verdict_by": decision.verdict_by,
        "policy": policy.name,
        "votes": {name: v.to_dict() for name, v in votes.items()},
    }


def redecide(rows: Sequence[Mapping[str, Any]], policy: Policy) -> list[dict[str, Any]]:
    """Apply another policy to judged rows (their votes are kept; no judge is asked again)."""
    out = []
    for row in rows:
        votes = {name: Vote.from_dict(v) for name, v in (row.get("votes") or {}).items()}
        base = {k: v for k, v in row.items() if k not in _OUTPUT_KEYS}
        out.append(output_row(base, Case.from_row(row), votes, decide(votes, policy), policy))
    return out


_OUTPUT_KEYS = {"n_steps", "first_error_step", "primary_error_type", "category", "explanation",
                "confidence_score", "status", "reason", "agreement", "verdict_by", "policy", "votes",
                "pre_review_status", "human_review"}


def locate(rows: Sequence[Mapping[str, Any]], judges: Sequence[Judge], policy: Policy | None = None, *,
           previous: Mapping[str, Mapping[str, Any]] | None = None,
           on_row: Callable[[dict[str, Any]], None] | None = None, progress: bool = False) -> list[dict[str, Any]]:
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
    cases = [Case.from_row(r) for r in rows]
    votes: list[dict[str, Vote]] = [{} for _ in rows]
    futures = {}
    # LLM judges first, so their requests are in flight while the rule judge runs inline.
    for judge in sorted(judges, key=lambda j: j.name == RULE):
        for i, case in enumerate(cases):
            old = (previous or {}).get(case.id)
            old_vote = (old or {}).get("votes", {}).get(judge.name)
            if old is not None and old_vote and old_vote.get("status") != "unjudged" and _same_case(old, rows[i]):
                votes[i][judge.name] = Vote.from_dict(old_vote)
                continue
            futures[judge.submit(case)] = (i, judge.name)
    out: list[dict[str, Any] | None] = [None] * len(rows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="judging", unit="row", file=sys.stderr, dynamic_ncols=True)

    def finish(i: int) -> None:
        ordered = {name: votes[i][name] for name in names}
        decision = decide(ordered, policy)
        out[i] = output_row(rows[i], cases[i], ordered, decision, policy)
        if on_row:
            on_row(out[i])
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
                judges: Sequence[Judge], policy: Policy | None = None) -> list[dict[str, Any]]:
    """Judged regression rows of one cell: FP side from the baseline's items (``correct``, ``response``)."""
    fp = [SampleRecord(item_id, int(v.get("doc_index", 0)), "", str(v.get("response", "")), v.get("extracted"), "",
                       bool(v.get("correct"))) for item_id, v in fp_items.items()]
    rows = regression_set(fp, quant_samples)
    return locate(rows, judges, policy) if rows else []


def regression_set(fp_samples: Iterable[SampleRecord], quant_samples: Iterable[SampleRecord],
                   problems: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
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
        rows.append({"id": q.item_id, "doc_index": q.doc_index,
                     "problem": (problems or {}).get(q.item_id, q.prompt), "response": q.response,
                     "gold_answer": q.gold, "reference_response": base.response, "extracted": q.extracted})
    return rows


# --------------------------------------------------------------------------------- error profile

BIN_LABELS = tuple(f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10))


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def error_profile(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and shares per category and type, first-error-step histograms, no-error cases and
    judge agreement over judged rows. Only ``accepted`` and ``human`` rows count as located;
    shares of categories/types are over the located errors, the no-error share over all final rows.

    ``relative_first_error_step`` bins ``(k - 1) / n_steps``: the share of the solution written
    before its first faulty step k ("0.0-0.1" = the error comes in its first tenth).
    """
    status = Counter(str(r.get("status")) for r in rows)
    final = [r for r in rows if r.get("status") in FINAL_STATUSES]
    located = [r for r in final if r.get("primary_error_type") in taxonomy.CATEGORY_OF
               and isinstance(r.get("first_error_step"), int) and r["first_error_step"] >= 1]
    no_error = [r for r in final if r not in located]
    n = len(located)
    type_counts = Counter(r["primary_error_type"] for r in located)
    cat_counts = Counter(taxonomy.CATEGORY_OF[r["primary_error_type"]] for r in located)
    steps = [r["first_error_step"] for r in located]
    rel_bins = [0] * 10
    rel_values = []
    for r in located:
        n_steps = r.get("n_steps") or 0
        if n_steps >= r["first_error_step"]:
            rel = (r["first_error_step"] - 1) / n_steps
            rel_values.append(rel)
            rel_bins[min(9, int(rel * 10 + 1e-9))] += 1
    step_hist = Counter(steps)

    # judge agreement: rows where at least two judges gave a verdict (rule: only when it found an error)
    compared = agreeing = 0
    pairs: dict[str, list[int]] = {}
    unjudged_by: Counter = Counter()
    for r in rows:
        votes = {name: Vote.from_dict(v) for name, v in (r.get("votes") or {}).items()}
        unjudged_by.update(name for name, v in votes.items() if v.status == "unjudged")
        verdicts = {name: v.key(True) for name, v in votes.items() if v.has_verdict}
        if len(verdicts) >= 2:
            compared += 1
            agreeing += len(set(verdicts.values())) == 1
        names = sorted(verdicts)
        for a_i, a in enumerate(names):
            for b in names[a_i + 1:]:
                tally = pairs.setdefault(f"{a}|{b}", [0, 0])
                tally[0] += verdicts[a] == verdicts[b]
                tally[1] += 1

    return {
        "n": len(rows),
        "status": {s: status.get(s, 0) for s in ("accepted", "human", "escalated", "unjudged")},
        "n_final": len(final),
        "n_located": n,
        "categories": {c: {"count": cat_counts.get(c, 0), "share": _share(cat_counts.get(c, 0), n)}
                       for c in taxonomy.CATEGORIES},
        "types": {t: {"count": type_counts.get(t, 0), "share": _share(type_counts.get(t, 0), n)}
                  for t in taxonomy.TYPES},
        "no_error": {"count": len(no_error), "share": _share(len(no_error), len(final)),
                     "ids": [str(r.get("id")) for r in no_error]},
        "first_error_step": {
            "histogram": {str(k): step_hist[k] for k in sorted(step_hist)},
            "median": statistics.median(steps) if steps else None,
            "mean": round(statistics.fmean(steps), 4) if steps else None,
        },
        "relative_first_error_step": {
            "bins": dict(zip(BIN_LABELS, rel_bins, strict=True)),
            "median": round(statistics.median(rel_values), 4) if rel_values else None,
        },
        "judges": {
            "agreement_rate": round(agreeing / compared, 4) if compared else None,
            "n_compared": compared,
            "pairwise": {k: round(a / t, 4) for k, (a, t) in sorted(pairs.items())},
            "unjudged": dict(sorted(unjudged_by.items())),
        },
    }


_SHARE_NAMES = (*taxonomy.CATEGORIES, *taxonomy.TYPES, NO_ERROR)
_SCALAR_KEYS = {
    "min_median_first_error_step": ("min", "median first error step"),
    "max_median_first_error_step": ("max", "median first error step"),
    "min_mean_first_error_step": ("min", "mean first error step"),
    "max_mean_first_error_step": ("max", "mean first error step"),
    "min_median_relative_first_error_step": ("min", "median relative first error step"),
    "max_median_relative_first_error_step": ("max", "median relative first error step"),
    "min_judge_agreement": ("min", "judge agreement rate"),
    "max_escalated_share": ("max", "share of escalated cases"),
    "max_unjudged_share": ("max", "share of unjudged cases"),
    "min_located": ("min", "number of located errors"),
}


def validate_thresholds(thresholds: Mapping[str, Any]) -> None:
    """ValueError (one line, naming the key) for an unknown key or a non-numeric limit."""
    for key, limit in thresholds.items():
        bound, _, name = str(key).partition(".")
        known = (bound in ("max_share", "min_share") and name in _SHARE_NAMES) or key in _SCALAR_KEYS
        if not known:
            hint = (f"share names: {', '.join(_SHARE_NAMES)}" if bound in ("max_share", "min_share")
                    else f"known: max_share.NAME, min_share.NAME, {', '.join(_SCALAR_KEYS)}")
            raise ValueError(f"error_profile threshold {key!r}: unknown key ({hint})")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or math.isnan(limit):
            raise ValueError(f"error_profile threshold {key!r}: limit must be a number, got {limit!r}")


def _profile_value(profile: Mapping[str, Any], key: str) -> tuple[float | None, str]:
    n_loc = profile.get("n_located", 0)
    if key.startswith(("max_share.", "min_share.")):
        name = key.split(".", 1)[1]
        if name == NO_ERROR:
            d = profile["no_error"]
            return d["share"], f"{d['count']} of {profile.get('n_final', 0)} final cases"
        d = profile["categories"].get(name) or profile["types"][name]
        return d["share"], f"{d['count']} of {n_loc} located errors"
    n = max(profile.get("n", 0), 1)
    values = {
        "min_median_first_error_step": profile["first_error_step"]["median"],
        "max_median_first_error_step": profile["first_error_step"]["median"],
        "min_mean_first_error_step": profile["first_error_step"]["mean"],
        "max_mean_first_error_step": profile["first_error_step"]["mean"],
        "min_median_relative_first_error_step": profile["relative_first_error_step"]["median"],
        "max_median_relative_first_error_step": profile["relative_first_error_step"]["median"],
        "min_judge_agreement": profile["judges"]["agreement_rate"],
        "max_escalated_share": round(profile["status"]["escalated"] / n, 4),
        "max_unjudged_share": round(profile["status"]["unjudged"] / n, 4),
        "min_located": n_loc,
    }
    context = {"min_judge_agreement": f"{profile['judges']['n_compared']} cases compared",
               "max_escalated_share": f"{profile['status']['escalated']} of {profile.get('n', 0)} cases",
               "max_unjudged_share": f"{profile['status']['unjudged']} of {profile.get('n', 0)} cases"}
    return values[key], context.get(key, f"{n_loc} located errors")


def check_profile(profile: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """Readable messages for every threshold the profile violates ([] when all hold).

    Keys: ``max_share.NAME`` / ``min_share.NAME`` (NAME a category, a type or ``no_error``),
    ``min|max_median_first_error_step``, ``min|max_mean_first_error_step``,
    ``min|max_median_relative_first_error_step``, ``min_judge_agreement``,
    ``max_escalated_share``, ``max_unjudged_share``, ``min_located``. An unknown key raises
    ValueError naming it. A statistic with no data (no located errors, no compared cases) is
    not checked; use ``min_located`` to require evidence.
    """
    validate_thresholds(thresholds)
    messages = []
    for key, limit in thresholds.items():
        value, context = _profile_value(profile, key)
        if value is None:
            continue
        bound = "max" if key.startswith("max") else "min"
        what = (f"share of {key.split('.', 1)[1]}" if "_share." in key else _SCALAR_KEYS[key][1])
        if (bound == "max" and value > limit) or (bound == "min" and value < limit):
            op = ">" if bound == "max" else "<"
            messages.append(f"{what} is {value:g} {op} {bound} {limit:g} ({key}; {context})")
    return messages


def profile_summary(p: Mapping[str, Any]) -> str:
    """One line for terminals and failure messages."""
    st = p["status"]
    cats = ", ".join(f"{c} {d['count']}" for c, d in p["categories"].items())
    med = p["first_error_step"]["median"]
    agree = p["judges"]["agreement_rate"]
    return (f"{p['n']} judged: {st['accepted']} accepted, {st['escalated']} escalated, {st['unjudged']} unjudged"
            + (f", {st['human']} human" if st["human"] else "")
            + f"; located {p['n_located']} ({cats}); no error {p['no_error']['count']}"
            + (f"; median first error step {med:g}" if med is not None else "")
            + (f"; judge agreement {agree:.0%} of {p['judges']['n_compared']}" if agree is not None else ""))
