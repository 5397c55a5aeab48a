"""The CPU lab at full size: Table 1, error profiles, Restore and its ablation on ``qmr_arith``.

    python benchmarks/run_lab.py                 # everything, 500 test problems (hours on 2 cores)
    python benchmarks/run_lab.py --n-test 100 --quantizers rtn-w4g64 --skip-ablation   # a quick look

Writes ``benchmarks/results/cpu_lab.json``, ``cpu_lab.png`` and the tables in ``benchmarks/README.md``.
Every stage keeps its result under ``--work`` as soon as it finishes (atomically), keyed by the
settings it depends on, so an interrupted run resumes where it stopped and a changed setting
recomputes only what it touches. This is a script, not a test: CI runs the reduced path through
``suites/smoke.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pytest_qmr import arith, taxonomy
from pytest_qmr.locate.judges import rule as rule_judge
from pytest_qmr.locate.judges.arith import label
from pytest_qmr.fsutil import (atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl, replace_marked,
                               save_figure, sha256_text)
from pytest_qmr.gate import compare
from pytest_qmr.quantize import QuantSpec

HERE = Path(__file__).resolve().parent

#: the lab's quantizers (group 64: SmolLM2's 576-wide layers do not split into 128s)
QUANTIZERS: dict[str, QuantSpec] = {
    "rtn-w4g64": QuantSpec("rtn", 4, 64),
    "gptq-w4g64": QuantSpec("gptq", 4, 64),
    "awq-w4g64": QuantSpec("awq", 4, 64),
    "smoothquant-w8a8": QuantSpec("smoothquant"),
    "rtn-w3g64": QuantSpec("rtn", 3, 64),
    "gptq-w3g64": QuantSpec("gptq", 3, 64),
}
#: run by default (GPTQ-W3 on request: --quantizers ... gptq-w3g64)
DEFAULT_QUANTIZERS = ["rtn-w4g64", "gptq-w4g64", "awq-w4g64", "smoothquant-w8a8", "rtn-w3g64"]


@dataclass
class LabConfig:
    model: str = "embedded:smollm2-135m-arith"
    n_test: int = 500
    quantizers: list[str] = field(default_factory=lambda: list(DEFAULT_QUANTIZERS))
    calibration: dict = field(default_factory=lambda: {"dataset": "qmr_arith", "samples": 32, "seq_len": 256,
                                                       "seed": 0})
    restore_quantizer: str = ""  # default: the W4 cell that lost most, significantly if any did
    n_train: int = 400  # train-split problems mined for pairs
    pair_budget: int = 200  # pairs per Restore run (all variants of the ablation get the same)
    rejected_scope: str = "step"  # reject only the faulty step (restore.build_pairs); "rest": the paper's
    # the settings measured best in benchmarks/README.md (max_minutes is checked after each step)
    restore_set: list[str] = field(default_factory=lambda: [
        "learning_rate=1e-4", "sft_weight=4.0", "beta=0.3", "epochs=2", "per_device_train_batch_size=4",
        "max_minutes=9.6"])
    variants: list[str] = field(default_factory=lambda: ["all-step", "all-ns", "rand-ns"])
    ablation_n_test: int = 200
    max_new_tokens: int = 96
    batch_size: int = 32
    seed: int = 0
    data_dir: str = str(HERE.parent.parent / "shared" / "data")
    work: str = str(HERE / "work")
    out: str = str(HERE / "results")
    readme: str = str(HERE / "README.md")


class Lab:
    """One lab run: stages cached as JSON/JSONL under ``work`` and timed into ``stage_seconds``."""

    def __init__(self, config: LabConfig) -> None:
        from pytest_qmr.models import resolve

        self.config = config
        self.work = Path(config.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.fp = resolve(config.model)
        self.problems = arith.generate("test", config.n_test, config.seed)
        self.timings_file = self.work / "stage_seconds.json"
        #: seconds of every stage result ever computed under ``work``, by "stage:file"
        self.timings: dict[str, float] = (json.loads(self.timings_file.read_text())
                                          if self.timings_file.is_file() else {})
        self.stage_seconds: dict[str, float] = {}  # what this run's results took, computed or cached

    # ------------------------------------------------------------------ caching and timing

    def _key(self, *parts: Any) -> str:
        return sha256_text(json.dumps([self.fp.fingerprint, *parts], sort_keys=True, default=str))[:12]

    def cached(self, name: str, key: str, compute: Callable[[], Any], stage: str, jsonl: bool = False) -> Any:
        """``compute()`` once per (name, key); its seconds are added to ``stage_seconds[stage]``."""
        path = self.work / f"{name}-{key}.{'jsonl' if jsonl else 'json'}"
        timing = f"{stage}:{path.stem}"
        if path.is_file():
            value = read_jsonl(path) if jsonl else json.loads(path.read_text())
            # (caches written before timings were kept per file have them per stage name only)
            seconds = self.timings.get(timing, self.timings.get(f"{stage}:{name}"))
        else:
            started = time.monotonic()
            value = compute()
            seconds = round(time.monotonic() - started, 1)
            (atomic_write_jsonl if jsonl else atomic_write_json)(path, value)
            self.timings[timing] = seconds
            atomic_write_json(self.timings_file, self.timings)
            print(f"[lab] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
        if seconds is not None and f"{stage}:{name}" not in self.stage_seconds:
            self.stage_seconds[stage] = round(self.stage_seconds.get(stage, 0.0) + seconds, 1)
            self.stage_seconds[f"{stage}:{name}"] = seconds
        return value

    # ------------------------------------------------------------------ stages

    def quantized_path(self, name: str) -> Path:
        from dataclasses import replace

        from pytest_qmr.calibration import CalibrationSpec
        from pytest_qmr.quantize import quantize

        spec = QUANTIZERS[name]
        if spec.method in ("gptq", "awq", "smoothquant"):
            spec = replace(spec, calibration=CalibrationSpec(**self.config.calibration))
        info = self.cached(f"quantize-{name}", self._key(asdict(spec)), lambda: {
            "path": str(quantize(self.fp.path, self.fp.fingerprint, spec, data_dir=self.config.data_dir).path)},
            "quantize")
        return Path(info["path"])

    def evaluate(self, name: str, load_model: Callable[[], tuple], n: int) -> list[dict]:
        """Greedy lm-eval run of ``qmr_arith`` (first ``n`` test problems), each sample labelled by
        the exact arith labeller (ground truth) and by the rule judge."""
        from pytest_qmr.measure import Evaluator, GenerationSettings

        def run() -> list[dict]:
            model, tokenizer = load_model()
            generation = GenerationSettings(self.config.max_new_tokens, self.config.batch_size)
            evaluator = Evaluator(model, tokenizer, generation, Path(self.config.data_dir),
                                  {"arith_n": self.config.n_test, "arith_seed": self.config.seed})
            return [{"doc_index": r.doc_index, "item_id": r.item_id, "response": r.response,
                     "correct": bool(r.correct)} for r in evaluator.run("qmr_arith", limit=n, seed=self.config.seed)]

        key = self._key(name, n, self.config.n_test, self.config.max_new_tokens, self.config.seed)
        rows = self.cached(f"samples-{name}", key, run, "evaluate", jsonl=True)
        return self.cached(f"labels-{name}", key, lambda: [self._labels(r) for r in rows], "judge", jsonl=True)

    def _labels(self, row: dict) -> dict:
        truth = label(self.problems[row["doc_index"]], row["response"])
        rule = rule_judge.judge(row["response"])
        return {**row, "truth_status": truth.status, "truth_step": truth.first_error_step,
                "truth_type": truth.primary_error_type, "rule_status": rule.status,
                "rule_step": rule.first_error_step if rule.status == "error" else -1}

    def load_dense(self, path: Path) -> Callable[[], tuple]:
        from pytest_qmr.models import load

        return lambda: load(path)

    # ------------------------------------------------------------------ the lab

    def table1(self) -> tuple[list[dict], list[dict]]:
        fp_rows = self.evaluate("fp", self.load_dense(self.fp.path), self.config.n_test)
        cells = []
        for name in self.config.quantizers:
            rows = self.evaluate(name, self.load_dense(self.quantized_path(name)), self.config.n_test)
            cells.append(cell_summary(name, fp_rows, rows))
            self.write(fp_rows, cells, None, [])  # partial results are results too
        return fp_rows, cells

    def restore_target(self, cells: list[dict]) -> str:
        if self.config.restore_quantizer:
            return self.config.restore_quantizer
        w4 = [c for c in cells if "-w4" in c["quantizer"]] or cells
        return max(w4, key=lambda c: (c["p_value"] < 0.01, c["drop"]))["quantizer"]

    def traces(self, name: str) -> list[dict]:
        """The quantized model's greedy answers to the first ``n_train`` train problems, each
        located at its first faulty step by Restore's mining (the Locate stage)."""
        from pytest_qmr import restore as rs

        qpath = self.quantized_path(name)
        train = rs.arith_problems("train", self.config.n_train, self.config.seed)
        return self.cached(f"traces-{name}", self._key(name, self.config.n_train, self.config.max_new_tokens),
                           lambda: rs.mine_traces(qpath, train, max_new_tokens=self.config.max_new_tokens,
                                                  batch_size=self.config.batch_size), "mine", jsonl=True)

    def pairs(self, name: str, variant: str) -> list:
        """At most ``pair_budget`` gold-teacher pairs of ``variant`` from :meth:`traces` (drawn with the
        lab's seed, whatever the training seed)."""
        from pytest_qmr import restore as rs

        qpath = self.quantized_path(name)
        traces = self.traces(name)

        def make() -> list[dict]:
            from transformers import AutoTokenizer

            pairs = rs.build_pairs(traces, rs.GoldTeacher(), variant, tokenizer=AutoTokenizer.from_pretrained(qpath),
                                   eval_ids=[p.id for p in self.problems], size=self.config.pair_budget,
                                   seed=self.config.seed, rejected_scope=self.config.rejected_scope)
            return [p.to_dict() for p in pairs[:self.config.pair_budget]]

        key = self._key(name, variant, self.config.n_train, self.config.pair_budget, self.config.rejected_scope,
                        self.config.seed)
        return [rs.PreferencePair.from_dict(p) for p in self.cached(f"pairs-{name}-{variant}", key, make, "pairs",
                                                                    jsonl=True)]

    def restored(self, name: str, variant: str, config, n: int) -> tuple[dict, list[dict], list]:
        """(card, rows, pairs): an adapter trained with ``config`` (a ``RestoreConfig``) on the
        variant's :meth:`pairs`, and the restored model's labelled answers to the first ``n`` test problems."""
        from pytest_qmr import restore as rs

        qpath = self.quantized_path(name)
        pairs = self.pairs(name, variant)
        key = self._key(name, variant, self.config.n_train, self.config.pair_budget, asdict(config),
                        self.config.rejected_scope, self.config.seed)
        adapter = self.work / f"adapter-{name}-{variant}-{key}"
        card = self.cached(f"dpo-{name}-{variant}", key, lambda: rs.train_adapter(
            qpath, pairs, config, adapter, distill_from=self.fp.path), "dpo")
        rows = self.evaluate(f"restored-{name}-{variant}-{key}", lambda: rs.load_restored(qpath, adapter), n)
        return card, rows, pairs

    def restore(self, name: str, fp_rows: list[dict], quant_rows: list[dict]) -> tuple[dict, list[dict]]:
        from pytest_qmr import restore as rs

        config = rs.RestoreConfig.from_settings(self.config.restore_set)
        runs: dict[str, dict] = {}
        for variant in self.config.variants:
            n = self.config.n_test if variant == "all-step" else self.config.ablation_n_test
            card, rows, pairs = self.restored(name, variant, config, n)
            runs[variant] = {"card": card, "rows": rows, "pairs": len(pairs)}
        traces = self.traces(name)
        best = runs.get("all-step") or next(iter(runs.values()))
        restored = best["rows"]
        result = {"quantizer": name, "variant": "all-step" if "all-step" in runs else next(iter(runs)),
                  "teacher": "gold", "rejected_scope": self.config.rejected_scope, "pairs": best["pairs"],
                  "dpo_steps": best["card"]["steps"],
                  "minutes": best["card"]["minutes"], "settings": self.config.restore_set,
                  "train_problems_mined": len(traces),
                  "train_failures_located": sum(rs.is_case(t) for t in traces),
                  **paired("quant", quant_rows, "restored", restored), "fp_acc": accuracy(fp_rows)}
        share = rs.recovered_share(result["fp_acc"], result["quant_acc"], result["restored_acc"])
        result["recovered_share"] = None if share is None else round(share, 4)
        ablation = []
        n_ab = self.config.ablation_n_test
        for variant, run in runs.items():
            ablation.append({"variant": variant, "pairs": run["pairs"], "dpo_steps": run["card"]["steps"],
                             "minutes": run["card"]["minutes"], "n": n_ab,
                             **paired("quant", quant_rows[:n_ab], "restored", run["rows"][:n_ab])})
        return result, ablation

    def write(self, fp_rows: list[dict], cells: list[dict], restore: dict | None, ablation: list[dict]) -> dict:
        results = {
            "fp_acc": accuracy(fp_rows), "n": len(fp_rows), "model": self.config.model,
            "model_fingerprint": self.fp.fingerprint,
            "fp_first_error_step_hist": step_hist(fp_rows),
            "fp_error_profile": error_profile([r for r in fp_rows if not r["correct"]]),
            "cells": cells, "restore": restore, "ablation": ablation,
            "stage_seconds": self.stage_seconds | align_seconds(self.config.model),
            "config": asdict(self.config) | {"data_dir": "<data_dir>", "work": "<work>", "out": "<out>",
                                             "readme": "<readme>"},
            "machine": machine(),
            "command": " ".join(["python", "benchmarks/run_lab.py", *sys.argv[1:]]),
        }
        out = Path(self.config.out)
        atomic_write_json(out / "cpu_lab.json", results)
        plot(results, out / "cpu_lab.png")
        readme = Path(self.config.readme)
        text = readme.read_text() if readme.is_file() else ""
        atomic_write_text(readme, replace_between(text, markdown(results)))
        return results


