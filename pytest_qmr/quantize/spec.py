"""What to build: :class:`QuantSpec`, what a build returns (:class:`QuantizedModel`), the
error every quantize problem is (:class:`QuantizeError`) and the constants a cache entry is laid
out by. How a spec is keyed (its effective recipe, the cache key) is :mod:`.keys`, which asks the
registered methods; this module is what the methods themselves import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import CalibrationSpec
from ..errors import QmrError
from ..versions import QUANTIZATION, package_versions

WEIGHT_BITS = (2, 3, 4, 8)
FORMAT_VERSION = 2  # bump when what a cache entry holds (or how it is built) changes
INFO_FILE = "qmr_quant.json"
COMPRESSED_DIR = "compressed"


class QuantizeError(QmrError, ValueError):
    """A quantizer request that cannot be carried out; one line for the user."""


@dataclass(frozen=True)
class QuantSpec:
    """What to build; its effective recipe is hashed (with the model fingerprint) into the key.

    ``symmetric=None`` is the method's default (awq: asymmetric; rtn, gptq, smoothquant:
    symmetric). ``bits=None`` is only valid for smoothquant (W8A8). ``calibration=None`` is the
    default calibration set (GSM8K train, 128 samples, 512 tokens, seed 0) for the methods that
    calibrate; rtn ignores it, method ``recipe`` calibrates only when it is given.
    """

    method: str = "fp"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    path: str | None = None  # method "checkpoint": an existing (pre-quantized) checkpoint
    calibration: CalibrationSpec | None = None
    # modifier settings over the method's defaults (QuantMethod.settings), e.g. (("n_grid", 10),) for awq
    options: tuple[tuple[str, Any], ...] = ()
    recipe: str | None = None  # method "recipe": an llmcompressor recipe YAML file


@dataclass
class QuantizedModel:
    path: Path  # the dense copy (what evaluation loads)
    spec: QuantSpec
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def compressed_path(self) -> Path | None:
        path = self.path / COMPRESSED_DIR
        return path if path.is_dir() else None


def library_versions() -> dict[str, str | None]:
    """The library versions a quantized checkpoint depends on (part of its cache key)."""
    return package_versions(QUANTIZATION)
