"""Committed FP baselines: round trip, atomic/locked writes, one-line errors, provenance."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pytest_qmr import fsutil
from pytest_qmr.fsutil import sha256_text
from pytest_qmr.baselines import (
    Baseline,
    BaselineError,
    baseline_path,
    check_provenance,
    library_drift,
    paired_vectors,
    read_baseline,
    write_baseline,
)
from pytest_qmr.records import SampleRecord

PROVENANCE = {
    "model_fingerprint": "a" * 64,
    "data_sha256": "b" * 64,
    "prompt_sha256": "c" * 64,
    "generation": {"max_new_tokens": 256, "batch_size": 16, "backend": "hf"},
    "limit": 4,
    "seed": 0,
    "libraries": {"torch": "2.13.0", "transformers": "5.17.0"},
    "created": "2025-01-01T00:00:00+00:00",
}


def make_baseline(tag: int = 0, n: int = 4) -> Baseline:
    records = [
        SampleRecord(
            item_id=f"arith-{i:04d}",
            doc_index=i,
            prompt=f"q{i}",
            response=f"answer {i} from writer {tag}\nline two",
            extracted=str(i) if i % 3 else None,
            gold=str(i),
            correct=(i + tag) % 2 == 0,
        )
        for i in range(n)
    ]
    return Baseline.from_records("smollm2-135m-arith", "arith", "qmr_arith", records, {**PROVENANCE, "seed": tag})


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_baseline_path(tmp_path):
    assert baseline_path(tmp_path, "m", "b") == tmp_path / "m" / "b.json"
    with pytest.raises(BaselineError):
        baseline_path(tmp_path, "../m", "b")


def test_round_trip(tmp_path):
    path = baseline_path(tmp_path / "baselines", "smollm2-135m-arith", "arith")
    original = make_baseline()
    write_baseline(path, original)
    loaded = read_baseline(path)
    assert loaded == original  # source is not compared
    assert loaded.source == str(path)
    assert loaded.accuracy == 0.5 and loaded.n == 4
    assert loaded.items["arith-0000"] == {
        "correct": True, "extracted": None, "response": "answer 0 from writer 0\nline two",
        "doc_index": 0, "prompt_sha256": sha256_text("q0"), "gold": "0"}
    assert loaded.correct == {"arith-0000": True, "arith-0001": False, "arith-0002": True, "arith-0003": False}
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and set(data) == {
        "schema", "model", "benchmark", "task", "accuracy", "n", "items", "provenance"}


def test_from_records_fills_created_and_rejects_duplicates():
    records = [SampleRecord("x", 0, "p", "r", "1", "1", True)]
    prov = {k: v for k, v in PROVENANCE.items() if k != "created"}
    assert Baseline.from_records("m", "b", "t", records, prov).provenance["created"]
    with pytest.raises(BaselineError, match="duplicate item id 'x'"):
        Baseline.from_records("m", "b", "t", records * 2, prov)


def test_items_as_plain_dicts_and_optional_keys(tmp_path):
    """Callers may build items by hand; doc_index / prompt_sha256 are optional, extras kept."""
    baseline = Baseline(
        model="m", benchmark="b", task="t", accuracy=0.5, n=2,
        items={"x": {"correct": True, "extracted": "1", "response": "1"},
               "y": {"correct": False, "extracted": None, "response": "", "doc_index": 7, "note": "kept"}},
        provenance=dict(PROVENANCE),
    )
    path = baseline_path(tmp_path, "m", "b")
    write_baseline(path, baseline)
    loaded = read_baseline(path)
    assert loaded == baseline and loaded.items["y"]["note"] == "kept"
    assert sorted(loaded.items.items(), key=lambda kv: kv[1].get("doc_index", 0))[0][0] == "x"


def test_write_refuses_invalid_baseline(tmp_path):
    bad = make_baseline()
    bad.n = 99
    path = tmp_path / "m" / "b.json"
    with pytest.raises(BaselineError, match=r"n: does not match the 4 items \(got 99\)"):
        write_baseline(path, bad)
    assert not path.exists()


# --------------------------------------------------------------------------- atomicity


@pytest.fixture
def existing(tmp_path):
    path = baseline_path(tmp_path, "smollm2-135m-arith", "arith")
    write_baseline(path, make_baseline(tag=0))
    return path, path.read_bytes()


def _assert_untouched(path: Path, before: bytes):
    assert path.read_bytes() == before
    assert read_baseline(path) == make_baseline(tag=0)
    leftovers = files_in(path.parent) - {path.name, path.name + ".lock"}
    assert leftovers == set(), leftovers


def test_crash_in_os_replace_keeps_old_file(existing, monkeypatch):
    path, before = existing

    def boom(*args, **kwargs):
        raise OSError("disk pulled")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(BaselineError, match=r"cannot write the baseline \(disk pulled\)"):  # one line (#31)
        write_baseline(path, make_baseline(tag=1))
    monkeypatch.undo()
    _assert_untouched(path, before)


def test_crash_in_json_dumps_keeps_old_file(existing, monkeypatch):
    path, before = existing

    def boom(*args, **kwargs):
        raise RuntimeError("serializer crashed")

    monkeypatch.setattr(fsutil.json, "dumps", boom)
    with pytest.raises(RuntimeError):
        write_baseline(path, make_baseline(tag=1))
    monkeypatch.undo()
    _assert_untouched(path, before)


def test_interrupt_mid_write_keeps_old_file(existing, monkeypatch):
    path, before = existing

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_baseline(path, make_baseline(tag=1))
    monkeypatch.undo()
    _assert_untouched(path, before)


def _writer(path: str, tag: int, writes: int) -> None:
    for i in range(writes):
        write_baseline(path, make_baseline(tag=tag, n=50 + i))


def test_concurrent_writers_leave_valid_json(tmp_path):
    path = baseline_path(tmp_path, "smollm2-135m-arith", "arith")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=_writer, args=(str(path), tag, 20)) for tag in range(4)]
    for proc in procs:
        proc.start()
    reads = 0
    while any(proc.is_alive() for proc in procs):
        if path.exists():  # a reader racing the writers never sees a torn file
            baseline = read_baseline(path)
            assert baseline.n == len(baseline.items)
            reads += 1
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    final = read_baseline(path)
    assert reads > 0
    assert final.n == 69 and final.provenance["seed"] in range(4)
    assert final == make_baseline(tag=final.provenance["seed"], n=69)
    assert files_in(path.parent) == {path.name, path.name + ".lock"}


# --------------------------------------------------------------------------- errors


def test_missing_file_message(tmp_path):
    path = baseline_path(tmp_path / "baselines", "smollm2-135m-arith", "arith")
    with pytest.raises(BaselineError) as info:
        read_baseline(path)
    assert str(info.value) == (
        f"{path}: no FP baseline for model 'smollm2-135m-arith' on benchmark 'arith'; generate it with: "
        "pytest <suite.yaml> --qmr-update-baselines -k 'smollm2-135m-arith and arith'"
    )
    with pytest.raises(BaselineError) as info:
        read_baseline(path, suite="suites/smoke.yaml", cell="smollm2-135m-arith-fp-arith")
    assert str(info.value).endswith(
        "generate it with: pytest suites/smoke.yaml --qmr-update-baselines -k smollm2-135m-arith-fp-arith"
    )


def test_corrupt_json_message(existing):
    path, before = existing
    path.write_bytes(before[: len(before) // 2])  # a torn file (e.g. written by another tool)
    with pytest.raises(BaselineError) as info:
        read_baseline(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: corrupt baseline, not valid JSON at line ")
    assert message.endswith("regenerate it with: pytest <suite.yaml> --qmr-update-baselines "
                            "-k 'smollm2-135m-arith and arith'")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(schema=2), "schema: unsupported baseline schema, expected 1 (got 2)"),
        (lambda d: d.pop("schema"), "schema: missing required field (got nothing)"),
        (lambda d: d.pop("task"), "task: missing required field (got nothing)"),
        (lambda d: d.update(accuracy="high"), "accuracy: must be a number in [0, 1] (got 'high')"),
        (lambda d: d.update(accuracy=0.75), "accuracy: does not match the items (0.5) (got 0.75)"),
        (lambda d: d.update(n=True), "n: must be a non-negative integer (got true)"),
        (lambda d: d.update(items=[]), "items: must be an object mapping item ids to results (got [])"),
        (lambda d: d["items"]["arith-0001"].update(correct="yes"),
         "items['arith-0001'].correct: must be true or false (got 'yes')"),
        (lambda d: d["items"]["arith-0002"].pop("response"),
         "items['arith-0002'].response: missing required field (got nothing)"),
        (lambda d: d["items"]["arith-0002"].update(doc_index=-1),
         "items['arith-0002'].doc_index: must be a non-negative integer (got -1)"),
        (lambda d: d["provenance"].pop("data_sha256"),
         "provenance.data_sha256: missing required field (got nothing)"),
        (lambda d: d["provenance"].update(seed="0"), "provenance.seed: must be an integer (got '0')"),
        (lambda d: d["provenance"].update(limit=0),
         "provenance.limit: must be a positive integer or null (got 0)"),
        (lambda d: d.clear() or d.update(x=[1]), "schema: missing required field (got nothing)"),
    ],
    ids=lambda v: v.split(":")[0] if isinstance(v, str) else "",
)
def test_wrong_schema_messages(existing, mutate, expected):
    path, before = existing
    data = json.loads(before)
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError) as info:
        read_baseline(path)
    assert str(info.value) == (
        f"{path}: {expected}; regenerate it with: "
        "pytest <suite.yaml> --qmr-update-baselines -k 'smollm2-135m-arith and arith'"
    )


def test_top_level_not_an_object(existing):
    path, _ = existing
    path.write_text("[1, 2]")
    with pytest.raises(BaselineError, match=r": \(top level\): must be a JSON object \(got \[1, 2\]\)"):
        read_baseline(path)


# --------------------------------------------------------------------------- provenance


def test_provenance_matches():
    baseline = make_baseline()
    expected = {k: PROVENANCE[k] for k in ("model_fingerprint", "data_sha256", "prompt_sha256", "generation", "seed")}
    assert check_provenance(baseline, expected) == []
    # limit, created and libraries are not compared here
    assert check_provenance(baseline, {**expected, "limit": 10, "created": "now"}) == []


def test_provenance_mismatch_lines():
    baseline = make_baseline()
    current = {
        "model_fingerprint": "f" * 64,
        "data_sha256": "b" * 64,
        "prompt_sha256": "d" * 64,
        "generation": {"max_new_tokens": 512, "backend": "hf", "temperature": 0.0},
        "seed": 3,
    }
    assert check_provenance(baseline, current) == [
        "model_fingerprint: baseline aaaaaaaaaaaa…, current run ffffffffffff… (the FP model weights changed)",
        "prompt_sha256: baseline cccccccccccc…, current run dddddddddddd… (the prompt changed)",
        "generation.batch_size: baseline 16, current run unset (the generation settings changed)",
        "generation.max_new_tokens: baseline 256, current run 512 (the generation settings changed)",
        "generation.temperature: baseline unset, current run 0.0 (the generation settings changed)",
        "seed: baseline 0, current run 3 (the seed changed)",
    ]


def test_library_drift_is_separate_and_lists_changes():
    baseline = make_baseline()
    assert library_drift(baseline, {"torch": "2.13.0", "transformers": "5.17.0"}) == []
    assert library_drift(baseline, {"torch": "2.14.0", "lm_eval": "0.4.13"}) == [
        "lm_eval: not recorded in the baseline, current run 0.4.13",
        "torch: baseline 2.13.0, current run 2.14.0",
        "transformers: baseline 5.17.0, not recorded in the current run",
    ]
    assert check_provenance(baseline, {"libraries": {"torch": "0"}}) == []


# --------------------------------------------------------------------------- pairing


def test_paired_vectors_align_in_requested_order():
    baseline = make_baseline(n=4)
    ids = ["arith-0003", "arith-0000", "arith-0002"]
    fp, quant = paired_vectors(baseline, ids, {"arith-0000": False, "arith-0002": True, "arith-0003": True})
    assert fp == [False, True, True]
    assert quant == [True, False, True]


def test_paired_vectors_missing_ids(tmp_path):
    path = baseline_path(tmp_path, "smollm2-135m-arith", "arith")
    write_baseline(path, make_baseline(n=4))
    baseline = read_baseline(path)
    ids = [f"arith-{i:04d}" for i in range(6)]
    with pytest.raises(BaselineError) as info:
        paired_vectors(baseline, ids, {i: True for i in ids}, suite="suites/smoke.yaml")
    assert str(info.value) == (
        f"{path}: 2 of 6 requested items are not in the FP baseline for model 'smollm2-135m-arith' on "
        "benchmark 'arith' (first: 'arith-0004'; the baseline has 4 items); regenerate it with: "
        "pytest suites/smoke.yaml --qmr-update-baselines -k 'smollm2-135m-arith and arith'"
    )
    with pytest.raises(ValueError, match="1 of 2 requested items have no quantized result"):
        paired_vectors(baseline, ids[:2], {ids[0]: True})
