"""Build a quantized checkpoint through llmcompressor ``oneshot`` (the method's modifiers), keep
a dense copy and the real compressed checkpoint, content-addressed in a cache.

What a cache entry holds (``<root>/quantized/<key>/``):

* the **dense copy** (top level): an ordinary fp32 model whose weights are the dequantized
  (fake-quantized) weights, after any AWQ / SmoothQuant rescaling of weights and norms. It
  computes the same function as the compressed checkpoint without a quantize-dequantize pass
  over the weights on every forward, which is what makes CPU evaluation affordable.
  For SmoothQuant W8A8 the activation rounding cannot be baked into weights, so the dense copy
  also carries a compressed-tensors ``quantization_config`` holding *only* the dynamic per-token
  int8 input-activation scheme (format ``dense``, no weight scheme). Loading it through
  transformers (``models.load``) therefore rounds every quantized Linear's input per token to
  int8 on the fly, exactly like the W8A8 checkpoint, while the weights are plain fp32 tensors:
  nothing about W8A8 is left unsimulated (``info["activation_quantization"]`` says so).
* ``compressed/``: the real compressed-tensors checkpoint written by llmcompressor
  (``save_pretrained(save_compressed=True)``; packed int weights, fp32 scales), which reloads
  through transformers. Its size gives the on-disk compression ratio.
* ``qmr_quant.json``: the info dict, including the size and SHA-256 of every file.

The key hashes the model fingerprint, the effective recipe, the calibration token ids and the
library versions. Entries are built under a file lock (parallel pytest-xdist workers build a
key once) in a scratch directory renamed into place only when complete; an entry whose info
does not parse or whose files are missing, resized or fail their recorded SHA-256 is deleted
and rebuilt, never loaded.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..calibration import CalibrationError, CalibrationSpec
from ..fsutil import atomic_directory, atomic_write_json, cache_root, locked
from .entries import manifest, sizes, verify_entry
from .methods import get_method
from .methods.base import ignored_linears
from .keys import cache_key, effective_recipe
from .spec import COMPRESSED_DIR, FORMAT_VERSION, INFO_FILE, QuantizedModel, QuantizeError, QuantSpec, library_versions

# ----------------------------------------------------------------------------- dense copy


def _dense_state_dict(model) -> dict:
    """Weights after quantize-dequantize: the function the quantized checkpoint computes."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
                weight = fake_quantize(
                    module.weight, module.weight_scale, getattr(module, "weight_zero_point", None), scheme.weights
                )
                state[f"{name}.weight"] = weight.detach().clone()
    for key, value in model.state_dict().items():
        if key.endswith(("_scale", "_zero_point", "_g_idx", "_global_scale")) or key in state:
            continue
        state[key] = value.detach().clone()
    return state


def _activation_only_config(recipe: dict) -> dict | None:
    """compressed-tensors config that re-applies W8A8's dynamic per-token int8 input rounding."""
    if recipe.get("input_activations") is None:
        return None
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(**recipe["input_activations"])
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], input_activations=args)},
        ignore=recipe["ignore"], format="dense", quantization_status="frozen",
    )
    return config.model_dump(mode="json")


