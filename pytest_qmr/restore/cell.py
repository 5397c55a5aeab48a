"""The built-in ``pytest_qmr_restore``: Silver Bullet repair of one failing cell.

:func:`restore_cell` reads the cell's :class:`~pytest_qmr.records.CellContext` and answers
through the session's engines (so every generation goes through the generation cache):

1. the quantized model (the dense copy the adapter is trained on: ours, or the dense copy of a user's
   packed AWQ / GPTQ / compressed-tensors checkpoint) answers ``restore.train_problems``
   problems of the benchmark's training split (the training-problem source registered for the
   cell's task), each failure located at its first faulty step by the suite's own ``locate:``
   judges and policy (the same Locate stage as the cell's);
2. the teacher continues each failure from just before that step: ``pairs.jsonl``;
3. trl's DPO trains a LoRA adapter (``adapter/``, cached by everything it depends on);
4. the cell's items are re-measured with the adapter on the dense copy
   (``restored_samples.jsonl``), gated against the baseline and paired with the quantized
   answers (McNemar); with ``restore.mmlu_limit`` MMLU before and after; deployed (default with
   backend vllm): the packed checkpoint (ours or the user's) + adapter through vLLM's LoRA support
   (``restored_deployed_samples.jsonl``).

Returns the ``restore`` record of ``result.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import models
from ..fsutil import atomic_write_jsonl, sha256_json
from ..records import CellContext, CellResult, SampleRecord
from ..engines import NotServable
from ..quantize.formats import checkpoint_format
from .problems import training_problems
from .records import RestoreResult
from .teachers import make_teacher
from .train import RestoreConfig, train_adapter


def restore_cell(session, cell, result: CellResult, records: list[SampleRecord], context: CellContext) -> dict:
    """The default pytest_qmr_restore (module docstring)."""
    from ..cache import cached_adapter
    from ..baselines import gate_cell, item_count
    from ..sampled_gate import paired_p_value
    from .mining import mine_traces
    from .pairs import build_pairs
    from .records import write_pairs

    spec, gen, seed = cell.restore, session.generation_settings(cell), cell.benchmark.seed
    cell_dir, fp, baseline = context.cell_dir, context.fp, context.baseline
    quant_path = trainable(session, cell, context.quantized)
    started = time.monotonic()
    problems = training_problems(cell.benchmark.task, spec.train_problems, seed, session.data_dir_of(cell))
    tokenizer = session.tokenizer(quant_path, cell.model.trust_remote_code)
    session.say(cell, f"restore: mining {len(problems)} training problems")
    traces = mine_traces(quant_path, problems, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                         tokenizer=tokenizer, generate=session.greedy(cell, quant_path), judges=cell.locate.judges,
                         policy=cell.locate.policy, judge_config=cell.judge_config)  # the cell's own Locate
    teacher = make_teacher(spec.teacher, model=fp.path, judge_config=cell.judge_config,
                           max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size)
    pairs = build_pairs(traces, teacher, spec.variant, tokenizer=tokenizer, pool=traces, size=spec.max_pairs,
                        seed=seed, eval_ids=[r.item_id for r in records], rejected_scope=spec.rejected_scope)
    if spec.max_pairs is not None:  # build_pairs raises "nothing to restore" itself when none are left
        pairs = pairs[:spec.max_pairs]
    write_pairs(cell_dir / "pairs.jsonl", pairs)
    config = RestoreConfig(**spec.train)
    session.say(cell, f"restore: training on {len(pairs)} pairs")
    runtime = session.runtime(cell)
    card = cached_adapter(session.cache_dir, adapter_inputs(quant_path, fp, pairs, config, runtime),
                          cell_dir / "adapter",
                          lambda: train_adapter(quant_path, pairs, config, cell_dir / "adapter",
                                                   distill_from=fp.path, runtime=runtime),
                          enabled=session.use_cache)
    if card.get("cache_hit"):
        session.say(cell, "restore: adapter from cache (inputs unchanged, files verified)")
    adapter = cell_dir / "adapter"
    again = session.evaluate(quant_path, cell, [r.doc_index for r in records], None, stage="restore",
                             adapter=adapter, backend="hf")  # the dense copy it was trained on
    atomic_write_jsonl(cell_dir / "restored_samples.jsonl", (r.to_dict() for r in again))
    quant = {r.item_id: r.n_correct for r in records}  # right answers per item (of k sampled; 0/1 greedy)
    paired = [(quant[r.item_id], r.n_correct) for r in again if r.item_id in quant]
    restored_gate = gate_cell(cell, baseline, again, [item_count(baseline.items[r.item_id]) for r in again],
                              session.thresholds(cell))
    outcome = RestoreResult(
        pairs=len(pairs), teacher=spec.teacher, variant=spec.variant, steps=card["steps"],
        minutes=round((time.monotonic() - started) / 60, 2), adapter_path=card["adapter_path"],
        fp_acc=result.gate.fp_acc if result.gate else None, quant_acc=result.accuracy,
        restored_acc=sum(r.n_correct / r.k for r in again) / max(len(again), 1),
        p_value=paired_p_value([q for q, _ in paired], [r for _, r in paired], again[0].k if again else 1),
        n_eval=len(again), card=card,
    ).to_dict()
    outcome["restored_verdict"] = restored_gate.verdict
    outcome["restored_gate"] = restored_gate.to_dict()
    if spec.mmlu_limit:
        outcome["mmlu"] = {name: sum(r.correct for r in recs) / max(len(recs), 1)
                           for name, recs in (("quantized", _mmlu(session, cell, quant_path, None)),
                                              ("restored", _mmlu(session, cell, quant_path, adapter)))}
        outcome["mmlu"]["n"] = spec.mmlu_limit
    if spec.deployed if spec.deployed is not None else deploying_engine(session, cell) is not None:
        outcome["deployed"] = deployed_restore(session, cell, context, result, records, again, adapter)
    return outcome


DEPLOYED_ENGINE = "vllm"  # serves a compressed checkpoint with a LoRA adapter when the cell's own engine does not


def deploying_engine(session, cell) -> str | None:
    """The cell's engine when it evaluates what a user deploys (the compressed checkpoint) and
    serves adapters, else None."""
    engine = session.engine(session.backend(cell))
    return engine.name if engine.default_artifact == "compressed" and engine.adapters else None


def deployed_restore(session, cell, context: CellContext, result: CellResult, records: list[SampleRecord],
              dense: list[SampleRecord], adapter: Path) -> dict:
    """The restored model as a user deploys it: the compressed checkpoint with the adapter
    through vLLM's LoRA support, on the same items as the dense re-measurement."""
    if context.compressed is None:
        return {"error": f"{cell.quantizer.method} writes no compressed checkpoint"}
    backend = deploying_engine(session, cell) or DEPLOYED_ENGINE
    dtype = session.engine_dtype(cell, "compressed", checkpoint_format(context.compressed), backend=backend)
    session.say(cell, f"restore: re-measuring the compressed checkpoint + adapter on {backend}")
    try:
        served = session.evaluate(context.compressed, cell, [r.doc_index for r in records], None,
                                  stage="restore-deployed", adapter=adapter, dtype=dtype, backend=backend)
    except NotServable as exc:
        return {"servable": False, "line": str(exc)}
    atomic_write_jsonl(context.cell_dir / "restored_deployed_samples.jsonl", (r.to_dict() for r in served))
    by_id = {r.item_id: r for r in dense}
    n = max(len(served), 1)
    return {"servable": True, "artifact": "compressed", "dtype": dtype,
            "served": session.served.pop(str(context.compressed), None),
            "restored_acc": sum(r.correct for r in served) / n, "n": len(served),
            "dense_restored_acc": sum(r.correct for r in dense) / max(len(dense), 1),
            "agreement_with_dense": sum(r.correct == by_id[r.item_id].correct for r in served) / n,
            "text_identical_with_dense": sum(r.response == by_id[r.item_id].response for r in served) / n}


