"""Teachers: who writes the *chosen* continuation of a pair, from the cut on.

A case is cut just before its first faulty step (:class:`Cut`); a teacher continues
``cut.prompt + cut.prefix`` and the pair keeps the continuation only when its final answer
verifies against the gold. Every teacher follows one protocol (:class:`Teacher`): a ``name``
(what ``pairs.jsonl`` records) and ``continue_many(cuts) -> list[str | None]`` (None: no
continuation for that cut); ``close()`` is optional.

Teachers are registered by name in :data:`pytest_qmr.registry.TEACHERS`, from which the suite's
``restore.teacher`` check and ``qmr pairs --teacher`` are derived; :func:`make_teacher` builds one
from a spec ``NAME`` or ``NAME:ARG`` by calling the registered class's
``from_spec(name, arg, options)`` with the :class:`TeacherOptions` the caller knows (the FP
model, the judge config, gold solutions, generation sizes). What a registered class declares:

``argument``            what follows ``NAME:`` (None: the spec is the bare name);
``argument_from``       where that argument is found (the suite requires that setting);
``needs_judge_config``  the suite must name ``locate.judge_config``.

Built in: ``gold`` (:class:`GoldTeacher`, the step-aligned gold solution resumed at the cut),
``fp`` (:class:`ModelTeacher`, the full-precision model continuing greedily) and
``endpoint:NAME`` (:class:`EndpointTeacher`, an OpenAI-compatible chat endpoint configured like a
judge in the judge config). A teacher of a project's own is one class registered under a new
name, e.g. a gold teacher that writes only the final answer line::

    @TEACHERS.register("answer-only")
    @dataclass
    class AnswerOnly(GoldTeacher):
        def continue_many(self, cuts):
            return [f"The answer is {c.gold_answer}." for c in cuts]
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..registry import TEACHERS, RegistryError
from .mining import generate_greedy
from .problems import GoldSolution
from .records import RestoreError


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


@dataclass(frozen=True)
class TeacherOptions:
    """What :func:`make_teacher` hands a registered teacher class's ``from_spec``."""

    model: str | os.PathLike | None = None  # the full-precision model (``fp``)
    judge_config: str | None = None  # the judge config holding endpoints (``endpoint:NAME``)
    solutions: Mapping[str, str] = field(default_factory=dict)  # item id -> gold solution text
    max_new_tokens: int = 160
    batch_size: int = 16


@dataclass
class GoldTeacher:
    """The gold solution resumed at the cut (step-aligned by matching the prefix's results)."""

    solutions: Mapping[str, str] = field(default_factory=dict)  # item id -> solution text; else row["solution"]
    name: str = "gold"

    argument: ClassVar[str | None] = None
    argument_from: ClassVar[str] = ""
    needs_judge_config: ClassVar[bool] = False

    @classmethod
    def from_spec(cls, name: str, arg: str | None, options: TeacherOptions) -> "GoldTeacher":
        return cls(dict(options.solutions), name=name)

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

    argument: ClassVar[str | None] = None
    argument_from: ClassVar[str] = ""
    needs_judge_config: ClassVar[bool] = False

    @classmethod
    def from_spec(cls, name: str, arg: str | None, options: TeacherOptions) -> "ModelTeacher":
        if options.model is None:
            raise RestoreError(f"teacher {name} needs the full-precision model (--model)")
        return cls(options.model, options.max_new_tokens, options.batch_size, name=name)

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

    argument: ClassVar[str | None] = "NAME"
    argument_from: ClassVar[str] = "locate.judge_config"
    needs_judge_config: ClassVar[bool] = True

    def __init__(self, config) -> None:
        from ..locate.judges import OpenAIJudge

        self.config = config
        self.name = f"endpoint:{config.name}"
        self._client = OpenAIJudge(config)

    @classmethod
    def from_spec(cls, name: str, arg: str | None, options: TeacherOptions) -> "EndpointTeacher":
        from ..locate.judges import load_judge_settings

        spec = f"{name}:{arg}"
        if not options.judge_config:
            raise RestoreError(f"teacher {spec} needs --judge-config naming an endpoint {arg!r}")
        settings = load_judge_settings(options.judge_config)
        if arg not in settings.judges or settings.judges[arg].kind != "openai":
            raise RestoreError(f"teacher {spec}: no openai-kind endpoint {arg!r} in {options.judge_config}")
        return cls(settings.judges[arg])

    def _messages(self, cut: Cut) -> list[dict[str, str]]:
        user = cut.user if not cut.prefix else f"{cut.user}\n\n{CONTINUE_INSTRUCTION}\n\n{cut.prefix}"
        return [{"role": "user", "content": user}]

    def _one(self, cut: Cut) -> str | None:
        from ..locate.judges.llm import FatalAttempt, RetryableAttempt, redact

        secret = self._client._secret()
        reason = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            try:
                text, _ = self._client._complete(self._messages(cut), attempt)
                return text.lstrip("\n")
            except FatalAttempt as exc:
                raise RestoreError(f"teacher {self.name}: {redact(exc, secret)}") from None
            except RetryableAttempt as exc:
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


