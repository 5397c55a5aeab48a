"""Ground-truth labels for qmr_arith: hand-checked cases for every type, errors planted at a
known step of generated gold solutions, ProcessBench F1 and the rule judge's agreement."""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from pytest_qmr import arith
from pytest_qmr.arith import ArithProblem, ArithStep
from pytest_qmr.locate.judges import rule as rule_judge
from pytest_qmr.locate.judges.arith import compute, label, processbench_f1
from pytest_qmr.steps import cut_before, segment

# 12 + 5 = 17, 17 * 2 = 34, 34 - 4 = 30
PROBLEM = ArithProblem("hand", "Mia has 12 apples. She buys 5 more. The number doubles. She gives away 4.",
                       (ArithStep(12, "+", 5, 17), ArithStep(17, "*", 2, 34), ArithStep(34, "-", 4, 30)), 30)


def _response(*lines: str, answer: str | None = None) -> str:
    text = "\n".join(f"Step {k}: {line}" for k, line in enumerate(lines, 1))
    return text if answer is None else f"{text}\nThe answer is {answer}."


@pytest.mark.parametrize("lines, answer, status, step, error_type", [
    (["12 + 5 = 17", "17 * 2 = 34", "34 - 4 = 30"], "30", "correct", -1, None),
    (["5 + 12 = 17", "2 × 17 = 34", "34 − 4 = 30"], "30", "correct", -1, None),  # commuted, unicode ops
    (["12 apples + 5 apples = 17 apples", "17 x 2 = 34", "34 - 4 = 30"], "30", "correct", -1, None),
    (["12 + 5 = 17 * 2 = 34", "34 - 4 = 30"], "30", "correct", -1, None),  # a running chain
    (["Mia starts with 12 apples.", "12 + 5 = 17", "17 * 2 = 34", "34 - 4 = 30"], "30", "correct", -1, None),
    # computational: the wrong result of the right operation on the right operands
    (["12 + 5 = 17", "17 * 2 = 36", "36 - 4 = 32"], "32", "error", 2, "computational_error"),
    # carried forward correctly: only the first faulty step counts
    (["12 + 5 = 18", "18 * 2 = 36", "36 - 4 = 32"], "32", "error", 1, "computational_error"),
    # procedural: a wrong operator / an operand from nowhere / reversed operands
    (["12 + 5 = 17", "17 + 2 = 19", "19 - 4 = 15"], "15", "error", 2, "procedural_error"),
    (["12 + 5 = 17", "17 * 3 = 51", "51 - 4 = 47"], "47", "error", 2, "procedural_error"),
    (["12 + 5 = 17", "17 * 2 = 34", "4 - 34 = -30"], "-30", "error", 3, "procedural_error"),
    (["12 + 5 = 17", "17 * 3 = 52"], "52", "error", 2, "procedural_error"),  # method beats execution
    # logical: skipping ahead, repeating, dropping the carried value, extra work, stopping early
    (["12 + 5 = 17", "17 - 4 = 13"], "13", "error", 2, "logical_reasoning_error"),
    (["12 + 5 = 17", "17 + 5 = 22", "22 * 2 = 44"], "44", "error", 2, "logical_reasoning_error"),
    (["12 + 5 = 17", "12 * 2 = 24", "24 - 4 = 20"], "20", "error", 2, "logical_reasoning_error"),
    (["12 + 5 = 17", "17 * 2 = 34", "34 - 4 = 30", "30 + 4 = 34"], "34", "error", 4, "logical_reasoning_error"),
    (["12 + 5 = 17", "17 * 2 = 34"], "34", "error", 3, "logical_reasoning_error"),
    # symbolic manipulation: the carried value miscopied (digits swapped), arithmetic right
    (["12 + 5 = 17", "71 * 2 = 142", "142 - 4 = 138"], "138", "error", 2, "symbolic_manipulation_error"),
    (["12 + 5 = 17", "17 * 2 = 34", "34 - 4 = 30"], "3", "error", 4, "symbolic_manipulation_error"),
    (["12 + 5 = 17", "17 * 2 = 34", "34 - 4 = 30"], "34", "error", 4, "logical_reasoning_error"),
    # format collapse
    (["12 + 5 = 17", "17 * * = 2 2"], "9", "format_collapse", 2, None),
    (["12 + 5 = 17", "17 * 2 = 34"], None, "format_collapse", 3, None),
    (["12 + 5 - 3 = 14"], "14", "format_collapse", 1, None),
])
def test_hand_checked(lines, answer, status, step, error_type):
    result = label(PROBLEM, _response(*lines, answer=answer))
    assert (result.status, result.first_error_step, result.primary_error_type) == (status, step, error_type), result
    assert result.explanation


