"""``qmr vllm-env [DIR]``: build vLLM's own environment (see :mod:`pytest_qmr.vllm_env`)."""

from __future__ import annotations

from ..vllm_env import __doc__ as _doc
from ..vllm_env import _cmd, add_arguments


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("vllm-env", help=_doc.split("\n\n")[0].replace("\n", " "))
    add_arguments(p)
    p.set_defaults(func=_cmd)
