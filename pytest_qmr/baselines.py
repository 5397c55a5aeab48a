"""Committed FP baselines: one JSON per model x benchmark at ``<dir>/<model>/<benchmark>.json``.

A baseline holds the FP model's per-item correctness (plus extracted answer and response)
and the provenance that makes it comparable: model fingerprint, data and prompt hashes,
generation settings, limit, seed, library versions.  Writes are atomic and locked (a reader
never sees half a file; concurrent writers never interleave); every problem reading one is
a one-line :class:`BaselineError` that says which file, which field, and how to regenerate.

File format (``schema`` 1)::

    {"schema": 1, "model": str, "benchmark": str, "task": str, "accuracy": float, "n": int,
     "items": {item_id: {"correct": bool, "extracted": str | null, "response": str,
                         "doc_index": int (optional), "prompt_sha256": str (optional),
                         "gold": str (optional),
                         "samples": [{"correct": bool, "extracted": str | null, "tokens": int | null,
                                      "seed": int | null, "truncated": bool, "thinking_tokens": int}, ...]
                                    (sampled or thinking baselines only: k per item; truncated and
                                    thinking_tokens for a thinking model),
                         "score": float (with samples: the mean over them)}},
     "provenance": {"model_fingerprint": str, "data_sha256": str, "prompt_sha256": str,
                    "generation": {...}, "limit": int | null, "seed": int,
                    "libraries": {name: version}, "created": iso-time}}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import QmrError
from .fsutil import atomic_write_json, locked, sha256_text

__all__ = [
    "SCHEMA",
    "BaselineError",
    "Baseline",
    "PROVENANCE_CHECKED",
    "baseline_path",
    "write_baseline",
    "read_baseline",
    "check_provenance",
    "check_items",
    "library_drift",
    "paired_vectors",
    "regenerate_hint",
    "stale",
    "stale_cell",
    "gate_cell",
    "item_count",
    "items_accuracy",
    "writable_dir_problem",
]

SCHEMA = 1
# Fields whose mismatch makes a baseline incomparable (errors); library versions only warn.
PROVENANCE_CHECKED = ("model_fingerprint", "data_sha256", "prompt_sha256", "generation", "seed", "scoring", "dtype")
# what a baseline written before a field was recorded had (every earlier baseline ran in fp32)
PROVENANCE_DEFAULTS = {"dtype": "float32"}
_CAUSES = {
    "model_fingerprint": "the FP model weights changed",
    "data_sha256": "the benchmark data changed",
    "prompt_sha256": "the prompt changed",
    "generation": "the generation settings changed",
    "seed": "the seed changed",
    "scoring": "the benchmark's metric or filter changed",
    "dtype": "the model's dtype changed: a baseline gates runs in its own precision",
}


class BaselineError(QmrError, ValueError):
    """A missing, unreadable or incomparable baseline; ``str(err)`` is one line."""


@dataclass
class Baseline:
    """One FP baseline.  ``items`` maps item id to a plain dict with ``correct`` (bool),
    ``extracted`` (str or None), ``response`` (str) and optionally ``doc_index`` (int) and
    ``prompt_sha256`` (str); other keys are kept as they are."""

    model: str
    benchmark: str
    task: str
    accuracy: float
    n: int
    items: dict[str, dict[str, Any]]
    provenance: dict[str, Any]
    schema: int = SCHEMA
    source: str | None = field(default=None, compare=False, repr=False)  # file it was read from

    @property
    def correct(self) -> dict[str, bool]:
        return {item_id: bool(item["correct"]) for item_id, item in self.items.items()}

    @property
    def k(self) -> int:
        """Answers per item: 1 for a greedy baseline, the samples of a sampled one."""
        first = next(iter(self.items.values()), {})
        return len(first["samples"]) if first.get("samples") else 1

    def counts(self) -> dict[str, int]:
        """Per item, how many of its ``k`` answers are right."""
        return {item_id: item_count(item) for item_id, item in self.items.items()}

    @classmethod
    def from_records(
        cls,
        model: str,
        benchmark: str,
        task: str,
        records: Iterable[Any],
        provenance: Mapping[str, Any],
    ) -> "Baseline":
        """Build from :class:`~pytest_qmr.records.SampleRecord` objects (``item_id``, ``doc_index``,
        ``prompt``, ``correct``, ``extracted``, ``response``); accuracy and n are computed, each
        item keeps its ``doc_index`` and ``prompt_sha256``.  A missing ``provenance["created"]``
        is filled with the current UTC time."""
        items: dict[str, dict[str, Any]] = {}
        for rec in records:
            if rec.item_id in items:
                raise BaselineError(f"duplicate item id {rec.item_id!r} in the FP results for {model}/{benchmark}")
            items[rec.item_id] = {
                "correct": bool(rec.correct),
                "extracted": rec.extracted,
                "response": rec.response,
                "doc_index": int(rec.doc_index),
                "prompt_sha256": sha256_text(rec.prompt),
                "gold": str(rec.gold),
            }
            if rec.samples:  # each answer's grade, length and seed (only sample 0's text: Locate's)
                items[rec.item_id]["samples"] = [{key: s[key] for key in SAMPLE_KEYS if key in s} for s in rec.samples]
                items[rec.item_id]["score"] = rec.score
        n = len(items)
        prov = dict(provenance)
        prov.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        accuracy = items_accuracy(items.values())
        return cls(model=model, benchmark=benchmark, task=task, accuracy=accuracy, n=n, items=items, provenance=prov)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "benchmark": self.benchmark,
            "task": self.task,
            "accuracy": self.accuracy,
            "n": self.n,
            "items": {item_id: dict(item) for item_id, item in self.items.items()},
            "provenance": self.provenance,
        }


SAMPLE_KEYS = ("correct", "extracted", "tokens", "seed", "truncated", "thinking_tokens")  # kept of each answer


def item_count(item: Mapping[str, Any]) -> int:
    """How many of a baseline item's answers are right (a greedy item: 0 or 1)."""
    samples = item.get("samples")
    return sum(bool(s["correct"]) for s in samples) if samples else int(bool(item["correct"]))


