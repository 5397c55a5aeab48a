"""How a :class:`~.spec.QuantSpec` is keyed: its effective recipe and the cache key.

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
from typing import Any

from ..calibration import CalibrationError, CalibrationSpec
from ..fsutil import sha256_text
from .methods import get_method
from .spec import FORMAT_VERSION, QuantizeError, QuantSpec, library_versions


def method_settings(method: str, options: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """The method's modifier settings with ``options`` applied; an unknown option is a QuantizeError."""
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
