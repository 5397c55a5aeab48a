"""The Restore stage ("Silver Bullet"): preference pairs cut at the first faulty step, DPO with LoRA.

For every located failure of the quantized model the trace is cut just before its first faulty
step. The prompt is the problem, chat-formatted exactly as the model saw it, plus the correct
prefix; **rejected** is the quantized model's own continuation from there and **chosen** a
teacher's continuation from the same point, kept only when its final answer verifies against the
gold (:func:`pytest_qmr.answers.is_equivalent`). Teachers: ``gold`` (the step-aligned gold
solution), ``fp`` (the full-precision model, greedy) and ``endpoint:NAME`` (an OpenAI-compatible
chat endpoint configured like a judge). A LoRA adapter is then trained with trl's DPOTrainer on
the dense copy of the quantized model, so the frozen base IS the quantized function and the DPO
reference is the same model with the adapter disabled.

Pairs are plain-string preference rows (``prompt``/``chosen``/``rejected``, trl's "standard"
format, the prompt already chat-rendered because it ends inside the assistant turn), with their
provenance. Pairs come from a training split: :func:`check_leakage` refuses pairs whose items are
evaluation items.

Variants (paper Table 2): ``all-step`` every located case; ``ce-step`` / ``me-step`` /
``ee-step`` only conceptual / method / execution cases; ``all-ns`` no resume (prompt = problem,
chosen = the teacher's whole solution, rejected = the whole quantized response); ``rand-ns`` the
same number of random training problems (failed or not) as ``all-ns`` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from ..errors import QmrError
from .. import answers, arith, taxonomy
from ..fsutil import (atomic_directory, atomic_write_json, atomic_write_jsonl, data_root, read_jsonl_strict,
                     sha256_text)
from ..steps import cut_before, is_final_answer_line, segment

FINAL_STATUSES = ("accepted", "human")  # as pytest_qmr.locate: only these verdicts are final
#: variant -> the one category it keeps (None: every category)
VARIANTS: Mapping[str, str | None] = MappingProxyType({
    "all-step": None, "ce-step": "conceptual", "me-step": "method", "ee-step": "execution",
    "all-ns": None, "rand-ns": None,
})
NO_RESUME = ("all-ns", "rand-ns")
#: how much of the quantized model's continuation a pair rejects: all of it (the paper) or its faulty step
REJECTED_SCOPES = ("rest", "step")
CHAT_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)
_VALUE_AFTER_EQUALS = re.compile(r"=\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_INSTRUCTIONS = (arith.INSTRUCTION, "Answer with the letter")


class RestoreError(QmrError, ValueError):
    """A Restore request that cannot be carried out; the message is one line for the user."""


class LeakageError(RestoreError):
    """Preference pairs built from evaluation items (the restored score would be contaminated)."""


# --------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PreferencePair:
    """One DPO row (trl's standard preference format) with where it came from."""

    prompt: str
    chosen: str
    rejected: str
    item_id: str
    error_type: str | None
    category: str | None
    first_step: int  # the cut: 1-based step of the quantized trace the continuations replace
    teacher: str
    variant: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreferencePair":
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise RestoreError(f"preference row lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names})


def write_pairs(path: str | os.PathLike, pairs: Sequence[PreferencePair]) -> None:
    """JSONL, written atomically (a crash never leaves a truncated pair file)."""
    atomic_write_jsonl(path, (p.to_dict() for p in pairs))


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RestoreError(f"{path}: cannot read ({exc.strerror})") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                pairs.append(PreferencePair.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, RestoreError) as exc:
                raise RestoreError(f"{path}:{n}: not a preference pair ({exc})") from None
    return pairs


def recovered_share(fp_acc: float | None, quant_acc: float | None, restored_acc: float | None) -> float | None:
    """Share of the quantization loss Restore won back, (restored - quant) / (fp - quant); None
    when an accuracy is missing or quantization lost nothing."""
    if not all(isinstance(v, (int, float)) for v in (fp_acc, quant_acc, restored_acc)) or fp_acc - quant_acc <= 1e-12:
        return None
    return (restored_acc - quant_acc) / (fp_acc - quant_acc)


@dataclass
class RestoreResult:
    """What Restore did for one cell; ``CellResult.restore`` holds its :meth:`to_dict`.

    The accuracies and ``p_value`` (McNemar, restored vs quantized on the same items) are filled
    by whoever re-measures the cell with the adapter merged."""

    pairs: int
    teacher: str
    variant: str
    steps: int
    minutes: float
    adapter_path: str
    fp_acc: float | None = None
    quant_acc: float | None = None
    restored_acc: float | None = None
    p_value: float | None = None
    n_eval: int | None = None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def recovered(self) -> float | None:
        """Share of the quantization loss won back (:func:`recovered_share`)."""
        return recovered_share(self.fp_acc, self.quant_acc, self.restored_acc)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recovered"] = None if self.recovered is None else round(self.recovered, 4)
        return data


# --------------------------------------------------------------------------------- prompts & gold


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
    """GSM8K problems of a local split, ids as the qmr_gsm8k task gives them (train vs test
    overlap is caught by id), ``n`` drawn at random with ``seed``."""
    from ..tasks.utils import _gsm8k_docs, _read_jsonl

    rows = _read_jsonl(Path(data_dir) / "gsm8k" / f"{split}.jsonl", ("question", "answer"))
    docs = _gsm8k_docs(rows)
    if n is not None and n < len(docs):
        docs = random.Random(seed).sample(docs, n)
    return [TrainProblem(d["qmr_id"], d["question"], d["qmr_gold"], gsm8k_solution(d["answer"])) for d in docs]


# --------------------------------------------------------------------------------- generation


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 160, batch_size: int = 16,
                    desc: str = "generating", progress: bool = True) -> list[str]:
    """Greedy continuations of rendered prompts, batched with left padding (longest first)."""
    import torch
    from tqdm import tqdm

    stops = [i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
             if isinstance(i, int) and i != tokenizer.unk_token_id]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", file=sys.stderr,
                          disable=not progress, dynamic_ncols=True):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:], strict=True):
                out[i] = tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    finally:
        tokenizer.padding_side = side
    return out


