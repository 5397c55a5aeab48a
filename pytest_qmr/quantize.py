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

Weight-only methods take 2, 3, 4 or 8 bits, grouped along the input columns (``group_size``;
``None`` is per output channel). A layer whose width the group size does not divide gets the
largest power-of-two group that does (576 columns with group 128 -> 64); every such layer is
listed in ``info["fitted_group_sizes"]``, never silent. ``lm_head`` stays unquantized unless
``ignore`` leaves it out.

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

import argparse
import json
import os
import shutil
import struct
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

from .errors import QmrError
from .calibration import CalibrationError, CalibrationSpec
from .fsutil import (atomic_directory, atomic_write_json, cache_root, file_manifest, locked, manifest_problem,
                     sha256_text)

METHODS = ("fp", "checkpoint", "rtn", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")
WEIGHT_BITS = (2, 3, 4, 8)
FORMAT_VERSION = 2  # bump when what a cache entry holds (or how it is built) changes
INFO_FILE = "qmr_quant.json"
COMPRESSED_DIR = "compressed"

GPTQ_SETTINGS = {"block_size": 128, "dampening_frac": 0.01, "actorder": "static"}
AWQ_SETTINGS = {"duo_scaling": True, "n_grid": 20}
SMOOTHQUANT_SETTINGS = {"smoothing_strength": 0.5}
METHOD_SETTINGS = {"gptq": GPTQ_SETTINGS, "awq": AWQ_SETTINGS, "smoothquant": SMOOTHQUANT_SETTINGS, "rtn": {}}


def method_settings(method: str, options: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """The method's modifier settings with ``options`` applied; an unknown option is a QuantizeError."""
    defaults = METHOD_SETTINGS.get(method, {})
    merged = dict(defaults)
    for key, value in dict(options).items():
        if key not in defaults:
            known = ", ".join(defaults) or "none"
            raise QuantizeError(f"method {method}: unknown option {key!r} (known: {known})")
        if type(value) is not type(defaults[key]):
            raise QuantizeError(f"method {method}: option {key} must be of type {type(defaults[key]).__name__} "
                                f"(got {value!r})")
        merged[key] = value
    return merged


class QuantizeError(QmrError, ValueError):
    """A quantizer request that cannot be carried out; one line for the user."""


@dataclass(frozen=True)
class QuantSpec:
    """What to build; its effective recipe is hashed (with the model fingerprint) into the key.

    ``symmetric=None`` is the method's default (awq: asymmetric; rtn, gptq, smoothquant:
    symmetric). ``bits=None`` is only valid for smoothquant (W8A8). ``calibration=None`` is the
    default calibration set (GSM8K train, 128 samples, 512 tokens, seed 0) for the methods that
    calibrate; rtn ignores it.
    """

    method: str = "fp"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    path: str | None = None  # method "checkpoint": an existing (pre-quantized) checkpoint
    calibration: CalibrationSpec | None = None
    # modifier settings over the method's defaults (METHOD_SETTINGS), e.g. (("n_grid", 10),) for awq
    options: tuple[tuple[str, Any], ...] = ()


@dataclass
class QuantizedModel:
    path: Path  # the dense copy (what evaluation loads)
    spec: QuantSpec
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def compressed_path(self) -> Path | None:
        path = self.path / COMPRESSED_DIR
        return path if path.is_dir() else None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


# ----------------------------------------------------------------------------- the recipe


def effective_recipe(spec: QuantSpec) -> dict[str, Any]:
    """Validate ``spec`` and spell out every setting the build uses (the key's recipe part)."""
    method = spec.method
    if method not in METHODS:
        raise QuantizeError(f"quantizer method {method!r} is unknown (known: {', '.join(METHODS)})")
    if method in ("fp", "checkpoint"):
        return {"method": method, "path": spec.path}
    ignore = list(spec.ignore or ())
    if method == "smoothquant":
        if spec.bits not in (None, 8):
            raise QuantizeError(f"method smoothquant is W8A8: bits must be 8 (got {spec.bits})")
        if spec.symmetric is False:
            raise QuantizeError("method smoothquant is W8A8 int8 symmetric: symmetric=false is not supported")
        recipe = {
            "method": method,
            "scheme": "W8A8",
            "bits": 8,
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                                  "dynamic": True},
            "group_size": None,
            "requested_group_size": spec.group_size,
            "symmetric": True,
            "ignore": ignore,
            **method_settings(method, spec.options),
        }
    else:
        if spec.bits not in WEIGHT_BITS:
            raise QuantizeError(f"method {method}: bits must be one of 2, 3, 4, 8 (got {spec.bits})")
        if spec.group_size is not None and (not isinstance(spec.group_size, int) or spec.group_size < 2):
            raise QuantizeError(f"method {method}: group_size must be an integer >= 2 or None (got {spec.group_size})")
        symmetric = spec.symmetric if spec.symmetric is not None else method != "awq"
        recipe = {
            "method": method,
            "scheme": f"W{spec.bits}A16" + ("" if symmetric else "_ASYM"),
            "bits": spec.bits,
            "group_size": spec.group_size,
            "strategy": "group" if spec.group_size else "channel",
            "symmetric": symmetric,
            "ignore": ignore,
            **method_settings(method, spec.options),
        }
    if method in CALIBRATED:
        calibration = spec.calibration or CalibrationSpec()
        if not isinstance(calibration, CalibrationSpec):
            raise QuantizeError(f"calibration must be a CalibrationSpec (got {type(calibration).__name__})")
        from .calibration import validate

        try:
            validate(calibration)
        except CalibrationError as exc:
            raise QuantizeError(str(exc)) from None
        recipe["calibration"] = calibration.as_dict()
    else:
        recipe["calibration"] = None
    recipe["format_version"] = FORMAT_VERSION
    return recipe


def fit_group_size(columns: int, group_size: int | None) -> int | None:
    """Largest power-of-two group size <= the requested one that divides ``columns``."""
    if group_size is None or columns % group_size == 0:
        return group_size
    candidate = 1 << (group_size.bit_length() - 1)  # a power of two <= group_size
    while candidate > 1 and columns % candidate:
        candidate //= 2
    return candidate if candidate > 1 else None


def _quantized_linears(model, ignore: list[str]) -> dict[str, int]:
    """Linear layers the recipe quantizes (ignore resolved the way llmcompressor resolves it)."""
    from compressed_tensors.utils import match_named_modules

    return {name: module.in_features for name, module in match_named_modules(model, ["Linear"], ignore)}


def _ignored_linears(model, ignore: list[str]) -> list[str]:
    import torch

    chosen = _quantized_linears(model, ignore)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in chosen]


