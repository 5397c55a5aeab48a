"""Human review queue for the Locate stage.

:func:`write_review_queue` writes, for the escalated (and unjudged) cases plus a seeded random
audit sample of the accepted ones (``audit_rate``, default 2 %, rounded up), a folder::

    QUEUE/index.html                      every case, why it is there, the judges' proposal
    QUEUE/queue.json                      manifest (id, folder, why) read back by the import
    QUEUE/cases/<case>/case.html          both solutions side by side, steps numbered, the
                                          proposed first faulty step highlighted, every vote
    QUEUE/cases/<case>/human_verdict.json the paper's verdict schema, fields null: fill them in

Pages are rendered by jinja2 with autoescaping on, so whatever a model wrote (``<script>``
included) shows as text. A ``human_verdict.json`` that already exists is never overwritten,
so rebuilding a queue keeps the work done in it.

:func:`import_reviews` merges the filled-in verdicts back (status ``human``,
:meth:`~pytest_qmr.locate.records.LocatedRow.reviewed`); verdicts still all null are pending and
leave their row as it was. Rows are :class:`~pytest_qmr.locate.records.LocatedRow` records (or
mappings, read as :meth:`~pytest_qmr.locate.records.LocatedRow.from_dict`). A malformed file gives one line naming the
file and the field; all such lines are reported together.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import DictLoader, Environment

from .. import taxonomy
from ..errors import QmrError
from ..fsutil import atomic_write_json, atomic_write_text
from ..steps import segment
from .judges import NO_ERROR, TYPE_DEFINITIONS, JudgeOutput
from .records import LocatedRow, as_rows

VERDICT_FILE = "human_verdict.json"
MANIFEST = "queue.json"
VERDICT_FIELDS = ("primary_error_type", "error_step", "explanation", "confidence_score")


class ReviewError(QmrError, ValueError):
    """A review queue or verdict file that cannot be used (one line per problem)."""


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.4em}
.meta td,.meta th{text-align:left;padding:2px 10px 2px 0;vertical-align:top}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:1.5em}
ol.steps{padding-left:0;list-style:none;margin:0}
ol.steps li{border:1px solid #ddd;border-radius:4px;margin:4px 0;padding:6px 8px;white-space:pre-wrap;
  font-family:ui-monospace,monospace;font-size:.9em}
ol.steps li .n{font-weight:bold;color:#555;margin-right:.5em}
ol.steps li.faulty{background:#fde2e2;border-color:#d33}
ol.steps li .tag{float:right;font-family:system-ui,sans-serif;font-size:.8em;color:#b00}
.pre{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em;background:#f6f6f6;padding:8px}
table.votes{border-collapse:collapse;width:100%} table.votes td,table.votes th{border:1px solid #ccc;
  padding:4px 6px;text-align:left;vertical-align:top;font-size:.9em}
.status-accepted{color:#070}.status-escalated{color:#a60}.status-unjudged{color:#b00}.status-human{color:#06c}
code{background:#f0f0f0;padding:0 3px}
"""

_CASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review {{ row.id }}</title><style>{{ css }}</style></head>
<body>
<p><a href="../../index.html">&larr; all cases</a></p>
<h1>Case {{ row.id }} <span class="status-{{ row.status }}">[{{ row.status }}]</span> &mdash; {{ why }}</h1>
<table class="meta">
<tr><th>Gold answer</th><td>{{ row.gold_answer }}</td></tr>
{% if row.extracted is defined and row.extracted is not none %}\
<tr><th>Quantized answer</th><td>{{ row.extracted }}</td></tr>{% endif %}
<tr><th>{{ label|capitalize }}</th><td>\
{% if row.first_error_step and row.first_error_step > 0 %}step {{ row.first_error_step }},
 {{ row.primary_error_type }} ({{ row.category }}){% elif row.status == 'unjudged' %}none{% else %}no error{% endif %}
 {% if row.verdict_by %} by {{ row.verdict_by }}{% endif %}\
{% if row.confidence_score is not none %}, confidence {{ row.confidence_score }}{% endif %}</td></tr>
<tr><th>Policy</th><td>{{ row.policy }}: {{ row.reason }}</td></tr>
</table>
<h2>Problem</h2>
<div class="pre">{{ row.problem }}</div>
<div class="cols">
<div>
<h2>Quantized model ({{ steps|length }} steps)</h2>
<ol class="steps">
{% for s in steps %}<li id="q{{ s.index }}" class="{{ 'faulty' if s.index == row.first_error_step else '' }}">\
<span class="n">{{ s.index }}</span>\
{% if s.index == row.first_error_step %}<span class="tag">first faulty step ({{ label }})</span>{% endif %}\
{{ s.body or s.text }}</li>
{% endfor %}</ol>
<details><summary>raw response</summary><div class="pre">{{ row.response }}</div></details>
</div>
<div>
<h2>Full-precision reference{% if ref_steps %} ({{ ref_steps|length }} steps){% endif %}</h2>
{% if ref_steps %}<ol class="steps">
{% for s in ref_steps %}<li id="r{{ s.index }}"><span class="n">{{ s.index }}</span>{{ s.body or s.text }}</li>
{% endfor %}</ol>
<details><summary>raw response</summary><div class="pre">{{ row.reference_response }}</div></details>
{% else %}<p>(no reference solution)</p>{% endif %}
</div>
</div>
<h2>Judges</h2>
<table class="votes">\
<tr><th>judge</th><th>status</th><th>step</th><th>type</th><th>confidence</th><th>explanation / reason</th></tr>
{% for name, v in votes %}<tr><td>{{ name }}</td><td>{{ v.status }}</td>\
<td>{{ v.error_step if v.error_step and v.error_step > 0 else '' }}</td>
<td>{{ v.primary_error_type or '' }}</td><td>{{ v.confidence_score if v.confidence_score is not none else '' }}</td>
<td>{{ v.explanation }}{% if v.reason %}<br><em>{{ v.reason }}</em>{% endif %}\
{% if v.raw %}<details><summary>raw answer</summary><div class="pre">{{ v.raw }}</div></details>{% endif %}</td></tr>
{% endfor %}</table>
<h2>Your verdict</h2>
<p>Fill in <code>{{ verdict_file }}</code> in this folder: <code>error_step</code> 1..{{ steps|length }}
(the first faulty step of the quantized solution) and <code>primary_error_type</code>, or
<code>"{{ no_error }}"</code> with <code>error_step</code> -1 when the solution is right (a grading disagreement);
<code>explanation</code>, <code>confidence_score</code> (0..1) and <code>reviewer</code> are optional.
Leave every field null to skip the case. Then run <code>qmr review import</code>.</p>
<ul>{% for t, cat, d in types %}<li><code>{{ t }}</code> ({{ cat }}): {{ d }}</li>{% endfor %}</ul>
</body></html>
"""

_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Locate review queue</title><style>{{ css }}</style></head>
<body>
<h1>Locate review queue: {{ cases|length }} cases</h1>
<p>{{ counts.escalated }} escalated, {{ counts.unjudged }} unjudged, {{ counts.audit }} audit samples
({{ audit_rate * 100 }}% of {{ n_accepted }} accepted, seed {{ seed }}). Fill in each case's
<code>{{ verdict_file }}</code>, then \
<code>qmr review import --queue DIR --judged judged.jsonl --out reviewed.jsonl</code>.</p>
<table class="votes"><tr><th>case</th><th>why</th><th>status</th><th>proposal</th><th>policy reason</th></tr>
{% for c in cases %}<tr><td><a href="cases/{{ c.dir }}/case.html">{{ c.id }}</a></td><td>{{ c.why }}</td>
<td class="status-{{ c.status }}">{{ c.status }}</td><td>{{ c.proposal }}</td><td>{{ c.reason }}</td></tr>
{% endfor %}</table>
</body></html>
"""

_ENV = Environment(loader=DictLoader({"case.html": _CASE, "index.html": _INDEX}), autoescape=True,
                   keep_trailing_newline=True)


def case_dir_name(case_id: str) -> str:
    """A stable, filesystem-safe folder name for a case id."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id).strip("._")[:40] or "case"
    return f"{slug}-{hashlib.sha256(case_id.encode('utf-8')).hexdigest()[:8]}"


def select_cases(rows: Sequence[LocatedRow | Mapping[str, Any]], audit_rate: float = 0.02, seed: int = 0,
                 include_unjudged: bool = True) -> list[tuple[LocatedRow, str]]:
    """(row, why) for the queue: escalated, unjudged, then the seeded audit sample of accepted rows."""
    if not 0 <= audit_rate <= 1:
        raise ReviewError(f"audit_rate must be in 0..1, got {audit_rate}")
    rows = as_rows(rows)
    picked = [(r, "escalated") for r in rows if r.status == "escalated"]
    if include_unjudged:
        picked += [(r, "unjudged") for r in rows if r.status == "unjudged"]
    accepted = sorted((r for r in rows if r.status == "accepted"), key=lambda r: r.item_id)
    k = min(len(accepted), math.ceil(audit_rate * len(accepted) - 1e-9)) if audit_rate > 0 else 0
    picked += [(r, "audit") for r in random.Random(seed).sample(accepted, k)]
    return picked


def _proposal(row: LocatedRow) -> str:
    step = row.first_error_step
    if isinstance(step, int) and step > 0:
        return f"step {step}: {row.primary_error_type}"
    return "none" if row.status == "unjudged" else "no error"


def empty_verdict(case_id: str) -> dict[str, Any]:
    return {"id": case_id, **{f: None for f in VERDICT_FIELDS}, "reviewer": None}


def write_review_queue(rows: Sequence[LocatedRow | Mapping[str, Any]], out_dir: str | Path, audit_rate: float = 0.02,
                       seed: int = 0, include_unjudged: bool = True) -> list[dict[str, Any]]:
    """Write the review queue folder (see the module doc); returns the manifest's case list."""
    out = Path(out_dir)
    rows = as_rows(rows)
    selected = select_cases(rows, audit_rate, seed, include_unjudged)
    types = [(t, taxonomy.CATEGORY_OF[t], TYPE_DEFINITIONS[t]) for t in taxonomy.TYPES]
    cases = []
    for row, why in selected:
        case_id = row.item_id
        name = case_dir_name(case_id)
        folder = out / "cases" / name
        votes = [(n, v.to_dict()) for n, v in row.votes.items()]
        html = _ENV.get_template("case.html").render(
            row=row.to_dict(), why=why, label="verdict" if row.final else "proposal",
            steps=segment(str(row.response or "")),
            ref_steps=segment(str(row.reference_response or "")), votes=votes, css=_CSS,
            verdict_file=VERDICT_FILE, no_error=NO_ERROR, types=types)
        atomic_write_text(folder / "case.html", html)
        if not (folder / VERDICT_FILE).exists():
            atomic_write_json(folder / VERDICT_FILE, empty_verdict(case_id))
        cases.append({"id": case_id, "dir": name, "why": why, "status": row.status,
                      "proposal": _proposal(row), "reason": row.reason or ""})
    counts = {w: sum(c["why"] == w for c in cases) for w in ("escalated", "unjudged", "audit")}
    n_accepted = sum(r.status == "accepted" for r in rows)
    atomic_write_text(out / "index.html", _ENV.get_template("index.html").render(
        cases=cases, counts=counts, audit_rate=audit_rate, n_accepted=n_accepted, seed=seed, css=_CSS,
        verdict_file=VERDICT_FILE))
    atomic_write_json(out / MANIFEST, {"audit_rate": audit_rate, "seed": seed, "cases": cases})
    return cases


