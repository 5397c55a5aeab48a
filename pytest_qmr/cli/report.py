"""``qmr report RUN_DIR [--html F] [--md F] [--json F] [--baselines DIR] [--max-items N]``.

Without a target it writes ``report.html``, ``report.md`` and ``report.json`` into RUN_DIR. A run
directory that cannot be reported on, or a target that cannot be written, is one line on stderr
and exit status 2; otherwise one summary line names the files written.
"""

from __future__ import annotations

import argparse
import sys

from ..report import ReportError, build_report, write_all, write_html, write_json, write_markdown
from ..report.formatting import one_line


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        report = build_report(args.run_dir, args.baselines, max_items=args.max_items)
        targets = [(write_html, args.html), (write_markdown, args.md), (write_json, args.json)]
        if not any(t for _, t in targets):
            written = list(write_all(report, args.run_dir).values())
        else:
            written = [writer(report, target) for writer, target in targets if target]
    except (ReportError, OSError) as exc:
        print(f"qmr report: {one_line(exc)}", file=sys.stderr)
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
