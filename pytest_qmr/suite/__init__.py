"""Suite files (``suites/*.yaml``): parse, validate, expand into cells.

A suite names models, quantizers and benchmarks; every model x quantizer x benchmark
combination is one *cell* (FP cells included).  Everything is validated with pydantic v2
(``extra="forbid"``, strict types), and every problem is reported as ONE line::

    <file>: <dotted.key.path>: <problem> (got <value>)

e.g. ``suites/x.yaml: quantizers[1].bits: must be one of 2, 3, 4, 8 (got 5)``.
No traceback and no pydantic multi-line dump ever reaches the user: :class:`SuiteError`
carries the first problem found.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import QmrError
from ..fsutil import DATA_DIR_ENV, data_root
from ..measure import Scoring, TaskSource
from ..registry import JUDGES, QUANT_METHODS

__all__ = [
    "SuiteError",
    "ModelSpec",
    "Calibration",
    "QuantizerSpec",
    "BenchmarkSpec",
    "Thresholds",
    "ThresholdsOverride",
    "Generation",
    "Suite",
    "Cell",
    "load_suite",
    "parse_suite",
    "WEIGHT_BITS",
    "DATA_DIR_ENV",
]

WEIGHT_BITS = (2, 3, 4, 8)
NAME_RE = re.compile(r"[a-z0-9][a-z0-9.\-]*")


class SuiteError(QmrError, ValueError):
    """A suite file that cannot be used; ``str(err)`` is one line for the user."""


# --------------------------------------------------------------------------- field types


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError("must be lowercase letters, digits, '.' or '-', starting with a letter or digit")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _yaml_switch(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` / `on` as a boolean.
    if value is False:
        return "off"
    if value is True:
        return "on"
    return value


def _check_method(value: str) -> str:
    # the registered quantization methods (pytest_qmr.registry.QUANT_METHODS; importing them imports no torch)
    if value not in QUANT_METHODS:
        close = QUANT_METHODS.closest(value)
        raise ValueError("must be one of " + ", ".join(QUANT_METHODS.names())
                         + (f", did you mean {close!r}?" if close else ""))
    return value


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Alpha = Annotated[float, Field(gt=0, lt=1)]
PositiveInt = Annotated[int, Field(gt=0)]
Seed = Annotated[int, Field(ge=0)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSpec(_Spec):
    name: Name
    ref: NonEmptyStr  # embedded:NAME, a local directory, or a hub id
    trust_remote_code: bool = False


class Calibration(_Spec):
    dataset: NonEmptyStr
    samples: PositiveInt = 128
    seq_len: PositiveInt = 512
    seed: Seed = 0


class QuantizerSpec(_Spec):
    name: Name
    method: Annotated[str, AfterValidator(_check_method)]
    bits: int | None = None  # weight bits; smoothquant is W8A8 (8, the default)
    group_size: Annotated[int, Field(ge=2)] | None = 128  # None: per-channel; a group of 1 is not quantization
    symmetric: bool | None = None  # None: the method's default (awq asymmetric, others symmetric)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    calibration: Calibration | None = None
    path: NonEmptyStr | None = None  # method=checkpoint only: local dir or hub id
    recipe: NonEmptyStr | None = None  # method=recipe only: llmcompressor recipe YAML, relative to the suite file
    options: dict[str, Any] = Field(default_factory=dict)  # modifier settings, e.g. {n_grid: 10} for awq
    # benchmarks on which this quantizer is a known regression: those cells are strict xfails
    expect_fail_on: list[NonEmptyStr] = Field(default_factory=list)
    # benchmarks whose item count is known to be too small to settle this quantizer's verdict
    # (a strict xfail that demands the gate's INCONCLUSIVE: neither a pass nor a fail satisfies it)
    expect_inconclusive_on: list[NonEmptyStr] = Field(default_factory=list)
    # where this quantizer's cells are answered (None: generation.backend), and what is evaluated:
    # the compressed-tensors checkpoint a user deploys, or the dense fake-quant copy
    # (None: compressed with backend vllm, dense with hf / openai)
    backend: Literal["hf", "vllm", "openai"] | None = None
    artifact: Literal["compressed", "dense"] | None = None

    @property
    def is_fp(self) -> bool:
        return self.method == "fp"

    @property
    def effective_bits(self) -> int | None:
        return self.bits if self.bits is not None else QUANT_METHODS.get(self.method).fixed_bits


class Thresholds(_Spec):
    max_abs_drop: Fraction = 0.05
    max_rel_drop: Fraction = 0.10
    alpha: Alpha = 0.05
    sequential: bool = False
    min_items: PositiveInt = 20
    inconclusive: Literal["fail", "pass"] = "fail"  # how a cell with too little evidence ends
    error_profile: dict[str, Any] = Field(default_factory=dict)
    # difference: the point estimate against the margins; noninferiority: the interval (pytest_qmr.gate)
    mode: Literal["difference", "noninferiority"] = "difference"
    # many cells at once: each gated at alpha / m, Holm or Benjamini-Hochberg p reported at the end
    family: Literal["none", "holm", "bh"] = "none"


class ThresholdsOverride(_Spec):
    """A benchmark's partial override; only keys it sets replace the suite defaults."""

    max_abs_drop: Fraction = None  # type: ignore[assignment]
    max_rel_drop: Fraction = None  # type: ignore[assignment]
    alpha: Alpha = None  # type: ignore[assignment]
    sequential: bool = None  # type: ignore[assignment]
    min_items: PositiveInt = None  # type: ignore[assignment]
    inconclusive: Literal["fail", "pass"] = None  # type: ignore[assignment]
    error_profile: dict[str, Any] = None  # type: ignore[assignment]
    mode: Literal["difference", "noninferiority"] = None  # type: ignore[assignment]
    family: Literal["none", "holm", "bh"] = None  # type: ignore[assignment]

    def merged_on(self, base: Thresholds) -> Thresholds:
        data = base.model_dump()
        override = self.model_dump(exclude_unset=True)
        if "error_profile" in override:
            override["error_profile"] = {**base.error_profile, **override["error_profile"]}
        data.update(override)
        return Thresholds.model_validate(data)


