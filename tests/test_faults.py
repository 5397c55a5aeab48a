"""Bad inputs and faults a new user runs into (issue #16), each answered by one line that names
the file, the field and the value, and none of them losing or overwriting data.

Fast checks first (no model runs); the session checks further down run the embedded lab model
on a few items, and a loopback OpenAI-compatible server stands in for a user's server (it
replays the committed FP baseline's answers, so a cell it answers is the FP model's, exactly).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from pathlib import Path

import datasets  # noqa: F401  (imported before any in-process pytester run: pytester's sys.modules
import lm_eval.tasks  # noqa: F401  snapshot would drop them, and a re-import re-registers Arrow types)
import pytest

from pytest_qmr import baselines as bl
from pytest_qmr import models, redact
from pytest_qmr.errors import QmrError
from pytest_qmr.fsutil import sha256_text
from pytest_qmr.measure import ExpectedItem
from pytest_qmr.records import CellResult, GateResult
from pytest_qmr.plugin import cell_section
from pytest_qmr.rundir import write_results
from pytest_qmr.session import QmrSession
from pytest_qmr.suite import load_suite

SECRET = "sk-qmr-test-0123456789abcdef"  # what a user's QMR_OPENAI_API_KEY would hold
MODEL = "smollm2-135m-arith"

SUITE = """
name: faults
data_dir: {data_dir}
models:
  - {{name: smollm2-135m-arith, ref: embedded:smollm2-135m-arith}}
quantizers:
{quantizers}
benchmarks:
  - {{name: arith, task: {task}, limit: {limit}, seed: 0}}