def items_accuracy(items: Iterable[Mapping[str, Any]]) -> float:
    """Accuracy over baseline items: the mean over items of each one's share of right answers."""
    shares = [item_count(i) / (len(i["samples"]) if i.get("samples") else 1) for i in items]
    return sum(shares) / len(shares) if shares else 0.0


def baseline_path(directory: str | os.PathLike, model: str, benchmark: str) -> Path:
    """``<directory>/<model>/<benchmark>.json``."""
    for what, name in (("model", model), ("benchmark", benchmark)):
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise BaselineError(f"{what} name {name!r} cannot be used as a baseline path component")
    return Path(directory) / model / f"{benchmark}.json"


def regenerate_hint(model: str | None, benchmark: str | None, suite: str | None = None, cell: str | None = None) -> str:
    """``pytest <suite> --qmr-update-baselines -k <cell-id-fragment>``."""
    suite = suite or "<suite.yaml>"
    if not cell:
        cell = f"{model} and {benchmark}" if model and benchmark else "<cell-id-fragment>"
    quoted = f"'{cell}'" if any(ch in cell for ch in " []()") else cell
    return f"pytest {suite} --qmr-update-baselines -k {quoted}"


def stale(source: str, problem: str, model: str | None, benchmark: str | None, suite: str | None = None,
          cell: str | None = None, verb: str = "regenerate") -> BaselineError:
    """The one-line error of a baseline that cannot gate the cell:
    ``<source>: <problem>; regenerate it with: <command>`` (the one place the command is added)."""
    return BaselineError(f"{source}: {problem}; {verb} it with: {regenerate_hint(model, benchmark, suite, cell)}")


def stale_cell(cell, source: str | os.PathLike | None, problem: str) -> BaselineError:
    """:func:`stale` for a suite's cell (the regenerate command names its suite file and id)."""
    return stale(str(source), problem, cell.model.name, cell.benchmark.name, cell.suite_file or None, cell.id)


