"""Ground-truth first-error labels for qmr_arith responses, and ProcessBench's F1.

qmr_arith problems carry their exact gold steps (:class:`pytest_qmr.arith.ArithStep`), so a
response can be labelled without a judge model. Each response step's equations ``x op y = z``
(parsed by the rule judge's tokenizer, so ``×``, ``x``, units and ``$`` are read the same way)
are compared with the next gold step, tracking the value the response itself carries forward
(``c``, which starts at the problem's first number). The first step where something is wrong
is the first faulty step; nothing after it is looked at, so an error carried forward correctly
counts once, where it was made. Every type that applies to that step is collected and the
earliest in the taxonomy order (:func:`pytest_qmr.taxonomy.earliest`) is the primary type.

Rules for one operation ``x op y = z`` where the next gold step is ``c gop b`` (for ``+`` and
``*`` the operands may come in either order):

- **computational_error**: ``z`` is not ``x op y``.
- **procedural_error**: the right operand with the wrong operator (``op != gop``, ``y == b``),
  the operands of ``-``/``/`` reversed, or an operand that comes from nowhere: a number that is
  neither the carried value, an earlier value of the response, nor a number of the problem.
- **logical_reasoning_error**: the step does another gold step's work: its ``(op, y)`` is a
  later gold step's operand (it jumps ahead, skipping step ``g``) or repeats an earlier gold
  step; or it works on an earlier value of the response or a bare problem number instead of the
  carried value (it drops the previous result); or it adds an operation after the last gold
  step; or the response stops before the last gold step and answers.
- **symbolic_manipulation_error**, one crisp case: the carried value is transcribed wrongly into
  the next step (``x`` is ``c`` with two digits swapped, one digit changed, dropped or added, or
  its sign flipped; ``c`` has at least two digits), or into the answer line.
- The conceptual types and ``formula_rule_error`` do not arise in pure chained arithmetic.

A step with no equation and no operator (prose) is skipped. A step with an equation that is
not one ``number op number = number`` ("17 * = 34", "12 + 5 - 3 = 14", "x = 5") is garbled:
status ``"format_collapse"`` (no type), as is a response with no parseable step, or one that
stops without a final answer. After the last step the final answer (the same extraction every
stage uses) is checked as if it were step ``len(steps) + 1`` whose operand must be ``c``: a
response that answers before the last gold step skipped steps (even when they would have
cancelled out, as ``* 2`` then ``/ 2`` do). A correct final answer with no faulty step is
``"correct"``, also when the gold steps it did not write as equations may be prose steps.

As a Locate voter (:class:`ArithJudge`, registered as ``arith``) the label is ground truth for
``qmr_arith`` cases: an error at its step and type, no error, or — a collapsed format — an error at
its step with no type, each with confidence 1.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import sympy

from pytest_qmr import answers, taxonomy
from pytest_qmr.arith import ArithProblem, generate
from pytest_qmr.registry import JUDGES
from pytest_qmr.steps import segment

from . import rule
from .base import NO_ERROR, Case, InlineJudge, Vote

ARITH = "arith"  # the exact labeller of the CPU lab benchmark

COMMUTATIVE = ("+", "*")
STATUSES = ("correct", "error", "format_collapse")


@dataclass(frozen=True)
class ArithLabel:
    status: str  # "correct" | "error" | "format_collapse"
    first_error_step: int  # 1-based; len(steps) + 1 for the answer line / a missing step; -1 when correct
    primary_error_type: str | None  # one of taxonomy.TYPES when status == "error"
    types: tuple[str, ...] = ()  # every type that applies to the faulty step, taxonomy order
    explanation: str = ""
    gold_step: int | None = None  # the 1-based gold step the faulty step stood for


@dataclass(frozen=True)
class Operation:
    x: Fraction
    op: str
    y: Fraction
    z: Fraction

    def __str__(self) -> str:
        return f"{_fmt(self.x)} {self.op} {_fmt(self.y)} = {_fmt(self.z)}"


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{float(v):g}"


def _frac(v: sympy.Rational) -> Fraction:
    return Fraction(int(v.p), int(v.q))


def compute(x: Fraction, op: str, y: Fraction) -> Fraction | None:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y if y != 0 else None


def parse_step(text: str) -> tuple[str, list[Operation]]:
    """("ops", operations) | ("garbled", []) | ("prose", []) for one step's text."""
    operations: list[Operation] = []
    other = 0
    for eq in rule.equalities(text):
        left, right = eq.left.tokens, eq.right.tokens
        binary = (len(left) == 3 and left[0].kind == "num" and left[1].kind == "op" and left[1].text in "+-*/"
                  and left[2].kind == "num" and not any(t.percent for t in left))
        # "12 + 5 = 17" or a running chain "12 + 5 = 17 * 2 = 34" (its next link is its own op)
        if binary and right[0].kind == "num" and not right[0].percent and (eq.right.is_literal or len(right) > 1):
            x, y, z = (_frac(t.value) for t in (left[0], left[2], right[0]))
            operations.append(Operation(x, left[1].text, y, z))
        else:
            other += 1
    if operations and not other:
        return "ops", operations
    tokens = rule.tokenize(rule.normalise(text))
    has_math = any(t.kind == "eq" for t in tokens) or any(
        a.kind == "num" and b.kind == "op" and c.kind == "num"
        for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False)
    )
    return ("garbled", []) if has_math or other else ("prose", [])


