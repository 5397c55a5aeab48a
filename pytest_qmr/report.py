"""The Report stage: regression reports people read, built from a run directory's records.

Nothing here runs a model: :func:`build_report` reads ``RUN/results.json``, each cell's
``samples.jsonl`` and (when the Locate stage wrote one) ``located.jsonl``, and the committed FP
baselines; :func:`write_html`, :func:`write_markdown` and :func:`write_json` render the result
(atomically). The HTML is one self-contained file (inline CSS, plots as base64 PNG, no script,
a Content-Security-Policy that forbids scripts and network access) with every model output
escaped by jinja2's autoescape; the Markdown fits a GitHub job summary or PR comment.

JSON schema (``schema_version`` :data:`SCHEMA_VERSION`), the fields of :class:`Report`::

    {"schema_version": 1, "generated": iso-time, "run_dir": str, "baselines_dir": str | null,
     "quantizers": [name, ...],                       # non-FP quantizers, Table-1 column order
     "summary": {"cells": int, "pass": int, "fail": int, "inconclusive": int, "no_gate": int,
                 "outcomes": {outcome: int}},
     "table": [{"model", "benchmark", "fp_acc": float | null, "fp_n": int | null,
                "fp_source": "run" | "baseline" | "paired" | null,
                "entries": {quantizer: {"cell_id", "accuracy", "n", "delta", "rel_drop",
                                        "p_value", "verdict", "outcome"}}}],
     "cells": [{"cell_id", "model", "quantizer", "benchmark", "task", "method", "is_fp",
                "accuracy", "n", "outcome", "verdict": str | null, "gate": GateResult dict | null,
                "gate_line": str, "seconds": {stage: s}, "quantization": {selected info},
                "error_profile": locate.error_profile dict | null,
                "error_profile_source": "result" | "located.jsonl" | null,
                "profile_violations": [str],        # error-profile thresholds the cell broke
                "restore": dict | null,             # restore.RestoreResult.to_dict() as recorded, plus
                                                    # "recovered_delta" (restored - quant accuracy) and
                                                    # "recovered_share" (of the FP - quant loss) when computable
                "located": bool,                    # a located.jsonl was found
                "regressions_total": int,           # FP right, quantized wrong
                "regressions": [{"item_id", "doc_index", "prompt", "gold", "fp_response",
                                 "fp_extracted", "quant_response", "quant_extracted",
                                 "status", "first_error_step", "n_steps", "primary_error_type",
                                 "category", "explanation", "faulty_step"}],   # at most max_items
                "notes": [str]}],
     "baselines": [{"model", "benchmark", "path", "status": "ok" | "missing" | "error",
                    "error": str | null, "created": str | null, "baseline_acc", "baseline_n",
                    "run_fp_acc", "run_fp_n", "fp_flips": int | null,
                    "provenance": {...} | null, "run": {...}, "changes": [str]}],
     "warnings": [str]}

A field is added (never renamed or removed) without a version bump; anything else bumps it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import QmrError
from . import taxonomy
from .fsutil import atomic_write_json, atomic_write_text, read_jsonl
from .records import CellResult, SampleRecord

__all__ = [
    "SCHEMA_VERSION",
    "ReportError",
    "Report",
    "CellReport",
    "RegressedItem",
    "Table1Row",
    "Table1Entry",
    "BaselineComparison",
    "build_report",
    "write_html",
    "write_markdown",
    "write_json",
    "write_all",
    "add_cli",
]

SCHEMA_VERSION = 1
VERDICTS = ("pass", "fail", "inconclusive")
_PROVENANCE_COMPARED = ("model_fingerprint", "generation", "seed", "limit", "data_sha256", "prompt_sha256")


class ReportError(QmrError, ValueError):
    """The run directory cannot be reported on; ``str(err)`` is one line."""


# --------------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------------- reading


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _load_results(run_dir: Path) -> list[CellResult]:
    path = run_dir / "results.json"
    if not path.is_file():
        extra = ""
        if (run_dir / "cells").is_dir():
            n = len(list((run_dir / "cells").glob("*/result.json")))
            extra = f" ({n} cell records under cells/: did the pytest session finish?)"
        what = "run directory" if run_dir.is_dir() else "no such directory"
        raise ReportError(f"{path}: no results.json ({what}){extra}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read ({_one_line(exc)})") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: corrupt results, not valid JSON at line {exc.lineno} column {exc.colno} "
                          f"({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ReportError(f"{path}: corrupt results, expected an object with a \"cells\" list")
    cells = []
    for i, raw in enumerate(data["cells"]):
        try:
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            cell = CellResult.from_dict(raw)
            float(cell.accuracy), int(cell.n)  # noqa: B018  (type check)
        except (TypeError, ValueError) as exc:
            raise ReportError(f"{path}: corrupt results, cells[{i}]: {_one_line(exc)}") from None
        cells.append(cell)
    return cells


def _samples(run_dir: Path, cell: CellResult) -> list[SampleRecord]:
    """The cell's samples: in the run directory first (it may have moved), else where it was written."""
    for path in (run_dir / "cells" / cell.cell_id / "samples.jsonl", Path(cell.samples_path or "")):
        if path.is_file():
            return [SampleRecord.from_dict(r) for r in read_jsonl(path)]
    return []