class BenchmarkSpec(_Spec):
    name: Name
    task: NonEmptyStr  # an lm-eval task name
    limit: PositiveInt | None = None  # None: all items
    seed: Seed = 0
    thresholds: ThresholdsOverride | None = None
    quantizers: list[Name] | None = None  # only these quantizers' cells (None: every quantizer)
    # any lm-eval task: its per-item 0/1 metric (None: exact_match, else acc; answer: our answer
    # checker under answer_kind), the filter whose output it scores (None: the task's first), and
    # the answer kind our extractor reads for Locate
    metric: NonEmptyStr | None = None
    filter: NonEmptyStr | None = None
    answer_kind: Literal["number", "latex", "choice"] | None = None


class Generation(_Spec):
    max_new_tokens: PositiveInt = 256
    batch_size: PositiveInt = 16
    backend: Literal["hf", "vllm", "openai"] = "hf"
    # auto: CUDA when a GPU is visible, else the CPU; dtype auto: bfloat16 on CUDA, float32 on the CPU
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # backend vllm: the Python of vLLM's own environment (None: QMR_VLLM_PYTHON, else this one),
    # and engine arguments passed to `vllm serve` (tensor_parallel_size: 2 -> --tensor-parallel-size 2)
    vllm_python: NonEmptyStr | None = None
    vllm: dict[str, Any] = Field(default_factory=dict)
    # backend openai: a URL per quantizer name (fp too); the others use QMR_OPENAI_BASE_URL / qmr serve
    endpoints: dict[Name, NonEmptyStr] = Field(default_factory=dict)


class LocateSpec(_Spec):
    """How quantized cells locate the first faulty step of each regressed item."""

    enabled: bool = True
    judges: list[NonEmptyStr] = Field(default_factory=lambda: ["rule"], min_length=1)
    judge_config: NonEmptyStr | None = None  # YAML of LLM judges (relative to the suite file)
    policy: dict[str, Any] = Field(default_factory=dict)
    review: bool = True  # write the human review queue (escalated, unjudged, audit sample) per cell
    audit_rate: Fraction = 0.02  # share of accepted cases sampled into the review queue


