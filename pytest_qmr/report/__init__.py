"""The Report stage: regression reports people read, built from a run directory's records.

Nothing here runs a model: :func:`build_report` (:mod:`.build`) reads ``RUN/results.json``, each
cell's ``samples.jsonl`` and (when the Locate stage wrote one) ``located.jsonl``, and the
committed FP baselines into a :class:`Report` (:mod:`.records`); :func:`write_html`
(:mod:`.html`, figures from :mod:`.plots`), :func:`write_markdown` (:mod:`.markdown`) and
:func:`write_json` / :func:`write_all` (:mod:`.writers`) render it (atomically). The HTML is one
self-contained file (inline CSS, plots as base64 PNG, no script, a Content-Security-Policy that
forbids scripts and network access) with every model output escaped by jinja2's autoescape; the
Markdown fits a GitHub job summary or PR comment. ``qmr report`` is :mod:`pytest_qmr.cli.report`.

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
                "error_profile": locate.ErrorProfile.to_dict() | null,
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
                "notes": [str],
                "answers": {"sampling", "pass_at_k", "maj_at_k", "seed_std", "length",
                            "truncated_share", "cost_violations"} | null,   # as result.json has them;
                                                    # null for a greedy cell of a plain model
                "length_items": [[fp_tokens, quant_tokens]]}],   # per item, mean tokens per answer
     "baselines": [{"model", "benchmark", "path", "status": "ok" | "missing" | "error",
                    "error": str | null, "created": str | null, "baseline_acc", "baseline_n",
                    "run_fp_acc", "run_fp_n", "fp_flips": int | null,
                    "provenance": {...} | null, "run": {...}, "changes": [str]}],
     "warnings": [str]}

A field is added (never renamed or removed) without a version bump; anything else bumps it.
"""

from .build import build_report
from .html import render_html, write_html
from .markdown import md_escape, render_markdown, write_markdown
from .plots import plot_error_types, plot_first_error_steps, plot_lengths, plot_overview
from .records import (SCHEMA_VERSION, VERDICTS, BaselineComparison, CellReport, RegressedItem, Report, ReportError,
                      Table1Entry, Table1Row)
from .writers import write_all, write_json

__all__ = [
    "SCHEMA_VERSION",
    "VERDICTS",
    "ReportError",
    "Report",
    "CellReport",
    "RegressedItem",
    "Table1Row",
    "Table1Entry",
    "BaselineComparison",
    "build_report",
    "render_html",
    "render_markdown",
    "md_escape",
    "plot_overview",
    "plot_error_types",
    "plot_first_error_steps",
    "plot_lengths",
    "write_html",
    "write_markdown",
    "write_json",
    "write_all",
]
