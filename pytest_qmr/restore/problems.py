"""Training problems: where Restore's problems come from, their gold solutions, their prompts.

A :class:`TrainProblem` is one problem of a benchmark's **training** split with a step-structured
gold solution ("Step k: ... = r" lines ending in "The answer is N."); :class:`GoldSolution`
resumes such a solution where a correct prefix stops (what the ``gold`` teacher continues with).

Sources are registered in :data:`pytest_qmr.registry.PROBLEM_SOURCES` under the **task name**
of the benchmark they serve; a source is a function ``(n, seed, data_dir) -> list[TrainProblem]``
and :func:`training_problems` finds the one of a cell's task:

``qmr_arith``  generated (:func:`pytest_qmr.arith.generate`, train split), with the exact solution;
``qmr_gsm8k``  the ``qmr_gsm8k`` task's ``training_split`` as lm-eval reads it
               (:func:`pytest_qmr.splits.task_docs`, the reader GSM8K calibration uses too), ids as
               the task gives them (a train/test overlap is caught by id), ``n`` drawn with ``seed``;
               the worked answer becomes steps (:func:`gsm8k_solution`).

A task without a source has no training split with step-aligned gold: Restore says so in one line.

Prompts: :func:`user_turn` is the user message a problem is asked with (the benchmark's own
instruction), :func:`chat_prompt` renders it as lm-eval does, :func:`row_prompt` recovers both from
a judged row.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from .. import answers, arith
from ..registry import PROBLEM_SOURCES
from ..steps import segment
from .records import RestoreError

CHAT_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)
_VALUE_AFTER_EQUALS = re.compile(r"=\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_INSTRUCTIONS = (arith.INSTRUCTION, "Answer with the letter")
GSM8K_SPLIT_FILE = "gsm8k/{split}.jsonl"  # relative to the data dir


def user_turn(problem: str, kind: str = "number") -> str:
    """The user message of ``problem``: itself when it already carries an instruction."""
    from ..tasks.utils import build_prompt

    if any(i in problem for i in _INSTRUCTIONS):
        return problem
    return build_prompt(problem, kind)


def chat_prompt(tokenizer, user: str) -> str:
    """The prompt string as lm-eval renders it (chat template, generation prompt, default system)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def row_prompt(row: Mapping[str, Any], tokenizer=None, kind: str = "number") -> tuple[str, str]:
    """(chat-formatted prompt, user message) of a case row: its ``prompt``, or a ``problem`` that
    already is a rendered chat (regression rows built from SampleRecord prompts), or rendered here."""
    for text in (row.get("prompt"), row.get("problem")):
        if isinstance(text, str) and (m := CHAT_USER.search(text)):
            return text, m.group(1)
    user = user_turn(str(row["problem"]), kind)
    if tokenizer is None:
        raise RestoreError(f"case {row.get('id')}: the problem is not chat-formatted; a tokenizer (--model) is needed")
    return chat_prompt(tokenizer, user), user


def _values_after_equals(text: str) -> list[Fraction]:
    return [Fraction(v.replace(",", "")) for v in _VALUE_AFTER_EQUALS.findall(text)]