def _method(cell: CellResult) -> str:
    return str((cell.quantization or {}).get("method") or ("fp" if cell.quantizer == "fp" else "?"))


def _default_baselines_dir(run_dir: Path) -> Path | None:
    """``<root>/baselines`` for a run under ``<root>/qmr-runs/``, else ``./baselines``, else none."""
    candidates = []
    if run_dir.parent.name == "qmr-runs":
        candidates.append(run_dir.parent.parent / "baselines")
    candidates.append(Path.cwd() / "baselines")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def _read_baseline(baselines_dir: Path | None, model: str, benchmark: str):
    """``(baseline or None, path or None, status, error)``."""
    from . import baselines as bl

    if baselines_dir is None:
        return None, None, "missing", "no baselines directory"
    try:
        path = bl.baseline_path(baselines_dir, model, benchmark)
    except bl.BaselineError as exc:
        return None, None, "error", str(exc)
    if not path.is_file():
        return None, str(path), "missing", f"{path}: no committed baseline"
    try:
        return bl.read_baseline(path), str(path), "ok", None
    except bl.BaselineError as exc:
        return None, str(path), "error", str(exc)


# --------------------------------------------------------------------------------- building


_QUANT_KEYS = ("method", "cache_hit", "activation_quantization", "calibration", "model_fingerprint", "notes",
               "upstream_warnings", "skipped")


def _quantization_summary(info: dict[str, Any]) -> dict[str, Any]:
    """The parts of the quantization info a reader needs (the full info stays in result.json)."""
    info = info or {}
    out = {k: info[k] for k in _QUANT_KEYS if info.get(k) not in (None, [], {})}
    recipe = info.get("recipe") or {}
    for k in ("scheme", "bits", "group_size", "symmetric", "strategy", "ignore"):
        if recipe.get(k) not in (None, []):
            out[k] = recipe[k]
    sizes = info.get("sizes") or {}
    for k in ("compressed_bytes", "fp_checkpoint_bytes", "compression_ratio_vs_bf16", "compression_ratio_vs_fp32"):
        if sizes.get(k) is not None:
            out[k] = sizes[k]
    if (info.get("seconds") or {}).get("total") is not None:
        out["quantize_seconds"] = info["seconds"]["total"]
    if info.get("peak_rss_mb") is not None:
        out["peak_rss_mb"] = info["peak_rss_mb"]
    return out


