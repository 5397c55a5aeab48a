"""The paired statistical gate: a quantized model against its FP baseline on the same items.

Both models answer the same items, so the comparison is paired: only the *discordant*
items carry information -- ``fp_only`` (FP right, quantized wrong; McNemar's b) and
``quant_only`` (quantized right, FP wrong; McNemar's c).  The exact McNemar test is a
two-sided binomial test of b against b + c trials with p = 1/2.

Every cell also gets the ``1 - alpha`` confidence interval of the paired difference
``delta = quant_acc - fp_acc`` (:func:`paired_delta_ci`: Newcombe's hybrid score interval for
paired proportions, his method 10 — Wilson intervals of the two marginal accuracies combined
with the paired correlation, as in Fagerland, Lydersen & Laake's *Statistical Analysis of
Contingency Tables*, chapter 8).

Verdict rule, ``thresholds.mode: difference`` (default; see :func:`evaluate_gate`)::

    drop     = fp_acc - quant_acc                (= (b - c) / n)
    rel_drop = drop / fp_acc                     (0 when fp_acc is 0)
    exceeds  = drop > max_abs_drop or rel_drop > max_rel_drop
    n < min_items          -> inconclusive  (too few items to judge)
    exceeds and p <  alpha -> fail          (a real loss larger than allowed)
    exceeds and p >= alpha -> inconclusive  (a loss larger than allowed, but not significant)
    otherwise              -> pass          (the drop is within the allowed margin)

``thresholds.mode: noninferiority`` judges the interval instead of the point estimate, with
the allowed drop ``margin = min(max_abs_drop, max_rel_drop * fp_acc)``::

    n < min_items                          -> inconclusive
    worst end of the interval within margin -> pass   (-delta_ci[0] <= margin)
    whole interval beyond the margin        -> fail   (-delta_ci[1] >  margin)
    otherwise                               -> inconclusive (more items are needed)

Many cells at once, ``thresholds.family: holm | bh`` (difference mode): a session gating ``m``
cells of the family judges each at ``alpha / m`` — Bonferroni, Holm's first step, which controls
the family-wise error and so the false discovery rate as well — and at the session's end
:func:`adjust_family` gives every cell its Holm or Benjamini–Hochberg adjusted p-value
(``gate.p_adjusted``, with the verdict that p gives, ``gate.family_verdict``).

A drop exactly at the margin is within it (comparisons allow 1e-9 for float noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import binom, norm

from .records import GateResult

__all__ = ["Paired", "compare", "mcnemar_exact", "paired_delta_ci", "wilson", "evaluate_gate", "final_verdict_if_known",
           "adjust_family", "family_verdict", "TOLERANCE", "MODES", "FAMILIES"]

MODES = ("difference", "noninferiority")
FAMILIES = ("none", "holm", "bh")

TOLERANCE = 1e-9  # a drop within this of the margin counts as at the margin (within it)


def _mcnemar_p(fp_only: Any, quant_only: Any) -> np.ndarray:
    """Vectorized exact two-sided McNemar p-value (as statsmodels ``mcnemar(exact=True)``)."""
    b = np.asarray(fp_only, dtype=np.int64)
    c = np.asarray(quant_only, dtype=np.int64)
    # binom.cdf(k, 0, .5) is 1, so no discordant pairs gives min(1, 2) = 1.
    return np.minimum(1.0, 2.0 * binom.cdf(np.minimum(b, c), b + c, 0.5))


def mcnemar_exact(fp_only: int, quant_only: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant counts.

    ``p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``; 1.0 when ``b + c == 0``.
    Same value as ``statsmodels.stats.contingency_tables.mcnemar(table, exact=True)``.
    """
    if fp_only < 0 or quant_only < 0:
        raise ValueError(f"discordant counts must be >= 0 (got {fp_only}, {quant_only})")
    if fp_only + quant_only == 0:
        return 1.0
    return float(_mcnemar_p(fp_only, quant_only))


