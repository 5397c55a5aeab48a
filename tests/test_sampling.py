"""Per-sample seeds, thinking traces and the scores of k samples (pytest_qmr.sampling)."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from math import comb

import pytest

from pytest_qmr.sampling import majority, pass_at_k, sample_seed, seed_std, split_thinking


def test_sample_seed_is_stable_across_processes_and_distinct_per_sample():
    here = [sample_seed(0, "arith/7", j) for j in range(4)]
    code = "from pytest_qmr.sampling import sample_seed; print([sample_seed(0, 'arith/7', j) for j in range(4)])"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert str(here) == there  # not Python's salted hash(): another process asks for the same texts
    assert len(set(here)) == 4
    assert all(0 <= s < 2**31 for s in here)
    assert sample_seed(1, "arith/7", 0) != here[0]
    assert sample_seed(0, "arith/8", 0) != here[0]


def test_sample_seeds_do_not_collide_over_a_large_grid():
    seeds = {sample_seed(s, f"item/{i}", j) for s, i, j in itertools.product(range(3), range(500), range(8))}
    assert len(seeds) == 3 * 500 * 8


@pytest.mark.parametrize("bad", [1.5, "0", True, None])
def test_sample_seed_refuses_a_seed_that_is_not_an_int(bad):
    with pytest.raises(TypeError, match="seed must be an int"):
        sample_seed(bad, "x", 0)


def test_split_thinking_takes_the_answer_after_the_end_tag():
    t = split_thinking("<think>\n3 + 4 = 7\n\nso 7 * 2 = 14\n</think>\nThe answer is 14.")
    assert (t.thinking, t.answer, t.truncated) == ("3 + 4 = 7\n\nso 7 * 2 = 14", "The answer is 14.", False)


def test_split_thinking_without_the_opening_tag_is_thinking_from_the_start():
    t = split_thinking("Let me add: 3 + 4 = 7.</think>The answer is 7.")
    assert (t.thinking, t.answer, t.truncated) == ("Let me add: 3 + 4 = 7.", "The answer is 7.", False)


def test_an_unclosed_trace_is_truncated_with_no_answer_to_parse():
    t = split_thinking("<think>\n3 + 4 = 7\nThe answer is 7 if")
    assert t.truncated and t.answer == ""
    assert "The answer is 7" in t.thinking  # kept for Locate, never graded


def test_custom_tags_and_an_empty_end_tag():
    assert split_thinking("[R]x[/R] y", start="[R]", end="[/R]").answer == "y"
    with pytest.raises(ValueError, match="end tag"):
        split_thinking("x", end="")


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (4, 2, 3), (8, 3, 4), (8, 7, 2), (5, 5, 5)])
def test_pass_at_k_is_the_probability_over_all_k_subsets(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_1_is_the_mean_and_bad_counts_are_refused():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)


def test_majority_vote_ties_to_the_first_answer_and_ignores_no_answer():
    assert majority(["7", "8", "7", None], [True, False, True, False])
    assert not majority(["8", "7", "8", "7"], [False, True, False, True])  # tie: "8" came first
    assert majority([None, None, "7"], [False, False, True])  # no answer does not vote
    assert not majority([None, None], [False, False])
    with pytest.raises(ValueError):
        majority(["1"], [True, False])


def test_seed_std_is_the_sample_std_of_per_seed_accuracy():
    rng = random.Random(0)
    scores = [[rng.random() < 0.6 for _ in range(3)] for _ in range(30)]
    per_seed = [sum(row[j] for row in scores) / 30 for j in range(3)]
    mean = sum(per_seed) / 3
    expected = (sum((a - mean) ** 2 for a in per_seed) / 2) ** 0.5
    assert seed_std(scores) == pytest.approx(expected)
    assert seed_std([[True], [False]]) == 0.0
    assert seed_std([[True, False], [True, False]]) == pytest.approx(0.5**0.5)  # seeds at 1.0 and 0.0
    with pytest.raises(ValueError):
        seed_std([[True, False], [True]])
