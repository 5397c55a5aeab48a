"""The report's figures, each a matplotlib Figure drawn on an Agg canvas (no pyplot, no global
backend state) and returned as a ``data:image/png;base64`` URI for the HTML, or None when there
is nothing to draw. matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from .. import taxonomy
from .records import Report


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


def plot_lengths(items: list[tuple[float, float]], length: dict[str, Any]) -> str | None:
    """Per item, the quantized model's mean answer tokens against FP's: points above the diagonal
    are items it answers at greater length (what serving it costs more)."""
    if not items:
        return None
    fp, quant = [f for f, _ in items], [q for _, q in items]
    top = max(max(fp), max(quant)) * 1.05 or 1.0
    fig, ax = _figure(3.6, 3.4)
    ax.plot([0, top], [0, top], color="#9e9e9e", linewidth=1, label="same length")
    ratio = length.get("ratio")
    if ratio:
        ax.plot([0, top], [0, top * ratio], color="#c62828", linewidth=1, linestyle="--",
                label=f"mean ratio {ratio:.2f}")
    ax.scatter(fp, quant, s=14, color="#1565c0", alpha=0.7)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("FP: mean tokens per answer")
    ax.set_ylabel("quantized: mean tokens per answer")
    ax.set_title(f"answer length per item ({len(items)} items)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)
