"""The paired gate for k sampled answers per item (issue #35, part 3).

Reasoning models are evaluated by sampling ``k`` answers per item (with seeds).  Each item ``i``
then has a per-item mean score for each model, ``x_i = fp_correct_i / k`` and
``y_i = quant_correct_i / k``, and the paired difference ``d_i = y_i - x_i`` in ``[-1, 1]``.  The
item is the unit of analysis: the ``k`` samples of an item share its difficulty, so they are not
``k`` independent observations (Miller, "Adding Error Bars to Evals: A Statistical Approach to
Language Model Evaluations", arXiv:2411.00640, sections 2-4: clustered by item, paired).

What is estimated.  ``delta = quant_acc - fp_acc = mean_i d_i``.  Its target, the *true* delta,
is ``(1/n) sum_i (pi_q,i - pi_fp,i)`` over the ``n`` items of the benchmark, where ``pi_m,i`` is the
probability that one sampled answer of model ``m`` to item ``i`` is correct: the items are fixed,
only the answers are random.  Every variance below is the item-clustered one (the spread of the
``d_i`` across items), which also covers the wider target of items drawn from a population
(Miller's super-population), and is conservative for the fixed items.

The test.  The exact two-sided sign-flip (randomization) test of ``S = sum_i d_i`` (Fisher 1935,
Pitman 1937): under "quantization changes nothing", the FP and quantized labels of an item's
samples are exchangeable, so each ``d_i`` is as likely to be ``+|d_i|`` as ``-|d_i|``, and
``p = P(|sum_i e_i |d_i|| >= |S|)`` over independent fair signs ``e_i``.  It is computed exactly
(:func:`sign_flip_distribution`) on the integers ``k * d_i``: the items with the same ``|k d_i| = j``
contribute ``j (2 B - m_j)`` with ``B ~ Binomial(m_j, 1/2)``, and at most ``k`` such lattice binomials
are convolved directly (no FFT, so small tail probabilities keep their relative precision): support
at most ``2 n k + 1``, cost ``O(n^2 k)`` at worst, well under a millisecond for ``n = 200, k = 8``.
With ``k = 1``, ``d_i`` is in ``{-1, 0, 1}``, ``S = c - b`` and the distribution is that of
``2 Binomial(b + c, 1/2) - (b + c)``: the test *is* the exact McNemar test
(:func:`pytest_qmr.gate.mcnemar_exact`), which the gate then calls itself.

The interval (``k > 1``).  The item-clustered paired interval ``mean(d) +- t_{n-1} sd(d) / sqrt(n)``
is the obvious start, but it collapses when few items differ (easy benchmarks, a near copy of the
FP model: every ``d_i`` can be 0 while the true delta is not): in an exploratory simulation its
coverage fell as low as 45% (n 30, k 4, FP accuracy 0.97, nine samples in ten copied).  Agresti
& Min ("Simple improved confidence intervals for comparing matched proportions", Stat. Med. 24,
2005) fix the same failure of the paired Wald interval by adding 1/2 to each cell of the 2x2
table; counted in *samples*, that is pseudo-items of weight ``2 / k`` in all (``d = +1`` and
``d = -1`` with ``1 / (2k)`` each, ``d = 0`` with ``1 / k``)::

    n' = n + 2/k,   mean = sum_i d_i / n',   var = ((sum_i d_i^2 + 1/k) / n' - mean^2) / n'
    interval = mean -+ t_{n-1, 1 - alpha/2} * sqrt(var)          (clipped to [-1, 1])

(``t`` instead of ``z``: the small-sample correction usual for clustered standard errors).  The
simulation in ``tests/test_sampled_gate.py`` (n 30/80/200, k 4/8, heterogeneous item
difficulties, FP/quantized correlation both across items and within an item's paired seeds)
covers the true delta at least 94% of the time at every point.  A MOVER alternative (Newcombe's
method 10 with the Wilson intervals at design-effect effective sample sizes, Korn & Graubard
1998, Zou & Donner 2008) covered as well but was about 8% wider on average, and the interval
chosen depends on the data only through ``sum d_i`` and ``sum d_i^2``, which makes the sequential
bounds below separable.  With ``k = 1`` the gate keeps Newcombe's hybrid score interval
(:func:`pytest_qmr.gate.paired_delta_ci`).

Verdicts: exactly :mod:`pytest_qmr.gate`'s rule (``difference``: drop beyond a margin and
``p < alpha``; ``noninferiority``: the interval against ``min(max_abs_drop, max_rel_drop *
fp_acc)``; ``min_items``; ``alpha / family_size`` in a family) with ``drop = fp_acc - quant_acc``
over all samples, the sign-flip p and the interval above.  With ``k = 1``
:func:`evaluate_sampled_gate` returns :func:`pytest_qmr.gate.evaluate_gate`'s result itself, so
today's answers are kept exactly.  ``fp_only`` / ``quant_only`` count the items on which FP
(the quantized model) scored the higher mean: McNemar's ``b`` and ``c`` at ``k = 1``.  The p-values
are ordinary p-values, for :func:`pytest_qmr.gate.adjust_family` (Holm / BH) unchanged.

How many would settle it.  Per Miller (section 4), ``Var(d_i) = sigma_b^2 + sigma_w^2 / k``: the
between-item variance of the true per-item differences and the within-item (binomial) variance
of one sample pair.  The within part at the current ``k`` is estimated per item without bias, by
``(x(1-x) + y(1-y)) / (k - 1)`` from counts (independent FP and quantized samples) or by
``var_j(y_ij - x_ij) / k`` from the ``(n, k)`` 0/1 arrays (valid whether or not the seeds pair
the samples); the between part is the rest of the (Agresti-Min adjusted) variance of the
``d_i``.  At the observed effect, an inconclusive verdict is settled once the interval no longer
reaches across ``gap``: the distance of ``delta`` from 0 (difference mode: then ``p < alpha``) or of
the drop from the margin (noninferiority).  Asking for 80% power, the standard error of ``delta``
must come down to ``gap / (z_{1-alpha/2} + z_{0.8})``, which gives the items ``n*`` at the current
``k`` and, where the between-item part alone does not already exceed it, the samples per item
``k*`` on the current items (:func:`settle_estimate`).  A plug-in estimate at the observed effect,
hence "about".

Sequential stopping (:func:`sampled_verdict_if_known`, ``k > 1``) is conservative and never
wrong: it returns a verdict only when every completion of the remaining items (each quantized
count anywhere in ``0..k``) gives it.

* The drop over all items ranges between two completions (every remaining sample right / wrong),
  and "beyond a margin" is monotone in it: PASS in difference mode is settled when even the
  largest drop is within the margins, exactly as in the ``k = 1`` gate.
* FAIL in difference mode needs ``p < alpha`` for every completion in which the drop exceeds.  By
  Chernoff's bound for a Rademacher sum, ``p <= 2 exp(lambda S + sum_i log cosh(lambda d_i))`` for any
  ``lambda >= 0`` when ``S < 0``; per item ``lambda d + log cosh(lambda d)`` increases with ``d``, so over
  all completions it is largest where every remaining sample is right: if that completion's
  bound, minimized over ``lambda``, is below alpha, every completion's exact p is.
* In noninferiority mode the interval's ends are functions of ``(sum d_i, sum d_i^2)``.  With the
  tangent bounds ``sqrt(V) <= V / (2 s) + s / 2`` (any ``s > 0``) and ``m^2 >= 2 m m0 - m0^2`` (any
  ``m0``), a lower bound of the lower end and an upper bound of the upper end become sums of one
  term per remaining item, each minimized (maximized) over that item's ``k + 1`` possible counts:
  rigorous for every ``(s, m0)``, and tight at the completion they are taken from.  PASS is settled
  when the lower end's bound stays within the margin, FAIL when the upper end's is beyond it.
* INCONCLUSIVE is settled only when the plan has fewer than ``min_items`` items (the run goes on
  otherwise; that costs samples, never a wrong verdict).

With ``k = 1`` it returns :func:`pytest_qmr.gate.final_verdict_if_known` (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import gammaln
from scipy.stats import norm
from scipy.stats import t as student_t

from .gate import TOLERANCE, GateRule, evaluate_gate, final_verdict_if_known, mcnemar_exact, paired_delta_ci
from .records import GateResult

__all__ = ["SampledGate", "as_counts", "sign_flip_distribution", "sign_flip_p", "paired_p_value",
           "clustered_delta_ci", "paired_interval", "variance_components", "settle_estimate", "settle_text",
           "evaluate_sampled_gate", "sampled_verdict_if_known", "POWER"]

POWER = 0.8  # "would likely settle it": the power asked of the items / samples suggested
_LOG2 = math.log(2.0)
_NAMES = ("pass", "fail", "inconclusive")
_SAFETY = 1e-9  # relative float slack between a sequential bound and the full run's own arithmetic


@dataclass(frozen=True)
class SampledGate:
    """A gate verdict on ``k`` samples per item: the :class:`GateResult` (existing fields only) and
    the fields proposed for it, under their proposed names: ``test`` (``mcnemar_exact`` |
    ``sign_flip_exact``), ``interval`` (``newcombe_hybrid_score`` | ``agresti_min_clustered_t``),
    ``samples_per_item``, ``items_needed``, ``samples_needed``, ``var_between``, ``var_within``."""

    gate: GateResult
    extras: dict[str, Any]

    def result(self) -> GateResult:
        """The gate result as records keep it: with these statistics under ``sampled`` when there are
        several answers per item; a one-answer gate exactly as :func:`pytest_qmr.gate.evaluate_gate`'s."""
        if self.extras["samples_per_item"] > 1:
            self.gate.sampled = dict(self.extras)
        return self.gate


