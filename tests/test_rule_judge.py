"""The deterministic arithmetic judge: expression forms one by one, then the real GSM8K test set
(1,319 gold solutions): false positives on unaltered solutions and planted-slip detection."""

from __future__ import annotations

import json
import random
import re

import pytest

from pytest_qmr.locate.judges import rule as rule_judge
from pytest_qmr.locate.judges.rule import check_text, judge
from pytest_qmr.steps import segment


def _holds(text: str) -> list[bool]:
    return [c.holds for c in check_text(text)]


@pytest.mark.parametrize("text, expected", [
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.", [True]),
    ("She makes $2 * 9 = $18 every day.", [True]),
    ("80 GB / 2 GB/minute = 40 minutes", [True]),
    ("x = 5/2 = 2.5", [True]),
    ("12 = 3 * 4 = 2 * 6", [True]),
    ("3 × 4 = 12 and 12 ÷ 4 = 3", [True, True]),
    ("3 x 4 = 12", [True]),
    ("25 miles per gallon x 12 gallons = 300 miles", [True]),
    ("80,000+50,000=$130,000", [True]),
    ("1,000,000 / 1,000 = 1,000", [True]),
    ("25% of 80 = 20", [True]),
    ("100% - 20% = 80%", [True]),
    ("1.2 * 100 = 120%", [True]),
    (r"$\frac{3}{4} \times 8 = 6$", [True]),
    (r"\dfrac{1}{2} \cdot 10 = 5", [True]),
    (r"$2 \div 4 = 0.5$", [True]),
    ("It takes 2/2=<<2/2=1>>1 bolt of white fiber", [True, True]),
    ("10/3 = 3.33", [True]),
    ("2/3 = 0.67 or 0.66 = 2/3", [True]),
    ("100 / 3 = 33 stickers each, 1 left over", [True]),
    ("2*3 = 6+4 = 10", [True]),
    ("5 - 1 - 1/2 = 3 1/2 hours", [True]),
    ("25 / 1/3 = 75", [True]),
    ("2(3+4) = 14", [True]),
    ("2^3 = 8", [True]),
    ("-5 + 3 = -2", [True]),
    ("10 divided by 2 = 5, and 5 times 3 = 15", [True, True]),
    ("(16 - 3 - 4 = 9)", [True]),
    ("10/3 ≈ 3", [True]),
    ("Drop 8 degrees = 2 - 8 = -6", [True]),  # the opening "8 degrees" is a label, not a claim
    # false equalities
    ("3 x 4 = 13", [False]),
    ("2.5 + 1.2 = 3.6", [False]),
    ("10/3 = 3.4", [False]),
    ("2*3 = 6+4 = 11", [False]),
    ("It takes 2/2=<<2/2=1>>2 bolts", [False, True]),
    (r"\frac{3}{4} \times 8 = 7", [False]),
    ("80,000 + 50,000 = 120,000", [False]),
])
def test_expression_forms(text, expected):
    assert _holds(text) == expected


@pytest.mark.parametrize("text", [
    "x = 5/2",  # an assignment: nothing to check
    "2x + 3 = 8",  # algebra
    "2 hours = 120 minutes",  # a unit conversion between two bare numbers
    "5 apples and 3 pears = 8 fruits",  # no operator between the operands
    "Total - 5 = 10",  # a side with a word operand
    r"\sqrt{16} + 2 = 6",  # a function
    "25 classmates + his 1 teacher + 1 himself = 27 people",  # the sum runs through prose
    "Drop 8 degrees = 2 - 8",  # a bare number opening a chain names a quantity
    "He left at 6:00 + 18 hours = 00:00",  # clock times
    "She bought 3 1/2 pounds.",  # no equality at all
    "His 2-slice sandwiches",  # a hyphen is no minus
])
def test_not_checkable(text):
    assert check_text(text) == []