def _miscopy(x: Fraction, c: Fraction) -> bool:
    """``x`` is ``c`` transcribed wrongly: sign flipped, two digits swapped, or one digit
    changed, dropped or added (``c`` a whole number with at least two digits)."""
    if x == c or c.denominator != 1 or x.denominator != 1 or abs(c) < 10:
        return False
    if x == -c:
        return True
    a, b = str(abs(c.numerator)), str(abs(x.numerator))
    if sorted(a) == sorted(b):
        diffs = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diffs) == 2 and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]]
    if len(a) == len(b):
        return sum(p != q for p, q in zip(a, b, strict=True)) == 1
    short, long_ = sorted((a, b), key=len)
    return len(long_) - len(short) == 1 and any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


class _Walker:
    def __init__(self, problem: ArithProblem):
        self.gold = problem.steps
        self.numbers = {Fraction(problem.steps[0].a)} | {Fraction(s.b) for s in problem.steps}
        self.c = Fraction(problem.steps[0].a)
        self.history = [self.c]  # values the response has held, the current one last
        self.g = 0  # gold steps done

    def carried_types(self, x: Fraction, verb: str = "works on") -> tuple[set[str], str]:
        """Types for using ``x`` where the carried value ``c`` belongs (an operand, or the answer)."""
        instead = f"instead of the carried value {_fmt(self.c)}"
        if x == self.c:
            return set(), ""
        if x in self.history:
            return {"logical_reasoning_error"}, f"{verb} {_fmt(x)}, an earlier value, {instead}"
        if x in self.numbers:
            return {"logical_reasoning_error"}, f"{verb} the problem's number {_fmt(x)} {instead}"
        if _miscopy(x, self.c):
            return {"symbolic_manipulation_error"}, f"{verb} {_fmt(x)}, a miscopy of the carried value {_fmt(self.c)}"
        return {"procedural_error"}, f"{verb} {_fmt(x)}, which comes from nowhere, {instead}"

    def operation_types(self, op: str, y: Fraction) -> tuple[set[str], str]:
        gold = self.gold
        want = gold[self.g]
        this = f"step {self.g + 1} ({want.op} {want.b})"
        if (op, y) == (want.op, want.b):
            return set(), ""
        later = [j for j in range(self.g + 1, len(gold)) if y == gold[j].b and y != want.b]
        if later:
            j = later[0]
            ahead = f"gold step {j + 1} ({gold[j].op} {gold[j].b})"
            return {"logical_reasoning_error"}, f"jumps ahead to {ahead}, skipping {this}"
        earlier = [j for j in range(self.g) if (op, y) == (gold[j].op, gold[j].b)]
        if earlier:
            return {"logical_reasoning_error"}, f"repeats gold step {earlier[0] + 1} ({op} {_fmt(y)}) instead of {this}"
        if y == want.b:
            return {"procedural_error"}, f"applies '{op}' where gold {this} needs '{want.op}'"
        source = "a number of the problem" if y in self.numbers else "a number from nowhere"
        return {"procedural_error"}, f"uses {_fmt(y)}, {source}, where gold step {self.g + 1} needs {want.op} {want.b}"

    def diagnose(self, o: Operation) -> tuple[set[str], list[str]]:
        x, op, y = o.x, o.op, o.y
        if op in COMMUTATIVE and x != self.c and y == self.c:
            x, y = y, x
        types: set[str] = set()
        why: list[str] = []
        if self.g >= len(self.gold):
            types.add("logical_reasoning_error")
            why.append("adds an operation after the problem's last step")
        elif op not in COMMUTATIVE and (x, y) == (Fraction(self.gold[self.g].b), self.c) and op == self.gold[self.g].op:
            types.add("procedural_error")
            why.append(f"reverses the operands of '{op}'")
        else:
            for found, reason in (self.carried_types(x), self.operation_types(op, y)):
                types |= found
                if reason:
                    why.append(reason)
        true = compute(o.x, o.op, o.y)
        if true != o.z:
            types.add("computational_error")
            value = _fmt(true) if true is not None else "undefined"
            why.append(f"{_fmt(o.x)} {o.op} {_fmt(o.y)} is {value}, not {_fmt(o.z)}")
        return types, why


