"""What one pytest process holds across cells, and the engines that answer them.

:class:`QmrSession` lives in ``config.stash`` (no module globals), so xdist workers each hold
their own. It keeps what outlives a cell — the one loaded model (cells are ordered so
consecutive ones share it), tokenizers, the generation cache, the server pool and one engine per
name (:mod:`pytest_qmr.engines`), the FP baseline runs of ``--qmr-update-baselines``, per-cell
cache statistics — and makes the :class:`~pytest_qmr.measure.Evaluator` that answers a cell on
its engine, every request going through the content-addressed generation cache. It is the
engines' :class:`~pytest_qmr.engines.EngineHost`. What engine answers, in what dtype and on
which artifact is each engine's own policy; the session only asks. The stages a cell goes
through are :mod:`pytest_qmr.pipeline`; the built-in Restore of a failing cell is
:mod:`pytest_qmr.restore.cell`; what a run directory holds at the session's end is
:mod:`pytest_qmr.rundir`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import models
from .measure import Evaluator, GenerationSettings, doc_item_id
from .sampling import sample_seed
from .quantize import get_method
from .records import CellResult, SampleRecord


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
    _servers: Any = None  # engines.servers.ServerPool of the server engines, created on first use
    _engines: dict = field(default_factory=dict)  # engine name -> the engine (pytest_qmr.engines), made once
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
        from .engines import runtime

        return runtime(cell.generation.device, cell.generation.dtype, f"{cell.where}: generation")

    def tokenizer(self, path: Path, trust_remote_code: bool):
        """The checkpoint's tokenizer as models.load sets it up, loaded once per session."""
        if str(path) not in self._tokenizers:
            self._tokenizers[str(path)] = models.load_tokenizer(path, trust_remote_code)
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

    # ---- engines ------------------------------------------------------------------------
    @property
    def servers(self):
        """The servers this session started (one at a time; :class:`~pytest_qmr.engines.servers.ServerPool`)."""
        if self._servers is None:
            from .engines.servers import ServerPool

            self._servers = ServerPool()  # one server, reused across consecutive cells of a checkpoint
        return self._servers

    def engine(self, name: str):
        """The session's engine registered as ``name`` (:data:`pytest_qmr.registry.ENGINES`), made once."""
        if name not in self._engines:
            from .registry import ENGINES

            engine = ENGINES.get(name, where="generation.backend")(self)
            engine.name = name  # the name it is registered (and named in suites and records) by
            self._engines[name] = engine
        return self._engines[name]

    @staticmethod
    def backend(cell, stage: str = "evaluate") -> str:
        """The engine that answers: the quantizer's ``backend``, else ``generation.backend``; the
        FP baseline run always takes the suite's (it is shared by every quantizer's cells)."""
        if stage == "baseline":
            return cell.generation.backend
        return cell.quantizer.backend or cell.generation.backend

    def artifact(self, cell, quantized) -> tuple[Path, str]:
        """The checkpoint a cell evaluates and what it is: ``fp`` / ``checkpoint`` (as given),
        ``compressed`` (the compressed-tensors checkpoint a user deploys) or ``dense`` (the
        fake-quant copy); ``quantizer.artifact``, else the engine's default."""
        q = cell.quantizer
        if not get_method(q.method).builds:
            return quantized.path, q.method
        kind = q.artifact or self.engine(self.backend(cell)).default_artifact
        if kind == "dense":
            return quantized.path, kind
        if quantized.compressed_path is None:
            raise models.ModelError(f"{cell.id}: artifact compressed: the {q.method} build wrote no compressed "
                                    "checkpoint; use artifact: dense")
        return quantized.compressed_path, kind

    def engine_dtype(self, cell, artifact: str, quantization: dict | None, backend: str | None = None) -> str:
        """The dtype the cell's engine runs ``artifact`` in (:meth:`pytest_qmr.engines.Engine.dtype`:
        ``generation.dtype``, or what the engine needs for the checkpoint's format, ``quantization``:
        :func:`pytest_qmr.quantize.formats.checkpoint_format`)."""
        from .engines import CellSettings

        rt = self.runtime(cell)
        settings = CellSettings(device=rt.device, dtype=cell.generation.dtype, resolved_dtype=rt.dtype,
                                artifact=artifact, quantization=quantization)
        return self.engine(backend or self.backend(cell)).dtype(settings)

    def target(self, path: Path, cell, engine, adapter: Path | None = None, dtype: str | None = None,
               endpoint: str | None = None):
        """One checkpoint as ``engine`` runs it for ``cell`` (:class:`pytest_qmr.engines.Target`)."""
        from .cache import adapter_sha
        from .engines import Target

        rt, gen = self.runtime(cell), cell.generation
        options = tuple(sorted(getattr(gen, engine.options_key).items())) if engine.options_key else ()
        return Target(path=Path(path), fingerprint=models.checkpoint_fingerprint(path), device=rt.device,
                      dtype=dtype or rt.dtype, batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens,
                      seed=cell.benchmark.seed, adapter=adapter,
                      adapter_sha=adapter_sha(adapter) if adapter is not None else None,
                      trust_remote_code=cell.model.trust_remote_code, options=options, endpoint=endpoint,
                      python=cell.vllm_python, where=cell.where)

    @staticmethod
    def identity(target, engine) -> dict:
        """What a response of ``target`` on ``engine`` depends on besides its request (the
        generation cache's key, :mod:`pytest_qmr.cache`): the checkpoint and adapter by content,
        where and in what precision, batch size and seed, library versions, and what the engine
        adds (the served name it proves, its own arguments)."""
        from .versions import ENGINE, package_versions

        return {"backend": engine.name, "weights": target.fingerprint, "adapter": target.adapter_sha,
                "device": target.device, "dtype": target.dtype, "batch_size": target.batch_size,
                "seed": target.seed, "engine": package_versions(ENGINE), **engine.identity(target)}

    # ---- cells --------------------------------------------------------------------------
    def thresholds(self, cell) -> Any:
        """The cell's thresholds for the gate; under a multiplicity family, with the number of
        this session's cells in it (``family_sizes``, counted by the plugin at collection)."""
        family = cell.thresholds.family
        if family == "none":
            return cell.thresholds
        return {**cell.thresholds.model_dump(), "family_size": self.family_sizes.get(family, 1)}

    def generation_settings(self, cell) -> GenerationSettings:
        g = cell.generation
        return GenerationSettings(max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, samples=g.samples,
                                  temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed)

    def data_dir_of(self, cell) -> Path | None:
        return self.data_dir or cell.data_dir

    def evaluator(self, path: Path, cell, adapter: Path | None = None, dtype: str | None = None,
                  endpoint: str | None = None, stage: str = "evaluate", backend: str | None = None) -> Evaluator:
        """An Evaluator of ``path`` on the engine ``backend`` (default the cell's), answering from the
        generation cache where it can: the engine starts (loads its model, starts its server) only
        on a miss, unless it must prove what answers first (``eager``). ``dtype``: the engine's
        (default the cell's); ``endpoint``: the user's URL for this checkpoint
        (``generation.endpoints``); ``adapter``: a Restore LoRA adapter on ``path``."""
        from .cache import caching_lm, token_counter
        from .registry import ENGINES

        engine = self.engine(backend or self.backend(cell, stage=stage))
        if adapter is not None and not engine.adapters:
            serving = " or ".join(name for name, cls in ENGINES.items() if cls.adapters)
            raise models.ModelError(f"backend {engine.name}: a Restore adapter is evaluated with backend {serving}")
        target = self.target(path, cell, engine, adapter, dtype, endpoint)
        engine.check(target)  # settings it cannot take: one line, also on a fully cached cell
        tokenizer = self.tokenizer(path, target.trust_remote_code)
        eager = engine.start(target) if engine.eager else None
        settings = self.generation_settings(cell)

        def seeder(request, j: int) -> int:  # sample j of an item: its own seed (pytest_qmr.sampling)
            return sample_seed(settings.seed, doc_item_id(request.doc), j)

        think = cell.model.think
        lm = caching_lm(lambda: engine.start(target), self.identity(target, engine), self.generations,
                        tokenizer=tokenizer, eager=eager, api=engine.api, diagnose=engine.died, seeder=seeder,
                        template_kwargs=dict(cell.model.chat_template_kwargs))
        return Evaluator(None, None, settings, self.data_dir_of(cell), lm=lm,
                         render_prompt=engine.prompt_renderer(tokenizer), source=cell.tasks,
                         served=lambda: engine.served(target), count_tokens=token_counter(tokenizer),
                         think=None if think is None else (think.start, think.end))

    def evaluate(self, path: Path, cell, indices: list[int] | None, fp_counts: list[int] | None,
                  stage: str = "evaluate", adapter: Path | None = None, dtype: str | None = None,
                  backend: str | None = None):
        endpoints = cell.generation.endpoints  # per quantizer; the FP model's baseline run: "fp"
        endpoint = endpoints.get("fp" if stage == "baseline" else cell.quantizer.name)
        evaluator = self.evaluator(path, cell, adapter, dtype, endpoint, stage, backend)
        try:
            return self.run(evaluator, cell, indices, fp_counts, stage)
        finally:
            self.output_types.update(evaluator.output_types)  # Locate asks whether there are steps
            self.count(cell, stage, evaluator.lm.stats)
            self.served[str(path)] = evaluator.served()

    def run(self, evaluator: Evaluator, cell, indices: list[int] | None, fp_counts: list[int] | None,
             stage: str = "evaluate"):
        task, seed, scoring = cell.benchmark.task, cell.benchmark.seed, cell.scoring
        planned = len(indices) if indices is not None else cell.benchmark.limit

        def report(records: list[SampleRecord]) -> None:
            stats = evaluator.lm.stats
            speed = f", {stats.tok_per_s:.0f} tok/s" if stats.tok_per_s else ""
            self.say(cell, f"{stage} {len(records)}/{planned or len(records)} items "
                            f"({stats.items_from_cache} from cache{speed})")

        if fp_counts is not None and cell.thresholds.sequential and indices is not None:
            from .sampled_gate import sampled_verdict_if_known

            chunk = max(cell.generation.batch_size, cell.thresholds.min_items)

            def settled(records: list[SampleRecord]) -> bool:
                report(records)
                quant, k = [r.n_correct for r in records], (records[0].k if records else 1)
                return sampled_verdict_if_known(fp_counts, quant, self.thresholds(cell), k) is not None

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
        """Greedy generation on ``path`` for Restore's mining (transformers in this process, the
        ``hf`` engine's identity), answered from the generation cache where it can (the model is
        loaded only for the misses)."""
        from .restore import generate_greedy

        gen = self.generation_settings(cell)
        hf = self.engine("hf")
        identity = {**self.identity(self.target(path, cell, hf), hf), "generator": "restore.generate_greedy"}

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
        """Stop what the engines started (every process, xdist workers included)."""
        for engine in self._engines.values():
            engine.close()
        if self._servers is not None:
            self._servers.close()
            self._servers = None
