"""Calibration data for GPTQ / AWQ / SmoothQuant: named, seeded, chat-formatted, hashed.

A calibration set is ``samples`` conversations from a named dataset, each rendered through the
model's chat template (question as the user turn, worked answer as the assistant turn),
tokenized and truncated to ``seq_len`` tokens. The same (dataset, samples, seq_len, seed,
tokenizer) always gives the same token ids; their SHA-256 goes into the quantization cache key,
so a changed data file or tokenizer can never reuse a checkpoint calibrated on other data.

Datasets:

``gsm8k``      GSM8K train split, the ``qmr_gsm8k`` task's ``training_split`` as lm-eval reads
               it (:func:`pytest_qmr.splits.task_docs`, the reader Restore's training problems
               use too): ``<data dir>/gsm8k/train.jsonl`` where the data dir is the
               ``data_dir`` argument or ``QMR_DATA_DIR``; only when neither is set does it fall
               back to the hub (the task's loader: ``openai/gsm8k``, ``main``). A data dir
               that lacks the file is an error naming the path, never a silent hub download.
``qmr_arith``  generated in-process from :func:`pytest_qmr.arith.generate` (train split), with
               the same user turn (:func:`pytest_qmr.arith.prompt`) the benchmark uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import QmrError
from .fsutil import data_root

DATASETS = ("gsm8k", "qmr_arith")
DEFAULT_DATASET = "gsm8k"
GSM8K_TRAIN = Path("gsm8k") / "train.jsonl"
_CALCULATOR = re.compile(r"<<[^<>]*>>")


class CalibrationError(QmrError, ValueError):
    """Calibration data that cannot be produced; the message is one line for the user."""


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration data to use; all four fields go into the cache key."""

    dataset: str = DEFAULT_DATASET
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CalibrationData:
    spec: CalibrationSpec
    input_ids: list[list[int]]
    sha256: str
    source: str  # file path, "hub:openai/gsm8k" or "generated"
    chat_template: bool

    def dataset(self):
        """A tokenized ``datasets.Dataset`` (input_ids, attention_mask) for ``oneshot``."""
        from datasets import Dataset

        return Dataset.from_dict(
            {"input_ids": self.input_ids, "attention_mask": [[1] * len(ids) for ids in self.input_ids]}
        )

    def info(self) -> dict[str, Any]:
        lengths = [len(ids) for ids in self.input_ids]
        return {
            **self.spec.as_dict(),
            "sha256": self.sha256,
            "source": self.source,
            "chat_template": self.chat_template,
            "tokens": sum(lengths),
            "mean_len": round(sum(lengths) / max(len(lengths), 1), 1),
            "truncated": sum(1 for n in lengths if n >= self.spec.seq_len),
        }


def validate(spec: CalibrationSpec) -> None:
    if spec.dataset not in DATASETS:
        raise CalibrationError(f"calibration dataset {spec.dataset!r} is unknown (known: {', '.join(DATASETS)})")
    if spec.samples < 1:
        raise CalibrationError(f"calibration samples must be >= 1 (got {spec.samples})")
    if spec.seq_len < 8:
        raise CalibrationError(f"calibration seq_len must be >= 8 (got {spec.seq_len})")


def _gsm8k_rows(data_dir: Path | None) -> tuple[list[dict], str]:
    from .splits import MissingSplitFile, task_docs

    try:
        docs, source = task_docs("qmr_gsm8k", data_dir, "train", GSM8K_TRAIN)
    except MissingSplitFile as exc:
        raise CalibrationError(f"calibration data {exc.path} not found (data dir {exc.data_dir} has no "
                               f"{GSM8K_TRAIN})") from None
    except QmrError as exc:  # the task loader's DataError (lm-eval imports tasks/utils.py as its own module)
        if data_dir is None:  # offline, no cache ...
            raise CalibrationError(f"gsm8k calibration: no data dir (pass one or set QMR_DATA_DIR) and the hub "
                                   f"copy is unavailable ({exc})") from None
        raise CalibrationError(str(exc)) from None
    return [{"question": d["question"], "answer": d["answer"]} for d in docs], (
        source if data_dir is not None else "hub:openai/gsm8k")


def _conversations(spec: CalibrationSpec, data_dir: Path | None) -> tuple[list[tuple[str, str]], str]:
    if spec.dataset == "qmr_arith":
        from . import arith

        problems = arith.generate("train", spec.samples, seed=spec.seed)
        return [(arith.prompt(p.question), p.solution()) for p in problems], "generated:qmr_arith/train"
    rows, source = _gsm8k_rows(data_dir)
    if spec.samples > len(rows):
        raise CalibrationError(f"calibration asks for {spec.samples} gsm8k samples, {source} has {len(rows)}")
    picked = random.Random(f"qmr-calibration:gsm8k:{spec.seed}").sample(range(len(rows)), spec.samples)
    # GSM8K answers carry calculator annotations (<<48/2=24>>) no model emits: drop them
    return [(rows[i]["question"], _CALCULATOR.sub("", rows[i]["answer"])) for i in picked], source


def _render(tokenizer, user: str, assistant: str) -> tuple[list[int], bool]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"], True
    return tokenizer(f"{user}\n{assistant}")["input_ids"], False


def build(spec: CalibrationSpec, tokenizer, data_dir: str | os.PathLike | None = None) -> CalibrationData:
    """Tokenized calibration conversations for ``spec`` (deterministic given the seed)."""
    validate(spec)
    conversations, source = _conversations(spec, data_root(data_dir))
    input_ids, templated = [], True
    for user, assistant in conversations:
        ids, chat = _render(tokenizer, user, assistant)
        templated &= chat
        input_ids.append(list(ids[: spec.seq_len]))
    digest = hashlib.sha256(json.dumps({"spec": spec.as_dict(), "ids": input_ids}).encode()).hexdigest()
    return CalibrationData(spec, input_ids, digest, source, templated)
