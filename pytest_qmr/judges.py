"""Judges for the Locate stage: which step of a failed solution goes wrong first, and how.

Three kinds, one interface (``name``, ``judge(case) -> Vote``, ``judge_many(cases)``):

- :class:`RuleJudge` (name ``rule``): the deterministic arithmetic judge of
  :mod:`pytest_qmr.rule_judge`. It only ever reports ``computational_error``; when it finds no
  false equality it abstains rather than clearing the response.
- :class:`OpenAIJudge`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (a hosted API,
  vLLM, llama.cpp, ``qmr serve``). Configured by a :class:`JudgeConfig`: ``base_url``,
  ``model``, ``api_key_env`` (the NAME of an environment variable holding the key, read at call
  time), ``timeout``, ``max_retries``, ``concurrency``.
- :class:`LocalJudge` (``kind: local``): a transformers checkpoint in this process, same prompt
  through its chat template, greedy.

The prompt follows the paper's protocol: the problem, its gold answer, the full-precision
model's (correct) reference solution and the quantized model's solution with its steps
numbered as :func:`pytest_qmr.steps.segment` cuts them; the judge answers with one JSON object
``{"primary_error_type", "error_step", "explanation", "confidence_score"}``. The answer is
parsed (bare, inside a ```json fence, or the first JSON object in prose) and validated with
pydantic against the taxonomy and the step range. Timeouts, connection failures, HTTP 429/5xx,
malformed or wrong-schema answers are retried with exponential backoff; after the last attempt
(or at once on any other HTTP 4xx) the judge returns a Vote with ``status="unjudged"`` and a
``reason`` — it never raises, so one bad case cannot lose the verdicts of the others.

The API key goes only into the ``Authorization`` header. Every text that leaves a judge (reasons,
explanations, raw answers, log lines) passes through :func:`redact`, so the key never appears
in logs, exceptions, records or reports.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import QmrError
from . import rule_judge, taxonomy
from .steps import Step, segment

logger = logging.getLogger(__name__)

NO_ERROR = "no_error"
RULE = "rule"
ARITH = "arith"  # the exact labeller of the CPU lab benchmark
VOTE_STATUSES = ("error", "no_error", "abstain", "unjudged")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
RAW_KEEP = 2000  # characters of a failed answer kept on the vote for debugging


def redact(text: Any, *secrets: str | None) -> str:
    """``text`` with every secret, and anything written as ``Bearer <token>``, replaced."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return _BEARER.sub(r"\1[REDACTED]", text)


# --------------------------------------------------------------------------------- cases & votes


@dataclass
class Case:
    """One failed solution to judge."""

    id: str
    problem: str
    response: str
    gold_answer: str
    reference_response: str | None = None

    @cached_property
    def steps(self) -> list[Step]:
        return segment(self.response)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @classmethod
    def from_row(cls, row: dict) -> "Case":
        return cls(str(row["id"]), str(row["problem"]), str(row["response"]), str(row["gold_answer"]),
                   row.get("reference_response"))


@dataclass
class Vote:
    """One judge's verdict on one case.

    ``status``: ``error`` (a faulty step found), ``no_error`` (the judge says the solution is
    right, e.g. a grading disagreement such as 5.5 vs \\frac{11}{2}), ``abstain`` (the rule judge
    found no false equality: no evidence either way) or ``unjudged`` (the judge failed; ``reason``).
    """

    judge: str
    status: str
    error_step: int = -1
    primary_error_type: str | None = None
    explanation: str = ""
    confidence_score: float | None = None
    reason: str | None = None
    attempts: int = 0
    latency_s: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    raw: str | None = None  # the last answer text, kept only when it could not be used

    @property
    def has_verdict(self) -> bool:
        return self.status in ("error", "no_error")

    def key(self, match_step: bool = True) -> tuple:
        """What two votes must share to agree: the type, and the step when ``match_step``."""
        if self.status == "no_error":
            return (NO_ERROR, -1) if match_step else (NO_ERROR,)
        return (self.primary_error_type, self.error_step) if match_step else (self.primary_error_type,)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Vote":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------- prompt

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


# --------------------------------------------------------------------------------- config