thresholds: {{max_abs_drop: 0.10, max_rel_drop: 0.15, alpha: 0.05, min_items: 4, sequential: {sequential}}}
generation: {{max_new_tokens: 96, batch_size: 20, backend: {backend}}}
locate: {{enabled: false}}
"""
FP_ONLY = "  - {name: fp, method: fp}"


def suite_text(data_dir, quantizers: str = FP_ONLY, task: str = "qmr_arith", limit: int = 4,
               sequential: str = "false", backend: str = "hf") -> str:
    return SUITE.format(data_dir=data_dir, quantizers=quantizers, task=task, limit=limit, sequential=sequential,
                        backend=backend)


def one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text.strip()


# ------------------------------------------------------------------ errors: one base, one line


def test_every_error_raised_on_purpose_is_a_qmr_error():
    from pytest_qmr.baselines import BaselineError
    from pytest_qmr.calibration import CalibrationError
    from pytest_qmr.locate.judges import JudgeFileError
    from pytest_qmr.locate import LocateError
    from pytest_qmr.models import ModelError
    from pytest_qmr.plugin import CellFailed, CellInconclusive, GateFailed, ProfileViolated, RestoreFailed
    from pytest_qmr.quantize import QuantizeError
    from pytest_qmr.report import ReportError
    from pytest_qmr.restore import RestoreError
    from pytest_qmr.locate.review import ReviewError
    from pytest_qmr.suite import SuiteError
    from pytest_qmr.tasks.utils import DataError

    for cls in (BaselineError, CalibrationError, JudgeFileError, LocateError, ModelError, QuantizeError, ReportError,
                RestoreError, ReviewError, SuiteError, DataError, CellFailed, GateFailed, ProfileViolated,
                CellInconclusive, RestoreFailed):
        assert issubclass(cls, QmrError), cls
    assert str(DataError("a.jsonl: line 3:\n  not valid JSON")) == "a.jsonl: line 3: not valid JSON"


def _gate(verdict: str) -> GateResult:
    return GateResult(verdict=verdict, fp_acc=0.8, quant_acc=0.5, delta=-0.3, rel_drop=0.375, n=40, fp_only=12,
                      quant_only=0, p_value=1e-3 if verdict == "fail" else 0.2, alpha=0.05, reason="r")


@pytest.mark.parametrize("verdict, violations, expected", [
    ("fail", [], "GateFailed"),
    ("fail", ["max_unjudged_share 0.9 > 0.5"], "GateFailed"),
    ("inconclusive", [], "CellInconclusive"),
    ("pass", ["max_unjudged_share 0.9 > 0.5"], "ProfileViolated"),
    ("inconclusive", ["max_unjudged_share 0.9 > 0.5"], "ProfileViolated"),
])
def test_a_failed_cell_says_which_part_failed_it(verdict, violations, expected):
    from pytest_qmr.plugin import failure_of

    result = CellResult(cell_id="c", model="m", quantizer="q", benchmark="b", task="t", accuracy=0.5, n=40,
                        gate=_gate(verdict), samples_path="s", profile_violations=violations, outcome="fail")
    error = failure_of(result)
    assert type(error).__name__ == expected
    one_line(str(error))


def test_strict_xfail_demands_that_the_gate_said_fail(pytester, data_dir):
    """An inconclusive gate or a profile violation must not satisfy ``expect_fail_on``."""
    from pytest_qmr.plugin import GateFailed

    quantizers = FP_ONLY + "\n  - {name: rtn-w4g64, method: rtn, bits: 4, group_size: 64, expect_fail_on: [arith]}"
    suite = pytester.makefile(".yaml", faults=suite_text(data_dir, quantizers))
    items, _ = pytester.inline_genitems(str(suite))
    marks = {item.name: item.get_closest_marker("xfail") for item in items}
    assert marks[f"{MODEL}-fp-arith"] is None
    assert marks[f"{MODEL}-rtn-w4g64-arith"].kwargs == {
        "reason": "suite expects quantizer rtn-w4g64 to regress", "raises": GateFailed, "strict": True}


def test_an_inconclusive_gate_does_not_satisfy_expect_fail_on(pytester, data_dir, cache_dir, lab_model, repo_root,
                                                              tmp_path):
    """Run for real: a cell whose gate is INCONCLUSIVE (4 items under min_items 20) where the suite
    expects a regression is a failure of the strict xfail, not an expected failure."""
    quantizers = FP_ONLY + (f"\n  - {{name: same, method: checkpoint, path: {lab_model.path}, "
                            "expect_fail_on: [arith]}")
    text = suite_text(data_dir, quantizers).replace("min_items: 4", "min_items: 20")
    suite = pytester.makefile(".yaml", faults=text)
    result = pytester.runpytest_subprocess(str(suite), f"--qmr-baselines={repo_root / 'baselines'}",
                                           f"--qmr-run-dir={tmp_path / 'run'}", f"--qmr-cache-dir={cache_dir}",
                                           "-p", "no:cacheprovider", "-rA", "-k", "same")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{MODEL}-same-arith: INCONCLUSIVE: *fewer than min_items*"])
    assert json.loads((tmp_path / "run" / "cells" / f"{MODEL}-same-arith" / "result.json").read_text())["gate"][
        "verdict"] == "inconclusive"


def test_expect_inconclusive_on_is_a_strict_xfail_that_only_an_inconclusive_gate_satisfies(pytester, data_dir):
    """A cell known to be too small to settle (the smoke suite's GPTQ-W4 under non-inferiority):
    a PASS or a FAIL there is news, so both break the strict xfail; only CellInconclusive is expected."""
    from pytest_qmr.plugin import CellInconclusive

    quantizers = FP_ONLY + "\n  - {name: q, method: rtn, bits: 4, group_size: 64, expect_inconclusive_on: [arith]}"
    suite = pytester.makefile(".yaml", faults=suite_text(data_dir, quantizers))
    items, _ = pytester.inline_genitems(str(suite))
    mark = {item.name: item.get_closest_marker("xfail") for item in items}[f"{MODEL}-q-arith"]
    assert mark.kwargs == {"reason": "suite expects arith's items too few to settle q", "raises": CellInconclusive,
                           "strict": True}
    both = quantizers.replace("expect_inconclusive_on", "expect_fail_on: [arith], expect_inconclusive_on")
    (pytester.path / "faults.yaml").write_text(suite_text(data_dir, both))
    result = _collect(pytester, str(pytester.path / "faults.yaml"))
    result.stdout.fnmatch_lines(["*faults.yaml: quantizers[[]1].expect_inconclusive_on[[]0]: also in expect_fail_on: "
                                 "a cell expects one verdict (got 'arith')*"])


def test_cli_prints_our_errors_as_one_line_and_bugs_as_tracebacks(tmp_path, capsys):
    from pytest_qmr.cli import main

    assert main(["model", str(tmp_path / "missing-checkpoint")]) == 2
    err = capsys.readouterr().err
    assert one_line(err).startswith("qmr model: model ") and "missing-checkpoint" in err
    (tmp_path / "empty").mkdir()
    assert main(["model", str(tmp_path / "empty")]) == 2  # a directory without safetensors
    assert "no *.safetensors weights" in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------ secrets


def test_redaction_masks_env_secrets_in_every_log_record(monkeypatch, caplog):
    monkeypatch.setenv("QMR_OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("MY_JUDGE_CREDENTIAL", "judge-secret-value-42")
    redact.install()
    logger = logging.getLogger("lm_eval.models.api_models")
    with caplog.at_level(logging.INFO):
        logger.error("Exception:ClientResponseError(RequestInfo(headers={'Authorization': 'Bearer %s'})), retrying.",
                     SECRET)
        try:
            raise RuntimeError(f"failed with key {SECRET}")
        except RuntimeError:
            logger.exception("judge call with %s failed", "judge-secret-value-42")
    text = caplog.text + "".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert SECRET not in text and "judge-secret-value-42" not in text
    assert text.count(redact.MASK) >= 3
    assert redact.redact("short=abc") == "short=abc"  # values under MIN_LENGTH are not secrets


# ------------------------------------------------------------------ baselines that no longer describe the cell


def _baseline(**items_extra) -> bl.Baseline:
    items = {f"arith-{i}": {"correct": i % 2 == 0, "extracted": str(i), "response": f"r{i}", "doc_index": i,
                            "prompt_sha256": sha256_text(f"prompt {i}"), "gold": str(i)} for i in range(4)}
    expected = _expected()
    from pytest_qmr.measure import items_fingerprint

    return bl.Baseline(model=MODEL, benchmark="arith", task="qmr_arith", accuracy=0.5, n=4, items=items,
                       provenance={**items_fingerprint(expected), "model_fingerprint": "f" * 16,
                                   "generation": {"max_new_tokens": 96, "batch_size": 20}, "limit": 4, "seed": 0,
                                   "libraries": {}, "created": "2026-12-02T00:00:00Z"})


def _expected(**change) -> list[ExpectedItem]:
    items = [ExpectedItem(f"arith-{i}", i, f"prompt {i}", str(i)) for i in range(4)]
    for index, fields in change.items():
        i = int(index[1:])
        items[i] = ExpectedItem(**{**items[i].__dict__, **fields})
    return items


@pytest.mark.parametrize("mutate, task, expected, needle", [
    (None, "qmr_gsm8k", _expected(), "task: baseline 'qmr_arith', current run 'qmr_gsm8k'"),
    (None, "qmr_arith", _expected(i2={"gold": "7"}), "items['arith-2'].gold: baseline '2', current run '7'"),
    (None, "qmr_arith", _expected(i1={"prompt": "prompt one"}), "items['arith-1'].prompt_sha256: baseline"),
    (None, "qmr_arith", _expected(i3={"item_id": "arith-9"}), "items['arith-3']: doc 3 is now item 'arith-9'"),
    (lambda b: b.provenance.update(data_sha256="0" * 64), "qmr_arith", _expected(),
     "provenance.data_sha256: baseline 000000000000…"),
    (lambda b: b.provenance.update(prompt_sha256="junk"), "qmr_arith", _expected(),
     "provenance.prompt_sha256: baseline 'junk'"),
    # a baseline without per-item golds (as older ones are): a changed gold shows in data_sha256
    (lambda b: [item.pop("gold") for item in b.items.values()], "qmr_arith", _expected(i0={"gold": "5"}),
     "provenance.data_sha256"),
], ids=["task", "gold", "prompt", "item id", "junk data hash", "junk prompt hash", "gold without per-item golds"])
def test_check_items_finds_what_changed(mutate, task, expected, needle):
    baseline = _baseline()
    if mutate:
        mutate(baseline)
    lines = bl.check_items(baseline, task, expected)
    assert lines and needle in lines[0], lines
    assert bl.check_items(_baseline(), "qmr_arith", _expected()) == []


@pytest.fixture
def committed_baselines(repo_root, tmp_path) -> Path:
    """A copy of the committed baselines (tests edit it, never the real files)."""
    target = tmp_path / "baselines"
    shutil.copytree(repo_root / "baselines", target)
    return target


def _session(tmp_path, baselines: Path, data_dir, cache_dir, **kwargs) -> QmrSession:
    return QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=baselines, data_dir=data_dir,
                      cache_dir=cache_dir, **kwargs)


def _cells(tmp_path, data_dir, **kwargs):
    path = tmp_path / "faults.yaml"
    path.write_text(suite_text(data_dir, **kwargs))
    return load_suite(path).cells()


def _cell(tmp_path, data_dir, **kwargs):
    return _cells(tmp_path, data_dir, **kwargs)[0]


@pytest.mark.parametrize("field, edit, needle", [
    ("task", lambda b: b.update(task="qmr_gsm8k"), "task: baseline 'qmr_gsm8k', current run 'qmr_arith'"),
    ("data_sha256", lambda b: b["provenance"].update(data_sha256="a" * 64), "provenance.data_sha256: baseline aaaa"),
    ("prompt_sha256", lambda b: b["provenance"].update(prompt_sha256="b" * 64), "provenance.prompt_sha256"),
    ("item prompt", lambda b: next(iter(b["items"].values())).update(prompt_sha256="c" * 64), "].prompt_sha256"),
    ("item gold", lambda b: next(iter(b["items"].values())).update(gold="-1"), "].gold: baseline '-1'"),
    ("model_fingerprint", lambda b: b["provenance"].update(model_fingerprint="0" * 16),
     "model_fingerprint: baseline '0000000000000000', current run "),
    ("max_new_tokens", lambda b: b["provenance"]["generation"].update(max_new_tokens=32),
     "generation.max_new_tokens: baseline 32, current run 96"),
    ("batch_size", lambda b: b["provenance"]["generation"].update(batch_size=4), "generation.batch_size: baseline 4"),
    ("seed", lambda b: b["provenance"].update(seed=3), "seed: baseline 3, current run 0"),
])
def test_a_baseline_that_no_longer_describes_the_cell_fails_before_generation(
        field, edit, needle, committed_baselines, data_dir, cache_dir, lab_model, tmp_path, monkeypatch):
    path = committed_baselines / MODEL / "arith.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    session = _session(tmp_path, committed_baselines, data_dir, cache_dir)
    monkeypatch.setattr(session, "evaluate", lambda *a, **k: pytest.fail("generated before checking the baseline"))
    with pytest.raises(bl.BaselineError) as excinfo:
        session.run_cell(_cell(tmp_path, data_dir))
    message = one_line(str(excinfo.value))
    assert message.startswith(f"{path}: baseline no longer describes the cell (") and needle in message, message
    assert "--qmr-update-baselines -k" in message
    assert path.read_bytes() == before
    recorded = tmp_path / "run" / "cells" / f"{MODEL}-fp-arith"  # the cell's record says why, nothing else is there
    assert sorted(p.name for p in recorded.iterdir()) == ["result.json"]
    data = json.loads((recorded / "result.json").read_text())
    assert data["outcome"] == "error" and data["gate"] is None and data["notes"] == [message]


def test_the_committed_baselines_describe_their_cells(repo_root, data_dir, cache_dir, lab_model, tmp_path):
    """The identity check accepts the real baselines (the same prompts lm-eval will build)."""
    session = _session(tmp_path, repo_root / "baselines", data_dir, cache_dir)
    committed = json.loads((repo_root / "baselines" / MODEL / "arith.json").read_text())["n"]
    from pytest_qmr.pipeline import fp_baseline

    assert fp_baseline(session, _cell(tmp_path, data_dir), lab_model).n == committed


def test_limit_above_the_dataset_names_its_size(committed_baselines, data_dir, cache_dir, lab_model, tmp_path):
    path = committed_baselines / MODEL / "arith.json"
    data = json.loads(path.read_text())
    n, over = data["n"], data["n"] + 10
    data["provenance"]["limit"] = over  # what --qmr-update-baselines left when the task ran out of items
    path.write_text(json.dumps(data))
    session = _session(tmp_path, committed_baselines, data_dir, cache_dir)
    with pytest.raises(bl.BaselineError) as excinfo:
        session.run_cell(_cell(tmp_path, data_dir, limit=over))
    assert one_line(str(excinfo.value)) == (
        f"{tmp_path / 'faults.yaml'}: benchmarks['arith'].limit: more than the {n} items task qmr_arith has; "
        f"set it to {n} or less, or null for all (got {over})")
    data["provenance"]["limit"] = n  # a baseline made with a smaller limit: regenerating it helps
    path.write_text(json.dumps(data))
    with pytest.raises(bl.BaselineError, match=rf"covers {n} items, the cell asks for {over}; regenerate it with: "):
        session.run_cell(_cell(tmp_path, data_dir, limit=over))


# ------------------------------------------------------------------ collection: found before any model loads


def _collect(pytester, *args):
    return pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", *args)


def test_unknown_task_fails_collection_in_one_line(pytester, data_dir):
    suite = pytester.makefile(".yaml", faults=suite_text(data_dir, task="qmr_arihm"))
    result = _collect(pytester, str(suite))
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*{suite}: benchmarks[[]0].task: unknown lm-eval task, did you mean 'qmr_arith'? "
                                 "(got 'qmr_arihm')"])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize("content, needle", [
    (None, "locate.judge_config: no such file"),
    (b"judges: [\n", "locate.judge_config: *judges.yaml: not valid YAML at line 2"),
    (b"judges:\n  - {name: gr\xe4der, kind: openai}\n", "locate.judge_config: *judges.yaml: not UTF-8 text (byte 0xe4"),
], ids=["missing", "broken yaml", "not utf-8"])
def test_judge_config_is_checked_at_collection(pytester, data_dir, content, needle):
    text = suite_text(data_dir).replace("locate: {enabled: false}",
                                        "locate: {judges: [rule], judge_config: judges.yaml}")
    suite = pytester.makefile(".yaml", faults=text)
    if content is not None:
        (pytester.path / "judges.yaml").write_bytes(content)
    result = _collect(pytester, str(suite))
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*{suite}: {needle}*"])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir("suites_dir"), "--qmr-suite suites_dir: a directory; name a suite file"),
    (lambda p: p.makefile(".txt", suite="name: x"), "--qmr-suite suite.txt: not a .yaml suite file"),
    (lambda p: None, "--qmr-suite nothing.yaml: no such file"),
], ids=["directory", "not yaml", "missing"])
def test_bad_qmr_suite_paths(pytester, make, needle):
    make(pytester)
    arg = {"directory": "suites_dir", "not yaml": "suite.txt", "missing": "nothing.yaml"}
    name = next(k for k, v in arg.items() if needle.startswith(f"--qmr-suite {v}"))
    result = _collect(pytester, f"--qmr-suite={arg[name]}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {needle}*"])


def test_qmr_suite_collects_only_the_suite(pytester, data_dir):
    pytester.makeini("[pytest]\ntestpaths = tests\n")
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_other.py").write_text("def test_other():\n    pass\n")
    pytester.makefile(".yaml", faults=suite_text(data_dir))
    result = _collect(pytester, "--qmr-suite=faults.yaml")
    assert result.ret == 0
    assert "test_other" not in result.stdout.str()
    result.stdout.fnmatch_lines([f"*{MODEL}-fp-arith*", "1 test collected*"])


# ------------------------------------------------------------------ records and files


def test_a_corrupt_result_json_does_not_crash_the_session_end(tmp_path):
    cells = tmp_path / "cells"
    (cells / "good").mkdir(parents=True)
    (cells / "good" / "result.json").write_text(json.dumps({"cell_id": "good"}))
    (cells / "torn").mkdir()
    (cells / "torn" / "result.json").write_text('{"cell_id": "to')
    warnings = write_results(tmp_path)
    assert [one_line(w) for w in warnings] == [
        f"qmr: WARNING: {cells / 'torn' / 'result.json'}: unreadable cell record left out of results.json "
        "(JSONDecodeError)"]
    assert json.loads((tmp_path / "results.json").read_text())["cells"] == [{"cell_id": "good"}]
    assert (cells / "torn" / "result.json").read_text() == '{"cell_id": "to'  # kept for the user to look at


def test_run_records_that_cannot_be_written_fail_the_run_in_one_line(pytester, tmp_path):
    """A full disk or a read-only run dir at the session's end is one line and a failed run, not a
    pytest traceback (CI saw only a crash there)."""
    run_dir = tmp_path / "run"
    (run_dir / "cells" / "good").mkdir(parents=True)
    (run_dir / "cells" / "good" / "result.json").write_text(json.dumps({"cell_id": "good"}))
    (run_dir / "results.json").mkdir()  # the aggregate cannot be replaced: os.replace onto a directory
    pytester.makepyfile(test_x="def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--qmr-run-dir={run_dir}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    text = result.stdout.str() + result.stderr.str()
    assert f"qmr: ERROR: {run_dir}: run records not written (IsADirectoryError" in text
    assert "Traceback" not in text


def test_an_atomic_write_gets_the_mode_a_plain_write_gets(tmp_path):
    """Baselines and records are written through a temporary file; they end up with the mode a plain
    ``open()`` gives (0o666 less the umask), not mkstemp's owner-only 0600."""
    import stat

    from pytest_qmr.fsutil import atomic_write_json

    (tmp_path / "plain.json").write_text("{}")
    atomic_write_json(tmp_path / "atomic.json", {})
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("plain.json", "atomic.json")}
    assert modes["atomic.json"] == modes["plain.json"]