def _restore_view(restore: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recorded restore results plus the recovered delta and share of the lost accuracy."""
    if not restore:
        return None
    from .restore import recovered_share

    out = dict(restore)
    if out.get("recovered") is not None:  # restore.RestoreResult's own share of the loss won back
        out.setdefault("recovered_share", out["recovered"])
    fp, quant, restored = (restore.get(k) for k in ("fp_acc", "quant_acc", "restored_acc"))
    if all(isinstance(v, (int, float)) for v in (quant, restored)):
        out.setdefault("recovered_delta", round(restored - quant, 6))
        share = recovered_share(fp, quant, restored)
        if share is not None:
            out.setdefault("recovered_share", round(share, 6))
    return out


def _faulty_step(response: str, k: int | None) -> str | None:
    from .steps import segment

    if not isinstance(k, int) or k < 1:
        return None
    steps = segment(response)
    if k <= len(steps):
        return steps[k - 1].text
    return None


def _regressions(quant: list[SampleRecord], fp_items: dict[str, dict[str, Any]],
                 located: dict[str, dict[str, Any]] | None) -> list[RegressedItem]:
    """FP right, quantized wrong, in the quantized run's order; judged fields from ``located``.

    Judged rows whose item is not in that set (e.g. judged with ``--all``) are added after.
    """
    out: list[RegressedItem] = []
    seen = set()
    for q in quant:
        fp = fp_items.get(q.item_id)
        if fp is None or not fp.get("correct") or q.correct:
            continue
        seen.add(q.item_id)
        out.append(RegressedItem(
            item_id=q.item_id, doc_index=q.doc_index, prompt=q.prompt, gold=str(q.gold),
            fp_response=str(fp.get("response") or ""), fp_extracted=fp.get("extracted"),
            quant_response=q.response, quant_extracted=q.extracted))
    for row_id, row in (located or {}).items():
        if row_id not in seen:
            out.append(RegressedItem(
                item_id=row_id, doc_index=row.get("doc_index"), prompt=str(row.get("problem") or ""),
                gold=str(row.get("gold_answer") or ""), fp_response=str(row.get("reference_response") or ""),
                fp_extracted=None, quant_response=str(row.get("response") or ""),
                quant_extracted=row.get("extracted")))
    for item in out:
        row = (located or {}).get(item.item_id)
        if row is None:
            continue
        k = row.get("first_error_step")
        item.status = row.get("status")
        item.first_error_step = k if isinstance(k, int) else None
        item.n_steps = row.get("n_steps")
        item.primary_error_type = row.get("primary_error_type")
        item.category = row.get("category") or taxonomy.CATEGORY_OF.get(item.primary_error_type or "")
        item.explanation = row.get("explanation")
        item.faulty_step = _faulty_step(item.quant_response, item.first_error_step)
    return out


def _run_provenance(cells: list[CellResult]) -> dict[str, Any]:
    """What the run recorded about itself for one model x benchmark (cells may add ``provenance``)."""
    run: dict[str, Any] = {}
    libraries: dict[str, str] = {}
    for cell in cells:
        prov = getattr(cell, "provenance", None) or {}
        info = cell.quantization or {}
        if info.get("model_fingerprint"):
            run.setdefault("model_fingerprint", info["model_fingerprint"])
        libraries.update({k: str(v) for k, v in (info.get("libraries") or {}).items()})
        for k, v in prov.items():
            run.setdefault(k, v)
    if libraries:
        run.setdefault("libraries", dict(sorted(libraries.items())))
    return run


def _compare_baseline(model: str, benchmark: str, cells: list[CellResult], fp_cell: CellResult | None,
                      fp_samples: list[SampleRecord], baseline, path: str | None, status: str,
                      error: str | None) -> BaselineComparison:
    from . import baselines as bl

    comp = BaselineComparison(model=model, benchmark=benchmark, path=path, status=status, error=error,
                              run=_run_provenance(cells))
    if fp_cell is not None:
        comp.run_fp_acc, comp.run_fp_n = fp_cell.accuracy, fp_cell.n
    if baseline is None:
        return comp
    prov = baseline.provenance
    comp.created, comp.baseline_acc, comp.baseline_n = prov.get("created"), baseline.accuracy, baseline.n
    comp.provenance = {k: prov.get(k) for k in (*_PROVENANCE_COMPARED, "libraries", "created")}
    run = comp.run
    for name in _PROVENANCE_COMPARED:
        if name not in run:
            continue
        old, new = prov.get(name), run[name]
        if name == "generation" and isinstance(old, dict) and isinstance(new, dict):
            comp.changes += [f"generation.{k}: baseline {old.get(k)!r}, run {new.get(k)!r}"
                             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            comp.changes.append(f"{name}: baseline {old!r}, run {new!r}")
    if run.get("libraries"):
        current = dict(run["libraries"])
        recorded = prov.get("libraries") or {}
        comp.changes += [f"library {line}" for line in bl.library_drift(baseline, current)
                         if line.split(":", 1)[0] in recorded and line.split(":", 1)[0] in current]
    if fp_samples:
        flips = [s.item_id for s in fp_samples
                 if s.item_id in baseline.items and bool(baseline.items[s.item_id]["correct"]) != s.correct]
        comp.fp_flips = len(flips)
        if flips:
            comp.changes.append(f"FP correctness differs from the baseline on {len(flips)} of {len(fp_samples)} "
                                f"items (e.g. {flips[0]}): FP generation is not reproducible")
        base_acc = [baseline.items[s.item_id]["correct"] for s in fp_samples if s.item_id in baseline.items]
        if base_acc and fp_cell is not None and abs(sum(base_acc) / len(base_acc) - fp_cell.accuracy) > 1e-9:
            comp.changes.append(f"FP accuracy on this run's items: baseline {sum(base_acc) / len(base_acc):.3f}, "
                                f"run {fp_cell.accuracy:.3f}")
    if not comp.changes and comp.run:
        comp.changes.append("no change in the recorded provenance")
    return comp


def _cell_report(run_dir: Path, cell: CellResult, samples: list[SampleRecord], fp_items: dict[str, dict] | None,
                 max_items: int) -> CellReport:
    from .locate import error_profile

    method = _method(cell)
    notes: list[str] = list(cell.notes)  # what a stage recorded it could not do on this task
    located_path = run_dir / "cells" / cell.cell_id / "located.jsonl"
    located_rows = read_jsonl(located_path) if located_path.is_file() else None
    located = None if located_rows is None else {str(r.get("id")): r for r in located_rows if r.get("id") is not None}
    profile, profile_source = cell.error_profile, "result" if cell.error_profile else None
    if profile is None and located_rows:
        profile, profile_source = error_profile(located_rows), "located.jsonl"
    regressions: list[RegressedItem] = []
    if method != "fp":
        if fp_items is None:
            notes.append("no FP reference (no committed baseline and no FP cell in this run): regressed items unknown")
        elif not samples:
            notes.append("samples.jsonl not found: regressed items unknown")
        else:
            regressions = _regressions(samples, fp_items, located)
        if located is None and not any(n.startswith("locate:") for n in cell.notes):
            notes.append("not located: no located.jsonl for this cell (first faulty steps unknown)")
    gate = cell.gate
    return CellReport(
        cell_id=cell.cell_id, model=cell.model, quantizer=cell.quantizer, benchmark=cell.benchmark, task=cell.task,
        method=method, is_fp=method == "fp", accuracy=float(cell.accuracy), n=int(cell.n), outcome=cell.outcome,
        verdict=gate.verdict if gate else None, gate=gate.to_dict() if gate else None,
        gate_line=gate.summary() if gate else "no gate (no paired FP comparison)",
        seconds=dict(cell.seconds or {}), quantization=_quantization_summary(cell.quantization),
        error_profile=profile, error_profile_source=profile_source, restore=_restore_view(cell.restore),
        profile_violations=list(getattr(cell, "profile_violations", None) or []),
        located=located is not None, regressions_total=len(regressions), regressions=regressions[:max_items],
        notes=notes)


def build_report(run_dir: str | os.PathLike, baselines_dir: str | os.PathLike | None = None, *,
                 max_items: int = 100) -> Report:
    """Read a run directory (and the committed baselines) into a :class:`Report`.

    ``baselines_dir`` defaults to ``<root>/baselines`` for a run under ``<root>/qmr-runs/``, else
    ``./baselines``. ``max_items`` caps the regressed items kept per cell (their total is kept).
    Raises :class:`ReportError` (one line) when results.json is missing or corrupt.
    """
    run_dir = Path(run_dir).resolve()
    cells = _load_results(run_dir)
    bdir = Path(baselines_dir).resolve() if baselines_dir is not None else _default_baselines_dir(run_dir)
    warnings: list[str] = []
    if bdir is None:
        warnings.append("no baselines directory found: no baseline comparison (pass --baselines DIR)")
    elif not bdir.is_dir():
        warnings.append(f"{bdir}: baselines directory not found")

    cells = sorted(cells, key=lambda c: (c.model, c.benchmark, _method(c) != "fp", c.quantizer))
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.benchmark), []).append(cell)
    quantizers: list[str] = []
    for cell in cells:
        if _method(cell) != "fp" and cell.quantizer not in quantizers:
            quantizers.append(cell.quantizer)

    table: list[Table1Row] = []
    cell_reports: list[CellReport] = []
    comparisons: list[BaselineComparison] = []
    for (model, benchmark), group in groups.items():
        fp_cell = next((c for c in group if _method(c) == "fp"), None)
        fp_samples = _samples(run_dir, fp_cell) if fp_cell is not None else []
        baseline, path, status, error = _read_baseline(bdir, model, benchmark)
        if status == "error":
            warnings.append(error)
        comparisons.append(_compare_baseline(model, benchmark, group, fp_cell, fp_samples, baseline, path,
                                             status, error))
        if baseline is not None:
            fp_items = baseline.items
        elif fp_samples:
            fp_items = {s.item_id: {"correct": s.correct, "response": s.response, "extracted": s.extracted}
                        for s in fp_samples}
        else:
            fp_items = None

        row = Table1Row(model=model, benchmark=benchmark, fp_acc=None, fp_n=None, fp_source=None)
        if fp_cell is not None:
            row.fp_acc, row.fp_n, row.fp_source = float(fp_cell.accuracy), fp_cell.n, "run"
        elif baseline is not None:
            row.fp_acc, row.fp_n, row.fp_source = baseline.accuracy, baseline.n, "baseline"
        else:
            gated = [c for c in group if c.gate is not None]
            if gated:
                widest = max(gated, key=lambda c: c.gate.n)
                row.fp_acc, row.fp_n, row.fp_source = widest.gate.fp_acc, widest.gate.n, "paired"
        for cell in group:
            samples = _samples(run_dir, cell)
            report = _cell_report(run_dir, cell, samples, fp_items, max_items)
            cell_reports.append(report)
            if report.is_fp:
                continue
            gate = cell.gate
            row.entries[cell.quantizer] = Table1Entry(
                cell_id=cell.cell_id, accuracy=float(cell.accuracy), n=int(cell.n),
                delta=gate.delta if gate else None, rel_drop=gate.rel_drop if gate else None,
                p_value=gate.p_value if gate else None, verdict=gate.verdict if gate else None,
                outcome=cell.outcome)
        table.append(row)

    verdicts = Counter(c.verdict or "no_gate" for c in cell_reports if not c.is_fp)
    summary = {"cells": len(cell_reports), **{v: verdicts.get(v, 0) for v in (*VERDICTS, "no_gate")},
               "outcomes": dict(sorted(Counter(c.outcome or "?" for c in cell_reports).items()))}
    return Report(
        schema_version=SCHEMA_VERSION,
        generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        run_dir=str(run_dir), baselines_dir=str(bdir) if bdir else None, quantizers=quantizers,
        summary=summary, table=table, cells=cell_reports, baselines=comparisons, warnings=warnings)


# --------------------------------------------------------------------------------- plots

_VERDICT_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#f9a825", None: "#757575"}
_CATEGORY_COLOURS = {"conceptual": "#6a1b9a", "reasoning": "#1565c0", "method": "#00838f", "execution": "#ef6c00"}


def _png(fig) -> str:
    """A matplotlib Figure as a ``data:`` URI (Agg canvas: no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(111)


def plot_overview(report: Report) -> str | None:
    """Accuracy per model x benchmark: FP and each quantizer, bars coloured by verdict."""
    if not report.table:
        return None
    fig, ax = _figure(max(4.0, 1.6 * len(report.table) * (1 + len(report.quantizers)) / 2), 3.0)
    width = 0.8 / (1 + len(report.quantizers))
    for i, row in enumerate(report.table):
        bars = [("FP", row.fp_acc, "#455a64")]
        bars += [(q, row.entries[q].accuracy if q in row.entries else None,
                  _VERDICT_COLOURS.get(row.entries[q].verdict if q in row.entries else None, "#757575"))
                 for q in report.quantizers]
        for j, (name, value, colour) in enumerate(bars):
            if value is not None:
                bar = ax.bar(i + j * width, value, width * 0.9, color=colour)
                ax.bar_label(bar, labels=[f"{name}\n{value:.2f}"], fontsize=6, padding=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(report.table))])
    ax.set_xticklabels([f"{r.model}\n{r.benchmark}" for r in report.table], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.15)
    ax.set_title("accuracy: FP (grey) and quantized (green pass / red fail / amber inconclusive)", fontsize=8)
    return _png(fig)


