"""``recipe``: an llmcompressor recipe YAML file (``QuantSpec.recipe``; in a suite, ``recipe:``
relative to the suite file) run through ``oneshot`` as written.

The file's text is part of the effective recipe (with its SHA-256, ``recipe_sha256``), so an
edited recipe never reuses a checkpoint built from another one; where the file lies does not
matter. Calibration runs only when ``calibration:`` is given (a recipe whose modifiers need data,
e.g. ``GPTQModifier``, needs it). What the build records as skipped are the Linear layers the
modifiers' ``ignore`` patterns exclude. The dense copy holds dequantized weights only, so a
recipe that quantizes activations is refused at build time (smoothquant is the W8A8 method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...fsutil import sha256_text
from ...registry import QUANT_METHODS
from ..spec import QuantizeError, QuantSpec
from .base import QuantMethod


def rejection(exc: Exception) -> str:
    """What llmcompressor said about a recipe, in one line: a modifier's pydantic validation error
    names the modifier, the field, the problem and the value (``QuantizationModifier.bogus_field:
    Extra inputs are not permitted (got 3)``); anything else its first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and hasattr(exc, "title"):
        try:
            first = errors()[0]
        except (IndexError, TypeError):
            first = None
        if first is not None:
            field = ".".join(str(part) for part in first.get("loc", ())) or "(the modifier)"
            more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            return f"{exc.title}.{field}: {first.get('msg')} (got {first.get('input')!r}){more}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@QUANT_METHODS.register("recipe")
class RecipeFile(QuantMethod):
    requires = ("recipe", "an llmcompressor recipe YAML file, relative to the suite file")
    unused = ("bits", "group_size", "symmetric", "ignore")
    unused_because = "the recipe file sets it"

    def uses_calibration(self, spec: QuantSpec) -> bool:
        return spec.calibration is not None

    def recipe(self, spec: QuantSpec) -> dict[str, Any]:
        import yaml

        if not spec.recipe:
            raise QuantizeError(f"method {self.name}: needs a recipe file (QuantSpec.recipe)")
        path = Path(spec.recipe)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QuantizeError(f"method {self.name}: cannot read recipe file {path} ({type(exc).__name__})") from None
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise QuantizeError(f"method {self.name}: recipe file {path} is not valid YAML "
                                f"({' '.join(str(exc).split())})") from None
        if not isinstance(parsed, dict):
            raise QuantizeError(f"method {self.name}: recipe file {path} must be a mapping of stages")
        self.apply_settings(spec.options)  # none: an option is an error
        return {"method": self.name, "recipe_sha256": sha256_text(text), "recipe_yaml": text}

    def modifiers(self, model, recipe: dict) -> tuple[list, dict[str, int | None]]:
        from llmcompressor.recipe import Recipe

        try:
            modifiers = list(Recipe.create_instance(recipe["recipe_yaml"]).modifiers)
        except (ValueError, TypeError, KeyError) as exc:
            raise QuantizeError(f"method {self.name}: llmcompressor rejects the recipe: {rejection(exc)}") from None
        if not modifiers:
            raise QuantizeError(f"method {self.name}: the recipe has no modifiers (a <name>_stage: "
                                "{<group>_modifiers: {ModifierName: {...}}} mapping)")
        return modifiers, {}

    def ignored(self, recipe: dict, modifiers: list) -> list[str]:
        patterns = [p for m in modifiers for p in (getattr(m, "ignore", None) or [])]
        return list(dict.fromkeys(patterns))