def test_verdicts():
    ok = judge("Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 18\nThe answer is 18.")
    assert (ok.status, ok.checked, ok.first_error_step, ok.predicted_step) == ("no_error_found", 2, -1, -1)
    bad = judge("Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 20\nStep 3: 20 + 1 = 22\nThe answer is 22.")
    assert bad.status == "error" and bad.first_error_step == 2 and bad.predicted_step == 2
    assert bad.primary_error_type == "computational_error"
    assert bad.expression == "9 * 2 = 20" and bad.expected == "18"
    none = judge("Let x be the number of apples. Then x = 5/2.\nThe answer is 5/2.")
    assert none.status == "no_verdict" and none.first_error_step == -1 and none.checked == 0
    frac = judge("Step 1: 10 / 4 = 2.6")
    assert frac.status == "error" and frac.expected == "2.5"
    third = judge("Step 1: 10 / 3 = 3.4")
    assert third.expected.startswith("10/3")


def test_the_final_answer_line_is_not_judged():
    assert judge("Step 1: 2 + 2 = 4\nThe answer is 2 + 2 = 5.").status == "no_error_found"


# ---------------------------------------------------------------------------------------------
# GSM8K gold solutions

# An equation line: a visible "=" right before the calculator annotation, whose result follows it.
_EQUATION = re.compile(
    r"=\s*[$€£]?\s*<<([^<>]*)=([^<>=]*)>>\s*[$€£]?(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)"
)
_DELTAS = (1, -1, 2, 3, 10)


@pytest.fixture(scope="module")
def gsm8k_test(data_dir):
    with open(data_dir / "gsm8k" / "test.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 1319
    return rows


def test_false_positive_rate_on_gold_solutions(gsm8k_test):
    failures = []
    no_verdict = checked = 0
    for i, row in enumerate(gsm8k_test):
        verdict = judge(row["answer"])
        checked += verdict.checked
        no_verdict += verdict.status == "no_verdict"
        if verdict.status == "error":
            failures.append((i, verdict.expression, verdict.expected))
    rate = len(failures) / len(gsm8k_test)
    print(f"\nrule judge on {len(gsm8k_test)} GSM8K gold solutions: {len(failures)} flagged "
          f"(false-positive rate {rate:.2%}), {no_verdict} without a verdict, {checked} equalities checked")
    for i, expression, expected in failures:
        print(f"  #{i}: {expression!r} (computes to {expected})")
    assert rate < 0.01, failures
    assert no_verdict / len(gsm8k_test) < 0.05


def _plant(answer: str, rng: random.Random) -> tuple[str, int] | None:
    """Change the result of one equation line (annotation and visible number alike); nothing
    else changes and nothing is propagated. Returns the text and the planted character offset."""
    sites = [m for m in _EQUATION.finditer(answer) if re.search(r"[-+*/]", m.group(1).lstrip("-"))]
    if not sites:
        return None
    site = rng.choice(sites)
    try:
        result = float(site.group(2))
    except ValueError:
        return None
    new = result + rng.choice(_DELTAS)
    text = f"{int(new)}" if new == int(new) else f"{new:g}"
    (a, b), (c, d) = site.span(2), site.span(3)
    return answer[:a] + text + answer[b:c] + text + answer[d:], a


@pytest.mark.parametrize("annotations", ["kept", "stripped"])
def test_planted_slips_are_found(gsm8k_test, annotations):
    planted = found = 0
    misses = []
    for i, row in enumerate(gsm8k_test):
        result = _plant(row["answer"], random.Random(i))
        if result is None:
            continue
        text, offset = result
        line = text[:offset].count("\n")
        if annotations == "stripped":  # what a model that writes no calculator annotations shows
            text = rule_judge.lift_annotations(text)[0]
        line_start = sum(len(ln) + 1 for ln in text.split("\n")[:line])
        want = next(s.index for s in segment(text) if s.start_char <= line_start + 1 <= s.end_char)
        verdict = judge(text)
        planted += 1
        if verdict.status == "error" and verdict.first_error_step == want:
            found += 1
        else:
            misses.append((i, want, verdict.status, verdict.first_error_step))
    rate = found / planted
    print(f"\nplanted slips ({annotations} annotations): found {found}/{planted} = {rate:.2%}")
    assert planted > 1200
    assert rate >= 0.95, misses[:20]
