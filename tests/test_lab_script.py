"""benchmarks/run_lab.py: its paired statistics and README block, and the whole lab path at CI size
(32 test problems, one quantizer, a 12-step Restore that must win items back) with the direction
of each effect checked, then restore_lab.py's records on the same stage cache;
the full-size run is a script, measured in benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_lab.py"
RESTORE_SCRIPT = SCRIPT.with_name("restore_lab.py")


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


#: Restore at CI size: the lab's settings, 12 steps (~100 s on 2 cores), trained once (by run_lab.py).
#: Measured 2026-12-07 on the first 32 test items: FP 0.781, RTN-W4 0.312, restored 0.469 / 0.438 /
#: 0.469 (training seeds 0 / 1 / 2: 5 / 5 / 5 items won, 0 / 1 / 0 lost), 33% / 27% / 33% of the loss
CI_RESTORE = ["learning_rate=1e-4", "sft_weight=4.0", "beta=0.3", "per_device_train_batch_size=4", "max_steps=12",
              "max_minutes=5"]
MIN_CI_SHARE = 0.15  # of the loss won back: half the measured gain


@pytest.fixture(scope="module")
def restore_lab():
    spec = importlib.util.spec_from_file_location("restore_lab", RESTORE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop("run_lab", None)  # imported by restore_lab from benchmarks/


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


def test_reduced_lab_end_to_end_checks_each_effects_direction(lab, restore_lab, tmp_path, data_dir, cache_dir,
                                                               monkeypatch, capsys):
    """The same path as the full lab (measure, label, quantize, mine, pairs, DPO, re-measure,
    JSON + plot + README), at CI size on the embedded lab model; a second call resumes from the
    stage cache without recomputing anything. Then a real, seeded Restore (benchmarks/restore_lab.py
    on the same stage cache): pairs come from train problems the quantized model got wrong, located
    by mining's Locate, and the restored model wins back more held-out test items than it breaks, by
    a share of the loss this test fails below; MMLU is measured before and after, and the record has
    the issue's fields. A category no pair falls in is a row that says so, not a crash."""
    monkeypatch.setenv("QMR_CACHE_DIR", str(cache_dir))
    readme = tmp_path / "README.md"
    readme.write_text("# lab\n")
    argv = ["--n-test", "32", "--quantizers", "rtn-w4g64", "--n-train", "48", "--pair-budget", "24",
            "--skip-ablation", "--restore-set", *CI_RESTORE,
            "--data-dir", str(data_dir), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--readme", str(readme)]
    assert lab.main(argv) == 0
    results = json.loads((tmp_path / "out" / "cpu_lab.json").read_text())
    assert {"fp_acc", "cells", "restore", "ablation", "stage_seconds", "machine"} <= set(results)
    [cell] = results["cells"]
    # quantization hurts: RTN W4 loses accuracy against FP on the same items, significantly
    assert cell["quantizer"] == "rtn-w4g64" and cell["n"] == 32
    assert cell["acc"] < results["fp_acc"] and cell["p_value"] < 0.05
    # ... and its errors come early: first faulty steps no later, on average, than FP's
    early = cell["errors_earlier_than_fp"]
    assert early["mean_step"] <= early["fp_mean_step"]
    assert sum(cell["first_error_step_hist"].values()) == round(32 * (1 - cell["acc"]))
    # restore ran on pairs from the train split and was re-measured on the same 32 items (one batch)
    restore = results["restore"]
    assert restore["quantizer"] == "rtn-w4g64" and restore["pairs"] == 24 and restore["dpo_steps"] == 12
    assert restore["n"] == 32 and restore["quant_acc"] == cell["acc"]
    # ... and won back more held-out items than it broke
    assert restore["restored_only"] > restore["quant_only"] and restore["restored_acc"] > restore["quant_acc"]
    assert {"evaluate", "judge", "quantize", "mine", "pairs", "dpo"} <= set(results["stage_seconds"])
    assert (tmp_path / "out" / "cpu_lab.png").stat().st_size > 10_000
    assert lab.BEGIN in readme.read_text() and "| rtn-w4g64 |" in readme.read_text()
    capsys.readouterr()
    assert lab.main(argv) == 0  # resumed: every stage from the cache
    assert "[lab]" not in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "cpu_lab.json").read_text())["cells"] == results["cells"]

    # restore_lab.py on the same stage cache: the same answers, traces, pairs and (same settings, seed 0) adapter
    readmes = [tmp_path / "README.md", tmp_path / "bench.md"]
    readmes[1].write_text("# lab\n")
    argv = ["--quantizers", "rtn-w4g64", "--seeds", "0", "--n-test", "32", "--n-train", "48", "--pair-budget", "24",
            "--restore-set", *CI_RESTORE, "--ablations", "silver-bullet", "conceptual-only", "--ablation-n-test", "32",
            "--mmlu-limit", "20", "--data-dir", str(data_dir), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--readme", *map(str, readmes)]
    assert restore_lab.main(argv) == 0
    err = capsys.readouterr().err
    assert "[lab] mmlu-" in err and "[lab] samples-" not in err and "[lab] dpo-" not in err, err[-2000:]
    results = json.loads((tmp_path / "out" / "restore_lab.json").read_text())
    assert {"command", "date", "machine", "quantizers", "ablations"} <= set(results)
    assert "libraries" in results["machine"]
    [q] = results["quantizers"]
    assert {"fp_acc", "quant_acc", "restored_acc", "recovered_share", "minutes", "pairs", "p_value", "mmlu_before",
            "mmlu_after"} <= set(q)
    assert (q["fp_acc"], q["quant_acc"]) == (results["fp_acc"], cell["acc"]) and q["pairs"] == 24
    [run] = q["runs"]
    assert run["dpo_steps"] == 12 and run["minutes"] < 5 and q["restored_acc"] == [restore["restored_acc"]]
    # the gain: more held-out items won than lost, and a share of the loss won back
    assert run["won"] > run["lost"] and q["restored_acc"][0] > q["quant_acc"]
    assert q["recovered_share"]["mean"] >= MIN_CI_SHARE
    # MMLU by log-likelihood over 20 subjects: a 135M model ranks some choices right, before and after
    assert q["mmlu_n"] == 20 and 0 < q["mmlu_before"] < 1 and 0 < q["mmlu_after"][0] < 1
    silver, conceptual = results["ablations"]
    assert silver["ablation"] == "silver-bullet" and silver["accuracy"] == q["restored_acc"][0]  # the same run
    assert silver["interval"][0] <= silver["accuracy"] <= silver["interval"][1]
    assert conceptual["pairs"] == 0 and "nothing to restore" in conceptual["skipped"]
    for readme in readmes:
        assert restore_lab.BEGIN in readme.read_text() and "| rtn-w4g64 |" in readme.read_text()
    assert lab.BEGIN in readmes[0].read_text()  # run_lab's block is kept beside it
    assert (tmp_path / "out" / "restore_lab.png").stat().st_size > 10_000
