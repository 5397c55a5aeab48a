"""``qmr pairs``, ``qmr restore`` and ``qmr ablate``: the Restore stage outside pytest.

``qmr pairs`` turns judged rows (``qmr judge`` output, or mined traces) into ``pairs.jsonl``
with a registered teacher (``--teacher``, :data:`pytest_qmr.registry.TEACHERS`) and Restore
variant (``--variant``, its choices from :data:`pytest_qmr.registry.RESTORE_VARIANTS`);
``qmr restore`` trains an adapter on them; ``qmr ablate`` runs the lab ablation.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import answers
from ..fsutil import data_root, read_jsonl_strict
from ..registry import RESTORE_VARIANTS
from ..restore import (AblationConfig, ModelTeacher, RestoreConfig, RestoreError, ablate, arith_problems,
                       build_pairs, format_table, get_variant, gsm8k_problems, make_teacher, merge_to_dir,
                       read_pairs, select_cases, teacher_forms, train_adapter, write_pairs)
from ..restore.pairs import REJECTED_SCOPES

__all__ = ["add_cli"]


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
    cases = len(pairs) if get_variant(args.variant).draws_from_pool else len(select_cases(rows, args.variant))
    print(f"qmr pairs: {len(pairs)} pairs from {cases} cases (teacher {teacher.name}, variant {args.variant}) "
          f"-> {args.out}", file=sys.stderr)
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from ..models import resolve

    config = RestoreConfig.from_settings(args.set or [])
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
    p.add_argument("--teacher", default="gold", help=teacher_forms().replace("locate.judge_config", "--judge-config"))
    p.add_argument("--variant", default="all-step", choices=RESTORE_VARIANTS.names())
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
