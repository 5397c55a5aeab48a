"""``qmr judge`` (Locate over a traces file, resumable) and ``qmr review {build,import}`` (the human
review queue). The registered judges (:data:`pytest_qmr.registry.JUDGES`) and the LLM judges of
``--judge-config`` are named in ``--judges``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_jsonl, read_jsonl_strict
from ..locate import (POLICIES, LocatedRow, LocateError, Policy, default_policy, error_profile, import_reviews,
                      locate, profile_summary, validate_rows, write_review_queue)
from ..locate.judges import RULE, build_judges, load_judge_settings
from ..registry import JUDGES

__all__ = ["add_cli"]


def _summary(rows: Sequence[LocatedRow | Mapping[str, Any]]) -> str:
    return profile_summary(error_profile(rows))


def _cmd_judge(args: argparse.Namespace) -> int:
    from ..answers import KINDS, extract_answer, is_equivalent
    from ..fsutil import append_jsonl, read_jsonl

    if args.kind not in KINDS:
        raise LocateError(f"--kind must be one of {', '.join(KINDS)}")
    rows = read_jsonl_strict(args.input, LocateError)
    validate_rows(rows)
    if not args.all:
        total = len(rows)
        rows = [r for r in rows
                if not is_equivalent(extract_answer(r["response"], args.kind), str(r["gold_answer"]), args.kind)]
        print(f"qmr judge: {len(rows)} of {total} rows have a wrong answer ({args.kind}); "
              f"{total - len(rows)} right ones skipped (--all judges them)", file=sys.stderr)
    settings = load_judge_settings(args.judge_config) if args.judge_config else None
    names = [n for n in args.judges.split(",") if n.strip()]
    judges = build_judges(names, settings)
    policy_data = dict(settings.policy) if settings else {}
    if settings and settings.primary and "primary" not in policy_data:
        policy_data["primary"] = settings.primary
    if args.policy:
        policy_data["name"] = args.policy
    if args.primary:
        policy_data["primary"] = args.primary
    if args.no_rule_vote:
        policy_data["rule_vote"] = False
    policy_data.setdefault("name", default_policy(judges).name)
    if not args.primary and policy_data.get("primary") not in (None, *names):
        del policy_data["primary"]  # the config's primary is not among --judges: first LLM judge leads
    policy = Policy.from_dict(policy_data)

    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    previous = {}
    if partial.exists() and not args.fresh:
        previous = {str(r.get("id")): r for r in read_jsonl(partial)}
        print(f"qmr judge: resuming, {len(previous)} rows' votes from {partial}", file=sys.stderr)
    elif partial.exists():
        partial.unlink()
    try:
        judged = locate(rows, judges, policy, previous=previous,
                        on_row=lambda r: append_jsonl(partial, [r.to_dict()]), progress=not args.no_progress)
    finally:
        for j in judges:
            j.close()
    atomic_write_jsonl(out, (r.to_dict() for r in judged))
    partial.unlink(missing_ok=True)
    Path(str(partial) + ".lock").unlink(missing_ok=True)
    print(f"qmr judge: {_summary(judged)} -> {out}", file=sys.stderr)
    if args.profile:
        from ..fsutil import atomic_write_json

        atomic_write_json(args.profile, error_profile(judged).to_dict())
    if args.review_dir:
        cases = write_review_queue(judged, args.review_dir, audit_rate=args.audit_rate, seed=args.seed)
        print(f"qmr judge: review queue of {len(cases)} cases -> {Path(args.review_dir) / 'index.html'}",
              file=sys.stderr)
    return 0


def _cmd_review_build(args: argparse.Namespace) -> int:
    rows = read_jsonl_strict(args.judged, LocateError)
    cases = write_review_queue(rows, args.out, audit_rate=args.audit_rate, seed=args.seed)
    print(f"qmr review: {len(cases)} cases -> {Path(args.out) / 'index.html'}", file=sys.stderr)
    return 0


def _cmd_review_import(args: argparse.Namespace) -> int:
    rows = read_jsonl_strict(args.judged, LocateError)
    merged = import_reviews(args.queue, rows)
    atomic_write_jsonl(args.out, (r.to_dict() for r in merged))
    n = sum(r.status == "human" for r in merged) - sum(r.get("status") == "human" for r in rows)
    print(f"qmr review: {n} human verdicts merged; {_summary(merged)} -> {args.out}", file=sys.stderr)
    return 0


def add_cli(subparsers) -> None:
    """Register ``qmr judge`` and ``qmr review {build,import}``."""
    p = subparsers.add_parser("judge",
                              help="locate the first faulty step of failed solutions with an ensemble of judges")
    p.add_argument("--input", required=True,
                   help="traces.jsonl: id, problem, response, gold_answer[, reference_response]")
    p.add_argument("--judges", default=RULE,
                   help=f"comma-separated: {', '.join(JUDGES.names())} and judge names from --judge-config")
    p.add_argument("--judge-config", default=None, help="judges.yaml (endpoints, models, api_key_env, retries)")
    p.add_argument("--out", required=True, help="judged.jsonl")
    p.add_argument("--all", action="store_true", help="judge every row, not only rows with a wrong answer")
    p.add_argument("--kind", default="number", help="answer kind for picking wrong rows: number, latex, choice")
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="ensemble policy (default: paper with an LLM judge, rule-only without)")
    p.add_argument("--primary", default=None, help="primary judge of the paper policy (default: first LLM judge)")
    p.add_argument("--no-rule-vote", action="store_true", help="do not count rule-judge errors as votes")
    p.add_argument("--review-dir", default=None, help="write a human review queue here")
    p.add_argument("--audit-rate", type=float, default=0.02, help="share of accepted cases sampled for audit")
    p.add_argument("--seed", type=int, default=0, help="seed of the audit sample")
    p.add_argument("--profile", default=None, help="write the error profile (JSON) here")
    p.add_argument("--fresh", action="store_true", help="ignore votes saved by an interrupted run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_judge)

    r = subparsers.add_parser("review", help="human review queue: build it, import filled-in verdicts")
    rsub = r.add_subparsers(dest="review_command", required=True)
    b = rsub.add_parser("build", help="write the review queue of a judged.jsonl")
    b.add_argument("--judged", required=True)
    b.add_argument("--out", required=True, help="queue directory")
    b.add_argument("--audit-rate", type=float, default=0.02)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_cmd_review_build)
    i = rsub.add_parser("import", help="merge filled human_verdict.json files into judged rows")
    i.add_argument("--queue", required=True, help="queue directory")
    i.add_argument("--judged", required=True, help="judged.jsonl the queue was built from")
    i.add_argument("--out", required=True, help="merged judged.jsonl")
    i.set_defaults(func=_cmd_review_import)
