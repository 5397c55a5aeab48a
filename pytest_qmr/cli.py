"""``qmr``: the stages of the loop as commands, for use outside pytest."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path


def _cmd_align(args: argparse.Namespace) -> int:
    from . import models
    from .align import AlignConfig, align

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
    from .fsutil import atomic_write_json

    atomic_write_json(Path(args.out) / "qmr_card.json", card)
    print(json.dumps(card, indent=2))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import models
    from .quantize import QuantSpec, quantize

    base = models.resolve(args.model)
    spec = QuantSpec(method=args.method, bits=args.bits, group_size=args.group_size,
                     symmetric=not args.asymmetric)
    result = quantize(base.path, base.fingerprint, spec)
    if args.out:
        import shutil

        shutil.copytree(result.path, args.out, dirs_exist_ok=True)
        print(args.out)
    else:
        print(result.path)
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from . import models

    resolved = models.resolve(args.model)
    print(json.dumps({"path": str(resolved.path), "fingerprint": resolved.fingerprint,
                      **models.describe(resolved.path)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("align", help="format-align a model with LoRA SFT on step-structured solutions")
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--out", required=True, help="adapter directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an AlignConfig field")
    p.set_defaults(func=_cmd_align)

    p = sub.add_parser("quantize", help="quantize a model (cached) and print the checkpoint path")
    p.add_argument("--model", default="embedded:smollm2-135m-arith")
    p.add_argument("--method", default="rtn")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asymmetric", action="store_true")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("model", help="resolve a model reference (builds embedded models once)")
    p.add_argument("model")
    p.set_defaults(func=_cmd_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .models import ModelError
    from .quantize import QuantizeError

    try:
        return args.func(args)
    except (ModelError, QuantizeError, ValueError) as exc:
        print(f"qmr {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
