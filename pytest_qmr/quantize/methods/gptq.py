"""``gptq``: ``GPTQModifier`` (static activation order, block 128, dampening 0.01)."""

from __future__ import annotations

from ...registry import QUANT_METHODS
from .base import WeightOnly, weight_config_groups


@QUANT_METHODS.register("gptq")
class GPTQ(WeightOnly):
    calibrated = True
    settings = {"block_size": 128, "dampening_frac": 0.01, "actorder": "static"}

    def modifiers(self, model, recipe: dict) -> tuple[list, dict[str, int | None]]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        config_groups, fitted = weight_config_groups(model, recipe)
        return [GPTQModifier(config_groups=config_groups, ignore=recipe["ignore"], block_size=recipe["block_size"],
                             dampening_frac=recipe["dampening_frac"], actorder=recipe["actorder"])], fitted