def _restore_shorthand(value: Any) -> Any:
    # `restore: on-fail` is short for `restore: {when: on-fail}`
    value = _yaml_switch(value)
    return {"when": value} if isinstance(value, str) else value


class RestoreSpec(_Spec):
    """When a failing cell runs Silver Bullet DPO, and with what (see pytest_qmr.restore)."""

    when: Annotated[Literal["off", "on-fail", "always"], BeforeValidator(_yaml_switch)] = "off"
    quantizers: list[Name] | None = None  # only these quantizers' cells (None: all)
    benchmarks: list[Name] | None = None  # only these benchmarks' cells (None: all)
    teacher: NonEmptyStr = "gold"  # a registered teacher (registry.TEACHERS): gold | fp | endpoint:NAME
    variant: NonEmptyStr = "all-step"  # a registered Restore variant (registry.RESTORE_VARIANTS)
    rejected_scope: Literal["rest", "step"] = "rest"  # step: reject only the faulty step (Step-DPO style)
    train_problems: PositiveInt = 200  # training-split problems the quantized model is mined on
    max_pairs: PositiveInt | None = None
    may_pass: bool = False  # a restored model that passes the gate turns the cell to pass
    # accuracy the restored model must win back over the quantized one on the cell's items
    # (None: report only); a Restore that wins less, or cannot run, fails the cell as RestoreFailed
    min_gain: Annotated[float, Field(ge=-1, le=1)] | None = None
    mmlu_limit: Annotated[int, Field(ge=0)] = 0  # >0: MMLU items checked before/after (preservation)
    # also re-measure as deployed: the compressed checkpoint + the adapter through vLLM (--enable-lora);
    # None: when the cell's backend is vllm
    deployed: bool | None = None
    train: dict[str, Any] = Field(default_factory=dict)  # RestoreConfig fields (beta, lora_r, max_steps...)


class SuiteSpec(_Spec):
    name: Name
    description: str | None = None
    data_dir: NonEmptyStr | None = None
    tasks: list[NonEmptyStr] = Field(default_factory=list)  # lm-eval task folders (relative to the suite file)
    # also lm-eval's stock tasks (their datasets from the hub unless a user YAML points them at files)
    include_defaults: bool = False
    locate: LocateSpec = Field(default_factory=LocateSpec)
    restore: Annotated[RestoreSpec, BeforeValidator(_restore_shorthand)] = Field(default_factory=RestoreSpec)
    models: list[ModelSpec] = Field(min_length=1)
    quantizers: list[QuantizerSpec] = Field(min_length=1)
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    generation: Generation = Field(default_factory=Generation)


