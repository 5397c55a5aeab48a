"""``fp``: the model itself, at full precision (nothing built, nothing cached)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...registry import QUANT_METHODS
from ..spec import QuantizedModel, QuantSpec
from .base import QuantMethod


@QUANT_METHODS.register("fp")
class FullPrecision(QuantMethod):
    builds = False
    unused = ("bits", "group_size", "symmetric", "ignore", "calibration", "path")
    unused_because = "full precision"

    def recipe(self, spec: QuantSpec) -> dict[str, Any]:
        return {"method": self.name, "path": spec.path}

    def given(self, spec: QuantSpec, model_path: Path, root: Path | None) -> QuantizedModel:
        return QuantizedModel(Path(model_path), spec, {"method": self.name, "cache_hit": None})
