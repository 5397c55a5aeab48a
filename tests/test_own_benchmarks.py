"""Bring your own benchmark: a user's task folder of plain lm-eval YAML, a stock lm-eval task
pointed at local files, and a log-likelihood task, each a cell with a baseline and a verdict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

MODEL = "smollm2-135m-arith"

# A task that knows nothing of pytest-qmr: data, prompt, target, generation, metric.
PLAIN_TASK = """\
task: plain_arith
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "Solve the problem step by step. Write each step as 'Step k: <calculation>' and finish with \
'The answer is <number>.'\\n\\n{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  do_sample: false
filter_list:
  - name: final-answer
    filter:
      - {{function: regex, regex_pattern: "The answer is (-?[0-9]+)"}}
      - {{function: take_first}}
metric_list:
  - metric: exact_match
"""

# A stock lm-eval task file, included as it ships, with its dataset pointed at local files: lm-eval's
# MMLU template (multiple choice, scored by log-likelihood) over our MMLU copy, and stock
# gsm8k_cot_zeroshot over the local GSM8K copy.
LOCAL_STOCK_TASK = """\
include: {include}
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files: {{{files}}}
"""


def _local_stock_task(include: Path, task: str, **files: Path) -> str:
    return LOCAL_STOCK_TASK.format(include=include, task=task,
                                   files=", ".join(f"{split}: {path}" for split, path in files.items()))


SUITE = """\
name: own
data_dir: {data_dir}
tasks: [my_tasks]
models:
  - {{name: {model}, ref: embedded:{model}}}
quantizers:
  - {{name: fp, method: fp}}
  - {{name: rtn-w4g64, method: rtn, bits: 4, group_size: 64, expect_fail_on: [plain]}}
benchmarks:
  - {{name: plain, task: plain_arith, limit: 12, seed: 0}}
  - {{name: mc, task: local_abstract_algebra, limit: 8, seed: 0, metric: acc}}
  - {{name: stock, task: gsm8k_cot_zeroshot_local, limit: 3, seed: 0, quantizers: [fp]}}
