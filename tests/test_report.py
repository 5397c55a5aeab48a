"""The Report stage, built from a run directory made of real records.

The run directory is written the way a pytest session writes it (SampleRecord / CellResult /
GateResult through QmrSession's writers, the gate from ``evaluate_gate``, regressions judged by
the real rule judge through ``locate_cell``, the profile from ``error_profile``), so a change in any
record format shows up here instead of in a report nobody can open.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_qmr import baselines as bl
from pytest_qmr import report as rp
from pytest_qmr.cli import report as cli_report
from pytest_qmr.fsutil import atomic_write_text
from pytest_qmr.gate import evaluate_gate
from pytest_qmr.locate.judges import build_judges
from pytest_qmr.locate import error_profile, locate_cell
from pytest_qmr.records import CellResult, SampleRecord
from pytest_qmr.restore import RestoreResult
from pytest_qmr.rundir import write_cell, write_results
from pytest_qmr.session import QmrSession

THRESHOLDS = {"max_abs_drop": 0.05, "max_rel_drop": 0.10, "alpha": 0.05, "min_items": 16}
# Model output that must never run or render as markup: a script, an event handler, a table
# pipe and a GitHub mention.
PLANTED = ("Note: | @octocat <script>alert(1)</script><script>document.title='PWNED';"
           "document.body.setAttribute('data-pwned','1')</script><img src=x onerror=\"document.title='PWNED'\">")


def _solution(i: int, wrong_at: int | None = None, planted: bool = False) -> tuple[str, str]:
    """A two-step solution of item i and its final answer; ``wrong_at=2`` makes step 2 false."""
    a = i + 2
    s1, s2 = a + 3, 2 * (a + 3)
    if wrong_at == 2:
        s2 += 4
    note = f"\n{PLANTED}" if planted else ""
    return f"Step 1: {a} + 3 = {s1}\nStep 2: {s1} * 2 = {s2}{note}\nThe answer is {s2}.", str(s2)


def _records(bench: str, n: int, wrong: set[int], planted: set[int] = frozenset()) -> list[SampleRecord]:
    out = []
    for i in range(n):
        response, extracted = _solution(i, 2 if i in wrong else None, i in planted)
        gold = _solution(i)[1]
        out.append(SampleRecord(item_id=f"{bench}-{i:03d}", doc_index=i, prompt=f"Problem {i}: ({i + 2} + 3) * 2?",
                                response=response, extracted=extracted, gold=gold, correct=extracted == gold))
    return out


def _cell(session: QmrSession, model: str, quantizer: str, method: str, bench: str, fp: list[SampleRecord],
          quant: list[SampleRecord], info: dict | None = None, located: bool = False, restore: dict | None = None):
    """Gate one cell against FP, optionally judge its regressions, and write it like a session does."""
    gate = evaluate_gate([r.correct for r in fp], [r.correct for r in quant], THRESHOLDS)
    cell_id = f"{model}-{quantizer}-{bench}"
    cell_dir = session.run_dir / "cells" / cell_id
    profile = None
    if located:
        fp_items = {r.item_id: {"correct": r.correct, "response": r.response, "extracted": r.extracted} for r in fp}
        judged = locate_cell(fp_items, quant, build_judges(["rule"]))  # as pipeline.locate_cell does
        atomic_write_text(cell_dir / "located.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in judged))
        profile = error_profile(judged)
    result = CellResult(
        cell_id=cell_id, model=model, quantizer=quantizer, benchmark=bench, task=f"qmr_{bench}",
        accuracy=sum(r.correct for r in quant) / len(quant), n=len(quant), gate=gate,
        samples_path=str(cell_dir / "samples.jsonl"), seconds={"evaluate": 1.5},
        quantization={"method": method, **(info or {})}, error_profile=profile, restore=restore,
        outcome=gate.verdict if gate.verdict != "inconclusive" else "fail")
    write_cell(cell_dir, quant, result)
    return result


def _baseline(bdir: Path, model: str, bench: str, records: list[SampleRecord], **provenance) -> None:
    prov = {"model_fingerprint": "fp-abc", "data_sha256": "d" * 64, "prompt_sha256": "p" * 64,
            "generation": {"max_new_tokens": 96, "batch_size": 20}, "limit": len(records), "seed": 0,
            "libraries": {"torch": "2.13.0", "transformers": "5.17.0"}, "created": "2026-01-02T03:04:05Z",
            **provenance}
    bl.write_baseline(bl.baseline_path(bdir, model, bench),
                      bl.Baseline.from_records(model, bench, f"qmr_{bench}", records, prov))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """toy x {arith: fp, w3 (fail, located, restored), w4 (pass)} and {gsm8k: w3 (inconclusive, not
    located, baseline from older weights and libraries)}."""
    root = tmp_path_factory.mktemp("report")
    session = QmrSession(rootdir=root, run_dir=root / "run", baselines_dir=root / "baselines")
    info = {"model_fingerprint": "fp-abc", "libraries": {"torch": "2.13.0"}, "recipe": {"scheme": "W3A16", "bits": 3}}
    fp = _records("arith", 20, wrong=set(range(16, 20)))  # FP 16/20
    _baseline(session.baselines_dir, "toy", "arith", fp)
    cells = {
        "fp": _cell(session, "toy", "fp", "fp", "arith", fp, fp),
        "w3": _cell(session, "toy", "w3", "rtn", "arith", fp,
                    _records("arith", 20, wrong=set(range(10)) | set(range(16, 20)), planted={3}),
                    info, located=True,
                    restore=RestoreResult(pairs=10, teacher="fp", variant="gold", steps=20, minutes=2.5,
                                          adapter_path="adapters/toy-w3", fp_acc=0.8, quant_acc=0.3,
                                          restored_acc=0.7, p_value=0.01, n_eval=20).to_dict()),
        "w4": _cell(session, "toy", "w4", "rtn", "arith", fp, _records("arith", 20, wrong={0, 16, 17, 18, 19}), info),
    }
    fp_g = _records("gsm8k", 16, wrong=set())
    _baseline(session.baselines_dir, "toy", "gsm8k", fp_g, model_fingerprint="old-123",
              libraries={"torch": "2.12.0", "transformers": "5.17.0"})
    cells["g3"] = _cell(session, "toy", "w3", "rtn", "gsm8k", fp_g, _records("gsm8k", 16, wrong={1, 2, 3}),
                        {**info, "libraries": {"torch": "2.13.0"}})
    write_results(session.run_dir)
    return {"root": root, "run_dir": session.run_dir, "baselines": session.baselines_dir, "cells": cells}


@pytest.fixture(scope="module")
def report(run) -> rp.Report:
    return rp.build_report(run["run_dir"], run["baselines"])


@pytest.fixture(scope="module")
def html(report) -> str:
    return rp.render_html(report)


def test_table1_numbers(report, run):
    """Table 1 holds FP accuracy and, per quantizer, the gate's accuracy, drop and verdict."""
    assert report.quantizers == ["w3", "w4"]
    arith, gsm = report.table
    assert (arith.model, arith.benchmark, arith.fp_acc, arith.fp_n, arith.fp_source) == ("toy", "arith", 0.8, 20, "run")
    w3, w4 = arith.entries["w3"], arith.entries["w4"]
    assert (w3.accuracy, w3.rel_drop, w3.verdict) == (0.3, 0.625, "fail")
    assert (w4.accuracy, w4.rel_drop, w4.verdict) == (0.75, 0.0625, "pass")
    assert w3.p_value == run["cells"]["w3"].gate.p_value
    # no FP cell for gsm8k in the run: the committed baseline gives the FP accuracy
    assert (gsm.fp_acc, gsm.fp_source) == (1.0, "baseline") and set(gsm.entries) == {"w3"}
    assert gsm.entries["w3"].verdict == "inconclusive"
    assert report.summary["fail"] == 1 and report.summary["pass"] == 1 and report.summary["inconclusive"] == 1