# --------------------------------------------------------------------------- suite & cells


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
        if self.spec.locate.judge_config is None:
            return None
        return (self.path.parent / Path(self.spec.locate.judge_config).expanduser()).resolve()

    def recipe_file(self, quantizer: QuantizerSpec) -> Path | None:
        """The quantizer's ``recipe`` (method recipe), relative to the suite file."""
        if quantizer.recipe is None:
            return None
        return (self.path.parent / Path(quantizer.recipe).expanduser()).resolve()

    def thresholds_for(self, benchmark: BenchmarkSpec) -> Thresholds:
        if benchmark.thresholds is None:
            return self.spec.thresholds
        return benchmark.thresholds.merged_on(self.spec.thresholds)

    def cells(self) -> list[Cell]:
        """Every model x quantizer x benchmark cell (model-major order, FP cells included)."""
        data_dir, tasks = self.data_dir(), self.task_source()
        cells = []
        for model in self.spec.models:
            for quantizer in self.spec.quantizers:
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
                            generation=self.spec.generation,
                            data_dir=data_dir,
                            restore=self.spec.restore,
                            locate=self.spec.locate,
                            judge_config=self.judge_config(),
                            recipe_file=self.recipe_file(quantizer),
                            suite_file=self.source,
                            tasks=tasks,
                            benchmark_index=index,
                        )
                    )
        return cells

    def cell(self, cell_id: str) -> Cell:
        for cell in self.cells():
            if cell.id == cell_id:
                return cell
        raise KeyError(cell_id)


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # let construct_mapping report it
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_suite(path: str | os.PathLike, extra_tasks: Sequence[str | os.PathLike] = ()) -> Suite:
    """Read and validate a suite file; raise :class:`SuiteError` (one line) on any problem.
    ``extra_tasks``: more lm-eval task folders (``--qmr-tasks``), relative to the working directory."""
    source = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{source}: suite file not found (got {str(file.resolve())!r})") from None
    except IsADirectoryError:
        raise SuiteError(f"{source}: is a directory, not a suite file (got {str(file.resolve())!r})") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{source}: not UTF-8 text "
                         f"(got byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise SuiteError(f"{source}: cannot read suite file: {exc.strerror} (got {str(file.resolve())!r})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise SuiteError(_yaml_message(source, exc, text)) from None
    suite = parse_suite(data, source=source, path=file)
    return dataclasses.replace(suite, extra_tasks=tuple(Path(p).expanduser().resolve() for p in extra_tasks))


def parse_suite(data: Any, *, source: str = "<suite>", path: str | os.PathLike | None = None) -> Suite:
    """Validate already-parsed suite data (``path`` anchors a relative ``data_dir``)."""
    suite_path = Path(path).resolve() if path is not None else Path.cwd() / "<suite>"
    if data is None:
        raise SuiteError(f"{source}: (top level): must be a mapping of suite keys (got an empty file)")
    if not isinstance(data, dict):
        raise SuiteError(f"{source}: (top level): must be a mapping of suite keys (got {_show(data)})")
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        raise SuiteError(_pydantic_message(source, exc)) from None
    _check_semantics(source, spec)
    return Suite(spec=spec, path=suite_path, source=source)


# --------------------------------------------------------------------------- semantic checks


def _fail(source: str, key: str, problem: str, value: Any, *, raw: bool = False) -> None:
    shown = value if raw else _show(value)
    raise SuiteError(f"{source}: {key}: {problem} (got {shown})")


def _check_method_fields(source: str, key: str, q: QuantizerSpec) -> None:
    """What the quantizer's method (its QUANT_METHODS class) requires of and forbids in its fields."""
    method = QUANT_METHODS.get(q.method)
    for unused in method.unused:
        if unused in q.model_fields_set:
            _fail(source, f"{key}.{unused}", f"not used by method {q.method} ({method.unused_because}); remove it",
                  getattr(q, unused))
    if method.needs_bits and q.bits is None:
        _fail(source, f"{key}.bits", f"required for method {q.method}: one of 2, 3, 4, 8", "nothing", raw=True)
    if method.fixed_bits is not None and q.bits is not None and q.bits != method.fixed_bits:
        _fail(source, f"{key}.bits", f"must be {method.fixed_bits} for method {q.method} ({method.scheme})", q.bits)
    if q.bits is not None and q.bits not in WEIGHT_BITS:
        _fail(source, f"{key}.bits", "must be one of 2, 3, 4, 8", q.bits)
    if method.calibrated and q.calibration is None:
        _fail(source, f"{key}.calibration",
              f"required for method {q.method}, e.g. {{dataset: gsm8k, samples: 64, seq_len: 512, seed: 0}}",
              "nothing", raw=True)
    if method.requires is not None and getattr(q, method.requires[0]) is None:
        _fail(source, f"{key}.{method.requires[0]}", f"required for method {q.method}: {method.requires[1]}",
              "nothing", raw=True)
    if q.options:
        from ..quantize import QuantizeError, method_settings

        try:
            method_settings(q.method, q.options)
        except QuantizeError as exc:
            bad = next((k for k in q.options if repr(k) in str(exc) or f" {k} " in str(exc)), next(iter(q.options)))
            _fail(source, f"{key}.options.{bad}", str(exc).split(": ", 1)[1].split(" (got ")[0], q.options[bad])
    owners: dict[str, list[str]] = {}  # a field some method requires -> the methods that take it
    for name, cls in QUANT_METHODS.items():
        if cls.requires is not None:
            owners.setdefault(cls.requires[0], []).append(name)
    for taken, names in owners.items():
        if q.method not in names and getattr(q, taken, None) is not None:
            _fail(source, f"{key}.{taken}", f"only allowed for method {' or '.join(names)}, not {q.method}",
                  getattr(q, taken))