def test_no_steps_at_all():
    assert label(PROBLEM, "I don't know.").status == "format_collapse"
    assert label(PROBLEM, "The answer is 7.").first_error_step == 1


def test_every_type_that_applies_is_listed_earliest_first():
    result = label(PROBLEM, _response("12 + 5 = 17", "17 * 3 = 52", answer="52"))
    assert result.types == ("procedural_error", "computational_error")
    assert result.gold_step == 2


def test_a_correct_answer_without_the_answer_line_is_correct():
    assert label(PROBLEM, _response("12 + 5 = 17", "17 * 2 = 34", "34 - 4 = 30")).status == "correct"


# ---------------------------------------------------------------------------------------------
# planted errors on generated gold solutions


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{float(v):g}"


def _render(ops: list[tuple[Fraction, str, Fraction, Fraction]], answer: Fraction | None) -> str:
    lines = [f"Step {k}: {_fmt(x)} {op} {_fmt(y)} = {_fmt(z)}" for k, (x, op, y, z) in enumerate(ops, 1)]
    if answer is not None:
        lines.append(f"The answer is {_fmt(answer)}.")
    return "\n".join(lines)


def _continue(value: Fraction, rest: tuple[ArithStep, ...]) -> list[tuple[Fraction, str, Fraction, Fraction]]:
    """The remaining gold operations applied, correctly, to the response's own carried value."""
    out = []
    for step in rest:
        z = compute(value, step.op, Fraction(step.b))
        if z is None or z.denominator != 1:
            break  # a division that no longer comes out even: the response stops here
        out.append((value, step.op, Fraction(step.b), z))
        value = z
    return out


def _finish(ops, rest) -> str:
    ops = ops + _continue(ops[-1][3], rest)
    return _render(ops, ops[-1][3])


def _gold_ops(problem: ArithProblem, upto: int):
    return [(Fraction(s.a), s.op, Fraction(s.b), Fraction(s.result)) for s in problem.steps[:upto]]


def _numbers(problem: ArithProblem) -> set[int]:
    return {problem.steps[0].a} | {s.b for s in problem.steps} | {s.result for s in problem.steps}