# ---------------------------------------------------------------------- statistics


def accuracy(rows: list[dict]) -> float:
    return round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else float("nan")


def paired(a_name: str, a: list[dict], b_name: str, b: list[dict]) -> dict:
    """Accuracies of two runs on the same items and the exact McNemar p-value between them."""
    if [r["item_id"] for r in a] != [r["item_id"] for r in b]:
        raise ValueError(f"{a_name} and {b_name} were not measured on the same items")
    result = compare([bool(x["correct"]) for x in a], [bool(y["correct"]) for y in b])
    a_only, b_only, p_value = result.first_only, result.second_only, result.p_value
    return {f"{a_name}_acc": accuracy(a), f"{b_name}_acc": accuracy(b), "n": len(a),
            f"{a_name}_only": a_only, f"{b_name}_only": b_only, "p_value": float(f"{p_value:.4g}")}


def step_hist(rows: list[dict]) -> dict[str, int]:
    """First faulty step (ground truth) of every failing trace; 'none' when the labeller found none."""
    steps = Counter(str(r["truth_step"]) if r["truth_step"] and r["truth_step"] > 0 else "none"
                    for r in rows if not r["correct"])
    return dict(sorted(steps.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0] != "none" else 0)))


def error_profile(rows: list[dict]) -> dict:
    """Ground-truth error types and categories of failing traces, plus the rule judge on them."""
    types = Counter(r["truth_type"] or r["truth_status"] for r in rows)
    categories = Counter(taxonomy.CATEGORY_OF.get(r["truth_type"], "unlabelled") for r in rows)
    located = [r for r in rows if r["truth_step"] and r["truth_step"] > 0]
    rule_found = [r for r in located if r["rule_step"] > 0]
    return {"n": len(rows), "types": dict(types.most_common()), "categories": dict(categories.most_common()),
            "rule_judge": {"flagged": len(rule_found), "of_located": len(located),
                           "same_first_step": sum(r["rule_step"] == r["truth_step"] for r in rule_found)}}


