"""A judge is one class registered by name in ``registry.JUDGES``: the suite check, ``build_judges``
and a real cell's Locate then know it like a built-in one (here: the lab model under RTN-W3, whose
regressions the new judge locates, every one at step 1 as a formula_rule_error)."""

from __future__ import annotations

import json

import pytest

from pytest_qmr.locate.judges import InlineJudge, JudgeFileError, Vote, build_judges
from pytest_qmr.registry import JUDGES
from pytest_qmr.suite import SuiteError, check_references, load_suite

NAME = "first-step"
TYPE = "formula_rule_error"  # a type neither built-in judge gives on chained arithmetic

SUITE = """
name: registry
data_dir: {data_dir}
models:
  - {{name: smollm2-135m-arith, ref: embedded:smollm2-135m-arith}}
quantizers:
  - {{name: rtn-w3g64, method: rtn, bits: 3, group_size: 64}}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: 16, seed: 0}}
thresholds: {{max_abs_drop: 0.10, max_rel_drop: 0.15, alpha: 0.05, min_items: 4, sequential: false}}
generation: {{max_new_tokens: 96, batch_size: 20}}
locate: {{judges: [{judges}]}}
"""


class FirstStep(InlineJudge):
    """Marks the first step of every trace as a formula_rule_error."""

    name = NAME

    def judge(self, case):
        return Vote(self.name, "error", 1, TYPE, "the first step, always", 1.0, attempts=1)


@pytest.fixture
def registered():
    JUDGES.add(NAME, FirstStep)
    try:
        yield NAME
    finally:
        JUDGES.remove(NAME)


def _suite(tmp_path, data_dir, judges: str, judge_config: str | None = None):
    path = tmp_path / "registry.yaml"
    text = SUITE.format(data_dir=data_dir, judges=judges)
    path.write_text(text.replace("]}", f"], judge_config: {judge_config}}}") if judge_config else text)
    return load_suite(path)


def test_the_suite_and_build_judges_know_a_registered_judge(registered, tmp_path, data_dir):
    assert [c.locate.judges for c in _suite(tmp_path, data_dir, f"{NAME}, rule").cells()] == [[NAME, "rule"]]
    with pytest.raises(SuiteError) as exc:
        _suite(tmp_path, data_dir, "first-stpe")
    assert str(exc.value).endswith("locate.judges[0]: not a built-in judge (did you mean 'first-step'?); "
                                   "LLM judges need locate.judge_config (got 'first-stpe')")
    judges = build_judges([NAME, "rule"])
    assert isinstance(judges[0], FirstStep) and [j.name for j in judges] == [NAME, "rule"]
    with pytest.raises(JudgeFileError, match=r"^unknown judge 'first-stpe' \(did you mean 'first-step'\?\)"):
        build_judges(["first-stpe"])


def test_a_name_neither_registered_nor_configured_fails_at_collection(registered, tmp_path, data_dir):
    (tmp_path / "judges.yaml").write_text(json.dumps({"judges": [{"name": "gpt4o", "base_url": "http://h",
                                                                  "model": "m"}]}))
    check_references(_suite(tmp_path, data_dir, f"{NAME}, gpt4o", "judges.yaml"))
    with pytest.raises(SuiteError) as exc:
        check_references(_suite(tmp_path, data_dir, f"{NAME}, gpt4", "judges.yaml"))
    assert str(exc.value).endswith("locate.judges[1]: neither a built-in judge nor one of judges.yaml "
                                   "(did you mean 'gpt4o'?) (got 'gpt4')")


def test_a_judge_not_following_the_protocol_is_one_line(tmp_path):
    JUDGES.add("not-a-judge", object)
    try:
        with pytest.raises(JudgeFileError, match="^judge 'not-a-judge': object does not follow the judge protocol"):
            build_judges(["not-a-judge"])
    finally:
        JUDGES.remove("not-a-judge")
    assert "not-a-judge" not in JUDGES


def test_a_registered_judge_locates_a_real_cell(registered, tmp_path, data_dir, cache_dir, repo_root, lab_model):
    from pytest_qmr.session import QmrSession

    (cell,) = _suite(tmp_path, data_dir, NAME).cells()
    session = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=repo_root / "baselines",
                         data_dir=data_dir, cache_dir=cache_dir)
    result = session.run_cell(cell)

    rows = [json.loads(line) for line in (tmp_path / "run" / "cells" / cell.id / "located.jsonl").read_text()
            .splitlines()]
    assert rows, f"RTN-W3 regressed on none of 16 items ({result.outcome})"
    assert all(list(r["votes"]) == [NAME] and r["verdict_by"] == NAME and r["status"] == "accepted"
               and (r["first_error_step"], r["primary_error_type"], r["category"]) == (1, TYPE, "method")
               for r in rows)
    profile = result.error_profile
    assert profile.judges_used == [NAME] and profile.policy == "paper"
    assert profile.n_located == len(rows) == profile.types[TYPE]["count"]
    assert profile.types[TYPE]["share"] == 1.0 and profile.first_error_step["histogram"] == {"1": len(rows)}