@dataclass(frozen=True)
class Paired:
    """Two runs on the same items: how many only the first got right, only the second, and the
    exact McNemar p of that difference (the one paired comparison every stage uses)."""

    first_only: int
    second_only: int
    p_value: float


def compare(first: Sequence[bool], second: Sequence[bool]) -> Paired:
    """:class:`Paired` of two equally long per-item correctness vectors (same item order)."""
    a, b = _as_bools(first, "first"), _as_bools(second, "second")
    if a.size != b.size:
        raise ValueError(f"paired runs must cover the same items (got {a.size} and {b.size})")
    return _paired(a, b)


def _paired(a: np.ndarray, b: np.ndarray) -> Paired:
    """:func:`compare` of vectors already checked to be equally long boolean arrays."""
    first_only, second_only = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))
    return Paired(first_only, second_only, mcnemar_exact(first_only, second_only))


@dataclass(frozen=True)
class GateRule:
    """The thresholds as every gate reads them (this one and :mod:`pytest_qmr.sampled_gate`), from a
    suite's ``Thresholds`` or a plain dict: under ``family: holm | bh`` the cell's alpha is
    ``alpha / family_size`` (Bonferroni, see the module doc); outside a family the size is 1."""

    max_abs: float
    max_rel: float
    alpha: float
    min_items: int
    mode: str
    family: str
    family_size: int

    @classmethod
    def of(cls, thresholds: Any) -> "GateRule":
        def get(name: str, default: Any = None) -> Any:
            if isinstance(thresholds, dict):
                return thresholds.get(name, default)
            return getattr(thresholds, name, default)

        family = get("family", "none") or "none"
        size = max(int(get("family_size", 1) or 1), 1) if family != "none" else 1
        return cls(float(get("max_abs_drop")), float(get("max_rel_drop")), float(get("alpha")) / size,
                   int(get("min_items")), get("mode", "difference") or "difference", family, size)

    def exceeds(self, drop: Any, rel_drop: Any) -> Any:
        """Whether a drop is beyond a margin (vectorized); a drop at the margin is within it."""
        return (drop > self.max_abs + TOLERANCE) | (rel_drop > self.max_rel + TOLERANCE)

    def margin(self, fp_acc: float) -> float:
        """The noninferiority margin: ``min(max_abs_drop, max_rel_drop * fp_acc)``."""
        return min(self.max_abs, self.max_rel * fp_acc) if fp_acc > 0 else self.max_abs

    def margins_text(self) -> str:
        return f"abs {self.max_abs:.3f}, rel {self.max_rel:.0%}"