def _check_semantics(source: str, spec: SuiteSpec) -> None:
    benchmark_names = [b.name for b in spec.benchmarks]
    for i, q in enumerate(spec.quantizers):
        key = f"quantizers[{i}]"
        for listed in ("expect_fail_on", "expect_inconclusive_on"):
            for j, name in enumerate(getattr(q, listed)):
                if name not in benchmark_names:
                    _fail(source, f"{key}.{listed}[{j}]",
                          f"not a benchmark of this suite ({', '.join(benchmark_names)})", name)
        for j, name in enumerate(q.expect_inconclusive_on):
            if name in q.expect_fail_on:
                _fail(source, f"{key}.expect_inconclusive_on[{j}]",
                      "also in expect_fail_on: a cell expects one verdict", name)
        _check_method_fields(source, key, q)

    for section in ("models", "quantizers", "benchmarks"):
        seen: dict[str, int] = {}
        for i, item in enumerate(getattr(spec, section)):
            if item.name in seen:
                _fail(source, f"{section}[{i}].name", f"duplicate name, already used by {section}[{seen[item.name]}]",
                      item.name)
            seen[item.name] = i

    quantizer_names = [q.name for q in spec.quantizers]
    for i, b in enumerate(spec.benchmarks):
        for j, name in enumerate(b.quantizers or []):
            if name not in quantizer_names:
                _fail(source, f"benchmarks[{i}].quantizers[{j}]",
                      f"not a quantizer of this suite ({', '.join(quantizer_names)})", name)
    _check_locate(source, spec)
    _check_restore(source, spec)
    _check_family(source, spec)
    _check_engines(source, spec)

    seen_ids: dict[str, str] = {}
    for mi, m in enumerate(spec.models):
        for qi, q in enumerate(spec.quantizers):
            for bi, b in enumerate(spec.benchmarks):
                cell_id = f"{m.name}-{q.name}-{b.name}"
                where = f"models[{mi}] x quantizers[{qi}] x benchmarks[{bi}]"
                if cell_id in seen_ids:
                    _fail(source, f"models[{mi}].name",
                          f"cell id {cell_id!r} of {where} collides with {seen_ids[cell_id]}; rename one", m.name)
                seen_ids[cell_id] = where


def _check_engines(source: str, spec: SuiteSpec) -> None:
    """generation.vllm options, generation.endpoints names, and artifacts that exist."""
    from ..models import ModelError
    from ..servers import check_vllm_options

    try:
        check_vllm_options(spec.generation.vllm)
    except ModelError as exc:
        key, _, problem = str(exc).partition(": ")
        _fail(source, key, problem.split(" (got ")[0], spec.generation.vllm[key.rsplit(".", 1)[1]])
    names = [q.name for q in spec.quantizers]
    for name, url in spec.generation.endpoints.items():
        if name not in names:
            _fail(source, f"generation.endpoints.{name}", f"not a quantizer of this suite ({', '.join(names)})", url)
    for i, q in enumerate(spec.quantizers):
        if q.artifact == "compressed" and not QUANT_METHODS.get(q.method).builds:
            _fail(source, f"quantizers[{i}].artifact", f"method {q.method} builds no compressed checkpoint "
                  "(its checkpoint is evaluated as it is); remove it", q.artifact)


