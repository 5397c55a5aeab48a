"""``qmr align`` (format-align a model with LoRA SFT) and ``qmr model`` (resolve a model reference)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path


def _cmd_align(args: argparse.Namespace) -> int:
    from .. import models
    from ..align import AlignConfig, align

    config = AlignConfig()
    for item in args.set or []:
        key, _, value = item.partition("=")
        names = {f.name: f for f in fields(AlignConfig)}
        if key not in names:
            raise SystemExit(f"qmr align: --set {key}: unknown setting (known: {', '.join(names)})")
        current = getattr(config, key)
        setattr(config, key, type(current)(value) if not isinstance(current, list) else value.split(","))
    base = models.resolve(args.model)
    card = align(base.path, Path(args.out), config)
    card["command"] = " ".join(["qmr", *sys.argv[1:]])
    from ..fsutil import atomic_write_json

    atomic_write_json(Path(args.out) / "qmr_card.json", card)
    print(json.dumps(card, indent=2))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from .. import models

    resolved = models.resolve(args.model)
    print(json.dumps({"path": str(resolved.path), "fingerprint": resolved.fingerprint,
                      **models.describe(resolved.path)}, indent=2))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("align", help="format-align a model with LoRA SFT on step-structured solutions")
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--out", required=True, help="adapter directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an AlignConfig field")
    p.set_defaults(func=_cmd_align)

    p = subparsers.add_parser("model", help="resolve a model reference (builds embedded models once)")
    p.add_argument("model")
    p.set_defaults(func=_cmd_model)
