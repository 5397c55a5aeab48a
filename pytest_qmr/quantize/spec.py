"""What to build and how it is keyed: :class:`QuantSpec`, its effective recipe, the cache key.

The *effective recipe* spells out every setting a build uses: the method's own part
(:meth:`~pytest_qmr.quantize.methods.QuantMethod.recipe`, e.g. scheme, bits, group size,
modifier settings), then ``calibration`` (the calibration set's settings, or None for a method
that uses none) and ``format_version``. Methods that build nothing (``fp``, ``checkpoint``) stop
at their own part. The cache key hashes the model fingerprint, the effective recipe, the SHA-256
of the calibration token ids and the library versions; a dict key order change or a renamed
setting would change every key, so both are frozen (existing caches stay valid).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import CalibrationError, CalibrationSpec
from ..errors import QmrError
from ..fsutil import sha256_text
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


def method_settings(method: str, options: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """The method's modifier settings with ``options`` applied; an unknown option is a QuantizeError."""
    from .methods import get_method

    return get_method(method).apply_settings(options)


def _calibration(spec: QuantSpec) -> dict[str, Any]:
    from ..calibration import validate

    calibration = spec.calibration or CalibrationSpec()
    if not isinstance(calibration, CalibrationSpec):
        raise QuantizeError(f"calibration must be a CalibrationSpec (got {type(calibration).__name__})")
    try:
        validate(calibration)
    except CalibrationError as exc:
        raise QuantizeError(str(exc)) from None
    return calibration.as_dict()


def effective_recipe(spec: QuantSpec) -> dict[str, Any]:
    """Validate ``spec`` and spell out every setting the build uses (the key's recipe part)."""
    from .methods import get_method

    method = get_method(spec.method)
    recipe = method.recipe(spec)
    if not method.builds:
        return recipe
    recipe["calibration"] = _calibration(spec) if method.uses_calibration(spec) else None
    recipe["format_version"] = FORMAT_VERSION
    return recipe


def cache_key(model_fingerprint: str, spec: QuantSpec, calibration_sha: str | None = None) -> str:
    payload = {"model": model_fingerprint, "recipe": effective_recipe(spec), "calibration_sha256": calibration_sha,
               "libraries": library_versions()}
    return sha256_text(json.dumps(payload, sort_keys=True))[:20]
