"""A validated suite (:class:`Suite`) and the cells it expands into (:class:`Cell`).

Every model x quantizer x benchmark combination is one cell, model-major, FP cells included,
except where a benchmark names the ``quantizers`` it runs; its id is
``<model>-<quantizer>-<benchmark>`` (the pytest item id).  A cell carries its effective settings:
the benchmark's thresholds merged on the suite's, the generation, Locate and Restore sections,
and absolute paths — the data directory (``$QMR_DATA_DIR`` over the suite's ``data_dir``, which is
relative to the suite file), the judge file, the quantizer's recipe and the lm-eval task folders
(the suite's ``tasks:`` then ``--qmr-tasks``).  :meth:`Cell.reuse_spec` is what the cell's
records depend on (the cache key of a reused result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import data_root
from ..measure import Scoring, TaskSource
from .schema import BenchmarkSpec, Generation, LocateSpec, ModelSpec, QuantizerSpec, RestoreSpec, SuiteSpec, Thresholds


@dataclass(frozen=True)
class Cell:
    """One model x quantizer x benchmark combination, with its effective settings."""

    id: str
    suite: str
    model: ModelSpec
    quantizer: QuantizerSpec
    benchmark: BenchmarkSpec
    thresholds: Thresholds  # benchmark override merged on the suite defaults
    generation: Generation
    data_dir: Path | None  # absolute, or None: fall back to the hub
    restore: RestoreSpec
    locate: LocateSpec = LocateSpec()
    judge_config: Path | None = None  # absolute path of locate.judge_config
    recipe_file: Path | None = None  # absolute path of the quantizer's recipe (method recipe)
    suite_file: str = ""  # how the suite file is named in messages
    tasks: TaskSource = field(default_factory=TaskSource)  # where the benchmark's task is found
    benchmark_index: int = 0  # position in the suite's benchmarks (messages name benchmarks[i])
    quantizer_index: int = 0  # position in the suite's quantizers (messages name quantizers[i])
    # the quantizer's path (method checkpoint): a directory relative to the suite file, made absolute,
    # or a hub id as given; and generation.vllm_python, relative to the suite file
    checkpoint: str | None = None
    vllm_python: str | None = None

    @property
    def where(self) -> str:
        """How messages name the suite file."""
        return self.suite_file or self.suite

    @property
    def scoring(self) -> Scoring:
        b = self.benchmark
        return Scoring(metric=b.metric, filter=b.filter, answer_kind=b.answer_kind,
                       where=f"{self.suite_file or self.suite}: benchmarks[{self.benchmark_index}]")

    def reuse_spec(self) -> dict[str, Any]:
        """The settings the cell's records depend on (a change means they must be recomputed).
        Left out: what is settled again on reused records — the verdict thresholds (unless the
        sequential gate used them to choose the items), ``expect_fail_on``, ``restore.min_gain``
        and ``restore.may_pass``."""
        thresholds = (self.thresholds.model_dump(exclude={"error_profile", "inconclusive"})
                      if self.thresholds.sequential else {"sequential": False})
        return {
            "model": self.model.model_dump(),
            # no recipe: left out, so records made before quantizers had one keep their inputs hash
            "quantizer": self.quantizer.model_dump(exclude={"expect_fail_on", "expect_inconclusive_on",
                                                            *(() if self.quantizer.recipe else ("recipe",))}),
            "benchmark": self.benchmark.model_dump(exclude={"thresholds", "quantizers"}),
            "thresholds": thresholds,
            "generation": self.generation.model_dump(),
            "data_dir": None if self.data_dir is None else str(self.data_dir),
            "tasks": self.tasks.to_dict(),
            "locate": self.locate.model_dump(),
            "restore": {**self.restore.model_dump(exclude={"min_gain", "may_pass", "quantizers", "benchmarks"}),
                        "runs": self.restores(failed=True)},
        }

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def is_fp(self) -> bool:
        return self.quantizer.method == "fp"

    def restores(self, failed: bool) -> bool:
        """Whether this cell runs Restore, given whether it failed."""
        r = self.restore
        if self.is_fp or r.when == "off" or (r.when == "on-fail" and not failed):
            return False
        return ((r.quantizers is None or self.quantizer.name in r.quantizers)
                and (r.benchmarks is None or self.benchmark.name in r.benchmarks))


@dataclass(frozen=True)
class Suite:
    """A validated suite file."""

    spec: SuiteSpec
    path: Path  # absolute path of the suite file (or a pseudo path for parsed data)
    source: str  # how the file is named in messages
    extra_tasks: tuple[Path, ...] = ()  # task folders from --qmr-tasks (absolute)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def models(self) -> list[ModelSpec]:
        return self.spec.models

    @property
    def quantizers(self) -> list[QuantizerSpec]:
        return self.spec.quantizers

    @property
    def benchmarks(self) -> list[BenchmarkSpec]:
        return self.spec.benchmarks

    @property
    def thresholds(self) -> Thresholds:
        return self.spec.thresholds

    @property
    def generation(self) -> Generation:
        return self.spec.generation

    @property
    def restore(self) -> RestoreSpec:
        return self.spec.restore

    def data_dir(self) -> Path | None:
        """``$QMR_DATA_DIR`` if set, else ``data_dir`` relative to the suite file, else None."""
        env = data_root()
        if env is not None:
            return env.resolve()
        if self.spec.data_dir is None:
            return None
        return (self.path.parent / Path(self.spec.data_dir).expanduser()).resolve()

    def task_folders(self) -> list[tuple[str, str, Path]]:
        """(key, value as given, absolute path) of each task folder: the suite's ``tasks:``
        (relative to the suite file), then ``--qmr-tasks``."""
        own = [(f"tasks[{i}]", p, (self.path.parent / Path(p).expanduser()).resolve())
               for i, p in enumerate(self.spec.tasks)]
        return own + [("--qmr-tasks", str(p), p) for p in self.extra_tasks]

    def task_source(self) -> TaskSource:
        """Where this suite's benchmark tasks are found (:class:`~pytest_qmr.measure.TaskSource`)."""
        paths = tuple(dict.fromkeys(path for _, _, path in self.task_folders()))
        return TaskSource(paths=paths, include_defaults=self.spec.include_defaults)

    def judge_config(self) -> Path | None:
        return self.relative(self.spec.locate.judge_config)

    def recipe_file(self, quantizer: QuantizerSpec) -> Path | None:
        """The quantizer's ``recipe`` (method recipe), relative to the suite file."""
        return self.relative(quantizer.recipe)

    def relative(self, value: str | None) -> Path | None:
        """A path the suite names, relative to the suite file (None for None)."""
        return None if value is None else (self.path.parent / Path(value).expanduser()).resolve()

    def checkpoint(self, quantizer: QuantizerSpec) -> str | None:
        """The ``path`` of a ``checkpoint`` quantizer: a directory relative to the suite file (absolute
        here) when one is there, else the value as given (a hub id, or a path that does not exist:
        resolving it says so)."""
        if quantizer.path is None:
            return None
        local = self.relative(quantizer.path)
        return str(local) if local is not None and local.is_dir() else quantizer.path

    def generation_for(self, benchmark: BenchmarkSpec) -> Generation:
        if benchmark.generation is None:
            return self.spec.generation
        return benchmark.generation.merged_on(self.spec.generation)

    def thresholds_for(self, benchmark: BenchmarkSpec) -> Thresholds:
        if benchmark.thresholds is None:
            return self.spec.thresholds
        return benchmark.thresholds.merged_on(self.spec.thresholds)

    def cells(self) -> list[Cell]:
        """Every model x quantizer x benchmark cell (model-major order, FP cells included)."""
        data_dir, tasks = self.data_dir(), self.task_source()
        vllm_python = self.relative(self.spec.generation.vllm_python)
        cells = []
        for model in self.spec.models:
            for quantizer_index, quantizer in enumerate(self.spec.quantizers):
                for index, benchmark in enumerate(self.spec.benchmarks):
                    if benchmark.quantizers is not None and quantizer.name not in benchmark.quantizers:
                        continue
                    cells.append(
                        Cell(
                            id=f"{model.name}-{quantizer.name}-{benchmark.name}",
                            suite=self.spec.name,
                            model=model,
                            quantizer=quantizer,
                            benchmark=benchmark,
                            thresholds=self.thresholds_for(benchmark),
                            generation=self.generation_for(benchmark),
                            data_dir=data_dir,
                            restore=self.spec.restore,
                            locate=self.spec.locate,
                            judge_config=self.judge_config(),
                            recipe_file=self.recipe_file(quantizer),
                            suite_file=self.source,
                            tasks=tasks,
                            benchmark_index=index,
                            quantizer_index=quantizer_index,
                            checkpoint=self.checkpoint(quantizer),
                            vllm_python=None if vllm_python is None else str(vllm_python),
                        )
                    )
        return cells

    def cell(self, cell_id: str) -> Cell:
        for cell in self.cells():
            if cell.id == cell_id:
                return cell
        raise KeyError(cell_id)
