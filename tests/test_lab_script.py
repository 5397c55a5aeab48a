"""benchmarks/run_lab.py: its paired statistics and README block, and the whole lab path at CI size
(20 test problems, one quantizer, a one-step Restore) with the direction of each effect checked;
the full-size run is a script, measured in benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import json
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
            for k, (c, s) in enumerate(zip(correct, steps, strict=True))]


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


def test_reduced_lab_end_to_end_checks_each_effects_direction(lab, tmp_path, data_dir, cache_dir, monkeypatch,
                                                               capsys):
    """The same path as the full lab (measure, label, quantize, mine, pairs, DPO, re-measure,
    JSON + plot + README), at CI size on the embedded lab model; a second call resumes from the
    stage cache without recomputing anything."""
    monkeypatch.setenv("QMR_CACHE_DIR", str(cache_dir))
    readme = tmp_path / "README.md"
    readme.write_text("# lab\n")
    argv = ["--n-test", "20", "--quantizers", "rtn-w4g64", "--n-train", "12", "--pair-budget", "4",
            "--skip-ablation", "--restore-set", "max_steps=1", "per_device_train_batch_size=2", "max_minutes=3",
            "--data-dir", str(data_dir), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--readme", str(readme)]
    assert lab.main(argv) == 0
    results = json.loads((tmp_path / "out" / "cpu_lab.json").read_text())
    assert {"fp_acc", "cells", "restore", "ablation", "stage_seconds", "machine"} <= set(results)
    [cell] = results["cells"]
    # quantization hurts: RTN W4 loses accuracy against FP on the same items, significantly
    assert cell["quantizer"] == "rtn-w4g64" and cell["n"] == 20
    assert cell["acc"] < results["fp_acc"] and cell["p_value"] < 0.05
    # ... and its errors come early: first faulty steps no later, on average, than FP's
    early = cell["errors_earlier_than_fp"]
    assert early["mean_step"] <= early["fp_mean_step"]
    assert sum(cell["first_error_step_hist"].values()) == round(20 * (1 - cell["acc"]))
    # restore ran on pairs from the train split and was re-measured on the same 20 items
    restore = results["restore"]
    assert restore["quantizer"] == "rtn-w4g64" and restore["pairs"] == 4 and restore["dpo_steps"] == 1
    assert restore["n"] == 20 and restore["quant_acc"] == cell["acc"] and 0 <= restore["restored_acc"] <= 1
    assert {"evaluate", "judge", "quantize", "mine", "pairs", "dpo"} <= set(results["stage_seconds"])
    assert (tmp_path / "out" / "cpu_lab.png").stat().st_size > 10_000
    assert lab.BEGIN in readme.read_text() and "| rtn-w4g64 |" in readme.read_text()
    capsys.readouterr()
    assert lab.main(argv) == 0  # resumed: every stage from the cache
    assert "[lab]" not in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "cpu_lab.json").read_text())["cells"] == results["cells"]
