"""``hf``: transformers in this process — lm-eval's ``HFLM`` on the loaded model object.

The model is loaded through the session (:class:`~pytest_qmr.engines.base.EngineHost.load`: one
model kept in memory, consecutive cells share it) only on a generation-cache miss, batched with
``generation.batch_size``, on ``generation.device`` in ``generation.dtype`` (fp32 on the CPU).
A Restore adapter is merged into the dense copy with peft. Nothing is served, so nothing is
recorded in ``served`` and nothing needs stopping.
"""

from __future__ import annotations

from typing import Any

from ..registry import ENGINES
from .base import Engine, Target
from .devices import Runtime


def hf_lm(model, tokenizer, batch_size: int, device: str = "cpu", dtype: str = "float32"):
    """lm-eval's ``HFLM`` on an in-memory transformers model, already on ``device`` in ``dtype``."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype)


@ENGINES.register("hf")
class HfEngine(Engine):
    adapters = True

    def identity(self, target: Target) -> dict[str, Any]:
        return {}

    def start(self, target: Target):
        model, tokenizer = self.host.load(target.path, target.trust_remote_code, target.adapter,
                                          Runtime(target.device, target.dtype))
        return hf_lm(model, tokenizer, target.batch_size, target.device, target.dtype)