def label_trace(problem: TrainProblem, response: str) -> dict[str, Any]:
    """Locate-style verdict fields for one response: arith's exact labeller, else the rule judge."""
    correct = answers.is_equivalent(answers.extract_answer(response, problem.kind), problem.gold_answer,
                                    problem.kind)
    if problem.arith is not None:
        from ..locate.judges.arith import label

        lab = label(problem.arith, response)
        if correct or lab.status == "correct":
            return {"correct": correct, "first_error_step": -1, "primary_error_type": None, "category": None,
                    "status": "accepted", "label": lab.status, "explanation": lab.explanation}
        t = lab.primary_error_type
        return {"correct": False, "first_error_step": lab.first_error_step, "primary_error_type": t,
                "category": taxonomy.CATEGORY_OF.get(t) if t else None, "status": "accepted",
                "label": lab.status, "explanation": lab.explanation}
    from ..locate.judges import rule

    verdict = rule.judge(response)
    located = not correct and verdict.status == "error"
    return {"correct": correct, "first_error_step": verdict.first_error_step if located else -1,
            "primary_error_type": verdict.primary_error_type if located else None,
            "category": "execution" if located else None,
            "status": "accepted" if located or correct else "escalated", "label": verdict.status,
            "explanation": verdict.explanation}


def mine_traces(model_path: str | os.PathLike, problems: Sequence[TrainProblem], *, max_new_tokens: int = 160,
                batch_size: int = 16, progress: bool = True, model_and_tokenizer=None, tokenizer=None,
                generate: Callable[[list[str]], list[str]] | None = None) -> list[dict[str, Any]]:
    """The model's greedy responses to training ``problems``, each labelled with its first faulty
    step (arith: exact labeller; else the rule judge). Rows have the Locate output fields plus
    ``prompt``, ``solution`` and ``correct``; :func:`build_pairs` keeps the located failures.
    ``generate`` (with the model's ``tokenizer``) replaces :func:`generate_greedy` on the loaded
    model, e.g. by one that answers from the generation cache (:mod:`pytest_qmr.cache`)."""
    from ..models import load

    if generate is None:
        model, tokenizer = model_and_tokenizer or load(Path(model_path))

        def generate(prompts: list[str]) -> list[str]:
            return generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, "mining", progress)
    elif tokenizer is None:
        raise TypeError("mine_traces: a generate function needs the model's tokenizer")
    prompts = [chat_prompt(tokenizer, user_turn(p.question, p.kind)) for p in problems]
    responses = generate(prompts)
    rows = []
    for i, (p, prompt, response) in enumerate(zip(problems, prompts, responses, strict=True)):
        rows.append({"id": p.id, "doc_index": i, "problem": p.question, "prompt": prompt, "response": response,
                     "gold_answer": p.gold_answer, "solution": p.solution, "kind": p.kind,
                     "n_steps": len(segment(response)), **label_trace(p, response)})
    return rows


# --------------------------------------------------------------------------------- teachers


@dataclass(frozen=True)
class Cut:
    """A case cut before its first faulty step: what a teacher continues."""

    item_id: str
    prompt: str  # chat-formatted problem (the generation prompt included)
    user: str  # the user message alone (for chat endpoints)
    prefix: str  # the correct part of the quantized trace, response[:i]
    rejected: str  # the quantized model's own continuation, response[i:]
    first_step: int
    gold_answer: str
    kind: str
    error_type: str | None
    category: str | None
    solution: str | None  # a gold solution, when the row carries one


class Teacher(Protocol):
    name: str

    def continue_many(self, cuts: Sequence[Cut]) -> list[str | None]:
        """One continuation of ``cut.prompt + cut.prefix`` per cut (None: could not produce one)."""


@dataclass
class GoldTeacher:
    """The gold solution resumed at the cut (step-aligned by matching the prefix's results)."""

    solutions: Mapping[str, str] = field(default_factory=dict)  # item id -> solution text; else row["solution"]
    name: str = "gold"

    def continue_many(self, cuts: Sequence[Cut]) -> list[str | None]:
        out: list[str | None] = []
        for cut in cuts:
            text = self.solutions.get(cut.item_id) or cut.solution
            out.append(GoldSolution.from_text(text).continuation(cut.prefix, cut.first_step) if text else None)
        return out