def earlier_test(fp_rows: list[dict], rows: list[dict]) -> dict:
    """'Errors come early': are the quantized model's first faulty steps earlier than FP's?
    One-sided Mann-Whitney U on the located first steps of failing traces."""
    from scipy.stats import mannwhitneyu

    fp_steps = [r["truth_step"] for r in fp_rows if not r["correct"] and r["truth_step"] > 0]
    q_steps = [r["truth_step"] for r in rows if not r["correct"] and r["truth_step"] > 0]
    if not fp_steps or not q_steps:
        return {"p_value": None}
    test = mannwhitneyu(q_steps, fp_steps, alternative="less")
    return {"fp_mean_step": round(sum(fp_steps) / len(fp_steps), 3), "mean_step": round(sum(q_steps) / len(q_steps), 3),
            "share_at_step_1": round(sum(s == 1 for s in q_steps) / len(q_steps), 4),
            "fp_share_at_step_1": round(sum(s == 1 for s in fp_steps) / len(fp_steps), 4),
            "p_value": float(f"{test.pvalue:.4g}")}


def cell_summary(name: str, fp_rows: list[dict], rows: list[dict]) -> dict:
    stats = paired("fp", fp_rows, "quant", rows)
    regressions = [q for f, q in zip(fp_rows, rows, strict=True) if f["correct"] and not q["correct"]]
    drop = stats["fp_acc"] - stats["quant_acc"]
    return {"quantizer": name, "acc": stats["quant_acc"], "n": stats["n"], "p_value": stats["p_value"],
            "drop": round(drop, 4), "relative_drop": round(drop / stats["fp_acc"], 4) if stats["fp_acc"] else None,
            "fp_only": stats["fp_only"], "quant_only": stats["quant_only"],
            "error_profile": error_profile(regressions), "failing_error_profile": error_profile(
                [r for r in rows if not r["correct"]]),
            "first_error_step_hist": step_hist(rows), "errors_earlier_than_fp": earlier_test(fp_rows, rows)}


