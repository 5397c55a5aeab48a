"""The paired gate: exact McNemar, the verdict rule, and sequential early stopping."""

from __future__ import annotations

import itertools
import time
from fractions import Fraction
from functools import lru_cache
from math import comb

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from pytest_qmr.gate import evaluate_gate, final_verdict_if_known, mcnemar_exact
from pytest_qmr.records import GateResult
from pytest_qmr.suite import Thresholds

DEFAULT = Thresholds()  # abs 0.05, rel 0.10, alpha 0.05, min_items 20


def paired(both: int, fp_only: int, quant_only: int, neither: int, seed: int | None = 0):
    """Correctness vectors with the given 2x2 counts (shuffled in the same order)."""
    fp = [True] * both + [True] * fp_only + [False] * quant_only + [False] * neither
    quant = [True] * both + [False] * fp_only + [True] * quant_only + [False] * neither
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(fp))
        fp, quant = [fp[i] for i in order], [quant[i] for i in order]
    return fp, quant


# --------------------------------------------------------------------------- McNemar


EDGE_TABLES = [(0, 0), (1, 0), (0, 1), (1, 1), (5, 5), (0, 25), (25, 0), (10, 2), (2, 10), (1000, 900),
               (0, 2000), (3, 1997)]


@pytest.mark.parametrize("b, c", EDGE_TABLES)
def test_mcnemar_edge_cases_match_statsmodels(b, c):
    expected = mcnemar(np.array([[7, b], [c, 3]]), exact=True).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_mcnemar_random_tables_match_statsmodels():
    rng = np.random.default_rng(1234)
    for _ in range(500):
        scale = int(rng.choice([5, 30, 200, 1500]))
        a, b, c, d = (int(v) for v in rng.integers(0, scale, size=4))
        expected = mcnemar(np.array([[a, b], [c, d]]), exact=True).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-300), (b, c)


def test_compare_is_the_one_paired_comparison_the_gate_uses():
    from pytest_qmr.gate import compare, evaluate_gate, mcnemar_exact

    rng = np.random.default_rng(3)
    fp, quant = rng.random(60) < 0.7, rng.random(60) < 0.5
    paired = compare(fp.tolist(), quant.tolist())
    assert paired.first_only == int((fp & ~quant).sum()) and paired.second_only == int((~fp & quant).sum())
    assert paired.p_value == mcnemar_exact(paired.first_only, paired.second_only)
    gate = evaluate_gate(fp.tolist(), quant.tolist(), Thresholds())
    assert (gate.fp_only, gate.quant_only, gate.p_value) == (paired.first_only, paired.second_only, paired.p_value)
    with pytest.raises(ValueError, match="same items"):
        compare([True, False], [True])


def test_mcnemar_no_discordant_pairs_is_one_and_symmetric():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(7, 3) == mcnemar_exact(3, 7)
    assert 0.0 <= mcnemar_exact(200, 0) < 1e-50
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


# --------------------------------------------------------------------------- verdicts


def test_identical_copy_passes():
    fp, _ = paired(120, 0, 0, 80)
    result = evaluate_gate(fp, list(fp), DEFAULT)
    assert isinstance(result, GateResult)
    assert result.verdict == "pass"
    assert result.delta == 0 and result.fp_only == result.quant_only == 0 and result.p_value == 1.0
    assert result.n == result.n_planned == 200 and not result.stopped_early


def test_clearly_broken_model_fails():
    fp, _ = paired(120, 0, 0, 80)
    result = evaluate_gate(fp, [False] * len(fp), DEFAULT)
    assert result.verdict == "fail"
    assert result.fp_acc == 0.6 and result.quant_acc == 0.0 and result.delta == pytest.approx(-0.6)
    assert result.rel_drop == 1.0 and result.fp_only == 120 and result.quant_only == 0
    assert result.p_value < 1e-30
    assert "significant" in result.reason and "\n" not in result.reason


def test_small_noisy_difference_within_margin_passes():
    # 4 lost, 2 gained of 200: drop 0.01, rel 1.7% -> within the margin
    fp, quant = paired(114, 4, 2, 80)
    result = evaluate_gate(fp, quant, DEFAULT)
    assert result.verdict == "pass"
    assert result.delta == pytest.approx(-0.01)
    assert "within the allowed margin" in result.reason


