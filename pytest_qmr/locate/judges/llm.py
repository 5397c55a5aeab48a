"""The attempt loop every LLM judge shares, and what keeps its secrets out of sight.

An LLM judge (:class:`LLMJudge`; :mod:`.endpoint` and :mod:`.local` implement one attempt each)
builds the prompt of :mod:`.prompt`, asks, and parses the answer. Timeouts, connection
failures, HTTP 429/5xx, malformed or wrong-schema answers are retried with exponential backoff;
after the last attempt (or at once on any other HTTP 4xx) the judge returns a Vote with
``status="unjudged"`` and a ``reason`` — it never raises, so one bad case cannot lose the
verdicts of the others. Each judge works through its cases on its own pool, ``concurrency`` at
a time.

The API key goes only into the ``Authorization`` header. Every text that leaves a judge (reasons,
explanations, raw answers, log lines) passes through :func:`redact`, so the key never appears
in logs, exceptions, records or reports.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .base import Case, Vote
from .config import JudgeConfig
from .prompt import JudgeOutputError, build_messages, parse_verdict, vote_from_output

logger = logging.getLogger(__name__)

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
RAW_KEEP = 2000  # characters of a failed answer kept on the vote for debugging


def redact(text: Any, *secrets: str | None) -> str:
    """``text`` with every secret, and anything written as ``Bearer <token>``, replaced."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return _BEARER.sub(r"\1[REDACTED]", text)


class RetryableAttempt(Exception):
    """A failed attempt worth retrying (timeout, connection, 429/5xx, bad answer)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FatalAttempt(Exception):
    """A failure no retry fixes (HTTP 4xx, missing key): unjudged at once."""


class LLMJudge:
    """Attempt loop shared by the endpoint and the local judge."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.name = config.name
        self._sleep = sleep
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._rng = random.Random(0)

    # subclasses: one attempt -> (answer text, usage); raise RetryableAttempt / FatalAttempt
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
                except RetryableAttempt as exc:
                    reason, retry_after = str(exc), exc.retry_after
                reason = redact(reason, secret)
                if attempt < self.config.max_retries:
                    delay = self._delay(attempt, retry_after)
                    logger.warning("judge %s, case %s: attempt %d failed (%s); retrying in %.1fs",
                                   self.name, case.id, attempts, reason, delay)
                    self._sleep(delay)
            reason = f"gave up after {attempts} attempt(s): {reason}"
        except FatalAttempt as exc:
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
