"""Parallel cells: ``pytest -n 2`` gives the records ``-n 0`` gives; concurrent builders of one
quantization key build it once; concurrent writers of one run directory lose nothing."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

LIMIT = 16  # the committed arith baseline covers 40 items; a cell with a smaller limit uses the first ones
SUITE = """
name: xdist
data_dir: {data_dir}
models:
  - name: smollm2-135m-arith
    ref: embedded:smollm2-135m-arith
quantizers:
  - name: fp
    method: fp
  - name: rtn-w4g64
    method: rtn
    bits: 4
    group_size: 64
benchmarks:
  - name: arith
    task: qmr_arith
    limit: {limit}
    seed: 0
thresholds:
  min_items: {limit}
locate:
  judges: [arith, rule]
generation:
  max_new_tokens: 96      # the committed baseline's settings (its provenance is checked)
  batch_size: 20
"""


def _cells(run_dir: Path) -> dict[str, dict]:
    """What must not depend on how cells were scheduled: verdicts, accuracies, every sample."""
    results = json.loads((run_dir / "results.json").read_text())
    out = {}
    for cell in results["cells"]:
        samples = [json.loads(line) for line in Path(cell["samples_path"]).read_text().splitlines()]
        out[cell["cell_id"]] = {
            "accuracy": cell["accuracy"], "n": cell["n"], "outcome": cell["outcome"],
            "gate": {k: cell["gate"][k] for k in ("verdict", "fp_acc", "quant_acc", "fp_only", "quant_only",
                                                   "p_value")},
            "samples": samples,
        }
    return out


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]


@pytest.mark.slow  # two runs of two 16-item cells on the lab model (a few minutes on 2 shared cores)
def test_two_workers_give_the_same_records_as_one(pytester, data_dir, cache_dir, repo_root, tmp_path, capsys):
    pytest.importorskip("xdist")
    suite = pytester.makefile(".yaml", xdist=SUITE.format(data_dir=data_dir, limit=LIMIT))
    runs, seconds = {}, {}
    for workers in ("0", "2"):
        run_dir = tmp_path / f"run-n{workers}"
        started = time.monotonic()
        result = pytester.runpytest_subprocess(
            str(suite), "-n", workers, f"--qmr-baselines={repo_root / 'baselines'}", f"--qmr-run-dir={run_dir}",
            f"--qmr-cache-dir={cache_dir}", "-p", "no:cacheprovider", "--qmr-no-cache",  # both runs generate
        )
        seconds[workers] = time.monotonic() - started
        outcomes = result.parseoutcomes()
        assert outcomes.get("error", 0) == 0 and sum(outcomes.get(k, 0) for k in ("passed", "failed")) == 2, \
            result.stdout.str()[-3000:]
        runs[workers] = _cells(run_dir)
        cell_seconds = [c["seconds"] for c in json.loads((run_dir / "results.json").read_text())["cells"]]
        seconds[workers + " cells"] = sum(sum(s.values()) for s in cell_seconds)
        assert _leftovers(run_dir) == []
    assert set(runs["0"]) == {"smollm2-135m-arith-fp-arith", "smollm2-135m-arith-rtn-w4g64-arith"}
    assert runs["2"] == runs["0"]
    with capsys.disabled():
        print(f"\n[xdist] 2 cells (fp, rtn-w4g64) x qmr_arith limit {LIMIT}, lab model, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}: -n 0 {seconds['0']:.1f}s, "
              f"-n 2 {seconds['2']:.1f}s (whole pytest runs; time inside the cells: {seconds['0 cells']:.1f}s vs "
              f"{seconds['2 cells']:.1f}s summed over both workers)")


# --------------------------------------------------------------------------------- quantization cache


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, cache_dir, make_tiny_llama) -> tuple[Path, str]:
    """A random 1-layer Llama (hidden 64) with the embedded tokenizer: quantizing it takes seconds."""
    from pytest_qmr import models

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-xdist"),
                            models.resolve("embedded:smollm2-135m", cache_dir).path,
                            hidden=64, layers=1, heads=2, kv_heads=1, intermediate=128, seed=1)


def _quantize_after_barrier(model: str, fingerprint: str, root: str, barrier, builds_log: str) -> dict:
    """One concurrent writer (a spawned process): count real builds, then ask for the shared key."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from pytest_qmr import quantize as qz
    from pytest_qmr.fsutil import append_jsonl

    real_build = qz.build._build

    def counted_build(*args, **kwargs):
        append_jsonl(builds_log, [{"pid": os.getpid()}])
        return real_build(*args, **kwargs)

    qz.build._build = counted_build
    barrier.wait(timeout=300)  # everyone asks at the same moment
    result = qz.quantize(Path(model), fingerprint, qz.QuantSpec(method="rtn", bits=4, group_size=32), Path(root))
    return {"hit": result.info["cache_hit"], "path": str(result.path), "sha": result.info.get("files")}


def test_concurrent_quantizers_build_one_key_once(tiny_llama, tmp_path):
    from pytest_qmr import quantize as qz

    n = 3
    root, builds_log = tmp_path / "cache", tmp_path / "builds.jsonl"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        pending = [pool.apply_async(_quantize_after_barrier, (str(tiny_llama[0]), tiny_llama[1], str(root), barrier,
                                                              str(builds_log))) for _ in range(n)]
        results = [p.get(timeout=600) for p in pending]
    assert sorted(r["hit"] for r in results) == [False] + [True] * (n - 1)
    assert len(builds_log.read_text().splitlines()) == 1  # exactly one process ran the build
    assert len({r["path"] for r in results}) == 1 and len({json.dumps(r["sha"], sort_keys=True) for r in results}) == 1
    entry = Path(results[0]["path"])
    info, problem = qz.verify_entry(entry)
    assert info is not None, problem
    assert [e.name for e in (root / "quantized").iterdir() if not e.name.endswith(".lock")] == [entry.name]
    assert _leftovers(root) == []


# --------------------------------------------------------------------------------- run directory


def _write_cells(run_dir: str, worker: int, n: int, barrier) -> None:
    from pytest_qmr.records import CellResult, SampleRecord
    from pytest_qmr.rundir import write_cell, write_results

    barrier.wait(timeout=120)
    for i in range(n):
        cell_id = f"w{worker}-cell{i}"
        records = [SampleRecord(f"{cell_id}-item{j}", j, "p", "r" * 2000, "1", "1", True) for j in range(50)]
        result = CellResult(cell_id, "m", "q", "b", "t", 1.0, len(records), None,
                            str(Path(run_dir) / "cells" / cell_id / "samples.jsonl"))
        write_cell(Path(run_dir) / "cells" / cell_id, records, result)
        write_results(Path(run_dir))  # every worker rewrites results.json while the others write cells


def test_concurrent_workers_share_one_run_dir(tmp_path):
    from pytest_qmr.rundir import write_results

    workers, per_worker = 3, 6
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(workers)
    procs = [ctx.Process(target=_write_cells, args=(str(tmp_path), w, per_worker, barrier)) for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    write_results(tmp_path)  # the controller's
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert sorted(c["cell_id"] for c in cells) == sorted(f"w{w}-cell{i}" for w in range(workers)
                                                         for i in range(per_worker))
    for cell in cells:
        assert len(Path(cell["samples_path"]).read_text().splitlines()) == 50
    assert _leftovers(tmp_path) == []