@dataclass
class ModelTeacher:
    """A (full-precision) checkpoint continuing greedily from the cut."""

    model_path: str | os.PathLike
    max_new_tokens: int = 160
    batch_size: int = 16
    progress: bool = True
    name: str = "fp"
    model_and_tokenizer: Any = None

    def continue_many(self, cuts: Sequence[Cut]) -> list[str | None]:
        from ..models import load

        if self.model_and_tokenizer is None:
            self.model_and_tokenizer = load(Path(self.model_path))
        model, tokenizer = self.model_and_tokenizer
        return generate_greedy(model, tokenizer, [c.prompt + c.prefix for c in cuts], self.max_new_tokens,
                               self.batch_size, f"teacher {self.name}", self.progress)


CONTINUE_INSTRUCTION = (
    "Below is the beginning of a solution; its steps are correct. Continue it from exactly where it "
    "stops: write only the remaining steps, in the same format, and finish with the final answer line."
)


class EndpointTeacher:
    """An OpenAI-compatible chat endpoint (configured like a judge; the key from ``api_key_env``,
    never logged). Unreachable endpoints and configuration errors stop the whole run at once;
    an unusable single answer only drops that case."""

    def __init__(self, config) -> None:
        from ..locate.judges import OpenAIJudge

        self.config = config
        self.name = f"endpoint:{config.name}"
        self._client = OpenAIJudge(config)

    def _messages(self, cut: Cut) -> list[dict[str, str]]:
        user = cut.user if not cut.prefix else f"{cut.user}\n\n{CONTINUE_INSTRUCTION}\n\n{cut.prefix}"
        return [{"role": "user", "content": user}]

    def _one(self, cut: Cut) -> str | None:
        from ..locate.judges.llm import _Fatal, _Retry, redact

        secret = self._client._secret()
        reason = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            try:
                text, _ = self._client._complete(self._messages(cut), attempt)
                return text.lstrip("\n")
            except _Fatal as exc:
                raise RestoreError(f"teacher {self.name}: {redact(exc, secret)}") from None
            except _Retry as exc:
                reason = redact(exc, secret)
                if attempt < self.config.max_retries:
                    time.sleep(self._client._delay(attempt, exc.retry_after))
        if reason.startswith(("connection to", "timeout")):
            raise RestoreError(f"teacher {self.name} is unreachable: {reason}")
        return None

    def continue_many(self, cuts: Sequence[Cut]) -> list[str | None]:
        return [self._one(c) for c in cuts]

    def close(self) -> None:
        self._client.close()


def make_teacher(spec: str, *, model: str | os.PathLike | None = None, judge_config: str | None = None,
                 solutions: Mapping[str, str] | None = None, max_new_tokens: int = 160,
                 batch_size: int = 16) -> Teacher:
    """``gold`` | ``fp`` (``model`` = the FP checkpoint) | ``endpoint:NAME`` (``judge_config``)."""
    if spec == "gold":
        return GoldTeacher(dict(solutions or {}))
    if spec == "fp":
        if model is None:
            raise RestoreError("teacher fp needs the full-precision model (--model)")
        return ModelTeacher(model, max_new_tokens, batch_size)
    if spec.startswith("endpoint:"):
        from ..locate.judges import load_judge_settings

        name = spec.split(":", 1)[1]
        if not judge_config:
            raise RestoreError(f"teacher {spec} needs --judge-config naming an endpoint {name!r}")
        settings = load_judge_settings(judge_config)
        if name not in settings.judges or settings.judges[name].kind != "openai":
            raise RestoreError(f"teacher {spec}: no openai-kind endpoint {name!r} in {judge_config}")
        return EndpointTeacher(settings.judges[name])
    raise RestoreError(f"unknown teacher {spec!r} (gold, fp, endpoint:NAME)")


# --------------------------------------------------------------------------------- pairs


def is_case(row: Mapping[str, Any]) -> bool:
    """A failure with a final, located first faulty step (what step variants restore)."""
    try:
        step = int(row.get("first_error_step", -1))
    except (TypeError, ValueError):
        return False
    return step >= 1 and row.get("status") in FINAL_STATUSES and not row.get("correct", False)


def cut_case(row: Mapping[str, Any], tokenizer=None, kind: str = "number", resume: bool = True) -> Cut | None:
    """The case cut before its first faulty step (``resume=False``: at the very start).
    None when the step index does not fit the response."""
    response = str(row["response"])
    step = int(row["first_error_step"]) if resume else 1
    try:
        prefix = cut_before(response, step) if resume else ""
    except ValueError:
        return None
    prompt, user = row_prompt(row, tokenizer, kind)
    t = row.get("primary_error_type")
    return Cut(str(row["id"]), prompt, user, prefix, response[len(prefix):], step, str(row["gold_answer"]),
               str(row.get("kind") or kind), t, row.get("category") or (taxonomy.CATEGORY_OF.get(t) if t else None),
               row.get("solution"))


def select_cases(rows: Sequence[Mapping[str, Any]], variant: str) -> list[Mapping[str, Any]]:
    if variant not in VARIANTS:
        raise RestoreError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    category = VARIANTS[variant]
    return [r for r in rows if is_case(r) and (category is None or r.get("category") == category)]


