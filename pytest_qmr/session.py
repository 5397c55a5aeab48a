"""What one pytest process holds across cells, and the engines that answer them.

:class:`QmrSession` lives in ``config.stash`` (no module globals), so xdist workers each hold
their own. It keeps what outlives a cell — the one loaded model (cells are ordered so
consecutive ones share it), tokenizers, the generation cache, the servers it started, the FP
baseline runs of ``--qmr-update-baselines``, per-cell cache statistics — and makes the
:class:`~pytest_qmr.measure.Evaluator` that answers a cell on its backend (hf in process, our
vLLM server, a user's or our own OpenAI-compatible server), every request going through the
content-addressed generation cache. The stages a cell goes through are
:mod:`pytest_qmr.pipeline`; the built-in Restore of a failing cell is
:mod:`pytest_qmr.restore.cell`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import models
from .fsutil import atomic_write_json
from .measure import Evaluator, GenerationSettings
from .quantize import get_method
from .records import CellResult, GateResult, SampleRecord


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
    served: dict = field(default_factory=dict)  # checkpoint path -> {endpoint, model, ...} of its last API evaluation
    output_types: dict = field(default_factory=dict)  # lm-eval task -> output_type, once it has run
    contexts: dict = field(default_factory=dict)  # cell id -> the CellContext of the cell this session ran
    family_sizes: dict = field(default_factory=dict)  # thresholds.family -> cells of it in this session
    _loaded: dict = field(default_factory=dict)
    _fp_records: dict = field(default_factory=dict)  # (model, benchmark) -> the FP run of --qmr-update-baselines
    _expected_cache: dict = field(default_factory=dict)
    _servers: Any = None  # backends.ServerPool of the server backends, created on first use
    _cache_stats: dict = field(default_factory=dict)  # cell id -> stage -> CacheStats of this run
    _generations: Any = None  # cache.GenerationCache, made on first use
    _tokenizers: dict = field(default_factory=dict)  # checkpoint path -> tokenizer (no weights)

    def run_cell(self, cell, restore: Callable[..., Any] | None = None) -> CellResult:
        """One cell through :mod:`pytest_qmr.pipeline`; ``restore`` overrides ``restore_hook``
        for this cell (the ``qmr_restore`` fixture)."""
        from .pipeline import run_cell

        return run_cell(self, cell, restore or self.restore_hook)

    # ---- models -------------------------------------------------------------------------
    def load(self, path: Path, trust_remote_code: bool, adapter: Path | None = None, rt=None):
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
    def runtime(cell):
        """The cell's ``generation.device`` / ``generation.dtype``, resolved on this machine."""
        from .backends import runtime

        return runtime(cell.generation.device, cell.generation.dtype, f"{cell.suite_file or cell.suite}: generation")

    def tokenizer(self, path: Path, trust_remote_code: bool):
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

    def say(self, cell, text: str) -> None:
        """One progress line for the terminal, about ``cell``."""
        if self.progress is not None:
            self.progress(f"qmr {cell.id}: {text}")

    def count(self, cell, stage: str, stats) -> None:
        """Add one evaluation's cache statistics to the cell's ``stage``."""
        from .cache import CacheStats

        self._cache_stats.setdefault(cell.id, {}).setdefault(stage, CacheStats()).add(stats)

    def cache_record(self, cell) -> dict:
        """Per stage, how many items came from the generation cache (CellResult.cache)."""
        return {"enabled": self.use_cache,
                **{stage: stats.to_dict() for stage, stats in self._cache_stats.get(cell.id, {}).items()}}

    def identity(self, path: Path, cell, adapter: Path | None = None, served: dict | None = None,
                  dtype: str | None = None, backend: str | None = None) -> dict:
        """What a response of this checkpoint depends on besides its request (pytest_qmr.cache)."""
        from .cache import adapter_sha, engine_versions

        backend, rt = backend or self.backend(cell), self.runtime(cell)
        if served is not None and served.get("engine") != "user server":  # ours: the port is random
            served = {**served, "endpoint": served["engine"]}
        return {"backend": backend, "weights": models.checkpoint_fingerprint(path),
                "adapter": adapter_sha(adapter) if adapter is not None else None, "device": rt.device,
                "dtype": dtype or rt.dtype, "batch_size": cell.generation.batch_size, "seed": cell.benchmark.seed,
                "engine": engine_versions(backend),
                # every engine argument a user passes (max_model_len, quantization, ... change answers)
                "engine_options": dict(sorted(cell.generation.vllm.items())) if backend == "vllm" else None,
                "served": None if served is None else {k: served[k] for k in ("endpoint", "model")}}

    @staticmethod
    def backend(cell, stage: str = "evaluate") -> str:
        """The backend that answers: the quantizer's ``backend``, else ``generation.backend``; the
        FP baseline run always takes the suite's (it is shared by every quantizer's cells)."""
        if stage == "baseline":
            return cell.generation.backend
        return cell.quantizer.backend or cell.generation.backend

    def _vllm_settings(self, cell, dtype: str):
        from .servers import VllmSettings, check_vllm_options, vllm_arg_names, vllm_python

        gen, where = cell.generation, cell.where
        python = vllm_python(cell.vllm_python, where=f"{where}: generation.vllm_python")
        if gen.vllm:  # every key is one of this vLLM's own arguments (a typo is one line, before any start)
            check_vllm_options(gen.vllm, f"{where}: generation.vllm", known=vllm_arg_names(python, self.cache_dir))
        return VllmSettings(python, dtype, self.runtime(cell).device, cell.benchmark.seed,
                            tuple(sorted(gen.vllm.items())))

    def artifact(self, cell, quantized) -> tuple[Path, str]:
        """The checkpoint a cell evaluates and what it is: ``fp`` / ``checkpoint`` (as given),
        ``compressed`` (the compressed-tensors checkpoint a user deploys) or ``dense`` (the
        fake-quant copy); ``quantizer.artifact``, default compressed with backend vllm."""
        q = cell.quantizer
        if not get_method(q.method).builds:
            return quantized.path, q.method
        kind = q.artifact or ("compressed" if self.backend(cell) == "vllm" else "dense")
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

        rt = self.runtime(cell)
        scheme = str((info.get("recipe") or {}).get("scheme") or "")
        if ((backend or self.backend(cell)) == "vllm" and cell.generation.dtype == "auto" and rt.device == "cpu"
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

    def generation_settings(self, cell) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=cell.generation.max_new_tokens, batch_size=cell.generation.batch_size)

    def data_dir_of(self, cell) -> Path | None:
        return self.data_dir or cell.data_dir

    def evaluator(self, path: Path, cell, adapter: Path | None = None, dtype: str | None = None,
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

        gen, data_dir, trc = self.generation_settings(cell), self.data_dir_of(cell), cell.model.trust_remote_code
        tokenizer = self.tokenizer(path, trc)
        backend, rt = backend or self.backend(cell, stage=stage), self.runtime(cell)
        dtype = dtype or rt.dtype
        if backend == "hf":

            def make():
                return hf_lm(*self.load(path, trc, adapter, Runtime(rt.device, dtype)), gen.batch_size, rt.device,
                             dtype)

            lm = caching_lm(make, self.identity(path, cell, adapter, dtype=dtype, backend=backend), self.generations,
                            tokenizer=tokenizer)
            return Evaluator(None, None, gen, data_dir, lm=lm, source=cell.tasks)
        if adapter is not None and backend != "vllm":
            raise models.ModelError(f"backend {backend}: a Restore adapter is evaluated with backend hf or vllm")
        if self._servers is None:
            self._servers = ServerPool()  # one server, reused across consecutive cells of a checkpoint
        if backend == "vllm":  # our own server, named after the checkpoint: known before it starts
            settings = self._vllm_settings(cell, dtype)
            fingerprint = models.checkpoint_fingerprint(path)
            name = served_name(fingerprint) if adapter is None else lora_served_name(fingerprint, adapter_sha(adapter))
            if adapter is not None:
                settings = dataclasses.replace(settings, options=settings.options + lora_options(name, adapter))
            engine = f"vLLM {settings.version}"
            served = {"endpoint": engine, "model": name, "fingerprint": fingerprint, "engine": engine, "dtype": dtype}
            self.served[str(path)] = served

            def start():
                lm, _, live = backend_lm("vllm", path, gen.max_new_tokens, gen.batch_size, cell.benchmark.seed, trc,
                                         self._servers, vllm=settings, lora_name=name if adapter else None)
                self.served[str(path)] = {**live, "dtype": dtype}
                return lm

            identity = self.identity(path, cell, adapter, served=served, dtype=dtype, backend=backend)
            lm = caching_lm(start, identity, self.generations, tokenizer=tokenizer, api=True,
                            diagnose=self._servers.died)
            return Evaluator(None, None, gen, data_dir, lm=lm, render_prompt=chat_prompt_renderer(tokenizer),
                             source=cell.tasks)
        inner, render_prompt, served = backend_lm(backend, path, gen.max_new_tokens, gen.batch_size,
                                                  cell.benchmark.seed, trc, self._servers,
                                                  endpoint=endpoint, runtime=Runtime(rt.device, dtype))
        self.served[str(path)] = served
        lm = caching_lm(lambda: inner, self.identity(path, cell, served=served, backend=backend), self.generations,
                        tokenizer=tokenizer, eager=inner,
                        diagnose=None if served["engine"] == "user server" else self._servers.died)
        return Evaluator(None, None, gen, data_dir, lm=lm, render_prompt=render_prompt, source=cell.tasks)

    def evaluate(self, path: Path, cell, indices: list[int] | None, fp_correct: list[bool] | None,
                  stage: str = "evaluate", adapter: Path | None = None, dtype: str | None = None,
                  backend: str | None = None):
        endpoints = cell.generation.endpoints  # per quantizer; the FP model's baseline run: "fp"
        endpoint = endpoints.get("fp" if stage == "baseline" else cell.quantizer.name)
        evaluator = self.evaluator(path, cell, adapter, dtype, endpoint, stage, backend)
        try:
            return self.run(evaluator, cell, indices, fp_correct, stage)
        finally:
            self.output_types.update(evaluator.output_types)  # Locate asks whether there are steps
            self.count(cell, stage, evaluator.lm.stats)

    def run(self, evaluator: Evaluator, cell, indices: list[int] | None, fp_correct: list[bool] | None,
             stage: str = "evaluate"):
        task, seed, scoring = cell.benchmark.task, cell.benchmark.seed, cell.scoring
        planned = len(indices) if indices is not None else cell.benchmark.limit

        def report(records: list[SampleRecord]) -> None:
            stats = evaluator.lm.stats
            speed = f", {stats.tok_per_s:.0f} tok/s" if stats.tok_per_s else ""
            self.say(cell, f"{stage} {len(records)}/{planned or len(records)} items "
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

    def fp_run(self, cell, fp: models.ResolvedModel) -> list[SampleRecord]:
        """The FP model's run of the cell's benchmark for ``--qmr-update-baselines``, once per
        (model, benchmark) in this session; the fp cell reuses it."""
        key = (cell.model.name, cell.benchmark.name)
        if key not in self._fp_records:
            self._fp_records[key] = self.evaluate(fp.path, cell, None, None, stage="baseline")
        return self._fp_records[key]

    def has_fp_run(self, cell) -> bool:
        return (cell.model.name, cell.benchmark.name) in self._fp_records

    def greedy(self, cell, path: Path) -> Callable[[list[str]], list[str]]:
        """Greedy generation on ``path`` for Restore's mining, answered from the generation cache
        where it can (the model is loaded only for the misses)."""
        from .restore import generate_greedy

        gen, identity = self.generation_settings(cell), {**self.identity(path, cell),
                                                         "generator": "restore.generate_greedy"}

        def generate(prompts: list[str]) -> list[str]:
            def compute(missing: list[int]) -> list[str]:
                model, tokenizer = self.load(path, cell.model.trust_remote_code, None, self.runtime(cell))
                return generate_greedy(model, tokenizer, [prompts[i] for i in missing], gen.max_new_tokens,
                                       gen.batch_size, "mining", progress=False)

            values, stats = self.generations.map(identity, "generate_greedy",
                                                 [(p, {"max_new_tokens": gen.max_new_tokens}) for p in prompts],
                                                 compute)
            self.count(cell, "mining", stats)
            return values

        return generate

    def expected(self, cell, fp: models.ResolvedModel, indices: list[int]):
        """The prompts and golds the cell's task builds for ``indices`` (no generation; cached)."""
        from .measure import expected_items

        key = (cell.benchmark.task, str(self.data_dir_of(cell)), cell.benchmark.seed, fp.fingerprint, tuple(indices),
               cell.tasks)
        if key not in self._expected_cache:
            tokenizer = self.tokenizer(fp.path, cell.model.trust_remote_code)
            self._expected_cache[key] = expected_items(cell.benchmark.task, indices, tokenizer, self.data_dir_of(cell),
                                                       seed=cell.benchmark.seed, source=cell.tasks)
        return self._expected_cache[key]

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

