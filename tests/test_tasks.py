"""The qmr_* lm-eval tasks load offline from the local data copies and score the way the project does."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# No hub at test time: set before lm_eval / datasets read their configuration.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from pytest_qmr import arith  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tasks"
TASK_NAMES = ["qmr_gsm8k", "qmr_math500", "qmr_aime24", "qmr_mmlu", "qmr_mawps", "qmr_svamp", "qmr_arith"]
# Rows in the local copies (the data README's MAWPS counts are `wc -l`, one short per file).
EXPECTED_TEST_DOCS = {
    "qmr_gsm8k": 1319,
    "qmr_math500": 500,
    "qmr_aime24": 30,
    "qmr_mmlu": 14042,
    "qmr_mawps": 562 + 395 + 600,
    "qmr_svamp": 1000,
    "qmr_arith": 500,
}


def _data_dir() -> Path | None:
    root = os.environ.get("QMR_DATA_DIR")
    path = Path(root) if root else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


DATA = _data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="benchmark data not found (../shared/data or $QMR_DATA_DIR)")


def _load_utils():
    """tasks/utils.py by path, as lm-eval loads it (installed, it is also pytest_qmr.tasks.utils)."""
    spec = importlib.util.spec_from_file_location("qmr_tasks_utils_under_test", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


utils = _load_utils()


@pytest.fixture(scope="module")
def tasks():
    from lm_eval.tasks import TaskManager

    if DATA is None:
        pytest.skip("benchmark data not found (../shared/data or $QMR_DATA_DIR)")
    # include_defaults=False: indexing lm-eval's ~200 built-in task folders costs ~20 s.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(DATA)})
    return manager.load(TASK_NAMES)["tasks"]


def _gold_response(doc: dict) -> str:
    gold = doc["qmr_gold"]
    if doc["qmr_kind"] == "latex":
        return f"Step 1: work.\nThe answer is \\boxed{{{gold}}}."
    if doc["qmr_kind"] == "choice":
        return f"Step 1: think.\nThe answer is ({gold})."
    return f"Step 1: 1 + 1 = 2\nThe answer is {gold}."


def _wrong_response(doc: dict) -> str:
    gold = doc["qmr_gold"]
    if doc["qmr_kind"] == "choice":
        return f"The answer is ({'B' if gold == 'A' else 'A'})."
    if doc["qmr_kind"] == "latex":
        return "The answer is \\boxed{-98765}."
    return f"The answer is {float(gold) + 7:g}."


# --------------------------------------------------------------------------- task loading


@needs_data
def test_every_task_loads_with_expected_docs(tasks):
    assert sorted(tasks) == sorted(TASK_NAMES)
    for name, task in tasks.items():
        config = task.config
        assert config.output_type == "generate_until", name
        assert config.num_fewshot == 0, name
        assert config.generation_kwargs["do_sample"] is False, name
        assert config.generation_kwargs["until"] == ["<|im_end|>", "<|endoftext|>"], name
        assert config.metadata["version"] == 1.0, name
        docs = list(task.test_docs())
        assert len(docs) == EXPECTED_TEST_DOCS[name], name
        ids = [doc["qmr_id"] for doc in docs]
        assert len(set(ids)) == len(ids), f"{name}: duplicate qmr_id"
        assert all(isinstance(doc["qmr_gold"], str) and doc["qmr_gold"] for doc in docs), name


@needs_data
def test_ids_are_the_documented_ones(tasks):
    first = {name: next(iter(task.test_docs())) for name, task in tasks.items()}
    assert first["qmr_gsm8k"]["qmr_id"].startswith("gsm8k-") and len(first["qmr_gsm8k"]["qmr_id"]) == 18
    assert first["qmr_math500"]["qmr_id"] == first["qmr_math500"]["unique_id"]
    assert first["qmr_aime24"]["qmr_id"] == f"aime24-{first['qmr_aime24']['id']}"
    assert first["qmr_mmlu"]["qmr_id"] == "mmlu-abstract_algebra-0"
    assert first["qmr_arith"]["qmr_id"] == arith.generate("test", 1, 0)[0].id
    assert first["qmr_mawps"]["qmr_id"].startswith("mawps-singleop-")
    assert first["qmr_svamp"]["qmr_id"].startswith("svamp-")


@needs_data
def test_prompts_start_with_the_project_instruction(tasks):
    for name, task in tasks.items():
        doc = next(iter(task.test_docs()))
        prompt = task.doc_to_text(doc)
        if name == "qmr_mmlu":
            assert prompt.startswith(doc["question"])
            assert "\nA. " in prompt and "\nD. " in prompt
            assert prompt.endswith(utils.CHOICE_INSTRUCTION)
        elif name in ("qmr_math500", "qmr_aime24"):
            assert prompt.startswith(utils.LATEX_INSTRUCTION) and "\\boxed{<answer>}" in prompt
            assert prompt.endswith(doc["qmr_question"])
        else:
            assert prompt == arith.prompt(doc["qmr_question"]), name
        assert task.doc_to_target(doc) == doc["qmr_gold"]


@needs_data
def test_process_results_scores_real_docs(tasks):
    for name, task in tasks.items():
        docs = list(task.test_docs())
        for doc in docs[:3] + docs[-2:]:
            assert task.process_results(doc, [_gold_response(doc)]) == {"exact_match": 1}, (name, doc["qmr_id"])
            assert task.process_results(doc, [_wrong_response(doc)]) == {"exact_match": 0}, (name, doc["qmr_id"])
            assert task.process_results(doc, [""]) == {"exact_match": 0}


@needs_data
def test_gsm8k_and_arith_train_splits(tasks):
    assert len(list(tasks["qmr_gsm8k"].training_docs())) == 7473
    train = list(tasks["qmr_arith"].training_docs())
    assert len(train) == 500 and all(doc["split"] == "train" for doc in train)


# --------------------------------------------------------------------------- loaders directly


def test_arith_metadata_keys():
    small = utils.load_arith(arith_n="20", arith_seed=3, version=1.0, pretrained="ignored")
    assert len(small["test"]) == 20 and len(small["train"]) == 20
    expected = [p.id for p in arith.generate("test", 20, 3)]
    assert small["test"]["qmr_id"] == expected
    assert small["test"]["qmr_gold"] == [str(p.answer) for p in arith.generate("test", 20, 3)]


@needs_data
def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv(utils.DATA_DIR_ENV, str(DATA))
    ds = utils.load_aime24()
    assert len(ds["test"]) == 30


def test_corrupt_local_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "gsm8k" / "test.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(utils.DataError) as err:
        utils.load_gsm8k(data_dir=str(tmp_path))
    message = str(err.value)
    assert str(bad) in message and "line 2" in message and "\n" not in message


def test_missing_field_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "math500" / "test.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"problem": "p", "answer": "1"}\n', encoding="utf-8")
    with pytest.raises(utils.DataError, match="unique_id") as err:
        utils.load_math500(data_dir=str(tmp_path))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_missing_local_file_falls_back_to_hub_then_names_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(utils.datasets, "load_dataset", offline)
    with pytest.raises(utils.DataError) as err:
        utils.load_svamp(data_dir=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "svamp" / "test.jsonl") in message and "ChilleD/SVAMP" in message
    assert "\n" not in message


def test_hub_fallback_without_data_dir(monkeypatch):
    monkeypatch.delenv(utils.DATA_DIR_ENV, raising=False)
    calls = []

    def fake_hub(path, name=None, **kwargs):
        calls.append((path, name))
        rows = [{"question": "Two plus two?", "answer": "2+2=4\n#### 4"}]
        return {"train": rows, "test": rows}

    monkeypatch.setattr(utils.datasets, "load_dataset", fake_hub)
    ds = utils.load_gsm8k()
    assert calls == [("openai/gsm8k", "main")]
    assert ds["test"][0]["qmr_gold"] == "4" and ds["test"][0]["qmr_id"].startswith("gsm8k-")


# --------------------------------------------------------------------------- through simple_evaluate


@needs_data
def test_simple_evaluate_logged_samples_read_back():
    """A scripted LM (no model) answers half right; lm-eval's logged samples carry the truth."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class ScriptedLM(LM):
        def __init__(self, replies: dict[str, str]):
            super().__init__()
            self.replies = replies

        def generate_until(self, requests):
            return [self.replies[req.args[0]] for req in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(DATA), "arith_n": 6})
    docs = {name: list(manager.load([name])["tasks"][name].test_docs())[:6] for name in ("qmr_arith", "qmr_math500")}
    replies, expected = {}, {}
    for i, doc in enumerate(docs["qmr_arith"] + docs["qmr_math500"]):
        right = i % 2 == 0
        replies[utils.doc_to_text(doc)] = _gold_response(doc) if right else _wrong_response(doc)
        expected[doc["qmr_id"]] = right

    out = simple_evaluate(model=ScriptedLM(replies), tasks=["qmr_arith", "qmr_math500"], task_manager=manager,
                          limit=6, log_samples=True, bootstrap_iters=0)
    for name in ("qmr_arith", "qmr_math500"):
        samples = out["samples"][name]
        assert len(samples) == 6
        for sample in samples:
            record = utils.read_sample(sample)
            assert record["correct"] is expected[record["item_id"]]
            assert record["prompt"] == utils.doc_to_text(sample["doc"])
            assert record["response"] == replies[record["prompt"]]
            assert (record["extracted"] is not None) and (record["gold"] == sample["target"])
            # the same sample as EvaluationTracker writes it to samples_*.jsonl
            saved = {**sample, "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)}
                                             for i, args in enumerate(sample["arguments"])}}
            assert utils.read_sample(saved) == record
        assert out["results"][name]["exact_match,none"] == pytest.approx(0.5)