def test_an_interrupted_write_leaves_nothing_git_would_add(repo_root, tmp_path):
    """kill -9 between mkstemp and os.replace leaves ``.<name>.<random>.tmp`` (atomic_write_text)
    or ``.tmp-<name>-<random>/`` (atomic_directory): both are ignored by the repository."""
    for name in (f"baselines/{MODEL}/.arith.json.k2j4_x.tmp", "baselines/.tmp-x-abc/f", "suites/.smoke.yaml.q1.tmp"):
        out = subprocess.run(["git", "check-ignore", "-q", name], cwd=repo_root)
        assert out.returncode == 0, f"{name} is not git-ignored"
    out = subprocess.run(["git", "check-ignore", "-q", f"baselines/{MODEL}/arith.json"], cwd=repo_root)
    assert out.returncode == 1


# ------------------------------------------------------------------ the embedded model cache


def test_a_corrupt_embedded_model_is_rebuilt_not_trusted(cache_dir, lab_model, tmp_path, caplog):
    root = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", root / "models",
                    ignore=shutil.ignore_patterns("*.lock", ".tmp-*"))
    built = root / "models" / lab_model.path.name
    weights = built / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)  # as a full disk or a killed copy would leave it
    with caplog.at_level(logging.WARNING, logger="pytest_qmr.models"):
        again = models.resolve("embedded:smollm2-135m-arith", root)
    assert again.path == built and weights.stat().st_size == size
    assert again.fingerprint == lab_model.fingerprint  # the same weights as built, not the corruption
    assert "is not what was built (model.safetensors size" in caplog.text and "rebuilding it" in caplog.text