thresholds: {{max_abs_drop: 0.10, max_rel_drop: 0.15, alpha: 0.05, min_items: 3, sequential: false}}
generation: {{max_new_tokens: 96, batch_size: 12}}
locate: {{judges: [rule]}}
restore: {{when: on-fail, quantizers: [rtn-w4g64], benchmarks: [plain]}}
"""


def _lm_eval_tasks() -> Path:
    """lm-eval's stock task folder, found without importing lm-eval (pytester's module snapshot
    would drop numpy again after the test, and numpy cannot be imported twice)."""
    import importlib.util

    return Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


def _mmlu_jsonl(src: Path, dst: Path, n: int) -> Path:
    with src.open(encoding="utf-8", newline="") as fh:
        rows = [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in csv.reader(fh)][:n]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return dst


def make_task_folder(root: Path, data_dir: Path) -> Path:
    """``root/my_tasks``: the three user YAMLs and the JSONL files they read."""
    from pytest_qmr import arith

    folder = root / "my_tasks"
    folder.mkdir()
    problems = arith.generate("test", 12, seed=7)
    plain = folder / "arith.jsonl"
    plain.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems),
                     encoding="utf-8")
    (folder / "plain_arith.yaml").write_text(PLAIN_TASK.format(data=plain), encoding="utf-8")
    mmlu = data_dir / "mmlu"
    test = _mmlu_jsonl(mmlu / "test" / "abstract_algebra_test.csv", folder / "mmlu_test.jsonl", 8)
    dev = _mmlu_jsonl(mmlu / "dev" / "abstract_algebra_dev.csv", folder / "mmlu_dev.jsonl", 5)
    (folder / "local_mmlu.yaml").write_text(_local_stock_task(
        _lm_eval_tasks() / "mmlu" / "default" / "_default_template_yaml", "local_abstract_algebra", test=test, dev=dev),
        encoding="utf-8")
    (folder / "stock_gsm8k.yaml").write_text(_local_stock_task(
        _lm_eval_tasks() / "gsm8k" / "gsm8k-cot-zeroshot.yaml", "gsm8k_cot_zeroshot_local",
        test=data_dir / "gsm8k" / "test.jsonl", train=data_dir / "gsm8k" / "train.jsonl"), encoding="utf-8")
    return folder


def _samples(run_dir: Path, cell: str) -> list[dict]:
    text = (run_dir / "cells" / f"{MODEL}-{cell}" / "samples.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_user_task_folder_stock_task_and_loglikelihood_task_gate_as_cells(pytester, data_dir, cache_dir, lab_model,
                                                                          tmp_path):
    make_task_folder(pytester.path, data_dir)
    suite = pytester.makefile(".yaml", own=SUITE.format(data_dir=data_dir, model=MODEL))
    baselines, run_dir = tmp_path / "baselines", tmp_path / "run"

    def run(*extra: str):
        return pytester.runpytest_subprocess(str(suite), f"--qmr-baselines={baselines}", f"--qmr-run-dir={run_dir}",
                                             f"--qmr-cache-dir={cache_dir}", "-p", "no:cacheprovider", "-rA", *extra)

    first = run("--qmr-update-baselines")
    first.assert_outcomes(passed=4, xfailed=1)  # gated against the baselines it writes: the same verdicts
    for bench in ("plain", "mc", "stock"):
        baseline = json.loads((baselines / MODEL / f"{bench}.json").read_text(encoding="utf-8"))
        assert baseline["provenance"]["model_fingerprint"] and all(k.startswith("doc-") for k in baseline["items"])
    assert json.loads((baselines / MODEL / "mc.json").read_text())["provenance"]["scoring"] == {
        "metric": "acc", "filter": None}

    # gated against the baselines just written: FP reproduces them item for item
    second = run(f"--qmr-report={tmp_path / 'report'}")
    second.assert_outcomes(passed=4, xfailed=1)  # RTN-W4 regresses on the plain task (8 of 12 lost here)
    results = {c["benchmark"] + "/" + c["quantizer"]: c
               for c in json.loads((run_dir / "results.json").read_text())["cells"]}
    assert {k: v["gate"]["verdict"] for k, v in results.items() if k.endswith("/fp")} == {
        "plain/fp": "pass", "mc/fp": "pass", "stock/fp": "pass"}, second.stdout.str()[-3000:]

    # plain generate_until task: the item is right exactly when the task's filter output is the target
    plain = _samples(run_dir, "fp-plain")
    assert len(plain) == 12 and all(r["correct"] == (r["extracted"] == r["gold"]) for r in plain)
    assert results["plain/fp"]["accuracy"] >= 0.25  # the lab model does this arithmetic (0.69 on qmr_arith)
    rtn = results["plain/rtn-w4g64"]
    assert rtn["gate"]["n"] == 12 and rtn["gate"]["verdict"] == "fail" and rtn["gate"]["fp_only"] > 0
    assert rtn["error_profile"]["n"] == rtn["gate"]["fp_only"]  # Locate ran on the foreign task's regressions
    # Restore needs a training split with step-aligned gold: it says why not, the verdict stands
    assert rtn["restore"]["error"].startswith("restore: task plain_arith has no training split")

    # log-likelihood task: the chosen choice is the one of highest log-likelihood; acc gates it
    mc = _samples(run_dir, "fp-mc")
    assert len(mc) == 8 and {r["gold"] for r in mc} <= set("ABCD")
    assert all(r["correct"] == (r["response"] == r["gold"]) for r in mc)
    assert all("\nD. " in r["prompt"] and "\nAnswer:" in r["prompt"] for r in mc)  # the stock template's prompt
    assert results["mc/rtn-w4g64"]["error_profile"] is None
    assert any("locate: not run, task local_abstract_algebra is scored by log-likelihood" in n
               for n in results["mc/rtn-w4g64"]["notes"])

    report = {c["cell_id"]: c for c in json.loads((tmp_path / "report" / "report.json").read_text())["cells"]}
    assert any(n.startswith("locate: not run") for n in report[f"{MODEL}-rtn-w4g64-mc"]["notes"])

    # a baseline records the metric it was scored with: another one asks for a regeneration, before generating
    suite.write_text(suite.read_text().replace("metric: acc}", "metric: acc_norm}"))
    third = run("-k", "fp-mc")
    third.assert_outcomes(failed=1)
    third.stdout.fnmatch_lines([("*mc.json: baseline no longer describes the cell (scoring: baseline *\"acc\"*, "
                                 "current run *\"acc_norm\"* (the benchmark's metric or filter changed)); "
                                 "regenerate it with: *")])

    # stock task, offline: its own prompt and filter
    stock = _samples(run_dir, "fp-stock")
    assert len(stock) == 3 and all("Let's think step by step." in r["prompt"] for r in stock)
    assert "Traceback" not in second.stdout.str()


def _collect(pytester, *args):
    return pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", *args)


def test_unknown_task_in_a_user_folder_and_a_missing_folder_fail_collection_in_one_line(pytester, data_dir):
    make_task_folder(pytester.path, data_dir)
    text = SUITE.format(data_dir=data_dir, model=MODEL)
    suite = pytester.makefile(".yaml", own=text.replace("task: plain_arith", "task: plain_arihm"))
    result = _collect(pytester, str(suite))
    assert result.ret != 0
    result.stdout.fnmatch_lines([(f"*{suite}: benchmarks[[]0].task: unknown lm-eval task, did you mean "
                                  "'plain_arith'? (got 'plain_arihm')")])
    assert "Traceback" not in result.stdout.str()

    suite.write_text(text.replace("tasks: [my_tasks]", "tasks: [my_taks]"))
    result = _collect(pytester, str(suite))
    result.stdout.fnmatch_lines([f"*{suite}: tasks[[]0]: no such lm-eval task folder (*my_taks) (got 'my_taks')"])
    assert "Traceback" not in result.stdout.str()

    # --qmr-tasks adds a folder from the command line
    suite.write_text(text.replace("tasks: [my_tasks]\n", ""))
    assert _collect(pytester, str(suite)).ret != 0
    result = _collect(pytester, str(suite), f"--qmr-tasks={pytester.path / 'my_tasks'}")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines([f"*{MODEL}-fp-plain", f"*{MODEL}-rtn-w4g64-mc"])


def test_include_defaults_opens_lm_evals_stock_tasks():
    from pytest_qmr.errors import TaskError
    from pytest_qmr.measure import TaskSource, check_task, known_tasks

    stock = known_tasks(TaskSource(include_defaults=True))
    for name in ("gsm8k_cot", "gsm8k_cot_zeroshot", "minerva_math500", "mmlu_abstract_algebra", "qmr_arith"):
        assert name in stock
    with pytest.raises(TaskError, match=r"^x.yaml: benchmarks\[0\].task: unknown lm-eval task, did you mean "
                                        r"'gsm8k_cot'\? \(got 'gsm8k_cott'\)$"):
        check_task("gsm8k_cott", "x.yaml: benchmarks[0].task", stock)
    with pytest.raises(TaskError):  # without include_defaults only our tasks are known
        check_task("gsm8k_cot", "x.yaml: benchmarks[0].task", known_tasks())


def _sample(**metrics) -> dict:
    return {"doc_id": 0, "doc": {"q": "1+1?", "a": "2"}, "target": "2", "arguments": [("Q: 1+1?", {})],
            "resps": [["2"]], "filtered_resps": ["2"], "filter": "none", "metrics": list(metrics), **metrics}


def test_a_metric_that_is_not_a_per_item_0_1_score_is_one_line():
    from pytest_qmr.errors import TaskError
    from pytest_qmr.measure import Scoring, record_from_sample

    record = record_from_sample(_sample(exact_match=1.0), "generate_until", Scoring(), "t")
    assert record.correct and record.item_id.startswith("doc-") and record.gold == "2" and record.extracted == "2"
    assert record_from_sample(_sample(exact_match=1.0), "generate_until", Scoring(), "t").item_id == record.item_id
    with pytest.raises(TaskError, match=r"^s.yaml: benchmarks\[1\].metric: task t's 'bleu' is not a per-item 0/1 "
                                        r"score, the gate pairs items by correctness \(got 0.37\)$"):
        record_from_sample(_sample(bleu=0.37), "generate_until", Scoring(metric="bleu", where="s.yaml: benchmarks[1]"),
                           "t")
    with pytest.raises(TaskError, match=r"metric: task t has no per-item metric 'acc' \(it has: exact_match\)$"):
        record_from_sample(_sample(exact_match=0), "generate_until", Scoring(metric="acc"), "t")


def test_answer_kind_lets_our_extractor_read_a_foreign_tasks_response():
    from pytest_qmr.errors import TaskError
    from pytest_qmr.measure import Scoring, record_from_sample

    sample = {**_sample(exact_match=0.0), "resps": [["Step 1: 1 + 1 = 2\nThe answer is 2."]],
              "filtered_resps": ["[invalid]"]}
    assert record_from_sample(sample, "generate_until", Scoring(), "t").extracted == "[invalid]"  # the task's filter
    record = record_from_sample(sample, "generate_until", Scoring(answer_kind="number"), "t")
    assert record.extracted == "2" and record.correct is False  # correctness stays the task's own metric
    judged = record_from_sample(sample, "generate_until", Scoring(metric="answer", answer_kind="number"), "t")
    assert judged.extracted == "2" and judged.correct is True  # metric: answer -> our answer checker
    with pytest.raises(TaskError, match=r"metric: 'answer' needs a generate_until task and the benchmark's "
                                        r"answer_kind \(task t: generate_until, answer_kind None\)$"):
        record_from_sample(sample, "generate_until", Scoring(metric="answer"), "t")