# --------------------------------------------------------------------------- inputs and thresholds


def as_counts(scores: Any, k: int | None = None, what: str = "scores") -> tuple[np.ndarray, int, np.ndarray | None]:
    """``(correct counts per item, k, the (n, k) 0/1 samples or None)`` from any accepted form:
    a 1-D boolean vector (``k = 1``), 1-D counts with ``k`` given, or an ``(n, k)`` 0/1 array."""
    arr = np.asarray(scores)
    if arr.ndim == 2:
        if k is not None and k != arr.shape[1]:
            raise ValueError(f"{what}: k={k} but the samples have {arr.shape[1]} columns")
        samples = _zero_one(arr, what)
        return samples.sum(axis=1), int(arr.shape[1]), samples
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a vector of counts / booleans or an (items, k) array")
    if arr.dtype == bool or arr.size == 0:
        if k not in (None, 1) and arr.size:
            raise ValueError(f"{what}: booleans are one sample per item, not k={k}")
        return arr.astype(np.int64), int(k or 1), None
    if k is None:
        raise ValueError(f"{what}: counts of correct samples need k, the samples per item")
    counts = _integers(arr, what)
    if k < 1 or counts.min() < 0 or counts.max() > k:
        raise ValueError(f"{what}: counts must lie in 0..k (k={k})")
    return counts, int(k), None


