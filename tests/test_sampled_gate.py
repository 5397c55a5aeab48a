"""The gate for k samples per item (pytest_qmr.sampled_gate): the exact sign-flip test, the
item-clustered interval, k = 1 as today's gate, sequential stopping, families, and what would
settle an inconclusive verdict."""

from __future__ import annotations

import gc
import itertools
from dataclasses import asdict

import numpy as np
import pytest
from scipy.special import expit, logit

from pytest_qmr.gate import (adjust_family, evaluate_gate, family_verdict, final_verdict_if_known, mcnemar_exact,
                             paired_delta_ci)
from pytest_qmr.sampled_gate import (SampledGate, as_counts, clustered_delta_ci, evaluate_sampled_gate,
                                     paired_interval, paired_p_value, sampled_verdict_if_known, settle_estimate,
                                     sign_flip_distribution, sign_flip_p)
from pytest_qmr.suite import Thresholds

DIFF = Thresholds(max_abs_drop=0.05, max_rel_drop=0.10, alpha=0.05, min_items=20)
NI = Thresholds(max_abs_drop=0.05, max_rel_drop=1.0, alpha=0.05, min_items=20, mode="noninferiority")


def _settings(rng) -> dict:
    """Random thresholds of both modes, in and out of a family."""
    family = str(rng.choice(["none", "holm", "bh"]))
    return {"max_abs_drop": float(rng.choice([0.0, 0.02, 0.05, 0.1, 0.3])),
            "max_rel_drop": float(rng.choice([0.0, 0.05, 0.1, 0.5, 1.0])),
            "alpha": float(rng.choice([0.01, 0.05, 0.2, 0.4])), "min_items": int(rng.integers(1, 30)),
            "mode": str(rng.choice(["difference", "noninferiority"])), "family": family,
            "family_size": int(rng.integers(1, 5))}


# --------------------------------------------------------------------------- the exact sign-flip test


def test_sign_flip_with_one_sample_per_item_is_mcnemar_exact():
    """d_i in {-1, 0, 1}: the sign-flip p is the exact McNemar p, for every b, c up to 60."""
    for b, c in itertools.product(range(61), repeat=2):
        expected = mcnemar_exact(b, c)
        assert sign_flip_p([-1] * b + [1] * c + [0] * 3) == pytest.approx(expected, rel=1e-12, abs=1e-300), (b, c)
        if (b + c) % 9 == 0:  # and the gate's p at k = 1 is McNemar's itself
            assert paired_p_value([1] * b + [0] * c, [0] * b + [1] * c, k=1) == expected


def test_sign_flip_matches_enumerating_every_sign():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, k = int(rng.integers(0, 11)), int(rng.integers(1, 9))
        values = rng.integers(-k, k + 1, size=n)
        sums = np.array([np.dot(signs, np.abs(values)) for signs in itertools.product([-1, 1], repeat=n)])
        expected = np.mean(np.abs(sums) >= abs(values.sum())) if n else 1.0
        assert sign_flip_p(values) == pytest.approx(expected, rel=1e-12), values
        support, prob = sign_flip_distribution(values)
        assert prob.sum() == pytest.approx(1.0) and np.allclose(prob, prob[::-1])
        assert np.all(prob[(support + abs(values).sum()) % 2 == 1] == 0)  # the parity of sum |v|


def test_sign_flip_is_an_exact_test_under_exchangeable_labels():
    """Over every sign pattern of fixed magnitudes (the null), P(p <= a) <= a for every a."""
    for magnitudes in ([1, 2, 3, 4, 5, 6, 7, 8], [8, 8, 1, 1, 1, 3, 0, 5], [2, 2, 2, 2, 6, 6, 6, 6]):
        p = np.array([sign_flip_p(np.array(signs) * magnitudes)
                      for signs in itertools.product([-1, 1], repeat=len(magnitudes))])
        for a in (0.01, 0.05, 0.1, 0.2, 0.5):
            assert np.mean(p <= a) <= a + 1e-12, (magnitudes, a)


