"""The suite file's schema: one pydantic v2 model per section, and the field types they share.

:class:`SuiteSpec` is the whole file; :class:`ModelSpec`, :class:`QuantizerSpec` (with its
:class:`Calibration`), :class:`BenchmarkSpec` (with a partial :class:`ThresholdsOverride`),
:class:`Thresholds`, :class:`Generation`, :class:`LocateSpec` and :class:`RestoreSpec` are its
sections.  Every model forbids unknown keys, takes no coercion (``strict``: ``"4"`` is not an
integer) and is frozen.  What one field can check by itself is checked here — names are
lowercase ``[a-z0-9][a-z0-9.-]*``, ``method`` is a registered quantization method
(``registry.QUANT_METHODS``, did-you-mean), ``backend`` a registered engine (``registry.ENGINES``),
``device`` is ``auto | cpu | cuda[:N]``, YAML's bare
``off`` / ``on`` read as the strings, ``restore: on-fail`` is short for ``{when: on-fail}``;
what needs several fields or the registries' other entries is :mod:`.checks`'s.  A validator
raises ``ValueError`` with the problem only; :mod:`.messages` adds the file, the key and the value.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from ..registry import ENGINES, QUANT_METHODS

WEIGHT_BITS = (2, 3, 4, 8)
NAME_RE = re.compile(r"[a-z0-9][a-z0-9.\-]*")


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


def _check_engine(value: str) -> str:
    # the registered generation engines (pytest_qmr.registry.ENGINES: hf, vllm, openai, and a project's own)
    if value not in ENGINES:
        close = ENGINES.closest(value)
        raise ValueError("must be one of " + ", ".join(ENGINES.names())
                         + (f", did you mean {close!r}?" if close else ""))
    return value


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
EngineName = Annotated[str, AfterValidator(_check_engine)]
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Alpha = Annotated[float, Field(gt=0, lt=1)]
PositiveInt = Annotated[int, Field(gt=0)]
Seed = Annotated[int, Field(ge=0)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ThinkSpec(_Spec):
    """A reasoning model's thinking tags: its answer is the text after ``end``; a response without
    ``end`` is truncated (wrong, never parsed from the half trace)."""

    start: str = "<think>"  # "" or absent from the response: the chat template opened the thinking
    end: NonEmptyStr = "</think>"


class ModelSpec(_Spec):
    name: Name
    ref: NonEmptyStr  # embedded:NAME, a local directory, or a hub id
    trust_remote_code: bool = False
    think: ThinkSpec | None = None  # a reasoning model: answers are read after its thinking
    # passed to its chat template (hybrid models: {enable_thinking: true}); to vLLM / an API in each request
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)


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
    backend: EngineName | None = None
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
    # deployment cost of a sampled cell: its mean answer length over FP's on the same items (None: not gated)
    max_length_ratio: Annotated[float, Field(gt=0)] | None = None
    # a thinking model: the share of answers whose thinking may run out of max_new_tokens (None: not gated)
    max_truncated_share: Fraction | None = None


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
    max_length_ratio: Annotated[float, Field(gt=0)] | None = None
    # a thinking model: the share of answers whose thinking may run out of max_new_tokens (None: not gated)
    max_truncated_share: Fraction | None = None

    def merged_on(self, base: Thresholds) -> Thresholds:
        data = base.model_dump()
        override = self.model_dump(exclude_unset=True)
        if "error_profile" in override:
            override["error_profile"] = {**base.error_profile, **override["error_profile"]}
        data.update(override)
        return Thresholds.model_validate(data)


class GenerationOverride(_Spec):
    """A benchmark's own length and sampling (AIME sampled and long, GSM8K greedy); only keys it
    sets replace the suite's ``generation``."""

    max_new_tokens: PositiveInt = None  # type: ignore[assignment]
    samples: PositiveInt = None  # type: ignore[assignment]
    temperature: Annotated[float, Field(ge=0, le=2)] = None  # type: ignore[assignment]
    top_p: Annotated[float, Field(gt=0, le=1)] = None  # type: ignore[assignment]
    top_k: Annotated[int, Field(ge=0)] = None  # type: ignore[assignment]
    seed: Seed = None  # type: ignore[assignment]

    def merged_on(self, base: "Generation") -> "Generation":
        return base.model_copy(update=self.model_dump(exclude_unset=True))


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
    generation: GenerationOverride | None = None


class Generation(_Spec):
    max_new_tokens: PositiveInt = 256
    batch_size: PositiveInt = 16
    backend: EngineName = "hf"
    # auto: CUDA when a GPU is visible, else the CPU; dtype auto: bfloat16 on CUDA, float32 on the CPU
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # backend vllm: the Python of vLLM's own environment (None: QMR_VLLM_PYTHON, else this one),
    # and engine arguments passed to `vllm serve` (tensor_parallel_size: 2 -> --tensor-parallel-size 2)
    vllm_python: NonEmptyStr | None = None
    vllm: dict[str, Any] = Field(default_factory=dict)
    # backend openai: a URL per quantizer name (fp too); the others use QMR_OPENAI_BASE_URL / qmr serve
    endpoints: dict[Name, NonEmptyStr] = Field(default_factory=dict)
    # sampled answers (reasoning models, issue #35): `samples` answers per item at `temperature` (0: greedy,
    # one answer), `top_p`, `top_k` (0: off); sample j of item i is seeded from (seed, i, j)
    samples: PositiveInt = 1
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    seed: Seed = 0


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
