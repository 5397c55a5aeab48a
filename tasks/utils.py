"""Glue for the qmr_* lm-eval tasks: data loaders, prompts, scoring, reading results back.

The YAML files next to this module name these functions with ``!function utils.<name>``.
Loaders are lm-eval ``custom_dataset`` callables: lm-eval calls them with the task's whole
``metadata`` dict (the YAML's, merged with ``TaskManager(metadata=...)`` / ``simple_evaluate(
metadata=...)`` and, in simple_evaluate, the model args), so each accepts ``**_`` and reads
only its own keys:

- ``data_dir``: root of the local benchmark copies (``gsm8k/test.jsonl``, ``math500/test.jsonl``,
  ...); else the ``QMR_DATA_DIR`` environment variable; else, or where the file is absent,
  the hub dataset (online users).
- ``arith_n`` (default 500) and ``arith_seed`` (default 0): size and seed of ``qmr_arith``.
- ``qmr_splits`` (``qmr_gsm8k``): only these splits, comma-separated (``train``): the training
  split is read without the test file (:mod:`pytest_qmr.splits`: Restore's problems, calibration).

Every doc carries ``qmr_id`` (stable across runs and machines), ``qmr_gold`` (the gold answer
as a string), ``qmr_kind`` (the ``pytest_qmr.answers`` kind) and ``qmr_question``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets

from pytest_qmr.errors import QmrError
from pytest_qmr import answers, arith
from pytest_qmr.fsutil import DATA_DIR_ENV, data_root

CHOICE_LETTERS = "ABCD"

# One instruction for the whole project (arith.INSTRUCTION); MATH-style answers are LaTeX, so
# their variant asks for the answer in \boxed{}, which answers.extract_answer reads first.
if "'The answer is <number>.'" not in arith.INSTRUCTION:
    raise RuntimeError("pytest_qmr.arith.INSTRUCTION changed; update tasks/utils.py prompt variants")
LATEX_INSTRUCTION = arith.INSTRUCTION.replace("'The answer is <number>.'", "'The answer is \\boxed{<answer>}.'")
CHOICE_INSTRUCTION = "Answer with the letter of the correct choice. Finish with 'The answer is <letter>.'"

logger = logging.getLogger(__name__)


class DataError(QmrError, RuntimeError):
    """A benchmark file is missing or unreadable; the message is one line naming the file."""


# --------------------------------------------------------------------------- prompts


def build_prompt(question: str, kind: str, choices: Sequence[str] | None = None) -> str:
    """The user turn for a question of answer ``kind``; the same text for training and eval."""
    if kind == "number":
        return arith.prompt(question)
    if kind == "latex":
        return f"{LATEX_INSTRUCTION}\n\n{question}"
    if kind == "choice":
        if not choices or len(choices) > len(CHOICE_LETTERS):
            raise ValueError(f"a choice question needs 1-{len(CHOICE_LETTERS)} choices, got {choices!r}")
        lines = "\n".join(f"{letter}. {text}" for letter, text in zip(CHOICE_LETTERS, choices, strict=False))
        return f"{question}\n\n{lines}\n\n{CHOICE_INSTRUCTION}"
    raise ValueError(f"unknown answer kind {kind!r}")


def doc_to_text(doc: dict) -> str:
    return build_prompt(doc["qmr_question"], doc["qmr_kind"], doc.get("choices"))


# --------------------------------------------------------------------------- scoring


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """exact_match 1/0 for one generation: extract the final answer, compare with the gold."""
    response = results[0] if results else ""
    pred = answers.extract_answer(response, doc["qmr_kind"])
    return {"exact_match": int(answers.is_equivalent(pred, doc["qmr_gold"], doc["qmr_kind"]))}


def logged_prompt(sample: dict) -> str:
    """The prompt (context) of a logged lm-eval sample, in either layout lm-eval writes."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):  # as EvaluationTracker saves it: {"gen_args_0": {"arg_0": ...}}
        return arguments["gen_args_0"]["arg_0"]
    return arguments[0][0]  # as simple_evaluate returns it: [(context, gen_kwargs)]


def read_sample(sample: dict) -> dict[str, Any]:
    """One entry of ``simple_evaluate(..., log_samples=True)["samples"][task]`` as the fields of
    ``pytest_qmr.records.SampleRecord``. ``correct`` is lm-eval's own per-sample exact_match;
    ``extracted`` re-runs the (deterministic) extraction process_results used."""
    doc = sample["doc"]
    response = sample["resps"][0][0] if sample.get("resps") else ""
    return {
        "item_id": doc["qmr_id"],
        "doc_index": int(sample["doc_id"]),
        "prompt": logged_prompt(sample),
        "response": response,
        "extracted": answers.extract_answer(response, doc["qmr_kind"]),
        "gold": doc["qmr_gold"],
        "correct": bool(sample["exact_match"]),
    }


# --------------------------------------------------------------------------- file reading