def test_sign_flip_handles_large_benchmarks_with_tiny_p():
    rng = np.random.default_rng(1)
    k = 8
    fp = rng.integers(4, k + 1, size=2000)
    quant = np.maximum(fp - rng.integers(0, 3, size=2000), 0)  # loses up to 2 samples on many items
    p = paired_p_value(fp, quant, k)
    assert 0 <= p < 1e-100
    assert paired_p_value(fp, fp, k) == 1.0


# --------------------------------------------------------------------------- k = 1 is today's gate


def test_one_sample_per_item_is_todays_gate_field_for_field():
    rng = np.random.default_rng(2)
    for trial in range(100):
        n = int(rng.integers(0, 80))
        fp = rng.random(n) < rng.uniform(0.1, 0.95)
        quant = np.where(rng.random(n) < rng.uniform(0, 0.4), rng.random(n) < 0.5, fp)
        thresholds = _settings(rng) if trial % 4 else Thresholds(mode=str(rng.choice(["difference",
                                                                                      "noninferiority"])))
        expected = evaluate_gate(fp.tolist(), quant.tolist(), thresholds)
        for fp_in, quant_in, k in ((fp.tolist(), quant.tolist(), None), (fp.astype(int), quant.astype(int), 1),
                                   (fp[:, None].astype(int), quant[:, None].astype(int), None)):
            result = evaluate_sampled_gate(fp_in, quant_in, thresholds, k=k)
            assert isinstance(result, SampledGate)
            assert asdict(result.gate) == asdict(expected)
            assert result.extras["test"] == "mcnemar_exact" and result.extras["samples_per_item"] == 1
        assert paired_interval(fp.astype(int), quant.astype(int), 1, 0.9) == paired_delta_ci(
            expected.fp_only, expected.quant_only, n, int(fp.sum()), 0.9)


def test_one_sample_per_item_sequential_is_todays_sequential():
    rng = np.random.default_rng(3)
    for _ in range(60):
        n = int(rng.integers(1, 40))
        fp = (rng.random(n) < 0.7).tolist()
        quant = [bool(f and rng.random() > rng.uniform(0, 0.6)) for f in fp]
        thresholds = _settings(rng)
        for m in range(0, n + 1, 5):
            expected = final_verdict_if_known(fp, quant[:m], thresholds)
            result = sampled_verdict_if_known(fp, quant[:m], thresholds)
            assert (result is None) == (expected is None)
            if result is not None:
                assert asdict(result.gate) == asdict(expected)


def test_replicated_answers_give_todays_difference_verdicts():
    """Each answer repeated k times: the per-item differences are k * {-1, 0, 1}, so the k-sample
    gate sees today's table, test and rule (the interval differs, so difference mode only)."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        n, k = int(rng.integers(1, 70)), int(rng.integers(2, 9))
        fp = rng.random(n) < rng.uniform(0.2, 0.9)
        quant = np.where(rng.random(n) < rng.uniform(0, 0.5), rng.random(n) < 0.5, fp)
        thresholds = {**_settings(rng), "mode": "difference"}
        today = evaluate_gate(fp.tolist(), quant.tolist(), thresholds)
        result = evaluate_sampled_gate(k * fp.astype(int), k * quant.astype(int), thresholds, k=k).gate
        assert result.verdict == today.verdict and result.exceeds == today.exceeds
        assert (result.fp_only, result.quant_only, result.n) == (today.fp_only, today.quant_only, today.n)
        assert (result.fp_acc, result.quant_acc, result.delta, result.rel_drop) == (
            today.fp_acc, today.quant_acc, today.delta, today.rel_drop)
        assert result.p_value == pytest.approx(today.p_value, rel=1e-10, abs=1e-300)
        assert result.alpha == today.alpha and result.family_size == today.family_size


# --------------------------------------------------------------------------- verdicts with k samples


def _items(rng, n: int, k: int, fp_acc: float, loss: float, agree: float = 0.8):
    """Per-item correct counts of FP and of a quantized model whose own per-item accuracy is FP's
    less ``loss`` (plus noise); each of its samples copies FP's with probability ``agree``."""
    p_fp = rng.beta(2 * fp_acc, 2 * (1 - fp_acc), size=n)
    p_q = np.clip(p_fp - loss + rng.normal(0, 0.05, size=n), 0, 1)
    fp = rng.random((n, k)) < p_fp[:, None]
    quant = np.where(rng.random((n, k)) < agree, fp, rng.random((n, k)) < p_q[:, None])
    return fp.sum(axis=1), quant.sum(axis=1)


