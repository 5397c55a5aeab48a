"""The Markdown report: fits a GitHub job summary or PR comment.

A summary line, Table 1 (FP and, per quantizer, accuracy and relative change with the verdict's
emoji), then each failing or inconclusive cell with its gate line, error profile, Restore result
and first ``max_items`` regressed items, then the baselines. Every text that comes from a model
or a file passes :func:`md_escape`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_text
from .formatting import fmt, one_line, publish, rel_change
from .records import Report


_MD_ESCAPES = {"\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "|": "\\|",
               "<": "&lt;", ">": "&gt;", "&": "&amp;", "@": "&#64;", "#": "&#35;", "~": "\\~"}
_EMOJI = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️", None: "➖"}


def md_escape(text: Any, limit: int | None = None) -> str:
    """Model text safe inside a GitHub Markdown table or list item: one line, no HTML, no
    emphasis/link/code syntax, no ``|``, no @-mentions or #-references."""
    text = one_line(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(_MD_ESCAPES.get(ch, ch) for ch in text)


def _md_profile(profile: dict[str, Any]) -> str:
    types = sorted(((t, v.get("count", 0), v.get("share", 0.0)) for t, v in (profile.get("types") or {}).items()
                    if (v or {}).get("count")), key=lambda x: -x[1])
    parts = [f"{t.replace('_', ' ')} {share:.0%} ({count})" for t, count, share in types]
    median = (profile.get("first_error_step") or {}).get("median")
    line = ", ".join(parts) or "no located errors"
    if median is not None:
        line += f"; median first faulty step {median}"
    return line


def _md_restore(restore: dict[str, Any]) -> str:
    line = (f"FP {fmt(restore.get('fp_acc'))} → quantized {fmt(restore.get('quant_acc'))} → restored "
            f"{fmt(restore.get('restored_acc'))}")
    if restore.get("recovered_delta") is not None:
        line += f" (Δ recovered {restore['recovered_delta']:+.3f}"
        if restore.get("recovered_share") is not None:
            line += f", {restore['recovered_share']:.0%} of the loss"
        line += ")"
    extra = [f"{k} {fmt(restore[k], '.3g')}" for k in ("pairs", "minutes", "p_value") if restore.get(k) is not None]
    line += "; " + ", ".join(extra) if extra else ""
    deployed = restore.get("deployed")
    if deployed:
        line += ("; deployed (compressed + adapter on vLLM): " + (
            f"restored {fmt(deployed.get('restored_acc'))}, same correctness as the dense copy on "
            f"{fmt(deployed.get('agreement_with_dense'), '.0%')}" if deployed.get("servable")
            else md_escape(deployed.get("line") or deployed.get("error") or "not measured")))
    return line


def _md_answers(answers: dict[str, Any]) -> str:
    """A sampled or thinking cell's scores and cost in one line."""
    parts = []
    if answers.get("sampling"):
        parts.append(f"{answers['sampling']['samples']} per item at temperature {answers['sampling']['temperature']}")
    for name, label in (("pass_at_k", "pass@k"), ("maj_at_k", "maj@k"), ("seed_std", "std over seeds")):
        if answers.get(name) is not None:
            parts.append(f"{label} {answers[name]:.3f}")
    if answers.get("truncated_share") is not None:
        parts.append(f"truncated {answers['truncated_share']:.1%}")
    length = answers.get("length") or {}
    if length.get("ratio") is not None:
        ci = length.get("ratio_ci")
        parts.append(f"length {length['ratio']:.2f}x FP" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    parts += [md_escape(v) for v in answers.get("cost_violations") or []]
    return "; ".join(parts)


def render_markdown(report: Report, *, max_items: int = 5) -> str:
    s = report.summary
    lines = ["## pytest-qmr report", "",
             f"**{s['fail']} fail · {s['inconclusive']} inconclusive · {s['pass']} pass** "
             f"({s['cells']} cells) — run `{md_escape(report.run_dir)}`", ""]
    header = ["model", "benchmark", "FP", *report.quantizers]
    lines += ["| " + " | ".join(md_escape(h) for h in header) + " |",
              "|" + "---|" * 2 + "---:|" * (1 + len(report.quantizers))]
    for row in report.table:
        fp = "–" if row.fp_acc is None else f"{row.fp_acc:.3f} (n={row.fp_n})"
        cols = [md_escape(row.model), md_escape(row.benchmark), fp]
        for q in report.quantizers:
            e = row.entries.get(q)
            cols.append("" if e is None else
                        f"{_EMOJI.get(e.verdict, '➖')} {e.accuracy:.3f} ({rel_change(e.rel_drop)})")
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "Relative change vs FP on the paired items; ✅ pass ❌ fail ⚠️ inconclusive.", ""]

    flagged = [c for c in report.cells if not c.is_fp and c.verdict in ("fail", "inconclusive")]
    unservable = [c for c in report.cells if c.outcome == "not_servable"]
    if unservable:
        lines += ["### Not servable", ""] + [f"- ⛔ **{md_escape(c.cell_id)}** — {md_escape(c.gate_line)}"
                                             for c in unservable] + [""]
    errors = [c for c in report.cells if c.outcome == "error"]
    if errors:
        lines += ["### Errors", ""] + [f"- 💥 **{md_escape(c.cell_id)}** — {md_escape(c.gate_line)}"
                                       for c in errors] + [""]
    if flagged:
        lines += ["### Failing and inconclusive cells", ""]
    for c in flagged:
        lines.append(f"- {_EMOJI[c.verdict]} **{md_escape(c.cell_id)}** — {md_escape(c.gate_line)}")
        if c.answers:
            lines.append(f"  - answers: {_md_answers(c.answers)}")
        if c.error_profile:
            lines.append(f"  - error types: {_md_profile(c.error_profile)}")
        for v in c.profile_violations:
            lines.append(f"  - error profile: {md_escape(v)}")
        if c.restore:
            lines.append(f"  - restore: {_md_restore(c.restore)}")
        if c.regressions_total:
            lines.append(f"  - {c.regressions_total} regressed items (FP right, quantized wrong)"
                         + ("" if c.located else ", not located"))
        for item in c.regressions[:max_items]:
            where = ""
            if item.first_error_step and item.first_error_step > 0:
                where = f" step {item.first_error_step} {md_escape(item.primary_error_type or '')}"
                if item.faulty_step:
                    where += f": “{md_escape(item.faulty_step, 160)}”"
            lines.append(f"    - `{md_escape(item.item_id, 60)}` gold {md_escape(item.gold, 40)}, quantized "
                         f"{md_escape(item.quant_extracted, 40)}{where}")
        for note in c.notes:
            lines.append(f"  - _{md_escape(note)}_")
    lines += ["", "### Baselines", ""]
    for b in report.baselines:
        head = f"- {md_escape(b.model)} / {md_escape(b.benchmark)}: "
        if b.status != "ok":
            lines.append(head + f"**{b.status}** — {md_escape(b.error or '')}")
            continue
        fp = f"FP acc baseline {b.baseline_acc:.3f} (n={b.baseline_n})"
        if b.run_fp_acc is not None:
            fp += f", this run {b.run_fp_acc:.3f} (n={b.run_fp_n})"
        lines.append(head + f"created {md_escape(b.created)}; {fp}; " + md_escape("; ".join(b.changes)))
    for w in report.warnings:
        lines.append(f"- warning: {md_escape(w)}")
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: Report, path: str | os.PathLike, *, max_items: int = 5) -> Path:
    path = Path(path)
    atomic_write_text(path, render_markdown(report, max_items=max_items))
    return publish(path)