def align_seconds(model: str) -> dict:
    """The align stage ran once to build the committed adapter: its card has the minutes."""
    from pytest_qmr.models import ADAPTER_DIR, EMBEDDED_MODELS

    name = EMBEDDED_MODELS.get(model.removeprefix("embedded:"))
    card_file = ADAPTER_DIR / str(name) / "qmr_card.json"
    if not name or not card_file.is_file():
        return {}
    minutes, card = 0.0, json.loads(card_file.read_text())
    while card:
        minutes += card.get("minutes", 0.0)
        card = card.get("continued_from")
    return {"align": round(minutes * 60, 1)}


def machine() -> dict:
    import torch

    from pytest_qmr.pipeline import library_versions

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "libraries": library_versions()}


# ---------------------------------------------------------------------- README and plot

BEGIN, END = "<!-- lab-results:begin -->", "<!-- lab-results:end -->"


def replace_between(text: str, body: str) -> str:
    return replace_marked(text, BEGIN, END, body)


def markdown(results: dict) -> str:
    lines = [f"Measured by `{results['command']}` on {results['machine']['cpus']} CPUs "
             f"({results['machine']['processor']}), {results['n']} `qmr_arith` test problems, greedy.", "",
             "| model | accuracy | change (points) | relative drop | McNemar p vs FP | regressions: execution / method "
             "/ other | failing traces with first error at step 1 |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| FP | {results['fp_acc']:.3f} | | | | | {share_step1(results['fp_first_error_step_hist'])} |"]
    for c in results["cells"]:
        cats = c["error_profile"]["categories"]
        other = c["error_profile"]["n"] - cats.get("execution", 0) - cats.get("method", 0)
        lines.append(f"| {c['quantizer']} | {c['acc']:.3f} | {-100 * c['drop']:+.1f} | "
                     f"{100 * (c['relative_drop'] or 0):.1f}% | {c['p_value']:.3g} | {cats.get('execution', 0)} / "
                     f"{cats.get('method', 0)} / {other} | {share_step1(c['first_error_step_hist'])} |")
    r = results.get("restore")
    if r:
        lines += ["", f"Restore ({r['variant']}, gold teacher, {r['pairs']} pairs from the train split, "
                      f"{r['dpo_steps']} DPO steps, {r['minutes']:.1f} min, `{' '.join(r['settings'])}`): "
                      f"{r['quantizer']} FP {r['fp_acc']:.3f} / quantized {r['quant_acc']:.3f} / restored "
                      f"{r['restored_acc']:.3f} (McNemar p {r['p_value']:.3g} vs quantized; recovered "
                      f"{'n/a' if r['recovered_share'] is None else format(r['recovered_share'], '.0%')} of the loss)."]
    if results.get("ablation"):
        lines += ["", "| variant (same pair budget) | pairs | DPO steps | minutes | items | quantized | restored | p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {a['variant']} | {a['pairs']} | {a['dpo_steps']} | {a['minutes']:.1f} | {a['n']} | "
                  f"{a['quant_acc']:.3f} | {a['restored_acc']:.3f} | {a['p_value']:.3g} |" for a in results["ablation"]]
    stages = {k: v for k, v in results["stage_seconds"].items() if ":" not in k}
    lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + "."]
    return "\n".join(lines)