def test_verdicts_follow_the_gates_rule_with_k_samples():
    """The rule on the returned statistics: difference mode by the drop, the margins and p;
    noninferiority by the interval (which is clustered_delta_ci) against the margin."""
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(300):
        n, k = int(rng.integers(1, 120)), int(rng.choice([2, 4, 8]))
        fp, quant = _items(rng, n, k, rng.uniform(0.3, 0.9), rng.uniform(-0.02, 0.2))
        thresholds = _settings(rng)
        gate = evaluate_sampled_gate(fp, quant, thresholds, k=k).gate
        seen.add((gate.mode, gate.verdict))
        alpha = thresholds["alpha"] / (thresholds["family_size"] if thresholds["family"] != "none" else 1)
        assert gate.alpha == alpha and gate.ci_level == round(1 - alpha, 6) and gate.n == n
        low, high = clustered_delta_ci(fp, quant, k, 1 - alpha)
        assert gate.delta_ci == [round(float(low), 6), round(float(high), 6)]
        assert gate.p_value == sign_flip_p(quant - fp)
        assert gate.delta == pytest.approx((quant.sum() - fp.sum()) / (n * k))
        if n < thresholds["min_items"]:
            assert gate.verdict == "inconclusive" and "min_items" in gate.reason
        elif gate.mode == "difference":
            expected = "pass" if not gate.exceeds else "fail" if gate.p_value < alpha else "inconclusive"
            assert gate.verdict == expected
        else:
            margin = (min(thresholds["max_abs_drop"], thresholds["max_rel_drop"] * gate.fp_acc) if gate.fp_acc
                      else thresholds["max_abs_drop"])
            expected = ("pass" if -low <= margin + 1e-9 else "fail" if -high > margin + 1e-9 else "inconclusive")
            assert gate.verdict == expected
    assert len(seen) == 6, seen  # both modes reached all three verdicts


@pytest.mark.parametrize("fp_acc, loss, thresholds, verdict", [
    (0.7, 0.0, DIFF, "pass"),
    (0.7, 0.5, DIFF, "fail"),
    (0.7, 0.0, NI, "pass"),
    (0.7, 0.5, NI, "fail"),
], ids=["copy-difference", "broken-difference", "copy-noninferiority", "broken-noninferiority"])
def test_clear_cases(fp_acc, loss, thresholds, verdict):
    rng = np.random.default_rng(6)
    fp, quant = _items(rng, 300, 4, fp_acc, loss, agree=1.0 if loss == 0 else 0.5)
    result = evaluate_sampled_gate(fp, quant, thresholds, k=4)
    assert result.gate.verdict == verdict, result.gate.summary()
    assert result.extras["test"] == "sign_flip_exact" and result.extras["samples_per_item"] == 4
    assert result.extras["items_needed"] is None and "\n" not in result.gate.reason


def test_the_interval_does_not_collapse_when_no_item_differs():
    """A perfect copy on an easy benchmark: every d_i is 0, so sd(d_i) is 0 and the plain t
    interval is [0, 0]; the Agresti-Min pseudo-items keep about a rule-of-three width."""
    fp = np.full(30, 4)
    low, high = clustered_delta_ci(fp, fp, 4, 0.95)
    assert low == pytest.approx(-high) and 0.02 < high < 0.05
    assert evaluate_sampled_gate(fp, fp, NI, k=4).gate.verdict == "pass"
    assert evaluate_sampled_gate(fp, fp, NI.model_copy(update={"max_abs_drop": 0.02}), k=4).gate.verdict == (
        "inconclusive")