def _error(step: int, types: set[str], why: list[str], gold_step: int | None, op: str = "") -> ArithLabel:
    ordered = tuple(t for t in taxonomy.TYPES if t in types)
    prefix = f"step {step}" + (f" ({op})" if op else "")
    return ArithLabel("error", step, taxonomy.earliest(types), ordered, f"{prefix}: " + "; ".join(why), gold_step)


_ANSWER_MARK = re.compile(r"\banswer\s*(?:is\b|:)|\\boxed\{|^\s*####", re.IGNORECASE | re.MULTILINE)


def _answer_value(response: str, stated_only: bool) -> Fraction | None:
    """The final answer as every stage extracts it; with ``stated_only``, None unless the response
    states one (answer extraction falls back to the last number of a response that just stops)."""
    if stated_only and not _ANSWER_MARK.search(response):
        return None
    text = answers.extract_answer(response, "number")
    try:
        return Fraction(text) if text is not None else None
    except (ValueError, ZeroDivisionError):
        return None


def label(problem: ArithProblem, response: str) -> ArithLabel:
    """The first faulty step of ``response`` to ``problem`` and its error type (module doc)."""
    response = response if isinstance(response, str) else ""
    walker = _Walker(problem)
    steps = segment(response)
    n_ops = n_prose = 0
    for step in steps:
        kind, operations = parse_step(step.body)
        n_prose += kind == "prose"
        if kind == "garbled":
            why = f"step {step.index} is garbled: no single 'a op b = r' equation in {step.body!r}"
            return ArithLabel("format_collapse", step.index, None, (), why, walker.g + 1)
        for o in operations:
            n_ops += 1
            types, why = walker.diagnose(o)
            if types:
                return _error(step.index, types, why, walker.g + 1 if walker.g < len(walker.gold) else None, str(o))
            walker.c = o.z
            walker.history.append(o.z)
            walker.g += 1
    end = len(steps) + 1
    gold_answer = Fraction(problem.answer)
    answer = _answer_value(response, stated_only=True)
    missing = len(walker.gold) - walker.g
    if _answer_value(response, stated_only=False) == gold_answer and n_ops and n_prose >= missing:
        # scored right and no faulty step; gold steps not seen as equations may be told in prose
        note = f" ({missing} gold step(s) told in prose)" if missing else ""
        return ArithLabel("correct", -1, None, (), "every step and the final answer are right" + note)
    if n_ops == 0:
        return ArithLabel("format_collapse", 1, None, (), "no step of the form 'a op b = r'", 1)
    if answer is None:
        return ArithLabel("format_collapse", end, None, (),
                          f"the response stops after gold step {walker.g} of {len(walker.gold)} without a final answer",
                          min(walker.g + 1, len(walker.gold)))
    if walker.g < len(walker.gold):
        skipped = ", ".join(str(j + 1) for j in range(walker.g, len(walker.gold)))
        why = f"answers {_fmt(answer)} after gold step {walker.g}, skipping gold step(s) {skipped}"
        return _error(end, {"logical_reasoning_error"}, [why], walker.g + 1)
    types, reason = walker.carried_types(answer, verb="answers")  # all gold steps done: c is gold
    return _error(end, types, [reason], None, "final answer")


