"""The Locate stage without models: ensemble policies on hand-made votes, the stage loop, the
regression set, error profile numbers, profile thresholds, the human review queue round trip
and the `qmr judge` / `qmr review` commands with the rule judge."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from pytest_qmr import cli, locate
from pytest_qmr.locate.judges import Vote
from pytest_qmr.locate import (LocateError, Policy, check_profile, decide, error_profile, import_reviews,
                               regression_set, write_review_queue)
from pytest_qmr.records import SampleRecord
from pytest_qmr.locate.review import ReviewError, case_dir_name, select_cases


def V(judge, t="computational_error", step=2, status=None, **kw):
    if status is None:
        status = "no_error" if t == "no_error" else "error"
    if status != "error":
        return Vote(judge, status, -1, None, kw.pop("explanation", ""), **kw)
    return Vote(judge, status, step, t, kw.pop("explanation", f"{judge} says {t}@{step}"), kw.pop("conf", 0.9), **kw)


def U(judge):
    return Vote(judge, "unjudged", reason="timeout")


def votes(*vs):
    return {v.judge: v for v in vs}


# --------------------------------------------------------------------------------- policies


def test_paper_all_agree_accepts_with_primary_verdict():
    d = decide(votes(V("gpt", explanation="12+5 is 17"), V("a1"), V("a2"), V("a3")), Policy())
    assert (d.status, d.first_error_step, d.primary_error_type, d.verdict_by) == (
        "accepted", 2, "computational_error", "gpt")
    assert d.explanation == "12+5 is 17" and d.agreement == 1.0 and "3/3 auxiliaries" in d.reason


def test_paper_all_but_one_accepts_two_dissents_escalate():
    assert decide(votes(V("gpt"), V("a1"), V("a2"), V("a3", step=3)), Policy()).status == "accepted"
    d = decide(votes(V("gpt"), V("a1"), V("a2", step=1), V("a3", "procedural_error")), Policy())
    assert d.status == "escalated" and d.first_error_step == 2 and d.verdict_by == "gpt"  # the proposal
    assert "1/3 auxiliaries" in d.reason and d.agreement == 0.5
    # stricter: no dissent allowed
    assert decide(votes(V("gpt"), V("a1"), V("a2"), V("a3", step=3)), Policy(max_dissent=0)).status == "escalated"


def test_paper_single_auxiliary_must_agree():
    assert decide(votes(V("gpt"), V("a1")), Policy()).status == "accepted"
    assert decide(votes(V("gpt"), V("a1", step=1)), Policy()).status == "escalated"
    d = decide(votes(V("gpt")), Policy())
    assert d.status == "accepted" and "alone" in d.reason


def test_paper_type_only_agreement_when_steps_are_not_matched():
    vs = votes(V("gpt", step=2), V("a1", step=3), V("a2", step=4))
    assert decide(vs, Policy()).status == "escalated"
    assert decide(vs, Policy(match_step=False)).status == "accepted"


def test_paper_unjudged_auxiliary_counts_as_dissent_unjudged_primary_escalates():
    assert decide(votes(V("gpt"), V("a1"), U("a2")), Policy()).status == "accepted"
    assert decide(votes(V("gpt"), U("a1"), U("a2")), Policy()).status == "escalated"
    d = decide(votes(U("gpt"), V("a1", step=3)), Policy())
    assert d.status == "escalated" and d.first_error_step == 3 and "primary judge gpt gave no verdict" in d.reason
    d = decide(votes(U("gpt"), U("a1"), Vote("rule", "abstain", reason="no_verdict")), Policy())
    assert d.status == "unjudged" and d.first_error_step == -1 and "gpt: timeout" in d.reason


def test_paper_primary_is_configurable():
    vs = votes(V("a", step=1), V("b", step=2), V("c", step=2))
    assert decide(vs, Policy()).first_error_step == 1  # first LLM judge leads; 0/2 agree
    d = decide(vs, Policy(primary="b"))
    assert (d.status, d.first_error_step, d.verdict_by) == ("accepted", 2, "b")


def test_rule_judge_error_is_a_vote_its_abstention_is_not():
    rule_err = V("rule", step=2)
    # primary + one auxiliary that disagrees: escalated; the rule vote tips it to all-but-one
    assert decide(votes(rule_err, V("gpt"), V("a1", step=3)), Policy()).status == "accepted"
    assert decide(votes(rule_err, V("gpt"), V("a1", step=3)), Policy(rule_vote=False)).status == "escalated"
    # the rule judge disagreeing is a dissent like any other
    assert decide(votes(V("rule", step=1), V("gpt"), V("a1", step=3)), Policy()).status == "escalated"
    # an abstaining rule judge is no auxiliary at all
    abstain = Vote("rule", "abstain", reason="no_error_found")
    assert decide(votes(abstain, V("gpt"), V("a1")), Policy()).status == "accepted"


def test_no_error_verdicts_agree_with_each_other():
    d = decide(votes(V("gpt", "no_error"), V("a1", "no_error")), Policy())
    assert (d.status, d.first_error_step, d.primary_error_type) == ("accepted", -1, None)
    assert decide(votes(V("gpt", "no_error"), V("a1")), Policy()).status == "escalated"


def test_majority_and_unanimous():
    two_of_three = votes(V("a"), V("b", step=3), V("c"))
    d = decide(two_of_three, Policy("majority"))
    assert (d.status, d.first_error_step, d.verdict_by) == ("accepted", 2, "a") and d.agreement == pytest.approx(2 / 3)
    assert decide(two_of_three, Policy("unanimous")).status == "escalated"
    assert decide(votes(V("a"), V("b"), V("c")), Policy("unanimous")).status == "accepted"
    assert decide(votes(V("a"), V("b", step=3), V("c", step=4)), Policy("majority")).status == "escalated"
    assert decide(votes(V("a"), V("b"), V("c", step=3), V("d", step=3)), Policy("majority")).status == "escalated"
    # unjudged voters stay in the denominator
    assert decide(votes(V("a"), V("b"), U("c"), U("d")), Policy("majority")).status == "escalated"
    assert decide(votes(V("a"), V("b"), U("c")), Policy("majority")).status == "accepted"
    assert decide(votes(V("a"), U("b")), Policy("unanimous")).status == "escalated"
    # the rule vote joins the count
    d = decide(votes(V("rule", step=3), V("a", step=3), V("b", step=2)), Policy("majority"))
    assert (d.status, d.first_error_step, d.verdict_by) == ("accepted", 3, "a")  # LLM wording first


def test_rule_only():
    d = decide(votes(V("rule", step=4, explanation="step 4: 2 + 2 = 5 is false")), Policy("rule-only"))
    assert (d.status, d.first_error_step, d.primary_error_type) == ("accepted", 4, "computational_error")
    d = decide(votes(Vote("rule", "abstain", reason="no_verdict"), V("gpt")), Policy("rule-only"))
    assert d.status == "escalated" and d.first_error_step == -1
    with pytest.raises(LocateError, match="rule judge"):
        decide(votes(V("gpt")), Policy("rule-only"))
    with pytest.raises(LocateError, match="unknown policy"):
        Policy("vibes")
    with pytest.raises(LocateError, match="at least one LLM judge"):
        decide(votes(V("rule")), Policy("paper"))


# --------------------------------------------------------------------------------- the stage


class _ScriptedJudge:
    def __init__(self, name, answers, delay=None):
        self.name, self.answers, self.calls = name, answers, []
        self.delay = delay or {}

    def submit(self, case):
        self.calls.append(case.id)
        future = Future()
        vote = self.answers[case.id]
        vote = Vote(self.name, vote.status, vote.error_step, vote.primary_error_type, vote.explanation,
                    vote.confidence_score, vote.reason)
        if case.id in self.delay:  # finish out of order
            threading.Timer(self.delay[case.id], future.set_result, [vote]).start()
        else:
            future.set_result(vote)
        return future

    def close(self):
        pass


ROWS = [
    {"id": "r1", "problem": "p1", "response": "Step 1: 2 + 2 = 4\nStep 2: 4 * 3 = 13\nThe answer is 13",
     "gold_answer": "12", "extra": "kept"},
    {"id": "r2", "problem": "p2", "response": "Step 1: Take half.\nStep 2: Add 3.\nThe answer is 7",
     "gold_answer": "8", "reference_response": "Step 1: 10 / 2 = 5\nStep 2: 5 + 3 = 8"},
    {"id": "r3", "problem": "p3", "response": "", "gold_answer": "1"},
]


def test_locate_rows_in_order_with_all_output_fields():
    from pytest_qmr.locate.judges import RuleJudge

    gpt = _ScriptedJudge("gpt", {"r1": V("x", step=2), "r2": V("x", "procedural_error", 1), "r3": U("x")},
                         delay={"r1": 0.2})
    aux = _ScriptedJudge("aux", {"r1": V("x", step=2), "r2": V("x", "logical_reasoning_error", 2), "r3": U("x")})
    seen = []
    out = locate.locate(ROWS, [RuleJudge(), gpt, aux], on_row=lambda r: seen.append(r.id))
    assert [r.id for r in out] == ["r1", "r2", "r3"] and seen[-1] == "r1"  # r1 finished last
    r1, r2, r3 = out
    assert r1.extra["extra"] == "kept" and r1.policy == "paper"
    assert (r1.status, r1.first_error_step, r1.primary_error_type, r1.category) == \
        ("accepted", 2, "computational_error", "execution")
    assert list(r1.votes) == ["rule", "gpt", "aux"] and r1.votes["rule"].status == "error"
    assert r1.n_steps == 2 and r1.agreement == 1.0 and r1.confidence_score == 0.9
    assert (r2.status, r2.first_error_step, r2.category) == ("escalated", 1, "method")
    assert r2.votes["rule"].status == "abstain"
    assert (r3.status, r3.first_error_step, r3.primary_error_type, r3.category) == \
        ("unjudged", -1, None, None)
    # a resumed run reuses votes that were not unjudged, for unchanged cases
    gpt2 = _ScriptedJudge("gpt", gpt.answers)
    again = locate.locate(ROWS, [RuleJudge(), gpt2, aux], previous={r.id: r for r in out})
    assert gpt2.calls == ["r3"] and [r.status for r in again] == ["accepted", "escalated", "unjudged"]
    # another policy on the same votes, without asking any judge
    redo = locate.redecide(out, Policy("rule-only"))
    assert [r.status for r in redo] == ["accepted", "escalated", "escalated"]
    assert redo[0].votes == out[0].votes and redo[0].policy == "rule-only"


@pytest.mark.parametrize("rows, judges, policy, fragment", [
    ([{"id": "a", "problem": "p", "response": "r"}], ["rule"], None, "row 1: missing field 'gold_answer'"),
    ([ROWS[0], ROWS[0]], ["rule"], None, "duplicate id 'r1'"),
    (ROWS, ["rule"], Policy("paper"), "at least one LLM judge"),
    (ROWS, ["rule"], Policy("rule-only", primary="gpt"), "primary judge 'gpt'"),
])
def test_locate_input_errors(rows, judges, policy, fragment):
    from pytest_qmr.locate.judges import RuleJudge

    with pytest.raises(LocateError, match=fragment):
        locate.locate(rows, [RuleJudge()], policy)


def test_regression_set_picks_fp_right_quant_wrong():
    def rec(i, correct, response):
        return SampleRecord(f"q{i}", i, f"prompt {i}", response, None, "5", correct)

    fp = [rec(0, True, "fp0"), rec(1, True, "fp1"), rec(2, False, "fp2"), rec(3, True, "fp3")]
    quant = [rec(0, False, "qa0"), rec(1, True, "qa1"), rec(2, False, "qa2"), rec(3, False, "qa3"),
             rec(4, False, "qa4")]
    rows = regression_set(fp, quant, problems={"q3": "What is 2 + 3?"})
    assert [r.id for r in rows] == ["q0", "q3"]
    assert rows[0].to_dict() == {"id": "q0", "doc_index": 0, "problem": "prompt 0", "response": "qa0",
                                 "gold_answer": "5", "reference_response": "fp0", "extracted": None}
    assert rows[1].problem == "What is 2 + 3?"
    assert regression_set([r.to_dict() for r in fp], [r.to_dict() for r in quant]) == regression_set(fp, quant)


# --------------------------------------------------------------------------------- error profile


def _row(i, status, t=None, step=-1, n_steps=10, vs=None):
    return {"id": f"e{i}", "status": status, "primary_error_type": t, "first_error_step": step, "n_steps": n_steps,
            "votes": {v.judge: v.to_dict() for v in (vs or [])}}


PROFILE_ROWS = [
    _row(1, "accepted", "computational_error", 1, 10, [V("a", step=1), V("b", step=1)]),
    _row(2, "accepted", "computational_error", 2, 4, [V("a"), V("b")]),
    _row(3, "accepted", "symbolic_manipulation_error", 3, 10, [V("a", "symbolic_manipulation_error", 3),
                                                               V("b", "symbolic_manipulation_error", 3)]),
    _row(4, "human", "procedural_error", 5, 5, [V("a", step=5), V("b", "procedural_error", 5)]),
    _row(5, "accepted", "contextual_oversight", 1, 2, [V("a", "contextual_oversight", 1),
                                                      V("b", "contextual_oversight", 1), U("c")]),
    _row(6, "accepted", None, -1, 3, [V("a", "no_error"), V("b", "no_error")]),  # 5.5 vs \frac{11}{2}
    _row(7, "escalated", "logical_reasoning_error", 2, 6, [V("a", "logical_reasoning_error", 2), V("b", step=4)]),
    _row(8, "unjudged", None, -1, 6, [U("a"), U("b")]),
]


def test_error_profile_numbers():
    p = error_profile(PROFILE_ROWS)
    assert p.n == 8 and p.n_final == 6 and p.n_located == 5
    assert p.status == {"accepted": 5, "human": 1, "escalated": 1, "unjudged": 1}
    assert p.categories == {"conceptual": {"count": 1, "share": 0.2}, "reasoning": {"count": 0, "share": 0.0},
                               "method": {"count": 1, "share": 0.2}, "execution": {"count": 3, "share": 0.6}}
    assert p.types["computational_error"] == {"count": 2, "share": 0.4}
    assert p.types["formula_rule_error"] == {"count": 0, "share": 0.0}
    assert sum(d["count"] for d in p.types.values()) == 5
    assert p.no_error == {"count": 1, "share": round(1 / 6, 4), "ids": ["e6"]}
    assert p.first_error_step == {"histogram": {"1": 2, "2": 1, "3": 1, "5": 1}, "median": 2, "mean": 2.4}
    # (k-1)/n: 0/10, 1/4, 2/10, 4/5, 0/2 -> bins 0.0, 0.2, 0.2, 0.8, 0.0
    bins = p.relative_first_error_step["bins"]
    assert bins["0.0-0.1"] == 2 and bins["0.2-0.3"] == 2 and bins["0.8-0.9"] == 1 and sum(bins.values()) == 5
    assert p.relative_first_error_step["median"] == 0.2
    # rows with >= 2 verdicts: e1..e7 (7); all agree in e1, e2, e3, e5, e6 -> 5/7
    assert p.judges["agreement_rate"] == round(5 / 7, 4) and p.judges["n_compared"] == 7
    assert p.judges["pairwise"] == {"a|b": round(5 / 7, 4)}
    assert p.judges["unjudged"] == {"a": 1, "b": 1, "c": 1}
    json.dumps(p.to_dict())  # storable in CellResult.error_profile


def test_error_profile_empty():
    p = error_profile([])
    assert p.n_located == 0 and p.first_error_step["median"] is None
    assert p.categories["execution"]["share"] == 0.0 and p.judges["agreement_rate"] is None
    assert check_profile(p, {"max_share.execution": 0.6, "min_median_first_error_step": 2}) == []
    assert check_profile(p, {"min_located": 1}) == [
        "number of located errors is 0 < min 1 (min_located; 0 located errors)"]


def test_check_profile_violations():
    p = error_profile(PROFILE_ROWS)
    assert check_profile(p, {"max_share.execution": 0.6, "min_median_first_error_step": 2,
                             "max_share.computational_error": 0.9}) == []
    msgs = check_profile(p, {"max_share.execution": 0.5, "min_median_first_error_step": 3,
                             "max_share.computational_error": 0.3, "min_share.reasoning": 0.1,
                             "max_share.no_error": 0.1, "min_judge_agreement": 0.9, "max_escalated_share": 0.1,
                             "max_unjudged_share": 0.5, "max_mean_first_error_step": 3})
    assert msgs == [
        "share of execution is 0.6 > max 0.5 (max_share.execution; 3 of 5 located errors)",
        "median first error step is 2 < min 3 (min_median_first_error_step; 5 located errors)",
        "share of computational_error is 0.4 > max 0.3 (max_share.computational_error; 2 of 5 located errors)",
        "share of reasoning is 0 < min 0.1 (min_share.reasoning; 0 of 5 located errors)",
        "share of no_error is 0.1667 > max 0.1 (max_share.no_error; 1 of 6 final cases)",
        "judge agreement rate is 0.7143 < min 0.9 (min_judge_agreement; 7 cases compared)",
        "share of escalated cases is 0.125 > max 0.1 (max_escalated_share; 1 of 8 cases)",
    ]


@pytest.mark.parametrize("key, fragment", [
    ("max_share.exec", "'max_share.exec': unknown key (share names:"),
    ("max_execution_share", "'max_execution_share': unknown key (known:"),
    ("min_median_step", "'min_median_step'"),
])
def test_check_profile_unknown_key(key, fragment):
    with pytest.raises(ValueError) as err:
        check_profile(error_profile(PROFILE_ROWS), {key: 0.5})
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="must be a number"):
        check_profile(error_profile(PROFILE_ROWS), {"max_share.execution": "lots"})


# --------------------------------------------------------------------------------- review queue

XSS = "<script>alert('pwned')</script>"


def _judged_rows(n_accepted=3):
    rows = [
        {"id": "esc/1", "problem": f"What is 2 + 3? {XSS}", "gold_answer": "5",
         "response": f"Step 1: 2 + 3 = 6 {XSS}\nStep 2: 6 - 1 = 5\nThe answer is 5",
         "reference_response": "Step 1: 2 + 3 = 5\nThe answer is 5", "n_steps": 2, "status": "escalated",
         "first_error_step": 1, "primary_error_type": "computational_error", "category": "execution",
         "explanation": "x", "confidence_score": 0.7, "reason": "1/3 auxiliaries agree", "policy": "paper",
         "verdict_by": "gpt", "votes": {"gpt": V("gpt", step=1, explanation=f"see {XSS}").to_dict(),
                                        "aux": U("aux").to_dict()}},
        {"id": "unj", "problem": "p", "gold_answer": "1", "response": "Step 1: hm\nStep 2: hm", "n_steps": 2,
         "status": "unjudged", "first_error_step": -1, "primary_error_type": None, "category": None, "votes": {}},
    ]
    for i in range(n_accepted):
        rows.append({"id": f"acc{i}", "problem": "p", "gold_answer": "1", "response": "Step 1: 1 + 1 = 3",
                     "n_steps": 1, "status": "accepted", "first_error_step": 1,
                     "primary_error_type": "computational_error", "category": "execution", "votes": {}})
    return rows


def test_review_queue_round_trip(tmp_path):
    rows = _judged_rows(3)
    cases = write_review_queue(rows, tmp_path / "q", audit_rate=0.02, seed=0)
    assert [c["why"] for c in cases] == ["escalated", "unjudged", "audit"]  # ceil(2% of 3) = 1 audit case
    esc = tmp_path / "q" / "cases" / case_dir_name("esc/1")
    html = (esc / "case.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    assert 'id="q1" class="faulty"' in html and 'id="q2" class=""' in html and "first faulty step" in html
    assert 'id="r1"' in html and "gpt" in html and "timeout" in html  # reference steps, every vote
    index = (tmp_path / "q" / "index.html").read_text()
    assert f"cases/{case_dir_name('esc/1')}/case.html" in index and "<script>" not in index
    blank = json.loads((esc / "human_verdict.json").read_text())
    assert blank == {"id": "esc/1", "primary_error_type": None, "error_step": None, "explanation": None,
                     "confidence_score": None, "reviewer": None}
    # nothing filled in: nothing changes
    assert [r.to_dict() for r in import_reviews(tmp_path / "q", rows)] == rows
    (esc / "human_verdict.json").write_text(json.dumps({**blank, "primary_error_type": "procedural_error",
                                                        "error_step": 2, "explanation": "wrong operation",
                                                        "reviewer": "ann"}))
    unj = tmp_path / "q" / "cases" / case_dir_name("unj") / "human_verdict.json"
    unj.write_text(json.dumps({"id": "unj", "primary_error_type": "no_error", "error_step": -1,
                               "explanation": "5.5 is \\frac{11}{2}", "confidence_score": 1}))
    merged = import_reviews(tmp_path / "q", rows)
    m0, m1 = merged[0], merged[1]
    assert (m0.status, m0.first_error_step, m0.primary_error_type, m0.category) == \
        ("human", 2, "procedural_error", "method")
    assert m0.pre_review_status == "escalated" and m0.human_review["reviewer"] == "ann"
    assert m0.to_dict()["votes"] == rows[0]["votes"]
    assert (m1.status, m1.first_error_step, m1.primary_error_type) == ("human", -1, None)
    assert rows[0]["status"] == "escalated"  # inputs untouched
    assert error_profile(merged).status["human"] == 2
    # rebuilding the queue keeps filled-in verdicts
    write_review_queue(merged, tmp_path / "q", audit_rate=0.02, seed=0)
    assert json.loads((esc / "human_verdict.json").read_text())["reviewer"] == "ann"


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON (line 1"),
    ('["a"]', "must be a JSON object"),
    ('{"primary_error_type": "oops", "error_step": 1}', "field 'primary_error_type'"),
    ('{"primary_error_type": "computational_error", "error_step": 7}', "field 'error_step': 7 is outside 1..2"),
    ('{"primary_error_type": "computational_error", "error_step": null, "explanation": "x"}',
     "field 'error_step': missing"),
    ('{"primary_error_type": "computational_error", "error_step": 1, "confidence_score": 7000}',
     "field 'confidence_score'"),
    ('{"id": "other", "primary_error_type": "computational_error", "error_step": 1}', "field 'id'"),
    ('{"primary_error_type": "computational_error", "error_step": 1, "reviewer": 5}', "field 'reviewer'"),
])
def test_import_reviews_malformed_verdict_names_file_and_field(tmp_path, content, fragment):
    rows = _judged_rows(0)
    write_review_queue(rows, tmp_path / "q")
    path = tmp_path / "q" / "cases" / case_dir_name("esc/1") / "human_verdict.json"
    path.write_text(content)
    with pytest.raises(ReviewError) as err:
        import_reviews(tmp_path / "q", rows)
    msg = str(err.value)
    assert msg.startswith(str(path)) and fragment in msg and "\n" not in msg


def test_audit_sample_is_seeded_two_percent():
    rows = [{"id": f"a{i:03d}", "status": "accepted"} for i in range(250)] + [{"id": "e", "status": "escalated"}]
    pick = select_cases(rows, 0.02, seed=7)
    audit = [r.id for r, why in pick if why == "audit"]
    assert len(audit) == 5 and pick[0][1] == "escalated"
    assert audit == [r.id for r, why in select_cases(list(reversed(rows)), 0.02, seed=7) if why == "audit"]
    assert audit != [r.id for r, why in select_cases(rows, 0.02, seed=8) if why == "audit"]
    assert [w for _, w in select_cases(rows, 0.0)] == ["escalated"]


# --------------------------------------------------------------------------------- CLI

TRACES = [
    {"id": "t1", "problem": "Tom has 3 bags of 4 apples and buys 5 more. How many?", "gold_answer": "17",
     "response": "Step 1: 3 * 4 = 12 apples.\nStep 2: 12 + 5 = 18 apples.\nThe answer is 18"},
    {"id": "t2", "problem": "Half of 10, plus 3?", "gold_answer": "8",
     "response": "Step 1: Half of 10 is 4.\nStep 2: Then add 3 to get 7.\nThe answer is 7",
     "reference_response": "Step 1: 10 / 2 = 5\nStep 2: 5 + 3 = 8\nThe answer is 8"},
    {"id": "t3", "problem": "2 + 2?", "gold_answer": "4", "response": "Step 1: 2 + 2 = 4\nThe answer is 4"},
    {"id": "t4", "problem": "6 * 7?", "gold_answer": "42", "response": "Step 1: 6 * 7 = 48\nThe answer is 48"},
]


def _write_traces(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in TRACES))
    return path


def test_cli_judge_with_rule_judge(tmp_path, capsys):
    traces = _write_traces(tmp_path / "traces.jsonl")
    out = tmp_path / "judged.jsonl"
    rc = cli.main(["judge", "--input", str(traces), "--judges", "rule", "--out", str(out),
                      "--review-dir", str(tmp_path / "review"), "--profile", str(tmp_path / "profile.json"),
                      "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t1", "t2", "t4"]  # t3's answer is right: skipped
    assert [(r["status"], r["first_error_step"], r["primary_error_type"]) for r in rows] == [
        ("accepted", 2, "computational_error"), ("escalated", -1, None), ("accepted", 1, "computational_error")]
    assert rows[0]["policy"] == "rule-only" and rows[0]["category"] == "execution"
    assert not (tmp_path / "judged.jsonl.partial").exists()
    err = capsys.readouterr().err
    assert "3 of 4 rows have a wrong answer" in err and "2 accepted, 1 escalated" in err
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["types"]["computational_error"]["count"] == 2
    review = tmp_path / "review"
    manifest = json.loads((review / "queue.json").read_text())
    assert [c["id"] for c in manifest["cases"]][0] == "t2" and len(manifest["cases"]) == 2  # + 1 audit
    # review import through the CLI
    verdict = review / "cases" / case_dir_name("t2") / "human_verdict.json"
    verdict.write_text(json.dumps({"id": "t2", "primary_error_type": "computational_error", "error_step": 1}))
    rc = cli.main(["review", "import", "--queue", str(review), "--judged", str(out),
                      "--out", str(tmp_path / "reviewed.jsonl")])
    assert rc == 0
    reviewed = [json.loads(line) for line in (tmp_path / "reviewed.jsonl").read_text().splitlines()]
    assert reviewed[1]["status"] == "human" and reviewed[1]["first_error_step"] == 1
    # --all judges every row; review build from a judged file
    rc = cli.main(["judge", "--input", str(traces), "--out", str(out), "--all", "--no-progress"])
    assert rc == 0 and len(out.read_text().splitlines()) == 4
    assert cli.main(["review", "build", "--judged", str(out), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "index.html").is_file()


@pytest.mark.parametrize("argv, fragment", [
    (["--judges", "rule,gpt4"], "unknown judge 'gpt4'"),
    (["--judges", "rule", "--policy", "paper"], "needs at least one LLM judge"),
    (["--judges", "rule", "--kind", "words"], "--kind must be one of"),
])
def test_cli_judge_errors_are_one_line(tmp_path, capsys, argv, fragment):
    traces = _write_traces(tmp_path / "traces.jsonl")
    rc = cli.main(["judge", "--input", str(traces), "--out", str(tmp_path / "o.jsonl"), "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and fragment in err[-1] and err[-1].startswith("qmr judge:")


def test_cli_bad_input_line(tmp_path, capsys):
    bad = tmp_path / "traces.jsonl"
    bad.write_text(json.dumps(TRACES[0]) + "\n{oops\n")
    assert cli.main(["judge", "--input", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_cli_resumes_from_partial(tmp_path):
    traces = _write_traces(tmp_path / "traces.jsonl")
    out = tmp_path / "judged.jsonl"
    cli.main(["judge", "--input", str(traces), "--out", str(out), "--no-progress"])
    first = out.read_text().splitlines()[0]
    # a partial file left by an interrupted run: its (doctored) vote is reused, not recomputed
    row = json.loads(first)
    row["votes"]["rule"]["explanation"] = "from the interrupted run"
    (tmp_path / "judged.jsonl.partial").write_text(json.dumps(row) + "\n")
    cli.main(["judge", "--input", str(traces), "--out", str(out), "--no-progress"])
    again = json.loads(out.read_text().splitlines()[0])
    assert again["votes"]["rule"]["explanation"] == "from the interrupted run"
    assert not (tmp_path / "judged.jsonl.partial").exists()


# ------------------------------------------------------------------------ a cell's regressions


def test_locate_cell_with_the_arith_labeller_and_rule_judge():
    """A cell's regressions judged by the exact arith labeller (primary) and the rule judge."""
    from pytest_qmr import arith
    from pytest_qmr.locate.judges import ArithJudge, RuleJudge
    from pytest_qmr.locate import error_profile, locate_cell

    problems = [p for p in arith.generate("test", 500, 0) if len(p.steps) >= 3][:3]
    slip, wrong_op, solved = problems
    s1, s2 = slip.steps[0], slip.steps[1]
    slipped = (f"Step 1: {s1.a} {s1.op} {s1.b} = {s1.result}\nStep 2: {s2.a} {s2.op} {s2.b} = {s2.result + 1}\n"
               f"The answer is {s2.result + 1}.")
    w1 = wrong_op.steps[0]
    other = "+" if w1.op != "+" else "*"
    value = arith.apply(w1.a, other, w1.b) if other == "*" else w1.a + w1.b
    swapped = f"Step 1: {w1.a} {other} {w1.b} = {value}\nThe answer is {value}."
    fp_items = {p.id: {"correct": True, "response": p.solution(), "doc_index": i} for i, p in enumerate(problems)}
    fp_items["arith-test-not-in-set"] = {"correct": True, "response": "Step 1: 1 + 1 = 2", "doc_index": 9}
    quant = [
        SampleRecord(slip.id, 0, "prompt", slipped, str(s2.result + 1), str(slip.answer), False),
        SampleRecord(wrong_op.id, 1, "prompt", swapped, str(value), str(wrong_op.answer), False),
        SampleRecord(solved.id, 2, "prompt", solved.solution(), str(solved.answer), str(solved.answer), True),
        SampleRecord("arith-test-not-in-set", 9, "prompt", "Step 1: 1 + 1 = 3", "3", "2", False),
    ]
    rows = {r.id: r for r in locate_cell(fp_items, quant, [ArithJudge(), RuleJudge()])}
    assert set(rows) == {slip.id, wrong_op.id, "arith-test-not-in-set"}  # the solved item is no regression
    assert (rows[slip.id].first_error_step, rows[slip.id].primary_error_type) == (2, "computational_error")
    assert rows[slip.id].status == "accepted" and rows[slip.id].agreement == 1.0  # rule judge agrees
    assert (rows[wrong_op.id].first_error_step, rows[wrong_op.id].primary_error_type) == (1, "procedural_error")
    assert rows[wrong_op.id].reference_response == wrong_op.solution()
    # not a qmr_arith problem: the labeller abstains, the rule judge's slip is escalated, not accepted
    assert rows["arith-test-not-in-set"].status == "escalated"
    profile = error_profile(list(rows.values()))
    assert profile.n_located == 2
    assert profile.categories["execution"]["count"] == 1 and profile.categories["method"]["count"] == 1
    assert locate_cell(fp_items, quant[2:3], [RuleJudge()]) == []  # nothing regressed, nothing judged