def test_cell_regressions_located_profile_and_restore(report):
    """Regressed items carry the judged first faulty step; the profile and restore come through."""
    cell = report.cell("toy-w3-arith")
    assert cell.located and cell.regressions_total == cell.gate["fp_only"] == 10
    item = next(i for i in cell.regressions if i.item_id == "arith-003")
    assert (item.first_error_step, item.primary_error_type, item.status) == (2, "computational_error", "accepted")
    assert item.faulty_step.startswith("Step 2: 8 * 2 = 20\nNote: | @octocat <script>")  # the step spans lines
    assert item.fp_response.startswith("Step 1: 5 + 3 = 8") and item.gold == "16" and item.quant_extracted == "20"
    assert cell.error_profile["types"]["computational_error"]["count"] == 10
    assert (cell.restore["recovered_share"] == pytest.approx(0.8)
            and cell.restore["recovered_delta"] == pytest.approx(0.4))


def test_missing_located_jsonl(report, html):
    """A cell the Locate stage never saw still lists its regressions, with no faulty step."""
    cell = report.cell("toy-w3-gsm8k")
    assert not cell.located and cell.error_profile is None and cell.regressions_total == 3
    assert all(i.first_error_step is None and i.faulty_step is None for i in cell.regressions)
    assert any("no located.jsonl" in n for n in cell.notes)
    assert 'id="cell-toy-w3-gsm8k"' in html


