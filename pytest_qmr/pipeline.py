"""The cell pipeline: one model x quantizer x benchmark cell through the stages, records flowing one way.

:class:`CellPipeline` runs one :class:`~pytest_qmr.suite.Cell` on a
:class:`~pytest_qmr.session.QmrSession` (which holds what outlives a cell: the loaded model,
tokenizers, servers, the generation cache):

1. **resolve** the FP model (a safetensors directory with its checkpoint fingerprint);
2. **baseline**: the committed FP baseline, checked against the cell before anything generates
   (fingerprint, generation settings, seed, scoring, dtype, and every item's id, prompt and gold);
   with ``--qmr-update-baselines`` a fresh FP run written atomically;
3. **reuse** (``--qmr-resume``): a finished cell whose recorded inputs hash is this one's;
4. **quantize**: the quantizer's checkpoint (content-addressed, verified) and the
   :class:`~pytest_qmr.records.CellContext` a Restore hook gets;
5. **measure**: the cell's artifact on its backend, sequentially stopped once the verdict is
   settled; ``samples.jsonl`` is written before anything else can fail;
6. **gate** against the baseline, item by item;
7. **locate** the first faulty step of every regressed item (``located.jsonl``, the error
   profile, the review queue);
8. **settle** the outcome (gate, error-profile thresholds, ``restore.min_gain``);
9. **restore** through the ``pytest_qmr_restore`` hook when the suite asks, then settle again;
10. **write** ``result.json``.

An engine that has no kernel for the checkpoint ends the cell at step 5 with outcome
``not_servable``. Every stage's wall time goes into ``result.seconds``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import baselines as bl
from . import models
from .calibration import CalibrationSpec
from .fsutil import atomic_write_jsonl, sha256_file, sha256_json
from .locate.profile import ErrorProfile
from .quantize import QuantSpec, get_method, quantize
from .quantize.formats import checkpoint_format
from .records import CellContext, CellResult, GateResult, SampleRecord
from .rundir import records_problem, write_result, write_samples
from .engines import NotServable
from .errors import QmrError
from .versions import RECORDS, package_versions


def library_versions() -> dict[str, str | None]:
    """The library versions a baseline's provenance and a cell's reuse inputs record."""
    return package_versions(RECORDS)


def quant_spec(cell) -> QuantSpec:
    """What a cell's quantizer builds (its effective recipe keys the checkpoint cache)."""
    q = cell.quantizer
    calibration = CalibrationSpec(**q.calibration.model_dump()) if q.calibration is not None else None
    return QuantSpec(method=q.method, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric,
                     ignore=tuple(q.ignore), path=cell.checkpoint, calibration=calibration,
                     options=tuple(sorted(q.options.items())),
                     recipe=str(cell.recipe_file) if cell.recipe_file is not None else None)


def restore_shortfall(restore: dict, min_gain: float) -> str | None:
    """Why a Restore did not win back ``restore.min_gain`` (None: it did)."""
    if restore.get("error"):
        return f"restore.min_gain {min_gain:g} required, but Restore did not run: {restore['error']}"
    quant, restored = restore.get("quant_acc"), restore.get("restored_acc")
    if not all(isinstance(v, (int, float)) for v in (quant, restored)):
        return f"restore.min_gain {min_gain:g} required, but the Restore result has no quant_acc/restored_acc"
    gain = restored - quant
    if gain < min_gain - 1e-9:
        return (f"Restore won back {gain:+.3f} (quantized {quant:.3f} -> restored {restored:.3f}), "
                f"less than restore.min_gain {min_gain:g}")
    return None


# --------------------------------------------------------------------------------- baseline


def scoring_provenance(cell) -> dict | None:
    """The benchmark's metric and filter, when it names them, and a thinking model's tags and chat
    template arguments (None: the task's defaults on a plain model, as baselines always said)."""
    b, m = cell.benchmark, cell.model
    data: dict[str, Any] = {"metric": b.metric, "filter": b.filter} if (b.metric or b.filter) else {}
    if m.think is not None:
        data["think"] = m.think.model_dump()
    if m.chat_template_kwargs:
        data["chat_template_kwargs"] = dict(m.chat_template_kwargs)
    return data or None


def too_few_items(cell, n: int) -> str:
    return (f"{cell.suite_file or cell.suite}: benchmarks[{cell.benchmark.name!r}].limit: more than the {n} items "
            f"task {cell.benchmark.task} has; set it to {n} or less, or null for all (got {cell.benchmark.limit})")


