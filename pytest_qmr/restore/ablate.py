"""The lab ablation (paper Table 2): Restore variants compared at one pair budget on one test set.

:func:`ablate` quantizes the lab model, mines the qmr_arith train split once, builds each
variant's pairs (gold teacher) cut to the same budget, trains one adapter per variant and
measures every model on the same qmr_arith test items (McNemar against the quantized model);
:func:`format_table` prints the rows. ``qmr ablate`` runs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import arith
from ..fsutil import atomic_write_json, atomic_write_jsonl
from .mining import mine_traces
from .pairs import build_pairs
from .problems import arith_problems
from .records import RestoreResult, write_pairs
from .teachers import GoldTeacher
from .train import RestoreConfig, load_restored, train_adapter


@dataclass
class AblationConfig:
    """The lab ablation (paper Table 2): one pair budget, several variants, one test set."""

    model: str = "embedded:smollm2-135m-arith"
    method: str = "rtn"
    bits: int = 3
    group_size: int = 64
    variants: tuple[str, ...] = ("all-step", "all-ns", "rand-ns")
    n_train: int = 200
    n_test: int = 40
    budget: int | None = None  # pairs per variant (default: as many as all-step yields)
    max_new_tokens: int = 160
    batch_size: int = 16
    seed: int = 0


def _accuracy(model, tokenizer, n_test: int, config: AblationConfig) -> list[bool]:
    from ..measure import Evaluator, GenerationSettings

    ev = Evaluator(model, tokenizer, GenerationSettings(config.max_new_tokens, config.batch_size), None)
    return [r.correct for r in ev.run("qmr_arith", limit=n_test, seed=config.seed)]


def ablate(config: AblationConfig, restore: RestoreConfig, work_dir: str | os.PathLike,
           cache: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """quantize -> mine the train split -> pairs per variant (same budget) -> DPO each ->
    evaluate each on the same qmr_arith test items. One row per model variant."""
    from ..gate import compare
    from ..models import load, resolve
    from ..quantize import QuantSpec, quantize

    work = Path(work_dir)
    base = resolve(config.model, Path(cache) if cache else None)
    qm = quantize(base.path, base.fingerprint, QuantSpec(method=config.method, bits=config.bits,
                                                         group_size=config.group_size),
                  Path(cache) if cache else None)
    model, tokenizer = load(qm.path)
    traces = mine_traces(qm.path, arith_problems("train", config.n_train, config.seed),
                         max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                         model_and_tokenizer=(model, tokenizer))
    atomic_write_jsonl(work / "traces.jsonl", traces)
    eval_ids = [p.id for p in arith.generate("test", config.n_test, 0)]
    quant = _accuracy(model, tokenizer, config.n_test, config)
    fp = _accuracy(*load(base.path), config.n_test, config)
    budget = config.budget
    rows = [{"variant": "fp", "pairs": 0, "acc": sum(fp) / len(fp)},
            {"variant": "quantized", "pairs": 0, "acc": sum(quant) / len(quant)}]
    for variant in config.variants:
        pairs = build_pairs(traces, GoldTeacher(), variant, tokenizer=tokenizer, eval_ids=eval_ids,
                            size=budget, seed=config.seed)
        if budget is None:
            budget = len(pairs)
        pairs = pairs[:budget]
        write_pairs(work / f"pairs-{variant}.jsonl", pairs)
        card = train_adapter(qm.path, pairs, restore, work / f"adapter-{variant}", distill_from=base.path)
        restored = _accuracy(*load_restored(qm.path, work / f"adapter-{variant}"), config.n_test, config)
        result = RestoreResult(len(pairs), "gold", variant, card["steps"], card["minutes"], card["adapter_path"],
                               rows[0]["acc"], rows[1]["acc"], sum(restored) / len(restored),
                               compare(quant, restored).p_value,
                               config.n_test, card)
        rows.append({"variant": variant, **result.to_dict(), "acc": result.restored_acc})
        atomic_write_json(work / "ablation.json", {"config": asdict(config), "restore": asdict(restore),
                                                   "rows": rows})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'variant':<10} {'pairs':>5} {'steps':>5} {'min':>6} {'acc':>6} {'Δ vs quant':>10} {'p':>8} "
             f"{'recovered':>9}"]
    quant = next((r["acc"] for r in rows if r["variant"] == "quantized"), None)
    for r in rows:
        delta = "" if quant is None else f"{r['acc'] - quant:+.3f}"
        p = "" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        rec = "" if r.get("recovered") is None else f"{r['recovered']:.0%}"
        steps = r.get("steps", "")
        minutes = "" if r.get("minutes") is None else f"{r['minutes']:.1f}"
        lines.append(f"{r['variant']:<10} {r['pairs']:>5} {steps:>5} {minutes:>6} {r['acc']:>6.3f} {delta:>10} "
                     f"{p:>8} {rec:>9}")
    return "\n".join(lines)

