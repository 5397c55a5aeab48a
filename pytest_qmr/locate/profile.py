"""The error profile of a set of Locate rows (:func:`error_profile`), the thresholds a suite gates
it with (:func:`check_profile`) and its one-line summary (:func:`profile_summary`).

:class:`ErrorProfile` is what ``result.json``'s ``error_profile`` (:class:`~pytest_qmr.records.CellResult`)
and ``report.json``'s cells hold; :meth:`ErrorProfile.to_dict` is that JSON object, key for key::

    {"n": rows judged,
     "status": {"accepted", "human", "escalated", "unjudged": count},
     "n_final": accepted + human rows, "n_located": final rows naming a first faulty step and type,
     "categories": {category: {"count", "share"}},   # shares over the located errors
     "types": {type: {"count", "share"}},
     "no_error": {"count", "share", "ids"},           # final rows with no faulty step; share over n_final
     "untyped": {"count", "share", "ids"},            # final rows with a faulty step but no type (a collapsed
                                                      # format); share over n_final; absent in older profiles
     "first_error_step": {"histogram": {"k": count}, "median", "mean"},
     "relative_first_error_step": {"bins": {"0.0-0.1": count, ...}, "median"},
     "judges": {"agreement_rate", "n_compared", "pairwise": {"a|b": rate}, "unjudged": {judge: count}},
     "judges_used": [judge, ...], "policy": name}     # only when set (a cell's profile: the suite's judges)

Statistics with no data are null. :meth:`ErrorProfile.from_dict` reads that object back (a
``result.json`` of an earlier run included); a key it does not know is kept and written back.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from .. import taxonomy
from .judges import NO_ERROR
from .records import LocatedRow, as_rows


class Share(TypedDict):
    count: int
    share: float


class NoErrorShare(TypedDict):
    count: int
    share: float
    ids: list[str]


class StepStats(TypedDict):
    histogram: dict[str, int]
    median: float | None
    mean: float | None


class RelativeStepStats(TypedDict):
    bins: dict[str, int]
    median: float | None


class JudgeAgreement(TypedDict):
    agreement_rate: float | None
    n_compared: int
    pairwise: dict[str, float]
    unjudged: dict[str, int]


_REQUIRED = ("n", "status", "n_final", "n_located", "categories", "types", "no_error", "first_error_step",
             "relative_first_error_step", "judges")


@dataclass
class ErrorProfile:
    """The error profile (see the module doc for each field)."""

    n: int
    status: dict[str, int]
    n_final: int
    n_located: int
    categories: dict[str, Share]
    types: dict[str, Share]
    no_error: NoErrorShare
    first_error_step: StepStats
    relative_first_error_step: RelativeStepStats
    judges: JudgeAgreement
    untyped: NoErrorShare | None = None  # None: a profile of a writer that did not count them
    judges_used: list[str] | None = None  # a cell's profile: the suite's locate.judges
    policy: str | None = None  # a cell's profile: the policy that decided
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer writer, kept as read

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name in _REQUIRED:
            out[name] = copy.deepcopy(getattr(self, name))
            if name == "no_error" and self.untyped is not None:  # beside no_error, where a reader looks
                out["untyped"] = copy.deepcopy(self.untyped)
        if self.judges_used is not None:
            out["judges_used"] = list(self.judges_used)
        if self.policy is not None:
            out["policy"] = self.policy
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ErrorProfile":
        """The profile of a ``result.json`` / ``--profile`` file; a key missing (a partial profile of an
        older writer) reads as that of an empty profile."""
        if isinstance(data, ErrorProfile):
            return data
        empty = error_profile([]) if any(k not in data for k in _REQUIRED) else None
        known = {k: copy.deepcopy(data[k]) if k in data else getattr(empty, k) for k in _REQUIRED}
        return cls(**known, untyped=copy.deepcopy(data.get("untyped")), judges_used=data.get("judges_used"),
                   policy=data.get("policy"), extra={k: copy.deepcopy(v) for k, v in data.items()
                                                     if k not in (*_REQUIRED, "untyped", "judges_used", "policy")})


BIN_LABELS = tuple(f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10))


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def error_profile(rows: Iterable[LocatedRow | Mapping[str, Any]]) -> ErrorProfile:
    """Counts and shares per category and type, first-error-step histograms, no-error cases and
    judge agreement over judged rows. Only ``accepted`` and ``human`` rows count as located;
    shares of categories/types are over the located errors, the no-error share over all final rows.

    ``relative_first_error_step`` bins ``(k - 1) / n_steps``: the share of the solution written
    before its first faulty step k ("0.0-0.1" = the error comes in its first tenth).
    """
    rows = as_rows(rows)
    status = Counter(str(r.status) for r in rows)
    final = [r for r in rows if r.final]
    located = [r for r in final if r.is_located]
    untyped = [r for r in final if r.is_untyped]
    no_error = [r for r in final if not r.is_located and not r.is_untyped]
    n = len(located)
    type_counts = Counter(r.primary_error_type for r in located)
    cat_counts = Counter(taxonomy.CATEGORY_OF[r.primary_error_type] for r in located)  # type: ignore[index]
    steps: list[int] = [r.first_error_step for r in located]  # type: ignore[misc]
    rel_bins = [0] * 10
    rel_values = []
    for r, k in zip(located, steps, strict=True):
        n_steps = r.n_steps or 0
        if n_steps >= k:
            rel = (k - 1) / n_steps
            rel_values.append(rel)
            rel_bins[min(9, int(rel * 10 + 1e-9))] += 1
    step_hist = Counter(steps)

    # judge agreement: rows where at least two judges gave a verdict (rule: only when it found an error)
    compared = agreeing = 0
    pairs: dict[str, list[int]] = {}
    unjudged_by: Counter = Counter()
    for r in rows:
        votes = r.votes
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

    return ErrorProfile(
        n=len(rows),
        status={s: status.get(s, 0) for s in ("accepted", "human", "escalated", "unjudged")},
        n_final=len(final),
        n_located=n,
        categories={c: {"count": cat_counts.get(c, 0), "share": _share(cat_counts.get(c, 0), n)}
                    for c in taxonomy.CATEGORIES},
        types={t: {"count": type_counts.get(t, 0), "share": _share(type_counts.get(t, 0), n)}
               for t in taxonomy.TYPES},
        no_error={"count": len(no_error), "share": _share(len(no_error), len(final)),
                  "ids": [r.item_id for r in no_error]},
        untyped={"count": len(untyped), "share": _share(len(untyped), len(final)),
                 "ids": [r.item_id for r in untyped]},
        first_error_step={
            "histogram": {str(k): step_hist[k] for k in sorted(step_hist)},
            "median": statistics.median(steps) if steps else None,
            "mean": round(statistics.fmean(steps), 4) if steps else None,
        },
        relative_first_error_step={
            "bins": dict(zip(BIN_LABELS, rel_bins, strict=True)),
            "median": round(statistics.median(rel_values), 4) if rel_values else None,
        },
        judges={
            "agreement_rate": round(agreeing / compared, 4) if compared else None,
            "n_compared": compared,
            "pairwise": {k: round(a / t, 4) for k, (a, t) in sorted(pairs.items())},
            "unjudged": dict(sorted(unjudged_by.items())),
        },
    )


UNTYPED = "untyped"
_SHARE_NAMES = (*taxonomy.CATEGORIES, *taxonomy.TYPES, NO_ERROR, UNTYPED)
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


def _profile_value(profile: ErrorProfile, key: str) -> tuple[float | None, str]:
    n_loc = profile.n_located
    if key.startswith(("max_share.", "min_share.")):
        name = key.split(".", 1)[1]
        if name in (NO_ERROR, UNTYPED):
            d = profile.no_error if name == NO_ERROR else profile.untyped
            if d is None:  # an older profile that did not count untyped errors
                return None, ""
            return d["share"], f"{d['count']} of {profile.n_final} final cases"
        share = profile.categories.get(name) or profile.types[name]
        return share["share"], f"{share['count']} of {n_loc} located errors"
    n = max(profile.n, 1)
    steps, rel, judges, status = (profile.first_error_step, profile.relative_first_error_step, profile.judges,
                                  profile.status)
    values = {
        "min_median_first_error_step": steps["median"],
        "max_median_first_error_step": steps["median"],
        "min_mean_first_error_step": steps["mean"],
        "max_mean_first_error_step": steps["mean"],
        "min_median_relative_first_error_step": rel["median"],
        "max_median_relative_first_error_step": rel["median"],
        "min_judge_agreement": judges["agreement_rate"],
        "max_escalated_share": round(status["escalated"] / n, 4),
        "max_unjudged_share": round(status["unjudged"] / n, 4),
        "min_located": n_loc,
    }
    context = {"min_judge_agreement": f"{judges['n_compared']} cases compared",
               "max_escalated_share": f"{status['escalated']} of {profile.n} cases",
               "max_unjudged_share": f"{status['unjudged']} of {profile.n} cases"}
    return values[key], context.get(key, f"{n_loc} located errors")


def check_profile(profile: ErrorProfile | Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """Readable messages for every threshold the profile violates ([] when all hold).

    Keys: ``max_share.NAME`` / ``min_share.NAME`` (NAME a category, a type, ``no_error`` or
    ``untyped``),
    ``min|max_median_first_error_step``, ``min|max_mean_first_error_step``,
    ``min|max_median_relative_first_error_step``, ``min_judge_agreement``,
    ``max_escalated_share``, ``max_unjudged_share``, ``min_located``. An unknown key raises
    ValueError naming it. A statistic with no data (no located errors, no compared cases) is
    not checked; use ``min_located`` to require evidence. A mapping is read as
    :meth:`ErrorProfile.from_dict`.
    """
    validate_thresholds(thresholds)
    profile = ErrorProfile.from_dict(profile)
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


def profile_summary(profile: ErrorProfile | Mapping[str, Any]) -> str:
    """One line for terminals and failure messages (a mapping is read as :meth:`ErrorProfile.from_dict`)."""
    p = ErrorProfile.from_dict(profile)
    st = p.status
    cats = ", ".join(f"{c} {d['count']}" for c, d in p.categories.items())
    med = p.first_error_step["median"]
    agree = p.judges["agreement_rate"]
    return (f"{p.n} judged: {st['accepted']} accepted, {st['escalated']} escalated, {st['unjudged']} unjudged"
            + (f", {st['human']} human" if st["human"] else "")
            + f"; located {p.n_located} ({cats}); no error {p.no_error['count']}"
            + (f"; untyped {p.untyped['count']}" if p.untyped and p.untyped["count"] else "")
            + (f"; median first error step {med:g}" if med is not None else "")
            + (f"; judge agreement {agree:.0%} of {p.judges['n_compared']}" if agree is not None else ""))
