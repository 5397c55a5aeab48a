"""``qmr cache ls|clear``: every cache area (generations, adapters, quantized checkpoints, models)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..cache import AREAS, GENERATIONS, Entry, area_entries, human_size, clear
from ..fsutil import cache_root


def _cmd_cache(args: argparse.Namespace) -> int:
    from ..errors import QmrError

    root = Path(args.cache_dir).expanduser() if args.cache_dir else cache_root()
    areas = AREAS if args.area == "all" else (args.area,)
    if args.action == "ls":
        print(f"cache {root}")
        for area in areas:
            entries = area_entries(root, area)
            newest = max((e.mtime for e in entries), default=None)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest)) if newest else "-"
            size = human_size(sum(e.size for e in entries))
            print(f"  {area:<12} {len(entries):>7} entries {size:>10}  last used {when}")
            if len(areas) == 1 and area != GENERATIONS:  # one area: each entry
                for e in entries:
                    age = (time.time() - e.mtime) / 86400
                    print(f"    {e.path.name:<40} {human_size(e.size):>10} {age:>6.1f} d  {_describe(e)}")
        return 0
    for name, value in (("--older-than-days", args.older_than_days), ("--max-size-gb", args.max_size_gb)):
        if value is not None and value < 0:
            raise QmrError(f"clear {name}: must be >= 0 (got {value})")
    doomed, entries = clear(root, areas, args.older_than_days, args.max_size_gb)
    print(f"removed {len(doomed)} of {len(entries)} entries ({human_size(sum(e.size for e in doomed))}) from {root}"
          + (": " + " ".join(e.path.name for e in doomed if e.area != GENERATIONS) if doomed else ""))
    return 0


def _describe(entry: Entry) -> str:
    """What a directory entry holds, from its own record (a checkpoint's method and bits)."""
    from ..quantize import INFO_FILE

    try:
        info = json.loads((entry.path / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "INCOMPLETE" if entry.area == "quantized" else ""
    return f"{info.get('method')} {(info.get('recipe') or {}).get('bits') or ''}".strip()


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("cache", help="list or clear the cache (generations, adapters, checkpoints, models)")
    p.add_argument("action", choices=("ls", "clear"))
    p.add_argument("--cache-dir", default=None, help="default: QMR_CACHE_DIR or ~/.cache/pytest-qmr")
    p.add_argument("--area", choices=("all", *AREAS), default="all")
    p.add_argument("--older-than-days", type=float, default=None, help="clear: only entries unused this long")
    p.add_argument("--max-size-gb", type=float, default=None,
                   help="clear: remove the least recently used until the area fits in this size")
    p.set_defaults(func=_cmd_cache)
