"""Gate v2, first part: the confidence interval of the paired difference on every cell, and the
non-inferiority mode that judges it (pytest_qmr.gate's module doc has the rules)."""

from __future__ import annotations

import gc
import itertools
import json

import numpy as np
import pytest
from scipy.special import gammaln, xlogy

from pytest_qmr.gate import _drop_ci, evaluate_gate, final_verdict_if_known, paired_delta_ci
from pytest_qmr.suite import Thresholds

NI = Thresholds(max_abs_drop=0.10, max_rel_drop=1.0, alpha=0.05, min_items=10, mode="noninferiority")


def paired(n_both: int, n_fp_only: int, n_quant_only: int, n_neither: int) -> tuple[list[bool], list[bool]]:
    fp = [True] * (n_both + n_fp_only) + [False] * (n_quant_only + n_neither)
    quant = [True] * n_both + [False] * n_fp_only + [True] * n_quant_only + [False] * n_neither
    return fp, quant


def test_published_example_cavo_2012():
    """Fagerland, Lydersen & Laake, *Statistical Analysis of Contingency Tables* (2017), ch. 8:
    complete response before/after consolidation therapy (Cavo et al. 2012), table
    [[59, 6], [16, 80]]: Newcombe square-and-add p1 - p2 = -0.0621 (95% CI -0.1186 to -0.0046),
    as the R package contingencytables reproduces it in its tests. Here FP plays the first
    classification (59 + 6 right) and the quantized model the second (59 + 16 right)."""
    low, high = paired_delta_ci(fp_only=6, quant_only=16, n=161, fp_correct=65)
    # our delta is quant - fp = -(p1 - p2): the published interval, negated
    assert (round(-high, 4), round(-low, 4)) == (-0.1186, -0.0046)
    result = evaluate_gate(*paired(59, 6, 16, 80), NI)
    assert result.delta_ci == [pytest.approx(0.0046, abs=5e-5), pytest.approx(0.1186, abs=5e-5)]
    assert result.ci_level == 0.95 and "[95% CI +0.005, +0.119]" in result.summary()


def _tables(n: int):
    a, b, c = (x.ravel() for x in np.meshgrid(np.arange(n + 1), np.arange(n + 1), np.arange(n + 1), indexing="ij"))
    d = n - a - b - c
    keep = d >= 0
    return a[keep], b[keep], c[keep], d[keep]