def test_drop_beyond_margin_but_not_significant_is_inconclusive():
    # 100 items, 8 lost, 2 gained: drop 0.06 > 0.05, p = 0.109 >= 0.05
    fp, quant = paired(50, 8, 2, 40)
    result = evaluate_gate(fp, quant, DEFAULT)
    assert result.p_value == pytest.approx(mcnemar(np.array([[50, 8], [2, 40]]), exact=True).pvalue)
    assert result.p_value > 0.05
    assert result.verdict == "inconclusive"
    assert "not significant" in result.reason


def test_drop_exactly_at_margin_passes():
    # drop 5/100 = 0.05 exactly, rel 5/60 = 8.3%: not beyond the margin
    fp, quant = paired(55, 5, 0, 40)
    assert evaluate_gate(fp, quant, DEFAULT).verdict == "pass"
    fp, quant = paired(54, 6, 0, 40)  # one more item lost: 0.06, p = 0.031 -> fail
    assert evaluate_gate(fp, quant, DEFAULT).verdict == "fail"


def test_relative_drop_alone_can_fail():
    # FP acc 0.2; drop 0.04 is within abs 0.05 but 20% relative; p = 2 / 2**8
    fp, quant = paired(32, 8, 0, 160)
    result = evaluate_gate(fp, quant, DEFAULT)
    assert result.delta == pytest.approx(-0.04) and result.rel_drop == pytest.approx(0.2)
    assert result.verdict == "fail"


def test_improvement_passes():
    fp, quant = paired(50, 0, 30, 20)
    result = evaluate_gate(fp, quant, DEFAULT)
    assert result.verdict == "pass" and result.delta == pytest.approx(0.3) and result.rel_drop < 0


def test_too_few_items_is_inconclusive_even_when_broken():
    fp, _ = paired(10, 0, 0, 5)
    result = evaluate_gate(fp, [False] * 15, DEFAULT)
    assert result.verdict == "inconclusive" and "min_items" in result.reason


def test_fp_accuracy_zero_uses_abs_drop_only():
    result = evaluate_gate([False] * 50, [False] * 50, DEFAULT)
    assert result.verdict == "pass" and result.rel_drop == 0.0


def test_thresholds_as_dict_or_object():
    fp, quant = paired(54, 6, 0, 40)
    as_dict = {"max_abs_drop": 0.05, "max_rel_drop": 0.10, "alpha": 0.05, "min_items": 20}
    assert evaluate_gate(fp, quant, as_dict) == evaluate_gate(fp, quant, DEFAULT)


def test_mismatched_lengths_and_non_bools_rejected():
    with pytest.raises(ValueError):
        evaluate_gate([True, False], [True], DEFAULT)
    with pytest.raises(TypeError):
        evaluate_gate(["yes"], ["no"], DEFAULT)


def test_summary_is_one_line():
    fp, quant = paired(50, 8, 2, 40)
    assert "\n" not in evaluate_gate(fp, quant, DEFAULT).summary()


# --------------------------------------------------------------------------- sequential


SMALL = Thresholds(max_abs_drop=0.1, max_rel_drop=0.2, alpha=0.2, min_items=3, sequential=True)
STRICT = Thresholds(max_abs_drop=0.0, max_rel_drop=0.0, alpha=0.45, min_items=4, sequential=True)


def reference_verdict(fp, quant, t) -> str:
    """The documented rule in exact rational arithmetic (independent of gate.py)."""
    b = sum(f and not q for f, q in zip(fp, quant, strict=True))
    c = sum(q and not f for f, q in zip(fp, quant, strict=True))
    return _reference_rule(len(fp), b, c, sum(fp), t.max_abs_drop, t.max_rel_drop, t.alpha, t.min_items)


@lru_cache(maxsize=None)
def _reference_rule(n, b, c, fp_right, max_abs, max_rel, alpha, min_items) -> str:
    if n < min_items:
        return "inconclusive"
    drop = Fraction(b - c, n)
    rel = Fraction(b - c, fp_right) if fp_right else Fraction(0)
    if not (drop > Fraction(str(max_abs)) or rel > Fraction(str(max_rel))):
        return "pass"
    m = b + c
    p = min(Fraction(1), 2 * Fraction(sum(comb(m, i) for i in range(min(b, c) + 1)), 2**m))
    return "fail" if p < Fraction(str(alpha)) else "inconclusive"


def test_reference_rule_agrees_with_evaluate_gate():
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        fp = [bool(v) for v in rng.random(n) < 0.6]
        quant = [bool(v) for v in rng.random(n) < rng.uniform(0.1, 0.7)]
        for t in (SMALL, STRICT, DEFAULT):
            assert evaluate_gate(fp, quant, t).verdict == reference_verdict(fp, quant, t)