def test_samples_as_arrays_or_counts():
    rng = np.random.default_rng(7)
    fp_samples = (rng.random((50, 4)) < 0.7).astype(int)
    quant_samples = np.where(rng.random((50, 4)) < 0.8, fp_samples, 0)
    from_arrays = evaluate_sampled_gate(fp_samples, quant_samples, DIFF)
    from_counts = evaluate_sampled_gate(fp_samples.sum(1), quant_samples.sum(1), DIFF, k=4)
    assert asdict(from_arrays.gate) == asdict(from_counts.gate)
    # the arrays pair the samples by seed: the within-item variance of the copies is seen to be smaller
    assert from_arrays.extras["var_within"] < from_counts.extras["var_within"]
    assert as_counts(fp_samples.astype(bool))[1] == 4
    with pytest.raises(ValueError, match="need k"):
        evaluate_sampled_gate([3, 2], [1, 2], DIFF)
    with pytest.raises(ValueError, match="0..k"):
        evaluate_sampled_gate([3, 5], [1, 2], DIFF, k=4)
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_sampled_gate([3, 2], [1], DIFF, k=4)
    with pytest.raises(ValueError, match="columns"):
        evaluate_sampled_gate(fp_samples, quant_samples[:, :2], DIFF)
    with pytest.raises(TypeError):
        evaluate_sampled_gate(["yes"], ["no"], DIFF, k=2)


# --------------------------------------------------------------------------- what would settle it


def test_an_inconclusive_verdict_says_what_would_settle_it():
    rng = np.random.default_rng(8)
    fp, quant = _items(rng, 40, 4, 0.7, 0.08, agree=0.3)
    result = evaluate_sampled_gate(fp, quant, DIFF, k=4)
    gate, extras = result.gate, result.extras
    assert gate.verdict == "inconclusive", gate.summary()
    items, samples = extras["items_needed"], extras["samples_needed"]
    assert items > 40 and samples > 4
    assert gate.reason.endswith(f"; about {items} items (or {samples} samples per item on these 40 items) "
                                "would likely settle it")
    assert extras["var_between"] >= 0 and extras["var_within"] > 0

    noninferior = evaluate_sampled_gate(fp, quant, NI.model_copy(update={"max_abs_drop": 0.1}), k=4)
    assert noninferior.gate.verdict == "inconclusive" and "would likely settle it" in noninferior.gate.reason

    today = evaluate_sampled_gate((fp > 2).tolist(), (quant > 2).tolist(), NI)  # k = 1: today's reason
    if today.gate.verdict == "inconclusive":
        assert today.extras["items_needed"] > 40 and today.extras["samples_needed"] is None
    assert evaluate_sampled_gate(fp[:10], quant[:10], DIFF, k=4).extras["items_needed"] == DIFF.min_items


def test_settle_estimate_separates_items_from_samples():
    # the between-item part alone exceeds what 80 items may have: more samples per item cannot do it
    assert settle_estimate(0.02, 0.05, 80, 4, var_total=0.05, var_within=0.01)[1] is None
    items, samples = settle_estimate(0.05, 0.05, 80, 4, var_total=0.05, var_within=0.04)
    # (z_.975 + z_.8)^2 = 7.849: items 7.849 * 0.05 / 0.05^2 = 157.0; samples 4 * 0.04 / (80 * 0.05^2 / 7.849 - 0.01)
    assert items == 157 and samples == 11
    assert settle_estimate(0.0, 0.05, 80, 4, 0.05, 0.04) == (None, None)


def _population(rng, n: int, k: int):
    """A benchmark drawn from a population of items on which quantization loses 0.08 on average."""
    p_fp = rng.beta(3, 1.5, size=n)
    p_q = np.clip(p_fp - 0.08 + rng.normal(0, 0.05, size=n), 0, 1)
    return rng.binomial(k, p_fp), rng.binomial(k, p_q)


