"""Run directory -> :class:`~pytest_qmr.report.records.Report`: nothing here runs a model.

:func:`build_report` reads ``RUN/results.json``, each cell's ``samples.jsonl`` and (when the
Locate stage wrote one) ``located.jsonl``, and the committed FP baselines. Per model x benchmark
it picks the FP reference (the committed baseline, else this run's FP cell), lists each quantized
cell's regressed items (FP right, quantized wrong: :func:`pytest_qmr.locate.regression_set`) with
their judged first faulty step, and says what changed between the baseline and this run.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import taxonomy
from ..fsutil import read_jsonl
from ..records import CellResult, SampleRecord
from .formatting import one_line
from .records import (SCHEMA_VERSION, VERDICTS, BaselineComparison, CellReport, RegressedItem, Report, ReportError,
                      Table1Entry, Table1Row)

if TYPE_CHECKING:
    from ..locate import LocatedRow

_PROVENANCE_COMPARED = ("model_fingerprint", "generation", "seed", "limit", "data_sha256", "prompt_sha256")


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
        raise ReportError(f"{path}: cannot read ({one_line(exc)})") from None
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
            raise ReportError(f"{path}: corrupt results, cells[{i}]: {one_line(exc)}") from None
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
    from .. import baselines as bl

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
    from ..restore import recovered_share

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
    from ..steps import segment

    if not isinstance(k, int) or k < 1:
        return None
    steps = segment(response)
    if k <= len(steps):
        return steps[k - 1].text
    return None


def _regressions(quant: list[SampleRecord], fp_items: dict[str, dict[str, Any]],
                 located: dict[str, LocatedRow] | None) -> list[RegressedItem]:
    """FP right, quantized wrong (:func:`pytest_qmr.locate.regression_set`, the rows Locate judges),
    in the quantized run's order; judged fields from ``located``.

    Judged rows whose item is not in that set (e.g. judged with ``--all``) are added after.
    """
    from ..locate import regression_set

    fp = [SampleRecord(item_id, v.get("doc_index"), "", str(v.get("response") or ""), v.get("extracted"), "",
                       bool(v.get("correct"))) for item_id, v in fp_items.items()]
    rows = regression_set(fp, quant)
    seen = {row.item_id for row in rows}
    out = [_regressed_item(row, fp_items[row.item_id].get("extracted")) for row in rows]
    out += [_regressed_item(row, None) for row_id, row in (located or {}).items() if row_id not in seen]
    for item in out:
        row = (located or {}).get(item.item_id)
        if row is not None:
            _add_judgement(item, row)
    return out


def _regressed_item(row: LocatedRow, fp_extracted: str | None) -> RegressedItem:
    """A Locate input (or judged) row as a :class:`RegressedItem`, not yet judged."""
    def text(value: Any) -> str:
        return "" if value is None else str(value)

    return RegressedItem(
        item_id=row.item_id, doc_index=row.doc_index, prompt=text(row.problem), gold=text(row.gold_answer),
        fp_response=text(row.reference_response), fp_extracted=fp_extracted, quant_response=text(row.response),
        quant_extracted=row.extracted)


def _add_judgement(item: RegressedItem, row: LocatedRow) -> None:
    """The judged fields of a located.jsonl row, and the text of the first faulty step."""
    k = row.first_error_step
    item.status = row.status
    item.first_error_step = k if isinstance(k, int) else None
    item.n_steps = row.n_steps
    item.primary_error_type = row.primary_error_type
    item.category = row.category or taxonomy.CATEGORY_OF.get(item.primary_error_type or "")
    item.explanation = row.explanation
    item.faulty_step = _faulty_step(item.quant_response, item.first_error_step)


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
    from .. import baselines as bl

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
    from ..locate import LocatedRow, error_profile

    method = _method(cell)
    notes: list[str] = list(cell.notes)  # what a stage recorded it could not do on this task
    located_path = run_dir / "cells" / cell.cell_id / "located.jsonl"
    located_rows = read_jsonl(located_path) if located_path.is_file() else None
    located = None if located_rows is None else {str(r.get("id")): LocatedRow.from_dict(r) for r in located_rows
                                                 if r.get("id") is not None}
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
    answers = {name: getattr(cell, name) for name in CellResult.SAMPLED_ONLY
               if getattr(cell, name) not in (None, [])} or None
    length_items = []
    if cell.length and fp_items is not None and method != "fp":
        from ..sampling import item_lengths

        length_items = item_lengths(fp_items, [(s.item_id, s.samples) for s in samples])
    gate = cell.gate
    return CellReport(
        cell_id=cell.cell_id, model=cell.model, quantizer=cell.quantizer, benchmark=cell.benchmark, task=cell.task,
        method=method, is_fp=method == "fp", accuracy=float(cell.accuracy), n=int(cell.n), outcome=cell.outcome,
        verdict=gate.verdict if gate else None, gate=gate.to_dict() if gate else None,
        gate_line=gate.summary() if gate else (cell.notes[0] if cell.outcome in ("not_servable", "error") and cell.notes
                                               else "no gate (no paired FP comparison)"),
        seconds=dict(cell.seconds or {}), quantization=_quantization_summary(cell.quantization),
        error_profile=None if profile is None else profile.to_dict(), error_profile_source=profile_source,
        restore=_restore_view(cell.restore),
        profile_violations=list(getattr(cell, "profile_violations", None) or []),
        located=located is not None, regressions_total=len(regressions), regressions=regressions[:max_items],
        notes=notes, answers=answers, length_items=length_items)


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

