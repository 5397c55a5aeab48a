"""Restore on the lab: how much of a W4 loss Silver Bullet wins back, over training seeds, with MMLU kept,
and the paper's ablations at one budget.

    python benchmarks/restore_lab.py                     # RTN/AWQ/GPTQ-W4, seeds 0-2, ablations (hours on 2 cores)
    python benchmarks/restore_lab.py --quantizers rtn-w4g64 --seeds 0 --skip-ablations   # one run

For every quantizer: the FP and quantized models answer the first ``n_test`` ``qmr_arith`` test
problems; the quantized model answers ``n_train`` train problems, located by Restore's mining (the
Locate stage); ``pair_budget`` gold-teacher Silver Bullet pairs (cut at the first faulty step) train
one LoRA adapter per training seed under ``restore_set`` (the minutes cap included); each restored
model is measured on the same test items (McNemar against the quantized model, Newcombe's paired
interval against FP for non-inferiority at ``margin``) and on the first ``mmlu_limit`` MMLU items
before and after. The ablations train one adapter each on the ablation quantizer at the same pair
budget and settings (:data:`ABLATIONS`) and are measured on the first ``ablation_n_test`` items.

Writes ``benchmarks/results/restore_lab.json`` (command, date, machine and library versions inside),
``restore_lab.png`` and the restore-lab blocks of ``benchmarks/README.md`` and ``README.md``. Every
stage is cached under ``--work`` with run_lab.py's keys (its Table 1 evaluations, quantized
checkpoints and mined traces are reused), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # run_lab.py beside it (already there when run as a script)

from run_lab import QUANTIZERS, Lab, LabConfig, accuracy, machine, paired  # noqa: E402

from pytest_qmr.fsutil import atomic_write_json, atomic_write_text, save_figure, write_marked  # noqa: E402
from pytest_qmr.gate import paired_delta_ci, wilson  # noqa: E402
from pytest_qmr.restore import RestoreConfig, recovered_share  # noqa: E402

HERE = Path(__file__).resolve().parent

#: ablation name -> (Restore variant, settings added to ``restore_set``); all at the same pair budget
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "silver-bullet": ("all-step", []),  # cut at the first faulty step (the default)
    "whole-trace": ("all-ns", []),  # the teacher's whole solution vs the whole quantized response
    "sft-only": ("all-step", ["mode=sft"]),  # the chosen continuations of the same pairs, no preference
    "random-cut": ("rand-cut", []),  # the same cases cut at a random step up to the fault
    "random-problems": ("rand-ns", []),  # random train problems, failed or not
    "execution-only": ("ee-step", []),
    "method-only": ("me-step", []),
    "conceptual-only": ("ce-step", []),
}


@dataclass
class RestoreLabConfig:
    quantizers: list[str] = field(default_factory=lambda: ["rtn-w4g64", "awq-w4g64", "gptq-w4g64"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_test: int = 500
    lab: LabConfig = field(default_factory=LabConfig)  # model, n_train, pair_budget, restore_set, work...
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    ablation_quantizer: str = "rtn-w4g64"
    ablation_n_test: int = 200
    mmlu_limit: int = 200
    margin: float = 0.02  # non-inferiority of the restored model against FP
    goal: float = 0.75  # the share of the loss to win back
    out: str = str(HERE / "results")
    readmes: list[str] = field(default_factory=lambda: [str(HERE / "README.md"), str(HERE.parent / "README.md")])


class RestoreLab:
    """One run: :class:`run_lab.Lab`'s cached stages plus MMLU, per quantizer and seed."""

    def __init__(self, config: RestoreLabConfig) -> None:
        self.config = config
        self.lab = Lab(config.lab)

    def mmlu(self, name: str, load_model) -> list[dict]:
        """The model's answers to ``mmlu_limit`` MMLU test items spread over the subjects, scored
        0-shot by the log-likelihood of each choice (lm-eval's stock MMLU template, :func:`mmlu_task`)."""
        from pytest_qmr.measure import Evaluator, GenerationSettings, TaskSource

        def run() -> list[dict]:
            folder = mmlu_task(self.lab.work / f"mmlu-task-{self.config.mmlu_limit}", Path(self.config.lab.data_dir),
                               self.config.mmlu_limit)
            model, tokenizer = load_model()
            evaluator = Evaluator(model, tokenizer, GenerationSettings(1, self.config.lab.batch_size), None,
                                  source=TaskSource((folder,)))
            return [{"item_id": r.item_id, "correct": bool(r.correct)} for r in evaluator.run(MMLU_TASK)]

        key = self.lab._key(name, "mmlu-loglikelihood", self.config.mmlu_limit)
        return self.lab.cached(f"mmlu-{name}", key, run, "mmlu", jsonl=True)

    def quantizer(self, name: str, fp_rows: list[dict]) -> dict:
        """Restore of one quantizer over the seeds: the record ``restore_lab.json`` keeps per quantizer."""
        from pytest_qmr import restore as rs

        lab, n = self.lab, self.config.n_test
        qpath = lab.quantized_path(name)
        quant_rows = lab.evaluate(name, lab.load_dense(qpath), n)
        mmlu_before = self.mmlu(name, lab.load_dense(qpath))
        runs = []
        for seed in self.config.seeds:
            config = RestoreConfig.from_settings([*self.config.lab.restore_set, f"seed={seed}"])
            card, rows, pairs = lab.restored(name, "all-step", config, n)
            adapter = Path(card["adapter_path"])
            mmlu_after = self.mmlu(f"restored-{adapter.name}", lambda adapter=adapter: rs.load_restored(qpath, adapter))
            runs.append(run_record(seed, card, len(pairs), fp_rows, quant_rows, rows, mmlu_before, mmlu_after,
                                   self.config.margin))
        return quantizer_record(name, fp_rows, quant_rows, runs, mmlu_before, self.config)

    def ablation(self, fp_rows: list[dict]) -> list[dict]:
        """One row per ablation on the ablation quantizer (training seed: the first), same budget and settings."""
        from pytest_qmr.restore import RestoreError

        lab, n, name = self.lab, self.config.ablation_n_test, self.config.ablation_quantizer
        quant_rows = lab.evaluate(name, lab.load_dense(lab.quantized_path(name)), self.config.n_test)[:n]
        reference: list[dict] | None = None
        out = []
        for ablation in self.config.ablations:
            variant, settings = ABLATIONS[ablation]
            config = RestoreConfig.from_settings([*self.config.lab.restore_set, *settings,
                                                  f"seed={self.config.seeds[0]}"])
            try:
                card, rows, pairs = lab.restored(name, variant, config, self.config.n_test if not settings and
                                                 variant == "all-step" else n)
            except RestoreError as exc:  # e.g. no case of a category: a row that says so
                out.append({"ablation": ablation, "variant": variant, "settings": settings, "pairs": 0,
                            "skipped": str(exc)})
                continue
            rows = rows[:n]
            if ablation == "silver-bullet":
                reference = rows
            out.append(ablation_record(ablation, variant, settings, card, pairs, fp_rows[:n], quant_rows, rows,
                                       reference))
        return out