def test_partial_records_still_render(report):
    """A profile or restore dict from an older writer (keys missing) must not sink the report."""
    import copy

    old = copy.deepcopy(report)
    cell = old.cell("toy-w3-arith")
    cell.error_profile = {"types": {"computational_error": {"count": 2}}, "n": 2}
    cell.restore = {"restored_acc": 0.5, "pairs": 10.0}
    html, md = rp.render_html(old), rp.render_markdown(old)
    assert "computational_error" in html and "computational error 0% (2)" in md and "restored 0.500" in md


def test_baseline_comparison(report):
    """What changed since the baseline: weights, libraries; nothing for an unchanged one."""
    arith, gsm = report.baselines
    assert arith.status == "ok" and arith.created == "2026-01-02T03:04:05Z"
    assert (arith.baseline_acc, arith.run_fp_acc, arith.fp_flips) == (0.8, 0.8, 0)
    assert arith.changes == ["no change in the recorded provenance"]
    assert any(c.startswith("model_fingerprint: baseline 'old-123', run 'fp-abc'") for c in gsm.changes)
    assert "library torch: baseline 2.12.0, current run 2.13.0" in gsm.changes


def test_json_schema(report, tmp_path):
    """The JSON keeps the documented keys (consumers parse it) and the schema version."""
    data = json.loads(rp.write_json(report, tmp_path / "r.json").read_text())
    assert data["schema_version"] == rp.SCHEMA_VERSION == 1
    assert set(data) == {"schema_version", "generated", "run_dir", "baselines_dir", "quantizers", "summary",
                         "table", "cells", "baselines", "warnings"}
    assert set(data["table"][0]) == {"model", "benchmark", "fp_acc", "fp_n", "fp_source", "entries"}
    assert set(data["table"][0]["entries"]["w3"]) == {"cell_id", "accuracy", "n", "delta", "rel_drop", "p_value",
                                                      "verdict", "outcome"}
    cell = next(c for c in data["cells"] if c["cell_id"] == "toy-w3-arith")
    assert {"cell_id", "model", "quantizer", "benchmark", "task", "method", "is_fp", "accuracy", "n", "outcome",
            "verdict", "gate", "gate_line", "seconds", "quantization", "error_profile", "error_profile_source",
            "profile_violations", "restore", "located", "regressions_total", "regressions", "notes", "answers",
            "length_items"} == set(cell)
    assert (cell["answers"], cell["length_items"]) == (None, [])  # a greedy cell of a plain model
    assert {"item_id", "doc_index", "prompt", "gold", "fp_response", "fp_extracted", "quant_response",
            "quant_extracted", "status", "first_error_step", "n_steps", "primary_error_type", "category",
            "explanation", "faulty_step"} == set(cell["regressions"][0])
    assert {"model", "benchmark", "path", "status", "error", "created", "baseline_acc", "baseline_n", "run_fp_acc",
            "run_fp_n", "fp_flips", "provenance", "run", "changes"} == set(data["baselines"][0])