def check_leakage(pair_ids: Sequence[str], eval_ids: Sequence[str]) -> None:
    """Raise :class:`LeakageError` naming the items that are both training pairs and evaluation
    items (ids: arith problem ids, GSM8K question hashes, MATH ``unique_id``s)."""
    overlap = sorted(set(map(str, pair_ids)) & set(map(str, eval_ids)))
    if overlap:
        shown = ", ".join(overlap[:5]) + (f", ... ({len(overlap)} in all)" if len(overlap) > 5 else "")
        raise LeakageError(f"preference pairs overlap the evaluation items: {shown}")


def _check_split(ids: Sequence[str]) -> None:
    test = sorted(i for i in ids if re.match(r"^arith-test-", i) or i.startswith("test/"))
    if test:
        raise LeakageError(f"pairs must come from a training split, not test items ({', '.join(test[:3])}"
                           f"{', ...' if len(test) > 3 else ''}); pass allow_test_split=True to override")


def build_pairs(cases: Sequence[Mapping[str, Any]], teacher: Teacher, variant: str = "all-step", *,
                tokenizer=None, kind: str = "number", pool: Sequence[Mapping[str, Any]] | None = None,
                size: int | None = None, seed: int = 0, eval_ids: Sequence[str] | None = None,
                allow_test_split: bool = False, rejected_scope: str = "rest") -> list[PreferencePair]:
    """Preference pairs of ``variant`` from judged rows (Locate output or :func:`mine_traces`).

    ``rand-ns`` draws ``size`` (default: the number of located cases) random rows of ``pool``
    (default ``cases``; correct or not) and pairs the teacher's whole solution with the model's
    whole response. Teacher continuations whose final answer is not the gold are dropped.
    ``rejected_scope="step"`` keeps only the faulty step of the rejected continuation (Step-DPO
    style): what follows an error is often correct arithmetic on a wrong value, and DPO would
    push that down too. Raises :class:`RestoreError` when nothing is left, :class:`LeakageError`
    on leakage."""
    if rejected_scope not in REJECTED_SCOPES:
        raise RestoreError(f"rejected_scope must be one of {', '.join(REJECTED_SCOPES)}, got {rejected_scope!r}")
    located = select_cases(cases, variant)
    if variant == "rand-ns":
        pool = list(pool if pool is not None else cases)
        want = min(len(pool), size if size is not None else len(select_cases(cases, "all-step")))
        candidates = random.Random(seed).sample(pool, len(pool))  # drawn until ``want`` pairs are made
    else:
        want = len(located)
        candidates = located
    if not want:
        where = f" in category {VARIANTS[variant]}" if VARIANTS.get(variant) else ""
        raise RestoreError(f"nothing to restore: none of {len(cases)} cases has a final, located first faulty "
                           f"step{where} (variant {variant})")
    pairs: list[PreferencePair] = []
    tried = 0
    while len(pairs) < want and tried < len(candidates):
        batch = candidates[tried:tried + want - len(pairs)]
        tried += len(batch)
        pairs += _pairs_of(batch, teacher, variant, tokenizer, kind, eval_ids, allow_test_split, rejected_scope)
    if not pairs:
        raise RestoreError(f"teacher {teacher.name} gave no continuation whose final answer verifies for any of "
                           f"{tried} cases (variant {variant}); no pairs")
    return pairs


def _pairs_of(rows: Sequence[Mapping[str, Any]], teacher: Teacher, variant: str, tokenizer, kind: str,
              eval_ids: Sequence[str] | None, allow_test_split: bool, rejected_scope: str = "rest",
              ) -> list[PreferencePair]:
    ids = [str(r["id"]) for r in rows]
    if not allow_test_split:
        _check_split(ids)
    if eval_ids is not None:
        check_leakage(ids, eval_ids)
    cuts = [c for r in rows if (c := cut_case(r, tokenizer, kind, resume=variant not in NO_RESUME))]
    step_only = rejected_scope == "step" and variant not in NO_RESUME  # no-resume rows have no cut
    pairs = []
    for cut, chosen in zip(cuts, teacher.continue_many(cuts), strict=True):
        if chosen is None or not chosen.strip() or chosen == cut.rejected:
            continue
        if not answers.is_equivalent(answers.extract_answer(cut.prefix + chosen, cut.kind), cut.gold_answer, cut.kind):
            continue
        rejected = first_step_of(cut.rejected) if step_only else cut.rejected
        pairs.append(PreferencePair(cut.prompt + cut.prefix, chosen, rejected, cut.item_id, cut.error_type,
                                    cut.category, cut.first_step, teacher.name, variant))
    return pairs


def first_step_of(continuation: str) -> str:
    """``continuation`` up to the end of its first step (all of it when it has no step, e.g. a
    bare answer line written where a step was missing)."""
    steps = segment(continuation)
    return continuation[:steps[0].end_char] if steps else continuation


# --------------------------------------------------------------------------------- training


