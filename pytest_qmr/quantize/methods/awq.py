"""``awq``: ``AWQModifier`` (a transform: per-channel smoothing scales found by grid search) followed
by ``QuantizationModifier``; asymmetric weights unless asked otherwise. Runs on CPU-only machines
through :func:`awq_cpu_workaround`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from ...registry import QUANT_METHODS
from .base import WeightOnly, weight_config_groups


@QUANT_METHODS.register("awq")
class AWQ(WeightOnly):
    calibrated = True
    symmetric = False
    settings = {"duo_scaling": True, "n_grid": 20}

    def modifiers(self, model, recipe: dict) -> tuple[list, dict[str, int | None]]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        config_groups, fitted = weight_config_groups(model, recipe)
        return [AWQModifier(duo_scaling=recipe["duo_scaling"], n_grid=recipe["n_grid"]),
                QuantizationModifier(config_groups=config_groups, ignore=recipe["ignore"])], fitted

    def oneshot_context(self) -> AbstractContextManager[bool]:
        return awq_cpu_workaround()


class _UnpinnedIntermediatesCacheMixin:
    def pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
        """No-op: pinned memory only speeds up host-to-accelerator copies, and there is none."""


@contextmanager
def awq_cpu_workaround() -> Iterator[bool]:
    """Let llmcompressor's AWQModifier run on a machine without an accelerator.

    ``AWQModifier._apply_smoothing`` (llmcompressor 0.14) pins the cached parent-module inputs
    (``IntermediatesCache.pin_memory``) to speed up host-to-device copies during its grid search;
    on CPU-only torch pinning raises "Cannot access accelerator device when none is available".
    When no accelerator is present, the ``IntermediatesCache`` name *inside the AWQ module only*
    (``llmcompressor.modifiers.transform.awq.base``) is swapped, for the duration of the block,
    for a subclass whose ``pin_memory`` does nothing; the original is restored on exit, and the
    pipelines' own caches are untouched. With CUDA (or any accelerator) available nothing is
    patched and upstream runs as is. Yields whether the patch is active.
    """
    import torch

    if torch.cuda.is_available() or torch.accelerator.is_available():
        yield False
        return
    from llmcompressor.modifiers.transform.awq import base as awq_base

    original = getattr(awq_base, "IntermediatesCache", None)
    if original is None:  # upstream reorganised: nothing to patch (and nothing to pin, presumably)
        yield False
        return
    unpinned = type("UnpinnedIntermediatesCache", (_UnpinnedIntermediatesCacheMixin, original), {})
    awq_base.IntermediatesCache = unpinned
    try:
        yield True
    finally:
        awq_base.IntermediatesCache = original