def _read_jsonl(path: Path, required: Iterable[str]) -> list[dict]:
    required = tuple(required)
    rows = []
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    except UnicodeDecodeError as err:  # the offset is the file's, as every reader here says it
        raise DataError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # only newlines end a row, as a text file reads
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{path}: line {lineno}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_mmlu_dir(folder: Path, suffix: str) -> list[dict]:
    """All subjects' CSVs (no header: question, A, B, C, D, answer letter), subject order."""
    files = sorted(folder.glob(f"*_{suffix}.csv"))
    if not files:
        raise DataError(f"{folder}: no *_{suffix}.csv files")
    rows = []
    for path in files:
        subject = path.name[: -len(f"_{suffix}.csv")]
        try:
            with path.open(encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh)
                for index, record in enumerate(reader):
                    if len(record) != 6 or record[5].strip() not in CHOICE_LETTERS:
                        raise DataError(f"{path}: line {reader.line_num}: expected 6 fields ending in A-D")
                    rows.append({"subject": subject, "index": index, "question": record[0],
                                 "choices": record[1:5], "answer": record[5].strip()})
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    return rows


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _load(
    name: str,
    data_dir: str | os.PathLike | None,
    local: dict[str, str],
    read_local: Callable[[Path], list[dict]],
    hub_id: str,
    read_hub: Callable[[], dict[str, list[dict]]],
    normalize: Callable[[list[dict]], list[dict]],
    splits: str | None = None,
) -> datasets.DatasetDict:
    """Local files when ``data_dir``/QMR_DATA_DIR has them, else the hub; normalized docs.
    ``splits`` (comma-separated): only those splits; the first of them (else ``test``) decides
    between the local files and the hub."""
    keep = [s for s in local if s in splits.split(",")] if splits else list(local)
    if not keep:
        raise DataError(f"{name}: no split {splits!r} (splits: {', '.join(local)})")
    anchor = "test" if "test" in keep else keep[0]
    root = data_root(data_dir)
    paths = {split: root / local[split] for split in keep} if root else {}
    if paths and paths[anchor].exists():
        raw = {split: read_local(path) for split, path in paths.items() if path.exists()}
    else:
        where = f"no local file {paths[anchor]}" if paths else f"no data_dir or ${DATA_DIR_ENV}"
        if paths:
            logger.warning("%s: %s; trying hub dataset %s", name, where, hub_id)
        try:
            raw = {split: rows for split, rows in read_hub().items() if not splits or split in keep}
        except Exception as err:  # noqa: BLE001 - turn any hub failure into one readable line
            raise DataError(f"{name}: {where}, and hub dataset {hub_id} failed ({_first_line(err)})") from None
    return datasets.DatasetDict({split: datasets.Dataset.from_list(normalize(rows)) for split, rows in raw.items()})


