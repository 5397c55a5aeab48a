"""``qmr quantize``: build (or find cached) one quantized checkpoint and print its path.

``--method`` offers every registered method that builds something (``fp`` and ``checkpoint``
evaluate a model as given); calibration runs for the methods that calibrate, and for
``--method recipe`` when ``--calibration-dataset`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..calibration import DEFAULT_DATASET, CalibrationSpec
from ..quantize.build import quantize
from ..quantize.methods import get_method
from ..quantize.spec import QuantSpec
from ..registry import QUANT_METHODS


def building_methods() -> list[str]:
    """The registered methods ``qmr quantize --method`` can build."""
    return [name for name, cls in QUANT_METHODS.items() if cls.builds]


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .. import models

    base = models.resolve(args.model, args.cache_dir)
    method = get_method(args.method)
    calibration = None
    if method.calibrated or args.calibration_dataset is not None:
        calibration = CalibrationSpec(dataset=args.calibration_dataset or DEFAULT_DATASET,
                                      samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                                      seed=args.calibration_seed)
    group_size = None if args.group_size in (None, 0) else args.group_size
    bits = args.bits if args.bits is not None else (4 if method.needs_bits else None)
    recipe = str(Path(args.recipe).resolve()) if args.recipe else None
    spec = QuantSpec(method=args.method, bits=bits, group_size=group_size, symmetric=args.symmetric,
                     ignore=tuple(i for i in args.ignore.split(",") if i), calibration=calibration, recipe=recipe)
    result = quantize(base.path, base.fingerprint, spec, args.cache_dir, data_dir=args.data_dir)
    checkpoint = result.compressed_path if args.compressed else result.path
    if args.out:
        shutil.copytree(checkpoint, args.out, dirs_exist_ok=True)
        checkpoint = Path(args.out)
    info = result.info
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if k != "files"}, indent=2, default=str), file=sys.stderr)
    else:
        sizes = info.get("sizes", {})
        print(f"{info['method']} {'(cache hit)' if info.get('cache_hit') else ''} "
              f"built in {info.get('seconds', {}).get('total')} s, dense {sizes.get('dense_bytes', 0) / 1e6:.1f} MB, "
              f"compressed {sizes.get('compressed_bytes', 0) / 1e6:.1f} MB "
              f"(x{sizes.get('compression_ratio_vs_fp32')} vs fp32, x{sizes.get('compression_ratio_vs_bf16')} vs bf16)",
              file=sys.stderr)
    print(checkpoint)
    return 0


def add_cli(subparsers) -> None:
    """Register ``qmr quantize`` on an argparse subparsers object (``qmr cache``: pytest_qmr.cache)."""
    p = subparsers.add_parser("quantize", help="quantize a model (cached) and print the checkpoint path")
    p.add_argument("--model", default="embedded:smollm2-135m-arith")
    p.add_argument("--method", default="rtn", choices=building_methods())
    p.add_argument("--bits", type=int, default=None, help="weight bits: 2, 3, 4 or 8 (default 4; smoothquant: 8)")
    p.add_argument("--group-size", type=int, default=64, help="columns per scale; 0 = per output channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--ignore", default="lm_head", help="comma-separated layers left unquantized")
    p.add_argument("--recipe", default=None, help="--method recipe: an llmcompressor recipe YAML file")
    p.add_argument("--calibration-dataset", default=None, choices=["gsm8k", "qmr_arith"],
                   help=f"default {DEFAULT_DATASET} for the methods that calibrate; --method recipe calibrates "
                        "only when given")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--calibration-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="benchmark data dir (default: QMR_DATA_DIR)")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: QMR_CACHE_DIR or ~/.cache/pytest-qmr")
    p.add_argument("--compressed", action="store_true", help="print (or copy) the compressed checkpoint instead")
    p.add_argument("--out", default=None, help="copy the checkpoint to this directory and print it")
    p.add_argument("--json", action="store_true", help="print the full info dict to stderr")
    p.set_defaults(func=_cmd_quantize)