def _verdicts_of_all_completions(fp_all, quant_prefix, thresholds):
    rest = len(fp_all) - len(quant_prefix)
    return {
        reference_verdict(fp_all, list(quant_prefix) + list(tail), thresholds)
        for tail in itertools.product([False, True], repeat=rest)
    }


def test_sequential_matches_brute_force_on_small_n():
    """Enumerate every completion of every prefix: a returned verdict is the verdict of all
    completions, and None means some completions disagree (so it stops as soon as it can)."""
    rng = np.random.default_rng(7)
    settled_counts = {"pass": 0, "fail": 0, "inconclusive": 0}
    for trial in range(250):
        n = int(rng.integers(1, 11))
        fp_all = [bool(v) for v in rng.random(n) < rng.uniform(0.2, 0.9)]
        broken = rng.uniform(0, 1)
        quant_all = [bool(f and rng.random() > broken) or bool(not f and rng.random() < 0.15) for f in fp_all]
        thresholds = SMALL if trial % 3 else STRICT
        for k in range(n + 1):
            prefix = quant_all[:k]
            outcomes = _verdicts_of_all_completions(fp_all, prefix, thresholds)
            result = final_verdict_if_known(fp_all, prefix, thresholds)
            if result is None:
                assert len(outcomes) > 1, (fp_all, prefix, outcomes)  # exact, not just safe
            else:
                assert outcomes == {result.verdict}, (fp_all, prefix, outcomes, result)
                assert result.n == k and result.n_planned == n and result.stopped_early == (k < n)
                settled_counts[result.verdict] += 1
                if k:  # the k-item statistics are reported
                    seen = evaluate_gate(fp_all[:k], prefix, thresholds)
                    assert (result.fp_only, result.quant_only) == (seen.fp_only, seen.quant_only)
                    assert result.fp_acc == seen.fp_acc and result.p_value == seen.p_value
    assert all(settled_counts.values()), settled_counts  # every verdict kind was exercised


def test_sequential_full_run_equals_evaluate_gate():
    fp, quant = paired(50, 8, 2, 40, seed=3)
    result = final_verdict_if_known(fp, quant, DEFAULT)
    assert result is not None and not result.stopped_early
    assert result.verdict == evaluate_gate(fp, quant, DEFAULT).verdict


def test_sequential_stops_early_for_a_broken_model():
    fp, _ = paired(240, 0, 0, 160, seed=11)
    quant = [False] * len(fp)
    for k in range(0, len(fp) + 1, 10):
        result = final_verdict_if_known(fp, quant[:k], DEFAULT)
        if result is not None:
            break
    assert result is not None and result.stopped_early and result.n < 200
    assert result.verdict == "fail" == evaluate_gate(fp, quant, DEFAULT).verdict
    assert result.n_planned == 400 and f"{result.n}/400" in result.summary()


def test_sequential_does_not_stop_while_undecided():
    fp, quant = paired(240, 0, 0, 160, seed=11)
    # a perfect copy cannot PASS early: the rest could still all be lost
    assert final_verdict_if_known(fp, quant[:100], DEFAULT) is None
    assert final_verdict_if_known(fp, [], DEFAULT) is None


def test_sequential_too_few_planned_items_is_settled_at_once():
    result = final_verdict_if_known([True] * 10, [], DEFAULT)
    assert result is not None and result.verdict == "inconclusive" and result.n == 0


def test_sequential_rejects_more_results_than_planned():
    with pytest.raises(ValueError):
        final_verdict_if_known([True], [True, False], DEFAULT)


def test_sequential_speed_n_2000():
    # first 1000: FP right, quantized wrong; the remaining 1000 leave a 501 x 501 grid, all FAIL
    fp_all = [True] * 1000 + [True, False] * 500
    quant = [False] * 1000
    start = time.perf_counter()
    result = final_verdict_if_known(fp_all, quant, DEFAULT)
    full_grid = time.perf_counter() - start
    assert result is not None and result.verdict == "fail"
    assert full_grid < 1.0, full_grid

    rng = np.random.default_rng(0)
    fp_all = [bool(v) for v in rng.random(2000) < 0.6]
    start = time.perf_counter()
    for k in range(0, 2000, 100):
        final_verdict_if_known(fp_all, fp_all[:k], DEFAULT)
    assert (time.perf_counter() - start) / 20 < 0.1