def _mmlu(session, cell, path: Path, adapter: Path | None) -> list[SampleRecord]:
    """Restore's general-ability check: the first ``restore.mmlu_limit`` MMLU items."""
    evaluator = session.evaluator(path, cell, adapter, backend="hf")  # the dense copy, with and without
    try:
        return evaluator.run("qmr_mmlu", limit=cell.restore.mmlu_limit)
    finally:
        session.count(cell, "mmlu", evaluator.lm.stats)


def trainable(session, cell, path: Path) -> Path:
    """The checkpoint Restore mines, trains on and re-measures: ``path`` when it is dense (our own
    fake-quant copy), else the dense copy of a user's packed checkpoint (AWQ, GPTQ, compressed-tensors;
    :func:`pytest_qmr.quantize.dequantize.dense_copy`): peft trains on plain linear layers."""
    if not (checkpoint_format(path) or {}).get("packed"):
        return path
    from ..quantize.dequantize import dense_copy

    session.say(cell, "restore: unpacking the checkpoint into a dense copy to train on")
    return dense_copy(path, models.checkpoint_fingerprint(path), session.cache_dir)


def adapter_inputs(quant_path: Path, fp: models.ResolvedModel, pairs, config, runtime) -> dict:
    """Everything a trained adapter depends on (its cache key), the device it trains on included."""
    from dataclasses import asdict

    from ..versions import ADAPTER, package_versions

    return {"base": models.checkpoint_fingerprint(quant_path),
            "pairs_sha256": sha256_json([p.to_dict() for p in pairs]),
            "config": asdict(config), "distill_from": fp.fingerprint if config.distill_weight > 0 else None,
            "runtime": runtime.to_dict(),
            "libraries": package_versions(ADAPTER)}

