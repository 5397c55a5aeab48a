"""``checkpoint``: an existing, already quantized checkpoint (``QuantSpec.path``), used as given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...registry import QUANT_METHODS
from ..spec import QuantizedModel, QuantSpec
from .base import QuantMethod


@QUANT_METHODS.register("checkpoint")
class Checkpoint(QuantMethod):
    builds = False
    requires = ("path", "a local directory or hub id")

    def recipe(self, spec: QuantSpec) -> dict[str, Any]:
        return {"method": self.name, "path": spec.path}

    def given(self, spec: QuantSpec, model_path: Path, root: Path | None) -> QuantizedModel:
        from ...models import resolve

        given = resolve(spec.path or "", root)
        return QuantizedModel(given.path, spec, {"method": self.name, "path": str(given.path),
                                                 "fingerprint": given.fingerprint, "cache_hit": None})
