"""Cold vs warm reruns of ``suites/smoke.yaml``, and a one-item change, in one invocation.

    python benchmarks/warm_rerun.py

1. **cold**: the generation and Restore-adapter caches are emptied (``qmr cache clear --area
   generations`` / ``adapters``; built models and quantized checkpoints stay, as on every rerun
   today), then ``pytest suites/smoke.yaml`` — all 7 cells, one process, README's first command.
2. **warm**: the same command again, nothing changed.
3. **one item changed**: the arith benchmark's task is swapped for a user task (``tasks:``) that is
   ``qmr_arith`` with one item's prompt edited; ``--qmr-update-baselines`` into a scratch baseline
   dir regenerates the FP baseline, then the RTN-W4 cell gates against it. The cells' ``cache``
   records say how many items were generated.

Each run's verdicts (pytest outcome, gate verdict, accuracy, n, restored accuracy) and its records
(``samples.jsonl`` of every cell) are compared cold vs warm. Writes
``benchmarks/results/warm_rerun.json`` (keys: ``cold_s``, ``warm_s``, ``speedup``,
``same_verdicts``, ``same_records``, ``cells``, ``one_item_change``, ``machine``), the plot
``benchmarks/results/warm_rerun.png`` (seconds per cell, cold vs warm) and the table between the
markers in ``benchmarks/README.md``. ``--report-only`` redraws the plot and table from the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_qmr.fsutil import atomic_write_json, save_figure, write_marked

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BEGIN, END = "<!-- warm-rerun:begin -->", "<!-- warm-rerun:end -->"
EDIT_TASK = """include: {arith}
task: qmr_arith_edited
doc_to_text: !function edit.doc_to_text
"""
EDIT_PY = '''from pytest_qmr.tasks.utils import doc_to_text as _doc_to_text

EDITED = {item!r}


def doc_to_text(doc):
    text = _doc_to_text(doc)
    return text + "\\nShow every step." if doc["qmr_id"] == EDITED else text
'''


def pytest_run(args: list[str], env: dict) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-rA"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if proc.returncode not in (0, 1):
        raise SystemExit(f"pytest {' '.join(args)} exited {proc.returncode}:\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def prepare_checkpoints(cache_dir: Path, data_dir: Path) -> None:
    """Build (or verify) every quantized checkpoint of the suite first: both runs find them
    cached, as every rerun of a CI gate does, so cold is what a rerun costs today."""
    from pytest_qmr import models
    from pytest_qmr.quantize import quantize
    from pytest_qmr.pipeline import quant_spec
    from pytest_qmr.suite import load_suite

    for cell in load_suite(REPO / "suites" / "smoke.yaml").cells():
        fp = models.resolve(cell.model.ref, cache_dir)
        quantize(fp.path, fp.fingerprint, quant_spec(cell), cache_dir, data_dir=data_dir)


def cells(run_dir: Path) -> dict[str, dict]:
    out = {}
    for cell in json.loads((run_dir / "results.json").read_text())["cells"]:
        samples = Path(cell["samples_path"]).read_text(encoding="utf-8")
        out[cell["cell_id"]] = {
            "outcome": cell["outcome"], "verdict": (cell["gate"] or {}).get("verdict"), "accuracy": cell["accuracy"],
            "n": cell["n"], "restored_acc": (cell.get("restore") or {}).get("restored_acc"),
            "samples": samples, "seconds": round(sum(cell["seconds"].values()), 1), "cache": cell.get("cache", {}),
        }
    return out


def outcomes(stdout: str) -> dict[str, str]:
    """pytest's own verdict per cell (PASSED / XFAIL / FAILED lines of -rA)."""
    return {m.group(2).split("::")[-1]: m.group(1) for m in re.finditer(r"^(PASSED|XFAIL|FAILED|XPASS) (\S+)",
                                                                         stdout, re.M)}


def generated(cache: dict) -> dict[str, int]:
    return {stage: c["items"] - c["items_from_cache"] for stage, c in cache.items()
            if isinstance(c, dict) and "items" in c}


def one_item_change(work: Path, env: dict) -> dict:
    """Edit one arith item's prompt; regenerate the FP baseline and gate RTN-W4 against it."""
    baseline = json.loads((REPO / "baselines" / "smollm2-135m-arith" / "arith.json").read_text())
    item = min(baseline["items"].items(), key=lambda kv: kv[1]["doc_index"])[0]
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "qmr_arith_edited.yaml").write_text(EDIT_TASK.format(arith=REPO / "tasks" / "qmr_arith.yaml"))
    (tasks / "edit.py").write_text(EDIT_PY.format(item=item))
    suite = (REPO / "suites" / "smoke.yaml").read_text()
    suite = suite.replace("task: qmr_arith\n", "task: qmr_arith_edited\n", 1)
    data_dir = REPO.parent / "shared" / "data"
    suite = suite.replace("data_dir: ../../shared/data", f"data_dir: {data_dir}\ntasks: [{tasks}]")
    (work / "smoke-edited.yaml").write_text(suite)
    run_dir = work / "run-edited"
    seconds, stdout = pytest_run([str(work / "smoke-edited.yaml"), "-k", "fp-arith or rtn-w4g64-arith",
                                  "--qmr-update-baselines", f"--qmr-baselines={work / 'baselines'}",
                                  f"--qmr-run-dir={run_dir}"], env)
    got = cells(run_dir)
    return {"edited_item": item, "seconds": round(seconds, 1),
            "generated": {cell: generated(c["cache"]) for cell, c in got.items()},
            "from_cache": {cell: {s: c["cache"][s]["items_from_cache"] for s in generated(c["cache"])}
                           for cell, c in got.items()}}