def gate_cell(cell, baseline: Baseline, records: list, fp_counts_all: list[int], thresholds: Any):
    """A cell's records (:class:`~pytest_qmr.records.SampleRecord`) against its baseline, item by
    item, under ``thresholds`` (a sequential stop's early verdict where generation stopped before
    every planned item); a generated prompt that is not the baseline's is a stale baseline.
    ``fp_counts_all``: FP's right answers per planned item, of ``baseline.k``; with ``k`` answers
    per item the gate is :func:`pytest_qmr.sampled_gate.evaluate_sampled_gate`'s, which at ``k = 1``
    is :func:`pytest_qmr.gate.evaluate_gate` exactly."""
    from .sampled_gate import evaluate_sampled_gate, sampled_verdict_if_known

    changed = [r.item_id for r in records
               if baseline.items.get(r.item_id, {}).get("prompt_sha256") not in (None, sha256_text(r.prompt))]
    if changed:
        raise stale_cell(cell, baseline.source, f"items[{changed[0]!r}].prompt_sha256: the prompts of "
                                                f"{len(changed)} generated items differ from the baseline's")
    k = baseline.k
    if records and records[0].k != k:
        raise stale_cell(cell, baseline.source, f"items[{records[0].item_id!r}].samples: the baseline has {k} "
                                                f"answer(s) per item, the cell {records[0].k}")
    paired_vectors(baseline, [r.item_id for r in records], {r.item_id: r.correct for r in records})  # all there
    fp_counts = baseline.counts()
    fp_vec, q_vec = [fp_counts[r.item_id] for r in records], [r.n_correct for r in records]
    if cell.thresholds.sequential and len(records) < len(fp_counts_all):
        early = sampled_verdict_if_known(fp_counts_all, q_vec, thresholds, k)
        if early is not None:
            return early.result()
    sampled = evaluate_sampled_gate(fp_vec, q_vec, thresholds, k)
    sampled.gate.n_planned = len(fp_counts_all)
    return sampled.result()


def write_baseline(path: str | os.PathLike, baseline: Baseline) -> None:
    """Validate, then write atomically under the file's inter-process lock.

    Readers see the old file or the whole new one; a crash mid-write leaves the old file
    and no temporary file.  (The lock lives next to it as ``<file>.lock``.)
    """
    path = Path(path)
    data = baseline.to_dict()
    _validate(data, str(path), baseline.model, baseline.benchmark, None, None)
    try:
        with locked(path):
            atomic_write_json(path, data)
    except OSError as exc:
        raise BaselineError(f"{path}: cannot write the baseline ({_one_line(exc)}); --qmr-baselines must name a "
                            "writable directory") from None


def writable_dir_problem(directory: str | os.PathLike) -> str | None:
    """Why baselines (and their lock files) cannot be written under ``directory``, or None: it must
    be a directory (or not exist yet under a writable one) where a file can be created now."""
    import tempfile

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        return "a file, expected a directory of baselines (<model>/<benchmark>.json)"
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so the directory cannot be made"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".qmr-write-check-"):
            pass
    except OSError as exc:
        return f"not writable ({_one_line(exc)})"
    return None


def read_baseline(path: str | os.PathLike, *, suite: str | None = None, cell: str | None = None) -> Baseline:
    """Read and validate one baseline file.

    ``suite`` and ``cell`` (a ``-k`` fragment) only improve the regeneration hint in errors;
    by default the model and benchmark come from the path.
    """
    path = Path(path)
    source = str(path)
    model_guess, bench_guess = path.parent.name, path.stem
    where = (model_guess, bench_guess, suite, cell)
    if not path.exists():
        raise stale(source, f"no FP baseline for model {model_guess!r} on benchmark {bench_guess!r}", *where,
                    verb="generate")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise stale(source, f"cannot read baseline ({_one_line(exc)})", *where) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise stale(source, f"corrupt baseline, not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})",
                    *where) from None
    _validate(data, source, model_guess, bench_guess, suite, cell)
    return Baseline(
        model=data["model"],
        benchmark=data["benchmark"],
        task=data["task"],
        accuracy=float(data["accuracy"]),
        n=data["n"],
        items=data["items"],
        provenance=data["provenance"],
        schema=data["schema"],
        source=source,
    )


