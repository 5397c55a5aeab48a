"""A dense copy of a packed checkpoint: what Restore trains a LoRA adapter on when the checkpoint a
user gates was not built here (an AWQ or GPTQ release, an llmcompressor ``pack-quantized`` output).

peft trains on ``torch.nn.Linear`` layers; a packed checkpoint's layers are gptqmodel's
``QuantLinear`` kernels (AWQ, GPTQ) or compressed-tensors' (decompressed by transformers on load).
The copy is made by the libraries that load the checkpoint, not by re-implementing a packing
format: transformers loads it (``models.load``: gptqmodel's CPU kernels, compressed-tensors), and a
fresh model of the same config without ``quantization_config`` gets, for each linear layer, the
weight that layer computes — its output on the identity matrix, less its output on zero (the
bias) — and every other parameter as loaded, so the dense copy computes what the packed layers
compute: exactly for compressed-tensors (logits identical), up to the kernel's arithmetic for
gptqmodel's CPU kernels (measured on the lab model, three prompts: GPTQ the same greedy texts, max
|Δlogit| 0.18 of ~33; AWQ, whose kernel computes in fp16, max |Δlogit| 0.40, one text of three the
same). ``tests/test_formats.py`` checks it. (gptqmodel's own safetensor-level ``dequantize_model``
was tried first: its AWQ path gave garbage on a gptqmodel AWQ checkpoint and its
compressed-tensors path needs another compressed-tensors than llmcompressor 0.14 pins.)

Copies are content-addressed by the checkpoint's fingerprint under ``<cache>/dense/<fingerprint>/``,
built once under a lock, written atomically, and verified against a file manifest on every use.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_directory, atomic_write_json, cache_root, file_manifest, locked, manifest_problem
from .spec import QuantizeError

DENSE = "dense"  # the cache area
MANIFEST = "qmr_manifest.json"


def _effective(module, device) -> tuple:
    """(weight, bias) a linear layer of any kind (gptqmodel's kernels, compressed-tensors' fake
    quantization, a plain ``Linear``) computes: its output on the identity, less its output on zero."""
    import torch

    probe = torch.eye(module.in_features, dtype=torch.float32, device=device)
    with torch.no_grad():
        bias = module(torch.zeros_like(probe[:1]))[0]
        weight = (module(probe) - bias).T.contiguous()
    return weight.float(), bias.float()


def dense_model(model):
    """A plain transformers model (no ``quantization_config``) whose every linear layer computes what
    ``model``'s does (:func:`_effective`) and whose other parameters are ``model``'s."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    device = next(model.parameters()).device
    with torch.no_grad():  # compressed-tensors keeps packed weights until the model's first forward pass
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    source = dict(model.named_modules())
    done = set()
    with torch.no_grad():
        for name, module in fresh.named_modules():
            if isinstance(module, torch.nn.Linear) and name in source:
                weight, bias = _effective(source[name], device)
                module.weight.copy_(weight)
                done.add(f"{name}.weight")
                if module.bias is not None:
                    module.bias.copy_(bias)
                    done.add(f"{name}.bias")
        for name, param in fresh.named_parameters():
            if name not in done:
                param.copy_(model.get_parameter(name).float())
    return fresh


def dense_copy(path: str | Path, fingerprint: str, root: Path | None = None) -> Path:
    """The dense fp32 copy of the packed checkpoint ``path`` (module docstring), built once."""
    from .. import models

    out = (Path(root) if root is not None else cache_root()) / DENSE / fingerprint
    with locked(out):
        manifest = out / MANIFEST
        if manifest.is_file():
            try:
                problem = manifest_problem(out, json.loads(manifest.read_text(encoding="utf-8")).get("files"))
            except (OSError, ValueError):
                problem = "unreadable manifest"
            if problem is None:
                return out
        model, tokenizer = models.load(Path(path))
        if getattr(model.config, "quantization_config", None) is None:
            raise QuantizeError(f"{path}/config.json: quantization_config: none, a dense checkpoint has nothing to "
                                "unpack")
        dense = dense_model(model)
        with atomic_directory(out) as scratch:
            dense.save_pretrained(scratch, safe_serialization=True)
            tokenizer.save_pretrained(scratch)
            atomic_write_json(scratch / MANIFEST, {"source": str(path), "fingerprint": fingerprint,
                                                   "files": file_manifest(scratch, exclude=(MANIFEST,))})
    return out
