"""A run directory's records: what a cell writes, and what the session's end writes over them.

``<run dir>/cells/<cell id>/`` holds a cell's ``samples.jsonl`` (written as soon as it has
generated) and ``result.json`` (its :class:`~pytest_qmr.records.CellResult`, with the SHA-256 of
each record file beside it, ``records_sha256``, so that ``--qmr-resume`` can prove they are the
ones it wrote); every write masks secrets and is atomic. At the session's end (the controller,
under xdist) :func:`apply_family` writes the Holm / Benjamini–Hochberg adjusted p of each
``thresholds.family`` into its cells' ``result.json``, and :func:`write_results` gathers every
readable ``result.json`` into ``results.json``; later stages (report, compare) read these.
"""

from __future__ import annotations

import json
from pathlib import Path

from .fsutil import atomic_write_json, atomic_write_jsonl, sha256_file
from .records import CellResult, GateResult, SampleRecord
from .redact import redact_obj

RECORD_FILES = ("samples.jsonl", "located.jsonl")  # what --qmr-resume reuses beside result.json, by hash


def write_samples(cell_dir: Path, records: list[SampleRecord]) -> None:
    """``samples.jsonl``, secrets masked, written atomically."""
    atomic_write_jsonl(cell_dir / "samples.jsonl", (redact_obj(r.to_dict()) for r in records))


def write_result(cell_dir: Path, result: CellResult) -> None:
    """``result.json``, secrets masked, written atomically, with the hash of each record file
    beside it (``records_sha256``, :data:`RECORD_FILES`) so that a reuse can prove they are the
    ones it wrote."""
    hashes = {name: sha256_file(cell_dir / name) for name in RECORD_FILES if (cell_dir / name).is_file()}
    atomic_write_json(cell_dir / "result.json", redact_obj({**result.to_dict(), "records_sha256": hashes}))


def write_cell(cell_dir: Path, records: list[SampleRecord], result: CellResult) -> None:
    """A cell's records: ``samples.jsonl`` and ``result.json``."""
    write_samples(cell_dir, records)
    write_result(cell_dir, result)


def records_problem(cell_dir: Path, data: dict) -> str | None:
    """Why a recorded cell's files are not the ones its ``result.json`` was written with (None:
    each is there with its recorded hash; a record from before the hashes: its samples exist)."""
    expected = data.get("records_sha256") or {"samples.jsonl": None}
    for name, sha in expected.items():
        if not (cell_dir / name).is_file():
            return f"{cell_dir / name} is missing"
        if sha is not None and sha256_file(cell_dir / name) != sha:
            return f"{cell_dir / name} changed since the run that wrote it"
    return None


def apply_family(run_dir: Path) -> list[str]:
    """Holm / BH adjusted p over the gated cells of each family that ran, written into their
    result.json (``gate.p_adjusted``, ``gate.family_verdict``); one line per family for the terminal."""
    cells_dir = run_dir / "cells"
    members: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(cells_dir.glob("*/result.json")) if cells_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # write_results reports it
        gate = data.get("gate") or {}
        if gate.get("family", "none") != "none":
            members.setdefault(gate["family"], []).append((path, data))
    if not members:
        return []
    from .gate import adjust_family, family_verdict  # numpy/scipy: only once a family has cells

    lines = []
    for family, cells in sorted(members.items()):
        adjusted = adjust_family([data["gate"]["p_value"] for _, data in cells], family)
        changed = []
        for (path, data), p in zip(cells, adjusted, strict=True):
            gate = data["gate"]
            alpha = gate["alpha"] * gate.get("family_size", 1)  # the family's alpha
            gate["p_adjusted"] = p
            gate["family_verdict"] = family_verdict(GateResult.from_dict(gate), p, alpha)
            if gate["family_verdict"] != gate["verdict"]:
                changed.append(f"{data['cell_id']} {gate['verdict']} -> {gate['family_verdict']}")
            atomic_write_json(path, data)
        lines.append(f"qmr family {family} over {len(cells)} cells (each gated at alpha/{len(cells)}): "
                     + ("; ".join(changed) if changed else "adjusted p changes no verdict"))
    return lines


def write_results(run_dir: Path) -> list[str]:
    """``results.json`` of every readable cell; returns one warning line per unreadable one."""
    cells_dir = run_dir / "cells"
    if not cells_dir.is_dir():
        return []
    cells, warnings = [], []
    for f in sorted(cells_dir.glob("*/result.json")):
        try:
            cells.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            warnings.append(f"qmr: WARNING: {f}: unreadable cell record left out of results.json "
                            f"({type(exc).__name__})")
    atomic_write_json(run_dir / "results.json", {"run_dir": str(run_dir), "cells": cells})
    return warnings