# --------------------------------------------------------------------------- validation


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _show(value: Any, limit: int = 60) -> str:
    text = _one_line(json.dumps(value, default=str) if not isinstance(value, str) else repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


_MISSING = object()


def _validate(data: Any, source: str, model: str | None, benchmark: str | None, suite: str | None,
              cell: str | None) -> None:
    def fail(key: str, problem: str, value: Any = _MISSING) -> None:
        got = "nothing" if value is _MISSING else _show(value)
        raise stale(source, f"{key}: {problem} (got {got})", model, benchmark, suite, cell)

    if not isinstance(data, dict):
        fail("(top level)", "must be a JSON object", data)
    schema = data.get("schema", _MISSING)
    if schema is _MISSING:
        fail("schema", "missing required field")
    if schema != SCHEMA:
        fail("schema", f"unsupported baseline schema, expected {SCHEMA}", schema)
    checks = (
        ("model", lambda v: isinstance(v, str) and v, "must be a non-empty string"),
        ("benchmark", lambda v: isinstance(v, str) and v, "must be a non-empty string"),
        ("task", lambda v: isinstance(v, str) and v, "must be a non-empty string"),
        ("accuracy", lambda v: _is_num(v) and 0 <= v <= 1, "must be a number in [0, 1]"),
        ("n", lambda v: _is_int(v) and v >= 0, "must be a non-negative integer"),
        ("items", lambda v: isinstance(v, dict), "must be an object mapping item ids to results"),
        ("provenance", lambda v: isinstance(v, dict), "must be an object"),
    )
    for key, ok, problem in checks:
        value = data.get(key, _MISSING)
        if value is _MISSING:
            fail(key, "missing required field")
        if not ok(value):
            fail(key, problem, value)
    for item_id, item in data["items"].items():
        key = f"items[{item_id!r}]"
        if not isinstance(item, dict):
            fail(key, "must be an object", item)
        for name, ok, problem in (
            ("correct", lambda v: isinstance(v, bool), "must be true or false"),
            ("extracted", lambda v: v is None or isinstance(v, str), "must be a string or null"),
            ("response", lambda v: isinstance(v, str), "must be a string"),
            ("doc_index", lambda v: v is _MISSING or (_is_int(v) and v >= 0), "must be a non-negative integer"),
            ("prompt_sha256", lambda v: v is _MISSING or isinstance(v, str), "must be a string"),
            ("gold", lambda v: v is _MISSING or isinstance(v, str), "must be a string"),
        ):
            value = item.get(name, _MISSING)
            if value is _MISSING and name not in ("doc_index", "prompt_sha256", "gold"):
                fail(f"{key}.{name}", "missing required field")
            if not ok(value):
                fail(f"{key}.{name}", problem, value)
        samples = item.get("samples", _MISSING)
        if samples is not _MISSING:
            if (not isinstance(samples, list) or not samples
                    or not all(isinstance(x, dict) and isinstance(x.get("correct"), bool) for x in samples)):
                fail(f"{key}.samples", "must be a non-empty list of objects with correct: true or false", samples)
            k = len(next(iter(data["items"].values())).get("samples") or [None])
            if len(samples) != k:
                fail(f"{key}.samples", f"has {len(samples)} answers, the first item {k}", len(samples))
    if data["n"] != len(data["items"]):
        fail("n", f"does not match the {len(data['items'])} items", data["n"])
    if data["n"]:
        expected = items_accuracy(data["items"].values())
        if abs(data["accuracy"] - expected) > 1e-9:
            fail("accuracy", f"does not match the items ({expected:.6g})", data["accuracy"])
    prov = data["provenance"]
    for name, ok, problem in (
        ("model_fingerprint", lambda v: isinstance(v, str) and v, "must be a non-empty string"),
        ("data_sha256", lambda v: isinstance(v, str) and v, "must be a non-empty string"),
        ("prompt_sha256", lambda v: isinstance(v, str) and v, "must be a non-empty string"),
        ("generation", lambda v: isinstance(v, dict), "must be an object"),
        ("limit", lambda v: v is None or (_is_int(v) and v > 0), "must be a positive integer or null"),
        ("seed", _is_int, "must be an integer"),
        ("libraries", lambda v: isinstance(v, dict), "must be an object of name: version"),
        ("created", lambda v: isinstance(v, str) and v, "must be an ISO time string"),
    ):
        value = prov.get(name, _MISSING)
        if value is _MISSING:
            fail(f"provenance.{name}", "missing required field")
        if not ok(value):
            fail(f"provenance.{name}", problem, value)


# --------------------------------------------------------------------------- comparisons


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 16 and all(ch in "0123456789abcdef:" for ch in value.lower()):
        return value[:12] + "…"
    return _show(value)


def check_provenance(baseline: Baseline, expected: Mapping[str, Any]) -> list[str]:
    """One line per mismatching field among :data:`PROVENANCE_CHECKED` (those present in
    ``expected``); ``generation`` is compared key by key.  Empty: comparable."""
    prov = baseline.provenance
    lines: list[str] = []
    for name in PROVENANCE_CHECKED:
        if name not in expected:
            continue
        have, want = prov.get(name, PROVENANCE_DEFAULTS.get(name)), expected[name]
        if name == "generation" and isinstance(have, dict) and isinstance(want, dict):
            for key in sorted(set(have) | set(want)):
                old, new = have.get(key, _MISSING), want.get(key, _MISSING)
                if old != new:
                    old_s = "unset" if old is _MISSING else _show(old)
                    new_s = "unset" if new is _MISSING else _show(new)
                    lines.append(
                        f"generation.{key}: baseline {old_s}, current run {new_s} ({_CAUSES[name]})"
                    )
        elif have != want:
            lines.append(f"{name}: baseline {_short(have)}, current run {_short(want)} ({_CAUSES[name]})")
    return lines


def check_items(baseline: Baseline, task: str, expected: Iterable[Any]) -> list[str]:
    """What no longer matches between a baseline and the items its cell will ask for, before
    any generation. ``expected`` are :class:`~pytest_qmr.measure.ExpectedItem` (``item_id``,
    ``doc_index``, ``prompt``, ``gold``) for the baseline's doc indices. Checked: the task, each
    item's id at its doc index, its prompt hash and gold (where the baseline has them), and the
    provenance's whole-set ``data_sha256`` / ``prompt_sha256``. Empty: the baseline describes
    the cell. Each line names the field, the baseline's value and the current one."""
    if baseline.task != task:
        return [f"task: baseline {baseline.task!r}, current run {task!r} (the benchmark's task changed)"]
    lines: list[str] = []
    by_index = {int(item.get("doc_index", -1)): item_id for item_id, item in baseline.items.items()}
    expected = list(expected)
    for exp in expected:
        have_id = by_index.get(exp.doc_index)
        if have_id is not None and have_id != exp.item_id:
            lines.append(f"items[{have_id!r}]: doc {exp.doc_index} is now item {exp.item_id!r} "
                         f"({_CAUSES['data_sha256']})")
            continue
        item = baseline.items.get(exp.item_id)
        if item is None:
            continue
        if "prompt_sha256" in item and item["prompt_sha256"] != sha256_text(exp.prompt):
            lines.append(f"items[{exp.item_id!r}].prompt_sha256: baseline {_short(item['prompt_sha256'])}, "
                         f"current run {_short(sha256_text(exp.prompt))} ({_CAUSES['prompt_sha256']})")
        if "gold" in item and item["gold"] != exp.gold:
            lines.append(f"items[{exp.item_id!r}].gold: baseline {_show(item['gold'])}, current run "
                         f"{_show(exp.gold)} ({_CAUSES['data_sha256']})")
    found = {exp.item_id for exp in expected}
    missing = sorted(set(baseline.items) - found)
    if missing:
        lines.append(f"items[{missing[0]!r}]: not in task {task} any more ({len(missing)} items; "
                     f"{_CAUSES['data_sha256']})")
    if not lines and len(found) == len(baseline.items):
        from .measure import items_fingerprint

        for name, value in items_fingerprint(expected).items():
            if baseline.provenance.get(name) != value:
                lines.append(f"provenance.{name}: baseline {_short(baseline.provenance.get(name))}, current run "
                             f"{_short(value)} ({_CAUSES[name]})")
    return lines


def library_drift(baseline: Baseline, current: Mapping[str, str]) -> list[str]:
    """Warnings (not errors) for library versions that differ from the baseline's."""
    recorded = baseline.provenance.get("libraries") or {}
    lines = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"{name}: not recorded in the baseline, current run {new}")
        elif new is None:
            lines.append(f"{name}: baseline {old}, not recorded in the current run")
        else:
            lines.append(f"{name}: baseline {old}, current run {new}")
    return lines


def paired_vectors(
    baseline: Baseline,
    item_ids: list[str],
    quant_correct: Mapping[str, bool],
    *,
    suite: str | None = None,
    cell: str | None = None,
) -> tuple[list[bool], list[bool]]:
    """FP and quantized correctness for ``item_ids``, aligned in that order."""
    missing = [i for i in item_ids if i not in baseline.items]
    if missing:
        source = baseline.source or str(baseline_path("<baselines>", baseline.model, baseline.benchmark))
        raise stale(source, f"{len(missing)} of {len(item_ids)} requested items are not in the FP baseline "
                    f"for model {baseline.model!r} on benchmark {baseline.benchmark!r} (first: {missing[0]!r}; "
                    f"the baseline has {baseline.n} items)", baseline.model, baseline.benchmark, suite, cell)
    absent = [i for i in item_ids if i not in quant_correct]
    if absent:
        raise ValueError(
            f"{len(absent)} of {len(item_ids)} requested items have no quantized result (first: {absent[0]!r})"
        )
    fp = [bool(baseline.items[i]["correct"]) for i in item_ids]
    quant = [bool(quant_correct[i]) for i in item_ids]
    return fp, quant
