"""What a checkpoint is: its quantization as its own ``config.json`` says (the one place that reads it).

A checkpoint a user ships carries its quantization in ``config.json``'s ``quantization_config``:

``compressed-tensors`` (llmcompressor's output)
    ``config_groups.<group>.weights`` (``num_bits``, ``type``, ``symmetric``, ``strategy``,
    ``group_size``) and ``input_activations`` (None: weight-only); ``format`` says how the
    weights are stored (``pack-quantized``: int4/int8 packed into int32; ``int-quantized``,
    ``float-quantized``, ``naive-quantized``: one value per element).
``awq`` (AutoAWQ / gptqmodel)
    ``bits``, ``group_size``, ``zero_point`` (asymmetric), ``version`` (gemm / gemv).
``gptq`` (AutoGPTQ / gptqmodel)
    ``bits``, ``group_size``, ``sym``, ``desc_act``; gptqmodel also writes ``quantize_config.json``.

:func:`checkpoint_format` turns any of them into one record — ``format``, ``scheme``
(``W4A16``, ``W4A16_ASYM``, ``W8A8``), ``bits``, ``group_size``, ``symmetric``,
``activation_bits``, ``packed`` — that a cell records (``result.json``'s ``quantization.format``)
and that the engines read (vLLM's CPU build serves packed W*A16 weights only in bf16/fp16; it has
no 3-bit or asymmetric-GPTQ kernel), whether the checkpoint is ours or a user's. A dense checkpoint
(no ``quantization_config``) is None. A ``quant_method`` we do not know is recorded as it is, with
the fields we could read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .spec import QuantizeError


def _scheme(bits: int | None, activation_bits: int | None, symmetric: bool | None) -> str | None:
    if bits is None:
        return None
    return f"W{bits}A{activation_bits or 16}" + ("" if symmetric in (True, None) else "_ASYM")


def _compressed_tensors(config: dict[str, Any]) -> dict[str, Any]:
    groups = [g for g in (config.get("config_groups") or {}).values() if isinstance(g, dict)]
    weights = [g.get("weights") or {} for g in groups]
    activations = [g.get("input_activations") for g in groups]
    first = weights[0] if weights else {}
    bits = first.get("num_bits")
    activation_bits = next((a.get("num_bits") for a in activations if isinstance(a, dict)), None)
    group_sizes = sorted({w.get("group_size") for w in weights if w.get("group_size")})
    return {"bits": bits, "group_size": group_sizes[0] if len(group_sizes) == 1 else group_sizes or None,
            "symmetric": first.get("symmetric"), "activation_bits": activation_bits,
            "strategy": first.get("strategy"), "type": first.get("type"),
            "packed": config.get("format") == "pack-quantized", "storage": config.get("format")}


def _awq(config: dict[str, Any]) -> dict[str, Any]:
    return {"bits": config.get("bits") or config.get("w_bit"), "group_size": config.get("group_size")
            or config.get("q_group_size"), "symmetric": not config.get("zero_point", True),
            "activation_bits": None, "version": config.get("version"), "packed": True}


def _gptq(config: dict[str, Any]) -> dict[str, Any]:
    return {"bits": config.get("bits"), "group_size": config.get("group_size"), "symmetric": config.get("sym", True),
            "activation_bits": None, "desc_act": config.get("desc_act"), "packed": True}


READERS = {"compressed-tensors": _compressed_tensors, "awq": _awq, "gptq": _gptq}


def checkpoint_format(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's quantization as one record (module docstring), or None for a dense one."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"{config_file}: cannot read the checkpoint's config ({type(exc).__name__})") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        return None
    method = str(quantization.get("quant_method") or "unknown")
    read = READERS.get(method)
    fields = read(quantization) if read is not None else {"bits": quantization.get("bits"), "packed": None}
    record = {"format": method, **fields}
    record["scheme"] = _scheme(record.get("bits"), record.get("activation_bits"), record.get("symmetric"))
    return record
