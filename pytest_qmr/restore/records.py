"""Restore's records: the preference pairs it trains on and the result it reports.

:class:`PreferencePair` is one DPO row in trl's "standard" preference format (``prompt`` /
``chosen`` / ``rejected``, plain strings, the prompt already chat-rendered because it ends inside
the assistant turn) with its provenance: the training item, the error type and category Locate
gave it, the cut (``first_step``), the teacher and the variant that made it. ``pairs.jsonl`` is a
list of them (:func:`write_pairs` writes it atomically, :func:`read_pairs` reads it back with a
one-line error naming the file and line of a bad row).

:class:`RestoreResult` is what one cell's Restore did; ``CellResult.restore`` holds its
:meth:`~RestoreResult.to_dict`, with ``recovered`` = :func:`recovered_share`, the one formula for
the share of the quantization loss won back.

:class:`RestoreError` is every Restore failure the user can act on (one line);
:class:`LeakageError` the one that refuses pairs built from evaluation items.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import QmrError
from ..fsutil import atomic_write_jsonl


class RestoreError(QmrError, ValueError):
    """A Restore request that cannot be carried out; the message is one line for the user."""


class LeakageError(RestoreError):
    """Preference pairs built from evaluation items (the restored score would be contaminated)."""


# --------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PreferencePair:
    """One DPO row (trl's standard preference format) with where it came from."""

    prompt: str
    chosen: str
    rejected: str
    item_id: str
    error_type: str | None
    category: str | None
    first_step: int  # the cut: 1-based step of the quantized trace the continuations replace
    teacher: str
    variant: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreferencePair":
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise RestoreError(f"preference row lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names})


def write_pairs(path: str | os.PathLike, pairs: Sequence[PreferencePair]) -> None:
    """JSONL, written atomically (a crash never leaves a truncated pair file)."""
    atomic_write_jsonl(path, (p.to_dict() for p in pairs))


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RestoreError(f"{path}: cannot read ({exc.strerror})") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                pairs.append(PreferencePair.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, RestoreError) as exc:
                raise RestoreError(f"{path}:{n}: not a preference pair ({exc})") from None
    return pairs


def recovered_share(fp_acc: float | None, quant_acc: float | None, restored_acc: float | None) -> float | None:
    """Share of the quantization loss Restore won back, (restored - quant) / (fp - quant); None
    when an accuracy is missing or quantization lost nothing."""
    if not all(isinstance(v, (int, float)) for v in (fp_acc, quant_acc, restored_acc)) or fp_acc - quant_acc <= 1e-12:
        return None
    return (restored_acc - quant_acc) / (fp_acc - quant_acc)


@dataclass
class RestoreResult:
    """What Restore did for one cell; ``CellResult.restore`` holds its :meth:`to_dict`.

    The accuracies and ``p_value`` (McNemar, restored vs quantized on the same items) are filled
    by whoever re-measures the cell with the adapter merged."""

    pairs: int
    teacher: str
    variant: str
    steps: int
    minutes: float
    adapter_path: str
    fp_acc: float | None = None
    quant_acc: float | None = None
    restored_acc: float | None = None
    p_value: float | None = None
    n_eval: int | None = None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def recovered(self) -> float | None:
        """Share of the quantization loss won back (:func:`recovered_share`)."""
        return recovered_share(self.fp_acc, self.quant_acc, self.restored_acc)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recovered"] = None if self.recovered is None else round(self.recovered, 4)
        return data
