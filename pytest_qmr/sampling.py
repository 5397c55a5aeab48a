"""Sampled answers (issue #35): per-sample seeds, thinking traces, and the scores of k samples.

A reasoning model is judged on ``k`` sampled answers per item. This module holds the pieces every
backend and stage share, each one computation in one place:

:func:`sample_seed`
    Sample ``j`` of item ``i`` gets its own seed, derived from ``(seed, item_id, j)`` by SHA-256
    (31 bits, so every engine accepts it: vLLM's per-request ``SamplingParams.seed``, an OpenAI
    request's ``seed``, a ``torch.Generator``). It depends on nothing else — not the order of the
    items, the batch or the backend — so a rerun asks for the same texts and a cache keyed on it may
    keep sampled answers. lm-eval 0.4.13's API models send one ``seed`` for every request, so k copies
    of an item would come back identical; the per-sample seed goes in each request instead.
:func:`split_thinking`
    The answer of a thinking trace is the text after its end tag. A sample whose thinking never
    closed is *truncated*: it has no answer (never parsed from the half trace). lm-eval 0.4.13's
    ``think_end_token`` does ``generation.split(think_end_token)[-1]``, which keeps the whole
    half-finished trace when the tag never came (lm-eval #3382), so the rule is ours.
:func:`pass_at_k`
    The unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
    eq. 1): ``1 - C(n - c, k) / C(n, k)`` for ``c`` correct of ``n`` samples, computed as a product
    (no huge binomials).
:func:`majority`
    maj@k: the answer most samples extracted (ties to the one seen first; a sample with no answer
    does not vote); the item is right when that answer's samples were judged right.
:func:`seed_std`
    The spread QRM ("Quantization Hurts Reasoning?", arXiv 2504.04823) reports: the accuracy of each
    seed's pass over the items (sample ``j`` of every item), then their standard deviation
    (``ddof=1``, the sample standard deviation; 0 for a single seed).
:func:`item_lengths` and :func:`length_ratio`
    What an answer costs: per item the mean tokens of FP's and of the quantized model's answers, and
    the ratio of their means with a paired bootstrap interval (the cell's ``length``; the report
    plots the items).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

SEED_BITS = 31


def sample_seed(seed: int, item_id: str, j: int) -> int:
    """The seed of sample ``j`` of item ``item_id`` in a run seeded ``seed`` (stable across processes)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(j, int) or j < 0:
        raise ValueError(f"sample index must be an int >= 0, got {j!r}")
    digest = hashlib.sha256(f"{seed}\x00{item_id}\x00{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


@dataclass(frozen=True)
class Thought:
    """A response cut at its thinking: ``thinking`` (tags excluded), ``answer`` (after the end tag)."""

    thinking: str
    answer: str
    truncated: bool


def split_thinking(text: str, start: str = "<think>", end: str = "</think>") -> Thought:
    """``text`` cut at its first ``end`` tag; no end tag: truncated, no answer.

    A response that opens without ``start`` (chat templates that put ``<think>`` in the prompt,
    as DeepSeek-R1-Distill's does) is thinking from its first character. The answer is the text
    after the first end tag, stripped.
    """
    if not end:
        raise ValueError("the thinking end tag must be a non-empty string")
    body = text.lstrip()
    if start and body.startswith(start):
        body = body[len(start):]
    thinking, found, answer = body.partition(end)
    if not found:
        return Thought(thinking=thinking.strip(), answer="", truncated=True)
    return Thought(thinking=thinking.strip(), answer=answer.strip(), truncated=False)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of ``k`` of the ``n`` samples (``c`` correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority(extracted: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the answer most samples gave (ties: the one seen first) was judged correct."""
    if len(extracted) != len(correct):
        raise ValueError(f"{len(extracted)} extracted answers for {len(correct)} judgements")
    votes: dict[str, list[int]] = {}
    for i, answer in enumerate(extracted):
        if answer is not None and answer.strip():
            votes.setdefault(answer.strip(), []).append(i)
    if not votes:
        return False
    winner = max(votes.values(), key=len)  # max keeps the first of equal counts: the earliest answer
    return bool(correct[winner[0]])


def seed_std(scores: Sequence[Sequence[bool]]) -> float:
    """The standard deviation over seeds of the accuracy (``scores[item][j]``: sample j of the item)."""
    if not scores:
        return 0.0
    k = len(scores[0])
    if any(len(row) != k for row in scores):
        raise ValueError("every item needs the same number of samples")
    if k < 2:
        return 0.0
    per_seed = [sum(bool(row[j]) for row in scores) / len(scores) for j in range(k)]
    mean = sum(per_seed) / k
    return math.sqrt(sum((a - mean) ** 2 for a in per_seed) / (k - 1))


def cell_scores(samples: Sequence[Sequence[dict]]) -> dict:
    """A sampled cell's scores from each item's answers (``correct``, ``extracted``): ``k``,
    ``pass_at_k`` (:func:`pass_at_k` with ``n = k``: the share of items with a right answer),
    ``maj_at_k`` (:func:`majority`), ``seed_std`` (:func:`seed_std`)."""
    if not samples:
        return {"k": 0, "pass_at_k": None, "maj_at_k": None, "seed_std": None}
    k = len(samples[0])
    n = len(samples)
    correct = [[bool(s["correct"]) for s in item] for item in samples]
    return {"k": k,
            "pass_at_k": sum(pass_at_k(len(row), sum(row), len(row)) for row in correct) / n,
            "maj_at_k": sum(majority([s.get("extracted") for s in item], row)
                            for item, row in zip(samples, correct, strict=True)) / n,
            "seed_std": seed_std(correct)}


def item_lengths(fp_items: dict[str, dict], quant: Sequence[tuple[str, Sequence[dict]]]) -> list[tuple[float, float]]:
    """Per item, the mean tokens of FP's answers and of the quantized model's, on the items both sides
    answered (``fp_items``: a baseline's items, each with its ``samples``; ``quant``: ``(item_id,
    samples)``). Empty unless every answer on both sides counted its tokens: a ratio over the items
    that happened to count would not be the cell's."""

    def mean_tokens(samples: Sequence[dict]) -> float | None:
        tokens = [s.get("tokens") for s in samples]
        return None if not tokens or any(t is None for t in tokens) else sum(tokens) / len(tokens)

    pairs = [(mean_tokens(fp_items[item_id].get("samples") or []), mean_tokens(samples))
             for item_id, samples in quant if item_id in fp_items]
    if not pairs or any(f is None or q is None for f, q in pairs):
        return []
    return pairs


def length_ratio(fp_tokens: Sequence[float], quant_tokens: Sequence[float], level: float = 0.95) -> dict:
    """What the quantized model costs to serve against FP on the same items: the mean tokens each
    writes per answer, their ratio ``quant / fp`` and its ``level`` interval (scipy's paired BCa
    bootstrap over items, 2,000 resamples, seeded: the same records give the same interval)."""
    import numpy as np
    from scipy.stats import bootstrap

    fp, quant = np.asarray(fp_tokens, dtype=float), np.asarray(quant_tokens, dtype=float)
    if fp.shape != quant.shape or fp.size == 0:
        raise ValueError(f"length_ratio needs the same items on both sides ({fp.size} vs {quant.size})")
    fp_mean, quant_mean = float(fp.mean()), float(quant.mean())
    ratio = quant_mean / fp_mean if fp_mean > 0 else None
    interval = None
    if ratio is not None and fp.size >= 3 and np.ptp(quant / np.maximum(fp, 1e-9)) > 0:
        res = bootstrap((fp, quant), lambda f, q, axis=-1: q.mean(axis=axis) / f.mean(axis=axis), paired=True,
                        vectorized=True, n_resamples=2000, confidence_level=level, method="BCa",
                        random_state=np.random.default_rng(0))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        interval = [round(low, 4), round(high, 4)] if np.isfinite(low) and np.isfinite(high) else None
    return {"fp_mean_tokens": round(fp_mean, 2), "quant_mean_tokens": round(quant_mean, 2),
            "ratio": None if ratio is None else round(ratio, 4), "ratio_ci": interval, "ci_level": level}