def plot_error_types(profile: dict[str, Any]) -> str | None:
    """Located errors per type, coloured by category."""
    types = profile.get("types") or {}
    if not any((v or {}).get("count") for v in types.values()):
        return None
    names = [t for t in taxonomy.TYPES if t in types]
    counts = [types[t]["count"] for t in names]
    fig, ax = _figure(5.0, 2.6)
    ax.barh(range(len(names)), counts, color=[_CATEGORY_COLOURS[taxonomy.CATEGORY_OF[t]] for t in names])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([t.replace("_", " ") for t in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("located errors")
    ax.set_title("error types (colour: category)", fontsize=9)
    return _png(fig)


def plot_first_error_steps(profile: dict[str, Any]) -> str | None:
    """Histogram of the first faulty step (1-indexed)."""
    hist = (profile.get("first_error_step") or {}).get("histogram") or {}
    if not hist:
        return None
    steps = sorted(int(k) for k in hist)
    fig, ax = _figure(4.0, 2.6)
    ax.bar(steps, [hist[str(k)] for k in steps], color="#5c6bc0")
    ax.set_xticks(steps)
    ax.set_xlabel("first faulty step")
    ax.set_ylabel("items")
    ax.set_title("first-error-step histogram", fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------------- HTML


def _chunks(response: str, faulty: int | None) -> list[tuple[str, str, int]]:
    """``(kind, text, step)`` covering ``response`` exactly: kind ``text`` (between steps),
    ``step`` or ``faulty`` (the first faulty step)."""
    from .steps import segment

    out, pos = [], 0
    for step in segment(response):
        if step.start_char > pos:
            out.append(("text", response[pos:step.start_char], 0))
        out.append(("faulty" if step.index == faulty else "step", step.text, step.index))
        pos = step.end_char
    if pos < len(response):
        out.append(("text", response[pos:], 0))
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return format(value, spec)
        except (TypeError, ValueError):  # e.g. "d" for a float recorded as 10.0
            return str(value)
    return str(value)


def _rel_change(rel_drop: float | None) -> str:
    """Relative drop as a signed change: a 50% drop is "−50.0%"."""
    if rel_drop is None:
        return "–"
    change = -rel_drop
    return "±0.0%" if abs(change) < 5e-4 else f"{'+' if change > 0 else '−'}{abs(change):.1%}"


def _environment():
    from jinja2 import ChainableUndefined, Environment, PackageLoader

    # Chainable: a profile or restore dict from an older writer that lacks a key renders as blank
    # instead of failing the whole report.
    env = Environment(loader=PackageLoader("pytest_qmr", "templates"), autoescape=True,
                      undefined=ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["pct"] = lambda v: _fmt(v, ".1%")
    env.filters["rel_change"] = _rel_change
    env.globals["chunks"] = _chunks
    env.globals["taxonomy"] = taxonomy
    return env


def render_html(report: Report) -> str:
    plots: dict[str, dict[str, str | None]] = {}
    for cell in report.cells:
        profile = cell.error_profile or {}
        plots[cell.cell_id] = {"types": plot_error_types(profile) if profile else None,
                               "steps": plot_first_error_steps(profile) if profile else None}
    return _environment().get_template("report.html.j2").render(
        report=report, overview=plot_overview(report), plots=plots)


def _publish(path: Path) -> Path:
    """Reports are artifacts to share (CI uploads, web servers): readable by all, unlike mkstemp's 0600."""
    os.chmod(path, 0o644)
    return path


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """One self-contained HTML file (no network, no script), written atomically."""
    path = Path(path)
    atomic_write_text(path, render_html(report))
    return _publish(path)


# --------------------------------------------------------------------------------- Markdown

_MD_ESCAPES = {"\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "|": "\\|",
               "<": "&lt;", ">": "&gt;", "&": "&amp;", "@": "&#64;", "#": "&#35;", "~": "\\~"}
_EMOJI = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️", None: "➖"}


def md_escape(text: Any, limit: int | None = None) -> str:
    """Model text safe inside a GitHub Markdown table or list item: one line, no HTML, no
    emphasis/link/code syntax, no ``|``, no @-mentions or #-references."""
    text = _one_line(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(_MD_ESCAPES.get(ch, ch) for ch in text)


def _md_profile(profile: dict[str, Any]) -> str:
    types = sorted(((t, v.get("count", 0), v.get("share", 0.0)) for t, v in (profile.get("types") or {}).items()
                    if (v or {}).get("count")), key=lambda x: -x[1])
    parts = [f"{t.replace('_', ' ')} {share:.0%} ({count})" for t, count, share in types]
    median = (profile.get("first_error_step") or {}).get("median")
    line = ", ".join(parts) or "no located errors"
    if median is not None:
        line += f"; median first faulty step {median}"
    return line


def _md_restore(restore: dict[str, Any]) -> str:
    line = (f"FP {_fmt(restore.get('fp_acc'))} → quantized {_fmt(restore.get('quant_acc'))} → restored "
            f"{_fmt(restore.get('restored_acc'))}")
    if restore.get("recovered_delta") is not None:
        line += f" (Δ recovered {restore['recovered_delta']:+.3f}"
        if restore.get("recovered_share") is not None:
            line += f", {restore['recovered_share']:.0%} of the loss"
        line += ")"
    extra = [f"{k} {_fmt(restore[k], '.3g')}" for k in ("pairs", "minutes", "p_value") if restore.get(k) is not None]
    return line + ("; " + ", ".join(extra) if extra else "")


def render_markdown(report: Report, *, max_items: int = 5) -> str:
    s = report.summary
    lines = ["## pytest-qmr report", "",
             f"**{s['fail']} fail · {s['inconclusive']} inconclusive · {s['pass']} pass** "
             f"({s['cells']} cells) — run `{md_escape(report.run_dir)}`", ""]
    header = ["model", "benchmark", "FP", *report.quantizers]
    lines += ["| " + " | ".join(md_escape(h) for h in header) + " |",
              "|" + "---|" * 2 + "---:|" * (1 + len(report.quantizers))]
    for row in report.table:
        fp = "–" if row.fp_acc is None else f"{row.fp_acc:.3f} (n={row.fp_n})"
        cols = [md_escape(row.model), md_escape(row.benchmark), fp]
        for q in report.quantizers:
            e = row.entries.get(q)
            cols.append("" if e is None else
                        f"{_EMOJI.get(e.verdict, '➖')} {e.accuracy:.3f} ({_rel_change(e.rel_drop)})")
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "Relative change vs FP on the paired items; ✅ pass ❌ fail ⚠️ inconclusive.", ""]

    flagged = [c for c in report.cells if not c.is_fp and c.verdict in ("fail", "inconclusive")]
    if flagged:
        lines += ["### Failing and inconclusive cells", ""]
    for c in flagged:
        lines.append(f"- {_EMOJI[c.verdict]} **{md_escape(c.cell_id)}** — {md_escape(c.gate_line)}")
        if c.error_profile:
            lines.append(f"  - error types: {_md_profile(c.error_profile)}")
        for v in c.profile_violations:
            lines.append(f"  - error profile: {md_escape(v)}")
        if c.restore:
            lines.append(f"  - restore: {_md_restore(c.restore)}")
        if c.regressions_total:
            lines.append(f"  - {c.regressions_total} regressed items (FP right, quantized wrong)"
                         + ("" if c.located else ", not located"))
        for item in c.regressions[:max_items]:
            where = ""
            if item.first_error_step and item.first_error_step > 0:
                where = f" step {item.first_error_step} {md_escape(item.primary_error_type or '')}"
                if item.faulty_step:
                    where += f": “{md_escape(item.faulty_step, 160)}”"
            lines.append(f"    - `{md_escape(item.item_id, 60)}` gold {md_escape(item.gold, 40)}, quantized "
                         f"{md_escape(item.quant_extracted, 40)}{where}")
        for note in c.notes:
            lines.append(f"  - _{md_escape(note)}_")
    lines += ["", "### Baselines", ""]
    for b in report.baselines:
        head = f"- {md_escape(b.model)} / {md_escape(b.benchmark)}: "
        if b.status != "ok":
            lines.append(head + f"**{b.status}** — {md_escape(b.error or '')}")
            continue
        fp = f"FP acc baseline {b.baseline_acc:.3f} (n={b.baseline_n})"
        if b.run_fp_acc is not None:
            fp += f", this run {b.run_fp_acc:.3f} (n={b.run_fp_n})"
        lines.append(head + f"created {md_escape(b.created)}; {fp}; " + md_escape("; ".join(b.changes)))
    for w in report.warnings:
        lines.append(f"- warning: {md_escape(w)}")
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: Report, path: str | os.PathLike, *, max_items: int = 5) -> Path:
    path = Path(path)
    atomic_write_text(path, render_markdown(report, max_items=max_items))
    return _publish(path)


def write_json(report: Report, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_json(path, report.to_dict())
    return _publish(path)


def write_all(report: Report, directory: str | os.PathLike) -> dict[str, Path]:
    """``report.html``, ``report.md`` and ``report.json`` in ``directory``."""
    directory = Path(directory)
    return {"html": write_html(report, directory / "report.html"),
            "md": write_markdown(report, directory / "report.md"),
            "json": write_json(report, directory / "report.json")}


# --------------------------------------------------------------------------------- CLI


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        report = build_report(args.run_dir, args.baselines, max_items=args.max_items)
        targets = [(write_html, args.html), (write_markdown, args.md), (write_json, args.json)]
        if not any(t for _, t in targets):
            written = list(write_all(report, args.run_dir).values())
        else:
            written = [writer(report, target) for writer, target in targets if target]
    except (ReportError, OSError) as exc:
        print(f"qmr report: {_one_line(exc)}", file=sys.stderr)
        return 2
    s = report.summary
    print(f"qmr report: {s['fail']} fail, {s['inconclusive']} inconclusive, {s['pass']} pass -> "
          + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def add_cli(subparsers) -> None:
    """Register ``qmr report RUN_DIR [--html F] [--md F] [--json F] [--baselines DIR]``."""
    p = subparsers.add_parser("report", help="regression report (HTML, Markdown, JSON) of a run directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds results.json and cells/)")
    p.add_argument("--html", default=None, help="write the HTML report here")
    p.add_argument("--md", default=None, help="write the Markdown report (job summary / PR comment) here")
    p.add_argument("--json", default=None, help="write the JSON report here")
    p.add_argument("--baselines", default=None, metavar="DIR",
                   help="committed baselines (default: <root>/baselines for <root>/qmr-runs/<run>, else ./baselines)")
    p.add_argument("--max-items", type=int, default=100, help="regressed items listed per cell (default 100)")
    p.set_defaults(func=_cmd_report)
