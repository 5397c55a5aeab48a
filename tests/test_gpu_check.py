"""benchmarks/gpu_check.py, the one-call GPU check, runs here on the CPU (vLLM included where its
environment is built, as in CI): the same stages a GPU machine runs, so the script that is carried
there is known to work before a device is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_stage_on_this_machines_device(tmp_path):
    from pytest_qmr.models import ModelError
    from pytest_qmr.engines.servers import vllm_python

    try:
        vllm_python()
        with_vllm = True
    except ModelError:
        with_vllm = False
    assert with_vllm or not os.environ.get("CI"), "CI builds the vLLM environment (.ci/run)"
    out = tmp_path / "gpu_check.json"
    args = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out)]
    proc = subprocess.run(args + ([] if with_vllm else ["--no-vllm"]), capture_output=True, text=True, timeout=900,
                          cwd=REPO, env={**os.environ, "QMR_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    result = json.loads(line)
    assert json.loads(out.read_text()) == result
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert result["ok"] is True and result["device"] == device
    assert result["dtype"] == ("bfloat16" if device == "cuda" else "float32")
    assert result["quantize"] == {"scheme": "W4A16", "device": device, "compressed": True}
    assert result["hf"]["n"] == 8 and result["hf"]["param_device"].startswith(device)
    assert result["hf"]["param_dtype"] == result["dtype"]
    assert result["dpo"]["steps"] == 2 and len(result["dpo"]["losses"]) == 2
    assert result["sampled"]["hf"]["reproduced"] is True and result["sampled"]["hf"]["k"] == 4
    assert result["sampled"]["hf"]["distinct"] > 1  # a random model at temperature 0.8: the seeds differ
    if with_vllm:
        assert result["vllm"]["n"] == 8 and result["vllm"]["engine"].startswith("vLLM ")
        assert result["sampled"]["vllm"]["reproduced"] is True and result["sampled"]["vllm"]["distinct"] > 1
    else:
        assert result["vllm"] == "absent"
