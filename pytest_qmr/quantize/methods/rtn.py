"""``rtn``: round-to-nearest weights, ``QuantizationModifier`` (no calibration data)."""

from __future__ import annotations

from ...registry import QUANT_METHODS
from .base import WeightOnly, weight_config_groups


@QUANT_METHODS.register("rtn")
class RTN(WeightOnly):
    def modifiers(self, model, recipe: dict) -> tuple[list, dict[str, int | None]]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        config_groups, fitted = weight_config_groups(model, recipe)
        return [QuantizationModifier(config_groups=config_groups, ignore=recipe["ignore"])], fitted
