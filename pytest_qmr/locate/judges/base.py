"""What every Locate judge shares: the case it judges, the vote it gives, and the judge protocol.

A judge is any object with

- ``name``: the name it votes under (the name the suite's ``locate.judges`` lists);
- ``judge(case) -> Vote``: one verdict, never raising (a failure is a ``unjudged`` vote);
- ``submit(case) -> Future[Vote]``, ``judge_many(cases, on_done=None) -> list[Vote]``: the same,
  asynchronously and in bulk (the stage submits every case, then collects);
- ``close()``: release pools and connections.

:class:`InlineJudge` implements all but ``judge`` for a judge that needs no endpoint. A built-in
judge (or a project's own) is registered in :data:`pytest_qmr.registry.JUDGES` under its name as
a callable taking no arguments that returns a judge (a class, usually)::

    from pytest_qmr.locate.judges import InlineJudge, Vote
    from pytest_qmr.registry import JUDGES

    @JUDGES.register("first-step")
    class FirstStep(InlineJudge):
        name = "first-step"

        def judge(self, case):
            return Vote(self.name, "error", 1, "procedural_error", attempts=1)

LLM judges are not registered: they are named and configured in a judge config file
(:mod:`pytest_qmr.locate.judges.config`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

from ...steps import Step, segment

NO_ERROR = "no_error"
VOTE_STATUSES = ("error", "no_error", "abstain", "unjudged")


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


@runtime_checkable
class Judge(Protocol):
    """The judge protocol (see the module doc)."""

    name: str

    def judge(self, case: Case) -> Vote: ...

    def submit(self, case: Case) -> Future: ...

    def judge_many(self, cases: Sequence[Case],
                   on_done: Callable[[int, Vote], None] | None = None) -> list[Vote]: ...

    def close(self) -> None: ...


class InlineJudge:
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
