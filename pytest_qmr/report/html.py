"""The HTML report: one self-contained file (inline CSS, plots as base64 PNG, no script, a
Content-Security-Policy that forbids scripts and network access), every model output escaped by
jinja2's autoescape. The template is ``pytest_qmr/templates/report.html.j2``; its filters are
``fmt``, ``pct`` and ``rel_change`` (:mod:`.formatting`), its globals ``chunks`` (a response cut
into steps, the first faulty one marked) and ``taxonomy``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import taxonomy
from ..fsutil import atomic_write_text
from .formatting import fmt, publish, rel_change
from .plots import plot_error_types, plot_first_error_steps, plot_lengths, plot_overview
from .records import Report


def _chunks(response: str, faulty: int | None) -> list[tuple[str, str, int]]:
    """``(kind, text, step)`` covering ``response`` exactly: kind ``text`` (between steps),
    ``step`` or ``faulty`` (the first faulty step)."""
    from ..steps import segment

    out, pos = [], 0
    for step in segment(response):
        if step.start_char > pos:
            out.append(("text", response[pos:step.start_char], 0))
        out.append(("faulty" if step.index == faulty else "step", step.text, step.index))
        pos = step.end_char
    if pos < len(response):
        out.append(("text", response[pos:], 0))
    return out


def _environment():
    from jinja2 import ChainableUndefined, Environment, PackageLoader

    # Chainable: a profile or restore dict from an older writer that lacks a key renders as blank
    # instead of failing the whole report.
    env = Environment(loader=PackageLoader("pytest_qmr", "templates"), autoescape=True,
                      undefined=ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["pct"] = lambda v: fmt(v, ".1%")
    env.filters["rel_change"] = rel_change
    env.globals["chunks"] = _chunks
    env.globals["taxonomy"] = taxonomy
    return env


def render_html(report: Report) -> str:
    plots: dict[str, dict[str, str | None]] = {}
    for cell in report.cells:
        profile = cell.error_profile or {}
        plots[cell.cell_id] = {"types": plot_error_types(profile) if profile else None,
                               "steps": plot_first_error_steps(profile) if profile else None,
                               "lengths": plot_lengths(cell.length_items, (cell.answers or {}).get("length") or {})}
    return _environment().get_template("report.html.j2").render(
        report=report, overview=plot_overview(report), plots=plots)


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """One self-contained HTML file (no network, no script), written atomically."""
    path = Path(path)
    atomic_write_text(path, render_html(report))
    return publish(path)