def table(result: dict) -> str:
    rows = ["| cell | cold s | warm s | verdict (both runs) | items generated warm |",
            "| --- | --- | --- | --- | --- |"]
    for cell, c in result["cells"].items():
        rows.append(f"| `{cell}` | {c['cold_s']} | {c['warm_s']} | {c['verdict']} | {c['warm_generated']} |")
    rows.append(f"| **whole run** (pytest wall clock) | **{result['cold_s']}** | **{result['warm_s']}** | "
                f"same verdicts: {result['same_verdicts']}, same records: {result['same_records']} | "
                f"speedup **{result['speedup']}×** |")
    change = result["one_item_change"]
    rows.append("")
    rows.append(f"One item's prompt edited (`{change['edited_item']}`), FP baseline regenerated and RTN-W4 gated: "
                + "; ".join(f"`{cell}` generated {g}" for cell, g in change["generated"].items())
                + f" ({change['seconds']} s).")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    """Seconds per cell, cold vs warm, on a log scale (warm is tens of times smaller)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result["cells"])
    cold = [result["cells"][c]["cold_s"] for c in names]
    warm = [max(result["cells"][c]["warm_s"], 0.1) for c in names]
    fig = Figure(figsize=(9, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], cold, width=0.4, label=f"cold (whole run {result['cold_s']} s)", color="#c44e52")
    ax.bar([x + 0.2 for x in xs], warm, width=0.4, label=f"warm (whole run {result['warm_s']} s)", color="#4c72b0")
    ax.set_yscale("log")
    ax.set_ylim(0.3, max(cold) * 12)  # room for the legend above the bars
    ax.set_ylabel("seconds inside the cell")
    ax.set_xticks(list(xs), [n.replace("smollm2-135m-arith-", "") for n in names], rotation=25, ha="right",
                  fontsize=8)
    ax.set_title(f"suites/smoke.yaml rerun: {result['speedup']}x faster warm, same verdicts and records", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_reports(result: dict) -> None:
    plot(result, HERE / "results" / "warm_rerun.png")
    readme = HERE / "README.md"
    body = f"{table(result)}\n\n![cold vs warm seconds per cell](results/warm_rerun.png)"
    write_marked(readme, BEGIN, END, body, preamble=(
        "## Warm reruns\n\n`warm_rerun.py` runs `pytest suites/smoke.yaml` with empty generation and adapter caches "
        "(checkpoints cached, as every rerun today), then again unchanged, then with one item's prompt edited:\n\n"))
    print(table(result))


def main() -> int:
    if "--report-only" in sys.argv[1:]:
        write_reports(json.loads((HERE / "results" / "warm_rerun.json").read_text()))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("QMR_CACHE_DIR", str(REPO / ".qmr-cache"))
    prepare_checkpoints(Path(env["QMR_CACHE_DIR"]), Path(env.get("QMR_DATA_DIR", REPO.parent / "shared" / "data")))
    from pytest_qmr.cache import clear

    clear(Path(env["QMR_CACHE_DIR"]), ("generations", "adapters"))
    work = Path(tempfile.mkdtemp(prefix="qmr-warm-"))
    runs = {}
    for name in ("cold", "warm"):
        run_dir = work / f"run-{name}"
        seconds, stdout = pytest_run(["suites/smoke.yaml", f"--qmr-run-dir={run_dir}"], env)
        runs[name] = {"seconds": seconds, "cells": cells(run_dir), "outcomes": outcomes(stdout)}
        print(f"{name}: {seconds:.1f} s, {runs[name]['outcomes']}", flush=True)
    cold, warm = runs["cold"]["cells"], runs["warm"]["cells"]
    keys = ("outcome", "verdict", "accuracy", "n", "restored_acc")
    result = {
        "cold_s": round(runs["cold"]["seconds"], 1), "warm_s": round(runs["warm"]["seconds"], 1),
        "speedup": round(runs["cold"]["seconds"] / runs["warm"]["seconds"], 1),
        "same_verdicts": runs["cold"]["outcomes"] == runs["warm"]["outcomes"]
        and all({k: cold[c][k] for k in keys} == {k: warm[c][k] for k in keys} for c in cold),
        "same_records": set(cold) == set(warm) and all(cold[c]["samples"] == warm[c]["samples"] for c in cold),
        "cells": {c: {"cold_s": cold[c]["seconds"], "warm_s": warm[c]["seconds"],
                      "verdict": f"{runs['warm']['outcomes'].get(c, '?')} ({warm[c]['verdict']})",
                      "warm_generated": sum(generated(warm[c]["cache"]).values()),
                      "warm_cache": warm[c]["cache"], "cold_cache": cold[c]["cache"]} for c in sorted(cold)},
        "pytest_outcomes": runs["warm"]["outcomes"],
        "one_item_change": one_item_change(work, env),
        "command": "python benchmarks/warm_rerun.py",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(HERE / "results" / "warm_rerun.json", result)
    write_reports(result)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
