"""Installed library versions: part of every cache key and record that a library upgrade must invalidate.

One reader (:func:`package_versions`) and the named sets each key uses, so a key's set is
visible in one place and no two stages read versions differently:

- :data:`QUANTIZATION`: a quantized checkpoint (``quantize.keys.cache_key``, its build record);
- :data:`ENGINE`: a generated response (``QmrSession.identity``; the vLLM engine adds the version of
  vLLM's own environment to its served identity);
- :data:`RECORDS`: a baseline's provenance and a cell's ``--qmr-resume`` inputs;
- :data:`ADAPTER`: a trained Restore adapter (``restore.cell.adapter_inputs``).
"""

from __future__ import annotations

from collections.abc import Iterable

QUANTIZATION = ("torch", "transformers", "llmcompressor", "compressed-tensors")
ENGINE = ("lm_eval", "transformers", "torch")
RECORDS = ("lm_eval", "transformers", "torch", "llmcompressor")
ADAPTER = (*RECORDS, "trl", "peft")


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """``{distribution name: installed version}``, None for one that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