def _check_family(source: str, spec: SuiteSpec) -> None:
    """A multiplicity family adjusts p-values, which only the difference mode decides on."""
    sections = [("thresholds", spec.thresholds)]
    sections += [(f"benchmarks[{i}].thresholds", b.thresholds.merged_on(spec.thresholds))
                 for i, b in enumerate(spec.benchmarks) if b.thresholds is not None]
    for key, thresholds in sections:
        if thresholds.family != "none" and thresholds.mode == "noninferiority":
            _fail(source, f"{key}.family", "adjusts p-values, so it needs mode: difference (noninferiority judges "
                  "each cell's interval)", thresholds.family)


def _check_restore(source: str, spec: SuiteSpec) -> None:
    from dataclasses import fields

    from ..registry import RESTORE_VARIANTS
    from ..restore import RestoreConfig, RestoreError, spec_problem

    r = spec.restore
    for section, names in (("quantizers", [q.name for q in spec.quantizers]),
                           ("benchmarks", [b.name for b in spec.benchmarks])):
        for j, name in enumerate(getattr(r, section) or []):
            if name not in names:
                _fail(source, f"restore.{section}[{j}]",
                      f"not one of this suite's {section} ({', '.join(names)})", name)
    known = [f.name for f in fields(RestoreConfig)]
    for key, value in r.train.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            _fail(source, f"restore.train.{key}", f"unknown setting, {hint}", value)
    try:
        RestoreConfig(**r.train)
    except (RestoreError, TypeError, ValueError) as exc:
        _fail(source, "restore.train", str(exc), r.train)
    if (problem := spec_problem(r.teacher, spec.locate.judge_config)) is not None:
        _fail(source, "restore.teacher", problem, r.teacher)
    if r.variant not in RESTORE_VARIANTS:
        _fail(source, "restore.variant", RESTORE_VARIANTS.unknown(r.variant), r.variant)


def _judge_hint(name: str, configured: Sequence[str] = ()) -> str:
    """Did-you-mean over the registered judges (``registry.JUDGES``) and ``configured``, else them all."""
    close = JUDGES.closest(name, configured)
    return f"did you mean {close!r}?" if close else ", ".join((*JUDGES.names(), *configured))


def _check_locate(source: str, spec: SuiteSpec) -> None:
    from ..locate import LocateError, Policy, validate_thresholds

    for j, name in enumerate(spec.locate.judges):
        if name not in JUDGES and spec.locate.judge_config is None:
            _fail(source, f"locate.judges[{j}]", f"not a built-in judge ({_judge_hint(name)}); "
                  "LLM judges need locate.judge_config", name)
    try:
        Policy.from_dict(spec.locate.policy)
    except (LocateError, TypeError) as exc:
        _fail(source, "locate.policy", str(exc), spec.locate.policy)
    profiles = [("thresholds.error_profile", spec.thresholds.error_profile)]
    profiles += [(f"benchmarks[{i}].thresholds.error_profile", b.thresholds.error_profile)
                 for i, b in enumerate(spec.benchmarks) if b.thresholds is not None and b.thresholds.error_profile]
    for key, thresholds in profiles:
        try:
            validate_thresholds(thresholds)
        except ValueError as exc:
            bad = next(k for k in thresholds if str(k) in str(exc))
            _fail(source, f"{key}.{bad}", str(exc).split(": ", 1)[1].split(", got ")[0], thresholds[bad])


# --------------------------------------------------------------------------- messages


