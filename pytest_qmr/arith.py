"""qmr_arith: seeded multi-step arithmetic word problems with exact gold steps.

Small models that run on a 2-core CPU score ~0 on GSM8K; this benchmark gives them something
they can learn (format alignment), a quantizer can break, and a labeller can check exactly.
Train and test never share a problem: the split is a hash of the problem's content.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

OPS = ("+", "-", "*", "/")
# Every start, operand and intermediate result stays at most MAX_VALUE, and what is added or taken
# away at most MAX_ADDEND: at 999 the 135M lab model slipped on most three-digit steps (20% FP
# accuracy), too little room for a quantizer to lose significantly or for Restore to win back.
MAX_VALUE = 199
MAX_ADDEND = 49

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Tom", "Yuki", "Sara"]
OBJECTS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "beads"]

START = [
    "{name} has {a} {obj}.",
    "{name} starts with {a} {obj}.",
    "There are {a} {obj} in {name}'s box.",
]
STEP_TEMPLATES = {
    "+": [
        "{name} buys {b} more {obj}.",
        "A friend gives {name} {b} more {obj}.",
        "{name} finds {b} more {obj}.",
    ],
    "-": [
        "{name} gives away {b} {obj}.",
        "{name} loses {b} {obj}.",
        "{name} sells {b} of the {obj}.",
    ],
    "*": [
        "Then the number of {obj} becomes {b} times as large.",
        "{name} ends up with {b} times as many {obj} as before.",
    ],
    "/": [
        "{name} splits the {obj} into {b} equal groups and keeps one group.",
        "{name} shares the {obj} equally among {b} friends and keeps one share.",
    ],
}
QUESTION = [
    "How many {obj} does {name} have now?",
    "How many {obj} are left with {name} at the end?",
]

INSTRUCTION = (
    "Solve the problem step by step. Write each step as 'Step k: <calculation>' "
    "and finish with 'The answer is <number>.'"
)


@dataclass(frozen=True)
class ArithStep:
    a: int
    op: str
    b: int
    result: int

    def text(self, index: int) -> str:
        return f"Step {index}: {self.a} {self.op} {self.b} = {self.result}"


@dataclass(frozen=True)
class ArithProblem:
    id: str
    question: str
    steps: tuple[ArithStep, ...]
    answer: int
    split: str = field(default="")

    def solution(self) -> str:
        lines = [step.text(i) for i, step in enumerate(self.steps, 1)]
        lines.append(f"The answer is {self.answer}.")
        return "\n".join(lines)

    def think_solution(self, start: str = "<think>", end: str = "</think>") -> str:
        """:meth:`solution` as a reasoning model writes it (the lab thinking model's target): the steps
        as blank-line separated paragraphs inside the thinking block, the answer line after its end."""
        paragraphs = "\n\n".join(step.text(i) for i, step in enumerate(self.steps, 1))
        return f"{start}\n{paragraphs}\n{end}\n\nThe answer is {self.answer}."

    def to_row(self) -> dict:
        row = asdict(self)
        row["steps"] = [asdict(s) for s in self.steps]
        row["solution"] = self.solution()
        return row

    @staticmethod
    def from_row(row: dict) -> "ArithProblem":
        steps = tuple(ArithStep(**s) for s in row["steps"])
        return ArithProblem(row["id"], row["question"], steps, int(row["answer"]), row.get("split", ""))


def apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not exact")
        return a // b
    raise ValueError(f"unknown operator {op!r}")


def _content_key(start: int, ops: list[tuple[str, int]]) -> str:
    return f"{start}|" + "|".join(f"{op}{b}" for op, b in ops)


def split_of(start: int, ops: list[tuple[str, int]], test_share: int = 5) -> str:
    """Deterministic split from the arithmetic content alone: 1 in ``test_share`` is test."""
    digest = hashlib.sha256(_content_key(start, ops).encode()).digest()
    return "test" if digest[0] % test_share == 0 else "train"


def _pick_operand(rng: random.Random, total: int) -> tuple[str, int] | None:
    op = rng.choice(OPS)
    if op == "+":
        b = rng.randint(2, MAX_ADDEND)
        return (op, b) if total + b <= MAX_VALUE else None
    if op == "-":
        return (op, rng.randint(1, min(total - 1, MAX_ADDEND))) if total > 2 else None
    if op == "*":
        b = rng.randint(2, 9)
        return (op, b) if total * b <= MAX_VALUE else None
    divisors = [d for d in range(2, 10) if total % d == 0 and total // d >= 2]
    return (op, rng.choice(divisors)) if divisors else None


def _one_problem(rng: random.Random, n_steps: int) -> tuple[int, list[tuple[str, int]]]:
    start = rng.randint(10, 99)
    total, ops = start, []
    while len(ops) < n_steps:
        choice = _pick_operand(rng, total)
        if choice is None:
            continue
        ops.append(choice)
        total = apply(total, *choice)
    return start, ops


def _render(rng: random.Random, start: int, ops: list[tuple[str, int]]) -> str:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    parts = [rng.choice(START).format(name=name, a=start, obj=obj)]
    for op, b in ops:
        parts.append(rng.choice(STEP_TEMPLATES[op]).format(name=name, b=b, obj=obj))
    parts.append(rng.choice(QUESTION).format(name=name, obj=obj))
    return " ".join(parts)


def generate(split: str, n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 4) -> list[ArithProblem]:
    """``n`` distinct problems of one split; the same arguments always give the same list."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= min_steps <= max_steps <= 5:
        raise ValueError(f"steps must satisfy 1 <= min_steps <= max_steps <= 5, got {min_steps}..{max_steps}")
    rng = random.Random(f"qmr_arith:{split}:{seed}:{min_steps}:{max_steps}")
    seen: set[str] = set()
    problems: list[ArithProblem] = []
    while len(problems) < n:
        start, ops = _one_problem(rng, rng.randint(min_steps, max_steps))
        key = _content_key(start, ops)
        if key in seen or split_of(start, ops) != split:
            continue
        seen.add(key)
        steps, total = [], start
        for op, b in ops:
            result = apply(total, op, b)
            steps.append(ArithStep(total, op, b, result))
            total = result
        pid = f"arith-{split}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        problems.append(ArithProblem(pid, _render(rng, start, ops), tuple(steps), total, split))
    return problems


def prompt(question: str) -> str:
    """The format-aligned user turn used for training and evaluation alike."""
    return f"{INSTRUCTION}\n\n{question}"