# ---------------------------------------------------------------------- MMLU

MMLU_TASK = "restore_lab_mmlu"


def mmlu_task(folder: Path, data_dir: Path, n: int) -> Path:
    """``folder`` with a task YAML that includes lm-eval's stock MMLU template (multiple choice, 0-shot,
    log-likelihood: a 135M model that answers MMLU near chance when it generates still ranks choices)
    over ``n`` items of the local copy, taken in turn from each subject (sorted) so every subject counts."""
    import importlib.util
    import json

    from pytest_qmr.tasks.utils import read_mmlu_dir

    # every subject's item 0, then every subject's item 1, ... (a stable sort keeps the subject order)
    rows = [{"question": r["question"], "choices": r["choices"], "answer": "ABCD".index(r["answer"])}
            for r in sorted(read_mmlu_dir(data_dir / "mmlu" / "test", "test"), key=lambda r: r["index"])][:n]
    folder.mkdir(parents=True, exist_ok=True)
    test = folder / "test.jsonl"
    atomic_write_text(test, "".join(json.dumps(r) + "\n" for r in rows))
    template = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks" / "mmlu" / "default"
    atomic_write_text(folder / f"{MMLU_TASK}.yaml",
                      f"include: {template / '_default_template_yaml'}\ntask: {MMLU_TASK}\ndataset_path: json\n"
                      f"dataset_name: null\ndataset_kwargs:\n  data_files: {{test: {test}, dev: {test}}}\n")
    return folder


# ---------------------------------------------------------------------- records


def delta_interval(before: list[dict], after: list[dict]) -> list[float]:
    """Newcombe's 95% interval of after - before accuracy on the same items."""
    stats = paired("before", before, "after", after)
    low, high = paired_delta_ci(stats["before_only"], stats["after_only"], stats["n"],
                                sum(r["correct"] for r in before))
    return [round(low, 4), round(high, 4)]