def test_the_suggested_items_or_samples_do_settle_it_mostly():
    """Pilots of 30 items x 4 samples left inconclusive: fresh runs of the suggested size from the
    same population (the items at k = 4, or the samples per item on 30 items) settle it (FAIL)
    most of the time.  The suggestion aims at 80% power at each pilot's own effect, so pilots
    that overestimate the loss under-size it: pooled over four pilots, more than half settle."""
    rng = np.random.default_rng(10)
    pilots = []
    while len(pilots) < 4:
        pilot = evaluate_sampled_gate(*_population(rng, 30, 4), DIFF, k=4)
        if pilot.gate.verdict == "inconclusive" and pilot.extras["samples_needed"] is not None:
            pilots.append(pilot.extras)
    for size in ("items_needed", "samples_needed"):
        settled = []
        for extras in pilots:
            n, k = (extras["items_needed"], 4) if size == "items_needed" else (30, extras["samples_needed"])
            settled += [evaluate_sampled_gate(*_population(rng, n, k), DIFF, k=k).gate.verdict == "fail"
                        for _ in range(25)]
        assert np.mean(settled) > 0.5, (size, pilots, np.mean(settled))


# --------------------------------------------------------------------------- sequential, k > 1

SMALL = {"max_abs_drop": 0.1, "max_rel_drop": 0.2, "alpha": 0.3, "min_items": 3}


