"""Locate's typed records against files written before they existed (``tests/fixtures/locate/``):

- ``reviewed.jsonl``: ``qmr judge --judges rule`` and ``qmr review import`` on two user traces with
  fields of their own (``source``, ``meta``), a numeric id and a numeric gold answer;
- ``result.json`` and ``located.jsonl``: a cell a session located (the first-step judge of
  ``test_judge_registry``), with ``judges_used`` and ``policy`` in its error profile.

Read as records and written back, each must be the same JSON, byte for byte; and the rows must
still work where Restore reads them as mappings."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_qmr import arith, locate, restore
from pytest_qmr.locate import ErrorProfile, LocatedRow, Policy, check_profile, error_profile, profile_summary
from pytest_qmr.locate.judges import RuleJudge, Vote
from pytest_qmr.records import CellResult

FIXTURES = Path(__file__).parent / "fixtures" / "locate"
# today's error profile keys, in the order error_profile() writes them (report.json, result.json)
PROFILE_KEYS = ["n", "status", "n_final", "n_located", "categories", "types", "no_error", "first_error_step",
                "relative_first_error_step", "judges", "judges_used", "policy"]


def _lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text(encoding="utf-8").splitlines()


def test_located_row_round_trip_keeps_user_fields_byte_for_byte():
    for line in _lines("reviewed.jsonl"):
        row = LocatedRow.from_dict(json.loads(line))
        assert json.dumps(row.to_dict()) == line
    u1, two = (LocatedRow.from_dict(json.loads(line)) for line in _lines("reviewed.jsonl"))
    assert u1.extra == {"source": "forum", "meta": {"difficulty": 2, "tags": ["arith"]}}
    assert u1.gold_answer == 17 and u1.reference_response is None and "reference_response" not in u1.to_dict()
    assert isinstance(u1.votes["rule"], Vote) and u1.votes["rule"].error_step == 2
    assert (u1.status, u1.final, u1.is_located, u1.pre_review_status) == ("accepted", True, True, None)
    assert two.id == 2 and two.item_id == "2" and two.extra == {"source": "book"}
    assert (two.status, two.pre_review_status, two.human_review["reviewer"]) == ("human", "escalated", "ann")
    assert two.is_located and two.category == "method"


def test_redecide_keeps_user_fields_and_drops_the_review():
    rows = [json.loads(line) for line in _lines("reviewed.jsonl")]
    redo = locate.redecide(rows, Policy("rule-only"))
    out = [r.to_dict() for r in redo]
    # the input keys first, in their order (user fields where the user put them), then the verdict
    assert list(out[1]) == ["id", "problem", "gold_answer", "response", "reference_response", "source",
                            *(k for k in rows[1] if k not in ("id", "problem", "gold_answer", "response",
                                                              "reference_response", "source", "pre_review_status",
                                                              "human_review"))]
    assert out[1]["status"] == "escalated" and out[1]["policy"] == "rule-only"  # the rule judge abstained
    assert out[0]["meta"] == rows[0]["meta"] and out[0] == rows[0]  # accepted by the rule judge both times
    assert redo[1].human_review is None and redo[1].votes == LocatedRow.from_dict(rows[1]).votes


def test_a_row_never_judged_writes_only_what_it_has():
    row = LocatedRow.from_dict({"id": "t1", "problem": "p", "response": "r", "gold_answer": "1", "note": None})
    assert row.status is None and not row.final and not row.is_located
    assert row.to_dict() == {"id": "t1", "problem": "p", "response": "r", "gold_answer": "1", "note": None}


def test_error_profile_of_a_committed_result_round_trips():
    data = json.loads((FIXTURES / "result.json").read_text(encoding="utf-8"))
    result = CellResult.from_dict(data)
    profile = result.error_profile
    assert isinstance(profile, ErrorProfile)
    assert (profile.n, profile.n_located, profile.judges_used, profile.policy) == (13, 13, ["first-step"], "paper")
    assert profile.types["formula_rule_error"] == {"count": 13, "share": 1.0}
    assert profile.first_error_step["median"] == 1
    assert result.to_dict() == data
    assert json.dumps(result.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)
    assert list(profile.to_dict()) == PROFILE_KEYS
    # the located rows of that cell give the same profile today (the session adds judges_used and policy)
    rows = [LocatedRow.from_dict(json.loads(line)) for line in _lines("located.jsonl")]
    assert [json.dumps(r.to_dict(), ensure_ascii=False) for r in rows] == _lines("located.jsonl")
    again = error_profile(rows)  # today's profile also counts untyped faulty steps (none in this cell)
    keys = PROFILE_KEYS[:-2]
    assert list(again.to_dict()) == [*keys[:keys.index("no_error") + 1], "untyped", *keys[keys.index("no_error") + 1:]]
    assert again.untyped == {"count": 0, "share": 0.0, "ids": []}
    again.judges_used, again.policy, again.untyped = ["first-step"], "paper", None
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(data["error_profile"], sort_keys=True)
    assert again == profile
    # the checks and the summary read the record, and a mapping the same way
    assert check_profile(profile, {"max_share.method": 0.5}) == [
        "share of method is 1 > max 0.5 (max_share.method; 13 of 13 located errors)"]
    assert check_profile(data["error_profile"], {"max_share.method": 0.5}) == check_profile(profile,
                                                                                             {"max_share.method": 0.5})
    assert profile_summary(profile).startswith("13 judged: 13 accepted, 0 escalated, 0 unjudged; located 13")


def test_error_profile_keeps_keys_it_does_not_know():
    data = {**error_profile([]).to_dict(), "future_stat": {"x": 1}}
    assert ErrorProfile.from_dict(data).to_dict() == data
    partial = ErrorProfile.from_dict({"n": 2, "status": {"accepted": 2, "human": 0, "escalated": 0, "unjudged": 0}})
    assert partial.n == 2 and partial.n_located == 0 and partial.first_error_step["median"] is None


def test_located_rows_as_dicts_still_make_restore_pairs():
    """Restore reads Locate rows (or mined traces) as mappings: LocatedRow.to_dict() rows work there."""
    p = next(q for q in arith.generate("train", 400, 0) if len(q.steps) >= 3 and q.steps[1].op == "+")
    s = p.steps
    response = (f"{s[0].text(1)}\nStep 2: {s[1].a} + {s[1].b} = {s[1].result + 1}\n"
                f"The answer is {s[1].result + 1}.")
    chat = f"<|im_start|>user\n{arith.prompt(p.question)}<|im_end|>\n<|im_start|>assistant\n"  # as a cell's rows
    trace = {"id": p.id, "problem": chat, "response": response, "gold_answer": str(p.answer),
             "solution": p.solution()}  # a mined trace's own field
    [row] = locate.locate([trace], [RuleJudge()])
    assert row.extra == {"solution": p.solution()} and row.is_located and row.first_error_step == 2
    assert restore.is_case(row.to_dict())
    [pair] = restore.build_pairs([row.to_dict()], restore.GoldTeacher())
    assert (pair.item_id, pair.first_step, pair.error_type, pair.category) == (
        p.id, 2, "computational_error", "execution")
    assert pair.prompt == chat + s[0].text(1) + "\n" and pair.chosen.startswith(s[1].text(2))


def test_a_final_step_without_a_type_is_untyped_and_one_of_an_unknown_type_no_error():
    """The arith judge's format collapse (a step, no type) is counted apart, not as "no error"."""
    rows = [{"id": "x", "status": "accepted", "first_error_step": 2, "primary_error_type": None, "n_steps": 3},
            {"id": "y", "status": "human", "first_error_step": 1, "primary_error_type": "typo_error", "n_steps": 3},
            {"id": "z", "status": "escalated", "first_error_step": 1, "primary_error_type": None, "n_steps": 3}]
    assert not any(LocatedRow.from_dict(r).is_located for r in rows)
    assert [LocatedRow.from_dict(r).is_untyped for r in rows] == [True, False, False]  # z is not final
    p = error_profile(rows)
    assert (p.n_final, p.n_located, p.no_error["ids"], p.untyped) == (
        2, 0, ["y"], {"count": 1, "share": 0.5, "ids": ["x"]})
    assert check_profile(p, {"max_share.untyped": 0.25}) == [
        "share of untyped is 0.5 > max 0.25 (max_share.untyped; 1 of 2 final cases)"]
    assert profile_summary(p).endswith("; no error 1; untyped 1")