@dataclass
class RestoreConfig:
    """Settings of one Restore run (trl style: one dataclass per trainer; DPOConfig names where
    they exist). ``sft_weight`` > 0 adds trl's ``sft`` loss (NLL on chosen, as RPO does) with that
    weight; ``distill_weight`` > 0 adds the token-level KL from the full-precision model to the
    policy on each chosen row (``distill_scope``: its continuation, or every position, since every
    position carries the quantization error); ``mode="sft"`` trains on the chosen continuations
    alone (the SFT baseline)."""

    mode: str = "dpo"  # "dpo" | "sft"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    sft_weight: float = 0.0
    distill_weight: float = 0.0  # needs the FP model (train_adapter's distill_from)
    distill_scope: str = "completion"  # or "sequence": every attended position of the chosen row
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: float = 2.0
    max_steps: int = -1
    max_minutes: float = 10.0
    max_length: int = 512
    seed: int = 0
    logging_steps: int = 1
    eos_on_cut_rejected: bool = False  # True: trl's default, an EOS after every rejected continuation

    def __post_init__(self) -> None:
        if self.mode not in ("dpo", "sft"):
            raise RestoreError(f"mode must be dpo or sft, got {self.mode!r}")
        if self.sft_weight < 0:
            raise RestoreError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.distill_weight < 0:
            raise RestoreError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_scope not in ("completion", "sequence"):
            raise RestoreError(f"distill_scope must be completion or sequence, got {self.distill_scope!r}")

    def losses(self) -> tuple[list[str], list[float] | None]:
        if self.mode == "sft":
            return ["sft"], None
        if self.sft_weight > 0:
            return [self.loss_type, "sft"], [1.0, self.sft_weight]
        return [self.loss_type], None

    def set(self, assignment: str) -> None:
        """Apply one ``key=value`` (the CLI's --set)."""
        key, _, value = assignment.partition("=")
        known = {f.name: f for f in fields(self)}
        if key not in known:
            raise RestoreError(f"--set {key}: unknown setting (known: {', '.join(known)})")
        current = getattr(self, key)
        if isinstance(current, list) or key == "target_modules":
            setattr(self, key, value if value == "all-linear" else value.split(","))
        elif isinstance(current, bool):
            setattr(self, key, value.lower() in ("1", "true", "yes"))
        else:
            try:
                setattr(self, key, type(current)(value))
            except ValueError:
                raise RestoreError(f"--set {key}: {value!r} is not a {type(current).__name__}") from None
        self.__post_init__()


def train_adapter(model_path: str | os.PathLike, pairs: Sequence[PreferencePair], config: RestoreConfig,
                  out_dir: str | os.PathLike, *, distill_from: str | os.PathLike | None = None,
                  runtime=None) -> dict[str, Any]:
    """Train a LoRA adapter with trl's DPOTrainer on ``model_path`` (the dense quantized copy: the
    frozen base is the quantized function, the reference is the adapter disabled) and write it
    atomically to ``out_dir`` with ``qmr_card.json``. Returns the card. ``distill_from`` is the
    full-precision model, the teacher of ``config.distill_weight``. ``runtime`` (a
    ``backends.Runtime``; default auto): the CPU in fp32, or the GPU in mixed precision."""
    import shutil

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from ..align import _stop_after, scoring_completions_only
    from ..backends import trainer_device_args
    from ..models import load

    if not pairs:
        raise RestoreError("nothing to restore: no preference pairs")
    if config.distill_weight > 0 and distill_from is None:
        raise RestoreError("distill_weight > 0 needs the full-precision model (distill_from / --distill-from)")
    model_path = Path(model_path)
    torch.manual_seed(config.seed)
    model, tokenizer = load(model_path)
    distill = {}
    if config.distill_weight > 0:
        fp_model, _ = load(Path(distill_from))
        distill = {"fp_model": fp_model.eval().requires_grad_(False), "distill_weight": config.distill_weight,
                   "distill_scope": config.distill_scope}
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    loss_type, loss_weights = config.losses()
    started = time.monotonic()
    with atomic_directory(out_dir) as scratch:
        args = DPOConfig(
            output_dir=str(scratch / "trainer"), beta=config.beta, loss_type=loss_type, loss_weights=loss_weights,
            learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=config.warmup_ratio, per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, num_train_epochs=config.epochs,
            max_steps=config.max_steps, logging_steps=config.logging_steps, save_strategy="no", report_to=[],
            seed=config.seed, max_length=config.max_length, gradient_checkpointing=False,
            dataloader_num_workers=0, disable_dropout=True, **trainer_device_args(runtime),
        )
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.target_modules, task_type="CAUSAL_LM")
        trainer_class = _distilling(DPOTrainer) if distill else DPOTrainer
        trainer = trainer_class(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=peft_config,
                                callbacks=[_stop_after(config.max_minutes)], **distill)
        cut_eos = 0
        if not config.eos_on_cut_rejected:
            trainer.train_dataset, cut_eos = drop_cut_eos(trainer.train_dataset, pairs, tokenizer.eos_token_id)
        with scoring_completions_only():
            trainer.train()
        trainer.model.save_pretrained(scratch, safe_serialization=True)
        save_diff = _check_saved(trainer.model, model_path, scratch, tokenizer, pairs[0].prompt + pairs[0].chosen)
        history = [h for h in trainer.state.log_history if "loss" in h]
        card = {
            "base": str(model_path),
            "config": asdict(config),
            "pairs": len(pairs),
            "pairs_sha256": sha256_text(json.dumps(rows, sort_keys=True))[:16],
            "teachers": dict(Counter(p.teacher for p in pairs)),
            "distill_from": str(distill_from) if distill else None,
            "variants": dict(Counter(p.variant for p in pairs)),
            "cut_rejected_eos_dropped": cut_eos,
            "steps": trainer.state.global_step,
            "minutes": round((time.monotonic() - started) / 60, 2),
            "losses": [round(h["loss"], 5) for h in history],
            "reward_accuracies": [round(h["rewards/accuracies"], 4) for h in history if "rewards/accuracies" in h],
            "reward_margins": [round(h["rewards/margins"], 5) for h in history if "rewards/margins" in h],
            "distill_kl": [round(h["distill_kl"], 5) for h in history if "distill_kl" in h],
            "save_check_max_abs_diff": save_diff,
        }
        atomic_write_json(scratch / "qmr_card.json", card)
        shutil.rmtree(scratch / "trainer", ignore_errors=True)
    card["adapter_path"] = str(out_dir)
    return card


