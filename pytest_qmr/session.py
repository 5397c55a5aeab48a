"""One pytest session's state: resolved models, loaded weights, baselines and the run directory.

Lives in ``config.stash`` (no module globals), so xdist workers each hold their own.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import baselines as bl
from . import models
from .fsutil import atomic_write_json, atomic_write_jsonl, sha256_json, sha256_text
from .measure import Evaluator, GenerationSettings, items_fingerprint
from .calibration import CalibrationSpec
from .quantize import QuantSpec, get_method, quantize
from .records import CellContext, CellResult, GateResult, SampleRecord
from .redact import redact_obj
from .servers import NotServable


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("lm_eval", "transformers", "torch", "llmcompressor")}


@dataclass
class QmrSession:
    rootdir: Path
    run_dir: Path
    baselines_dir: Path
    update_baselines: bool = False
    data_dir: Path | None = None
    cache_dir: Path | None = None
    resume: bool = False
    use_cache: bool = True  # the generation / adapter cache (pytest_qmr.cache); --qmr-no-cache turns it off
    # one line of progress for the terminal (set by the plugin; None: silent)
    progress: Callable[[str], None] | None = None
    # calls the pytest_qmr_restore hook (set by the plugin; None: Restore is not available)
    restore_hook: Callable[..., Any] | None = None
    _loaded: dict = field(default_factory=dict)
    _contexts: dict = field(default_factory=dict)  # cell id -> the CellContext its Restore hook gets
    _fp_records: dict = field(default_factory=dict)
    _expected_cache: dict = field(default_factory=dict)
    _served: dict = field(default_factory=dict)  # checkpoint path -> {endpoint, model} of the last API evaluation
    _output_types: dict = field(default_factory=dict)  # lm-eval task -> output_type, once it has run
    family_sizes: dict = field(default_factory=dict)  # thresholds.family -> cells of it in this session
    _servers: Any = None  # backends.ServerPool of the openai backend, created on first use
    _cache_stats: dict = field(default_factory=dict)  # cell id -> stage -> CacheStats of this run
    _generations: Any = None  # cache.GenerationCache, made on first use
    _tokenizers: dict = field(default_factory=dict)  # checkpoint path -> tokenizer (no weights)

    # ---- models -------------------------------------------------------------------------
    def _load(self, path: Path, trust_remote_code: bool, adapter: Path | None = None, rt=None):
        """Keep one model in memory: cells are ordered so consecutive ones share it. With
        ``adapter``: the checkpoint with that LoRA adapter merged (Restore's model); ``rt``: the
        cell's resolved device and dtype (default fp32 on the CPU)."""
        device, dtype = (rt.device, rt.dtype) if rt is not None else ("cpu", "float32")
        key = (str(path), str(adapter), device, dtype)
        if key not in self._loaded:
            self._loaded.clear()
            if adapter is None:
                self._loaded[key] = models.load(path, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
            else:
                from .restore import load_restored

                self._loaded[key] = load_restored(path, adapter, device=device, dtype=dtype)
        return self._loaded[key]

    @staticmethod
    def _runtime(cell):
        """The cell's ``generation.device`` / ``generation.dtype``, resolved on this machine."""
        from .backends import runtime

        return runtime(cell.generation.device, cell.generation.dtype, f"{cell.suite_file or cell.suite}: generation")

    def _tokenizer(self, path: Path, trust_remote_code: bool):
        """The checkpoint's tokenizer as models.load sets it up, loaded once per session."""
        from .backends import load_tokenizer

        if str(path) not in self._tokenizers:
            self._tokenizers[str(path)] = load_tokenizer(path, trust_remote_code)
        return self._tokenizers[str(path)]

    @property
    def generations(self):
        """The session's generation cache (``use_cache`` False: one that stores nothing)."""
        if self._generations is None:
            from .cache import GenerationCache

            self._generations = GenerationCache(self.cache_dir, enabled=self.use_cache)
        return self._generations

    def _say(self, cell, text: str) -> None:
        if self.progress is not None:
            self.progress(f"qmr {cell.id}: {text}")

    def _count(self, cell, stage: str, stats) -> None:
        """Add one evaluation's cache statistics to the cell's ``stage``."""
        from .cache import CacheStats

        self._cache_stats.setdefault(cell.id, {}).setdefault(stage, CacheStats()).add(stats)

    def _identity(self, path: Path, cell, adapter: Path | None = None, served: dict | None = None,
                  dtype: str | None = None, backend: str | None = None) -> dict:
        """What a response of this checkpoint depends on besides its request (pytest_qmr.cache)."""
        from .cache import adapter_sha, engine_versions

        backend, rt = backend or self._backend(cell), self._runtime(cell)
        if served is not None and served.get("engine") != "user server":  # ours: the port is random
            served = {**served, "endpoint": served["engine"]}
        return {"backend": backend, "weights": models.weights_fingerprint(path),
                "adapter": adapter_sha(adapter) if adapter is not None else None, "device": rt.device,
                "dtype": dtype or rt.dtype, "batch_size": cell.generation.batch_size, "seed": cell.benchmark.seed,
                "engine": engine_versions(backend),
                "served": None if served is None else {k: served[k] for k in ("endpoint", "model")}}

    @staticmethod
    def _backend(cell, stage: str = "evaluate") -> str:
        """The backend that answers: the quantizer's ``backend``, else ``generation.backend``; the
        FP baseline run always takes the suite's (it is shared by every quantizer's cells)."""
        if stage == "baseline":
            return cell.generation.backend
        return cell.quantizer.backend or cell.generation.backend

    def _vllm_settings(self, cell, dtype: str):
        from .servers import VllmSettings, vllm_python

        gen = cell.generation
        python = vllm_python(gen.vllm_python, where=f"{cell.suite_file or cell.suite}: generation.vllm_python")
        return VllmSettings(python, dtype, self._runtime(cell).device, cell.benchmark.seed,
                            tuple(sorted(gen.vllm.items())))

    def artifact(self, cell, quantized) -> tuple[Path, str]:
        """The checkpoint a cell evaluates and what it is: ``fp`` / ``checkpoint`` (as given),
        ``compressed`` (the compressed-tensors checkpoint a user deploys) or ``dense`` (the
        fake-quant copy); ``quantizer.artifact``, default compressed with backend vllm."""
        q = cell.quantizer
        if not get_method(q.method).builds:
            return quantized.path, q.method
        kind = q.artifact or ("compressed" if self._backend(cell) == "vllm" else "dense")
        if kind == "dense":
            return quantized.path, kind
        if quantized.compressed_path is None:
            raise models.ModelError(f"{cell.id}: artifact compressed: the {q.method} build wrote no compressed "
                                    "checkpoint; use artifact: dense")
        return quantized.compressed_path, kind

    def engine_dtype(self, cell, artifact: str, info: dict, backend: str | None = None) -> str:
        """The dtype the cell's engine runs in: ``generation.dtype``, except that ``auto`` runs a
        compressed weight-only (W*A16) checkpoint in bfloat16 on vLLM's CPU build, which has no
        float32 kernel for packed int weights."""
        import re

        rt = self._runtime(cell)
        scheme = str((info.get("recipe") or {}).get("scheme") or "")
        if ((backend or self._backend(cell)) == "vllm" and cell.generation.dtype == "auto" and rt.device == "cpu"
                and artifact == "compressed" and re.fullmatch(r"W\d+A16(_ASYM)?", scheme)):
            return "bfloat16"
        return rt.dtype

    # ---- cells --------------------------------------------------------------------------
    def thresholds(self, cell) -> Any:
        """The cell's thresholds for the gate; under a multiplicity family, with the number of
        this session's cells in it (``family_sizes``, counted by the plugin at collection)."""
        family = cell.thresholds.family
        if family == "none":
            return cell.thresholds
        return {**cell.thresholds.model_dump(), "family_size": self.family_sizes.get(family, 1)}

    def apply_family(self) -> list[str]:
        """At the session's end: Holm / BH adjusted p over the gated cells of each family that
        ran, written into their result.json (``gate.p_adjusted``, ``gate.family_verdict``);
        one line per family for the terminal."""
        cells_dir = self.run_dir / "cells"
        members: dict[str, list[tuple[Path, dict]]] = {}
        for path in sorted(cells_dir.glob("*/result.json")) if cells_dir.is_dir() else []:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # write_results reports it
            gate = data.get("gate") or {}
            if gate.get("family", "none") != "none":
                members.setdefault(gate["family"], []).append((path, data))
        if not members:
            return []
        from .gate import adjust_family, family_verdict  # numpy/scipy: only once a family has cells

        lines = []
        for family, cells in sorted(members.items()):
            adjusted = adjust_family([data["gate"]["p_value"] for _, data in cells], family)
            changed = []
            for (path, data), p in zip(cells, adjusted, strict=True):
                gate = data["gate"]
                alpha = gate["alpha"] * gate.get("family_size", 1)  # the family's alpha
                gate["p_adjusted"] = p
                gate["family_verdict"] = family_verdict(GateResult.from_dict(gate), p, alpha)
                if gate["family_verdict"] != gate["verdict"]:
                    changed.append(f"{data['cell_id']} {gate['verdict']} -> {gate['family_verdict']}")
                atomic_write_json(path, data)
            lines.append(f"qmr family {family} over {len(cells)} cells (each gated at alpha/{len(cells)}): "
                         + ("; ".join(changed) if changed else "adjusted p changes no verdict"))
        return lines

    def _generation(self, cell) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=cell.generation.max_new_tokens, batch_size=cell.generation.batch_size)

    def _data_dir(self, cell) -> Path | None:
        return self.data_dir or cell.data_dir

    def _evaluator(self, path: Path, cell, adapter: Path | None = None, dtype: str | None = None,
                   endpoint: str | None = None, stage: str = "evaluate", backend: str | None = None) -> Evaluator:
        """An Evaluator on ``backend`` (default the cell's: hf | openai | vllm; pytest_qmr.backends),
        answering from the generation cache where it can: an hf model is loaded, and our own
        vLLM server started, only on a miss. ``dtype``: the engine's (default the cell's);
        ``endpoint``: the user's URL for this checkpoint (backend openai, ``generation.endpoints``);
        ``adapter``: a LoRA adapter on ``path`` (hf: peft; vllm: ``--enable-lora``)."""
        from .backends import Runtime, backend_lm, chat_prompt_renderer, lora_options, lora_served_name, served_name
        from .cache import adapter_sha, caching_lm
        from .measure import hf_lm
        from .servers import ServerPool

        gen, data_dir, trc = self._generation(cell), self._data_dir(cell), cell.model.trust_remote_code
        tokenizer = self._tokenizer(path, trc)
        backend, rt = backend or self._backend(cell, stage=stage), self._runtime(cell)
        dtype = dtype or rt.dtype
        if backend == "hf":

            def make():
                return hf_lm(*self._load(path, trc, adapter, Runtime(rt.device, dtype)), gen.batch_size, rt.device,
                             dtype)

            lm = caching_lm(make, self._identity(path, cell, adapter, dtype=dtype, backend=backend), self.generations,
                            tokenizer=tokenizer)
            return Evaluator(None, None, gen, data_dir, lm=lm, source=cell.tasks)
        if adapter is not None and backend != "vllm":
            raise models.ModelError(f"backend {backend}: a Restore adapter is evaluated with backend hf or vllm")
        if self._servers is None:
            self._servers = ServerPool()  # one server, reused across consecutive cells of a checkpoint
        if backend == "vllm":  # our own server, named after the checkpoint: known before it starts
            settings = self._vllm_settings(cell, dtype)
            fingerprint = models.weights_fingerprint(path)
            name = served_name(fingerprint) if adapter is None else lora_served_name(fingerprint, adapter_sha(adapter))
            if adapter is not None:
                settings = dataclasses.replace(settings, options=settings.options + lora_options(name, adapter))
            engine = f"vLLM {settings.version}"
            served = {"endpoint": engine, "model": name, "fingerprint": fingerprint, "engine": engine, "dtype": dtype}
            self._served[str(path)] = served

            def start():
                lm, _, live = backend_lm("vllm", path, gen.max_new_tokens, gen.batch_size, cell.benchmark.seed, trc,
                                         self._servers, vllm=settings, lora_name=name if adapter else None)
                self._served[str(path)] = {**live, "dtype": dtype}
                return lm

            identity = self._identity(path, cell, adapter, served=served, dtype=dtype, backend=backend)
            lm = caching_lm(start, identity, self.generations, tokenizer=tokenizer, api=True)
            return Evaluator(None, None, gen, data_dir, lm=lm, render_prompt=chat_prompt_renderer(tokenizer),
                             source=cell.tasks)
        inner, render_prompt, served = backend_lm(backend, path, gen.max_new_tokens, gen.batch_size,
                                                  cell.benchmark.seed, trc, self._servers,
                                                  endpoint=endpoint, runtime=Runtime(rt.device, dtype))
        self._served[str(path)] = served
        lm = caching_lm(lambda: inner, self._identity(path, cell, served=served, backend=backend), self.generations,
                        tokenizer=tokenizer, eager=inner)
        return Evaluator(None, None, gen, data_dir, lm=lm, render_prompt=render_prompt, source=cell.tasks)

    def _evaluate(self, path: Path, cell, indices: list[int] | None, fp_correct: list[bool] | None,
                  stage: str = "evaluate", adapter: Path | None = None, dtype: str | None = None,
                  backend: str | None = None):
        endpoints = cell.generation.endpoints  # per quantizer; the FP model's baseline run: "fp"
        endpoint = endpoints.get("fp" if stage == "baseline" else cell.quantizer.name)
        evaluator = self._evaluator(path, cell, adapter, dtype, endpoint, stage, backend)
        try:
            return self._run(evaluator, cell, indices, fp_correct, stage)
        finally:
            self._output_types.update(evaluator.output_types)  # Locate asks whether there are steps
            self._count(cell, stage, evaluator.lm.stats)

    def _run(self, evaluator: Evaluator, cell, indices: list[int] | None, fp_correct: list[bool] | None,
             stage: str = "evaluate"):
        task, seed, scoring = cell.benchmark.task, cell.benchmark.seed, cell.scoring
        planned = len(indices) if indices is not None else cell.benchmark.limit

        def report(records: list[SampleRecord]) -> None:
            stats = evaluator.lm.stats
            speed = f", {stats.tok_per_s:.0f} tok/s" if stats.tok_per_s else ""
            self._say(cell, f"{stage} {len(records)}/{planned or len(records)} items "
                            f"({stats.items_from_cache} from cache{speed})")

        if fp_correct is not None and cell.thresholds.sequential and indices is not None:
            from .gate import final_verdict_if_known

            chunk = max(cell.generation.batch_size, cell.thresholds.min_items)

            def settled(records: list[SampleRecord]) -> bool:
                report(records)
                quant = [r.correct for r in records]
                return final_verdict_if_known(fp_correct, quant, self.thresholds(cell)) is not None

            return evaluator.run_sequential(task, indices, chunk, seed, settled, scoring)
        if indices is not None:
            records = evaluator.run(task, indices=indices, seed=seed, scoring=scoring)
        else:
            records = evaluator.run(task, limit=cell.benchmark.limit, seed=seed, scoring=scoring)
        report(records)
        return records

    @staticmethod
    def _scoring_provenance(cell) -> dict | None:
        """The benchmark's metric and filter, when it names them (None: the task's defaults)."""
        b = cell.benchmark
        return {"metric": b.metric, "filter": b.filter} if (b.metric or b.filter) else None

    def _provenance(self, fp: models.ResolvedModel, cell, records: list[SampleRecord]) -> dict:
        return {
            "model_fingerprint": fp.fingerprint,
            **items_fingerprint(records),
            "generation": self._generation(cell).to_dict(),
            "limit": cell.benchmark.limit,
            "seed": cell.benchmark.seed,
            "scoring": self._scoring_provenance(cell),
            **self._runtime(cell).to_dict(),
            "libraries": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _expected(self, cell, fp: models.ResolvedModel, indices: list[int]):
        """The prompts and golds the cell's task builds for ``indices`` (no generation; cached)."""
        from .measure import expected_items

        key = (cell.benchmark.task, str(self._data_dir(cell)), cell.benchmark.seed, fp.fingerprint, tuple(indices),
               cell.tasks)
        if key not in self._expected_cache:
            tokenizer = self._tokenizer(fp.path, cell.model.trust_remote_code)
            self._expected_cache[key] = expected_items(cell.benchmark.task, indices, tokenizer, self._data_dir(cell),
                                                       seed=cell.benchmark.seed, source=cell.tasks)
        return self._expected_cache[key]

    def fp_baseline(self, cell, fp: models.ResolvedModel) -> bl.Baseline:
        """The committed baseline, checked against the cell before any generation (fingerprint,
        generation, seed, task, and each item's id, prompt and gold), or (with
        --qmr-update-baselines) a fresh FP run written atomically."""
        path = bl.baseline_path(self.baselines_dir, cell.model.name, cell.benchmark.name)
        if not self.update_baselines:
            baseline = bl.read_baseline(path, suite=cell.suite_file or None, cell=cell.id)
            mismatches = bl.check_provenance(baseline, {
                "model_fingerprint": fp.fingerprint,
                "generation": self._generation(cell).to_dict(),
                "seed": cell.benchmark.seed,
                "scoring": self._scoring_provenance(cell),
                "dtype": self._runtime(cell).dtype,
            })
            if not mismatches:
                indices = [int(v.get("doc_index", i)) for i, v in enumerate(baseline.items.values())]
                mismatches = bl.check_items(baseline, cell.benchmark.task, self._expected(cell, fp, indices))
            if mismatches:
                more = f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
                shown = "; ".join(mismatches[:3])
                raise self._stale(cell, path, f"baseline no longer describes the cell ({shown}{more})")
            return baseline
        key = (cell.model.name, cell.benchmark.name)
        if key not in self._fp_records:
            self._fp_records[key] = self._evaluate(fp.path, cell, None, None, stage="baseline")
        records = self._fp_records[key]
        limit = cell.benchmark.limit
        if limit is not None and len(records) < limit:
            raise bl.BaselineError(self._too_few_items(cell, len(records)))
        baseline = bl.Baseline.from_records(cell.model.name, cell.benchmark.name, cell.benchmark.task, records,
                                            self._provenance(fp, cell, records))
        bl.write_baseline(path, baseline)
        baseline.source = str(path)
        return baseline

    @staticmethod
    def _stale(cell, source, problem: str) -> bl.BaselineError:
        return bl.stale(str(source), problem, cell.model.name, cell.benchmark.name, cell.suite_file or None, cell.id)

    @staticmethod
    def _too_few_items(cell, n: int) -> str:
        return (f"{cell.suite_file or cell.suite}: benchmarks[{cell.benchmark.name!r}].limit: more than the {n} items "
                f"task {cell.benchmark.task} has; set it to {n} or less, or null for all (got {cell.benchmark.limit})")

    def _inputs(self, cell, fp: models.ResolvedModel, baseline: bl.Baseline) -> dict:
        """Everything a cell's records depend on: its spec, the FP weights, the baseline file,
        the judge config and the library versions (what --qmr-resume must find unchanged)."""
        from .fsutil import sha256_file

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

    @staticmethod
    def _reusable(cell_dir: Path, inputs: dict) -> tuple[CellResult | None, str | None]:
        """(the finished result, None) when ``inputs`` are those it recorded, else (None, why not)."""
        from .fsutil import changed_keys

        path = cell_dir / "result.json"
        if not path.is_file():
            return None, None
        try:
            result = CellResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
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
        return result, None

    def run_cell(self, cell, restore: Callable[..., Any] | None = None) -> CellResult:
        """Measure (and locate, and restore when the suite asks) one cell; ``restore`` overrides
        ``restore_hook`` for this cell (the ``qmr_restore`` fixture). With ``resume``, a result
        already in the run dir is reused only when its recorded inputs hash is this cell's."""
        cell_dir = self.run_dir / "cells" / cell.id
        seconds: dict[str, float] = {}
        started = time.monotonic()
        fp = models.resolve(cell.model.ref, self.cache_dir)
        seconds["resolve"] = time.monotonic() - started

        started = time.monotonic()
        baseline = self.fp_baseline(cell, fp)
        seconds["baseline"] = time.monotonic() - started
        inputs = self._inputs(cell, fp, baseline)
        recomputed = None
        if self.resume and not self.update_baselines:
            reused, recomputed = self._reusable(cell_dir, inputs)
            if reused is not None:  # the verdict follows the suite's current thresholds
                reused.reused = True
                self._settle(cell, reused)
                return reused
        ordered = sorted(baseline.items.items(), key=lambda kv: kv[1].get("doc_index", 0))
        limit = cell.benchmark.limit
        if limit is not None and limit > len(ordered):
            provenance_limit = baseline.provenance.get("limit")
            if provenance_limit is None or provenance_limit >= limit:  # the baseline took every item there is
                raise bl.BaselineError(self._too_few_items(cell, len(ordered)))
            raise self._stale(cell, baseline.source, f"baseline covers {len(ordered)} items, the cell asks for {limit}")
        ordered = ordered[:limit] if limit is not None else ordered
        indices = [int(v.get("doc_index", i)) for i, (_, v) in enumerate(ordered)]
        fp_correct_all = [bool(v["correct"]) for _, v in ordered]

        started = time.monotonic()
        q, spec = cell.quantizer, quant_spec(cell)
        if get_method(q.method).builds:
            self._say(cell, f"quantize ({q.method})")
        quantized = quantize(fp.path, fp.fingerprint, spec, self.cache_dir, data_dir=self._data_dir(cell))
        self._contexts[cell.id] = CellContext(fp=fp, baseline=baseline, quantized=quantized.path,
                                              compressed=quantized.compressed_path, cell_dir=cell_dir,
                                              run_dir=self.run_dir, data_dir=self._data_dir(cell))
        seconds["quantize"] = time.monotonic() - started
        if quantized.info.get("cache_hit"):
            self._say(cell, "quantize: checkpoint from cache (verified)")

        started = time.monotonic()
        key = (cell.model.name, cell.benchmark.name)
        path, artifact = self.artifact(cell, quantized)
        dtype = self.engine_dtype(cell, artifact, quantized.info)
        if q.method == "fp" and key in self._fp_records and self._backend(cell) == cell.generation.backend:
            records = self._fp_records[key]  # the baseline run itself
        else:
            try:
                records = self._evaluate(path, cell, indices, fp_correct_all, dtype=dtype)
            except NotServable as exc:
                seconds["evaluate"] = time.monotonic() - started
                return self._not_servable(cell, cell_dir, exc, quantized, artifact, dtype, inputs, seconds)
        seconds["evaluate"] = time.monotonic() - started
        atomic_write_jsonl(cell_dir / "samples.jsonl", (redact_obj(r.to_dict()) for r in records))  # before locate

        gate = self._gate(cell, baseline, records, fp_correct_all)
        profile, notes = None, []
        if not cell.is_fp and cell.locate.enabled:
            if self._output_types.get(cell.benchmark.task) == "multiple_choice":
                notes.append(f"locate: not run, task {cell.benchmark.task} is scored by log-likelihood "
                             "(no generated steps to judge); the gate's verdict stands")
            else:
                started = time.monotonic()
                self._say(cell, "locate")
                profile = self._locate(cell, baseline, records, cell_dir)
                seconds["locate"] = time.monotonic() - started
        result = CellResult(
            cell_id=cell.id,
            model=cell.model.name,
            quantizer=q.name,
            benchmark=cell.benchmark.name,
            task=cell.benchmark.task,
            accuracy=sum(r.correct for r in records) / max(len(records), 1),
            n=len(records),
            gate=gate,
            samples_path=str(cell_dir / "samples.jsonl"),
            seconds={k: round(v, 2) for k, v in seconds.items()},
            quantization=quantized.info,
            error_profile=profile,
            backend=self._backend(cell),
            served=self._served.pop(str(path), None),
            artifact=artifact,
            inputs=inputs,
            inputs_sha256=sha256_json(inputs),
            recomputed=recomputed,
            notes=notes,
            cache=self._cache_record(cell),
            runtime={**self._runtime(cell).to_dict(), "dtype": dtype},
        )
        self._settle(cell, result)
        restore = restore or self.restore_hook
        if restore is not None and cell.restores(failed=result.outcome == "fail"):
            started = time.monotonic()
            self._restore(restore, cell, result, records)
            seconds["restore"] = time.monotonic() - started
            result.seconds = {k: round(v, 2) for k, v in seconds.items()}
            result.cache = self._cache_record(cell)
            self._settle(cell, result)
        self._write_cell(cell_dir, records, result)
        return result

    def _not_servable(self, cell, cell_dir: Path, exc, quantized, artifact: str, dtype: str, inputs: dict,
                      seconds: dict) -> CellResult:
        """The cell's engine refused its checkpoint: an outcome of its own, recorded, never a pass."""
        scheme = (quantized.info.get("recipe") or {}).get("scheme")
        reason = f"no kernel for {scheme} ({exc.reason})" if scheme else exc.reason
        line = f"not servable by {exc.engine} on {exc.device}: {reason}"
        result = CellResult(
            cell_id=cell.id, model=cell.model.name, quantizer=cell.quantizer.name, benchmark=cell.benchmark.name,
            task=cell.benchmark.task, accuracy=0.0, n=0, gate=None, samples_path="",
            seconds={k: round(v, 2) for k, v in seconds.items()}, quantization=quantized.info,
            backend=self._backend(cell), artifact=artifact, outcome="not_servable", inputs=inputs,
            inputs_sha256=sha256_json(inputs), notes=[line], cache=self._cache_record(cell),
            runtime={**self._runtime(cell).to_dict(), "dtype": dtype},
            servable={"servable": False, "engine": exc.engine, "device": exc.device, "scheme": scheme,
                      "reason": exc.reason},
        )
        atomic_write_json(cell_dir / "result.json", redact_obj(result.to_dict()))
        return result

    def _cache_record(self, cell) -> dict:
        """Per stage, how many items came from the generation cache (CellResult.cache)."""
        return {"enabled": self.use_cache,
                **{stage: stats.to_dict() for stage, stats in self._cache_stats.get(cell.id, {}).items()}}

    def _gate(self, cell, baseline: bl.Baseline, records: list[SampleRecord], fp_correct_all: list[bool]) -> GateResult:
        from .gate import evaluate_gate, final_verdict_if_known

        changed = [r.item_id for r in records
                   if baseline.items.get(r.item_id, {}).get("prompt_sha256") not in (None, sha256_text(r.prompt))]
        if changed:
            raise self._stale(cell, baseline.source, f"items[{changed[0]!r}].prompt_sha256: the prompts of "
                                                     f"{len(changed)} generated items differ from the baseline's")
        quant = {r.item_id: r.correct for r in records}
        fp_vec, q_vec = bl.paired_vectors(baseline, list(quant), quant)
        if cell.thresholds.sequential and len(records) < len(fp_correct_all):
            early = final_verdict_if_known(fp_correct_all, [r.correct for r in records], self.thresholds(cell))
            if early is not None:
                return early
        gate = evaluate_gate(fp_vec, q_vec, self.thresholds(cell))
        gate.n_planned = len(fp_correct_all)
        return gate

    def _locate(self, cell, baseline: bl.Baseline, records: list[SampleRecord], cell_dir: Path) -> dict:
        """First faulty step of every regressed item, with the suite's judges; rows go to located.jsonl."""
        from .locate.judges import build_judges, load_judge_settings
        from .locate import Policy, default_policy, error_profile, locate_cell

        settings = load_judge_settings(cell.judge_config) if cell.judge_config is not None else None
        judges = build_judges(cell.locate.judges, settings)
        try:
            policy = Policy.from_dict(cell.locate.policy) if cell.locate.policy else default_policy(judges)
            rows = locate_cell(baseline.items, records, judges, policy)
        finally:
            for judge in judges:
                judge.close()
        atomic_write_jsonl(cell_dir / "located.jsonl", rows)
        if cell.locate.review and rows:
            from .locate import write_review_queue

            write_review_queue(rows, cell_dir / "review", cell.locate.audit_rate, seed=cell.benchmark.seed)
        profile = error_profile(rows)
        profile["judges_used"] = list(cell.locate.judges)
        profile["policy"] = policy.name
        return profile

    def _settle(self, cell, result: CellResult) -> None:
        """Outcome from the gate and the suite's error-profile thresholds (a violation fails the cell);
        a Restore short of ``restore.min_gain`` is noted for the plugin to raise."""
        from .locate import check_profile

        result.profile_violations = ([] if result.error_profile is None
                                     else check_profile(result.error_profile, cell.thresholds.error_profile))
        result.outcome = "fail" if result.profile_violations else self._outcome(cell, result.gate)
        if cell.restore.may_pass and (result.restore or {}).get("restored_verdict") == "pass":
            result.outcome = "pass"
        if result.restore is not None:  # checked again on --qmr-resume, like the thresholds
            result.restore.pop("shortfall", None)
            if cell.restore.min_gain is not None:
                result.restore["shortfall"] = restore_shortfall(result.restore, cell.restore.min_gain)

    # ---- restore ------------------------------------------------------------------------
    def _restore(self, restore: Callable[..., Any], cell, result: CellResult, records: list[SampleRecord]) -> None:
        """Run the pytest_qmr_restore hook; a RestoreError is recorded on the cell, not raised."""
        from .restore import RestoreError, RestoreResult

        try:
            restored = restore(cell=cell, result=result, records=records, context=self._contexts[cell.id])
        except RestoreError as exc:
            restored = {"error": str(exc)}
        if restored is not None:
            result.restore = restored.to_dict() if isinstance(restored, RestoreResult) else dict(restored)

    def restore_cell(self, cell, result: CellResult, records: list[SampleRecord], context: CellContext):
        """The default pytest_qmr_restore: Silver Bullet pairs mined on the benchmark's training
        split, DPO + LoRA on the quantized model, then the same items re-measured with the adapter."""
        from . import restore as rs
        from .cache import cached_adapter
        from .gate import compare

        spec, gen, seed = cell.restore, self._generation(cell), cell.benchmark.seed
        cell_dir, fp, baseline, quant_path = context.cell_dir, context.fp, context.baseline, context.quantized
        started = time.monotonic()
        problems = self._training_problems(cell)
        tokenizer = self._tokenizer(quant_path, cell.model.trust_remote_code)
        self._say(cell, f"restore: mining {len(problems)} training problems")
        traces = rs.mine_traces(quant_path, problems, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                                tokenizer=tokenizer, generate=self._greedy(cell, quant_path))
        teacher = rs.make_teacher(spec.teacher, model=fp.path, judge_config=cell.judge_config,
                                  max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size)
        pairs = rs.build_pairs(traces, teacher, spec.variant, tokenizer=tokenizer, pool=traces, size=spec.max_pairs,
                               seed=seed, eval_ids=[r.item_id for r in records], rejected_scope=spec.rejected_scope)
        if spec.max_pairs is not None:  # build_pairs raises "nothing to restore" itself when none are left
            pairs = pairs[:spec.max_pairs]
        rs.write_pairs(cell_dir / "pairs.jsonl", pairs)
        config = rs.RestoreConfig(**spec.train)
        self._say(cell, f"restore: training on {len(pairs)} pairs")
        inputs = self._adapter_inputs(quant_path, fp, pairs, config, self._runtime(cell))
        card = cached_adapter(self.cache_dir, inputs, cell_dir / "adapter",
                              lambda: rs.train_adapter(quant_path, pairs, config, cell_dir / "adapter",
                                                       distill_from=fp.path, runtime=self._runtime(cell)),
                              enabled=self.use_cache)
        if card.get("cache_hit"):
            self._say(cell, "restore: adapter from cache (inputs unchanged, files verified)")
        adapter = cell_dir / "adapter"
        again = self._evaluate(quant_path, cell, [r.doc_index for r in records], None, stage="restore",
                               adapter=adapter, backend="hf")  # the dense copy it was trained on
        atomic_write_jsonl(cell_dir / "restored_samples.jsonl", (r.to_dict() for r in again))
        quant = {r.item_id: r.correct for r in records}
        paired = [(quant[r.item_id], r.correct) for r in again if r.item_id in quant]
        restored_gate = self._gate(cell, baseline, again, [bool(baseline.items[r.item_id]["correct"]) for r in again])
        outcome = rs.RestoreResult(
            pairs=len(pairs), teacher=spec.teacher, variant=spec.variant, steps=card["steps"],
            minutes=round((time.monotonic() - started) / 60, 2), adapter_path=card["adapter_path"],
            fp_acc=result.gate.fp_acc if result.gate else None, quant_acc=result.accuracy,
            restored_acc=sum(r.correct for r in again) / max(len(again), 1),
            p_value=compare([q for q, _ in paired], [r for _, r in paired]).p_value,
            n_eval=len(again), card=card,
        ).to_dict()
        outcome["restored_verdict"] = restored_gate.verdict
        outcome["restored_gate"] = restored_gate.to_dict()
        if spec.mmlu_limit:
            outcome["mmlu"] = {name: sum(r.correct for r in recs) / max(len(recs), 1)
                               for name, recs in (("quantized", self._mmlu(cell, quant_path, None)),
                                                  ("restored", self._mmlu(cell, quant_path, adapter)))}
            outcome["mmlu"]["n"] = spec.mmlu_limit
        if spec.deployed if spec.deployed is not None else self._backend(cell) == "vllm":
            outcome["deployed"] = self._restore_deployed(cell, context, result, records, again, adapter)
        return outcome

    def _restore_deployed(self, cell, context: CellContext, result: CellResult, records: list[SampleRecord],
                          dense: list[SampleRecord], adapter: Path) -> dict:
        """The restored model as a user deploys it: the compressed checkpoint with the adapter
        through vLLM's LoRA support, on the same items as the dense re-measurement."""
        if context.compressed is None:
            return {"error": f"{cell.quantizer.method} writes no compressed checkpoint"}
        dtype = self.engine_dtype(cell, "compressed", result.quantization or {}, backend="vllm")
        self._say(cell, "restore: re-measuring the compressed checkpoint + adapter on vLLM")
        try:
            served = self._evaluate(context.compressed, cell, [r.doc_index for r in records], None,
                                    stage="restore-deployed", adapter=adapter, dtype=dtype, backend="vllm")
        except NotServable as exc:
            return {"servable": False, "line": str(exc)}
        atomic_write_jsonl(context.cell_dir / "restored_deployed_samples.jsonl", (r.to_dict() for r in served))
        by_id = {r.item_id: r for r in dense}
        n = max(len(served), 1)
        return {"servable": True, "artifact": "compressed", "dtype": dtype,
                "served": self._served.pop(str(context.compressed), None),
                "restored_acc": sum(r.correct for r in served) / n, "n": len(served),
                "dense_restored_acc": sum(r.correct for r in dense) / max(len(dense), 1),
                "agreement_with_dense": sum(r.correct == by_id[r.item_id].correct for r in served) / n,
                "text_identical_with_dense": sum(r.response == by_id[r.item_id].response for r in served) / n}

    def _mmlu(self, cell, path: Path, adapter: Path | None) -> list[SampleRecord]:
        """Restore's general-ability check: the first ``restore.mmlu_limit`` MMLU items."""
        evaluator = self._evaluator(path, cell, adapter, backend="hf")  # the dense copy, with and without
        try:
            return evaluator.run("qmr_mmlu", limit=cell.restore.mmlu_limit)
        finally:
            self._count(cell, "mmlu", evaluator.lm.stats)

    def _greedy(self, cell, path: Path) -> Callable[[list[str]], list[str]]:
        """Restore mining's greedy generation on ``path``, answered from the generation cache
        where it can (the model is loaded only for the misses)."""
        from .restore import generate_greedy

        gen, identity = self._generation(cell), {**self._identity(path, cell), "generator": "restore.generate_greedy"}

        def generate(prompts: list[str]) -> list[str]:
            def compute(missing: list[int]) -> list[str]:
                model, tokenizer = self._load(path, cell.model.trust_remote_code, None, self._runtime(cell))
                return generate_greedy(model, tokenizer, [prompts[i] for i in missing], gen.max_new_tokens,
                                       gen.batch_size, "mining", progress=False)

            values, stats = self.generations.map(identity, "generate_greedy",
                                                 [(p, {"max_new_tokens": gen.max_new_tokens}) for p in prompts],
                                                 compute)
            self._count(cell, "mining", stats)
            return values

        return generate

    @staticmethod
    def _adapter_inputs(quant_path: Path, fp: models.ResolvedModel, pairs, config, rt) -> dict:
        """Everything a trained adapter depends on (its cache key), the device it trains on included."""
        from dataclasses import asdict
        from importlib.metadata import version

        return {"base": models.weights_fingerprint(quant_path),
                "pairs_sha256": sha256_json([p.to_dict() for p in pairs]),
                "config": asdict(config), "distill_from": fp.fingerprint if config.distill_weight > 0 else None,
                "runtime": rt.to_dict(),
                "libraries": {**library_versions(), **{n: version(n) for n in ("trl", "peft")}}}

    def _training_problems(self, cell):
        """The cell's training problems from the source registered for its task (PROBLEM_SOURCES)."""
        from .restore import training_problems

        return training_problems(cell.benchmark.task, cell.restore.train_problems, cell.benchmark.seed,
                                 self._data_dir(cell))

    @staticmethod
    def _outcome(cell, gate: GateResult) -> str:
        if gate.verdict == "pass":
            return "pass"
        if gate.verdict == "fail":
            return "fail"
        return cell.thresholds.inconclusive

    def _write_cell(self, cell_dir: Path, records: list[SampleRecord], result: CellResult) -> None:
        atomic_write_jsonl(cell_dir / "samples.jsonl", (redact_obj(r.to_dict()) for r in records))
        atomic_write_json(cell_dir / "result.json", redact_obj(result.to_dict()))

    def report_sections(self, result: CellResult) -> list[tuple[str, str]]:
        from .locate import profile_summary

        lines = [result.gate.summary()] if result.gate else []
        lines += result.notes
        if result.reused:
            lines.append("reused from --qmr-resume (inputs unchanged)")
        elif result.recomputed:
            lines.append(f"recomputed despite --qmr-resume: {result.recomputed}")
        if result.error_profile is not None:
            lines.append("error profile: " + profile_summary(result.error_profile))
        lines += [f"error profile threshold violated: {v}" for v in result.profile_violations]
        r = result.restore or {}
        if r.get("error"):
            lines.append(f"restore: {r['error']}")
        elif r.get("restored_acc") is not None:
            recovered = "" if r.get("recovered") is None else f", recovered {r['recovered']:.0%} of the loss"
            lines.append(f"restore: FP {r['fp_acc']:.3f} -> quantized {r['quant_acc']:.3f} -> restored "
                         f"{r['restored_acc']:.3f} (McNemar vs quantized p={r['p_value']:.3g}{recovered}; "
                         f"{r['pairs']} {r['variant']} pairs from the {r['teacher']} teacher, {r['steps']} DPO steps, "
                         f"{r['minutes']:.1f} min)")
        cached = [f"{stage} {c['items_from_cache']}/{c['items']}" for stage, c in result.cache.items()
                  if isinstance(c, dict) and c.get("items")]
        if cached:
            lines.append("from the generation cache (items): " + ", ".join(cached)
                         + ("" if result.cache.get("enabled", True) else " (--qmr-no-cache)"))
        lines.append(f"samples: {result.samples_path}")
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
        return [("qmr", "\n".join(lines))]

    def close(self) -> None:
        """Stop servers this session started (every process, xdist workers included)."""
        if self._servers is not None:
            self._servers.close()
            self._servers = None

    def write_results(self) -> list[str]:
        """``results.json`` of every readable cell; returns one warning line per unreadable one."""
        cells_dir = self.run_dir / "cells"
        if not cells_dir.is_dir():
            return []
        cells, warnings = [], []
        for f in sorted(cells_dir.glob("*/result.json")):
            try:
                cells.append(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                warnings.append(f"qmr: WARNING: {f}: unreadable cell record left out of results.json "
                                f"({type(exc).__name__})")
        atomic_write_json(self.run_dir / "results.json", {"run_dir": str(self.run_dir), "cells": cells})
        return warnings


def quant_spec(cell) -> QuantSpec:
    """What a cell's quantizer builds (its effective recipe keys the checkpoint cache)."""
    q = cell.quantizer
    calibration = CalibrationSpec(**q.calibration.model_dump()) if q.calibration is not None else None
    return QuantSpec(method=q.method, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric,
                     ignore=tuple(q.ignore), path=q.path, calibration=calibration,
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
