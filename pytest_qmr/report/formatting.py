"""Value formatting shared by the renderers, and how a rendered report is written.

:func:`fmt` and :func:`rel_change` are the HTML template's ``fmt`` / ``rel_change`` filters and
the Markdown's numbers, so both show a value the same way; :func:`publish` makes a written
report readable by all (reports are artifacts to share).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def one_line(value: Any) -> str:
    return " ".join(str(value).split())


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return format(value, spec)
        except (TypeError, ValueError):  # e.g. "d" for a float recorded as 10.0
            return str(value)
    return str(value)


def rel_change(rel_drop: float | None) -> str:
    """Relative drop as a signed change: a 50% drop is "−50.0%"."""
    if rel_drop is None:
        return "–"
    change = -rel_drop
    return "±0.0%" if abs(change) < 5e-4 else f"{'+' if change > 0 else '−'}{abs(change):.1%}"


def publish(path: Path) -> Path:
    """Reports are artifacts to share (CI uploads, web servers): readable by all, unlike mkstemp's 0600."""
    os.chmod(path, 0o644)
    return path
