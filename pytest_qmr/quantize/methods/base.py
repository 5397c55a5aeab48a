"""The quantization-method interface and the weight-only layer grouping shared by the methods.

A method is a :class:`QuantMethod` subclass registered in
:data:`pytest_qmr.registry.QUANT_METHODS` under its name; :func:`get_method` instantiates it
with that name. What the class declares is what the suite checks, the CLI choices and the
pytest markers are derived from:

``calibrated``   calibration data is required (suites must give ``calibration:``);
``needs_bits``   ``bits:`` is required (2, 3, 4 or 8);
``fixed_bits``   the only bit width the method has (``scheme`` names it in messages);
``symmetric``    the default of ``QuantSpec.symmetric=None``;
``settings``     modifier settings and their defaults (``options:`` overrides them, same types);
``builds``       False for a method that evaluates an existing model (nothing is built or cached);
``requires``     a spec field only this method takes, and what it holds (``path``, ``recipe``);
``unused``       suite fields the method has no use for (the suite rejects them when given).

A building method turns a spec into its part of the effective recipe (:meth:`QuantMethod.recipe`,
a JSON-able dict starting with ``method``; it is hashed into the cache key, so the dict of a
built-in method never changes) and that recipe into llmcompressor modifiers
(:meth:`QuantMethod.modifiers`). A method module imports torch and llmcompressor only inside
functions, so reading a suite never imports them.

Weight-only methods group along the input columns (``group_size``; None is per output channel).
A layer whose width the group size does not divide gets the largest power-of-two group that does
(576 columns with group 128 -> 64); such layers are returned as ``fitted`` (never silent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

from ...registry import QUANT_METHODS, RegistryError
from ..spec import WEIGHT_BITS, QuantizedModel, QuantizeError, QuantSpec


def get_method(name: str) -> "QuantMethod":
    """The registered method ``name``; :class:`QuantizeError` (did-you-mean) for an unknown one."""
    try:
        return QUANT_METHODS.get(name)(name)
    except RegistryError as exc:
        raise QuantizeError(str(exc)) from None


class QuantMethod:
    """One quantization method (see the module docstring for what each attribute means)."""

    calibrated: ClassVar[bool] = False
    needs_bits: ClassVar[bool] = False
    fixed_bits: ClassVar[int | None] = None
    scheme: ClassVar[str] = ""
    symmetric: ClassVar[bool] = True
    settings: ClassVar[Mapping[str, Any]] = {}
    builds: ClassVar[bool] = True
    requires: ClassVar[tuple[str, str] | None] = None
    unused: ClassVar[tuple[str, ...]] = ()
    unused_because: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def apply_settings(self, options: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
        """:attr:`settings` with ``options`` applied; an unknown option or a wrong type is a QuantizeError."""
        defaults = self.settings
        merged = dict(defaults)
        for key, value in dict(options).items():
            if key not in defaults:
                known = ", ".join(defaults) or "none"
                raise QuantizeError(f"method {self.name}: unknown option {key!r} (known: {known})")
            if type(value) is not type(defaults[key]):
                raise QuantizeError(f"method {self.name}: option {key} must be of type {type(defaults[key]).__name__} "
                                    f"(got {value!r})")
            merged[key] = value
        return merged

    def uses_calibration(self, spec: QuantSpec) -> bool:
        """Whether the build runs calibration data through the model (the default set when none is given)."""
        return self.calibrated

    def recipe(self, spec: QuantSpec) -> dict[str, Any]:
        """Validate ``spec`` and return the method's part of the effective recipe."""
        raise NotImplementedError

    def modifiers(self, model, recipe: dict) -> tuple[list, dict[str, int | None]]:
        """The llmcompressor modifiers for ``recipe`` and the layers that got a fitted group size."""
        raise NotImplementedError

    def ignored(self, recipe: dict, modifiers: list) -> list[str]:
        """The ``ignore`` patterns the modifiers apply (what the build records as skipped)."""
        return recipe["ignore"]

    def oneshot_context(self) -> AbstractContextManager[bool]:
        """Wraps llmcompressor's ``oneshot``; yields whether a workaround is active."""
        return nullcontext(False)

    def given(self, spec: QuantSpec, model_path: Path, root: Path | None) -> QuantizedModel:
        """For a method that builds nothing: the model the cell evaluates."""
        raise NotImplementedError


class WeightOnly(QuantMethod):
    """Integer weights, fp activations (W<bits>A16): rtn, gptq, awq."""

    needs_bits = True

    def recipe(self, spec: QuantSpec) -> dict[str, Any]:
        if spec.bits not in WEIGHT_BITS:
            raise QuantizeError(f"method {self.name}: bits must be one of 2, 3, 4, 8 (got {spec.bits})")
        if spec.group_size is not None and (not isinstance(spec.group_size, int) or spec.group_size < 2):
            raise QuantizeError(f"method {self.name}: group_size must be an integer >= 2 or None "
                                f"(got {spec.group_size})")
        symmetric = spec.symmetric if spec.symmetric is not None else self.symmetric
        return {
            "method": self.name,
            "scheme": f"W{spec.bits}A16" + ("" if symmetric else "_ASYM"),
            "bits": spec.bits,
            "group_size": spec.group_size,
            "strategy": "group" if spec.group_size else "channel",
            "symmetric": symmetric,
            "ignore": list(spec.ignore or ()),
            **self.apply_settings(spec.options),
        }


# ----------------------------------------------------------------------------- layer grouping


def fit_group_size(columns: int, group_size: int | None) -> int | None:
    """Largest power-of-two group size <= the requested one that divides ``columns``."""
    if group_size is None or columns % group_size == 0:
        return group_size
    candidate = 1 << (group_size.bit_length() - 1)  # a power of two <= group_size
    while candidate > 1 and columns % candidate:
        candidate //= 2
    return candidate if candidate > 1 else None


def quantized_linears(model, ignore: list[str]) -> dict[str, int]:
    """Linear layers the recipe quantizes (ignore resolved the way llmcompressor resolves it)."""
    from compressed_tensors.utils import match_named_modules

    return {name: module.in_features for name, module in match_named_modules(model, ["Linear"], ignore)}


def ignored_linears(model, ignore: list[str]) -> list[str]:
    import torch

    chosen = quantized_linears(model, ignore)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in chosen]


def _weight_args(recipe: dict, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs

    if group_size is None:
        return QuantizationArgs(num_bits=recipe["bits"], type="int", symmetric=recipe["symmetric"], strategy="channel")
    return QuantizationArgs(num_bits=recipe["bits"], type="int", symmetric=recipe["symmetric"], strategy="group",
                            group_size=group_size)


def weight_config_groups(model, recipe: dict) -> tuple[dict, dict[str, int | None]]:
    """One config group per group size in use; layers with a fitted size are named exactly."""
    from compressed_tensors.quantization import QuantizationScheme

    widths = quantized_linears(model, recipe["ignore"])
    if not widths:
        raise QuantizeError(f"method {recipe['method']}: no Linear layer left to quantize (ignore={recipe['ignore']})")
    groups: dict[int | None, list[str]] = {}
    for name, columns in widths.items():
        groups.setdefault(fit_group_size(columns, recipe["group_size"]), []).append(name)
    config_groups = {}
    for index, (group_size, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        targets = [f"re:^{n.replace('.', '[.]')}$" for n in names] if len(groups) > 1 else ["Linear"]
        config_groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=_weight_args(recipe, group_size))
    fitted = {n: g for g, ns in groups.items() for n in ns if g != recipe["group_size"]}
    return config_groups, fitted
