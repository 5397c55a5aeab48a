"""``qmr compare RUN_A RUN_B``: two runs item by item, with the gate's statistics.

Any two run directories (two checkpoints, two library versions, before and after Restore, two
machines) are compared on the cells they share (same cell id) and, within each, on the items
both answered (same item id). Run A plays the baseline's part: ``fp_only`` counts items A solved
and B did not. Each pair of cells gets what a cell gets against its baseline — accuracies, Δ and
its interval (Newcombe, paired), the exact McNemar p (with k sampled answers per item: the
sign-flip test and clustered interval of :mod:`pytest_qmr.sampled_gate`) and the verdict under the given thresholds
(``--mode difference | noninferiority``) — as a Markdown table or JSON (``--json``).
``--cell-a`` / ``--cell-b`` compare two differently named cells (e.g. ``fp`` and ``rtn-w4`` of
one run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import QmrError
from .fsutil import read_jsonl_strict
from .sampled_gate import evaluate_sampled_gate


class CompareError(QmrError, ValueError):
    """Run directories that cannot be compared."""


def _count(row: dict) -> tuple[int, int]:
    """(right answers, answers) of a sample record: a sampled one has ``samples``, a greedy one is 0/1 of 1."""
    samples = row.get("samples")
    if isinstance(samples, list) and samples:
        return sum(bool(s.get("correct")) for s in samples), len(samples)
    return int(row["correct"]), 1


def run_cells(run_dir: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """``{cell id: {item id: (right answers, answers)}}`` from a run directory's ``cells/*/samples.jsonl``."""
    cells_dir = Path(run_dir) / "cells"
    if not cells_dir.is_dir():
        raise CompareError(f"{run_dir}: not a run directory (no cells/ folder)")
    cells = {}
    for samples in sorted(cells_dir.glob("*/samples.jsonl")):
        rows = read_jsonl_strict(samples, CompareError)
        for n, row in enumerate(rows, 1):
            if not isinstance(row.get("item_id"), str) or not isinstance(row.get("correct"), bool):
                raise CompareError(f"{samples}:{n}: item_id/correct: not a sample record (got keys {sorted(row)[:6]})")
        cells[samples.parent.name] = {row["item_id"]: _count(row) for row in rows}
    if not cells:
        raise CompareError(f"{run_dir}: no cells/*/samples.jsonl to compare")
    return cells


def compare_runs(run_a: Path, run_b: Path, thresholds: dict[str, Any], cell_a: str | None = None,
                 cell_b: str | None = None) -> dict[str, Any]:
    """The comparison as a JSON-able dict: ``{"run_a", "run_b", "thresholds", "cells": [...]}``."""
    a, b = run_cells(run_a), run_cells(run_b)
    if cell_a or cell_b:
        for run, cells, name in ((run_a, a, cell_a), (run_b, b, cell_b)):
            if name not in cells:
                raise CompareError(f"{run}: no cell {name!r} (cells: {', '.join(sorted(cells))})")
        pairs = [(cell_a, cell_b)]
    else:
        pairs = [(c, c) for c in sorted(set(a) & set(b))]
        if not pairs:
            raise CompareError(f"{run_a} and {run_b} share no cell id; name two with --cell-a and --cell-b")
    rows = []
    for name_a, name_b in pairs:
        shared = sorted(set(a[name_a]) & set(b[name_b]))
        ks = {a[name_a][i][1] for i in shared} | {b[name_b][i][1] for i in shared}
        if len(ks) > 1:
            raise CompareError(f"{name_a} / {name_b}: the runs have {sorted(ks)} answers per item; cells with k "
                               "sampled answers compare with cells of as many")
        k = ks.pop() if ks else 1
        gate = evaluate_sampled_gate([a[name_a][i][0] for i in shared], [b[name_b][i][0] for i in shared],
                                     thresholds, k).result()
        rows.append({"cell_a": name_a, "cell_b": name_b, "items_a": len(a[name_a]), "items_b": len(b[name_b]),
                     "gate": gate.to_dict()})
    return {"run_a": str(run_a), "run_b": str(run_b), "thresholds": thresholds, "cells": rows}


def to_markdown(comparison: dict[str, Any]) -> str:
    lines = [f"# qmr compare\n\nA: `{comparison['run_a']}`  \nB: `{comparison['run_b']}`\n",
             "| cell (A → B) | shared items | A acc | B acc | Δ (B − A) | Δ CI | A only / B only | McNemar p "
             "| verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in comparison["cells"]:
        g = row["gate"]
        name = row["cell_a"] if row["cell_a"] == row["cell_b"] else f"{row['cell_a']} → {row['cell_b']}"
        ci = f"[{g['delta_ci'][0]:+.3f}, {g['delta_ci'][1]:+.3f}]"
        lines.append(f"| {name} | {g['n']} | {g['fp_acc']:.3f} | {g['quant_acc']:.3f} | {g['delta']:+.3f} | {ci} | "
                     f"{g['fp_only']} / {g['quant_only']} | {g['p_value']:.3g} | {g['verdict']} |")
    lines.append("\n" + "\n".join(f"- {row['cell_a']}: {row['gate']['reason']}" for row in comparison["cells"]))
    return "\n".join(lines) + "\n"
