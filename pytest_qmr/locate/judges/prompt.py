"""What an LLM judge is asked and how its answer is read.

The prompt follows the paper's protocol: the problem, its gold answer, the full-precision
model's (correct) reference solution and the quantized model's solution with its steps
numbered as :func:`pytest_qmr.steps.segment` cuts them; the judge answers with one JSON object
``{"primary_error_type", "error_step", "explanation", "confidence_score"}``. The answer is
parsed (bare, inside a ```json fence, or the first JSON object in prose) and validated with
pydantic against the taxonomy and the step range (:func:`parse_verdict`); an unusable answer is
a :class:`JudgeOutputError` of kind "malformed" or "schema".
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ... import taxonomy
from ...steps import Step
from .base import NO_ERROR, Case, Vote


SYSTEM_PROMPT = (
    "You are an expert mathematics grader. You analyse a step-by-step solution written by a "
    "quantized (low-bit) language model that reached a wrong final answer, locate the FIRST step "
    "where it goes wrong, and classify that error. You answer with a single JSON object and nothing else."
)

TYPE_DEFINITIONS: dict[str, str] = {
    "conceptual_misunderstanding": "misunderstands a mathematical concept or what a quantity in the problem means",
    "contextual_oversight": "ignores, misreads or invents a condition or number given in the problem",
    "logical_reasoning_error": "an invalid inference or plan: a wrong deduction, a skipped or repeated stage, "
                               "an unjustified conclusion",
    "procedural_error": "a sound method carried out wrongly: wrong operation or operand, steps in the wrong "
                        "order, a step of the procedure left out",
    "formula_rule_error": "a wrong or misremembered formula, theorem or rule",
    "computational_error": "an arithmetic mistake: the numbers written do not compute to the result written",
    "symbolic_manipulation_error": "an algebra or transcription slip: a sign, term, exponent or digit "
                                   "changed while rewriting an expression or carrying a value forward",
}


def numbered_steps(steps: Sequence[Step]) -> str:
    return "\n".join(f"[Step {s.index}] {s.body or s.text}" for s in steps)


def build_messages(case: Case) -> list[dict[str, str]]:
    """The judging prompt: system + one user message (the paper's protocol; see the module doc)."""
    taxonomy_lines = []
    for category, types in taxonomy.CATEGORIES.items():
        for t in types:
            taxonomy_lines.append(f"- {t} ({category}): {TYPE_DEFINITIONS[t]}")
    reference = (case.reference_response or "").strip() or "(not available)"
    n = case.n_steps
    tail = case.response[case.steps[-1].end_char:].strip() if case.steps else ""
    final = f"\nFinal answer as written: {tail}" if tail else ""
    user = f"""## Problem
{case.problem.strip()}

## Gold answer
{case.gold_answer}

## Reference solution (full-precision model, reaches the gold answer)
{reference}

## Solution to judge (quantized model), {n} numbered steps
{numbered_steps(case.steps)}{final}

## Task
Find the FIRST step of the solution to judge that contains an error: the earliest step from which the
solution can no longer reach the gold answer. Later errors that follow from it do not count. Use the
reference solution as a guide, but a different correct approach is not an error.
Classify that step's error as exactly one of these types (when several apply, pick the one listed first):
{chr(10).join(taxonomy_lines)}
If the solution is in fact correct (for example its answer equals the gold answer written in another form,
such as 5.5 and 11/2), use "primary_error_type": "{NO_ERROR}" and "error_step": -1.

Answer with only this JSON object:
{{"primary_error_type": "<one type above>", "error_step": <integer 1..{n}>, \
"explanation": "<one or two sentences>", "confidence_score": <number 0..1>}}"""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------- parsing


class JudgeOutputError(ValueError):
    """An answer that is not usable; ``kind`` is "malformed" (no JSON object) or "schema"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class JudgeOutput(BaseModel):
    """The judge's JSON answer, validated (pass ``context={"n_steps": n}``)."""

    model_config = ConfigDict(extra="ignore")

    primary_error_type: str
    error_step: int
    explanation: str = ""
    confidence_score: float | None = Field(default=None, ge=0, le=1)

    @field_validator("primary_error_type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> str:
        if value is None:
            return NO_ERROR
        if not isinstance(value, str):
            raise ValueError("must be a string")
        norm = re.sub(r"[^a-z]+", "_", value.strip().lower()).strip("_")
        norm = {"none": NO_ERROR, "no_error_found": NO_ERROR, "correct": NO_ERROR,
                "formula_error": "formula_rule_error", "rule_error": "formula_rule_error",
                "calculation_error": "computational_error", "arithmetic_error": "computational_error",
                "logical_error": "logical_reasoning_error",
                "reasoning_error": "logical_reasoning_error"}.get(norm, norm)
        if norm != NO_ERROR and norm not in taxonomy.TYPES:
            raise ValueError(f"{value!r} is not one of: {', '.join(taxonomy.TYPES)}, {NO_ERROR}")
        return norm

    @field_validator("error_step", mode="before")
    @classmethod
    def _step(cls, value: Any, info: ValidationInfo) -> int:
        if value is None:
            return -1
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(?:step\s*)?(-?\d+)\s*", value, re.IGNORECASE)
            if not m:
                raise ValueError(f"{value[:40]!r} is not a step number")
            value = int(m.group(1))
        if not isinstance(value, int):
            raise ValueError("must be an integer")
        n = (info.context or {}).get("n_steps")
        if value != -1 and (value < 1 or (n is not None and value > n)):
            raise ValueError(f"{value} is outside 1..{n} (or -1 for no error)")
        return value

    @field_validator("explanation", mode="before")
    @classmethod
    def _explanation(cls, value: Any) -> str:
        return "" if value is None else str(value)

    @field_validator("confidence_score", mode="before")
    @classmethod
    def _confidence(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().rstrip("%")
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number in 0..1") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 1 < value <= 100:
            value = value / 100  # a percentage
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "JudgeOutput":
        if (self.primary_error_type == NO_ERROR) != (self.error_step == -1):
            raise ValueError(f"error_step -1 goes with primary_error_type {NO_ERROR!r} and only with it")
        return self


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json_object(text: str) -> dict:
    """The judge's JSON object: the whole text, a ```json fence, or the first object in prose
    (preferring one that has ``primary_error_type``). JudgeOutputError("malformed") otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise JudgeOutputError("malformed", "empty answer")
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()
    found: list[dict] = []
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            if "primary_error_type" in obj:
                return obj
            found.append(obj)
    if found:
        return found[0]
    raise JudgeOutputError("malformed", "no JSON object in the answer")


def parse_verdict(text: str, n_steps: int) -> JudgeOutput:
    """Parse and validate a judge's answer for a solution with ``n_steps`` steps."""
    obj = extract_json_object(text)
    try:
        return JudgeOutput.model_validate(obj, context={"n_steps": n_steps})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise JudgeOutputError("schema", f"wrong schema: {problems}") from None


def vote_from_output(judge: str, out: JudgeOutput, **extra: Any) -> Vote:
    if out.primary_error_type == NO_ERROR:
        return Vote(judge, "no_error", -1, None, out.explanation, out.confidence_score, **extra)
    return Vote(judge, "error", out.error_step, out.primary_error_type, out.explanation, out.confidence_score, **extra)