def test_html_escaped_and_self_contained(html):
    """Model output is text, never markup; the page loads nothing and runs nothing."""
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower() and "onerror=" not in html.replace("onerror=&#34;", "")
    assert "<img src=x" not in html
    assert "http://" not in html and "https://" not in html
    assert "script-src" not in html and "default-src 'none'" in html  # CSP: no script source at all
    assert 'id="table-1"' in html and html.count("data:image/png;base64,") >= 3  # overview, types, steps
    assert ('<mark class="faulty" title="first faulty step (2)">Step 2: 8 * 2 = 20\nNote: | @octocat &lt;script&gt;'
            in html)


def test_markdown(report, tmp_path):
    """Markdown: the Table-1 grid, one line per failing cell, model text defanged."""
    md = rp.write_markdown(report, tmp_path / "r.md").read_text()
    assert "| model | benchmark | FP | w3 | w4 |" in md
    assert "| toy | arith | 0.800 (n=20) | ❌ 0.300 (−62.5%) | ✅ 0.750 (−6.2%) |" in md
    assert "| toy | gsm8k | 1.000 (n=16) | ⚠️ 0.812 (−18.8%) |  |" in md
    assert "**toy-w3-arith** — FAIL:" in md and "**toy-w3-gsm8k** — INCONCLUSIVE:" in md
    assert "toy-w4-arith" not in md  # passing cells are only in the table
    assert "restore: FP 0.800 → quantized 0.300 → restored 0.700 (Δ recovered +0.400, 80% of the loss)" in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "<script" not in md and "<img" not in md
    assert "“Step 2: 8 \\* 2 = 20 Note: \\| &#64;octocat &lt;script&gt;alert(1)" in md
    for line in md.splitlines():
        if line.startswith("| toy"):
            assert line.count(" | ") == len(report.quantizers) + 2  # no pipe leaked into a table row


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qmr")
    cli_report.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_reports(run, tmp_path, capsys):
    out = {ext: tmp_path / f"r.{ext}" for ext in ("html", "md", "json")}
    rc = _cli(["report", str(run["run_dir"]), "--baselines", str(run["baselines"]),
               "--html", str(out["html"]), "--md", str(out["md"]), "--json", str(out["json"])])
    assert rc == 0 and all(p.is_file() and p.stat().st_size for p in out.values())
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("content, message", [
    (None, "no results.json"),
    ("{not json", "not valid JSON at line 1"),
    ('{"cells": [{"cell_id": 3}]}', "corrupt results, cells[0]"),
    ('["cells"]', 'expected an object with a "cells" list'),
])
def test_cli_bad_run_dir(tmp_path, capsys, content, message):
    """A missing or corrupt results.json is exit 2 and one line naming the file, no traceback."""
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    assert _cli(["report", str(tmp_path), "--md", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qmr report: ") and err.count("\n") == 1 and message in err
    assert str(tmp_path / "results.json") in err and not (tmp_path / "r.md").exists()


def test_plugin_writes_report_at_session_end(run, pytester):
    """``--qmr-report DIR`` writes the three files after results.json; a failure is one warning line."""
    run_dir = pytester.path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    common = ["--qmr-run-dir", str(run_dir), "--qmr-baselines", str(run["baselines"]), "-p", "no:cacheprovider"]
    result = pytester.runpytest_inprocess(*common, "--qmr-report", "out")
    assert result.ret == 0
    assert {p.name for p in (pytester.path / "out").iterdir()} == {"report.html", "report.md", "report.json"}
    result.stdout.fnmatch_lines([f"qmr report: {pytester.path / 'out' / 'report.html'}"])

    (pytester.path / "blocked").write_text("a file where the report directory should go")
    result = pytester.runpytest_inprocess(*common, "--qmr-report", "blocked")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["qmr report: WARNING: not written (*"])


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_html_in_headless_chromium(report, tmp_path):
    """The page renders in a real browser: Table 1 and plots are there, the screenshot is not
    blank, and the script planted in a model response neither ran nor vanished."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install -y chromium)")
    page = rp.write_html(report, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90,
                         check=True).stdout
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90, check=True)

    assert '<table id="table-1">' in dom and "<td>arith</td>" in dom
    assert dom.count('src="data:image/png;base64,') >= 3
    assert "<title>pytest-qmr report</title>" in dom and "PWNED" in dom  # the text is shown ...
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]  # ... but did not run
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script" not in dom.lower()

    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, table colours, plots: not a blank page