class JudgeConfig(BaseModel):
    """One LLM judge. ``api_key_env`` is the NAME of an environment variable, never the key."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["openai", "local"] = "openai"
    base_url: str | None = None  # "http://host:8000/v1" (or without /v1)
    model: str  # the model id sent to the endpoint; for kind=local a model reference
    api_key_env: str | None = None
    timeout: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=20)
    concurrency: int = Field(default=4, ge=1, le=256)
    temperature: float | None = Field(default=0.0, ge=0, le=2)  # None: not sent (models that refuse it)
    max_tokens: int = Field(default=1024, ge=1)
    token_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"  # the name the endpoint wants
    extra_body: dict[str, Any] = Field(default_factory=dict)  # e.g. {"response_format": {"type": "json_object"}}
    backoff: float = Field(default=1.0, ge=0)  # first retry delay, doubled each retry
    backoff_max: float = Field(default=30.0, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value) or value == RULE:
            raise ValueError(f"judge name must match {_NAME.pattern} and not be {RULE!r}")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        # The message never repeats the value: someone may have pasted the key itself here.
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable (letters, digits, _), not the key")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _needs_url(self) -> "JudgeConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai-kind judge needs base_url")
        clash = {"model", "messages", "stream", "n"} & set(self.extra_body)
        if clash:
            raise ValueError(f"extra_body may not set {', '.join(sorted(clash))}")
        return self

    @property
    def endpoint(self) -> str:
        base = self.base_url or ""
        return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class JudgeFileError(QmrError, ValueError):
    """A judge config file that cannot be used (one line, the key never in it)."""


def _config_errors(exc: ValidationError, where: str) -> str:
    # Only locations and messages: pydantic's input_value could be a pasted key.
    return "; ".join(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


@dataclass
class JudgeSettings:
    judges: dict[str, JudgeConfig]
    primary: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)


def parse_judge_settings(data: Any, source: str = "judge config") -> JudgeSettings:
    """``{"judges": [ {name, ...}, ... ] | {NAME: {...}}, "primary": NAME, "policy": {...}}``."""
    if not isinstance(data, dict):
        raise JudgeFileError(f"{source}: expected a mapping with a 'judges' key")
    unknown = set(data) - {"judges", "primary", "policy"}
    if unknown:
        raise JudgeFileError(f"{source}: unknown key {sorted(unknown)[0]!r} (known: judges, primary, policy)")
    entries = data.get("judges") or []
    if isinstance(entries, dict):
        entries = [{"name": name, **(spec or {})} for name, spec in entries.items()]
    if not isinstance(entries, list):
        raise JudgeFileError(f"{source}: 'judges' must be a list or a mapping")
    judges: dict[str, JudgeConfig] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise JudgeFileError(f"{source}: judges[{i}] must be a mapping")
        try:
            config = JudgeConfig.model_validate(entry)
        except ValidationError as exc:
            raise JudgeFileError(f"{source}: {_config_errors(exc, f'judges[{i}]')}") from None
        if config.name in judges:
            raise JudgeFileError(f"{source}: judge name {config.name!r} appears twice")
        judges[config.name] = config
    primary = data.get("primary")
    if primary is not None and primary not in judges:
        raise JudgeFileError(f"{source}: primary {primary!r} is not a configured judge")
    policy = data.get("policy") or {}
    if not isinstance(policy, dict):
        raise JudgeFileError(f"{source}: 'policy' must be a mapping")
    return JudgeSettings(judges, primary, policy)


def load_judge_settings(path: str | os.PathLike) -> JudgeSettings:
    """Read a YAML (or JSON) judge config file (see :func:`parse_judge_settings`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JudgeFileError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise JudgeFileError(f"{path}: not UTF-8 text "
                             f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise JudgeFileError(f"{path}: not valid YAML{where}") from None
    return parse_judge_settings(data, str(path))


# --------------------------------------------------------------------------------- judges


class _Retry(Exception):
    """A failed attempt worth retrying (timeout, connection, 429/5xx, bad answer)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure no retry fixes (HTTP 4xx, missing key): unjudged at once."""


class _InlineJudge:
    """A judge that needs no endpoint: runs in the caller's thread, never raises."""

    name = ""

    def judge(self, case: Case) -> Vote:
        raise NotImplementedError

    def judge_many(self, cases: Sequence[Case], on_done: Callable[[int, Vote], None] | None = None) -> list[Vote]:
        votes = []
        for i, case in enumerate(cases):
            votes.append(self.judge(case))
            if on_done:
                on_done(i, votes[-1])
        return votes

    def submit(self, case: Case) -> Future:
        future: Future = Future()
        future.set_result(self.judge(case))
        return future

    def close(self) -> None:
        pass


class RuleJudge(_InlineJudge):
    """The sympy arithmetic judge as a voter (never unjudged, never raises)."""

    name = RULE

    def judge(self, case: Case) -> Vote:
        t0 = time.perf_counter()
        try:
            verdict = rule_judge.judge(case.response)
        except Exception as exc:  # noqa: BLE001
            return Vote(RULE, "unjudged", reason=f"rule judge failed ({type(exc).__name__})", attempts=1)
        took = time.perf_counter() - t0
        if verdict.status == "error":
            return Vote(RULE, "error", verdict.first_error_step, verdict.primary_error_type, verdict.explanation,
                        None, attempts=1, latency_s=took)
        return Vote(RULE, "abstain", explanation=verdict.explanation, reason=verdict.status, attempts=1,
                    latency_s=took)


class ArithJudge(_InlineJudge):
    """Ground truth for ``qmr_arith`` cases: the exact labeller (:mod:`pytest_qmr.arith_labeller`).

    Cases are matched to problems by id (``arith-<split>-<hash>``); any other case, and a
    response whose format collapsed (no checkable step; not a taxonomy type), is an abstention.
    """

    name = ARITH

    def __init__(self, n: int = 500, seed: int = 0):
        from . import arith

        self._problems = {p.id: p for split in ("test", "train") for p in arith.generate(split, n, seed)}

    def judge(self, case: Case) -> Vote:
        from . import arith_labeller

        problem = self._problems.get(case.id)
        if problem is None:
            return Vote(ARITH, "abstain", reason="not a qmr_arith problem", attempts=1)
        t0 = time.perf_counter()
        label = arith_labeller.label(problem, case.response)
        took = time.perf_counter() - t0
        if label.status == "error":
            return Vote(ARITH, "error", label.first_error_step, label.primary_error_type, label.explanation,
                        1.0, attempts=1, latency_s=took)
        if label.status == "correct":
            return Vote(ARITH, NO_ERROR, explanation=label.explanation, confidence_score=1.0, attempts=1,
                        latency_s=took)
        return Vote(ARITH, "abstain", explanation=label.explanation, reason=label.status, attempts=1, latency_s=took)


class _LLMJudge:
    """Attempt loop shared by the endpoint and the local judge."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.name = config.name
        self._sleep = sleep
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._rng = random.Random(0)

    # subclasses: one attempt -> (answer text, usage); raise _Retry / _Fatal
    def _complete(self, messages: list[dict[str, str]], attempt: int) -> tuple[str, dict[str, int]]:
        raise NotImplementedError

    def _secret(self) -> str | None:
        return None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        delay = min(cfg.backoff_max, cfg.backoff * (2 ** attempt)) * (1 + 0.25 * self._rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max))
        return delay

    def judge(self, case: Case) -> Vote:
        """Judge one case; never raises (a failure is a Vote with status "unjudged")."""
        t0 = time.perf_counter()
        secret = self._secret()
        attempts, usage = 0, {"prompt_tokens": 0, "completion_tokens": 0}
        raw: str | None = None
        if case.n_steps == 0:
            return Vote(self.name, "unjudged", reason="the response has no steps to judge")
        try:
            messages = build_messages(case)
            reason = "no attempt made"
            for attempt in range(self.config.max_retries + 1):
                attempts = attempt + 1
                retry_after = None
                try:
                    text, used = self._complete(messages, attempt)
                    for k in usage:
                        usage[k] += int(used.get(k) or 0)
                    raw = text
                    out = parse_verdict(text, case.n_steps)
                    return vote_from_output(self.name, out, attempts=attempts,
                                            latency_s=round(time.perf_counter() - t0, 3), usage=usage)
                except JudgeOutputError as exc:
                    reason = f"{exc.kind} answer: {exc}"
                except _Retry as exc:
                    reason, retry_after = str(exc), exc.retry_after
                reason = redact(reason, secret)
                if attempt < self.config.max_retries:
                    delay = self._delay(attempt, retry_after)
                    logger.warning("judge %s, case %s: attempt %d failed (%s); retrying in %.1fs",
                                   self.name, case.id, attempts, reason, delay)
                    self._sleep(delay)
            reason = f"gave up after {attempts} attempt(s): {reason}"
        except _Fatal as exc:
            reason = redact(exc, secret)
        except Exception as exc:  # noqa: BLE001 - a bug or odd failure must not lose other cases
            reason = redact(f"{type(exc).__name__}: {exc}", secret)
        logger.warning("judge %s, case %s: unjudged (%s)", self.name, case.id, reason)
        return Vote(self.name, "unjudged", reason=reason, attempts=attempts,
                    latency_s=round(time.perf_counter() - t0, 3), usage=usage,
                    raw=redact(raw, secret)[:RAW_KEEP] if raw is not None else None)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix=f"judge-{self.name}")
            return self._pool

    def submit(self, case: Case) -> Future:
        """Judge ``case`` on this judge's pool (at most ``concurrency`` requests in flight)."""
        return self._executor().submit(self.judge, case)

    def judge_many(self, cases: Sequence[Case], on_done: Callable[[int, Vote], None] | None = None) -> list[Vote]:
        """Votes for ``cases`` in order, ``concurrency`` at a time."""
        futures = [self.submit(c) for c in cases]
        index = {id(f): i for i, f in enumerate(futures)}
        if on_done:
            for f in futures:
                f.add_done_callback(lambda fut: on_done(index[id(fut)], fut.result()))
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:  # on Ctrl-C: drop what has not started, finish what has
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class OpenAIJudge(_LLMJudge):
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        super().__init__(config, sleep)
        import httpx

        from .redact import register_name

        register_name(config.api_key_env)  # its value is masked in every log line from now on
        self._httpx = httpx
        self._client = httpx.Client(timeout=config.timeout,
                                    limits=httpx.Limits(max_connections=config.concurrency))

    def _secret(self) -> str | None:
        env = self.config.api_key_env
        return os.environ.get(env) if env else None

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> tuple[str, dict[str, int]]:
        httpx, cfg = self._httpx, self.config
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise _Fatal(f"environment variable {cfg.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        body = {**cfg.extra_body, "model": cfg.model, "messages": messages, cfg.token_param: cfg.max_tokens}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        try:
            resp = self._client.post(cfg.endpoint, json=body, headers=headers)
        except httpx.TimeoutException:
            raise _Retry(f"timeout after {cfg.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise _Retry(f"connection to {cfg.endpoint} failed ({type(exc).__name__})") from None
        if resp.status_code != 200:
            detail = _error_message(resp)
            msg = f"HTTP {resp.status_code} from {cfg.endpoint}" + (f": {detail}" if detail else "")
            if resp.status_code in (408, 409, 425, 429) or resp.status_code >= 500:
                raise _Retry(msg, _retry_after(resp.headers.get("Retry-After")))
            raise _Fatal(msg)
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry("the endpoint's reply is not a chat completion") from None
        if not isinstance(content, str):
            raise _Retry("the endpoint's reply has no text content")
        usage = data.get("usage") or {}
        return content, {"prompt_tokens": usage.get("prompt_tokens") or 0,
                         "completion_tokens": usage.get("completion_tokens") or 0}

    def close(self) -> None:
        super().close()
        self._client.close()


def _error_message(resp) -> str:
    try:
        data = resp.json()
        msg = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        text = str(msg or "")
    except Exception:  # noqa: BLE001
        text = resp.text
    return " ".join(text.split())[:200]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class LocalJudge(_LLMJudge):
    """A transformers checkpoint as a judge, in this process: same prompt, its chat template,
    greedy (``temperature`` 0). A retry after an unusable answer samples (temperature 0.7,
    seeded by the attempt) so it can come out differently. One generation at a time."""

    def __init__(self, config: JudgeConfig, chat_model=None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(config.model_copy(update={"concurrency": 1, "backoff": 0.0}), sleep)
        self._chat_model = chat_model
        self._load_lock = threading.Lock()

    @property
    def chat_model(self):
        with self._load_lock:
            if self._chat_model is None:
                from .serve import ChatModel

                self._chat_model = ChatModel.from_reference(self.config.model, self.config.name)
            return self._chat_model

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> tuple[str, dict[str, int]]:
        base = self.config.temperature or 0.0
        temperature = base if attempt == 0 else max(base, 0.7)
        result = self.chat_model.complete(messages, max_tokens=self.config.max_tokens, temperature=temperature,
                                          seed=attempt if temperature > 0 else None)
        return result.text, {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}


def make_judge(config: JudgeConfig, **kwargs: Any) -> _LLMJudge:
    return LocalJudge(config, **kwargs) if config.kind == "local" else OpenAIJudge(config, **kwargs)


def build_judges(names: Iterable[str], settings: JudgeSettings | None = None) -> list:
    """Judges by name, in the order given: ``rule``, ``arith`` and the names configured in ``settings``."""
    judges: list = []
    seen = set()
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name in seen:
            raise JudgeFileError(f"judge {name!r} listed twice")
        seen.add(name)
        if name == RULE:
            judges.append(RuleJudge())
        elif name == ARITH:
            judges.append(ArithJudge())
        elif settings is not None and name in settings.judges:
            judges.append(make_judge(settings.judges[name]))
        else:
            known = [RULE, ARITH, *(settings.judges if settings else [])]
            raise JudgeFileError(f"unknown judge {name!r} (configured: {', '.join(known)}; "
                                 "LLM judges come from --judge-config)")
    return judges
