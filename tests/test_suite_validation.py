"""Suite files: one-line errors for malformed suites, cells for valid ones."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from pytest_qmr.suite import DATA_DIR_ENV, SuiteError, load_suite

VALID = {
    "name": "smoke",
    "data_dir": "../data",
    "restore": "off",
    "models": [{"name": "smollm2-135m-arith", "ref": "embedded:smollm2-135m-arith", "trust_remote_code": False}],
    "quantizers": [
        {"name": "fp", "method": "fp"},
        {
            "name": "rtn-w4g64",
            "method": "rtn",
            "bits": 4,
            "group_size": 64,
            "symmetric": True,
            "ignore": ["lm_head"],
        },
        {
            "name": "gptq-w4",
            "method": "gptq",
            "bits": 4,
            "calibration": {"dataset": "gsm8k", "samples": 64, "seq_len": 512, "seed": 0},
        },
    ],
    "benchmarks": [
        {"name": "arith", "task": "qmr_arith", "limit": 100, "seed": 0,
         "thresholds": {"max_abs_drop": 0.10, "error_profile": {"max_share.method": 0.5}}},
        {"name": "gsm8k", "task": "gsm8k", "limit": None},
    ],
    "thresholds": {
        "max_abs_drop": 0.05,
        "max_rel_drop": 0.10,
        "alpha": 0.05,
        "sequential": False,
        "min_items": 20,
        "error_profile": {"max_share.execution": 0.6},
    },
    "generation": {"max_new_tokens": 256, "batch_size": 16, "backend": "hf"},
}


def write(tmp_path: Path, content, name: str = "suite.yaml") -> Path:
    suites = tmp_path / "repo" / "suites"
    suites.mkdir(parents=True, exist_ok=True)
    path = suites / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def mutated(fn) -> dict:
    data = copy.deepcopy(VALID)
    fn(data)
    return data


def error_of(path: Path) -> str:
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message
    assert "Traceback" not in message and "validation error" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


# (mutation of the valid suite, expected message after "<file>: ")
CASES = {
    "bad bits": (
        lambda d: d["quantizers"][1].update(bits=5),
        "quantizers[1].bits: must be one of 2, 3, 4, 8 (got 5)",
    ),
    "unknown key with suggestion": (
        lambda d: d["quantizers"][1].update(group_sise=32),
        "quantizers[1].group_sise: unknown key, did you mean 'group_size'? (got 32)",
    ),
    "unknown top-level key without close match": (
        lambda d: d.update(zzz=1),
        "zzz: unknown key (valid keys: benchmarks, data_dir, description, generation, include_defaults, locate, "
        "models, name, quantizers, restore, tasks, thresholds) (got 1)",
    ),
    "unknown key in benchmark thresholds": (
        lambda d: d["benchmarks"][0]["thresholds"].update(alpah=0.1),
        "benchmarks[0].thresholds.alpah: unknown key, did you mean 'alpha'? (got 0.1)",
    ),
    "wrong type int": (
        lambda d: d["generation"].update(batch_size="sixteen"),
        "generation.batch_size: must be an integer (got 'sixteen')",
    ),
    "wrong type float for int": (
        lambda d: d["benchmarks"][0].update(limit=10.5),
        "benchmarks[0].limit: must be an integer (no decimal point) (got 10.5)",
    ),
    "wrong type bool": (
        lambda d: d["models"][0].update(trust_remote_code="yes"),
        "models[0].trust_remote_code: must be true or false (got 'yes')",
    ),
    "wrong type list": (
        lambda d: d.update(models={"name": "x"}),
        "models: must be a list (got a mapping {'name': 'x'})",
    ),
    "missing required key": (
        lambda d: d["models"][0].pop("ref"),
        "models[0].ref: missing required key (got keys: name, trust_remote_code)",
    ),
    "missing top-level key": (
        lambda d: d.pop("benchmarks"),
        "benchmarks: missing required key (got keys: name, data_dir, restore, models, quantizers, "
        "thresholds, generation)",
    ),
    "bad enum method": (
        lambda d: d["quantizers"][1].update(method="rtnn"),
        "quantizers[1].method: must be one of fp, rtn, gptq, awq, smoothquant, checkpoint, recipe, "
        "did you mean 'rtn'? (got 'rtnn')",
    ),
    "bad enum backend": (
        lambda d: d["generation"].update(backend="tgi"),
        "generation.backend: must be one of hf, vllm, openai (got 'tgi')",
    ),
    "bad device": (
        lambda d: d["generation"].update(device="tpu"),
        "generation.device: must be auto, cpu, cuda or cuda:N (got 'tpu')",
    ),
    "bad dtype": (
        lambda d: d["generation"].update(dtype="int8"),
        "generation.dtype: must be one of auto, float32, bfloat16, float16 (got 'int8')",
    ),
    "bad enum restore": (
        lambda d: d.update(restore="sometimes"),
        "restore.when: must be one of off, on-fail, always (got 'sometimes')",
    ),
    "fraction out of range": (
        lambda d: d["thresholds"].update(max_abs_drop=5),
        "thresholds.max_abs_drop: must be at most 1 (a fraction: 0.05 means 5 points) (got 5)",
    ),
    "alpha out of range": (
        lambda d: d["thresholds"].update(alpha=0),
        "thresholds.alpha: must be greater than 0 (got 0)",
    ),
    "override out of range": (
        lambda d: d["benchmarks"][1].update(thresholds={"alpha": 1.5}),
        "benchmarks[1].thresholds.alpha: must be less than 1 (got 1.5)",
    ),
    "non-positive limit": (
        lambda d: d["benchmarks"][0].update(limit=0),
        "benchmarks[0].limit: must be greater than 0 (got 0)",
    ),
    "negative group size": (
        lambda d: d["quantizers"][1].update(group_size=-1),
        "quantizers[1].group_size: must be at least 2 (got -1)",
    ),
    "group size of one": (
        lambda d: d["quantizers"][1].update(group_size=1),
        "quantizers[1].group_size: must be at least 2 (got 1)",
    ),
    "family with noninferiority": (
        lambda d: d["thresholds"].update(mode="noninferiority", family="holm"),
        "thresholds.family: adjusts p-values, so it needs mode: difference (noninferiority judges each cell's "
        "interval) (got 'holm')",
    ),
    "unknown answer kind": (
        lambda d: d["benchmarks"][1].update(answer_kind="integer"),
        "benchmarks[1].answer_kind: must be one of number, latex, choice (got 'integer')",
    ),
    "task folders not a list": (
        lambda d: d.update(tasks="my_tasks"),
        "tasks: must be a list (got 'my_tasks')",
    ),
    "unknown gate mode": (
        lambda d: d["thresholds"].update(mode="superiority"),
        "thresholds.mode: must be one of difference, noninferiority (got 'superiority')",
    ),
    "smoothquant bits": (
        lambda d: d["quantizers"].append(
            {"name": "sq", "method": "smoothquant", "bits": 4, "calibration": {"dataset": "gsm8k"}}
        ),
        "quantizers[3].bits: must be 8 for method smoothquant (W8A8) (got 4)",
    ),
    "fp with bits": (
        lambda d: d["quantizers"][0].update(bits=4),
        "quantizers[0].bits: not used by method fp (full precision); remove it (got 4)",
    ),
    "rtn without bits": (
        lambda d: d["quantizers"][1].pop("bits"),
        "quantizers[1].bits: required for method rtn: one of 2, 3, 4, 8 (got nothing)",
    ),
    "gptq without calibration": (
        lambda d: d["quantizers"][2].pop("calibration"),
        "quantizers[2].calibration: required for method gptq, e.g. "
        "{dataset: gsm8k, samples: 64, seq_len: 512, seed: 0} (got nothing)",
    ),
    "calibration without dataset": (
        lambda d: d["quantizers"][2]["calibration"].pop("dataset"),
        "quantizers[2].calibration.dataset: missing required key (got keys: samples, seq_len, seed)",
    ),
    "checkpoint without path": (
        lambda d: d["quantizers"].append({"name": "ckpt", "method": "checkpoint"}),
        "quantizers[3].path: required for method checkpoint: a local directory or hub id (got nothing)",
    ),
    "path on a non-checkpoint method": (
        lambda d: d["quantizers"][1].update(path="some/dir"),
        "quantizers[1].path: only allowed for method checkpoint, not rtn (got 'some/dir')",
    ),
    "empty models": (
        lambda d: d.update(models=[]),
        "models: must not be empty (got a list [])",
    ),
    "empty benchmarks": (
        lambda d: d.update(benchmarks=[]),
        "benchmarks: must not be empty (got a list [])",
    ),
    "duplicate quantizer names": (
        lambda d: d["quantizers"].append({"name": "fp", "method": "fp"}),
        "quantizers[3].name: duplicate name, already used by quantizers[0] (got 'fp')",
    ),
    "duplicate benchmark names": (
        lambda d: d["benchmarks"].append({"name": "arith", "task": "other"}),
        "benchmarks[2].name: duplicate name, already used by benchmarks[0] (got 'arith')",
    ),
    "duplicate cell ids": (
        lambda d: (
            d["models"].append({"name": "smollm2-135m-arith-fp", "ref": "x"}),
            d["benchmarks"].append({"name": "fp-arith", "task": "t"}),
        ),
        "models[1].name: cell id 'smollm2-135m-arith-fp-fp-arith' of models[1] x quantizers[0] x "
        "benchmarks[0] collides with models[0] x quantizers[0] x benchmarks[2]; rename one "
        "(got 'smollm2-135m-arith-fp')",
    ),
    "bad name characters": (
        lambda d: d["models"][0].update(name="SmolLM2_135M"),
        "models[0].name: must be lowercase letters, digits, '.' or '-', starting with a letter or digit "
        "(got 'SmolLM2_135M')",
    ),
    "error profile not a mapping": (
        lambda d: d["thresholds"].update(error_profile=[1, 2]),
        "thresholds.error_profile: must be a mapping (got a list [1, 2])",
    ),
    "unknown error profile share": (
        lambda d: d["thresholds"].update(error_profile={"max_share.exectuion": 0.5}),
        "thresholds.error_profile.max_share.exectuion: unknown key (share names: conceptual, reasoning, method, "
        "execution, conceptual_misunderstanding, contextual_oversight, logical_reasoning_error, procedural_error, "
        "formula_rule_error, computational_error, symbolic_manipulation_error, no_error, untyped) (got 0.5)",
    ),
    "error profile limit not a number": (
        lambda d: d["benchmarks"][0]["thresholds"].update(error_profile={"min_median_first_error_step": "two"}),
        "benchmarks[0].thresholds.error_profile.min_median_first_error_step: limit must be a number (got 'two')",
    ),
    "unknown judge without judge config": (
        lambda d: d.update(locate={"judges": ["rule", "gpt-4o"]}),
        "locate.judges[1]: not a built-in judge (rule, arith); LLM judges need locate.judge_config (got 'gpt-4o')",
    ),
    "benchmark limited to an unknown quantizer": (
        lambda d: d["benchmarks"][0].update(quantizers=["fp", "gptq-w3"]),
        "benchmarks[0].quantizers[1]: not a quantizer of this suite (fp, rtn-w4g64, gptq-w4) (got 'gptq-w3')",
    ),
    "unknown quantizer option": (
        lambda d: d["quantizers"][2].update(options={"n_grids": 10}),
        "quantizers[2].options.n_grids: unknown option 'n_grids' (known: block_size, dampening_frac, "
        "actorder) (got 10)",
    ),
    "quantizer option of the wrong type": (
        lambda d: d["quantizers"][2].update(options={"block_size": "big"}),
        "quantizers[2].options.block_size: option block_size must be of type int (got 'big')",
    ),
    "unknown restore training setting": (
        lambda d: d.update(restore={"when": "on-fail", "train": {"lora_rank": 8}}),
        "restore.train.lora_rank: unknown setting, did you mean 'lora_r'? (got 8)",
    ),
    "restore limited to an unknown quantizer": (
        lambda d: d.update(restore={"when": "on-fail", "quantizers": ["awq-w4"]}),
        "restore.quantizers[0]: not one of this suite's quantizers (fp, rtn-w4g64, gptq-w4) (got 'awq-w4')",
    ),
    "restore teacher unknown": (
        lambda d: d.update(restore={"when": "on-fail", "teacher": "gpt"}),
        "restore.teacher: must be gold, fp or endpoint:NAME (NAME from locate.judge_config) (got 'gpt')",
    ),
    "unknown locate policy": (
        lambda d: d.update(locate={"policy": {"name": "vote"}}),
        "locate.policy: unknown policy 'vote' (known: paper, majority, unanimous, rule-only) "
        "(got a mapping {'name': 'vote'})",
    ),
}


@pytest.mark.parametrize("mutate, expected", list(CASES.values()), ids=list(CASES))
def test_malformed_suite_one_line_message(tmp_path, mutate, expected):
    path = write(tmp_path, mutated(mutate))
    assert error_of(path) == expected


RAW_CASES = {
    "yaml syntax error": (
        "name: x\nmodels:\n  - name: a\n    ref: [b\nquantizers: []\n",
        "line 5, column 11: invalid YAML: expected ',' or ']', but got ':' while parsing a flow sequence "
        "(got 'quantizers: []')",
    ),
    "yaml tab": (
        "name: x\n\tmodels: 1\n",
        "line 2, column 1: invalid YAML: found character '\\t' that cannot start any token while scanning "
        "for the next token (got 'models: 1')",
    ),
    "yaml duplicate key": (
        "name: x\nmodels: []\nname: y\n",
        "line 3, column 1: invalid YAML: duplicate key 'name' (first at line 1) (got 'name: y')",
    ),
    "top level is a list": (
        "- name: x\n- name: y\n",
        "(top level): must be a mapping of suite keys (got a list [{'name': 'x'}, {'name': 'y'}])",
    ),
    "top level is a scalar": ("just text\n", "(top level): must be a mapping of suite keys (got 'just text')"),
    "empty file": ("", "(top level): must be a mapping of suite keys (got an empty file)"),
    "bare on for restore": (
        yaml.safe_dump(mutated(lambda d: d.pop("restore")), sort_keys=False) + "restore: on\n",
        "restore.when: must be one of off, on-fail, always (got 'on')",
    ),
}


@pytest.mark.parametrize("text, expected", list(RAW_CASES.values()), ids=list(RAW_CASES))
def test_malformed_yaml_one_line_message(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error_of(path) == expected


def test_missing_file(tmp_path):
    path = tmp_path / "suites" / "nope.yaml"
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(info.value) == f"{path}: suite file not found (got {str(path.resolve())!r})"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(SuiteError) as info:
        load_suite(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: is a directory")
    assert "\n" not in str(info.value)


def test_first_error_wins_and_is_one_line(tmp_path):
    bad = mutated(lambda d: (d["quantizers"][1].update(bits=5, method="nope"), d.update(models=[])))
    message = error_of(write(tmp_path, bad))
    assert message.count("(got") == 1


# --------------------------------------------------------------------------- valid suites


def test_valid_suite_cells(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    path = write(tmp_path, VALID)
    suite = load_suite(path)
    cells = suite.cells()
    assert [c.id for c in cells] == [
        "smollm2-135m-arith-fp-arith",
        "smollm2-135m-arith-fp-gsm8k",
        "smollm2-135m-arith-rtn-w4g64-arith",
        "smollm2-135m-arith-rtn-w4g64-gsm8k",
        "smollm2-135m-arith-gptq-w4-arith",
        "smollm2-135m-arith-gptq-w4-gsm8k",
    ]
    fp_cells = [c for c in cells if c.is_fp]
    assert [c.id for c in fp_cells] == ["smollm2-135m-arith-fp-arith", "smollm2-135m-arith-fp-gsm8k"]
    by_id = {c.id: c for c in cells}
    arith = by_id["smollm2-135m-arith-rtn-w4g64-arith"]
    gsm = by_id["smollm2-135m-arith-rtn-w4g64-gsm8k"]
    # benchmark override merged on the suite defaults
    assert arith.thresholds.max_abs_drop == 0.10
    assert arith.thresholds.max_rel_drop == 0.10
    assert arith.thresholds.alpha == 0.05 and arith.thresholds.min_items == 20
    assert arith.thresholds.error_profile == {"max_share.execution": 0.6, "max_share.method": 0.5}
    assert gsm.thresholds.max_abs_drop == 0.05
    assert gsm.thresholds.error_profile == {"max_share.execution": 0.6}
    # data_dir relative to the suite file, not to the cwd
    expected_dir = (tmp_path / "repo" / "data").resolve()
    assert arith.data_dir == expected_dir and arith.data_dir.is_absolute()
    assert arith.quantizer.bits == 4 and arith.quantizer.group_size == 64
    assert arith.generation.max_new_tokens == 256 and arith.restore.when == "off"
    assert arith.benchmark.limit == 100 and gsm.benchmark.limit is None
    assert len({c for c in cells}) == len(cells)  # hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        arith.id = "other"  # frozen


def test_restore_shorthand_and_cell_filters(tmp_path):
    short = load_suite(write(tmp_path, mutated(lambda d: d.update(restore="on-fail"))))
    assert short.restore.when == "on-fail" and short.restore.teacher == "gold"
    cells = {c.id: c for c in short.cells()}
    assert not cells["smollm2-135m-arith-fp-arith"].restores(failed=True)  # FP cells never restore
    assert cells["smollm2-135m-arith-rtn-w4g64-arith"].restores(failed=True)
    assert not cells["smollm2-135m-arith-rtn-w4g64-arith"].restores(failed=False)
    only = load_suite(write(tmp_path, mutated(lambda d: d.update(
        restore={"when": "always", "quantizers": ["gptq-w4"], "benchmarks": ["arith"], "train": {"max_steps": 5}}))))
    chosen = [c.id for c in only.cells() if c.restores(failed=False)]
    assert chosen == ["smollm2-135m-arith-gptq-w4-arith"]


def test_benchmark_limited_to_some_quantizers(tmp_path):
    suite = load_suite(write(tmp_path, mutated(lambda d: d["benchmarks"][1].update(quantizers=["fp", "gptq-w4"]))))
    assert [c.id for c in suite.cells() if c.benchmark.name == "gsm8k"] == [
        "smollm2-135m-arith-fp-gsm8k", "smollm2-135m-arith-gptq-w4-gsm8k"]
    assert len([c for c in suite.cells() if c.benchmark.name == "arith"]) == 3


def test_data_dir_env_override_and_absent(tmp_path, monkeypatch):
    path = write(tmp_path, VALID)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert load_suite(path).cells()[0].data_dir == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv(DATA_DIR_ENV)
    no_dir = write(tmp_path, mutated(lambda d: d.pop("data_dir")), name="nodir.yaml")
    assert load_suite(no_dir).cells()[0].data_dir is None


def test_minimal_suite_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    path = write(
        tmp_path,
        "name: tiny\nrestore: off\nmodels: [{name: m, ref: embedded:m}]\n"
        "quantizers: [{name: sq, method: smoothquant, calibration: {dataset: gsm8k}}]\n"
        "benchmarks: [{name: b, task: t}]\n",
    )
    suite = load_suite(path)
    (cell,) = suite.cells()
    assert cell.id == "m-sq-b"
    assert cell.quantizer.effective_bits == 8
    assert cell.quantizer.calibration.samples == 128 and cell.quantizer.calibration.seq_len == 512
    assert cell.thresholds.max_abs_drop == 0.05 and cell.thresholds.sequential is False
    assert cell.generation.backend == "hf"
    assert cell.restore.when == "off"  # YAML's bare `off` is read as false and mapped back
    assert cell.data_dir is None


def test_expect_fail_on_names_a_benchmark(tmp_path):
    from pytest_qmr.suite import SuiteError, load_suite

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nmodels: [{name: m, ref: embedded:smollm2-135m}]\n"
        "quantizers: [{name: q, method: rtn, bits: 4, expect_fail_on: [arithh]}]\n"
        "benchmarks: [{name: arith, task: qmr_arith}]\n"
    )
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert str(err.value) == (
        f"{path}: quantizers[0].expect_fail_on[0]: not a benchmark of this suite (arith) (got 'arithh')"
    )


def test_shipped_suites_validate_and_collect():
    """suites/paper.yaml (the paper's Table 1 grid) and the smoke suite load here, hub or not."""
    root = Path(__file__).resolve().parents[1] / "suites"
    paper = load_suite(root / "paper.yaml")
    ids = [c.id for c in paper.cells()]
    assert len(ids) == 7 * 4 * 3
    assert "qwen2.5-7b-gptq-w4g128-math500" in ids and "llama3.1-8b-smoothquant-w8a8-aime24" in ids
    assert {c.quantizer.method for c in paper.cells()} == {"fp", "awq", "gptq", "smoothquant"}
    reasoning = load_suite(root / "reasoning.yaml")  # QRM's grid: sampled, thinking, length-gated
    cells = reasoning.cells()
    assert len(cells) == 3 * 5 * 3
    assert {(c.generation.samples, c.generation.temperature, c.generation.top_p, c.generation.max_new_tokens)
            for c in cells if c.benchmark.name != "aime24"} == {(3, 0.6, 0.95, 32768)}
    assert {c.generation.samples for c in cells if c.benchmark.name == "aime24"} == {8}
    assert all(c.model.think is not None and c.model.think.end == "</think>" for c in cells)
    assert {c.model.name for c in cells if c.model.chat_template_kwargs == {"enable_thinking": True}} == {"qwen3-1.7b"}
    assert {c.thresholds.max_length_ratio for c in cells} == {1.2}
    smoke = load_suite(root / "smoke.yaml")
    assert {c.quantizer.method for c in smoke.cells()} == {"fp", "rtn", "gptq", "awq", "smoothquant"}
    assert any(c.quantizer.bits == 3 for c in smoke.cells())