# ---------------------------------------------------------------------------------------------
# ProcessBench


@dataclass(frozen=True)
class ProcessBenchScore:
    error_acc: float  # share of erroneous traces whose predicted step is the true first error
    correct_acc: float  # share of correct traces predicted -1
    f1: float  # harmonic mean of the two (nan when either class is empty)
    n_error: int
    n_correct: int

    def __float__(self) -> float:
        return self.f1


def processbench_f1(predictions: Sequence[int], labels: Sequence[int]) -> ProcessBenchScore:
    """ProcessBench's metric: ``labels[i]`` is the true first faulty step (-1: the trace is
    correct), ``predictions[i]`` the predicted one. F1 is the harmonic mean of the accuracy on
    erroneous traces (exact step match) and the accuracy on correct traces (predicted -1)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    err = [int(p) == int(t) for p, t in zip(predictions, labels, strict=True) if int(t) != -1]
    ok = [int(p) == -1 for p, t in zip(predictions, labels, strict=True) if int(t) == -1]
    error_acc = sum(err) / len(err) if err else math.nan
    correct_acc = sum(ok) / len(ok) if ok else math.nan
    if math.isnan(error_acc) or math.isnan(correct_acc):
        f1 = math.nan
    elif error_acc + correct_acc == 0:
        f1 = 0.0
    else:
        f1 = 2 * error_acc * correct_acc / (error_acc + correct_acc)
    return ProcessBenchScore(error_acc, correct_acc, f1, len(err), len(ok))


@JUDGES.register(ARITH)
class ArithJudge(InlineJudge):
    """Ground truth for ``qmr_arith`` cases: the exact labeller (:func:`label`).

    Cases are matched to problems by id (``arith-<split>-<hash>``): the first ``n`` problems of
    each split for ``seed``, and any made known with :meth:`know` (Restore's mining passes the
    training problems it asked); any other case is an abstention. A response whose format
    collapsed (a garbled equation at step k, no parseable step, no final answer) is a faulty step
    k **without a type** — the taxonomy has none for it — reason ``format_collapse``: where the
    solution breaks first is known exactly, what kind of mistake it is is not.
    """

    name = ARITH

    def __init__(self, n: int = 500, seed: int = 0):
        self._problems = {p.id: p for split in ("test", "train") for p in generate(split, n, seed)}

    def know(self, problems: Iterable[ArithProblem]) -> None:
        """Judge these problems too (cases are matched to them by id)."""
        self._problems.update((p.id, p) for p in problems)

    def judge(self, case: Case) -> Vote:
        problem = self._problems.get(case.id)
        if problem is None:
            return Vote(ARITH, "abstain", reason="not a qmr_arith problem", attempts=1)
        t0 = time.perf_counter()
        got = label(problem, case.response)
        took = time.perf_counter() - t0
        if got.status == "error":
            return Vote(ARITH, "error", got.first_error_step, got.primary_error_type, got.explanation,
                        1.0, attempts=1, latency_s=took)
        if got.status == "correct":
            return Vote(ARITH, NO_ERROR, explanation=got.explanation, confidence_score=1.0, attempts=1,
                        latency_s=took)
        return Vote(ARITH, "error", got.first_error_step, None, got.explanation, 1.0, reason=got.status, attempts=1,
                    latency_s=took)