def plant(problem: ArithProblem, k: int, kind: str, rng: random.Random) -> tuple[str, str, int] | None:
    """A response with an error of ``kind`` at step ``k`` (1-based) that carries on correctly from
    there; returns (response, expected type or status, expected step) or None if not plantable."""
    steps = problem.steps
    gold = steps[k - 1]
    before = _gold_ops(problem, k - 1)
    c, b = Fraction(gold.a), Fraction(gold.b)
    rest = steps[k:]
    if kind == "computational_error":
        z = Fraction(gold.result + rng.choice([d for d in (1, -1, 2, -2, 10) if gold.result + d != gold.result]))
        return _finish(before + [(c, gold.op, b, z)], rest), kind, k
    if kind == "computational_error:not_carried":  # later steps keep the gold text
        z = gold.result + rng.choice([1, -1, 10])
        lines = problem.solution().split("\n")
        lines[k - 1] = f"Step {k}: {gold.a} {gold.op} {gold.b} = {z}"
        return "\n".join(lines), "computational_error", k
    if kind == "procedural_error:operator":
        others = [op for op in "+-*/" if op != gold.op
                  and (op, gold.b) not in {(s.op, s.b) for s in steps}
                  and (z := compute(c, op, b)) is not None and z.denominator == 1]
        if not others:
            return None
        op = rng.choice(others)
        return _finish(before + [(c, op, b, compute(c, op, b))], rest), "procedural_error", k
    if kind == "procedural_error:operand":
        used = _numbers(problem)
        pool = [v for v in range(2, 10) if v not in used
                and (z := compute(c, gold.op, Fraction(v))) is not None and z.denominator == 1]
        if not pool:
            return None
        y = Fraction(rng.choice(pool))
        return _finish(before + [(c, gold.op, y, compute(c, gold.op, y))], rest), "procedural_error", k
    if kind == "logical_reasoning_error":
        if k == len(steps):
            return None
        nxt = steps[k]
        z = compute(c, nxt.op, Fraction(nxt.b))
        if nxt.b == gold.b or z is None or z.denominator != 1:
            return None
        return _finish(before + [(c, nxt.op, Fraction(nxt.b), z)], steps[k + 1:]), kind, k
    if kind == "logical_reasoning_error:stop":
        if k == 1:
            return None
        return _render(before, before[-1][3]), "logical_reasoning_error", k
    if kind == "symbolic_manipulation_error":
        digits = str(gold.a)
        if k == 1 or len(digits) < 2 or digits[0] == digits[1] or gold.a == gold.b:
            return None  # (46 + 46 miscopied as 64 + 46 reads as a wrong operand just as well)
        x = Fraction(int(digits[1] + digits[0] + digits[2:]))
        z = compute(x, gold.op, b)
        if x in {Fraction(v) for v in _numbers(problem)} or z is None or z.denominator != 1 or digits[1] == "0":
            return None
        return _finish(before + [(x, gold.op, b, z)], rest), kind, k
    if kind == "format_collapse":
        ops = _render(before, None)
        garbled = f"Step {k}: {_fmt(c)} {gold.op} {gold.op} = {gold.b} {gold.b}"
        return (f"{ops}\n{garbled}" if ops else garbled) + "\nThe answer is 0.", kind, k
    raise ValueError(kind)


KINDS = [
    "computational_error", "computational_error:not_carried", "procedural_error:operator", "procedural_error:operand",
    "logical_reasoning_error", "logical_reasoning_error:stop", "symbolic_manipulation_error", "format_collapse",
]


@pytest.fixture(scope="module")
def problems():
    return arith.generate("test", 150, seed=11, min_steps=2, max_steps=5)


@pytest.fixture(scope="module")
def planted(problems):
    rng = random.Random(0)
    cases = []
    for problem in problems:
        for k in range(1, len(problem.steps) + 1):
            for kind in KINDS:
                case = plant(problem, k, kind, rng)
                if case is not None:
                    cases.append((problem, kind, *case))
    return cases


def test_generated_values_stay_in_the_lab_range(problems):
    """Every value a step works on or gives is an integer in [1, MAX_VALUE]; + and - move at most
    MAX_ADDEND; train and test never share a problem."""
    for p in problems:
        assert 2 <= len(p.steps) <= 5
        for s in p.steps:
            assert 1 <= s.a <= arith.MAX_VALUE and 1 <= s.result <= arith.MAX_VALUE, p.solution()
            if s.op in "+-":
                assert 1 <= s.b <= arith.MAX_ADDEND, p.solution()
    train = {p.id.split("-")[-1] for p in arith.generate("train", 400, seed=11, min_steps=2, max_steps=5)}
    assert not train & {p.id.split("-")[-1] for p in problems}


def test_gold_solutions_are_correct(problems):
    for problem in problems:
        result = label(problem, problem.solution())
        assert result.status == "correct" and result.first_error_step == -1, (problem.solution(), result)


