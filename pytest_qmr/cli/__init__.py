"""``qmr``: the stages of the loop as commands, for use outside pytest."""

from __future__ import annotations

import argparse
import sys

COMMAND_MODULES = ("models", "cache", "quantize", "locate", "serve", "vllm_env", "restore", "report", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    import importlib

    for command in COMMAND_MODULES:  # one module per stage under pytest_qmr/cli/, each with add_cli(sub)
        importlib.import_module(f"{__name__}.{command}").add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import QmrError
    from ..redact import install

    install()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QmrError as exc:  # on purpose: one line; anything else is a bug and keeps its traceback
        print(f"qmr {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