def fp_baseline(session, cell, fp: models.ResolvedModel) -> bl.Baseline:
    """The committed baseline, checked against the cell before any generation (fingerprint,
    generation, seed, task, and each item's id, prompt and gold), or (with
    --qmr-update-baselines) a fresh FP run written atomically."""
    path = bl.baseline_path(session.baselines_dir, cell.model.name, cell.benchmark.name)
    if not session.update_baselines:
        baseline = bl.read_baseline(path, suite=cell.suite_file or None, cell=cell.id)
        mismatches = bl.check_provenance(baseline, {
            "model_fingerprint": fp.fingerprint,
            "generation": session.generation_settings(cell).to_dict(),
            "seed": cell.benchmark.seed,
            "scoring": scoring_provenance(cell),
            "dtype": session.runtime(cell).dtype,
        })
        if not mismatches:
            indices = [int(v.get("doc_index", i)) for i, v in enumerate(baseline.items.values())]
            mismatches = bl.check_items(baseline, cell.benchmark.task, session.expected(cell, fp, indices))
        if mismatches:
            more = f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
            raise bl.stale_cell(cell, path,
                                f"baseline no longer describes the cell ({'; '.join(mismatches[:3])}{more})")
        return baseline
    records = session.fp_run(cell, fp)
    limit = cell.benchmark.limit
    if limit is not None and len(records) < limit:
        raise bl.BaselineError(too_few_items(cell, len(records)))
    baseline = bl.Baseline.from_records(cell.model.name, cell.benchmark.name, cell.benchmark.task, records,
                                        _provenance(session, fp, cell, records))
    bl.write_baseline(path, baseline)
    baseline.source = str(path)
    return baseline


