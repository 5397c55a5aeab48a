"""Teachers, Restore variants and training-problem sources come from registries
(``registry.TEACHERS``, ``registry.RESTORE_VARIANTS``, ``registry.PROBLEM_SOURCES``).

A teacher and a variant registered from this file — a gold teacher that writes only the final
answer line, and a variant that keeps only cases whose first faulty step is step 1 — are known to
the suite check (a typo gets a did-you-mean) and to ``qmr pairs``, and they run through a real
cell: the lab model under RTN-W3 fails, Restore mines the qmr_arith train split, and every row of
the cell's ``pairs.jsonl`` names them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import pytest

from pytest_qmr.registry import PROBLEM_SOURCES, RESTORE_VARIANTS, TEACHERS
from pytest_qmr.restore import GoldTeacher, RestoreError, Variant, build_pairs, make_teacher, training_problems
from pytest_qmr.suite import SuiteError, load_suite

TEACHER = "answer-only"
VARIANT = "first-only"

SUITE = """
name: restore-registry
data_dir: {data_dir}
models:
  - {{name: smollm2-135m-arith, ref: embedded:smollm2-135m-arith}}
quantizers:
  - {{name: rtn-w3g64, method: rtn, bits: 3, group_size: 64}}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: 8, seed: 0}}
thresholds: {{max_abs_drop: 0.10, max_rel_drop: 0.15, alpha: 0.05, min_items: 4, sequential: false}}
generation: {{max_new_tokens: 96, batch_size: 20}}
locate: {{enabled: false}}
restore: {{when: on-fail, teacher: {teacher}, variant: {variant}, train_problems: 8, train: {{max_steps: 2}}}}
"""


@dataclass
class AnswerOnly(GoldTeacher):
    """Continues every cut with the final answer line alone ("The answer is N.")."""

    def continue_many(self, cuts):
        return [f"The answer is {cut.gold_answer}." for cut in cuts]


@dataclass(frozen=True)
class FirstStepOnly(Variant):
    """Only the cases that go wrong at their very first step."""

    def keeps(self, row):
        return super().keeps(row) and int(row["first_error_step"]) == 1


@pytest.fixture
def registered():
    TEACHERS.add(TEACHER, AnswerOnly)
    RESTORE_VARIANTS.add(VARIANT, FirstStepOnly())
    try:
        yield
    finally:
        TEACHERS.remove(TEACHER)
        RESTORE_VARIANTS.remove(VARIANT)


def _suite(tmp_path, data_dir, teacher: str = TEACHER, variant: str = VARIANT):
    path = tmp_path / "restore.yaml"
    path.write_text(SUITE.format(data_dir=data_dir, teacher=teacher, variant=variant))
    return load_suite(path)


def _row(first_step: int, item: str, response: str) -> dict:
    return {"id": item, "prompt": "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "response": response,
            "gold_answer": "7", "first_error_step": first_step, "status": "accepted", "correct": False,
            "primary_error_type": "calculation_error", "category": "execution"}


def test_the_suite_knows_a_registered_teacher_and_variant(registered, tmp_path, data_dir):
    (cell,) = _suite(tmp_path, data_dir).cells()
    assert (cell.restore.teacher, cell.restore.variant) == (TEACHER, VARIANT)
    with pytest.raises(SuiteError) as exc:
        _suite(tmp_path, data_dir, variant="first-onyl")
    assert str(exc.value) == (f"{tmp_path / 'restore.yaml'}: restore.variant: unknown Restore variant "
                              "'first-onyl' (did you mean 'first-only'?) (got 'first-onyl')")
    with pytest.raises(SuiteError) as exc:
        _suite(tmp_path, data_dir, teacher="answer-onyl")
    assert str(exc.value).endswith("restore.teacher: unknown teacher 'answer-onyl' (did you mean 'answer-only'?) "
                                   "(got 'answer-onyl')")
    with pytest.raises(SuiteError, match=r"restore.teacher: must be gold, fp, endpoint:NAME \(NAME from "
                                         r"locate.judge_config\) or answer-only \(got 'answer-only:x'\)$"):
        _suite(tmp_path, data_dir, teacher="answer-only:x")


def test_unregistered_names_are_one_line_errors(tmp_path, data_dir):
    assert TEACHER not in TEACHERS and VARIANT not in RESTORE_VARIANTS
    with pytest.raises(SuiteError, match=r"restore.variant: unknown Restore variant 'first-only' \(known: "
                                         r"all-step, ce-step, me-step, ee-step, all-ns, rand-ns, rand-cut\) "
                                         r"\(got 'first-only'\)$"):
        _suite(tmp_path, data_dir, teacher="gold")
    with pytest.raises(RestoreError, match=r"^unknown teacher 'gld' \(did you mean 'gold'\?\)$"):
        make_teacher("gld")
    with pytest.raises(RestoreError, match=r"^unknown Restore variant 'al-step' \(did you mean 'all-step'\?\)$"):
        build_pairs([], GoldTeacher(), "al-step")
    with pytest.raises(RestoreError, match=r"^restore: task qmr_mmlu has no training split with step-aligned gold "
                                           r"\(supported: qmr_arith, qmr_gsm8k\)$"):
        training_problems("qmr_mmlu", 4)


def test_registered_teacher_and_variant_make_pairs(registered):
    rows = [_row(1, "arith-train-0", "Step 1: 3 + 5 = 9\nThe answer is 9."),
            _row(2, "arith-train-1", "Step 1: 3 + 4 = 7\nStep 2: 7 * 1 = 8\nThe answer is 8.")]
    teacher = make_teacher(TEACHER)
    assert isinstance(teacher, AnswerOnly) and teacher.name == TEACHER
    [pair] = build_pairs(rows, teacher, VARIANT)
    assert (pair.item_id, pair.first_step, pair.chosen, pair.teacher, pair.variant) == (
        "arith-train-0", 1, "The answer is 7.", TEACHER, VARIANT)
    assert [p.item_id for p in build_pairs(rows, teacher, "all-step")] == ["arith-train-0", "arith-train-1"]


def test_a_variant_registered_as_a_class_and_the_endpoint_teacher_by_name(tmp_path):
    @RESTORE_VARIANTS.register("execution-only")
    @dataclass(frozen=True)
    class ExecutionOnly(Variant):
        category: str | None = "execution"

    try:
        rows = [{**_row(1, "arith-train-1", "Step 1: 3 + 5 = 9\nThe answer is 9."), "category": "method"},
                _row(1, "arith-train-0", "Step 1: 3 + 5 = 9\nThe answer is 9.")]
        [pair] = build_pairs(rows, GoldTeacher({"arith-train-0": "Step 1: 3 + 4 = 7\nThe answer is 7."}),
                             "execution-only")
        assert (pair.variant, pair.category, pair.chosen) == ("execution-only", "execution",
                                                              "Step 1: 3 + 4 = 7\nThe answer is 7.")
    finally:
        RESTORE_VARIANTS.remove("execution-only")
    config = tmp_path / "judges.yaml"
    config.write_text(json.dumps({"judges": [{"name": "loop", "base_url": "http://127.0.0.1:9", "model": "m"}]}))
    teacher = make_teacher("endpoint:loop", judge_config=str(config))
    try:
        assert teacher.name == "endpoint:loop"
    finally:
        teacher.close()
    with pytest.raises(RestoreError, match=r"^teacher endpoint:loop needs --judge-config naming an endpoint 'loop'$"):
        make_teacher("endpoint:loop")
    with pytest.raises(RestoreError, match=r"^teacher endpoint:lop: no openai-kind endpoint 'lop' in "):
        make_teacher("endpoint:lop", judge_config=str(config))
    with pytest.raises(RestoreError, match=r"^teacher 'endpoint': expected endpoint:NAME$"):
        make_teacher("endpoint")
    with pytest.raises(RestoreError, match=r"^teacher 'gold:x': gold takes no argument \(expected gold\)$"):
        make_teacher("gold:x")
    with pytest.raises(RestoreError, match=r"^teacher fp needs the full-precision model \(--model\)$"):
        make_teacher("fp")


def test_a_registered_problem_source_serves_its_task():
    PROBLEM_SOURCES.add("my_arith", lambda n, seed, data_dir: training_problems("qmr_arith", n, seed))
    try:
        assert [p.id for p in training_problems("my_arith", 3, 0)] == [p.id for p in training_problems("qmr_arith", 3)]
    finally:
        PROBLEM_SOURCES.remove("my_arith")


def test_a_registered_teacher_and_variant_restore_a_real_cell(registered, tmp_path, data_dir, cache_dir, repo_root,
                                                               lab_model):
    from pytest_qmr.restore.cell import restore_cell
    from pytest_qmr.session import QmrSession

    (cell,) = _suite(tmp_path, data_dir).cells()
    session = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=repo_root / "baselines",
                         data_dir=data_dir, cache_dir=cache_dir)
    result = session.run_cell(cell, restore=functools.partial(restore_cell, session))

    assert result.outcome == "fail", result.gate
    assert result.restore is not None and "error" not in result.restore, result.restore
    assert (result.restore["teacher"], result.restore["variant"]) == (TEACHER, VARIANT)
    cell_dir = tmp_path / "run" / "cells" / cell.id
    rows = [json.loads(line) for line in (cell_dir / "pairs.jsonl").read_text().splitlines()]
    assert rows and result.restore["pairs"] == len(rows)
    gold = {p.id: p.gold_answer for p in training_problems("qmr_arith", 8, cell.benchmark.seed)}
    assert all(r["teacher"] == TEACHER and r["variant"] == VARIANT and r["first_step"] == 1
               and r["chosen"] == f"The answer is {gold[r['item_id']]}." for r in rows), rows
    card = json.loads((cell_dir / "adapter" / "qmr_card.json").read_text())
    assert card["teachers"] == {TEACHER: len(rows)} and card["variants"] == {VARIANT: len(rows)}
    assert result.restore["steps"] == 2 and result.restore["n_eval"] == 8