def wilson(successes: Any, n: int, z: float = 1.959964) -> tuple[Any, Any]:
    """Wilson score interval of a proportion (vectorized over ``successes``; default 95%)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _drop_ci(b: Any, c: Any, n: int, fp_correct: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's method-10 interval for ``drop = fp_acc - quant_acc`` from the final counts:
    ``a = fp_correct - b`` both right, ``b`` FP only, ``c`` quantized only, ``d`` both wrong."""
    b = np.asarray(b, dtype=float)
    c = np.asarray(c, dtype=float)
    if n <= 0:
        return np.zeros_like(b) - 1.0, np.zeros_like(b) + 1.0
    a = fp_correct - b
    d = n - a - b - c
    z = float(norm.ppf(0.5 + level / 2))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    corrected = np.where(cross > n / 2, cross - n / 2, np.where(cross < 0, cross, 0.0))
    phi = np.divide(corrected, np.sqrt(margins), out=np.zeros_like(b), where=margins > 0)
    low = (p1 - p2) - np.sqrt(np.maximum((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0))
    high = (p1 - p2) + np.sqrt(np.maximum((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0))
    return low, high


def paired_delta_ci(fp_only: int, quant_only: int, n: int, fp_correct: int, level: float = 0.95) -> tuple[float, float]:
    """``level`` confidence interval of ``delta = quant_acc - fp_acc`` over ``n`` paired items,
    ``fp_correct`` of which FP solved (Newcombe 1998, method 10; see the module doc)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    low, high = _drop_ci(fp_only, quant_only, n, fp_correct, level)
    return -float(high), -float(low)


def _verdicts(b, c, n: int, fp_correct: int, rule: GateRule):
    """Vectorized verdict over arrays of final discordant counts (same rule as the docstring).

    Returns ``(codes, drop, rel_drop, p)`` with codes 0 = pass, 1 = fail, 2 = inconclusive.
    """
    alpha, min_items = rule.alpha, rule.min_items
    b = np.asarray(b, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    diff = (b - c).astype(float)
    drop = diff / n if n else np.zeros_like(diff)
    rel_drop = diff / fp_correct if fp_correct else np.zeros_like(diff)
    if rule.mode == "noninferiority":
        low, high = _drop_ci(b, c, n, fp_correct, 1 - alpha)
        margin = rule.margin(fp_correct / n if n else 0.0)
        codes = np.where(high <= margin + TOLERANCE, 0, np.where(low > margin + TOLERANCE, 1, 2))
        p = _mcnemar_p(b, c)
        if n < min_items:
            codes = np.full_like(codes, 2)
        return codes, drop, rel_drop, p
    exceeds = rule.exceeds(drop, rel_drop)
    p = np.ones(b.shape, dtype=float)
    if np.any(exceeds):  # p only matters (and is only paid for) where the drop exceeds
        p[exceeds] = _mcnemar_p(b[exceeds], c[exceeds])
    codes = np.where(exceeds, np.where(p < alpha, 1, 2), 0)
    if n < min_items:
        codes = np.full_like(codes, 2)
    return codes, drop, rel_drop, p


_NAMES = ("pass", "fail", "inconclusive")


def _as_bools(values: Sequence[bool], what: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=object)
    if arr.size and not all(isinstance(v, (bool, np.bool_)) for v in arr):
        raise TypeError(f"{what} must hold booleans")
    return arr.astype(bool)


def _stats(fp: np.ndarray, quant: np.ndarray, rule: GateRule) -> dict:
    n = int(fp.size)
    paired = _paired(fp, quant)  # both callers have checked the two vectors
    b, c = paired.first_only, paired.second_only
    fp_acc = float(fp.mean()) if n else 0.0
    quant_acc = float(quant.mean()) if n else 0.0
    diff = b - c
    low, high = paired_delta_ci(b, c, n, int(fp.sum()), 1 - rule.alpha)  # (-1, 1) without items
    return {
        "delta_ci": [round(low, 6), round(high, 6)],
        "family": rule.family,
        "family_size": rule.family_size,
        "exceeds": bool(n) and bool(rule.exceeds(diff / n, diff / int(fp.sum()) if fp.sum() else 0.0)),
        "ci_level": round(1 - rule.alpha, 6),
        "mode": rule.mode,
        "n": n,
        "fp_only": b,
        "quant_only": c,
        "fp_acc": fp_acc,
        "quant_acc": quant_acc,
        "delta": -diff / n if n else 0.0,
        "rel_drop": diff / int(fp.sum()) if fp.sum() else 0.0,
        "p_value": paired.p_value,
    }


def _reason(code: int, n: int, drop: float, p: float, rule: GateRule, s: dict | None = None) -> str:
    alpha, margins = rule.alpha, rule.margins_text()
    if n < rule.min_items:
        return f"only {n} paired items, fewer than min_items {rule.min_items}; no verdict"
    if rule.mode == "noninferiority" and s is not None:
        worst, best = -s["delta_ci"][0], -s["delta_ci"][1]
        margin = rule.margin(s["fp_acc"])
        level = f"{s['ci_level']:.0%} interval"
        if code == 0:
            return f"non-inferior: even the worst end of the {level} loses {worst:.3f}, within the margin {margin:.3f}"
        if code == 1:
            return f"inferior: even the best end of the {level} loses {best:.3f}, beyond the margin {margin:.3f}"
        return (f"the {level} (a loss of {best:.3f} to {worst:.3f}) straddles the margin {margin:.3f}; "
                "more items are needed")
    if code == 0:
        if drop <= 0:
            return "the quantized model is not less accurate than FP"
        return f"accuracy drop {drop:.3f} is within the allowed margin ({margins})"
    if code == 1:
        return (
            f"accuracy drop {drop:.3f} exceeds the allowed margin ({margins}) "
            f"and is significant (p={p:.3g} < alpha {alpha})"
        )
    return (
        f"accuracy drop {drop:.3f} exceeds the allowed margin ({margins}) "
        f"but is not significant (p={p:.3g} >= alpha {alpha}); more items are needed"
    )


def evaluate_gate(
    fp_correct: Sequence[bool], quant_correct: Sequence[bool], thresholds: Any
) -> GateResult:
    """Gate a quantized model against FP on paired correctness vectors (same item order).

    ``thresholds`` is the suite's :class:`~pytest_qmr.suite.Thresholds` (or any object or
    dict with ``max_abs_drop``, ``max_rel_drop``, ``alpha`` and ``min_items``).

    Rule: ``drop = fp_acc - quant_acc``, ``rel_drop = drop / fp_acc`` (0 if fp_acc is 0);
    the drop *exceeds* the margin when ``drop > max_abs_drop or rel_drop > max_rel_drop``.

    * ``inconclusive`` when ``n < min_items``;
    * ``fail`` when it exceeds and the exact McNemar p-value is ``< alpha``;
    * ``inconclusive`` when it exceeds but ``p >= alpha`` (not enough evidence);
    * ``pass`` otherwise (the drop is within the margin, or accuracy rose).
    """
    fp = _as_bools(fp_correct, "fp_correct")
    quant = _as_bools(quant_correct, "quant_correct")
    if fp.size != quant.size:
        raise ValueError(f"paired vectors differ in length: FP {fp.size}, quantized {quant.size}")
    rule = GateRule.of(thresholds)
    s = _stats(fp, quant, rule)
    codes, _, _, _ = _verdicts(s["fp_only"], s["quant_only"], s["n"], int(fp.sum()), rule)
    code = int(codes)
    return GateResult(
        verdict=_NAMES[code],  # type: ignore[arg-type]
        alpha=rule.alpha,
        reason=_reason(code, s["n"], -s["delta"], s["p_value"], rule, s),
        n_planned=s["n"],
        stopped_early=False,
        **s,
    )


def final_verdict_if_known(
    fp_correct_all: Sequence[bool], quant_correct_so_far: Sequence[bool], thresholds: Any
) -> GateResult | None:
    """Sequential gate: the verdict over all planned items, if the items so far settle it.

    ``fp_correct_all`` is the FP correctness of all N planned items; ``quant_correct_so_far``
    the quantized correctness of the first k of them (same order).  The remaining items can
    only add ``x`` in ``0..R1`` to fp_only (remaining FP-correct items) and ``y`` in ``0..R0``
    to quant_only (remaining FP-wrong items); the FP accuracy over N is already known.  If
    :func:`evaluate_gate` over all N items would give the same verdict for every (x, y), the
    result is returned: the verdict is that full-run verdict, the statistics are those of the
    k items seen (``n = k``, ``n_planned = N``, ``stopped_early = k < N``).  Otherwise None.

    The (R1 + 1) x (R0 + 1) grid is checked with vectorized numpy/scipy; its four corners are
    checked first, so an unsettled gate (the common case) costs four p-values.
    """
    fp_all = _as_bools(fp_correct_all, "fp_correct_all")
    quant = _as_bools(quant_correct_so_far, "quant_correct_so_far")
    n_all, k = int(fp_all.size), int(quant.size)
    if k > n_all:
        raise ValueError(f"more quantized results ({k}) than planned items ({n_all})")
    fp_seen, fp_rest = fp_all[:k], fp_all[k:]
    rule = GateRule.of(thresholds)
    s = _stats(fp_seen, quant, rule)
    fp_total = int(fp_all.sum())
    r1 = int(fp_rest.sum())  # remaining FP-correct items: each may become fp_only
    r0 = int(fp_rest.size - r1)  # remaining FP-wrong items: each may become quant_only
    b0, c0 = s["fp_only"], s["quant_only"]

    alpha, min_items, margins = rule.alpha, rule.min_items, rule.margins_text()
    if n_all < min_items:  # no completion can reach min_items: inconclusive whatever happens
        return GateResult(
            verdict="inconclusive",
            alpha=alpha,
            reason=f"only {n_all} planned items, fewer than min_items {min_items}; no verdict",
            n_planned=n_all,
            stopped_early=k < n_all,
            **s,
        )
    # Cheap rejection on the corners first (drop is extreme at two of them, p at the others).
    cx = np.array([0, r1, 0, r1])
    cy = np.array([0, 0, r0, r0])
    codes, _, _, _ = _verdicts(b0 + cx, c0 + cy, n_all, fp_total, rule)
    if np.any(codes != codes[0]):
        return None
    # Full grid.
    x = np.arange(r1 + 1, dtype=np.int64)[:, None]
    y = np.arange(r0 + 1, dtype=np.int64)[None, :]
    b, c = np.broadcast_arrays(b0 + x, c0 + y)
    codes, drop, _, p = _verdicts(b, c, n_all, fp_total, rule)
    code = int(codes.flat[0])
    if np.any(codes != code):
        return None

    rest = n_all - k
    where = f"settled after {k}/{n_all} items: every outcome of the remaining {rest} gives {_NAMES[code].upper()}"
    if rule.mode == "noninferiority":
        why = {0: "the final interval's worst end stays within the margin",
               1: "the final interval lies wholly beyond the margin",
               2: "the final interval straddles the margin"}[code]
    elif code == 0:
        why = f"the final drop is at most {float(drop.max()):.3f}, within the allowed margin ({margins})"
    elif code == 1:
        why = (
            f"the final drop is at least {float(drop.min()):.3f}, beyond the allowed margin "
            f"({margins}), with p <= {float(p.max()):.3g} < alpha {alpha}"
        )
    else:
        why = (
            f"the final drop exceeds the allowed margin ({margins}) but p >= "
            f"{float(p.min()):.3g} is never below alpha {alpha}"
        )
    return GateResult(
        verdict=_NAMES[code],  # type: ignore[arg-type]
        alpha=alpha,
        reason=f"{where}; {why}" if rest else why,
        n_planned=n_all,
        stopped_early=k < n_all,
        **s,
    )


# --------------------------------------------------------------------------- many cells


def adjust_family(p_values: Sequence[float], family: str) -> list[float]:
    """Holm (family-wise error) or Benjamini–Hochberg (false discovery rate) adjusted p-values,
    by statsmodels' ``multipletests``; ``none`` returns them unchanged."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)} (got {family!r})")
    if family == "none" or not p_values:
        return [float(p) for p in p_values]
    from statsmodels.stats.multitest import multipletests

    method = {"holm": "holm", "bh": "fdr_bh"}[family]
    return [float(p) for p in multipletests(list(p_values), alpha=0.05, method=method)[1]]


def family_verdict(gate: GateResult, p_adjusted: float, alpha: float) -> str:
    """The verdict with the family's adjusted p against the family's ``alpha``. Since adjusted p
    never exceeds ``m * p``, a cell that failed at ``alpha / m`` still fails (a sequential FAIL,
    proven for every completion, is kept even though its p is that of the items seen); what
    Holm's step-down (or BH) adds is a FAIL for a cell left inconclusive only by Bonferroni: a
    difference-mode drop beyond the margin, judged on all its planned items."""
    if (gate.verdict == "inconclusive" and gate.mode == "difference" and gate.exceeds and not gate.stopped_early
            and p_adjusted < alpha):
        return "fail"
    return gate.verdict