def share_step1(hist: dict) -> str:
    located = sum(v for k, v in hist.items() if k != "none")
    return f"{hist.get('1', 0)}/{located}" if located else "–"


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    names = ["fp"] + [c["quantizer"] for c in results["cells"]]
    accs = [results["fp_acc"]] + [c["acc"] for c in results["cells"]]
    if results.get("restore"):
        names.append(f"{results['restore']['quantizer']}\n+restore")
        accs.append(results["restore"]["restored_acc"])
    ax1.bar(range(len(names)), accs, color="#4c72b0")
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel(f"accuracy ({results['n']} qmr_arith test problems)")
    ax1.set_ylim(0, 1)
    for label_, hist in [("fp", results["fp_first_error_step_hist"])] + [
            (c["quantizer"], c["first_error_step_hist"]) for c in results["cells"]]:
        steps = sorted(int(k) for k in hist if k != "none")
        total = sum(hist[str(s)] for s in steps) or 1
        ax2.plot(steps, [hist[str(s)] / total for s in steps], marker="o", label=label_)
    ax2.set_xlabel("first faulty step (ground truth)")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_ylabel("share of located failing traces")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = LabConfig()
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--quantizers", nargs="+", default=defaults.quantizers, choices=list(QUANTIZERS))
    parser.add_argument("--restore-quantizer", default="", choices=["", *QUANTIZERS])
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--pair-budget", type=int, default=defaults.pair_budget)
    parser.add_argument("--rejected-scope", default=defaults.rejected_scope, choices=["rest", "step"],
                        help="reject the quantized model's whole continuation or only its faulty step")
    parser.add_argument("--restore-set", nargs="*", default=defaults.restore_set, metavar="KEY=VALUE",
                        help="RestoreConfig settings of every Restore run")
    parser.add_argument("--variants", nargs="+", default=defaults.variants)
    parser.add_argument("--ablation-n-test", type=int, default=defaults.ablation_n_test)
    parser.add_argument("--skip-restore", action="store_true")
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("QMR_DATA_DIR", defaults.data_dir))
    parser.add_argument("--work", default=defaults.work, help="stage cache (resumable)")
    parser.add_argument("--out", default=defaults.out, help="where cpu_lab.json and cpu_lab.png go")
    parser.add_argument("--readme", default=defaults.readme, help="Markdown file whose results block is rewritten")
    args = parser.parse_args(argv)
    config = LabConfig(n_test=args.n_test, quantizers=args.quantizers, restore_quantizer=args.restore_quantizer,
                       n_train=args.n_train, pair_budget=args.pair_budget, rejected_scope=args.rejected_scope,
                       restore_set=args.restore_set,
                       variants=["all-step"] if args.skip_ablation else args.variants,
                       ablation_n_test=min(args.ablation_n_test, args.n_test), data_dir=args.data_dir, work=args.work,
                       out=args.out, readme=args.readme)
    if not Path(config.data_dir).is_dir():
        raise SystemExit(f"--data-dir {config.data_dir}: no such directory (set QMR_DATA_DIR)")
    lab = Lab(config)
    fp_rows, cells = lab.table1()
    restore, ablation = None, []
    if not args.skip_restore and cells:
        name = lab.restore_target(cells)
        quant_rows = lab.evaluate(name, lab.load_dense(lab.quantized_path(name)), config.n_test)
        restore, ablation = lab.restore(name, fp_rows, quant_rows)
    results = lab.write(fp_rows, cells, restore, ablation)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
