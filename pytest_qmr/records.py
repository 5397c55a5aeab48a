"""Typed records passed between the stages (measure -> locate -> restore -> report).

Everything a later stage needs is on disk as these records, so it never re-runs a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from .baselines import Baseline
    from .locate.profile import ErrorProfile
    from .models import ResolvedModel

Verdict = Literal["pass", "fail", "inconclusive"]


def _from_dict(cls, data: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class SampleRecord:
    """One benchmark item as the model answered it.

    A sampled cell (issue #35) answers each item ``k`` times: ``samples`` holds every answer
    (``response``, ``extracted``, ``correct``, ``tokens``, ``seed``) and ``score`` their mean;
    ``response`` / ``extracted`` / ``correct`` are then sample 0's (the first seed's, which Locate
    pairs with FP's same-seed sample). A greedy record has neither field, on disk as before."""

    item_id: str
    doc_index: int
    prompt: str
    response: str
    extracted: str | None
    gold: str
    correct: bool
    samples: list[dict[str, Any]] | None = None
    score: float | None = None

    @property
    def k(self) -> int:
        """How many answers the item has (1 for a greedy record)."""
        return len(self.samples) if self.samples else 1

    @property
    def n_correct(self) -> int:
        """How many of its answers are right."""
        return sum(bool(s["correct"]) for s in self.samples) if self.samples else int(self.correct)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: v for k, v in data.items() if k not in ("samples", "score") or v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "SampleRecord":
        return _from_dict(cls, data)


@dataclass
class GateResult:
    """Paired comparison of a cell against its FP baseline."""

    verdict: Verdict
    fp_acc: float
    quant_acc: float
    delta: float  # quant_acc - fp_acc (negative: quantization lost accuracy)
    rel_drop: float  # (fp_acc - quant_acc) / fp_acc, 0 when fp_acc is 0
    n: int  # paired items compared
    fp_only: int  # items FP solved and the quantized model failed (McNemar b)
    quant_only: int  # items the quantized model solved and FP failed (McNemar c)
    p_value: float
    alpha: float
    reason: str
    n_planned: int = 0  # items the cell would have used without early stopping
    stopped_early: bool = False
    delta_ci: list[float] | None = None  # [low, high] of quant_acc - fp_acc at ci_level (Newcombe, paired)
    ci_level: float | None = None
    mode: str = "difference"  # thresholds.mode that decided the verdict
    family: str = "none"  # thresholds.family; alpha is then alpha / family_size
    family_size: int = 1
    p_adjusted: float | None = None  # Holm / BH adjusted over the session's cells (set at its end)
    family_verdict: str | None = None  # the verdict that adjusted p gives
    exceeds: bool = False  # the drop is beyond a margin (difference mode)
    # k answers per item (pytest_qmr.sampled_gate): test, interval, samples_per_item, items_needed, samples_needed,
    # var_between, var_within; None for one greedy answer per item
    sampled: dict[str, Any] | None = None

    def summary(self) -> str:
        stop = f" (stopped early at {self.n}/{self.n_planned})" if self.stopped_early else ""
        ci = (f" [{self.ci_level:.0%} CI {self.delta_ci[0]:+.3f}, {self.delta_ci[1]:+.3f}]"
              if self.delta_ci is not None and self.ci_level is not None else "")
        return (
            f"{self.verdict.upper()}: FP acc {self.fp_acc:.3f}, quantized acc {self.quant_acc:.3f}, "
            f"Δ {self.delta:+.3f}{ci} (rel drop {self.rel_drop:.1%}), n={self.n}{stop}, "
            f"FP-only {self.fp_only} / quant-only {self.quant_only}, McNemar exact p={self.p_value:.3g} "
            f"(alpha {self.alpha}) — {self.reason}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["sampled"] is None:  # one answer per item: recorded as before sampling existed
            del data["sampled"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "GateResult":
        return _from_dict(cls, data)


@dataclass
class CellResult:
    """What one model x quantizer x benchmark cell measured; written to ``results.json``."""

    cell_id: str
    model: str
    quantizer: str
    benchmark: str
    task: str
    accuracy: float
    n: int
    gate: GateResult | None
    samples_path: str
    backend: str = "hf"
    seconds: dict[str, float] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    error_profile: ErrorProfile | None = None  # as a dict: ErrorProfile.to_dict()
    profile_violations: list[str] = field(default_factory=list)
    restore: dict[str, Any] | None = None
    outcome: str = ""
    served: dict[str, Any] | None = None  # server backends: {"endpoint", "model", "engine", ...} that answered
    artifact: str | None = None  # what was evaluated: fp | checkpoint | dense (fake-quant copy) | compressed
    servable: dict[str, Any] | None = None  # the engine refused the checkpoint: {"servable": False, "reason", ...}
    inputs: dict[str, Any] | None = None  # what the records depend on (spec, weights, baseline, ...)
    inputs_sha256: str | None = None  # --qmr-resume reuses the records only when this matches
    recomputed: str | None = None  # why --qmr-resume did not reuse an earlier result
    reused: bool = False  # this result came from --qmr-resume unchanged
    notes: list[str] = field(default_factory=list)  # a stage that could not run on this task, in one line each
    runtime: dict[str, str] | None = None  # {"device", "dtype"} the checkpoint ran on (generation.device / dtype)
    # per stage (baseline, evaluate, mining, restore, mmlu): items asked and how many came from the generation cache
    cache: dict[str, Any] = field(default_factory=dict)
    # a sampled cell (issue #35; absent from a greedy cell's result.json): the sampling settings, pass@k and
    # maj@k over its items, the std of accuracy over seeds, and its answers' length against FP's on the same items
    sampling: dict[str, Any] | None = None
    pass_at_k: float | None = None
    maj_at_k: float | None = None
    seed_std: float | None = None
    length: dict[str, Any] | None = None  # fp_mean_tokens, quant_mean_tokens, ratio, ratio_ci, ci_level
    # a thinking model: the share of its answers whose thinking never closed within max_new_tokens (all wrong)
    truncated_share: float | None = None
    # deployment-cost thresholds the cell broke (thresholds.max_length_ratio): it fails though its accuracy held
    cost_violations: list[str] = field(default_factory=list)

    SAMPLED_ONLY: ClassVar[tuple[str, ...]] = ("sampling", "pass_at_k", "maj_at_k", "seed_std", "length",
                                               "truncated_share", "cost_violations")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.error_profile is not None:
            data["error_profile"] = self.error_profile.to_dict()
        if self.gate is not None:
            data["gate"] = self.gate.to_dict()
        for name in self.SAMPLED_ONLY:  # a greedy cell of a plain model records as it always has
            if data[name] is None or data[name] == []:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CellResult":
        result = _from_dict(cls, data)
        if isinstance(result.gate, dict):
            result.gate = GateResult.from_dict(result.gate)
        if isinstance(result.error_profile, dict):
            from .locate.profile import ErrorProfile  # the locate package imports this module

            result.error_profile = ErrorProfile.from_dict(result.error_profile)
        return result


@dataclass(frozen=True)
class CellContext:
    """What a ``pytest_qmr_restore`` implementation may need besides the cell's records: the FP
    model, the baseline the cell was gated against, the quantized checkpoint it built (the dense
    fake-quant copy and, where the method writes one, the compressed-tensors checkpoint a user
    deploys) and where its records go."""

    fp: "ResolvedModel"  # .path, .fingerprint
    baseline: "Baseline"  # .source (the file), .items (per item: correct, gold, prompt_sha256, ...)
    quantized: Path  # what the cell evaluated on hf: our dense fake-quant copy, or a user's checkpoint as given
    compressed: Path | None  # the packed checkpoint a user deploys (ours, or a user's packed one; None: dense)
    cell_dir: Path  # <run dir>/cells/<cell id>
    run_dir: Path
    data_dir: Path | None = None