def _integers(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and not np.all(arr == np.round(arr))):
        raise TypeError(f"{what} must hold integer counts or booleans")
    return arr.astype(np.int64)


def _zero_one(arr: np.ndarray, what: str) -> np.ndarray:
    values = _integers(arr, what)
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"{what}: an (items, k) array holds 0/1 per sample")
    return values


def _paired_inputs(fp_scores: Any, quant_scores: Any, k: int | None, planned: bool = False):
    fp, k_fp, fp_samples = as_counts(fp_scores, k, "fp_scores")
    quant, k_quant, quant_samples = as_counts(quant_scores, k if k is not None else (k_fp if fp.size else None),
                                              "quant_scores")
    if quant.size and fp.size and k_fp != k_quant:
        raise ValueError(f"FP and quantized runs sample k differently ({k_fp} and {k_quant})")
    if planned and quant.size > fp.size:
        raise ValueError(f"more quantized results ({quant.size}) than planned items ({fp.size})")
    if not planned and fp.size != quant.size:
        raise ValueError(f"paired vectors differ in length: FP {fp.size}, quantized {quant.size}")
    return fp, quant, max(k_fp, k_quant), fp_samples, quant_samples


# --------------------------------------------------------------------------- the exact sign-flip test


def _binomial_half(m: int) -> np.ndarray:
    """``P(B = b)`` for ``B ~ Binomial(m, 1/2)``, ``b = 0..m``."""
    b = np.arange(m + 1)
    return np.exp(gammaln(m + 1) - gammaln(b + 1) - gammaln(m - b + 1) - m * _LOG2)