def _distilling(dpo_trainer_class):
    """A DPOTrainer subclass whose loss adds ``distill_weight`` × the mean token KL(FP ‖ policy) over
    the chosen rows (``distill_scope``: their continuation tokens, or every attended position). The
    policy's last hidden states come from trl's own forward pass (a hook on the backbone) and both
    LM heads project only the distilled positions, so distillation costs one no-grad FP backbone
    pass per step, not a second policy pass."""
    import torch
    import torch.nn.functional as F

    class DistillingDPOTrainer(dpo_trainer_class):
        def __init__(self, *args, fp_model, distill_weight: float, distill_scope: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.fp_model, self.distill_weight, self.distill_scope = fp_model, distill_weight, distill_scope

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            causal_lm = self.accelerator.unwrap_model(model).get_base_model()
            hidden: list = []

            def keep_policy_pass(module, args, output):  # the reference pass runs under no_grad
                if torch.is_grad_enabled():
                    hidden.append(output.last_hidden_state)

            handle = causal_lm.base_model.register_forward_hook(keep_policy_pass)
            try:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                handle.remove()
            if not hidden:  # evaluation (no_grad): the DPO loss alone
                return result
            n_chosen = inputs["input_ids"].shape[0] // 2  # trl's batch is [chosen..., rejected...]
            ids, mask = inputs["input_ids"][:n_chosen], inputs["attention_mask"][:n_chosen]
            scope = inputs["completion_mask"] if self.distill_scope == "completion" else mask
            predicts = scope[:n_chosen, 1:].bool()  # positions whose next token is distilled
            student = causal_lm.get_output_embeddings()(hidden[0][:n_chosen, :-1][predicts])
            with torch.no_grad():
                fp_hidden = self.fp_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                teacher = self.fp_model.get_output_embeddings()(fp_hidden[:, :-1][predicts])
            kl = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1),
                          log_target=True, reduction="batchmean")
            self._metrics["train"]["distill_kl"].append(kl.item())
            if return_outputs:
                return result[0] + self.distill_weight * kl, result[1]
            return result + self.distill_weight * kl

    return DistillingDPOTrainer


def stopped_by_itself(continuation: str) -> bool:
    """Whether a continuation ends where the model itself would stop: on its final-answer line.
    A cut one (``rejected_scope="step"``) or one that ran into ``max_new_tokens`` does not."""
    lines = [line for line in continuation.splitlines() if line.strip()]
    return bool(lines) and is_final_answer_line(lines[-1].strip())


def drop_cut_eos(dataset, pairs: Sequence[PreferencePair], eos_token_id: int):
    """(dataset, count): trl's tokenized rows with the EOS it appends to every rejected
    continuation removed where that continuation was cut. The model never chose to stop there,
    and DPO would otherwise win its margin by pushing down an EOS it never emits instead of the
    faulty step."""
    cut = {i for i, p in enumerate(pairs) if not stopped_by_itself(p.rejected)}

    def drop(example, index):
        ids = example["rejected_ids"]
        if index in cut and len(ids) > 1 and ids[-1] == eos_token_id:
            ids = ids[:-1]
        return {"rejected_ids": ids}

    before = sum(len(ids) for ids in dataset["rejected_ids"])
    dataset = dataset.map(drop, with_indices=True)
    return dataset, before - sum(len(ids) for ids in dataset["rejected_ids"])


def _check_saved(trained, model_path: Path, saved: Path, tokenizer, probe: str) -> float:
    """Reload the adapter just written onto a fresh base and compare logits with the trained model
    on ``probe``: an adapter that does not reproduce its own training result is never published."""
    import torch
    from peft import PeftModel

    from ..models import load

    ids = tokenizer(probe, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :256]
    trained.eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load(model_path)[0], str(saved)).eval()
        diff = float((reloaded(input_ids=ids).logits - want).abs().max())
    if not diff <= 1e-4:
        raise RestoreError(f"the saved adapter does not reproduce the trained model (max |Δlogit| {diff:.3g})")
    return diff


