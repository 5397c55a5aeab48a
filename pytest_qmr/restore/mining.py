"""Mining: the quantized model answers training problems, each answer labelled at its first faulty step.

:func:`mine_traces` renders every :class:`~pytest_qmr.restore.problems.TrainProblem` as the
benchmark asks it, generates greedily (:func:`generate_greedy`, or a caller's ``generate`` that
answers from the generation cache) and labels each response with :func:`label_traces`: the
Locate stage itself, with the suite's judges and policy, gives every failed response its first
faulty step (``first_error_step``, ``primary_error_type``, ``category``, ``status``, ``votes``...),
so Restore cuts a trace exactly where a cell's Locate locates it. The rows are what
:func:`pytest_qmr.restore.pairs.build_pairs` cuts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import answers
from ..steps import segment
from .problems import TrainProblem, chat_prompt, user_turn


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


#: the judges mining uses outside a cell: the exact labeller (and the rule judge) on qmr_arith
#: problems, the rule judge alone on others (inside a cell: the suite's ``locate:`` section)
ARITH_JUDGES, OTHER_JUDGES = ("arith", "rule"), ("rule",)


def label_traces(rows: Sequence[Mapping[str, Any]], problems: Sequence[TrainProblem], *,
                 judges: Sequence[str] | None = None, policy: Mapping[str, Any] | None = None,
                 judge_config: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Each mined row (``id``, ``problem``, ``response``, ``gold_answer``, ...) with Locate's verdict.

    A row whose final answer verifies is ``correct`` with no faulty step; the others go through the
    Locate stage itself (:func:`pytest_qmr.locate.locate`) with ``judges`` and ``policy`` as a
    suite's ``locate:`` names them (default :data:`ARITH_JUDGES` when every problem is a qmr_arith
    one, else :data:`OTHER_JUDGES`), so a trace Restore cuts is one a cell's Locate would locate
    at the same step. The arith judge is told the problems (it knows them by id)."""
    from ..locate import ensemble, locate
    from ..locate.judges.arith import ArithJudge

    if judges is None:
        judges = ARITH_JUDGES if problems and all(p.arith is not None for p in problems) else OTHER_JUDGES
    out: list[dict[str, Any]] = []
    failed: list[int] = []
    for i, (row, p) in enumerate(zip(rows, problems, strict=True)):
        correct = answers.is_equivalent(answers.extract_answer(str(row["response"]), p.kind), p.gold_answer, p.kind)
        out.append({**row, "correct": correct, "n_steps": len(segment(str(row["response"]))), "first_error_step": -1,
                    "primary_error_type": None, "category": None, "status": "accepted",
                    "reason": "the final answer verifies" if correct else "", "verdict_by": None})
        if not correct:
            failed.append(i)
    if not failed:
        return out
    with ensemble(judges, policy, judge_config) as (built, decided_by):
        for judge in built:
            if isinstance(judge, ArithJudge):
                judge.know(p.arith for p in problems if p.arith is not None)
        located = locate([out[i] for i in failed], built, decided_by)
    for i, row in zip(failed, located, strict=True):
        out[i] = {**row.to_dict(), "correct": False}
    return out


def mine_traces(model_path: str | os.PathLike, problems: Sequence[TrainProblem], *, max_new_tokens: int = 160,
                batch_size: int = 16, progress: bool = True, model_and_tokenizer=None, tokenizer=None,
                generate: Callable[[list[str]], list[str]] | None = None, judges: Sequence[str] | None = None,
                policy: Mapping[str, Any] | None = None,
                judge_config: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The model's greedy responses to training ``problems``, each labelled with its first faulty
    step by the Locate stage (:func:`label_traces`: ``judges``, ``policy``, ``judge_config`` as a
    suite's ``locate:``). Rows have the Locate output fields plus ``prompt``, ``solution``,
    ``kind`` and ``correct``; :func:`build_pairs` keeps the located failures. ``generate`` (with
    the model's ``tokenizer``) replaces :func:`generate_greedy` on the loaded model, e.g. by one
    that answers from the generation cache (:mod:`pytest_qmr.cache`)."""
    from ..models import load

    if generate is None:
        model, tokenizer = model_and_tokenizer or load(Path(model_path))

        def generate(prompts: list[str]) -> list[str]:
            return generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, "mining", progress)
    elif tokenizer is None:
        raise TypeError("mine_traces: a generate function needs the model's tokenizer")
    prompts = [chat_prompt(tokenizer, user_turn(p.question, p.kind)) for p in problems]
    responses = generate(prompts)
    rows = [{"id": p.id, "doc_index": i, "problem": p.question, "prompt": prompt, "response": response,
             "gold_answer": p.gold_answer, "solution": p.solution, "kind": p.kind}
            for i, (p, prompt, response) in enumerate(zip(problems, prompts, responses, strict=True))]
    return label_traces(rows, problems, judges=judges, policy=policy, judge_config=judge_config)