def _weight_args(recipe: dict, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs

    if group_size is None:
        return QuantizationArgs(num_bits=recipe["bits"], type="int", symmetric=recipe["symmetric"], strategy="channel")
    return QuantizationArgs(num_bits=recipe["bits"], type="int", symmetric=recipe["symmetric"], strategy="group",
                            group_size=group_size)


def _weight_config_groups(model, recipe: dict) -> tuple[dict, dict[str, int | None]]:
    """One config group per group size in use; layers with a fitted size are named exactly."""
    from compressed_tensors.quantization import QuantizationScheme

    widths = _quantized_linears(model, recipe["ignore"])
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


def build_recipe(model, recipe: dict) -> tuple[list, dict[str, int | None]]:
    """The llmcompressor modifiers for ``recipe`` and the layers that got a fitted group size."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    method, ignore = recipe["method"], recipe["ignore"]
    if method == "smoothquant":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        if not _quantized_linears(model, ignore):
            raise QuantizeError(f"method smoothquant: no Linear layer left to quantize (ignore={ignore})")
        return [
            SmoothQuantModifier(smoothing_strength=recipe["smoothing_strength"]),
            QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignore),
        ], {}
    config_groups, fitted = _weight_config_groups(model, recipe)
    if method == "rtn":
        return [QuantizationModifier(config_groups=config_groups, ignore=ignore)], fitted
    if method == "gptq":
        return [GPTQModifier(config_groups=config_groups, ignore=ignore, block_size=recipe["block_size"],
                             dampening_frac=recipe["dampening_frac"], actorder=recipe["actorder"])], fitted
    if method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(duo_scaling=recipe["duo_scaling"], n_grid=recipe["n_grid"]),
                QuantizationModifier(config_groups=config_groups, ignore=ignore)], fitted
    raise QuantizeError(f"quantizer method {method!r} has no recipe")


# ----------------------------------------------------------------------------- AWQ on CPU


class _UnpinnedIntermediatesCacheMixin:
    def pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
        """No-op: pinned memory only speeds up host-to-accelerator copies, and there is none."""


@contextmanager
def awq_cpu_workaround() -> Iterator[bool]:
    """Let llmcompressor's AWQModifier run on a machine without an accelerator.

    ``AWQModifier._apply_smoothing`` (llmcompressor 0.14) pins the cached parent-module inputs
    (``IntermediatesCache.pin_memory``) to speed up host-to-device copies during its grid search;
    on CPU-only torch pinning raises "Cannot access accelerator device when none is available".
    When no accelerator is present, the ``IntermediatesCache`` name *inside the AWQ module only*
    (``llmcompressor.modifiers.transform.awq.base``) is swapped, for the duration of the block,
    for a subclass whose ``pin_memory`` does nothing; the original is restored on exit, and the
    pipelines' own caches are untouched. With CUDA (or any accelerator) available nothing is
    patched and upstream runs as is. Yields whether the patch is active.
    """
    import torch

    if torch.cuda.is_available() or torch.accelerator.is_available():
        yield False
        return
    from llmcompressor.modifiers.transform.awq import base as awq_base

    original = getattr(awq_base, "IntermediatesCache", None)
    if original is None:  # upstream reorganised: nothing to patch (and nothing to pin, presumably)
        yield False
        return
    unpinned = type("UnpinnedIntermediatesCache", (_UnpinnedIntermediatesCacheMixin, original), {})
    awq_base.IntermediatesCache = unpinned
    try:
        yield True
    finally:
        awq_base.IntermediatesCache = original


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


# ----------------------------------------------------------------------------- sizes, integrity


def _safetensors_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _float_tensor_bytes(directory: Path) -> tuple[int, int]:
    """(bytes held in F32 tensors, total bytes) over a directory's safetensors files."""
    f32 = total = 0
    for path in directory.glob("*.safetensors"):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            total += end - start
            if entry["dtype"] == "F32":
                f32 += end - start
    return f32, total


def _sizes(source: Path, entry: Path, n_params: int) -> dict[str, Any]:
    compressed = entry / COMPRESSED_DIR
    compressed_bytes = _safetensors_bytes(compressed)
    f32, _ = _float_tensor_bytes(compressed)
    compressed_bf16 = compressed_bytes - f32 // 2  # the same checkpoint with fp32 tensors held in bf16
    fp32_bytes, bf16_bytes = 4 * n_params, 2 * n_params
    return {
        "parameters": n_params,
        "fp_checkpoint_bytes": _safetensors_bytes(source),
        "fp32_bytes": fp32_bytes,
        "bf16_bytes": bf16_bytes,
        "dense_bytes": _safetensors_bytes(entry),
        "compressed_bytes": compressed_bytes,
        "compressed_bytes_if_bf16": compressed_bf16,
        "compression_ratio_vs_fp32": round(fp32_bytes / compressed_bytes, 3),
        "compression_ratio_vs_bf16": round(bf16_bytes / compressed_bf16, 3),
        "note": "compressed/ keeps unquantized tensors (embeddings, norms) and scales in fp32; "
                "the bf16 ratio compares bf16 parameters with that checkpoint's fp32 tensors counted as bf16",
    }


def _manifest(directory: Path) -> dict[str, dict]:
    return file_manifest(directory, exclude=(INFO_FILE,))


def verify_entry(entry: Path) -> tuple[dict | None, str | None]:
    """(info, None) for a complete entry, else (None, why it cannot be used)."""
    info_file = entry / INFO_FILE
    if not info_file.is_file():
        return None, f"{INFO_FILE} missing"
    try:
        info = json.loads(info_file.read_text())
        files = info["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return None, f"{INFO_FILE} does not parse"
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None, f"{INFO_FILE} does not parse (file manifest)"
    if info.get("format_version") != FORMAT_VERSION:
        return None, f"format version {info.get('format_version')} != {FORMAT_VERSION}"
    if not any(name.endswith(".safetensors") and "/" not in name for name in files) or not any(
        name.startswith(f"{COMPRESSED_DIR}/") and name.endswith(".safetensors") for name in files
    ):
        return None, "no dense or no compressed weights recorded"
    problem = manifest_problem(entry, files)
    return (None, problem) if problem else (info, None)


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


def cache_key(model_fingerprint: str, spec: QuantSpec, calibration_sha: str | None = None) -> str:
    payload = {"model": model_fingerprint, "recipe": effective_recipe(spec), "calibration_sha256": calibration_sha,
               "libraries": library_versions()}
    return sha256_text(json.dumps(payload, sort_keys=True))[:20]


def _calibration(model_path: Path, recipe: dict, data_dir):
    if recipe.get("calibration") is None:
        return None
    from transformers import AutoTokenizer

    from .calibration import build

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
    if spec.method == "fp":
        return QuantizedModel(Path(model_path), spec, {"method": "fp", "cache_hit": None})
    if spec.method == "checkpoint":
        from .models import resolve

        given = resolve(spec.path or "", root)
        return QuantizedModel(given.path, spec, {"method": "checkpoint", "path": str(given.path),
                                                 "fingerprint": given.fingerprint, "cache_hit": None})
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

    from .models import load

    seconds: dict[str, float] = {}
    started = time.monotonic()
    with _PeakRss() as rss:
        model, tokenizer = load(model_path)
        n_params = sum(p.numel() for p in model.parameters())
        ignored = _ignored_linears(model, recipe["ignore"])
        modifiers, fitted = build_recipe(model, recipe)
        seconds["load"] = time.monotonic() - started

        mark = time.monotonic()
        kwargs: dict[str, Any] = {}
        if calibration is not None:
            kwargs = dict(dataset=calibration.dataset(), num_calibration_samples=len(calibration.input_ids),
                          max_seq_length=calibration.spec.seq_len, shuffle_calibration_samples=False, batch_size=1)
        awq_patched = False
        with _capture_upstream_warnings() as warnings:
            if recipe["method"] == "awq":
                with awq_cpu_workaround() as awq_patched:
                    oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **kwargs)
            else:
                oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **kwargs)
        seconds["oneshot"] = time.monotonic() - mark

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
                    **{name: "ignored by recipe (ignore=" + ",".join(recipe["ignore"]) + ")" for name in ignored},
                    **{name: f"group size {recipe['group_size']} does not divide its width: per-channel instead"
                       for name, size in fitted.items() if size is None},
                },
                "upstream_warnings": [w for w in warnings if "skip" in w.lower()],
                "notes": _notes(recipe),
                "activation_quantization": _activation_note(recipe),
                "awq_cpu_workaround": awq_patched,
                # llmcompressor's oneshot onloads each layer to the accelerator where one is visible
                "device": _oneshot_device(),
                "calibration": calibration.info() if calibration is not None else None,
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                # resident set of the whole process while building (it already held rss_before_mb)
                "peak_rss_mb": round(max(rss.peak_kb, rss._rss_kb()) / 1024, 1),
                "rss_before_mb": round(rss.start_kb / 1024, 1),
                "sizes": _sizes(model_path, scratch, n_params),
                "libraries": library_versions(),
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": _manifest(scratch),
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