def run_record(seed: int, card: dict, n_pairs: int, fp_rows: list[dict], quant_rows: list[dict], rows: list[dict],
               mmlu_before: list[dict], mmlu_after: list[dict], margin: float) -> dict:
    """One training seed: accuracy, share won back, p against quantized, interval against FP, MMLU."""
    vs_quant = paired("quant", quant_rows, "restored", rows)
    vs_fp = delta_interval(fp_rows, rows)
    share = recovered_share(accuracy(fp_rows), accuracy(quant_rows), accuracy(rows))
    return {"seed": seed, "restored_acc": accuracy(rows), "recovered_share": None if share is None else round(share, 4),
            "p_value": vs_quant["p_value"], "won": vs_quant["restored_only"], "lost": vs_quant["quant_only"],
            "delta_vs_fp": round(accuracy(rows) - accuracy(fp_rows), 4), "delta_vs_fp_ci": vs_fp,
            "noninferior_to_fp": vs_fp[0] > -margin, "dpo_steps": card["steps"], "minutes": card["minutes"],
            "pairs": n_pairs, "mmlu_after": accuracy(mmlu_after),
            "mmlu_delta_ci": delta_interval(mmlu_before, mmlu_after)}


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def quantizer_record(name: str, fp_rows: list[dict], quant_rows: list[dict], runs: list[dict],
                     mmlu_before: list[dict], config: RestoreLabConfig) -> dict:
    """The per-quantizer record of ``restore_lab.json`` (the issue's fields, per seed and summarised)."""
    shares = spread([r["recovered_share"] for r in runs])
    return {
        "quantizer": name, "n": len(quant_rows), "fp_acc": accuracy(fp_rows), "quant_acc": accuracy(quant_rows),
        "quant_p_value_vs_fp": paired("fp", fp_rows, "quant", quant_rows)["p_value"],
        "restored_acc": [r["restored_acc"] for r in runs], "seeds": [r["seed"] for r in runs],
        "restored_acc_mean": spread([r["restored_acc"] for r in runs])["mean"],
        "recovered_share": shares, "goal_met": shares["mean"] is not None and shares["mean"] >= config.goal,
        "minutes": [r["minutes"] for r in runs], "dpo_steps": [r["dpo_steps"] for r in runs],
        "pairs": runs[0]["pairs"] if runs else 0,
        "p_value": max((r["p_value"] for r in runs), default=None),  # every seed's gain is at least this significant
        "noninferior_to_fp": all(r["noninferior_to_fp"] for r in runs) if runs else None,
        "mmlu_n": len(mmlu_before), "mmlu_before": accuracy(mmlu_before),
        "mmlu_after": [r["mmlu_after"] for r in runs],
        "mmlu_unchanged": all(r["mmlu_delta_ci"][0] <= 0 <= r["mmlu_delta_ci"][1] for r in runs) if runs else None,
        "runs": runs,
    }


def ablation_record(ablation: str, variant: str, settings: list[str], card: dict, pairs: list, fp_rows: list[dict],
                    quant_rows: list[dict], rows: list[dict], reference: list[dict] | None) -> dict:
    n, correct = len(rows), sum(r["correct"] for r in rows)
    vs_quant = paired("quant", quant_rows, "restored", rows)
    record = {"ablation": ablation, "variant": variant, "settings": settings, "n": n, "accuracy": accuracy(rows),
              "interval": [round(float(x), 4) for x in wilson(correct, n)],
              "delta_vs_quant_ci": delta_interval(quant_rows, rows),
              "p_value": vs_quant["p_value"], "pairs": len(pairs), "dpo_steps": card["steps"],
              "minutes": card["minutes"],
              "fp_acc": accuracy(fp_rows), "quant_acc": accuracy(quant_rows),
              "recovered_share": recovered_share(accuracy(fp_rows), accuracy(quant_rows), accuracy(rows)),
              "pair_categories": dict(Counter(p.category or "none" for p in pairs))}
    if reference is not None and reference is not rows:
        vs = paired("silver_bullet", reference, "ablation", rows)
        record["vs_silver_bullet"] = {"won": vs["ablation_only"], "lost": vs["silver_bullet_only"],
                                      "p_value": vs["p_value"]}
    if record["recovered_share"] is not None:
        record["recovered_share"] = round(record["recovered_share"], 4)
    return record


# ---------------------------------------------------------------------- output


