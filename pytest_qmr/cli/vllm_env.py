"""``qmr vllm-env [DIR]``: build vLLM's own environment (see :mod:`pytest_qmr.engines.vllm_env`)."""

from __future__ import annotations

from ..engines import vllm_env


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("vllm-env", help=vllm_env.__doc__.split("\n\n")[0].replace("\n", " "))
    vllm_env.add_arguments(p)
    p.set_defaults(func=vllm_env.command)