def _notes(recipe: dict) -> list[str]:
    notes = []
    if recipe["method"] == "smoothquant" and recipe.get("requested_group_size"):
        notes.append(f"W8A8 weights are per output channel; requested group_size {recipe['requested_group_size']} "
                     "does not apply")
    return notes


def _activation_note(recipe: dict) -> str:
    if recipe.get("input_activations") is None:
        return "none (weight-only: activations stay fp32)"
    return ("simulated: the dense copy's config.json carries a compressed-tensors quantization_config with only the "
            "dynamic per-token symmetric int8 input-activation scheme, applied on every quantized Linear at load; "
            "weights are stored dequantized")


# ----------------------------------------------------------------------------- cache maintenance


def _entries_dir(root: Path | None) -> Path:
    return (Path(root) if root else cache_root()) / "quantized"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_entries(root: Path | None = None) -> list[dict]:
    """Every quantized entry under ``root``: key, method, bytes on disk, mtime (last use)."""
    base = _entries_dir(root)
    rows = []
    if not base.is_dir():
        return rows
    for path in sorted(base.iterdir()):
        if not path.is_dir() or path.name.startswith(".tmp-"):
            continue
        try:
            info = json.loads((path / INFO_FILE).read_text())
            method = info.get("method")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            info, method = {}, None
        rows.append({
            "key": path.name,
            "method": method,
            "bits": (info.get("recipe") or {}).get("bits"),
            "size": _tree_bytes(path),
            "mtime": path.stat().st_mtime,
            "path": str(path),
            "complete": method is not None,
        })
    return rows


