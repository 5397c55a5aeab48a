"""benchmarks/run_lab.py's bookkeeping: paired statistics, the README block it rewrites, and the
result keys issue #7 names (the full run itself is a script, measured in benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_lab.py"


@pytest.fixture(scope="module")
def lab():
    spec = importlib.util.spec_from_file_location("run_lab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _rows(correct, steps=None):
    steps = steps or [-1 if c else 1 for c in correct]
    return [{"item_id": f"i{k}", "doc_index": k, "correct": c, "response": "", "truth_status": "x",
             "truth_step": s, "truth_type": None if c else "computational_error", "rule_step": s if not c else -1}
            for k, (c, s) in enumerate(zip(correct, steps))]


def test_paired_counts_discordant_items_and_refuses_other_items(lab):
    fp = _rows([True] * 10 + [False] * 2)
    quant = _rows([False] * 9 + [True] * 3)
    stats = lab.paired("fp", fp, "quant", quant)
    assert (stats["fp_only"], stats["quant_only"], stats["n"]) == (9, 2, 12)
    assert stats["p_value"] == pytest.approx(0.0654296875, rel=1e-3)  # 2 * P[Bin(11, 1/2) <= 2]
    with pytest.raises(ValueError, match="same items"):
        lab.paired("fp", fp, "quant", quant[1:])


def test_cell_summary_has_the_keys_the_issue_names_and_tests_earlier_errors(lab):
    fp = _rows([True] * 30 + [False] * 10, [-1] * 30 + [3] * 10)
    quant = _rows([False] * 20 + [True] * 20, [1] * 20 + [-1] * 20)
    cell = lab.cell_summary("rtn-w4g64", fp, quant)
    assert {"quantizer", "acc", "n", "p_value", "error_profile", "first_error_step_hist"} <= set(cell)
    assert cell["first_error_step_hist"] == {"1": 20}
    assert cell["error_profile"]["categories"] == {"execution": 20}
    assert cell["errors_earlier_than_fp"]["p_value"] < 0.01


def test_readme_block_is_replaced_not_appended_twice(lab):
    text = "# title\n\nprose\n"
    once = lab.replace_between(text, "table 1")
    twice = lab.replace_between(once, "table 2")
    assert twice.count(lab.BEGIN) == 1 and "table 2" in twice and "table 1" not in twice
    assert twice.startswith("# title\n\nprose\n")