def _provenance(session, fp: models.ResolvedModel, cell, records: list[SampleRecord]) -> dict:
    from .measure import items_fingerprint

    return {
        "model_fingerprint": fp.fingerprint,
        **items_fingerprint(records),
        "generation": session.generation_settings(cell).to_dict(),
        "limit": cell.benchmark.limit,
        "seed": cell.benchmark.seed,
        "scoring": scoring_provenance(cell),
        **session.runtime(cell).to_dict(),
        "libraries": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def baseline_items(cell, baseline: bl.Baseline) -> tuple[list[int], list[int]]:
    """(doc indices, FP's right answers of ``baseline.k``) of the baseline items the cell evaluates, in doc order."""
    ordered = sorted(baseline.items.items(), key=lambda kv: kv[1].get("doc_index", 0))
    limit = cell.benchmark.limit
    if limit is not None and limit > len(ordered):
        provenance_limit = baseline.provenance.get("limit")
        if provenance_limit is None or provenance_limit >= limit:  # the baseline took every item there is
            raise bl.BaselineError(too_few_items(cell, len(ordered)))
        raise bl.stale_cell(cell, baseline.source, f"baseline covers {len(ordered)} items, the cell asks for {limit}")
    ordered = ordered[:limit] if limit is not None else ordered
    return [int(v.get("doc_index", i)) for i, (_, v) in enumerate(ordered)], [bl.item_count(v) for _, v in ordered]


# --------------------------------------------------------------------------------- reuse


def cell_inputs(cell, fp: models.ResolvedModel, baseline: bl.Baseline) -> dict:
    """Everything a cell's records depend on: its spec, the FP weights, the baseline file,
    the judge config and the library versions (what --qmr-resume must find unchanged)."""
    judge = cell.judge_config
    return {
        "spec": cell.reuse_spec(),
        "model_fingerprint": fp.fingerprint,
        "baseline_sha256": sha256_file(baseline.source) if baseline.source else None,
        "judge_config_sha256": sha256_file(judge) if judge is not None and judge.is_file() else None,
        "libraries": library_versions(),
        # method recipe: the recipe file's content (only then, so other cells keep their inputs hash)
        **({"recipe_sha256": sha256_file(cell.recipe_file) if cell.recipe_file.is_file() else None}
           if cell.recipe_file is not None else {}),
    }


def reusable(cell_dir: Path, inputs: dict) -> tuple[CellResult | None, str | None]:
    """(the finished result, None) when ``inputs`` are those it recorded, else (None, why not)."""
    from .fsutil import changed_keys

    path = cell_dir / "result.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = CellResult.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        return None, f"{path} unreadable ({type(exc).__name__})"
    if result.inputs_sha256 != sha256_json(inputs):
        changes = changed_keys(result.inputs or {}, inputs)
        if not changes:
            return None, "the record has no inputs hash"
        more = f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""
        return None, "inputs changed: " + "; ".join(changes[:4]) + more
    if result.gate is None:  # not servable last time: the engine may have a kernel now
        return None, f"the last run ended {result.outcome or 'without a gate'}"
    problem = records_problem(cell_dir, data)
    if problem is not None:
        return None, problem
    return result, None


# --------------------------------------------------------------------------------- gate, locate, settle


def locate_cell(cell, baseline: bl.Baseline, records: list[SampleRecord], cell_dir: Path) -> ErrorProfile:
    """First faulty step of every regressed item, with the suite's judges; rows go to located.jsonl."""
    from .locate import ensemble, error_profile
    from .locate import locate_cell as judge_regressions

    with ensemble(cell.locate.judges, cell.locate.policy, cell.judge_config) as (judges, policy):
        rows = judge_regressions(baseline.items, records, judges, policy)
    atomic_write_jsonl(cell_dir / "located.jsonl", (row.to_dict() for row in rows))
    if cell.locate.review and rows:
        from .locate import write_review_queue

        write_review_queue(rows, cell_dir / "review", cell.locate.audit_rate, seed=cell.benchmark.seed)
    profile = error_profile(rows)
    profile.judges_used = list(cell.locate.judges)
    profile.policy = policy.name
    return profile


def outcome_of(cell, gate: GateResult) -> str:
    """pass / fail from the gate; an inconclusive gate counts as ``thresholds.inconclusive``."""
    if gate.verdict in ("pass", "fail"):
        return gate.verdict
    return cell.thresholds.inconclusive


def answer_scores(result: CellResult, records: list[SampleRecord], baseline: bl.Baseline,
                  sampling: dict | None) -> None:
    """What a cell's answers say beyond accuracy (:mod:`pytest_qmr.sampling`): a sampled cell's
    ``sampling``, pass@k, maj@k and seed std; a thinking model's ``truncated_share``; and, where
    both sides counted their tokens, the answers' length against FP's on the same items. Nothing
    for a greedy cell of a plain model."""
    from .sampling import cell_scores, item_lengths, length_ratio

    if not records or not records[0].samples:
        return
    if sampling is not None:
        scores = cell_scores([r.samples for r in records])
        result.sampling = sampling
        result.pass_at_k, result.maj_at_k = scores["pass_at_k"], scores["maj_at_k"]
        result.seed_std = scores["seed_std"]
    answers = [s for r in records for s in r.samples]
    if any("truncated" in s for s in answers):
        result.truncated_share = sum(bool(s.get("truncated")) for s in answers) / len(answers)
    pairs = item_lengths(baseline.items, [(r.item_id, r.samples) for r in records])
    if pairs:
        result.length = length_ratio([f for f, _ in pairs], [q for _, q in pairs])


def cost_violations(cell, result: CellResult) -> list[str]:
    """Deployment-cost thresholds a cell broke, in one line each: ``thresholds.max_length_ratio``
    against the ratio of mean answer lengths (quantized over FP, same items), and
    ``thresholds.max_truncated_share`` against the share of thinking that never closed."""
    out = []
    limit, length = cell.thresholds.max_length_ratio, result.length or {}
    if limit is not None and length.get("ratio") is not None and length["ratio"] > limit:
        out.append(f"answers are {length['ratio']:.2f}x FP's length ({length['quant_mean_tokens']:.0f} vs "
                   f"{length['fp_mean_tokens']:.0f} tokens), beyond thresholds.max_length_ratio {limit}")
    share = cell.thresholds.max_truncated_share
    if share is not None and result.truncated_share is not None and result.truncated_share > share:
        out.append(f"{result.truncated_share:.1%} of answers never closed their thinking within max_new_tokens, "
                   f"beyond thresholds.max_truncated_share {share}")
    return out


def settle(cell, result: CellResult) -> None:
    """Outcome from the gate and the suite's error-profile and cost thresholds (a violation fails
    the cell); a Restore short of ``restore.min_gain`` is noted for the plugin to raise."""
    from .locate import check_profile

    result.profile_violations = ([] if result.error_profile is None
                                 else check_profile(result.error_profile, cell.thresholds.error_profile))
    result.cost_violations = cost_violations(cell, result)
    failed = result.profile_violations or result.cost_violations
    result.outcome = "fail" if failed else outcome_of(cell, result.gate)
    if cell.restore.may_pass and (result.restore or {}).get("restored_verdict") == "pass":
        result.outcome = "pass"
    if result.restore is not None:  # checked again on --qmr-resume, like the thresholds
        result.restore.pop("shortfall", None)
        if cell.restore.min_gain is not None:
            result.restore["shortfall"] = restore_shortfall(result.restore, cell.restore.min_gain)


# --------------------------------------------------------------------------------- the pipeline


class CellPipeline:
    """One cell through the stages (module docstring); :meth:`run` returns its :class:`CellResult`.

    ``restore``: what runs Restore on a failing cell (the ``pytest_qmr_restore`` hook, or the
    ``qmr_restore`` fixture a conftest overrides); None: Restore is not available."""

    def __init__(self, session, cell, restore: Callable[..., Any] | None = None) -> None:
        self.session, self.cell, self.restore_hook = session, cell, restore
        self.cell_dir = session.run_dir / "cells" / cell.id
        self.seconds: dict[str, float] = {}

    def _timed(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.monotonic() - started

    def _rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}

    def run(self) -> CellResult:
        """The cell through its stages; a cell that fails on purpose (a :class:`QmrError`: no
        baseline, a model that does not load, an engine that does not start, ...) still leaves its
        ``result.json`` — outcome ``error`` and the one line — for the report and ``qmr compare``."""
        try:
            return self._run()
        except QmrError as exc:
            self._record_error(exc)
            raise

    def _record_error(self, exc: QmrError) -> None:
        session, cell = self.session, self.cell
        result = CellResult(
            cell_id=cell.id, model=cell.model.name, quantizer=cell.quantizer.name, benchmark=cell.benchmark.name,
            task=cell.benchmark.task, accuracy=0.0, n=0, gate=None, samples_path="", seconds=self._rounded(),
            backend=session.backend(cell), outcome="error", notes=[str(exc)], cache=session.cache_record(cell))
        try:
            write_result(self.cell_dir, result)
        except OSError:
            pass  # the error itself is what the user sees

    def _run(self) -> CellResult:
        session, cell = self.session, self.cell
        started = time.monotonic()
        fp = models.resolve(cell.model.ref, session.cache_dir)
        self._timed("resolve", started)

        started = time.monotonic()
        baseline = fp_baseline(session, cell, fp)
        self._timed("baseline", started)
        inputs = cell_inputs(cell, fp, baseline)
        recomputed = None
        if session.resume and not session.update_baselines:
            reused, recomputed = reusable(self.cell_dir, inputs)
            if reused is not None:  # the verdict follows the suite's current thresholds
                reused.reused = True
                settle(cell, reused)
                return reused
        indices, fp_counts_all = baseline_items(cell, baseline)

        started = time.monotonic()
        quantized = self._quantize(fp)
        packed = (checkpoint_format(quantized.path) or {}).get("packed")  # a user's AWQ/GPTQ/compressed checkpoint
        context = CellContext(fp=fp, baseline=baseline, quantized=quantized.path,
                              compressed=quantized.compressed_path or (quantized.path if packed else None),
                              cell_dir=self.cell_dir, run_dir=session.run_dir, data_dir=session.data_dir_of(cell))
        session.contexts[cell.id] = context
        self._timed("quantize", started)

        started = time.monotonic()
        path, artifact = session.artifact(cell, quantized)
        quantization = {**quantized.info, "format": checkpoint_format(path)}  # what the evaluated checkpoint is
        dtype = session.engine_dtype(cell, artifact, quantization["format"])
        try:
            records = self._measure(fp, path, indices, fp_counts_all, dtype)
        except NotServable as exc:
            self._timed("evaluate", started)
            return self._not_servable(exc, quantization, artifact, dtype, inputs)
        self._timed("evaluate", started)
        write_samples(self.cell_dir, records)  # before Locate or Restore can fail

        gate = bl.gate_cell(cell, baseline, records, fp_counts_all, session.thresholds(cell))
        profile, notes = self._locate(baseline, records)
        if session.generations.write_error:  # the cell's answers are its records; only warm reruns lose
            notes.append(f"generation cache: answers not stored, {session.generations.write_error}")
        result = CellResult(
            cell_id=cell.id, model=cell.model.name, quantizer=cell.quantizer.name, benchmark=cell.benchmark.name,
            task=cell.benchmark.task, accuracy=sum(r.n_correct / r.k for r in records) / max(len(records), 1),
            n=len(records), gate=gate, samples_path=str(self.cell_dir / "samples.jsonl"), seconds=self._rounded(),
            quantization=quantization, error_profile=profile, backend=session.backend(cell),
            served=session.served.pop(str(path), None), artifact=artifact, inputs=inputs,
            inputs_sha256=sha256_json(inputs), recomputed=recomputed, notes=notes,
            cache=session.cache_record(cell), runtime={**session.runtime(cell).to_dict(), "dtype": dtype},
        )
        answer_scores(result, records, baseline, session.generation_settings(cell).sampling())
        settle(cell, result)
        if self.restore_hook is not None and cell.restores(failed=result.outcome == "fail"):
            started = time.monotonic()
            self._restore(result, records, context)
            self._timed("restore", started)
            result.seconds, result.cache = self._rounded(), session.cache_record(cell)
            settle(cell, result)
        write_result(self.cell_dir, result)  # the samples are on disk since measure
        return result

    def _quantize(self, fp: models.ResolvedModel):
        session, cell = self.session, self.cell
        q = cell.quantizer
        if get_method(q.method).builds:
            session.say(cell, f"quantize ({q.method})")
        try:
            quantized = quantize(fp.path, fp.fingerprint, quant_spec(cell), session.cache_dir,
                                 data_dir=session.data_dir_of(cell))
        except models.ModelError as exc:
            if q.path is None:
                raise
            raise models.ModelError(f"{cell.where}: quantizers[{cell.quantizer_index}].path: {exc} (relative paths "
                                    f"are relative to the suite file; got {q.path!r})") from None
        if quantized.info.get("cache_hit"):
            session.say(cell, "quantize: checkpoint from cache (verified)")
        return quantized

    def _measure(self, fp: models.ResolvedModel, path: Path, indices: list[int], fp_counts_all: list[int],
                 dtype: str) -> list[SampleRecord]:
        session, cell = self.session, self.cell
        same_engine = session.backend(cell) == cell.generation.backend
        if cell.quantizer.method == "fp" and same_engine and session.has_fp_run(cell):
            return session.fp_run(cell, fp)  # the baseline run itself
        return session.evaluate(path, cell, indices, fp_counts_all, dtype=dtype)

    def _locate(self, baseline: bl.Baseline, records: list[SampleRecord]) -> tuple[ErrorProfile | None, list[str]]:
        """(error profile, notes): Locate on a quantized cell whose task generates steps."""
        session, cell = self.session, self.cell
        if cell.is_fp or not cell.locate.enabled:
            return None, []
        if session.output_types.get(cell.benchmark.task) == "multiple_choice":
            return None, [f"locate: not run, task {cell.benchmark.task} is scored by log-likelihood "
                          "(no generated steps to judge); the gate's verdict stands"]
        started = time.monotonic()
        session.say(cell, "locate")
        profile = locate_cell(cell, baseline, records, self.cell_dir)
        self._timed("locate", started)
        return profile, []

    def _restore(self, result: CellResult, records: list[SampleRecord], context: CellContext) -> None:
        """Run the Restore hook; a RestoreError is recorded on the cell, not raised."""
        from .restore import RestoreError, RestoreResult

        try:
            restored = self.restore_hook(cell=self.cell, result=result, records=records, context=context)
        except RestoreError as exc:
            restored = {"error": str(exc)}
        if restored is not None:
            result.restore = restored.to_dict() if isinstance(restored, RestoreResult) else dict(restored)

    def _not_servable(self, exc: NotServable, quantization: dict, artifact: str, dtype: str,
                      inputs: dict) -> CellResult:
        """The cell's engine refused its checkpoint: an outcome of its own, recorded, never a pass."""
        session, cell = self.session, self.cell
        scheme = (quantization.get("format") or {}).get("scheme")
        reason = f"no kernel for {scheme} ({exc.reason})" if scheme else exc.reason
        result = CellResult(
            cell_id=cell.id, model=cell.model.name, quantizer=cell.quantizer.name, benchmark=cell.benchmark.name,
            task=cell.benchmark.task, accuracy=0.0, n=0, gate=None, samples_path="", seconds=self._rounded(),
            quantization=quantization, backend=session.backend(cell), artifact=artifact, outcome="not_servable",
            inputs=inputs, inputs_sha256=sha256_json(inputs),
            notes=[f"not servable by {exc.engine} on {exc.device}: {reason}"], cache=session.cache_record(cell),
            runtime={**session.runtime(cell).to_dict(), "dtype": dtype},
            servable={"servable": False, "engine": exc.engine, "device": exc.device, "scheme": scheme,
                      "reason": exc.reason},
        )
        write_result(self.cell_dir, result)
        return result


def run_cell(session, cell, restore: Callable[..., Any] | None = None) -> CellResult:
    """Measure (and locate, and restore when the suite asks) one cell on ``session``."""
    return CellPipeline(session, cell, restore).run()