@dataclass(frozen=True)
class GoldSolution:
    """A gold solution as steps with their results, so it can resume where a trace stops."""

    steps: tuple[str, ...]  # step bodies, no "Step k:" marker
    results: tuple[Fraction | None, ...]  # the value each step computes (None: prose)
    answer: str

    @classmethod
    def from_text(cls, text: str, answer: str | None = None) -> "GoldSolution":
        """Parse a "Step k: ... = r" solution ending in "The answer is N." (arith, converted GSM8K)."""
        bodies = tuple(s.body for s in segment(text))
        results = tuple((vals[-1] if (vals := _values_after_equals(b)) else None) for b in bodies)
        final = answer if answer is not None else answers.extract_answer(text, "number")
        if final is None:
            raise RestoreError(f"gold solution has no final answer: {text[-80:]!r}")
        return cls(bodies, results, str(final))

    def steps_done(self, prefix: str) -> int:
        """How many gold steps a (correct) prefix has covered: its results matched in order."""
        values, pos, done = _values_after_equals(prefix), 0, 0
        for j, result in enumerate(self.results):
            if result is None:
                continue
            try:
                pos = values.index(result, pos) + 1
            except ValueError:
                break
            done = j + 1
        return done

    def continuation(self, prefix: str, first_step: int) -> str:
        """The remaining gold steps, numbered from ``first_step``, and the answer line."""
        rest = self.steps[self.steps_done(prefix):]
        lines = [f"Step {first_step + i}: {body}" for i, body in enumerate(rest)]
        return "\n".join([*lines, f"The answer is {self.answer}."])


def gsm8k_solution(answer_field: str) -> str:
    """A GSM8K ``answer`` as numbered steps: one per line, ``<<a*b=c>>`` calculator notes dropped."""
    body, _, final = answer_field.rpartition("####")
    lines = [" ".join(_CALCULATOR.sub("", line).split()) for line in body.splitlines()]
    steps = [f"Step {i}: {line}" for i, line in enumerate((x for x in lines if x), 1)]
    return "\n".join([*steps, f"The answer is {answers.gsm8k_gold(answer_field)}."])


@dataclass(frozen=True)
class TrainProblem:
    """A training-split problem with its step-structured gold solution."""

    id: str
    question: str
    gold_answer: str
    solution: str
    kind: str = "number"
    arith: arith.ArithProblem | None = None

    @classmethod
    def from_arith(cls, p: arith.ArithProblem) -> "TrainProblem":
        return cls(p.id, p.question, str(p.answer), p.solution(), "number", p)


def arith_problems(split: str = "train", n: int = 200, seed: int = 0) -> list[TrainProblem]:
    return [TrainProblem.from_arith(p) for p in arith.generate(split, n, seed)]


def gsm8k_problems(data_dir: str | os.PathLike, split: str = "train", n: int | None = None,
                   seed: int = 0) -> list[TrainProblem]:
    """GSM8K problems of a split of the qmr_gsm8k task as lm-eval reads it (``train``: its
    ``training_split``), ids as the task gives them (train vs test overlap is caught by id),
    ``n`` drawn at random with ``seed``."""
    from ..splits import task_docs

    docs, _ = task_docs("qmr_gsm8k", Path(data_dir), split, GSM8K_SPLIT_FILE.format(split=split))
    if n is not None and n < len(docs):
        docs = random.Random(seed).sample(docs, n)
    return [TrainProblem(d["qmr_id"], d["question"], d["qmr_gold"], gsm8k_solution(d["answer"])) for d in docs]


# --------------------------------------------------------------------------------- sources (by task name)


@PROBLEM_SOURCES.register("qmr_arith")
def _arith_source(n: int, seed: int, data_dir: Path | None) -> list[TrainProblem]:
    return arith_problems("train", n, seed)


@PROBLEM_SOURCES.register("qmr_gsm8k")
def _gsm8k_source(n: int, seed: int, data_dir: Path | None) -> list[TrainProblem]:
    if data_dir is None:
        raise RestoreError("restore on qmr_gsm8k needs a data dir with gsm8k/train.jsonl")
    return gsm8k_problems(data_dir, "train", n, seed)


def training_problems(task: str, n: int, seed: int = 0, data_dir: Path | None = None) -> list[TrainProblem]:
    """``n`` training problems for a cell of ``task`` from its registered source (seeded)."""
    if task not in PROBLEM_SOURCES:
        raise RestoreError(f"restore: task {task} has no training split with step-aligned gold "
                           f"(supported: {', '.join(PROBLEM_SOURCES.names())})")
    return PROBLEM_SOURCES.get(task)(n, seed, data_dir)
