"""Writing a report: :func:`write_json` (``Report.to_dict()``, the schema in :mod:`pytest_qmr.report`)
and :func:`write_all` (HTML, Markdown and JSON side by side). Every write is atomic.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..fsutil import atomic_write_json
from .formatting import publish
from .html import write_html
from .markdown import write_markdown
from .records import Report


def write_json(report: Report, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_json(path, report.to_dict())
    return publish(path)


def write_all(report: Report, directory: str | os.PathLike) -> dict[str, Path]:
    """``report.html``, ``report.md`` and ``report.json`` in ``directory``."""
    directory = Path(directory)
    return {"html": write_html(report, directory / "report.html"),
            "md": write_markdown(report, directory / "report.md"),
            "json": write_json(report, directory / "report.json")}