def clear_cache(root: Path | None = None, older_than_days: float | None = None,
                max_size_gb: float | None = None) -> list[str]:
    """Delete entries (each under its lock); returns the deleted keys.

    No argument: everything. ``older_than_days``: entries not used for that long.
    ``max_size_gb``: least recently used entries until the rest fits. Scratch directories of
    interrupted builds are removed when older than a day (a live build may own a newer one).
    """
    from .cache import clear

    return [e.path.name for e in clear(root, ("quantized",), older_than_days, max_size_gb)[0]]


# ----------------------------------------------------------------------------- CLI


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import models

    base = models.resolve(args.model, args.cache_dir)
    calibration = None
    if args.method in CALIBRATED:
        calibration = CalibrationSpec(dataset=args.calibration_dataset, samples=args.calibration_samples,
                                      seq_len=args.calibration_seq_len, seed=args.calibration_seed)
    group_size = None if args.group_size in (None, 0) else args.group_size
    bits = args.bits if args.bits is not None else (None if args.method == "smoothquant" else 4)
    spec = QuantSpec(method=args.method, bits=bits, group_size=group_size, symmetric=args.symmetric,
                     ignore=tuple(i for i in args.ignore.split(",") if i), calibration=calibration)
    result = quantize(base.path, base.fingerprint, spec, args.cache_dir, data_dir=args.data_dir)
    checkpoint = result.compressed_path if args.compressed else result.path
    if args.out:
        shutil.copytree(checkpoint, args.out, dirs_exist_ok=True)
        checkpoint = Path(args.out)
    info = result.info
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if k != "files"}, indent=2, default=str), file=sys.stderr)
    else:
        sizes = info.get("sizes", {})
        print(f"{info['method']} {'(cache hit)' if info.get('cache_hit') else ''} "
              f"built in {info.get('seconds', {}).get('total')} s, dense {sizes.get('dense_bytes', 0) / 1e6:.1f} MB, "
              f"compressed {sizes.get('compressed_bytes', 0) / 1e6:.1f} MB "
              f"(x{sizes.get('compression_ratio_vs_fp32')} vs fp32, x{sizes.get('compression_ratio_vs_bf16')} vs bf16)",
              file=sys.stderr)
    print(checkpoint)
    return 0