def test_a_truncated_local_checkpoint_is_one_line(lab_model, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(lab_model.path, copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(models.ModelError) as excinfo:
        models.load(copy)
    assert one_line(str(excinfo.value)).startswith(f"{copy}: cannot load the checkpoint (")


# ------------------------------------------------------------------ a server that answers cells


def _scrambled_copy(lab_model, out: Path) -> Path:
    """The lab model with one weight changed: another checkpoint, the same architecture."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(lab_model.path, out)
    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[key] = weights[key].flip(0).contiguous()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_user_server_answers_only_the_cell_whose_checkpoint_it_names(replay_server, lab_model, repo_root,
                                                                       data_dir, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QMR_OPENAI_BASE_URL", replay_server.url)
    monkeypatch.delenv("QMR_OPENAI_MODEL", raising=False)
    other = _scrambled_copy(lab_model, tmp_path / "other")
    quantizers = FP_ONLY + f"\n  - {{name: other, method: checkpoint, path: {other}}}"
    fp_cell, other_cell = _cells(tmp_path, data_dir, quantizers=quantizers, backend="openai", limit=8)
    session = _session(tmp_path, repo_root / "baselines", data_dir, cache_dir)
    result = session.run_cell(fp_cell)  # the FP cell, answered by a server that names the FP weights
    assert result.gate.verdict == "pass" and result.gate.fp_only == result.gate.quant_only == 0 and result.n == 8
    assert result.served == {"endpoint": f"{replay_server.url}/v1/chat/completions",
                             "model": f"qmr-{lab_model.fingerprint}", "fingerprint": lab_model.fingerprint,
                             "engine": "user server"}
    assert json.loads((tmp_path / "run" / "cells" / fp_cell.id / "result.json").read_text())["served"] == result.served
    asked = len(replay_server.requests)
    with pytest.raises(models.ModelError) as excinfo:  # another checkpoint: the same server must not answer it
        session.run_cell(other_cell)
    message = one_line(str(excinfo.value))
    fingerprint = models.checkpoint_fingerprint(other)
    assert message == (f"backend openai: {replay_server.url}/v1/models lists 'qmr-{lab_model.fingerprint}', none "
                       f"named after this cell's checkpoint {other} (checkpoint fingerprint {fingerprint}); serve it "
                       f"as 'qmr-{fingerprint}' (vllm serve --served-model-name / qmr serve --served-name), or unset "
                       "QMR_OPENAI_BASE_URL")
    assert len(replay_server.requests) == asked  # refused before a single generation request
    recorded = json.loads((tmp_path / "run" / "cells" / other_cell.id / "result.json").read_text())
    assert recorded["outcome"] == "error" and recorded["notes"] == [message] and recorded["gate"] is None


FAILING_CONFTEST = """
import os
def pytest_configure(config):
    os.environ["QMR_OPENAI_BASE_URL"] = {url!r}
    os.environ["QMR_OPENAI_API_KEY"] = {key!r}
"""


def test_the_api_key_reaches_no_log_record_report_or_output(pytester, replay_server, data_dir, cache_dir, repo_root,
                                                             tmp_path):
    replay_server.fail = True  # every generation request fails: lm-eval logs each with its request headers
    suite = pytester.makefile(".yaml", faults=suite_text(data_dir, backend="openai"))
    pytester.makeconftest(FAILING_CONFTEST.format(url=replay_server.url, key=SECRET))
    run_dir, report_dir, junit = tmp_path / "run", tmp_path / "report", tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(
        str(suite), f"--qmr-baselines={repo_root / 'baselines'}", f"--qmr-run-dir={run_dir}",
        f"--qmr-cache-dir={cache_dir}", f"--qmr-report={report_dir}", f"--junitxml={junit}", "-p", "no:cacheprovider",
        "-o", "log_level=INFO", "-rA")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{MODEL}-fp-arith: backend openai: generation at "
                                 f"{replay_server.url}/v1/chat/completions failed (*"])
    output = result.stdout.str() + result.stderr.str()
    assert redact.MASK in output  # lm-eval did log the failed request (headers and all), masked
    assert SECRET not in output
    written = [p for d in (run_dir, report_dir) if d.exists() for p in d.rglob("*") if p.is_file()] + [junit]
    assert junit.is_file() and not [p for p in written if SECRET in p.read_text(errors="replace")]
    assert replay_server.requests  # the key did go out, to the server only


# ------------------------------------------------------------------ the session's own guarantees


def test_update_baselines_then_gate_against_them_reproduces_fp_exactly(data_dir, cache_dir, lab_model, tmp_path):
    """--qmr-update-baselines writes a baseline the next run gates against; the FP cell, in the
    same thread setting, reproduces it item by item (not only in accuracy)."""
    baselines = tmp_path / "fresh-baselines"
    cell = _cell(tmp_path, data_dir, limit=6)
    written = _session(tmp_path, baselines, data_dir, cache_dir, update_baselines=True, use_cache=False).run_cell(cell)
    path = baselines / MODEL / "arith.json"
    baseline = bl.read_baseline(path)
    assert baseline.n == 6 and all("gold" in item and "prompt_sha256" in item for item in baseline.items.values())
    assert written.gate.fp_only == written.gate.quant_only == 0
    (tmp_path / "run").rename(tmp_path / "first-run")
    again = _session(tmp_path, baselines, data_dir, cache_dir, use_cache=False).run_cell(cell)  # generates again
    assert again.cache["evaluate"]["items_from_cache"] == 0 and again.cache["enabled"] is False
    assert again.gate.verdict == "pass" and again.gate.fp_only == again.gate.quant_only == 0 and again.n == 6
    samples = [json.loads(line) for line in Path(again.samples_path).read_text().splitlines()]
    assert {s["item_id"]: s["response"] for s in samples} == {k: v["response"] for k, v in baseline.items.items()}


def test_resume_reuses_only_what_the_suite_did_not_change(repo_root, data_dir, cache_dir, lab_model, tmp_path):
    baselines = repo_root / "baselines"
    first = _session(tmp_path, baselines, data_dir, cache_dir, resume=True).run_cell(_cell(tmp_path, data_dir, limit=4))
    assert first.recomputed is None and not first.reused and first.n == 4
    same = _session(tmp_path, baselines, data_dir, cache_dir, resume=True).run_cell(_cell(tmp_path, data_dir, limit=4))
    assert same.reused and same.inputs_sha256 == first.inputs_sha256
    changed = _session(tmp_path, baselines, data_dir, cache_dir, resume=True)
    result = changed.run_cell(_cell(tmp_path, data_dir, limit=5))
    assert not result.reused and result.n == 5
    assert result.recomputed == "inputs changed: spec.benchmark.limit 4 -> 5"
    assert "recomputed despite --qmr-resume: inputs changed: spec.benchmark.limit 4 -> 5" in \
        cell_section(result)
    # a corrupt record is recomputed, not trusted and not a crash
    record = tmp_path / "run" / "cells" / result.cell_id / "result.json"
    record.write_text("{")
    again = _session(tmp_path, baselines, data_dir, cache_dir, resume=True).run_cell(_cell(tmp_path, data_dir, limit=5))
    assert again.recomputed == f"{record} unreadable (JSONDecodeError)" and again.n == 5
    assert json.loads(record.read_text())["inputs_sha256"] == result.inputs_sha256


def test_reuse_key_covers_quantizer_generation_and_limit_but_not_verdict_thresholds(tmp_path, data_dir):
    rtn = "  - {name: q, method: rtn, bits: 4, group_size: 64}"
    base = _cell(tmp_path, data_dir, quantizers=rtn).reuse_spec()
    for changed in (_cell(tmp_path, data_dir, quantizers=rtn.replace("bits: 4", "bits: 8")),
                    _cell(tmp_path, data_dir, quantizers=rtn, limit=40),
                    _cell(tmp_path, data_dir, quantizers=rtn, backend="openai"),
                    _cell(tmp_path, data_dir, quantizers=rtn, sequential="true")):
        assert changed.reuse_spec() != base
    text = suite_text(data_dir, quantizers=rtn.replace("}", ", expect_fail_on: [arith]}")).replace(
        "max_abs_drop: 0.10", "max_abs_drop: 0.02")
    (tmp_path / "faults.yaml").write_text(text)
    assert load_suite(tmp_path / "faults.yaml").cells()[0].reuse_spec() == base  # settled again on reuse


def test_sequential_gate_gives_the_full_runs_verdict_with_fewer_items(repo_root, data_dir, cache_dir, lab_model,
                                                                      tmp_path):
    other = _scrambled_copy(lab_model, tmp_path / "other")
    quantizers = f"  - {{name: other, method: checkpoint, path: {other}}}"
    full = _session(tmp_path / "a", repo_root / "baselines", data_dir, cache_dir).run_cell(
        _cell(tmp_path, data_dir, quantizers=quantizers, limit=40, sequential="false"))
    sequential = _session(tmp_path / "b", repo_root / "baselines", data_dir, cache_dir).run_cell(
        _cell(tmp_path, data_dir, quantizers=quantizers, limit=40, sequential="true"))
    assert sequential.gate.verdict == full.gate.verdict
    assert sequential.n < full.n == 40  # fewer items: the verdict was settled before the last chunk
    assert sequential.gate.n_planned == 40 and sequential.gate.stopped_early


def test_ci_turns_an_unexpected_skip_into_a_failure(pytester, monkeypatch):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_x="""
import pytest

def test_needs_data():
    pytest.skip("benchmark data not found")

@pytest.mark.xfail(strict=True)
def test_known_bug():
    assert False
""")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped in CI, which must run every test: *benchmark data not found*"])
    monkeypatch.delenv("CI")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(skipped=1, xfailed=1)


def test_samples_are_on_disk_before_locate_runs(repo_root, data_dir, cache_dir, lab_model, tmp_path, monkeypatch):
    """A Locate that fails (a judge endpoint gone, a bug) loses none of the generations."""
    from pytest_qmr.locate import LocateError

    copy = tmp_path / "copy"
    shutil.copytree(lab_model.path, copy)
    quantizers = f"  - {{name: copy, method: checkpoint, path: {copy}}}"
    cell = _cell(tmp_path, data_dir, quantizers=quantizers)
    cell = dataclasses.replace(cell, locate=cell.locate.model_copy(update={"enabled": True}))
    session = _session(tmp_path, repo_root / "baselines", data_dir, cache_dir)

    def locate_fails(*args, **kwargs):
        raise LocateError("judge 'grader': endpoint gone")

    from pytest_qmr import pipeline

    monkeypatch.setattr(pipeline, "locate_cell", locate_fails)
    with pytest.raises(LocateError):
        session.run_cell(cell)
    samples = (tmp_path / "run" / "cells" / cell.id / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 and all(json.loads(line)["response"] for line in samples)


def test_unreadable_benchmark_data_is_one_line_in_a_cell(pytester, repo_root, data_dir, cache_dir, tmp_path):
    broken = tmp_path / "data"
    (broken / "gsm8k").mkdir(parents=True)
    lines = (Path(data_dir) / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    (broken / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + '\n{"question": "torn\n')
    text = suite_text(broken, task="qmr_gsm8k", limit=5).replace("name: arith,", "name: gsm8k,")
    suite = pytester.makefile(".yaml", faults=text)
    result = pytester.runpytest_subprocess(str(suite), f"--qmr-baselines={repo_root / 'baselines'}",
                                           f"--qmr-cache-dir={cache_dir}", f"--qmr-data-dir={broken}",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{MODEL}-fp-gsm8k: {broken / 'gsm8k' / 'test.jsonl'}: line 4: not valid JSON (*"])
    assert "Traceback" not in result.stdout.str()


def test_qmr_compare_two_real_runs(repo_root, data_dir, cache_dir, lab_model, tmp_path, capsys):
    """Two run directories made by sessions (FP, and another checkpoint of it), compared item by
    item: the statistics are the gate's on the shared items, and a mistyped cell is one line."""
    from pytest_qmr.cli import main

    other = _scrambled_copy(lab_model, tmp_path / "other")
    quantizers = FP_ONLY + f"\n  - {{name: other, method: checkpoint, path: {other}}}"
    fp_cell, other_cell = _cells(tmp_path, data_dir, quantizers=quantizers, limit=6)
    first = _session(tmp_path / "a", repo_root / "baselines", data_dir, cache_dir).run_cell(fp_cell)
    second = _session(tmp_path / "b", repo_root / "baselines", data_dir, cache_dir).run_cell(
        _cells(tmp_path, data_dir, quantizers=quantizers, limit=8)[1])
    run_a, run_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert main(["compare", str(run_a), str(run_b), "--cell-a", fp_cell.id, "--cell-b", other_cell.id, "--json",
                 "--min-items", "4"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["cells"]  # run B covered two more items than A
    samples_a, samples_b = ({row["item_id"]: row["correct"] for row in map(json.loads, lines)}
                            for lines in (Path(r.samples_path).read_text().splitlines() for r in (first, second)))
    shared = sorted(set(samples_a) & set(samples_b))
    assert row["items_a"] == 6 and row["items_b"] == 8 and row["gate"]["n"] == len(shared) == 6
    assert row["gate"]["fp_only"] == sum(samples_a[i] and not samples_b[i] for i in shared)
    assert row["gate"]["quant_only"] == sum(samples_b[i] and not samples_a[i] for i in shared)
    assert main(["compare", str(run_a), str(run_b), "--cell-a", fp_cell.id, "--cell-b", other_cell.id,
                 "--min-items", "4"]) == 0
    markdown = capsys.readouterr().out
    assert f"| {fp_cell.id} → {other_cell.id} | 6 |" in markdown and "Δ CI" in markdown
    assert main(["compare", str(run_a), str(run_b)]) == 2  # no shared cell id
    assert one_line(capsys.readouterr().err).endswith("share no cell id; name two with --cell-a and --cell-b")
    assert main(["compare", str(run_a), str(run_b), "--cell-a", "fp", "--cell-b", other_cell.id]) == 2
    assert f"{run_a}: no cell 'fp' (cells: {fp_cell.id})" in one_line(capsys.readouterr().err)


def test_non_utf8_calibration_data_and_review_manifest_name_their_file(tmp_path):
    from pytest_qmr.calibration import CalibrationError, _gsm8k_rows
    from pytest_qmr.locate.review import MANIFEST, ReviewError, import_reviews

    (tmp_path / "gsm8k").mkdir()
    train = tmp_path / "gsm8k" / "train.jsonl"
    train.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(CalibrationError) as excinfo:
        _gsm8k_rows(tmp_path)
    assert one_line(str(excinfo.value)) == f"{train}: not UTF-8 text (byte 0xe9 at offset 17)"
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / MANIFEST).write_bytes(b'{"cases": ["\xff"]}')
    with pytest.raises(ReviewError) as excinfo:
        import_reviews(queue, [])
    assert one_line(str(excinfo.value)) == f"{queue / MANIFEST}: not UTF-8 text (byte 0xff at offset 12)"
