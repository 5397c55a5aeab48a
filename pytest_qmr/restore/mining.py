"""Mining: the quantized model answers training problems, each answer labelled at its first faulty step.

:func:`mine_traces` renders every :class:`~pytest_qmr.restore.problems.TrainProblem` as the
benchmark asks it, generates greedily (:func:`generate_greedy`, or a caller's ``generate`` that
answers from the generation cache) and labels each response with :func:`label_trace`: Locate's
output fields (``correct``, ``first_error_step``, ``primary_error_type``, ``category``,
``status``) — qmr_arith's exact labeller where the problem carries its arith structure, else the
rule judge. The rows are what :func:`pytest_qmr.restore.pairs.build_pairs` cuts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import answers, taxonomy
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

