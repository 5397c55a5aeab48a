"""Cache entries of quantized checkpoints (``<root>/quantized/<key>/``): their sizes, their
integrity (every recorded file present with its size and SHA-256), listing and clearing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..fsutil import cache_root, file_manifest, manifest_problem
from .spec import COMPRESSED_DIR, FORMAT_VERSION, INFO_FILE

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


def sizes(source: Path, entry: Path, n_params: int) -> dict[str, Any]:
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


def manifest(directory: Path) -> dict[str, dict]:
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
    from ..cache import clear

    return [e.path.name for e in clear(root, ("quantized",), older_than_days, max_size_gb)[0]]


