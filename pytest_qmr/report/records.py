"""The typed records of a report (the JSON schema in :mod:`pytest_qmr.report` is their ``asdict``).

:class:`Report` holds one :class:`Table1Row` per model x benchmark (a :class:`Table1Entry` per
quantizer), one :class:`CellReport` per cell (its :class:`RegressedItem` list capped at
``max_items``) and one :class:`BaselineComparison` per model x benchmark.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import QmrError

SCHEMA_VERSION = 1
VERDICTS = ("pass", "fail", "inconclusive")


class ReportError(QmrError, ValueError):
    """The run directory cannot be reported on; ``str(err)`` is one line."""


@dataclass
class RegressedItem:
    """An item the FP model solved and the quantized model failed, with its located error if any."""

    item_id: str
    doc_index: int | None
    prompt: str
    gold: str
    fp_response: str
    fp_extracted: str | None
    quant_response: str
    quant_extracted: str | None
    status: str | None = None  # the Locate status (accepted / human / escalated / unjudged); None: not judged
    first_error_step: int | None = None  # 1-indexed; -1: the judges found none; None: not judged
    n_steps: int | None = None
    primary_error_type: str | None = None
    category: str | None = None
    explanation: str | None = None
    faulty_step: str | None = None  # the text of the first faulty step of the quantized response


@dataclass
class Table1Entry:
    cell_id: str
    accuracy: float
    n: int
    delta: float | None
    rel_drop: float | None
    p_value: float | None
    verdict: str | None
    outcome: str


@dataclass
class Table1Row:
    """One model x benchmark row: FP accuracy and, per quantizer, accuracy and relative drop."""

    model: str
    benchmark: str
    fp_acc: float | None
    fp_n: int | None
    fp_source: str | None  # run: this run's FP cell; baseline: the committed baseline; paired: a gate's FP side
    entries: dict[str, Table1Entry] = field(default_factory=dict)


@dataclass
class CellReport:
    cell_id: str
    model: str
    quantizer: str
    benchmark: str
    task: str
    method: str
    is_fp: bool
    accuracy: float
    n: int
    outcome: str
    verdict: str | None
    gate: dict[str, Any] | None
    gate_line: str
    seconds: dict[str, float]
    quantization: dict[str, Any]
    error_profile: dict[str, Any] | None
    error_profile_source: str | None
    restore: dict[str, Any] | None
    profile_violations: list[str]
    located: bool
    regressions_total: int
    regressions: list[RegressedItem]
    notes: list[str] = field(default_factory=list)
    # a sampled cell or a thinking model (issue #35): sampling, pass_at_k, maj_at_k, seed_std, length,
    # truncated_share and cost_violations as its result.json has them; None for a greedy cell of a plain model
    answers: dict[str, Any] | None = None
    # per item, FP's and the quantized model's mean answer tokens (the length plot's points)
    length_items: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class BaselineComparison:
    """What changed between the committed FP baseline and this run."""

    model: str
    benchmark: str
    path: str | None
    status: str  # ok / missing / error
    error: str | None = None
    created: str | None = None
    baseline_acc: float | None = None
    baseline_n: int | None = None
    run_fp_acc: float | None = None
    run_fp_n: int | None = None
    fp_flips: int | None = None  # items whose FP correctness differs between baseline and this run's FP cell
    provenance: dict[str, Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)


@dataclass
class Report:
    schema_version: int
    generated: str
    run_dir: str
    baselines_dir: str | None
    quantizers: list[str]
    summary: dict[str, Any]
    table: list[Table1Row]
    cells: list[CellReport]
    baselines: list[BaselineComparison]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cell(self, cell_id: str) -> CellReport:
        for c in self.cells:
            if c.cell_id == cell_id:
                return c
        raise KeyError(cell_id)