BEGIN, END = "<!-- restore-lab:begin -->", "<!-- restore-lab:end -->"


def markdown(results: dict) -> str:
    c = results["config"]
    lines = [f"Measured by `{results['command']}` on {results['date']}, {results['machine']['cpus']} CPUs; "
             f"{c['n_test']} `qmr_arith` test problems, greedy; Restore: {c['lab']['pair_budget']} gold-teacher "
             f"pairs from {c['lab']['n_train']} mined train problems, `{' '.join(c['lab']['restore_set'])}`, "
             f"training seeds {', '.join(map(str, c['seeds']))}; MMLU: {c['mmlu_limit']} items over its subjects, "
             "0-shot log-likelihood.", "",
             "| quantizer | FP | quantized | restored (per seed) | loss won back: mean (min–max) | goal ≥ "
             f"{c['goal']:.0%} | McNemar p (largest) | non-inferior to FP at {c['margin']} | DPO steps | minutes "
             "| MMLU before → after | MMLU unchanged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for q in results["quantizers"]:
        s = q["recovered_share"]
        share = "–" if s["mean"] is None else f"{s['mean']:.0%} ({s['min']:.0%}–{s['max']:.0%})"
        lines.append(
            f"| {q['quantizer']} | {q['fp_acc']:.3f} | {q['quant_acc']:.3f} | "
            f"{' / '.join(f'{a:.3f}' for a in q['restored_acc'])} | {share} | {'yes' if q['goal_met'] else 'no'} | "
            f"{q['p_value']:.3g} | {'yes' if q['noninferior_to_fp'] else 'no'} | "
            f"{' / '.join(map(str, q['dpo_steps']))} | {' / '.join(f'{m:.1f}' for m in q['minutes'])} | "
            f"{q['mmlu_before']:.3f} → {' / '.join(f'{a:.3f}' for a in q['mmlu_after'])} | "
            f"{'yes' if q['mmlu_unchanged'] else 'no'} |")
    if results.get("ablations"):
        lines += ["", f"Ablations on {c['ablation_quantizer']} (first {c['ablation_n_test']} items, same pair budget "
                      "and settings, training seed " + str(c["seeds"][0]) + "):", "",
                  "| ablation | variant | pairs | DPO steps | minutes | accuracy [95% CI] | vs quantized [95% CI] | "
                  "loss won back | vs Silver Bullet: won / lost (p) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for a in results["ablations"]:
            if "skipped" in a:
                lines.append(f"| {a['ablation']} | {a['variant']} | 0 | | | {a['skipped']} | | | |")
                continue
            vs = a.get("vs_silver_bullet")
            share = "–" if a["recovered_share"] is None else f"{a['recovered_share']:.0%}"
            against = "" if vs is None else f"{vs['won']} / {vs['lost']} ({vs['p_value']:.3g})"
            lines.append(
                f"| {a['ablation']} | {' '.join([a['variant'], *a['settings']])} | {a['pairs']} | {a['dpo_steps']} | "
                f"{a['minutes']:.1f} | {a['accuracy']:.3f} [{a['interval'][0]:.3f}, {a['interval'][1]:.3f}] | "
                f"[{a['delta_vs_quant_ci'][0]:+.3f}, {a['delta_vs_quant_ci'][1]:+.3f}] | {share} | {against} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    quantizers = results["quantizers"]
    x = range(len(quantizers))
    for offset, label, key, color in ((-0.27, "FP", "fp_acc", "#999999"), (0.0, "quantized", "quant_acc", "#c44e52"),
                                      (0.27, "restored (seed mean, min–max)", "restored_acc", "#4c72b0")):
        values = [q[key] if key != "restored_acc" else statistics.fmean(q[key]) for q in quantizers]
        errors = None
        if key == "restored_acc":
            errors = [[v - min(q[key]) for v, q in zip(values, quantizers, strict=True)],
                      [max(q[key]) - v for v, q in zip(values, quantizers, strict=True)]]
        ax1.bar([i + offset for i in x], values, width=0.27, label=label, color=color, yerr=errors, capsize=3)
    ax1.set_xticks(list(x), [q["quantizer"] for q in quantizers], fontsize=8)
    ax1.set_ylabel(f"accuracy ({results['config']['n_test']} qmr_arith test problems)")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=7)
    rows = [a for a in results.get("ablations", []) if "skipped" not in a]
    if rows:
        y = range(len(rows))
        accs = [a["accuracy"] for a in rows]
        ax2.errorbar(accs, list(y), fmt="o", capsize=3,
                     xerr=[[a - r["interval"][0] for a, r in zip(accs, rows, strict=True)],
                           [r["interval"][1] - a for a, r in zip(accs, rows, strict=True)]])
        ax2.axvline(rows[0]["quant_acc"], color="#c44e52", linestyle="--", label="quantized")
        ax2.axvline(rows[0]["fp_acc"], color="#999999", linestyle="--", label="FP")
        ax2.legend(fontsize=7)
        ax2.set_yticks(list(y), [f"{a['ablation']} ({a['pairs']} pairs)" for a in rows], fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xlabel(f"accuracy, first {results['config']['ablation_n_test']} items (95% CI)")
        ax2.set_title(f"ablations on {results['config']['ablation_quantizer']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def write(results: dict, config: RestoreLabConfig) -> None:
    out = Path(config.out)
    atomic_write_json(out / "restore_lab.json", results)
    plot(results, out / "restore_lab.png")
    for readme in config.readmes:
        write_marked(readme, BEGIN, END, markdown(results))


def run(config: RestoreLabConfig, skip_ablations: bool = False) -> dict:
    lab = RestoreLab(config)
    fp_rows = lab.lab.evaluate("fp", lab.lab.load_dense(lab.lab.fp.path), config.n_test)
    results = {"command": " ".join(["python", "benchmarks/restore_lab.py", *sys.argv[1:]]),
               "date": datetime.date.today().isoformat(), "machine": machine(), "model": config.lab.model,
               "model_fingerprint": lab.lab.fp.fingerprint, "fp_acc": accuracy(fp_rows), "n": config.n_test,
               "config": asdict(config) | {"out": "<out>", "readmes": ["<readme>"] * len(config.readmes),
                                           "lab": asdict(config.lab) | {"data_dir": "<data_dir>", "work": "<work>",
                                                                        "out": "<out>", "readme": "<readme>"}},
               "quantizers": [], "ablations": []}
    for name in config.quantizers:
        results["quantizers"].append(lab.quantizer(name, fp_rows))
        write(results, config)  # partial results are results too
    if not skip_ablations and config.ablations:
        results["ablations"] = lab.ablation(fp_rows)
    results["stage_seconds"] = lab.lab.stage_seconds
    write(results, config)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults, lab_defaults = RestoreLabConfig(), LabConfig()
    parser.add_argument("--quantizers", nargs="+", default=defaults.quantizers, choices=list(QUANTIZERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds, help="training seeds")
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--n-train", type=int, default=lab_defaults.n_train)
    parser.add_argument("--pair-budget", type=int, default=lab_defaults.pair_budget)
    parser.add_argument("--restore-set", nargs="*", default=lab_defaults.restore_set, metavar="KEY=VALUE",
                        help="RestoreConfig settings of every Restore run")
    parser.add_argument("--ablations", nargs="+", default=defaults.ablations, choices=list(ABLATIONS))
    parser.add_argument("--ablation-quantizer", default=defaults.ablation_quantizer, choices=list(QUANTIZERS))
    parser.add_argument("--ablation-n-test", type=int, default=defaults.ablation_n_test)
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--mmlu-limit", type=int, default=defaults.mmlu_limit)
    parser.add_argument("--data-dir", default=os.environ.get("QMR_DATA_DIR", lab_defaults.data_dir))
    parser.add_argument("--work", default=lab_defaults.work, help="stage cache, shared with run_lab.py (resumable)")
    parser.add_argument("--out", default=defaults.out, help="where restore_lab.json and restore_lab.png go")
    parser.add_argument("--readme", nargs="+", default=defaults.readmes, help="Markdown files whose block is rewritten")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        raise SystemExit(f"--data-dir {args.data_dir}: no such directory (set QMR_DATA_DIR)")
    lab = LabConfig(n_test=args.n_test, quantizers=args.quantizers, n_train=args.n_train, pair_budget=args.pair_budget,
                    restore_set=args.restore_set, data_dir=args.data_dir, work=args.work)
    config = RestoreLabConfig(quantizers=args.quantizers, seeds=args.seeds, n_test=args.n_test, lab=lab,
                              ablations=args.ablations, ablation_quantizer=args.ablation_quantizer,
                              ablation_n_test=min(args.ablation_n_test, args.n_test), mmlu_limit=args.mmlu_limit,
                              out=args.out, readmes=args.readme)
    results = run(config, args.skip_ablations)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
