"""``qmr compare RUN_A RUN_B``: two run directories item by item."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..compare import compare_runs, to_markdown
from ..gate import MODES


def _cmd_compare(args: argparse.Namespace) -> int:
    thresholds = {"max_abs_drop": args.max_abs_drop, "max_rel_drop": args.max_rel_drop, "alpha": args.alpha,
                  "min_items": args.min_items, "mode": args.mode}
    comparison = compare_runs(Path(args.run_a), Path(args.run_b), thresholds, args.cell_a, args.cell_b)
    print(json.dumps(comparison, indent=2) if args.json else to_markdown(comparison), end="" if not args.json else "\n")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("compare", help="compare two run directories item by item (paired statistics)")
    p.add_argument("run_a", help="the reference run (plays the baseline's part)")
    p.add_argument("run_b")
    p.add_argument("--cell-a", help="compare this cell of RUN_A ...")
    p.add_argument("--cell-b", help="... with this cell of RUN_B")
    p.add_argument("--max-abs-drop", type=float, default=0.05)
    p.add_argument("--max-rel-drop", type=float, default=0.10)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--min-items", type=int, default=20)
    p.add_argument("--mode", choices=MODES, default="difference")
    p.add_argument("--json", action="store_true", help="JSON instead of Markdown")
    p.set_defaults(func=_cmd_compare)