def test_sequential_brute_force_every_completion():
    """Every completion of every prefix of small plans (k = 2): a settled verdict is that of all
    completions; the conservative rule still settles PASS and FAIL in both modes."""
    rng = np.random.default_rng(10)
    k = 2
    settled = set()
    for trial in range(24):
        n = 5
        thresholds = {**SMALL, "mode": "noninferiority", "max_abs_drop": [0.6, 0.15][trial % 4 // 2],
                      "max_rel_drop": 1.0} if trial % 2 else {**SMALL, "mode": "difference"}
        fp = rng.binomial(k, rng.uniform(0.5, 1.0), size=n)
        quant = np.maximum(fp - rng.binomial(k, rng.uniform(0, 1), size=n), 0)
        for m in range(2, n + 1):
            result = sampled_verdict_if_known(fp, quant[:m], thresholds, k=k)
            if result is None:
                continue
            outcomes = {evaluate_sampled_gate(fp, np.concatenate([quant[:m], tail]), thresholds, k=k).gate.verdict
                        for tail in itertools.product(range(k + 1), repeat=n - m)}
            assert outcomes == {result.gate.verdict}, (fp, quant[:m], thresholds, outcomes)
            assert result.gate.n == m and result.gate.n_planned == n and result.gate.stopped_early == (m < n)
            if m < n:
                settled.add((thresholds["mode"], result.gate.verdict))
    assert {("difference", "pass"), ("difference", "fail"), ("noninferiority", "pass"),
            ("noninferiority", "fail")} <= settled, settled


def test_sequential_never_disagrees_with_the_full_run():
    rng = np.random.default_rng(11)
    stops = {"pass": 0, "fail": 0}
    for trial in range(40):
        n, k = int(rng.integers(30, 90)), int(rng.choice([2, 4, 8]))
        fp, quant = _items(rng, n, k, rng.uniform(0.4, 0.9), rng.choice([0.0, 0.02, 0.3, 0.6]), agree=0.3)
        thresholds = {"max_abs_drop": float(rng.choice([0.05, 0.15, 0.4])), "max_rel_drop": 1.0,
                      "alpha": 0.05, "min_items": 20, "mode": "noninferiority" if trial % 2 else "difference"}
        full = evaluate_sampled_gate(fp, quant, thresholds, k=k).gate.verdict
        for m in range(0, n, 3):
            result = sampled_verdict_if_known(fp, quant[:m], thresholds, k=k)
            if result is not None:
                assert result.gate.verdict == full, (trial, m, result.gate.reason)
                stops[full] += 1
                assert result.extras["items_needed"] is None
    assert all(stops.values()), stops


def test_sequential_stops_a_broken_model_early():
    rng = np.random.default_rng(12)
    fp, _ = _items(rng, 400, 4, 0.7, 0.0)
    quant = np.zeros_like(fp)  # broken: every sample wrong
    for m in range(0, 401, 10):
        result = sampled_verdict_if_known(fp, quant[:m], DIFF, k=4)
        if result is not None:
            break
    assert result is not None and result.gate.verdict == "fail" and result.gate.stopped_early
    # as at k = 1, it stops once even all the rest right leaves the drop beyond the margin
    assert result.gate.n < 200 and f"{result.gate.n}/400" in result.gate.summary()
    assert evaluate_sampled_gate(fp, quant, DIFF, k=4).gate.verdict == "fail"


def test_sequential_edges():
    fp = np.full(30, 3)
    assert sampled_verdict_if_known(fp, fp[:10], DIFF, k=4) is None  # the rest could all be lost
    full = sampled_verdict_if_known(fp, fp, DIFF, k=4)
    assert full is not None and not full.gate.stopped_early
    assert asdict(full.gate) == asdict(evaluate_sampled_gate(fp, fp, DIFF, k=4).gate)
    few = sampled_verdict_if_known(fp[:10], [], DIFF, k=4)
    assert few is not None and few.gate.verdict == "inconclusive" and few.gate.n == 0
    with pytest.raises(ValueError, match="more quantized"):
        sampled_verdict_if_known(fp[:2], fp[:3], DIFF, k=4)


# --------------------------------------------------------------------------- many cells


def test_family_adjustment_uses_the_sampled_p_values_unchanged():
    """Three cells gated at alpha / 3: one broken, one a copy, and one that lost a sample on 17
    items and gained one on 5 of 40 (k = 4): drop 0.075, p = McNemar(17, 5) = 0.0169, just above
    0.05 / 3.  Holm's (and BH's) adjusted p then fails it, as for a one-sample cell."""
    thresholds = {"max_abs_drop": 0.05, "max_rel_drop": 0.10, "alpha": 0.05, "min_items": 20, "family": "holm",
                  "family_size": 3}
    fp = np.full(40, 3)
    cells = {"broken": (fp, np.zeros(40, dtype=int)), "copy": (fp, fp),
             "lossy": (fp, np.array([2] * 17 + [4] * 5 + [3] * 18))}
    gates = {name: evaluate_sampled_gate(*cell, thresholds, k=4).gate for name, cell in cells.items()}
    assert all(g.alpha == pytest.approx(0.05 / 3) for g in gates.values())
    lossy = gates["lossy"]
    assert lossy.verdict == "inconclusive" and lossy.p_value == pytest.approx(mcnemar_exact(17, 5), rel=1e-12)
    assert (gates["broken"].verdict, gates["copy"].verdict) == ("fail", "pass")
    gc.freeze()  # statsmodels' multipletests calls gc.collect(): cheap with the heap frozen (as in test_gate_interval)
    try:
        for family in ("holm", "bh"):
            adjusted = dict(zip(gates, adjust_family([g.p_value for g in gates.values()], family), strict=True))
            verdicts = {name: family_verdict(g, adjusted[name], 0.05) for name, g in gates.items()}
            assert verdicts == {"broken": "fail", "copy": "pass", "lossy": "fail"}, (family, adjusted)
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------------- coverage and false alarms

GRID = [(n, k) for n in (30, 80, 200) for k in (1, 4, 8)]
REPLICATES = 800
ALPHA = 0.05
# (FP accuracy Beta(a, b), logit noise of the quantized model, seed-copy probability): a mixed
# benchmark (many items always or never solved), and an easy one with a near copy of FP, where
# few items differ (the plain t interval collapses there).
SCENARIOS = {"mixed": (0.6, 0.4, 0.7, 0.5), "easy-near-copy": (10.0, 0.3, 0.5, 0.9)}


def _fixed_items(rng, n: int, scenario: str, delta: float):
    """One fixed set of n items: FP's per-item accuracy, and the quantized model's, a logit shift
    plus noise, solved so that the true delta, mean_i (p_q,i - p_fp,i), is ``delta`` exactly."""
    a, b, noise, copy = SCENARIOS[scenario]
    p_fp = np.clip(rng.beta(a, b, size=n), 1e-4, 1 - 1e-4)
    offsets = logit(p_fp) + noise * rng.standard_normal(n)
    low, high = -15.0, 15.0
    for _ in range(100):  # bisection: the mean difference grows with the shift
        shift = (low + high) / 2
        if np.mean(copy * p_fp + (1 - copy) * expit(offsets + shift) - p_fp) < delta:
            low = shift
        else:
            high = shift
    own = expit(offsets + (low + high) / 2)  # the quantized model's accuracy where it does not copy FP
    assert np.mean((1 - copy) * (own - p_fp)) == pytest.approx(delta, abs=1e-9)
    return p_fp, own, copy


def _answers(rng, p_fp, own, copy, k: int, replicates: int):
    """Replicates of the answers (items fixed): per item k FP samples and k quantized samples,
    each quantized sample a copy of FP's under the same seed with probability ``copy``."""
    fp = rng.random((replicates, p_fp.size, k)) < p_fp[:, None]
    quant = np.where(rng.random(fp.shape) < copy, fp, rng.random(fp.shape) < own[:, None])
    return fp.sum(axis=2), quant.sum(axis=2)


def _each(fp, quant, keys, fn):
    """``fn(fp[i], quant[i])`` for every replicate i, computed once per distinct key row."""
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return np.asarray([fn(fp[i], quant[i]) for i in first])[inverse.reshape(-1)]


def measure(scenario: str, n: int, k: int, replicates: int = REPLICATES, seed: int = 0) -> tuple[float, float]:
    """(coverage of the 95% interval at true delta 0 and -0.03, pooled; the test's false-alarm
    rate, p < 0.05, at true delta 0) of the gate's interval and p at one grid point."""
    rng = np.random.default_rng([seed, n, k, len(scenario)])
    covered, alarms = [], []
    for delta in (0.0, -0.03):
        fp, quant = _answers(rng, *_fixed_items(rng, n, scenario, delta), k, replicates)
        # at k = 1 both depend on the 2x2 table only (b, c, FP right); at k > 1 on the sorted differences
        keys = (np.stack([(fp > quant).sum(1), (quant > fp).sum(1), fp.sum(1)], axis=1) if k == 1
                else np.sort(quant - fp, axis=1))
        if k == 1:
            low, high = _each(fp, quant, keys, lambda f, q: paired_interval(f, q, 1, 0.95)).T
        else:
            low, high = clustered_delta_ci(fp, quant, k, 0.95)
        covered.append((low <= delta + 1e-12) & (delta <= high + 1e-12))
        if delta == 0:
            alarms = _each(fp, quant, keys, lambda f, q: paired_p_value(f, q, k)) < ALPHA
    return float(np.mean(covered)), float(np.mean(alarms))


def test_interval_coverage_and_false_alarms_over_the_grid():
    """n 30/80/200 x k 1/4/8, two scenarios, the items fixed and only the answers resampled: the
    95% interval covers the true delta at least 94% of the time at every point, and the test's
    false-alarm rate is at most alpha plus two Monte Carlo standard errors (sqrt(.05 * .95 / 800)
    = 0.008: a test at exactly alpha would pass this at a point 98% of the time) at every point,
    and at most alpha pooled over the grid (standard error 0.0016)."""
    table = {(scenario, n, k): measure(scenario, n, k) for scenario in SCENARIOS for n, k in GRID}
    slack = 2 * np.sqrt(ALPHA * (1 - ALPHA) / REPLICATES)
    coverage = {point: value[0] for point, value in table.items()}
    alarms = {point: value[1] for point, value in table.items()}
    assert min(coverage.values()) >= 0.94, coverage
    assert max(alarms.values()) <= ALPHA + slack, alarms
    assert np.mean(list(alarms.values())) <= ALPHA, alarms
