"""Quantize a checkpoint through llmcompressor ``oneshot`` recipes; keep a dense copy and the real
compressed checkpoint, content-addressed in a cache.

Methods (``QuantSpec.method``):

``fp``          the model itself (nothing built).
``checkpoint``  an existing, already quantized checkpoint (``QuantSpec.path``), used as given.
``rtn``         round-to-nearest weights: ``QuantizationModifier`` (no calibration data).
``gptq``        ``GPTQModifier`` (static activation order, block 128, dampening 0.01).
``awq``         ``AWQModifier`` (a transform: per-channel smoothing scales found by grid search)
                followed by ``QuantizationModifier``; asymmetric weights unless asked otherwise.
``smoothquant`` ``SmoothQuantModifier`` (alpha 0.5) followed by ``QuantizationModifier`` W8A8:
                int8 per-channel symmetric weights, int8 per-token dynamic symmetric activations.
``recipe``      an llmcompressor recipe YAML file (``QuantSpec.recipe``) run as written.

Weight-only methods take 2, 3, 4 or 8 bits, grouped along the input columns (``group_size``;
``None`` is per output channel). A layer whose width the group size does not divide gets the
largest power-of-two group that does (576 columns with group 128 -> 64); every such layer is
listed in ``info["fitted_group_sizes"]``, never silent. ``lm_head`` stays unquantized unless
``ignore`` leaves it out.

Each method is one module of :mod:`pytest_qmr.quantize.methods` registered in
:data:`pytest_qmr.registry.QUANT_METHODS`; a project adds one by registering a
:class:`~pytest_qmr.quantize.methods.QuantMethod` subclass (see :mod:`pytest_qmr.registry`).

Modules: :mod:`.spec` (QuantSpec, what a build returns), :mod:`.keys` (the effective recipe,
the cache key), :mod:`.build` (the build and what a cache entry holds), :mod:`.entries` (entry
integrity, listing, clearing), :mod:`.formats` (what a checkpoint's own config says it is: format,
scheme, bits), :mod:`.methods` (one file per method); ``qmr quantize`` is
:mod:`pytest_qmr.cli.quantize`.
"""

from .build import quantize
from .entries import cache_entries, clear_cache, verify_entry
from .methods import QuantMethod, fit_group_size, get_method
from .methods.awq import awq_cpu_workaround
from .keys import cache_key, effective_recipe, method_settings
from .spec import (COMPRESSED_DIR, FORMAT_VERSION, INFO_FILE, WEIGHT_BITS, QuantizedModel, QuantizeError, QuantSpec,
                   library_versions)


def build_recipe(model, recipe: dict) -> tuple[list, dict[str, int | None]]:
    """The llmcompressor modifiers for ``recipe`` and the layers that got a fitted group size."""
    return get_method(recipe["method"]).modifiers(model, recipe)


__all__ = ["COMPRESSED_DIR", "FORMAT_VERSION", "INFO_FILE", "WEIGHT_BITS", "QuantMethod", "QuantSpec", "QuantizeError",
           "QuantizedModel", "awq_cpu_workaround", "build_recipe", "cache_entries", "cache_key",
           "clear_cache", "effective_recipe", "fit_group_size", "get_method", "library_versions", "method_settings",
           "quantize", "verify_entry"]