def _convolve_lattice(acc: np.ndarray, pmf: np.ndarray, step: int) -> np.ndarray:
    """``acc`` convolved with ``pmf`` placed every ``step`` entries (direct sums: exact tails)."""
    size = acc.size
    out = np.zeros(size + step * (pmf.size - 1))
    if pmf.size < step:
        for b, weight in enumerate(pmf):
            out[step * b: step * b + size] += weight * acc
    else:
        for r in range(min(step, size)):
            out[r::step] = np.convolve(acc[r::step], pmf)
    return out


def sign_flip_distribution(values: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Exact null distribution of ``sum_i e_i |v_i|`` over independent fair signs ``e_i``, for
    integer ``values`` (``k * d_i``): ``(support -T..T, probabilities)`` with ``T = sum |v_i|``."""
    v = np.abs(_integers(np.asarray(values).reshape(-1), "values"))
    counts = np.bincount(v[v > 0]) if np.any(v) else np.zeros(1, dtype=np.int64)
    acc = np.ones(1)
    for j in np.flatnonzero(counts).tolist():
        acc = _convolve_lattice(acc, _binomial_half(int(counts[j])), 2 * j)
    total = int(v.sum())
    return np.arange(-total, total + 1), acc


def sign_flip_p(values: Sequence[int]) -> float:
    """Exact two-sided sign-flip p of the integer paired differences ``values``:
    ``P(|sum e_i |v_i|| >= |sum v_i|)``; 1.0 when every value is 0.  With values in {-1, 0, 1}
    (one sample per item) it is the exact McNemar p of ``b = #(-1)``, ``c = #(+1)``."""
    support, prob = sign_flip_distribution(values)
    observed = abs(int(np.sum(_integers(np.asarray(values).reshape(-1), "values"))))
    if observed == 0:
        return 1.0
    return min(1.0, float(prob[np.abs(support) >= observed].sum()))


def paired_p_value(fp_counts: Any, quant_counts: Any, k: int) -> float:
    """The gate's p: the exact McNemar p at ``k = 1``, the exact sign-flip p otherwise."""
    fp, quant = np.asarray(fp_counts, dtype=np.int64), np.asarray(quant_counts, dtype=np.int64)
    if k == 1:
        return mcnemar_exact(int(np.count_nonzero(fp > quant)), int(np.count_nonzero(quant > fp)))
    return sign_flip_p(quant - fp)


# --------------------------------------------------------------------------- the interval


def _t_quantile(n: int, level: float) -> float:
    return float(student_t.ppf(0.5 + level / 2, max(n - 1, 1)))


def _am_parts(total: Any, squares: Any, n: int, k: int) -> tuple[Any, Any]:
    """(centre, variance of the centre) of the Agresti-Min adjusted mean of the d_i."""
    n_adj = n + 2.0 / k
    centre = np.asarray(total, dtype=float) / n_adj
    var = np.maximum((np.asarray(squares, dtype=float) + 1.0 / k) / n_adj - centre**2, 0.0) / n_adj
    return centre, var


def clustered_delta_ci(fp_counts: Any, quant_counts: Any, k: int, level: float = 0.95) -> tuple[Any, Any]:
    """The item-clustered paired interval of ``delta`` at ``level`` with Agresti-Min's
    adjustment counted in samples (the module doc), for any ``k``.  Vectorized: counts of shape
    ``(..., n)`` give ends of shape ``(...)``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    d = (np.asarray(quant_counts, dtype=float) - np.asarray(fp_counts, dtype=float)) / k
    n = d.shape[-1]
    if n == 0:
        return -1.0, 1.0
    centre, var = _am_parts(d.sum(axis=-1), (d * d).sum(axis=-1), n, k)
    half = _t_quantile(n, level) * np.sqrt(var)
    return np.clip(centre - half, -1.0, 1.0), np.clip(centre + half, -1.0, 1.0)


def paired_interval(fp_counts: Any, quant_counts: Any, k: int, level: float = 0.95) -> tuple[float, float]:
    """The gate's interval of ``delta``: Newcombe's (:func:`pytest_qmr.gate.paired_delta_ci`) at
    ``k = 1``, :func:`clustered_delta_ci` otherwise."""
    fp, quant = np.asarray(fp_counts, dtype=np.int64), np.asarray(quant_counts, dtype=np.int64)
    if k == 1:
        return paired_delta_ci(int(np.count_nonzero(fp > quant)), int(np.count_nonzero(quant > fp)), int(fp.size),
                               int(fp.sum()), level)
    low, high = clustered_delta_ci(fp, quant, k, level)
    return float(low), float(high)


# --------------------------------------------------------------------------- how many would settle it


def variance_components(fp_counts: Any, quant_counts: Any, k: int, fp_samples: np.ndarray | None = None,
                        quant_samples: np.ndarray | None = None) -> tuple[float, float | None]:
    """``(Var(d_i), within)``: the (Agresti-Min adjusted) variance of the per-item differences at
    the current ``k``, and the mean within-item part of it (None at ``k = 1``, where one sample per
    item cannot tell it from the between-item part, which is ``Var(d_i) - within``)."""
    fp, quant = np.asarray(fp_counts, dtype=float), np.asarray(quant_counts, dtype=float)
    n = fp.size
    d = (quant - fp) / k
    n_adj = n + 2.0 / k
    total = float(((d * d).sum() + 1.0 / k - d.sum() ** 2 / n_adj) / max(n_adj - 1, 1e-9)) if n else 0.0
    if k == 1 or not n:
        return max(total, 0.0), None
    if fp_samples is not None and quant_samples is not None:
        within = np.var(quant_samples - fp_samples, axis=1, ddof=1) / k
    else:
        x, y = fp / k, quant / k
        within = (x * (1 - x) + y * (1 - y)) / (k - 1)
    return max(total, 0.0), float(within.mean())


def settle_estimate(gap: float, alpha: float, n: int, k: int, var_total: float, var_within: float | None,
                    power: float = POWER) -> tuple[int | None, int | None]:
    """``(items at the current k, samples per item on the current n items)`` whose interval would
    likely (with probability ``power``) put the observed effect ``gap`` away from the line it must
    clear; None where no number would (``gap`` 0, or samples cannot beat the between-item part)."""
    if not gap > 0 or not math.isfinite(gap):
        return None, None
    target = (gap / (norm.ppf(1 - alpha / 2) + norm.ppf(power))) ** 2  # the variance of the mean needed
    items = max(math.ceil(var_total / target), n + 1)
    if var_within is None or var_within <= 0:
        return items, None
    room = n * target - max(var_total - var_within, 0.0)  # what is left for the within-item part
    samples = max(math.ceil(k * var_within / room), k + 1) if room > 0 else None
    return items, samples


def settle_text(items: int | None, samples: int | None, n: int) -> str:
    """``about 310 items (or 12 samples per item on these 80 items) would likely settle it``."""
    if items is None:
        return "no number of items would likely settle it: the observed effect sits on the line it must clear"
    more = f" (or {samples} samples per item on these {n} items)" if samples is not None else ""
    return f"about {items} items{more} would likely settle it"


def _gap(code: int, gate: GateResult, rule: GateRule) -> float | None:
    """The distance the interval must clear at the observed effect (None: not inconclusive on it)."""
    if code != 2 or gate.n < rule.min_items:
        return None
    drop = -gate.delta
    if rule.mode == "noninferiority":
        return abs(drop - rule.margin(gate.fp_acc))
    return abs(drop)


def _extras(gate: GateResult, code: int, rule: GateRule, fp: np.ndarray, quant: np.ndarray, k: int,
            samples: tuple[np.ndarray | None, np.ndarray | None]) -> dict[str, Any]:
    var_total, within = variance_components(fp, quant, k, *samples)
    items = needed = None
    if code == 2 and gate.n_planned < rule.min_items:  # the plan itself is too small
        items = rule.min_items
    gap = _gap(code, gate, rule)
    if gap is not None and not gate.stopped_early:
        items, needed = settle_estimate(gap, rule.alpha, gate.n, k, var_total, within)
    return {
        "test": "mcnemar_exact" if k == 1 else "sign_flip_exact",
        "interval": "newcombe_hybrid_score" if k == 1 else "agresti_min_clustered_t",
        "samples_per_item": k,
        "items_needed": items,
        "samples_needed": needed,
        "var_between": None if within is None else max(var_total - within, 0.0),
        "var_within": within,
    }


# --------------------------------------------------------------------------- the gate, k > 1


def _stats(fp: np.ndarray, quant: np.ndarray, k: int, rule: GateRule) -> tuple[dict, float, float]:
    """The GateResult fields of ``n`` items (as gate.py's ``_stats``) and the unrounded interval."""
    n = int(fp.size)
    fp_total, quant_total = int(fp.sum()), int(quant.sum())
    diff = fp_total - quant_total
    low, high = paired_interval(fp, quant, k, 1 - rule.alpha) if n else (-1.0, 1.0)
    drop = diff / (n * k) if n else 0.0
    rel_drop = diff / fp_total if fp_total else 0.0
    return {
        "delta_ci": [round(low, 6), round(high, 6)],
        "family": rule.family,
        "family_size": rule.family_size,
        "exceeds": bool(n) and bool(rule.exceeds(drop, rel_drop)),
        "ci_level": round(1 - rule.alpha, 6),
        "mode": rule.mode,
        "n": n,
        "fp_only": int(np.count_nonzero(fp > quant)),
        "quant_only": int(np.count_nonzero(quant > fp)),
        "fp_acc": fp_total / (n * k) if n else 0.0,
        "quant_acc": quant_total / (n * k) if n else 0.0,
        "delta": -diff / (n * k) if n else 0.0,  # not -drop: no -0.0 for a copy
        "rel_drop": rel_drop,
        "p_value": paired_p_value(fp, quant, k),
    }, low, high


def _code(s: dict, low: float, high: float, rule: GateRule) -> int:
    """gate.py's verdict rule: 0 pass, 1 fail, 2 inconclusive."""
    if s["n"] < rule.min_items:
        return 2
    if rule.mode == "noninferiority":
        margin = rule.margin(s["fp_acc"])
        return 0 if -low <= margin + TOLERANCE else 1 if -high > margin + TOLERANCE else 2
    if not s["exceeds"]:
        return 0
    return 1 if s["p_value"] < rule.alpha else 2


def _reason(code: int, s: dict, rule: GateRule, settle: str) -> str:
    """gate.py's reasons, with what would settle an inconclusive verdict instead of "more items"."""
    n, drop = s["n"], -s["delta"]
    if n < rule.min_items:
        return f"only {n} paired items, fewer than min_items {rule.min_items}; no verdict"
    if rule.mode == "noninferiority":
        worst, best = -s["delta_ci"][0], -s["delta_ci"][1]
        margin, level = rule.margin(s["fp_acc"]), f"{s['ci_level']:.0%} interval"
        if code == 0:
            return f"non-inferior: even the worst end of the {level} loses {worst:.3f}, within the margin {margin:.3f}"
        if code == 1:
            return f"inferior: even the best end of the {level} loses {best:.3f}, beyond the margin {margin:.3f}"
        return f"the {level} (a loss of {best:.3f} to {worst:.3f}) straddles the margin {margin:.3f}; {settle}"
    if code == 0:
        if drop <= 0:
            return "the quantized model is not less accurate than FP"
        return f"accuracy drop {drop:.3f} is within the allowed margin ({rule.margins_text()})"
    head = f"accuracy drop {drop:.3f} exceeds the allowed margin ({rule.margins_text()})"
    if code == 1:
        return f"{head} and is significant (p={s['p_value']:.3g} < alpha {rule.alpha})"
    return f"{head} but is not significant (p={s['p_value']:.3g} >= alpha {rule.alpha}); {settle}"


def _evaluate_sampled(fp: np.ndarray, quant: np.ndarray, k: int, rule: GateRule, samples) -> SampledGate:
    s, low, high = _stats(fp, quant, k, rule)
    code = _code(s, low, high, rule)
    draft = GateResult(verdict=_NAMES[code], alpha=rule.alpha, reason="", n_planned=s["n"],  # type: ignore[arg-type]
                       stopped_early=False, **s)
    extras = _extras(draft, code, rule, fp, quant, k, samples)
    settle = settle_text(extras["items_needed"], extras["samples_needed"], s["n"])
    draft.reason = _reason(code, s, rule, settle)
    return SampledGate(draft, extras)


def evaluate_sampled_gate(fp_scores: Any, quant_scores: Any, thresholds: Any, k: int | None = None) -> SampledGate:
    """Gate a quantized model against FP on ``k`` sampled answers per item (same item order).

    ``fp_scores`` / ``quant_scores``: per item the number of correct samples out of ``k`` (``k``
    given), or ``(n, k)`` 0/1 arrays, or boolean vectors (``k = 1``).  ``thresholds`` as for
    :func:`pytest_qmr.gate.evaluate_gate`.  With ``k = 1`` the gate is
    :func:`pytest_qmr.gate.evaluate_gate`'s, field for field.
    """
    fp, quant, k, fp_samples, quant_samples = _paired_inputs(fp_scores, quant_scores, k)
    rule = GateRule.of(thresholds)
    if k == 1:
        gate = evaluate_gate([bool(v) for v in fp], [bool(v) for v in quant], thresholds)
        return SampledGate(gate, _extras(gate, _NAMES.index(gate.verdict), rule, fp, quant, 1, (None, None)))
    return _evaluate_sampled(fp, quant, k, rule, (fp_samples, quant_samples))


# --------------------------------------------------------------------------- sequential, k > 1


def _chernoff_p_bound(d: np.ndarray) -> float:
    """``min over lambda of 2 exp(-lambda |S| + sum log cosh(lambda d_i))``, an upper bound of the
    two-sided sign-flip p of ``d`` (any lambda >= 0 gives one; d is in [-1, 1])."""
    total = abs(float(d.sum()))
    if total == 0:
        return 1.0

    def log_bound(lam: float) -> float:
        return float(np.sum(np.logaddexp(lam * d, -lam * d) - _LOG2) - lam * total)

    best = minimize_scalar(log_bound, bounds=(0.0, 60.0), method="bounded")
    return min(1.0, 2.0 * math.exp(min(float(best.fun), log_bound(60.0))))


def _completion_bound(grid: np.ndarray, seen: tuple[float, float], point: tuple[float, float], n: int, k: int,
                      t_q: float, upper: bool) -> tuple[float, np.ndarray]:
    """A bound, over every completion, of the final interval's lower end (``upper=False``: a lower
    bound) or upper end (an upper bound), from the tangents at ``point = (m0, s)`` (module doc).
    ``grid`` holds each remaining item's possible ``d`` (rows); returns the bound and the
    completion attaining the separable bound."""
    n_adj = n + 2.0 / k
    m0, s = point
    sign = 1.0 if upper else -1.0
    linear = (1 - sign * t_q * m0 / (s * n_adj)) / n_adj
    square = sign * t_q / (2 * s * n_adj**2)  # the coefficient of sum d_i^2
    per_item = linear * grid + square * grid**2
    pick = per_item.argmax(axis=1) if upper else per_item.argmin(axis=1)
    rest = per_item[np.arange(grid.shape[0]), pick].sum()
    total, squares = seen
    bound = (linear * total + square * (squares + 1.0 / k) + sign * t_q * m0**2 / (2 * s * n_adj)
             + sign * t_q * s / 2 + rest)
    return float(bound), grid[np.arange(grid.shape[0]), pick]


def _interval_extreme(d_seen: np.ndarray, fp_rest: np.ndarray, n: int, k: int, level: float, upper: bool) -> float:
    """The best of a few tangent bounds (each rigorous) of the final interval's end over every
    completion; the tangents are taken where the last one was attained, starting from every
    remaining sample wrong (lower end) or right (upper end)."""
    grid = (np.arange(k + 1)[None, :] - fp_rest[:, None]) / k
    seen = (float(d_seen.sum()), float((d_seen * d_seen).sum()))
    t_q = _t_quantile(n, level)
    completion = grid[:, -1] if upper else grid[:, 0]
    best = math.inf if upper else -math.inf
    for _ in range(4):
        centre, var = _am_parts(seen[0] + completion.sum(), seen[1] + (completion**2).sum(), n, k)
        bound, completion = _completion_bound(grid, seen, (float(centre), math.sqrt(float(var))), n, k, t_q, upper)
        best = min(best, bound) if upper else max(best, bound)
    return best


def _settled(code: int, why: str, s: dict, rule: GateRule, n_all: int, fp_seen: np.ndarray, quant: np.ndarray,
             k: int) -> SampledGate:
    m = s["n"]
    rest = n_all - m
    where = f"settled after {m}/{n_all} items: every outcome of the remaining {rest} gives {_NAMES[code].upper()}"
    gate = GateResult(verdict=_NAMES[code], alpha=rule.alpha, reason=f"{where}; {why}",  # type: ignore[arg-type]
                      n_planned=n_all, stopped_early=m < n_all, **s)
    return SampledGate(gate, _extras(gate, code, rule, fp_seen, quant, k, (None, None)))


def _difference_settled(fp_all: np.ndarray, quant: np.ndarray, k: int, rule: GateRule) -> tuple[int, str] | None:
    m, n_all = quant.size, fp_all.size
    fp_total = int(fp_all.sum())
    lowest, highest = int(quant.sum()), int(quant.sum()) + k * (n_all - m)  # the quantized total's range

    def drop_of(quant_total: int) -> tuple[float, float]:
        diff = fp_total - quant_total
        return diff / (n_all * k), (diff / fp_total if fp_total else 0.0)

    if not rule.exceeds(*drop_of(lowest)):
        largest = drop_of(lowest)[0]
        return 0, f"the final drop is at most {largest:.3f}, within the allowed margin ({rule.margins_text()})"
    if not rule.exceeds(*drop_of(highest)):
        return None
    best = np.concatenate([(quant - fp_all[:m]) / k, (k - fp_all[m:]) / k])  # every remaining sample right
    if best.sum() >= 0:
        return None
    bound = _chernoff_p_bound(best)
    if bound * (1 + _SAFETY) >= rule.alpha:
        return None
    return 1, (f"the final drop is at least {drop_of(highest)[0]:.3f}, beyond the allowed margin "
               f"({rule.margins_text()}), with p <= {bound:.3g} < alpha {rule.alpha}")


def _noninferiority_settled(fp_all: np.ndarray, quant: np.ndarray, k: int, rule: GateRule) -> tuple[int, str] | None:
    m, n_all = quant.size, fp_all.size
    margin = rule.margin(int(fp_all.sum()) / (n_all * k))
    d_seen, fp_rest = (quant - fp_all[:m]) / k, fp_all[m:]
    level = 1 - rule.alpha
    worst_low = _interval_extreme(d_seen, fp_rest, n_all, k, level, upper=False)
    if -worst_low <= margin + TOLERANCE - _SAFETY:
        return 0, f"the final interval's worst end stays within the margin (a loss of at most {-worst_low:.3f})"
    best_high = _interval_extreme(d_seen, fp_rest, n_all, k, level, upper=True)
    if -best_high > margin + TOLERANCE + _SAFETY:
        return 1, f"the final interval lies wholly beyond the margin (a loss of at least {-best_high:.3f})"
    return None


def sampled_verdict_if_known(fp_scores_all: Any, quant_scores_so_far: Any, thresholds: Any,
                             k: int | None = None) -> SampledGate | None:
    """Sequential gate on ``k`` samples per item: the verdict over all planned items, if the
    items so far settle it for every outcome of the rest (conservatively at ``k > 1``: see the
    module doc), else None.  ``fp_scores_all`` covers all ``N`` planned items,
    ``quant_scores_so_far`` the first ``m``; the statistics are those of the ``m`` items seen
    (``n = m``, ``n_planned = N``, ``stopped_early = m < N``), as in
    :func:`pytest_qmr.gate.final_verdict_if_known`, which this is at ``k = 1``."""
    fp_all, quant, k, fp_samples, quant_samples = _paired_inputs(fp_scores_all, quant_scores_so_far, k, planned=True)
    rule = GateRule.of(thresholds)
    m, n_all = quant.size, fp_all.size
    if k == 1:
        gate = final_verdict_if_known([bool(v) for v in fp_all], [bool(v) for v in quant], thresholds)
        if gate is None:
            return None
        return SampledGate(gate, _extras(gate, _NAMES.index(gate.verdict), rule, fp_all[:m], quant, 1, (None, None)))
    if m == n_all:
        samples = (None if fp_samples is None else fp_samples[:m], quant_samples)
        return _evaluate_sampled(fp_all, quant, k, rule, samples)
    s, _, _ = _stats(fp_all[:m], quant, k, rule)
    if n_all < rule.min_items:
        return _settled(2, f"only {n_all} planned items, fewer than min_items {rule.min_items}; no verdict", s, rule,
                        n_all, fp_all[:m], quant, k)
    settle = _noninferiority_settled if rule.mode == "noninferiority" else _difference_settled
    found = settle(fp_all, quant, k, rule)
    if found is None:
        return None
    return _settled(found[0], found[1], s, rule, n_all, fp_all[:m], quant, k)
