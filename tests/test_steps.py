"""Step segmentation: numbered steps, paragraphs, lines; the final-answer line is never a step;
every span is exact and ``cut_before`` is an exact prefix."""

from __future__ import annotations

import pytest

from pytest_qmr import arith
from pytest_qmr.steps import Step, cut_before, is_final_answer_line, segment


def _check_spans(response: str, steps: list[Step]) -> None:
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    for step in steps:
        assert response[step.start_char:step.end_char] == step.text
        assert step.text == step.text.strip() and step.text


def test_numbered_step_lines_and_answer_line_excluded():
    response = "Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 18\nThe answer is 18."
    steps = segment(response)
    _check_spans(response, steps)
    assert [s.text for s in steps] == ["Step 1: 16 - 3 - 4 = 9", "Step 2: 9 * 2 = 18"]
    assert [s.body for s in steps] == ["16 - 3 - 4 = 9", "9 * 2 = 18"]


@pytest.mark.parametrize(
    "marker", ["Step {k}:", "Step {k}.", "Step {k})", "**Step {k}:**", "### Step {k}:", "{k}.", "{k})"]
)
def test_marker_styles(marker):
    lines = [f"{marker.format(k=k)} line {k}" for k in (1, 2, 3)]
    response = "Let's solve it.\n" + "\n".join(lines) + "\nFinal answer: 7"
    steps = segment(response)
    _check_spans(response, steps)
    assert len(steps) == 3  # preamble and answer line are not steps
    assert [s.body for s in steps] == ["line 1", "line 2", "line 3"]


def test_a_numbered_step_spans_lines_until_the_next_marker():
    response = "Step 1: First we add.\n12 + 5 = 17\n\nStep 2: Then double.\n17 * 2 = 34\n\n#### 34\n"
    steps = segment(response)
    _check_spans(response, steps)
    assert [s.text for s in steps] == ["Step 1: First we add.\n12 + 5 = 17", "Step 2: Then double.\n17 * 2 = 34"]


def test_indices_are_positions_not_written_numbers():
    response = "Step 1: a\nStep 1: b\nStep 5: c"
    assert [s.index for s in segment(response)] == [1, 2, 3]


def test_paragraphs_then_lines():
    paragraphs = "First, 3 + 4 = 7.\nThat is the total.\n\nThen 7 * 2 = 14.\n\nThe answer is 14."
    steps = segment(paragraphs)
    _check_spans(paragraphs, steps)
    assert [s.text for s in steps] == ["First, 3 + 4 = 7.\nThat is the total.", "Then 7 * 2 = 14."]
    gsm8k = "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540"
    steps = segment(gsm8k)
    _check_spans(gsm8k, steps)
    assert len(steps) == 2 and steps[1].text.startswith("So he runs")


@pytest.mark.parametrize("line", [
    "The answer is 18.", "the final answer is $\\boxed{18}$", "Final Answer: 18", "So the answer is 18",
    "#### 18", "\\boxed{18}", "$\\boxed{18}$", "\\[\\boxed{\\frac{1}{2}}\\]", "**Answer:** 18",
])
def test_final_answer_lines(line):
    assert is_final_answer_line(line)
    assert segment(f"Step 1: 9 * 2 = 18\n{line}")[-1].text == "Step 1: 9 * 2 = 18"


@pytest.mark.parametrize(
    "line", ["The answer must be a whole number, so 3 + 4 = 7", "x = \\boxed{3} + 4", "Answering: 3"]
)
def test_not_final_answer_lines(line):
    assert not is_final_answer_line(line)


def test_answer_line_ends_a_step_and_text_after_it_is_dropped_in_marker_mode():
    response = "Step 1: 2 + 2 = 4\nThe answer is 4.\nsome trailing chatter\nStep 2: 4 * 2 = 8"
    steps = segment(response)
    assert [s.text for s in steps] == ["Step 1: 2 + 2 = 4", "Step 2: 4 * 2 = 8"]


def test_empty_and_answer_only():
    assert segment("") == [] and segment("  \n ") == []
    assert segment("The answer is 5.") == []


def test_crlf_spans_are_exact():
    response = "Step 1: 1 + 1 = 2\r\nStep 2: 2 + 2 = 4\r\nThe answer is 4."
    steps = segment(response)
    _check_spans(response, steps)
    assert steps[0].text == "Step 1: 1 + 1 = 2"


@pytest.mark.parametrize("response", [
    "Step 1: 12 + 5 = 17\nStep 2: 17 * 2 = 34\nThe answer is 34.",
    "  Intro line.\n\nStep 1: a\n\n\nStep 2: b\nStep 3: c",
    "First 3 + 4 = 7.\n\nThen 7 * 2 = 14.\n\nThe answer is 14.",
    "one\ntwo\nthree",
])
def test_cut_before_is_an_exact_prefix(response):
    steps = segment(response)
    for step in steps:
        prefix = cut_before(response, step.index)
        assert response.startswith(prefix)
        assert response[len(prefix):].lstrip().startswith(step.text)
        assert len(prefix) <= step.start_char
    # the step after the last one: the prefix runs through the last step and its line break
    tail = cut_before(response, len(steps) + 1)
    assert response.startswith(tail) and steps[-1].text in tail
    with pytest.raises(ValueError):
        cut_before(response, 0)
    with pytest.raises(ValueError):
        cut_before(response, len(steps) + 2)


def test_cut_before_on_arith_solutions():
    for problem in arith.generate("test", 20, seed=3):
        solution = problem.solution()
        steps = segment(solution)
        assert len(steps) == len(problem.steps)
        for k, gold in enumerate(problem.steps, 1):
            assert cut_before(solution, k) + solution[len(cut_before(solution, k)):] == solution
            assert solution[len(cut_before(solution, k)):].startswith(gold.text(k))
        assert cut_before(solution, len(steps) + 1) + f"The answer is {problem.answer}." == solution


def test_a_thinking_trace_is_cut_into_its_paragraphs_without_its_tags():
    trace = "<think>\nFirst, 1 + 2 = 3.\n\nThen 3 * 2 = 6.\n</think>\nThe answer is 6."
    steps = segment(trace)
    assert [s.text for s in steps] == ["First, 1 + 2 = 3.", "Then 3 * 2 = 6."]
    assert all(trace[s.start_char:s.end_char] == s.text for s in steps)
    # Restore's cut keeps the opening tag: the FP teacher continues inside the thinking
    assert cut_before(trace, 2) == "<think>\nFirst, 1 + 2 = 3.\n\n"
    marked = "<think>\nStep 1: 1 + 2 = 3\nStep 2: 3 * 2 = 6\n</think>\nThe answer is 6."
    assert [s.text for s in segment(marked)] == ["Step 1: 1 + 2 = 3", "Step 2: 3 * 2 = 6"]