def load_restored(model_path: str | os.PathLike, adapter_dir: str | os.PathLike, device: str = "cpu",
                  dtype: str = "float32"):
    """(model, tokenizer): the quantized dense model with the adapter merged, a plain model on
    ``device`` in ``dtype`` (default fp32 on the CPU)."""
    from peft import PeftModel

    from ..models import load

    model, tokenizer = load(Path(model_path), device=device, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return merged, tokenizer


def merge_to_dir(model_path: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the merged model (safetensors + tokenizer) atomically; transformers loads it as is."""
    model, tokenizer = load_restored(model_path, adapter_dir)
    with atomic_directory(out) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
    return Path(out)


# --------------------------------------------------------------------------------- ablation


@dataclass
class AblationConfig:
    """The lab ablation (paper Table 2): one pair budget, several variants, one test set."""

    model: str = "embedded:smollm2-135m-arith"
    method: str = "rtn"
    bits: int = 3
    group_size: int = 64
    variants: tuple[str, ...] = ("all-step", "all-ns", "rand-ns")
    n_train: int = 200
    n_test: int = 40
    budget: int | None = None  # pairs per variant (default: as many as all-step yields)
    max_new_tokens: int = 160
    batch_size: int = 16
    seed: int = 0


def _accuracy(model, tokenizer, n_test: int, config: AblationConfig) -> list[bool]:
    from ..measure import Evaluator, GenerationSettings

    ev = Evaluator(model, tokenizer, GenerationSettings(config.max_new_tokens, config.batch_size), None)
    return [r.correct for r in ev.run("qmr_arith", limit=n_test, seed=config.seed)]


def ablate(config: AblationConfig, restore: RestoreConfig, work_dir: str | os.PathLike,
           cache: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """quantize -> mine the train split -> pairs per variant (same budget) -> DPO each ->
    evaluate each on the same qmr_arith test items. One row per model variant."""
    from ..gate import compare
    from ..models import load, resolve
    from ..quantize import QuantSpec, quantize

    work = Path(work_dir)
    base = resolve(config.model, Path(cache) if cache else None)
    qm = quantize(base.path, base.fingerprint, QuantSpec(method=config.method, bits=config.bits,
                                                         group_size=config.group_size),
                  Path(cache) if cache else None)
    model, tokenizer = load(qm.path)
    traces = mine_traces(qm.path, arith_problems("train", config.n_train, config.seed),
                         max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                         model_and_tokenizer=(model, tokenizer))
    atomic_write_jsonl(work / "traces.jsonl", traces)
    eval_ids = [p.id for p in arith.generate("test", config.n_test, 0)]
    quant = _accuracy(model, tokenizer, config.n_test, config)
    fp = _accuracy(*load(base.path), config.n_test, config)
    budget = config.budget
    rows = [{"variant": "fp", "pairs": 0, "acc": sum(fp) / len(fp)},
            {"variant": "quantized", "pairs": 0, "acc": sum(quant) / len(quant)}]
    for variant in config.variants:
        pairs = build_pairs(traces, GoldTeacher(), variant, tokenizer=tokenizer, eval_ids=eval_ids,
                            size=budget, seed=config.seed)
        if budget is None:
            budget = len(pairs)
        pairs = pairs[:budget]
        write_pairs(work / f"pairs-{variant}.jsonl", pairs)
        card = train_adapter(qm.path, pairs, restore, work / f"adapter-{variant}", distill_from=base.path)
        restored = _accuracy(*load_restored(qm.path, work / f"adapter-{variant}"), config.n_test, config)
        result = RestoreResult(len(pairs), "gold", variant, card["steps"], card["minutes"], card["adapter_path"],
                               rows[0]["acc"], rows[1]["acc"], sum(restored) / len(restored),
                               compare(quant, restored).p_value,
                               config.n_test, card)
        rows.append({"variant": variant, **result.to_dict(), "acc": result.restored_acc})
        atomic_write_json(work / "ablation.json", {"config": asdict(config), "restore": asdict(restore),
                                                   "rows": rows})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'variant':<10} {'pairs':>5} {'steps':>5} {'min':>6} {'acc':>6} {'Δ vs quant':>10} {'p':>8} "
             f"{'recovered':>9}"]
    quant = next((r["acc"] for r in rows if r["variant"] == "quantized"), None)
    for r in rows:
        delta = "" if quant is None else f"{r['acc'] - quant:+.3f}"
        p = "" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        rec = "" if r.get("recovered") is None else f"{r['recovered']:.0%}"
        steps = r.get("steps", "")
        minutes = "" if r.get("minutes") is None else f"{r['minutes']:.1f}"
        lines.append(f"{r['variant']:<10} {r['pairs']:>5} {steps:>5} {minutes:>6} {r['acc']:>6.3f} {delta:>10} "
                     f"{p:>8} {rec:>9}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- CLI


def _read_rows(path: str) -> list[dict]:
    return read_jsonl_strict(path, RestoreError)


def _solutions(source: str | None, data_dir: str | None) -> dict[str, str]:
    """``gsm8k-train`` / ``gsm8k-test`` (from the data dir) or ``arith-train:N`` / ``arith-test:N``."""
    if not source:
        return {}
    name, _, n = source.partition(":")
    if name.startswith("arith-"):
        return {p.id: p.solution for p in arith_problems(name.split("-", 1)[1], int(n or 500))}
    if name.startswith("gsm8k-"):
        root = data_root(data_dir)
        if root is None:
            raise RestoreError("--solutions gsm8k-* needs --data-dir or QMR_DATA_DIR")
        return {p.id: p.solution for p in gsm8k_problems(root, name.split("-", 1)[1])}
    raise RestoreError(f"--solutions {source!r}: expected gsm8k-train, gsm8k-test, arith-train:N or arith-test:N")


def _cmd_pairs(args: argparse.Namespace) -> int:
    from ..models import load, resolve

    rows = _read_rows(args.judged)
    model = resolve(args.model).path if args.model else None
    teacher = make_teacher(args.teacher, model=model, judge_config=args.judge_config,
                           solutions=_solutions(args.solutions, args.data_dir), max_new_tokens=args.max_new_tokens)
    tokenizer = None
    if isinstance(teacher, ModelTeacher):
        teacher.model_and_tokenizer = load(model)
        tokenizer = teacher.model_and_tokenizer[1]
    elif model is not None:  # only to render prompts
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    eval_ids = [r["id"] for r in _read_rows(args.eval_ids)] if args.eval_ids else None
    try:
        pairs = build_pairs(rows, teacher, args.variant, tokenizer=tokenizer, kind=args.kind, eval_ids=eval_ids,
                            rejected_scope=args.rejected_scope,
                            allow_test_split=args.allow_test_split, seed=args.seed)
    finally:
        getattr(teacher, "close", lambda: None)()
    write_pairs(args.out, pairs)
    cases = len(select_cases(rows, args.variant)) if args.variant != "rand-ns" else len(pairs)
    print(f"qmr pairs: {len(pairs)} pairs from {cases} cases (teacher {teacher.name}, variant {args.variant}) "
          f"-> {args.out}", file=sys.stderr)
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from ..models import resolve

    config = RestoreConfig()
    for item in args.set or []:
        config.set(item)
    pairs = read_pairs(args.pairs)
    model_path = resolve(args.model).path
    distill_from = resolve(args.distill_from).path if args.distill_from else None
    card = train_adapter(model_path, pairs, config, args.out, distill_from=distill_from)
    if args.merge:
        merge_to_dir(model_path, args.out, args.merge)
    print(json.dumps({k: card[k] for k in ("pairs", "steps", "minutes", "adapter_path")}, indent=2))
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    config = AblationConfig(model=args.model, bits=args.bits, group_size=args.group_size,
                            variants=tuple(args.variants.split(",")), n_train=args.n_train, n_test=args.n_test,
                            budget=args.budget)
    restore = RestoreConfig()
    for item in args.set or []:
        restore.set(item)
    rows = ablate(config, restore, args.out, args.cache_dir)
    print(format_table(rows))
    return 0


def add_cli(subparsers) -> None:
    """Register ``qmr pairs``, ``qmr restore`` and ``qmr ablate``."""
    p = subparsers.add_parser("pairs", help="Silver Bullet preference pairs from judged failures")
    p.add_argument("--judged", required=True, help="judged.jsonl (qmr judge output, or mined traces)")
    p.add_argument("--teacher", default="gold", help="gold | fp | endpoint:NAME")
    p.add_argument("--variant", default="all-step", choices=list(VARIANTS))
    p.add_argument("--rejected-scope", default="rest", choices=REJECTED_SCOPES,
                   help="reject the quantized continuation (rest) or only its faulty step (step)")
    p.add_argument("--out", required=True, help="pairs.jsonl")
    p.add_argument("--model", default=None, help="the FP model (teacher fp; also renders unformatted prompts)")
    p.add_argument("--judge-config", default=None, help="judges.yaml holding the endpoint of endpoint:NAME")
    p.add_argument("--solutions", default=None, help="gold solutions: gsm8k-train, arith-train:N, ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--kind", default="number", choices=answers.KINDS)
    p.add_argument("--eval-ids", default=None, help="JSONL whose ids are evaluation items (leakage guard)")
    p.add_argument("--allow-test-split", action="store_true", help="allow pairs from test-split items")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_pairs)

    r = subparsers.add_parser("restore", help="train a LoRA adapter with DPO on preference pairs")
    r.add_argument("--model", required=True, help="the quantized model's dense checkpoint")
    r.add_argument("--pairs", required=True)
    r.add_argument("--out", required=True, help="adapter directory")
    r.add_argument("--merge", default=None, help="also write the merged model here")
    r.add_argument("--distill-from", default=None,
                   help="the full-precision model, teacher of --set distill_weight=W (KL on the chosen rows)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a RestoreConfig field")
    r.set_defaults(func=_cmd_restore)

    a = subparsers.add_parser("ablate", help="lab ablation: all-step vs all-ns vs rand-ns at one pair budget")
    a.add_argument("--model", default="embedded:smollm2-135m-arith")
    a.add_argument("--bits", type=int, default=3)
    a.add_argument("--group-size", type=int, default=64)
    a.add_argument("--variants", default="all-step,all-ns,rand-ns")
    a.add_argument("--n-train", type=int, default=200)
    a.add_argument("--n-test", type=int, default=40)
    a.add_argument("--budget", type=int, default=None, help="pairs per variant (default: all-step's count)")
    a.add_argument("--cache-dir", default=None)
    a.add_argument("--out", required=True, help="work directory (traces, pairs, adapters, ablation.json)")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a RestoreConfig field")
    a.set_defaults(func=_cmd_ablate)