def _save_dense(quantized, source: Path, out: Path, recipe: dict, tokenizer) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    state = _dense_state_dict(quantized)
    config = AutoConfig.from_pretrained(source)
    output = quantized.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and getattr(output, "quantization_scheme", None) is not None:
        config.tie_word_embeddings = False  # lm_head quantized, the input embedding is not
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise QuantizeError(f"dense rebuild mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    activation_config = _activation_only_config(recipe)
    if activation_config is not None:
        dense.config.quantization_config = activation_config
    dense.generation_config = quantized.generation_config
    dense.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _save_compressed(quantized, out: Path, tokenizer) -> None:
    import warnings

    with warnings.catch_warnings():
        # llmcompressor's offload wrappers make transformers believe modules are offloaded
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        quantized.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- resources


class _PeakRss:
    """Sample this process's resident set size while a build runs (Linux /proc; else ru_maxrss)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_kb() -> int:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self._rss_kb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_PeakRss":
        self.start_kb = self._rss_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self._rss_kb())


@contextmanager
def _capture_upstream_warnings() -> Iterator[list[str]]:
    """Collect llmcompressor's warnings (e.g. AWQ mappings it skipped) for the info dict."""
    messages: list[str] = []
    try:
        from loguru import logger
    except ImportError:
        yield messages
        return
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING", format="{message}")
    try:
        yield messages
    finally:
        logger.remove(sink)


# ----------------------------------------------------------------------------- entry points


def _calibration(model_path: Path, recipe: dict, data_dir):
    if recipe.get("calibration") is None:
        return None
    from transformers import AutoTokenizer

    from ..calibration import build

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    try:
        return build(CalibrationSpec(**recipe["calibration"]), tokenizer, data_dir)
    except CalibrationError as exc:
        raise QuantizeError(str(exc)) from None


def quantize(model_path: Path, model_fingerprint: str, spec: QuantSpec, root: Path | None = None, *,
             data_dir: str | os.PathLike | None = None) -> QuantizedModel:
    """Return the dense checkpoint for ``spec`` (built once; later calls hit the cache).

    ``data_dir`` (else ``QMR_DATA_DIR``) holds ``gsm8k/train.jsonl`` for GSM8K calibration.
    """
    recipe = effective_recipe(spec)
    method = get_method(spec.method)
    if not method.builds:
        return method.given(spec, Path(model_path), root)
    model_path = Path(model_path)
    started = time.monotonic()
    calibration = _calibration(model_path, recipe, data_dir)
    key = cache_key(model_fingerprint, spec, calibration.sha256 if calibration else None)
    out = (Path(root) if root else cache_root()) / "quantized" / key
    rebuilt_because = None
    with locked(out):
        if out.exists():
            info, problem = verify_entry(out)
            if info is not None:
                os.utime(out)  # last use, for clear_cache(max_size_gb=...)
                info.update(cache_hit=True, lookup_seconds=round(time.monotonic() - started, 3))
                return QuantizedModel(out, spec, info)
            rebuilt_because = problem
            shutil.rmtree(out)
        info = _build(model_path, model_fingerprint, recipe, calibration, out, key)
    info.update(cache_hit=False, rebuilt_because=rebuilt_because)
    return QuantizedModel(out, spec, info)


def _oneshot_device() -> str:
    """Where llmcompressor's ``oneshot`` computes (its ``get_main_device``): the accelerator, else the CPU."""
    import torch

    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accelerator.type if accelerator is not None else "cpu"


def _build(model_path: Path, fingerprint: str, recipe: dict, calibration, out: Path, key: str) -> dict:
    from llmcompressor import oneshot

    from ..models import load

    seconds: dict[str, float] = {}
    started = time.monotonic()
    with _PeakRss() as rss:
        model, tokenizer = load(model_path)
        n_params = sum(p.numel() for p in model.parameters())
        method = get_method(recipe["method"])
        modifiers, fitted = method.modifiers(model, recipe)
        ignore = method.ignored(recipe, modifiers)
        ignored = ignored_linears(model, ignore)
        seconds["load"] = time.monotonic() - started

        mark = time.monotonic()
        kwargs: dict[str, Any] = {}
        if calibration is not None:
            kwargs = dict(dataset=calibration.dataset(), num_calibration_samples=len(calibration.input_ids),
                          max_seq_length=calibration.spec.seq_len, shuffle_calibration_samples=False, batch_size=1)
        with _capture_upstream_warnings() as warnings, method.oneshot_context() as workaround:
            oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **kwargs)
        seconds["oneshot"] = time.monotonic() - mark
        _check_simulated(model, recipe)

        mark = time.monotonic()
        with atomic_directory(out) as scratch:
            _save_dense(model, model_path, scratch, recipe, tokenizer)
            _save_compressed(model, scratch / COMPRESSED_DIR, tokenizer)
            seconds["save"] = time.monotonic() - mark
            seconds["total"] = time.monotonic() - started
            llmc_recipe = scratch / COMPRESSED_DIR / "recipe.yaml"
            info = {
                "key": key,
                "method": recipe["method"],
                "recipe": recipe,
                "llmcompressor_recipe": llmc_recipe.read_text() if llmc_recipe.is_file() else None,
                "model_fingerprint": fingerprint,
                "source": str(model_path),
                "compressed_path": COMPRESSED_DIR,
                "fitted_group_sizes": fitted,
                "group_sizes_used": _group_size_counts(model),
                "skipped": {
                    **{name: "ignored by recipe (ignore=" + ",".join(ignore) + ")" for name in ignored},
                    **{name: f"group size {recipe['group_size']} does not divide its width: per-channel instead"
                       for name, size in fitted.items() if size is None},
                },
                "upstream_warnings": [w for w in warnings if "skip" in w.lower()],
                "notes": _notes(recipe),
                "activation_quantization": _activation_note(recipe),
                "awq_cpu_workaround": workaround,
                # llmcompressor's oneshot onloads each layer to the accelerator where one is visible
                "device": _oneshot_device(),
                "calibration": calibration.info() if calibration is not None else None,
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                # resident set of the whole process while building (it already held rss_before_mb)
                "peak_rss_mb": round(max(rss.peak_kb, rss._rss_kb()) / 1024, 1),
                "rss_before_mb": round(rss.start_kb / 1024, 1),
                "sizes": sizes(model_path, scratch, n_params),
                "libraries": library_versions(),
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": manifest(scratch),
            }
            atomic_write_json(scratch / INFO_FILE, info)
    return info


def _group_size_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, module in model.named_modules():
        weights = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if weights is not None:
            strategy = str(getattr(weights.strategy, "value", weights.strategy))
            label = str(weights.group_size) if strategy == "group" else strategy
            counts[label] = counts.get(label, 0) + 1
    return counts


def _check_simulated(model, recipe: dict) -> None:
    """The dense copy re-applies activation rounding only where the recipe declares it
    (``input_activations``, smoothquant); any other quantized activation would go unsimulated."""
    if recipe.get("input_activations") is not None:
        return
    names = [name for name, module in model.named_modules()
             if (scheme := getattr(module, "quantization_scheme", None)) is not None
             and (scheme.input_activations is not None or scheme.output_activations is not None)]
    if names:
        raise QuantizeError(f"method {recipe['method']}: quantizes activations ({names[0]} and {len(names) - 1} more), "
                            "which the dense copy cannot simulate; use a weight-only scheme (smoothquant is W8A8)")


def _notes(recipe: dict) -> list[str]:
    notes = []
    if recipe.get("requested_group_size"):  # smoothquant
        notes.append(f"W8A8 weights are per output channel; requested group_size {recipe['requested_group_size']} "
                     "does not apply")
    return notes


def _activation_note(recipe: dict) -> str:
    if recipe.get("input_activations") is None:
        return "none (weight-only: activations stay fp32)"
    return ("simulated: the dense copy's config.json carries a compressed-tensors quantization_config with only the "
            "dynamic per-token symmetric int8 input-activation scheme, applied on every quantized Linear at load; "
            "weights are stored dequantized")