TEACHERS.add("gold", GoldTeacher)
TEACHERS.add("fp", ModelTeacher)
TEACHERS.add("endpoint", EndpointTeacher)


# --------------------------------------------------------------------------------- by name


def teacher_forms() -> str:
    """The teacher specs a suite may give, as one phrase: "gold, fp or endpoint:NAME (NAME from ...)"."""
    forms = []
    for name, cls in TEACHERS.items():
        arg = getattr(cls, "argument", None)
        where = getattr(cls, "argument_from", "")
        forms.append(f"{name}:{arg}" + (f" ({arg} from {where})" if where else "") if arg else name)
    return forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"


def spec_problem(spec: str, judge_config: str | None = "") -> str | None:
    """Why ``spec`` names no teacher a suite can build (None: it does). ``judge_config``: the
    suite's ``locate.judge_config`` (None: it has none)."""
    name, colon, arg = spec.partition(":")
    if name not in TEACHERS:
        close = TEACHERS.closest(name)
        return TEACHERS.unknown(name) if close else f"must be {teacher_forms()}"
    cls = TEACHERS.get(name)
    wants_arg = getattr(cls, "argument", None) is not None
    if wants_arg != bool(colon) or (colon and not arg) or (getattr(cls, "needs_judge_config", False)
                                                            and not judge_config):
        return f"must be {teacher_forms()}"
    return None


def make_teacher(spec: str, *, model: str | os.PathLike | None = None, judge_config: str | None = None,
                 solutions: Mapping[str, str] | None = None, max_new_tokens: int = 160,
                 batch_size: int = 16) -> Teacher:
    """The teacher ``spec`` names (``NAME`` or ``NAME:ARG``, NAME registered in ``TEACHERS``:
    ``gold`` | ``fp`` (``model`` = the FP checkpoint) | ``endpoint:NAME`` (``judge_config``))."""
    name, colon, arg = spec.partition(":")
    try:
        cls = TEACHERS.get(name)
    except RegistryError as exc:
        raise RestoreError(str(exc)) from None
    if not callable(getattr(cls, "from_spec", None)):
        raise RestoreError(f"teacher {name!r}: {getattr(cls, '__name__', type(cls).__name__)} does not follow the "
                           "teacher protocol (from_spec, continue_many)")
    wants_arg = getattr(cls, "argument", None) is not None
    if wants_arg and not arg:
        raise RestoreError(f"teacher {spec!r}: expected {name}:{cls.argument}")
    if not wants_arg and colon:
        raise RestoreError(f"teacher {spec!r}: {name} takes no argument (expected {name})")
    options = TeacherOptions(model, judge_config, dict(solutions or {}), max_new_tokens, batch_size)
    return cls.from_spec(name, arg if wants_arg else None, options)