def exact_coverage(n: int, fp_acc: float, quant_acc: float, agree: float) -> float:
    """Probability, over every table of n paired items, that the 95% interval holds the true drop."""
    p11 = fp_acc * agree  # both right
    p10, p01 = fp_acc - p11, quant_acc - p11
    p00 = 1 - p11 - p10 - p01
    a, b, c, d = _tables(n)
    with np.errstate(divide="ignore"):
        log_p = (gammaln(n + 1) - gammaln(a + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(d + 1)
                 + xlogy(a, p11) + xlogy(b, p10) + xlogy(c, p01) + xlogy(d, p00))
    prob = np.exp(log_p)
    assert prob.sum() == pytest.approx(1.0)
    low, high = _drop_ci(b, c, n, a + b, 0.95)
    truth = p10 - p01
    return float(prob[(low <= truth + 1e-12) & (truth <= high + 1e-12)].sum())


GRID = [(n, fp, round(fp - loss, 2), agree) for n in (20, 40, 80) for fp in (0.3, 0.5, 0.7, 0.9)
        for loss in (0.0, 0.1, 0.2) for agree in (0.7, 0.9)
        if fp - loss - fp * agree >= 0 and 1 - fp - (fp - loss - fp * agree) >= 0]  # valid cell probabilities


def test_interval_coverage_over_a_grid_of_n_and_accuracies():
    """Exact coverage (every table enumerated, not sampled) at nominal 95%: at least 94% at each
    of the grid's points (FP accuracy 0.3-0.9, losses 0-20 points, two correlations, n 20-80)."""
    coverage = {point: exact_coverage(*point) for point in GRID}
    assert len(coverage) >= 30
    worst = min(coverage, key=coverage.get)
    assert coverage[worst] >= 0.94, (worst, coverage[worst])
    assert 0.95 <= float(np.mean(list(coverage.values()))) <= 0.98


@pytest.mark.parametrize("counts, verdict", [
    ((70, 0, 0, 30), "pass"),           # a perfect copy: the interval sits at 0
    ((30, 6, 6, 8), "inconclusive"),    # no loss on average, but the interval reaches -0.14
    ((300, 20, 20, 60), "pass"),        # the same on 400 items: the worst end within 0.10
    ((40, 30, 0, 30), "fail"),          # a 30-point loss: even the best end is beyond 0.10
    ((50, 12, 2, 36), "inconclusive"),  # a 10-point loss: straddles the margin
    ((6, 1, 0, 2), "inconclusive"),     # fewer than min_items
], ids=["copy", "noisy-small", "noisy-large", "broken", "at-margin", "too-few"])
def test_noninferiority_verdict_table(counts, verdict):
    result = evaluate_gate(*paired(*counts), NI)
    assert result.verdict == verdict, result.summary()
    assert result.mode == "noninferiority"
    low, high = result.delta_ci
    if verdict == "pass":
        assert low >= -0.10
    if verdict == "fail":
        assert high < -0.10
    difference = evaluate_gate(*paired(*counts), NI.model_copy(update={"mode": "difference"}))
    assert difference.delta_ci == result.delta_ci and difference.mode == "difference"


def test_noninferiority_is_stricter_than_the_point_estimate():
    """The issue's example: FP 0.80, quantized 0.725 on 40 items (5 lost, 2 won) passes a 0.10
    margin on the point estimate, yet the interval of the drop reaches beyond it."""
    fp, quant = paired(27, 5, 2, 6)
    assert sum(fp) == 32 and sum(quant) == 29
    loose = Thresholds(max_abs_drop=0.10, max_rel_drop=1.0, alpha=0.05, min_items=20)
    assert evaluate_gate(fp, quant, loose).verdict == "pass"
    strict = evaluate_gate(fp, quant, loose.model_copy(update={"mode": "noninferiority"}))
    assert strict.verdict == "inconclusive" and strict.delta_ci[0] < -0.10
    assert "straddles the margin 0.100" in strict.reason


def test_sequential_keeps_its_guarantee_in_noninferiority_mode():
    """Every completion of every prefix enumerated: a settled verdict is that of all completions."""
    rng = np.random.default_rng(11)
    thresholds = Thresholds(max_abs_drop=0.25, max_rel_drop=1.0, alpha=0.2, min_items=4, mode="noninferiority")
    settled = set()
    for _ in range(60):
        n = int(rng.integers(4, 10))
        fp_all = [bool(v) for v in rng.random(n) < rng.uniform(0.3, 0.9)]
        broken = rng.uniform(0, 1)
        quant_all = [bool(f and rng.random() > broken) or bool(not f and rng.random() < 0.1) for f in fp_all]
        for k in range(n + 1):
            prefix = quant_all[:k]
            outcomes = {evaluate_gate(fp_all, prefix + list(tail), thresholds).verdict
                        for tail in itertools.product([False, True], repeat=n - k)}
            result = final_verdict_if_known(fp_all, prefix, thresholds)
            if result is None:
                assert len(outcomes) > 1
            else:
                assert outcomes == {result.verdict}
                settled.add(result.verdict)
    assert settled == {"pass", "fail", "inconclusive"}


# ------------------------------------------------------------------ many cells at once


def _null_session_verdicts(rng, cells: int, n: int, fp_right: int, flip: float, family: str):
    """One session of ``cells`` null checkpoints (they lost nothing: as many items lost as won in
    expectation) against a fixed FP baseline; returns the cells' final (family) verdict codes."""
    from pytest_qmr.gate import GateRule, _verdicts, adjust_family

    lost = rng.binomial(fp_right, flip, size=cells)  # FP right, quantized wrong
    won = rng.binomial(n - fp_right, flip * fp_right / (n - fp_right), size=cells)  # the reverse, same mean
    thresholds = {"max_abs_drop": 0.05, "max_rel_drop": 0.10, "alpha": 0.05, "min_items": 20,
                  "family": family, "family_size": cells}
    codes, drop, rel, p = _verdicts(lost, won, n, fp_right, GateRule.of(thresholds))
    if family == "none":
        return codes
    from pytest_qmr.gate import _mcnemar_p

    adjusted = np.array(adjust_family(list(_mcnemar_p(lost, won)), family))
    exceeds = (drop > 0.05 + 1e-9) | (rel > 0.10 + 1e-9)
    return np.where(exceeds & (adjusted < 0.05), 1, codes)  # Holm's step-down on top of alpha / m


def test_holm_keeps_the_family_wise_false_alarm_rate_of_84_null_cells_at_alpha():
    """suites/paper.yaml's 84 cells on checkpoints that lost nothing: gated one by one at alpha
    0.05, most sessions raise a false alarm somewhere; under ``family: holm`` (alpha / 84 per cell,
    then Holm's adjusted p at the end) at most 5% of sessions do."""
    rng = np.random.default_rng(2026)
    sessions = {"none": 2000, "holm": 400}
    # statsmodels' multipletests calls gc.collect() on every Holm call: with the worker's heap (torch,
    # transformers) frozen out of the collector's view that costs microseconds instead of ~0.1 s a call
    gc.freeze()
    try:
        alarms = {family: np.mean([np.any(_null_session_verdicts(rng, 84, 80, 55, 0.15, family) == 1)
                                   for _ in range(count)]) for family, count in sessions.items()}
    finally:
        gc.unfreeze()
    assert alarms["holm"] <= 0.05, alarms
    assert alarms["none"] > 0.2, alarms  # what the family is for


def test_family_at_the_session_end_adjusts_each_cell(tmp_path):
    """apply_family over a run directory: every cell of the family gets its Holm p and the
    verdict it gives; a cell Bonferroni left inconclusive fails where Holm's step-down rejects."""
    from pytest_qmr.records import CellResult
    from pytest_qmr.rundir import apply_family

    thresholds = {"max_abs_drop": 0.05, "max_rel_drop": 0.10, "alpha": 0.05, "min_items": 20,
                  "family": "holm", "family_size": 3}
    cells = {"broken": paired(10, 30, 0, 0), "lossy": paired(28, 9, 1, 2), "copy": paired(30, 0, 0, 10)}
    for name, (fp, quant) in cells.items():
        gate = evaluate_gate(fp, quant, thresholds)
        result = CellResult(cell_id=name, model="m", quantizer=name, benchmark="b", task="t",
                            accuracy=gate.quant_acc, n=gate.n, gate=gate, samples_path="")
        (tmp_path / "cells" / name).mkdir(parents=True)
        (tmp_path / "cells" / name / "result.json").write_text(json.dumps(result.to_dict()))
    before = {name: evaluate_gate(*cells[name], thresholds) for name in cells}
    assert before["lossy"].verdict == "inconclusive" and before["lossy"].p_value < 0.05 / 2
    lines = apply_family(tmp_path)
    assert lines == ["qmr family holm over 3 cells (each gated at alpha/3): lossy inconclusive -> fail"]
    after = {name: json.loads((tmp_path / "cells" / name / "result.json").read_text())["gate"]
             for name in cells}
    assert after["broken"]["family_verdict"] == "fail" and after["copy"]["family_verdict"] == "pass"
    assert after["lossy"]["p_adjusted"] == pytest.approx(2 * before["lossy"].p_value)  # Holm's second step
    assert after["copy"]["p_adjusted"] == 1.0


def test_the_family_is_the_cells_selected_to_run(pytester, data_dir):
    from pytest_qmr.plugin import SESSION_KEY

    suite = pytester.makefile(".yaml", fam=f"""
name: fam
data_dir: {data_dir}
models: [{{name: m, ref: embedded:smollm2-135m-arith}}]
quantizers:
  - {{name: fp, method: fp}}
  - {{name: rtn-w4, method: rtn, bits: 4, group_size: 64}}
  - {{name: rtn-w8, method: rtn, bits: 8, group_size: 64}}
benchmarks: [{{name: arith, task: qmr_arith, limit: 8}}]
thresholds: {{family: holm}}
""")
    items, _ = pytester.inline_genitems(str(suite), "-k", "rtn")  # all collected; fp is then deselected
    session = items[0].config.stash[SESSION_KEY]
    assert session.family_sizes == {"holm": 2}
    gate_thresholds = session.thresholds(items[1].cell)
    assert evaluate_gate([True] * 20, [True] * 20, gate_thresholds).alpha == 0.025