def _read_verdict(path: Path, case_id: str, n_steps: int) -> dict[str, Any] | None:
    """The validated verdict, None when still blank; ReviewError naming file and field otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReviewError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ReviewError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ReviewError(f"{path}: must be a JSON object with fields {', '.join(VERDICT_FIELDS)}")
    if data.get("id") is not None and str(data["id"]) != case_id:
        raise ReviewError(f"{path}: field 'id': {data['id']!r} is not this case ({case_id!r})")
    if all(data.get(f) is None for f in VERDICT_FIELDS):
        return None
    for f in ("primary_error_type", "error_step"):
        if data.get(f) is None:
            raise ReviewError(f"{path}: field {f!r}: missing (fill in both primary_error_type and error_step)")
    reviewer = data.get("reviewer")
    if reviewer is not None and not isinstance(reviewer, str):
        raise ReviewError(f"{path}: field 'reviewer': must be a string or null")
    from pydantic import ValidationError

    try:
        out = JudgeOutput.model_validate({f: data.get(f) for f in VERDICT_FIELDS}, context={"n_steps": n_steps})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(map(str, err["loc"])) or "error_step"
        msg = err["msg"].removeprefix("Value error, ")
        raise ReviewError(f"{path}: field {field!r}: {msg}") from None
    return {"primary_error_type": out.primary_error_type, "error_step": out.error_step,
            "explanation": out.explanation, "confidence_score": out.confidence_score, "reviewer": reviewer}


def import_reviews(queue_dir: str | Path, judged_rows: Sequence[LocatedRow | Mapping[str, Any]]) -> list[LocatedRow]:
    """``judged_rows`` with every filled-in verdict of the queue merged (status ``human``).

    The human verdict replaces the row's verdict fields; the votes stay, the status before the
    review goes to ``pre_review_status`` and the reviewer and file to ``human_review``.
    """
    queue = Path(queue_dir)
    manifest_path = queue / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        cases = manifest["cases"]
    except OSError:
        raise ReviewError(f"{manifest_path}: missing (is {queue} a review queue?)") from None
    except UnicodeDecodeError as exc:
        raise ReviewError(f"{manifest_path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start})") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ReviewError(f"{manifest_path}: not a review queue manifest") from None
    rows = as_rows(judged_rows)
    by_id = {r.item_id: i for i, r in enumerate(rows)}
    errors = []
    for case in cases:
        case_id = str(case.get("id"))
        path = queue / "cases" / str(case.get("dir")) / VERDICT_FILE
        index = by_id.get(case_id)
        if index is None:
            errors.append(f"{path}: field 'id': no judged row has id {case_id!r}")
            continue
        row = rows[index]
        n_steps = row.n_steps
        if not isinstance(n_steps, int):
            n_steps = len(segment(str(row.response or "")))
        try:
            verdict = _read_verdict(path, case_id, n_steps)
        except ReviewError as exc:
            errors.append(str(exc))
            continue
        if verdict is None:
            continue
        t = verdict["primary_error_type"]
        is_error = t != NO_ERROR
        rows[index] = row.reviewed(
            first_error_step=verdict["error_step"] if is_error else -1,
            primary_error_type=t if is_error else None,
            category=taxonomy.CATEGORY_OF[t] if is_error else None,
            explanation=verdict["explanation"],
            confidence_score=verdict["confidence_score"],
            reason=f"human review ({case.get('why')})",
            human_review={"reviewer": verdict["reviewer"], "file": str(path.relative_to(queue))},
        )
    if errors:
        raise ReviewError("\n".join(errors))
    return rows