def add_cli(subparsers) -> None:
    """Register ``qmr quantize`` on an argparse subparsers object (``qmr cache``: pytest_qmr.cache)."""
    p = subparsers.add_parser("quantize", help="quantize a model (cached) and print the checkpoint path")
    p.add_argument("--model", default="embedded:smollm2-135m-arith")
    p.add_argument("--method", default="rtn", choices=[m for m in METHODS if m not in ("fp", "checkpoint")])
    p.add_argument("--bits", type=int, default=None, help="weight bits: 2, 3, 4 or 8 (default 4; smoothquant: 8)")
    p.add_argument("--group-size", type=int, default=64, help="columns per scale; 0 = per output channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--ignore", default="lm_head", help="comma-separated layers left unquantized")
    p.add_argument("--calibration-dataset", default="gsm8k", choices=["gsm8k", "qmr_arith"])
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--calibration-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="benchmark data dir (default: QMR_DATA_DIR)")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: QMR_CACHE_DIR or ~/.cache/pytest-qmr")
    p.add_argument("--compressed", action="store_true", help="print (or copy) the compressed checkpoint instead")
    p.add_argument("--out", default=None, help="copy the checkpoint to this directory and print it")
    p.add_argument("--json", action="store_true", help="print the full info dict to stderr")
    p.set_defaults(func=_cmd_quantize)

