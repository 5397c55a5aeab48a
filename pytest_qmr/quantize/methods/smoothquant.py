"""``smoothquant``: ``SmoothQuantModifier`` (alpha 0.5) followed by ``QuantizationModifier`` W8A8:
int8 per-channel symmetric weights, int8 per-token dynamic symmetric activations.

The dense copy cannot bake activation rounding into weights, so it carries a compressed-tensors
``quantization_config`` with only the input-activation scheme (the build reads
``input_activations`` from this recipe).
"""

from __future__ import annotations

from typing import Any

from ...registry import QUANT_METHODS
from ..spec import QuantizeError, QuantSpec
from .base import QuantMethod, quantized_linears


@QUANT_METHODS.register("smoothquant")
class SmoothQuant(QuantMethod):
    calibrated = True
    fixed_bits = 8
    scheme = "W8A8"
    settings = {"smoothing_strength": 0.5}

    def recipe(self, spec: QuantSpec) -> dict[str, Any]:
        if spec.bits not in (None, 8):
            raise QuantizeError(f"method {self.name} is W8A8: bits must be 8 (got {spec.bits})")
        if spec.symmetric is False:
            raise QuantizeError(f"method {self.name} is W8A8 int8 symmetric: symmetric=false is not supported")
        return {
            "method": self.name,
            "scheme": "W8A8",
            "bits": 8,
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                                  "dynamic": True},
            "group_size": None,
            "requested_group_size": spec.group_size,
            "symmetric": True,
            "ignore": list(spec.ignore or ()),
            **self.apply_settings(spec.options),
        }

    def modifiers(self, model, recipe: dict) -> tuple[list, dict[str, int | None]]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        ignore = recipe["ignore"]
        if not quantized_linears(model, ignore):
            raise QuantizeError(f"method {self.name}: no Linear layer left to quantize (ignore={ignore})")
        return [
            SmoothQuantModifier(smoothing_strength=recipe["smoothing_strength"]),
            QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignore),
        ], {}