def test_planted_errors_are_located_and_typed(planted):
    counts = Counter(kind for _, kind, *_ in planted)
    wrong = []
    for problem, kind, response, expected, step in planted:
        result = label(problem, response)
        got = result.primary_error_type or result.status
        if (result.first_error_step, got) != (step, expected):
            wrong.append((kind, step, response, result))
    print(f"\nplanted arith errors: {len(planted)} cases, {dict(counts)}; mislabelled {len(wrong)}")
    assert all(counts[kind] >= 50 for kind in KINDS), counts
    assert not wrong, wrong[:5]


def test_cut_before_the_labelled_step_is_an_exact_prefix(planted):
    for problem, _, response, _, _ in planted[:300]:
        result = label(problem, response)
        prefix = cut_before(response, result.first_error_step)
        assert response.startswith(prefix)
        assert len(segment(prefix)) == result.first_error_step - 1


# ---------------------------------------------------------------------------------------------
# ProcessBench F1


def test_processbench_f1_definition():
    score = processbench_f1([2, 3, -1, -1, 1], [2, 1, -1, 4, -1])
    # erroneous traces: labels 2, 1, 4 -> predicted 2 (hit), 3 (miss), -1 (miss): 1/3
    # correct traces: labels -1, -1 -> predicted -1 (hit), 1 (miss): 1/2
    assert score.n_error == 3 and score.n_correct == 2
    assert score.error_acc == pytest.approx(1 / 3) and score.correct_acc == pytest.approx(1 / 2)
    assert score.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)) == float(score)
    assert processbench_f1([1, -1], [1, -1]).f1 == 1.0
    assert processbench_f1([-1, 1], [1, -1]).f1 == 0.0
    assert math.isnan(processbench_f1([1], [1]).f1)
    with pytest.raises(ValueError):
        processbench_f1([1], [1, 2])


def test_rule_judge_agrees_with_the_labeller_on_computational_errors(problems, planted):
    clean = [(p.solution(), -1) for p in problems]
    comp = [(response, label(p, response).first_error_step) for p, kind, response, _, _ in planted
            if kind.startswith("computational_error")]
    traces = clean + comp
    predictions = [rule_judge.judge(text).predicted_step for text, _ in traces]
    labels = [lab for _, lab in traces]
    score = processbench_f1(predictions, labels)
    print(f"\nrule judge vs labeller on {len(clean)} clean + {len(comp)} computational-error arith traces: "
          f"ProcessBench F1 {score.f1:.3f} (error acc {score.error_acc:.3f}, correct acc {score.correct_acc:.3f})")
    assert len(traces) >= 300
    assert score.f1 >= 0.95
    # On every planted kind the judge only sees the arithmetic, so method and reasoning errors
    # (whose arithmetic is right) read as clean: report it, do not gate on it.
    everything = clean + [(r, label(p, r).first_error_step) for p, _, r, _, _ in planted]
    overall = processbench_f1([rule_judge.judge(t).predicted_step for t, _ in everything],
                              [lab for _, lab in everything])
    print(f"rule judge vs labeller on all {len(everything)} traces (every kind): ProcessBench F1 {overall.f1:.3f}")


# ---------------------------------------------------------------------------------------------
# taxonomy


def test_taxonomy_order_and_validation():
    from pytest_qmr import taxonomy

    assert len(taxonomy.TYPES) == 7 and set(taxonomy.CATEGORY_OF.values()) == set(taxonomy.CATEGORIES)
    assert taxonomy.TYPES[0] == "conceptual_misunderstanding" and taxonomy.TYPES[-1] == "symbolic_manipulation_error"
    mixed = ["computational_error", "procedural_error", "logical_reasoning_error"]
    assert taxonomy.earliest(mixed) == "logical_reasoning_error"
    assert taxonomy.earliest(["symbolic_manipulation_error", "computational_error"]) == "computational_error"
    assert taxonomy.CATEGORY_OF["formula_rule_error"] == "method"
    with pytest.raises(ValueError, match="unknown error type 'arithmetic_error'"):
        taxonomy.earliest(["arithmetic_error"])
    with pytest.raises(ValueError):
        taxonomy.earliest([])
