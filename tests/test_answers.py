"""pytest_qmr.answers on hand cases and on the real gold answers of the local benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pytest_qmr.answers import extract_answer, gsm8k_gold, is_equivalent


def _data_dir() -> Path | None:
    root = os.environ.get("QMR_DATA_DIR")
    path = Path(root) if root else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None


DATA = _data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="benchmark data not found (../shared/data or $QMR_DATA_DIR)")


def _jsonl(rel: str) -> list[dict]:
    with (DATA / rel).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("response", "kind", "expected"),
    [
        ("Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 18\nThe answer is 18.", "number", "18"),
        ("The answer is 1,000.", "number", "1000"),
        ("The answer is $18.", "number", "18"),
        ("The answer is 18 dollars.", "number", "18"),
        ("The answer is 5.50.", "number", "5.50"),
        ("The answer is -3.", "number", "-3"),
        ("The answer is 50%.", "number", "50"),
        ("The answer is x = 5.", "number", "5"),
        ("The answer is 3/4.", "number", "3/4"),
        ("so the total is \\boxed{\\$1,234.50}", "number", "1234.50"),
        ("\\boxed{7} but the answer is 9.", "number", "7"),  # boxed first
        ("The answer is 4. Wait, the answer is 6.", "number", "6"),  # last clause
        ("He has 3 apples and then 12 apples", "number", "12"),  # last number fallback
        ("The answer is \\boxed{\\frac{1}{2}}.", "latex", "\\frac{1}{2}"),
        ("The answer is \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "latex", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("x = \\boxed{\\frac{\\sqrt{3}}{2}} done", "latex", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("The final answer is $\\dfrac{11}{2}$.", "latex", "\\dfrac{11}{2}"),
        ("The answer is (B).", "choice", "B"),
        ("answer: C", "choice", "C"),
        ("Therefore \\boxed{D}", "choice", "D"),
        ("The answer is \\boxed{\\text{(A)}}.", "choice", "A"),
        ("B", "choice", "B"),
        ("(c) because it is", "choice", "C"),
    ],
)
def test_extract_answer(response, kind, expected):
    assert extract_answer(response, kind) == expected


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        ("", "number"),
        ("no digits here", "number"),
        ("The answer is unclear", "number"),
        ("5 is my guess", "latex"),  # latex needs \boxed or an answer clause
        ("A good question, hard to say.", "choice"),  # the article "A" is no answer
        ("The answer is a dog.", "choice"),
        ("\\boxed{", "latex"),
        ("}}}{{{\\boxed{\\frac{", "number"),
    ],
)
def test_extract_answer_none(response, kind):
    assert extract_answer(response, kind) is None


@pytest.mark.parametrize("garbage", [None, 42, b"bytes", "\x00\x01", "\\boxed{" * 200, "9" * 5000])
@pytest.mark.parametrize("kind", ["number", "latex", "choice"])
def test_garbage_never_raises(garbage, kind):
    extracted = extract_answer(garbage, kind)
    assert extracted is None or isinstance(extracted, str)
    assert is_equivalent(garbage, "1", kind) in (True, False)
    assert is_equivalent(extracted, "A" if kind == "choice" else "1", kind) in (True, False)


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError):
        extract_answer("The answer is 1.", "integer")


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("pred", "gold", "kind"),
    [
        ("1,000", "1000", "number"),
        ("5.50", "5.5", "number"),
        ("$18", "18", "number"),
        ("18.0", "18", "number"),
        ("0.5", "1/2", "number"),
        ("\\frac{1}{2}", "0.5", "number"),
        ("3.3333333", "3.33333", "number"),  # a gold written rounded (MAWPS)
        ("2/3", "0.6666666667", "number"),
        ("5.5", "\\frac{11}{2}", "latex"),
        ("\\frac{11}{2}", "5.5", "latex"),
        ("\\dfrac{11}{2}", "5.5", "latex"),
        ("\\dfrac{11}{2}", "\\frac{11}{2}", "latex"),
        ("25", "025", "latex"),
        ("90", "90^\\circ", "latex"),
        ("-2, 1", "1,-2", "latex"),
        ("x=5", "5", "latex"),
        ("2\\sqrt{3}", "\\sqrt{12}", "latex"),
        ("B", "B", "choice"),
        ("(b)", "B", "choice"),
    ],
)
def test_equivalent(pred, gold, kind):
    assert is_equivalent(pred, gold, kind)


@pytest.mark.parametrize(
    ("pred", "gold", "kind"),
    [
        ("18.4", "18", "number"),
        ("19", "18", "number"),
        ("3.3", "3.33333", "number"),
        ("-18", "18", "number"),
        (None, "18", "number"),
        ("", "18", "number"),
        ("7", "8", "latex"),
        ("\\frac{11}{3}", "5.5", "latex"),
        ("x", "y", "latex"),
        ("\\sqrt{2}", "2", "latex"),
        ("(1, 2)", "(2, 1)", "latex"),
        ("B", "C", "choice"),
        ("E", "E", "choice"),
        (None, "A", "choice"),
    ],
)
def test_not_equivalent(pred, gold, kind):
    assert not is_equivalent(pred, gold, kind)


def test_gsm8k_gold():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("...\n#### 1,600") == "1600"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")


# --------------------------------------------------------------------------- real gold answers


@needs_data
def test_gsm8k_gold_answers_round_trip():
    """Every GSM8K test gold is a number and survives the ways a model writes it."""
    failures = []
    for row in _jsonl("gsm8k/test.jsonl"):
        gold = gsm8k_gold(row["answer"])
        value = float(gold)
        pretty = f"{int(value):,}" if value.is_integer() else gold
        responses = [
            f"Step 1: 2 + 2 = 4\nThe answer is {gold}.",
            f"Step 1: 2 + 2 = 4\nThe answer is {pretty}.",
            f"Step 1: 2 + 2 = 4\nThe answer is ${pretty}.",
            f"So she has \\boxed{{{pretty}}} in the end.",
            f"Step 1: 10 * 3 = 30\nStep 2: 30 - 12 = {gold}",
        ]
        for response in responses:
            if not is_equivalent(extract_answer(response, "number"), gold, "number"):
                failures.append((gold, response))
        if is_equivalent(str(value + 1), gold, "number"):
            failures.append((gold, "gold + 1 accepted"))
    assert not failures, failures[:10]


@needs_data
def test_math500_gold_answers_self_equivalent():
    """Each MATH-500 gold, boxed in a format-aligned response, is judged equal to itself."""
    rows = _jsonl("math500/test.jsonl")
    failures = []
    for row in rows:
        gold = row["answer"]
        for response in (f"Step 1: ...\nThe answer is \\boxed{{{gold}}}.", f"Step 1: ...\nThe answer is ${gold}$."):
            if not is_equivalent(extract_answer(response, "latex"), gold, "latex"):
                failures.append((row["unique_id"], gold, response[-60:]))
    rate = 1 - len({f[0] for f in failures}) / len(rows)
    print(f"MATH-500 self-equivalence: {rate:.1%} ({len(rows)} answers); failures: {failures}")
    assert rate >= 0.98, failures


@needs_data
def test_math500_different_answers_not_equivalent():
    """Golds of different problems rarely coincide; when the strings differ they must not match."""
    rows = _jsonl("math500/test.jsonl")
    pairs = [(a["answer"], b["answer"]) for a, b in zip(rows[::7], rows[3::7], strict=False)
             if a["answer"].strip() != b["answer"].strip()]
    wrongly_equal = [(a, b) for a, b in pairs if is_equivalent(a, b, "latex")]
    # sympy may legitimately equate different spellings (e.g. "5" and "5^\\circ"): allow a trace.
    assert len(wrongly_equal) <= len(pairs) // 50, wrongly_equal


@needs_data
def test_aime_and_arith_style_golds():
    for row in _jsonl("aime24/test.jsonl"):
        gold = str(int(row["answer"]))
        assert is_equivalent(extract_answer(f"The answer is \\boxed{{{row['answer']}}}.", "latex"), gold, "latex")
        assert not is_equivalent(str(int(gold) + 1), gold, "latex")