def _hub_splits(path: str, config: str | None = None, splits: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Hub splits as row lists; ``splits`` maps our split name to one or more hub splits ('a+b')."""
    loaded = datasets.load_dataset(path, config)
    out = {}
    for ours, theirs in (splits or {s: s for s in loaded}).items():
        out[ours] = [row for part in theirs.split("+") for row in loaded[part]]
    return out


# --------------------------------------------------------------------------- doc normalizers


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _dedupe_ids(docs: list[dict]) -> list[dict]:
    """Identical problems (MAWPS repeats some) keep one id each: the 2nd gets '~2', and so on."""
    seen: Counter[str] = Counter()
    for doc in docs:
        seen[doc["qmr_id"]] += 1
        if seen[doc["qmr_id"]] > 1:
            doc["qmr_id"] = f"{doc['qmr_id']}~{seen[doc['qmr_id']]}"
    return docs


def _number_text(value: Any) -> str:
    """A gold number as text: 43.0 -> '43', 0.6666666667 stays as written."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _qmr(doc: dict, qmr_id: str, question: str, gold: str, kind: str) -> dict:
    return {**doc, "qmr_id": qmr_id, "qmr_question": question, "qmr_gold": gold, "qmr_kind": kind}


def _gsm8k_docs(rows: list[dict]) -> list[dict]:
    return _dedupe_ids([
        _qmr(r, f"gsm8k-{_sha(r['question'])}", r["question"], answers.gsm8k_gold(r["answer"]), "number")
        for r in rows
    ])


def _math500_docs(rows: list[dict]) -> list[dict]:
    return [_qmr(r, r["unique_id"], r["problem"], str(r["answer"]), "latex") for r in rows]


def _aime24_docs(rows: list[dict]) -> list[dict]:
    keep = ("id", "problem", "solution", "answer")
    return [
        _qmr({k: str(r[k]) for k in keep}, f"aime24-{r['id']}", r["problem"], str(int(str(r["answer"]).strip())),
             "latex")
        for r in rows
    ]


def _mmlu_docs(rows: list[dict]) -> list[dict]:
    return [
        _qmr({k: r[k] for k in ("subject", "question", "choices", "answer")},
             f"mmlu-{r['subject']}-{r['index']}", r["question"], r["answer"], "choice")
        for r in rows
    ]


def _mawps_docs(rows: list[dict]) -> list[dict]:
    return _dedupe_ids([
        _qmr({"subset": r["subset"], "input": r["input"], "target": float(r["target"])},
             f"mawps-{r['subset']}-{_sha(r['input'])}", r["input"], _number_text(r["target"]), "number")
        for r in rows
    ])


def _svamp_question(row: dict) -> str:
    body = row["Body"].strip()
    return f"{body if body.endswith('.') else body + '.'} {row['Question'].strip()}"


def _svamp_docs(rows: list[dict]) -> list[dict]:
    keep = ("Body", "Question", "Equation", "Answer", "Type")
    return _dedupe_ids([
        _qmr({k: (float(r[k]) if k == "Answer" else str(r[k])) for k in keep},
             f"svamp-{_sha(_svamp_question(r))}", _svamp_question(r), _number_text(r["Answer"]), "number")
        for r in rows
    ])


def _arith_docs(problems: list[arith.ArithProblem]) -> list[dict]:
    return [_qmr(p.to_row(), p.id, p.question, str(p.answer), "number") for p in problems]


# --------------------------------------------------------------------------- loaders


def load_gsm8k(data_dir: str | None = None, qmr_splits: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _load(
        "qmr_gsm8k", data_dir, {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"},
        lambda p: _read_jsonl(p, ("question", "answer")),
        "openai/gsm8k", lambda: _hub_splits("openai/gsm8k", "main"), _gsm8k_docs, qmr_splits,
    )


def load_math500(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _load(
        "qmr_math500", data_dir, {"test": "math500/test.jsonl"},
        lambda p: _read_jsonl(p, ("problem", "answer", "unique_id")),
        "HuggingFaceH4/MATH-500", lambda: _hub_splits("HuggingFaceH4/MATH-500", splits={"test": "test"}),
        _math500_docs,
    )


def load_aime24(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _load(
        "qmr_aime24", data_dir, {"test": "aime24/test.jsonl"},
        lambda p: _read_jsonl(p, ("id", "problem", "answer")),
        "HuggingFaceH4/aime_2024", lambda: _hub_splits("HuggingFaceH4/aime_2024", splits={"test": "train"}),
        _aime24_docs,
    )


def _mmlu_hub() -> dict[str, list[dict]]:
    out = {}
    for ours, theirs in (("test", "test"), ("dev", "dev")):
        rows, counts = [], Counter()
        for r in datasets.load_dataset("cais/mmlu", "all", split=theirs):
            rows.append({"subject": r["subject"], "index": counts[r["subject"]], "question": r["question"],
                         "choices": list(r["choices"]), "answer": CHOICE_LETTERS[int(r["answer"])]})
            counts[r["subject"]] += 1
        out[ours] = rows
    return out


def load_mmlu(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _load(
        "qmr_mmlu", data_dir, {"test": "mmlu/test", "dev": "mmlu/dev"},
        lambda p: read_mmlu_dir(p, p.name), "cais/mmlu", _mmlu_hub, _mmlu_docs,
    )


MAWPS_SUBSETS = ("singleop", "addsub", "multiarith")


def _read_mawps(folder: Path) -> list[dict]:
    return [
        {**row, "subset": subset}
        for subset in MAWPS_SUBSETS
        for row in _read_jsonl(folder / f"{subset}.jsonl", ("input", "target"))
    ]


def _mawps_hub() -> dict[str, list[dict]]:
    files = {s: f"data/mawps/{s}.jsonl" for s in MAWPS_SUBSETS}
    loaded = datasets.load_dataset("HuggingFaceTB/math_tasks", data_files=files)
    return {"test": [{**row, "subset": s} for s in MAWPS_SUBSETS for row in loaded[s]]}


def load_mawps(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """MAWPS SingleOp + AddSub + MultiArith as one test split (``subset`` names the part)."""
    return _load(
        "qmr_mawps", data_dir, {"test": "mawps"},
        _read_mawps, "HuggingFaceTB/math_tasks", _mawps_hub, _mawps_docs,
    )


def load_svamp(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """All 1,000 SVAMP problems; the hub copy splits them 700/300, so it is rejoined."""
    return _load(
        "qmr_svamp", data_dir, {"test": "svamp/test.jsonl"},
        lambda p: _read_jsonl(p, ("Body", "Question", "Answer")),
        "ChilleD/SVAMP", lambda: _hub_splits("ChilleD/SVAMP", splits={"test": "train+test"}), _svamp_docs,
    )


@functools.lru_cache(maxsize=8)
def _arith_split(split: str, n: int, seed: int) -> tuple[dict, ...]:
    """The generated docs of one split (a pure function of its arguments: built once per process,
    since lm-eval loads a task's data on every evaluation call)."""
    return tuple(_arith_docs(arith.generate(split, n, seed)))


def load_arith(arith_n: int | str = 500, arith_seed: int | str = 0, **_: Any) -> datasets.DatasetDict:
    """qmr_arith is generated, never read: same (n, seed) -> same problems everywhere."""
    n, seed = int(arith_n), int(arith_seed)
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([dict(d) for d in _arith_split(split, n, seed)])
        for split in ("test", "train")
    })
