"""End to end on the embedded lab model: a scrambled checkpoint fails the gate against the
committed FP baseline, an untouched copy passes it, and every cell leaves its records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


SUITE = """
name: e2e
data_dir: {data_dir}
models:
  - name: smollm2-135m-arith
    ref: embedded:smollm2-135m-arith
quantizers:
  - name: copy
    method: checkpoint
    path: {copy}
  - name: scrambled
    method: checkpoint
    path: {scrambled}
benchmarks:
  - name: arith
    task: qmr_arith
    limit: 40
    seed: 0
thresholds:
  max_abs_drop: 0.05
  max_rel_drop: 0.10
  alpha: 0.05
  min_items: 16
  sequential: true
generation:
  max_new_tokens: 96
  batch_size: 20
locate:
  judges: [arith, rule]
restore: on-fail
"""

# A project's own Restore: a conftest.py hook implementation wins over the built-in DPO one, and
# an overridden qmr_restore fixture wraps whatever the hook gives.
CONFTEST = """
import pytest

def pytest_qmr_restore(cell, result, records, context):
    return {"by": "conftest", "cell": cell.id, "verdict": result.gate.verdict, "n_records": len(records),
            "quantized": str(context.quantized), "fp": str(context.fp.path), "baseline": context.baseline.source,
            "cell_dir": str(context.cell_dir)}

@pytest.fixture
def qmr_restore(request):
    hook = request.config.hook.pytest_qmr_restore
    return lambda **kwargs: {**hook(**kwargs), "via": "fixture"}
"""


def _scramble(src: Path, dst: Path) -> None:
    """Permute the output rows of the middle layers' MLP down-projections: same weights, wrong places."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for key in list(weights):
        if key.endswith("mlp.down_proj.weight") and any(f"layers.{i}." in key for i in range(8, 22)):
            rows = torch.randperm(weights[key].shape[0], generator=generator)
            weights[key] = weights[key][rows].contiguous()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})


def test_scrambled_fails_untouched_copy_passes(pytester, lab_model, data_dir, cache_dir, repo_root, tmp_path):
    copy, scrambled = tmp_path / "copy", tmp_path / "scrambled"
    shutil.copytree(lab_model.path, copy)
    _scramble(lab_model.path, scrambled)
    suite = pytester.makefile(".yaml", e2e=SUITE.format(data_dir=data_dir, copy=copy, scrambled=scrambled))
    pytester.makeconftest(CONFTEST)
    run_dir = tmp_path / "run"

    def run(*extra: str):
        return pytester.runpytest_subprocess(
            str(suite), f"--qmr-baselines={repo_root / 'baselines'}", f"--qmr-run-dir={run_dir}",
            f"--qmr-cache-dir={cache_dir}", "-p", "no:cacheprovider", *extra)

    result = run()
    result.assert_outcomes(passed=1, failed=1)
    # progress on the terminal while a cell runs (pytest captures the stages' own output)
    result.stdout.fnmatch_lines(["*qmr smollm2-135m-arith-scrambled-arith: evaluate */* items (* from cache*)*",
                                 "*qmr smollm2-135m-arith-scrambled-arith: locate"])
    result.stdout.fnmatch_lines(["*smollm2-135m-arith-scrambled-arith: FAIL: FP acc*McNemar exact p=*"])
    results = json.loads((run_dir / "results.json").read_text())
    verdicts = {c["cell_id"]: c["gate"]["verdict"] for c in results["cells"]}
    assert verdicts == {"smollm2-135m-arith-copy-arith": "pass", "smollm2-135m-arith-scrambled-arith": "fail"}
    copy_samples = (run_dir / "cells" / "smollm2-135m-arith-copy-arith" / "samples.jsonl").read_text().splitlines()
    copy_result = next(c for c in results["cells"] if c["cell_id"] == "smollm2-135m-arith-copy-arith")
    assert len(copy_samples) == copy_result["n"] == copy_result["gate"]["n"] > 0
    assert all(json.loads(line)["response"] for line in copy_samples)

    # locate: every regressed item of the scrambled cell is judged, and the profile is recorded
    scrambled_result = next(c for c in results["cells"] if c["cell_id"] == "smollm2-135m-arith-scrambled-arith")
    located = [json.loads(line) for line in
               (run_dir / "cells" / "smollm2-135m-arith-scrambled-arith" / "located.jsonl").read_text().splitlines()]
    assert len(located) == scrambled_result["gate"]["fp_only"] == scrambled_result["error_profile"]["n"] > 0
    assert {row["status"] for row in located} <= {"accepted", "escalated", "unjudged"}
    assert copy_result["error_profile"]["n"] == 0 and copy_result["profile_violations"] == []
    # restore: on-fail fired the hook for the failed cell only, with its records
    # and a CellContext: the checkpoint the cell built and evaluated, the FP model, its baseline, its record dir
    baseline = repo_root / "baselines" / "smollm2-135m-arith" / "arith.json"
    assert scrambled_result["restore"] == {"by": "conftest", "cell": "smollm2-135m-arith-scrambled-arith",
                                           "verdict": "fail", "n_records": scrambled_result["n"], "via": "fixture",
                                           "quantized": str(scrambled), "fp": str(lab_model.path),
                                           "baseline": str(baseline),
                                           "cell_dir": str(run_dir / "cells" / "smollm2-135m-arith-scrambled-arith")}
    assert copy_result["restore"] is None
    # the human review queue holds every escalated/unjudged case (plus the audit sample) of the cell
    queue = json.loads((run_dir / "cells" / "smollm2-135m-arith-scrambled-arith" / "review" / "queue.json").read_text())
    queued = {case["id"] for case in (queue["cases"] if isinstance(queue, dict) else queue)}
    assert {row["id"] for row in located if row["status"] != "accepted"} <= queued

    # an error-profile threshold fails a cell the gate passed; --qmr-resume re-checks the records
    strict = suite.read_text().replace("  sequential: true", "  sequential: true\n  error_profile:\n    min_located: 1")
    suite.write_text(strict)
    again = run("--qmr-resume")
    again.assert_outcomes(failed=2)
    again.stdout.fnmatch_lines(["*smollm2-135m-arith-copy-arith: PASS: FP acc*; error profile: number of located "
                                "errors is 0 < min 1 (min_located*"])

    # restore.min_gain: a Restore that wins nothing back fails the cell even where the suite
    # expects it to regress (the conftest hook above reports no accuracies at all)
    demanding = strict.replace("restore: on-fail", "restore:\n  when: on-fail\n  min_gain: 0.05").replace(
        "    path: {}\n".format(scrambled), "    path: {}\n    expect_fail_on: [arith]\n".format(scrambled))
    suite.write_text(demanding)
    third = run("--qmr-resume")
    third.assert_outcomes(failed=2)
    third.stdout.fnmatch_lines(["*smollm2-135m-arith-scrambled-arith: restore.min_gain 0.05 required, but the "
                                "Restore result has no quant_acc/restored_acc"])
