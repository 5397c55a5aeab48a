"""The judges of the Locate stage: which step of a failed solution goes wrong first, and how.

Every judge follows one protocol (:mod:`.base`: ``name``, ``judge(case) -> Vote``, ``submit``,
``judge_many``, ``close``). Two kinds:

- registered judges, one module each, found by name in :data:`pytest_qmr.registry.JUDGES`:
  ``rule`` (:mod:`.rule`, the deterministic arithmetic judge) and ``arith`` (:mod:`.arith`, the
  exact labeller of ``qmr_arith``); a project registers its own the same way;
- LLM judges, named and configured in a judge config file (:mod:`.config`): ``kind: openai``
  (:mod:`.endpoint`, any OpenAI-compatible endpoint) or ``kind: local`` (:mod:`.local`, a
  transformers checkpoint in this process), sharing the prompt (:mod:`.prompt`) and the attempt
  loop (:mod:`.llm`).

:func:`build_judges` turns the names a suite or ``qmr judge --judges`` lists into judges.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...registry import JUDGES
from .arith import ARITH, ArithJudge
from .base import NO_ERROR, VOTE_STATUSES, Case, InlineJudge, Judge, Vote
from .config import JudgeConfig, JudgeFileError, JudgeSettings, load_judge_settings, parse_judge_settings
from .endpoint import OpenAIJudge
from .llm import LLMJudge, redact
from .local import LocalJudge
from .prompt import (SYSTEM_PROMPT, TYPE_DEFINITIONS, JudgeOutput, JudgeOutputError, build_messages,
                     extract_json_object, parse_verdict, vote_from_output)
from .rule import RULE, RuleJudge

__all__ = ["ARITH", "LLM_KINDS", "NO_ERROR", "RULE", "SYSTEM_PROMPT", "TYPE_DEFINITIONS", "VOTE_STATUSES",
           "ArithJudge", "Case", "InlineJudge", "Judge", "JudgeConfig", "JudgeFileError", "JudgeOutput",
           "JudgeOutputError", "JudgeSettings", "LLMJudge", "LocalJudge", "OpenAIJudge", "RuleJudge", "Vote",
           "build_judges", "build_messages", "extract_json_object", "load_judge_settings", "make_judge",
           "parse_judge_settings", "parse_verdict", "redact", "vote_from_output"]

LLM_KINDS: dict[str, type[LLMJudge]] = {"openai": OpenAIJudge, "local": LocalJudge}  # JudgeConfig.kind


def make_judge(config: JudgeConfig, **kwargs: Any) -> LLMJudge:
    """The LLM judge of one judge config entry."""
    return LLM_KINDS[config.kind](config, **kwargs)


def build_judges(names: Iterable[str], settings: JudgeSettings | None = None) -> list[Judge]:
    """Judges by name, in the order given: registered judges (``JUDGES``: ``rule``, ``arith``, a
    project's own) first, then the LLM judges configured in ``settings``."""
    judges: list[Judge] = []
    seen = set()
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name in seen:
            raise JudgeFileError(f"judge {name!r} listed twice")
        seen.add(name)
        judges.append(_build(name, settings))
    return judges


def _build(name: str, settings: JudgeSettings | None) -> Judge:
    if name in JUDGES:
        judge = JUDGES.get(name)()
        if not isinstance(judge, Judge):
            raise JudgeFileError(f"judge {name!r}: {type(judge).__name__} does not follow the judge protocol "
                                 "(name, judge, submit, judge_many, close)")
        return judge
    if settings is not None and name in settings.judges:
        return make_judge(settings.judges[name])
    configured = tuple(settings.judges) if settings else ()
    raise JudgeFileError(JUDGES.unknown(name, also=configured) + "; LLM judges come from --judge-config")