def _show(value: Any, limit: int = 70) -> str:
    """A short, single-line rendering of a YAML value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a mapping " + repr(value)
    elif isinstance(value, (list, tuple)):
        text = "a list " + repr(list(value))
    else:
        text = f"{type(value).__name__} {value!r}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _type_at(loc: tuple) -> Any:
    """The annotation of the field at ``loc`` in :class:`SuiteSpec` (None if not a field)."""
    tp: Any = SuiteSpec
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            if get_origin(tp) is list:
                tp = get_args(tp)[0]
                continue
            return None
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
            continue
        return None
    return _unwrap(tp)


_TYPE_PROBLEMS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "none_required": "must be null",
}


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _problem(error: dict) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _type_at(loc[:-1])
        valid = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        if close:
            return f"unknown key, did you mean {close[0]!r}?"
        return "unknown key (valid keys: " + ", ".join(valid) + ")" if valid else "unknown key"
    if kind == "missing":
        return "missing required key"
    if kind == "literal_error":
        field = _type_at(loc)
        if get_origin(field) is Literal:
            return "must be one of " + ", ".join(str(a) for a in get_args(field))
        return "must be one of " + str(ctx.get("expected", ""))
    if kind in _TYPE_PROBLEMS:
        problem = _TYPE_PROBLEMS[kind]
        if kind in ("int_type", "int_parsing") and isinstance(error.get("input"), float):
            problem += " (no decimal point)"
        return problem
    if kind == "greater_than":
        return f"must be greater than {_num(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"must be at least {_num(ctx['ge'])}"
    if kind in ("less_than", "less_than_equal"):
        bound = _num(ctx.get("lt", ctx.get("le")))
        problem = f"must be less than {bound}" if kind == "less_than" else f"must be at most {bound}"
        if loc and loc[-1] in ("max_abs_drop", "max_rel_drop"):
            problem += " (a fraction: 0.05 means 5 points)"
        return problem
    if kind == "too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    msg = str(error.get("msg", kind))
    return msg[:1].lower() + msg[1:]


def _pydantic_message(source: str, exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    problem = _problem(error)
    value = error.get("input")
    if error["type"] == "missing":
        keys = list(value) if isinstance(value, dict) else []
        shown = ("keys: " + ", ".join(map(str, keys))) if keys else "an empty mapping"
    else:
        shown = _show(value)
    return " ".join(f"{source}: {_key_path(loc)}: {problem} (got {shown})".split())


def _yaml_message(source: str, exc: yaml.YAMLError, text: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and "duplicate key" not in str(problem):
        problem = f"{problem} {context}"
    problem = " ".join(str(problem).split())
    if mark is None:
        return f"{source}: (yaml): invalid YAML: {problem} (got unparseable text)"
    lines = text.splitlines()
    line = lines[mark.line].strip() if mark.line < len(lines) else ""
    return (
        f"{source}: line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem} "
        f"(got {_show(line)})"
    )


# --------------------------------------------------------------------------- references


def check_references(suite: Suite) -> None:
    """What the schema cannot see but collection must: every benchmark's ``task`` is a known
    lm-eval task (did-you-mean), every quantizer's ``recipe`` is a file, and
    ``locate.judge_config`` is a readable, valid judge file that configures every
    ``locate.judges`` name no judge is registered under (did-you-mean).
    Found here, a typo costs one line at collection instead of a traceback after evaluation."""
    from ..locate.judges import load_judge_settings
    from ..measure import check_task, known_tasks

    for key, given, folder in suite.task_folders():
        if not folder.is_dir():
            _fail(suite.source, key, f"no such lm-eval task folder ({folder})", given)
    for i, quantizer in enumerate(suite.quantizers):
        recipe = suite.recipe_file(quantizer)
        if recipe is not None and not recipe.is_file():
            _fail(suite.source, f"quantizers[{i}].recipe", f"no such file ({recipe})", quantizer.recipe)
    known = known_tasks(suite.task_source())
    for i, benchmark in enumerate(suite.benchmarks):
        check_task(benchmark.task, f"{suite.source}: benchmarks[{i}].task", known)
    judge_config = suite.judge_config()
    if judge_config is not None:
        given = suite.spec.locate.judge_config
        if not judge_config.is_file():
            _fail(suite.source, "locate.judge_config", f"no such file ({judge_config})", given)
        try:
            settings = load_judge_settings(judge_config)
        except QmrError as exc:
            _fail(suite.source, "locate.judge_config", str(exc), given)
        for j, name in enumerate(suite.spec.locate.judges):
            if name not in JUDGES and name not in settings.judges:
                _fail(suite.source, f"locate.judges[{j}]", f"neither a built-in judge nor one of {given} "
                      f"({_judge_hint(name, tuple(settings.judges))})", name)
