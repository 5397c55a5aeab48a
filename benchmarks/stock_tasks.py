"""Which stock lm-eval math tasks run as cells offline, on the local data copies.

    python benchmarks/stock_tasks.py              # FP lab model, 5 items per task
    python benchmarks/stock_tasks.py --limit 20

For each stock task it writes the user YAML of README's "Bring your own benchmark" recipe
(``include:`` the stock file as it ships, point ``dataset_path``/``dataset_kwargs`` at a file under
``../shared/data``, override fields only where the local copy names them differently), indexes
that folder as a suite's ``tasks:`` would, and measures the embedded FP lab model on it through the
cell's evaluator (``pytest_qmr.measure.Evaluator``: chat template, greedy). A task "runs" when it
yields one 0/1 record per item and each prompt carries the item's question (checked, so that a
prompt template that lost its question cannot count as running).

Writes ``benchmarks/results/stock_tasks.json`` (keys: ``tasks``: list of ``task``, ``variant``,
``data``, ``runs``, ``n``, ``accuracy``, ``seconds``, ``problem``; ``limit``, ``machine``) and the
table between the markers in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_qmr.fsutil import atomic_write_json, write_marked

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- stock-tasks:begin -->", "<!-- stock-tasks:end -->"


@dataclass(frozen=True)
class StockCase:
    task: str  # the stock lm-eval task
    include: str  # its YAML, relative to lm_eval/tasks
    data: dict  # split -> file under the data dir (a ".csv" MMLU file is converted to JSONL first)
    question_field: str  # the doc field whose text every prompt must contain
    overrides: str = ""  # YAML lines added when the local copy names fields differently
    variant: str = "as shipped"


CASES = [
    StockCase("gsm8k", "gsm8k/gsm8k.yaml", {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}, "question",
              "dataset_name: null\n"),
    StockCase("gsm8k_cot", "gsm8k/gsm8k-cot.yaml", {"test": "gsm8k/test.jsonl"}, "question", "dataset_name: null\n"),
    StockCase("gsm8k_cot_zeroshot", "gsm8k/gsm8k-cot-zeroshot.yaml",
              {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}, "question", "dataset_name: null\n"),
    StockCase("minerva_math500", "minerva_math/minerva_math500.yaml", {"test": "math500/test.jsonl"}, "problem",
              "dataset_name: null\n"),
    StockCase("aime24", "aime/aime24.yaml", {"train": "aime24/test.jsonl"}, "problem"),
    StockCase("aime24", "aime/aime24.yaml", {"train": "aime24/test.jsonl"}, "problem",
              'doc_to_text: "Question: {{problem}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n',
              variant="fields mapped (problem, answer)"),
    StockCase("mmlu_abstract_algebra", "mmlu/default/_default_template_yaml",
              {"test": "mmlu/test/abstract_algebra_test.csv", "dev": "mmlu/dev/abstract_algebra_dev.csv"},
              "question", "dataset_name: null\n", variant="MMLU template, CSV converted to JSONL"),
]


def lm_eval_tasks() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def mmlu_jsonl(src: Path, dst: Path) -> Path:
    with src.open(encoding="utf-8", newline="") as fh:
        rows = [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in csv.reader(fh)]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return dst


def write_case(case: StockCase, index: int, folder: Path, data_dir: Path) -> str:
    """The user YAML for ``case``; returns the name of the task it defines."""
    files = {}
    for split, rel in case.data.items():
        src = data_dir / rel
        files[split] = str(mmlu_jsonl(src, folder / f"{index}_{split}.jsonl") if src.suffix == ".csv" else src)
    name = f"local_{case.task}_{index}"
    data_files = ", ".join(f"{split}: {json.dumps(path)}" for split, path in files.items())
    text = (f"include: {lm_eval_tasks() / case.include}\ntask: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files: {{{data_files}}}\n{case.overrides}")
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return name


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())[:200]


def measure(case: StockCase, name: str, folder: Path, data_dir: Path, model, tokenizer, limit: int,
            max_new_tokens: int) -> dict:
    from pytest_qmr.measure import Evaluator, GenerationSettings, TaskSource

    row = {"task": case.task, "variant": case.variant, "data": ", ".join(case.data.values()), "runs": False,
           "n": 0, "accuracy": None, "seconds": None, "problem": None}
    started = time.monotonic()
    try:
        evaluator = Evaluator(model, tokenizer, GenerationSettings(max_new_tokens, batch_size=limit), data_dir,
                              source=TaskSource(paths=(folder,)))
        records = evaluator.run(name, limit=limit)
    except Exception as exc:  # noqa: BLE001 - this script measures what breaks: the reason is the result
        row["problem"] = first_line(exc)
        return row
    row["seconds"] = round(time.monotonic() - started, 1)
    row["n"] = len(records)
    row["accuracy"] = round(sum(r.correct for r in records) / max(len(records), 1), 3)
    questions = _questions(case, data_dir, len(records))
    missing = [r.doc_index for r, q in zip(records, questions, strict=False) if q[:40] not in r.prompt]
    if missing:
        row["problem"] = f"{len(missing)} of {len(records)} prompts lack the item's {case.question_field!r}"
    row["runs"] = not missing and len(records) == limit
    return row


def _questions(case: StockCase, data_dir: Path, n: int) -> list[str]:
    split = "test" if "test" in case.data else next(iter(case.data))
    src = data_dir / case.data[split]
    if src.suffix == ".csv":
        with src.open(encoding="utf-8", newline="") as fh:
            return [r[0].strip() for r in csv.reader(fh)][:n]
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(r[case.question_field]).strip() for r in rows[:n]]


def table(rows: list[dict]) -> str:
    lines = ["| stock task | variant | local data | runs offline | items | FP acc | seconds | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"| `{r['task']}` | {r['variant']} | `{r['data']}` | {'yes' if r['runs'] else 'no'} | {r['n']} | "
                     f"{acc} | {r['seconds'] or ''} | {r['problem'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--data-dir",
                        default=os.environ.get("QMR_DATA_DIR", str(HERE.parent.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(HERE / "results" / "stock_tasks.json"))
    args = parser.parse_args(argv)

    from pytest_qmr import models

    data_dir = Path(args.data_dir).resolve()
    fp = models.resolve("embedded:smollm2-135m-arith")
    model, tokenizer = models.load(fp.path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [write_case(case, i, folder, data_dir) for i, case in enumerate(CASES)]
        for i, (case, name) in enumerate(zip(CASES, names, strict=True), 1):
            print(f"[{i}/{len(CASES)}] {case.task} ({case.variant})", file=sys.stderr, flush=True)
            rows.append(measure(case, name, folder, data_dir, model, tokenizer, args.limit, args.max_new_tokens))
            print(f"    {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    result = {"tasks": rows, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
              "model": "embedded:smollm2-135m-arith",
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(Path(args.out), result)
    readme = HERE / "README.md"
    write_marked(readme, BEGIN, END, table(rows), preamble=(
        "## Stock lm-eval math tasks, offline\n\n`stock_tasks.py` runs each stock task through the user-YAML recipe "
        "of the main README (\"Bring your own benchmark\") on the local data copies, FP lab model, "
        f"{args.limit} items, greedy, {args.max_new_tokens} new tokens:\n\n"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
