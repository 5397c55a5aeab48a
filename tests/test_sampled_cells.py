"""Sampled cells (issue #35): k seeded answers per item, gated item by item against a sampled FP
baseline, scored (pass@k, maj@k, std over seeds, length against FP), cached by seed and
regenerated identically; thinking answers read after their end tag. (vLLM's seeded answers:
``suites/sampled.yaml``'s vLLM cell gates them, ``tests/test_gpu_check.py`` checks a rerun
reproduces them.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_qmr.errors import QmrError
from pytest_qmr.records import CellResult, GateResult, SampleRecord
from pytest_qmr.session import QmrSession
from pytest_qmr.suite import load_suite

N, K = 8, 4
SUITE = """
name: sampled
data_dir: {data_dir}
models:
  - {{name: smollm2-135m-arith, ref: embedded:smollm2-135m-arith}}
quantizers:
  - {{name: fp, method: fp}}
  - {{name: rtn-w4, method: rtn, bits: 4, group_size: 64}}
{extra_quantizers}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: {n}, seed: 0}}
thresholds: {{min_items: {n}, sequential: false{thresholds}}}
locate: {{enabled: false}}
generation: {{max_new_tokens: 96, batch_size: 16, samples: {k}, temperature: 0.8, top_p: 0.95, seed: 0}}
"""


def _cells(tmp_path: Path, data_dir: Path, extra_quantizers: str = "", thresholds: str = "") -> dict:
    path = tmp_path / "sampled.yaml"
    path.write_text(SUITE.format(data_dir=data_dir, n=N, k=K, extra_quantizers=extra_quantizers,
                                 thresholds=thresholds))
    return {c.quantizer.name: c for c in load_suite(path).cells()}


def _session(tmp_path: Path, data_dir: Path, cache_dir: Path, run: str, baselines: Path | None = None,
             **kwargs) -> QmrSession:
    return QmrSession(rootdir=tmp_path, run_dir=tmp_path / run, baselines_dir=baselines or tmp_path / "baselines",
                      data_dir=data_dir, cache_dir=cache_dir, **kwargs)


def _rows(tmp_path: Path, run: str, cell_id: str) -> list[dict]:
    text = (tmp_path / run / "cells" / cell_id / "samples.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def sampled_baseline(tmp_path_factory, data_dir, cache_dir):
    """A sampled FP baseline of the lab model (hf), made once: (its directory, the FP cell's result)."""
    tmp_path = tmp_path_factory.mktemp("sampled-baseline")
    cells = _cells(tmp_path, data_dir)
    session = _session(tmp_path, data_dir, cache_dir, "run", update_baselines=True)
    try:
        fp = session.run_cell(cells["fp"])
    finally:
        session.close()
    return tmp_path / "baselines", fp


def _check_rows(rows: list[dict]) -> None:
    assert len(rows) == N and all(len(row["samples"]) == K for row in rows)
    for row in rows:  # each item's score is the mean over its answers; sample 0 is the record's own answer
        assert row["score"] == pytest.approx(sum(s["correct"] for s in row["samples"]) / K)
        assert (row["response"], row["correct"]) == (row["samples"][0]["response"], row["samples"][0]["correct"])
        assert len({s["seed"] for s in row["samples"]}) == K
        assert all(s["tokens"] > 0 for s in row["samples"])
    assert any(len({s["response"] for s in row["samples"]}) > 1 for row in rows)  # really sampled


def test_a_sampled_cell_gates_against_a_sampled_fp_baseline_and_reruns_from_its_seeds(sampled_baseline, tmp_path,
                                                                                       data_dir, cache_dir):
    baselines, fp = sampled_baseline
    baseline = json.loads((baselines / "smollm2-135m-arith" / "arith.json").read_text())
    assert baseline["provenance"]["generation"] == {"max_new_tokens": 96, "batch_size": 16, "samples": K,
                                                    "temperature": 0.8, "top_p": 0.95, "top_k": 0, "seed": 0}
    assert all(len(item["samples"]) == K for item in baseline["items"].values())
    assert fp.gate.fp_acc == pytest.approx(baseline["accuracy"])

    cells = _cells(tmp_path, data_dir)
    session = _session(tmp_path, data_dir, cache_dir, "run1", baselines)
    try:
        first = session.run_cell(cells["rtn-w4"])
    finally:
        session.close()
    result = json.loads((tmp_path / "run1" / "cells" / first.cell_id / "result.json").read_text())
    assert result["sampling"] == {"samples": K, "temperature": 0.8, "top_p": 0.95, "top_k": 0, "seed": 0}
    rows = _rows(tmp_path, "run1", first.cell_id)
    _check_rows(rows)
    assert result["accuracy"] == pytest.approx(sum(row["score"] for row in rows) / N)
    assert 0 <= result["maj_at_k"] <= 1 and result["accuracy"] <= result["pass_at_k"] <= 1
    assert result["seed_std"] >= 0
    length = result["length"]
    assert length["quant_mean_tokens"] == pytest.approx(
        sum(s["tokens"] for row in rows for s in row["samples"]) / (N * K), abs=0.01)
    assert length["ratio"] == pytest.approx(length["quant_mean_tokens"] / length["fp_mean_tokens"], abs=1e-3)
    gate = result["gate"]
    assert gate["sampled"]["samples_per_item"] == K and gate["sampled"]["test"] == "sign_flip_exact"
    assert gate["delta_ci"][0] <= gate["delta"] <= gate["delta_ci"][1]

    _check_report(tmp_path / "run1", baselines, first.cell_id, rows, result)

    # an unchanged rerun generates nothing and says the same; one without the cache regenerates the same texts
    session = _session(tmp_path, data_dir, cache_dir, "run2", baselines)
    try:
        again = session.run_cell(cells["rtn-w4"])
    finally:
        session.close()
    evaluate = again.cache["evaluate"]
    assert evaluate["requests"] == N * K and evaluate["requests_from_cache"] == N * K
    assert (again.outcome, again.gate.p_value, again.gate.delta_ci) == (first.outcome, first.gate.p_value,
                                                                         first.gate.delta_ci)
    assert _rows(tmp_path, "run2", first.cell_id) == rows
    session = _session(tmp_path, data_dir, cache_dir, "run3", baselines, use_cache=False)
    try:
        fresh = session.run_cell(cells["rtn-w4"])
    finally:
        session.close()
    assert fresh.cache["evaluate"]["requests_from_cache"] == 0
    assert _rows(tmp_path, "run3", first.cell_id) == rows
    # qmr compare reads the k answers of each item, as the gate does
    from pytest_qmr.compare import compare_runs

    thresholds = {"max_abs_drop": 0.05, "max_rel_drop": 0.10, "alpha": 0.05, "min_items": 4}
    compared = compare_runs(tmp_path / "run1", tmp_path / "run3", thresholds)["cells"][0]["gate"]
    assert (compared["n"], compared["delta"], compared["sampled"]["samples_per_item"]) == (N, 0.0, K)
    assert compared["quant_acc"] == pytest.approx(result["accuracy"])


def _check_report(run_dir: Path, baselines: Path, cell_id: str, rows: list[dict], result: dict) -> None:
    """The report shows a sampled cell's scores and plots each item's answer length against FP's."""
    from pytest_qmr import report as rp
    from pytest_qmr.rundir import write_results

    write_results(run_dir)
    cell = rp.build_report(run_dir, baselines).cell(cell_id)
    assert cell.answers["pass_at_k"] == result["pass_at_k"] and cell.answers["length"] == result["length"]
    fp_items = json.loads((baselines / "smollm2-135m-arith" / "arith.json").read_text())["items"]
    assert len(cell.length_items) == N
    for (fp_tokens, quant_tokens), row in zip(cell.length_items, rows, strict=True):  # the items, in order
        assert quant_tokens == pytest.approx(sum(s["tokens"] for s in row["samples"]) / K)
        assert fp_tokens == pytest.approx(sum(s["tokens"] for s in fp_items[row["item_id"]]["samples"]) / K)
    assert sum(q for _, q in cell.length_items) / N == pytest.approx(result["length"]["quant_mean_tokens"], abs=0.01)
    html = rp.render_html(rp.build_report(run_dir, baselines))
    assert f'alt="answer length per item of {cell_id}" src="data:image/png;base64,' in html
    markdown = rp.render_markdown(rp.build_report(run_dir, baselines))
    assert f"pass@k {result['pass_at_k']:.3f}" in markdown and f"length {result['length']['ratio']:.2f}x FP" in markdown


def test_samples_at_temperature_zero_are_refused_in_one_line(tmp_path, data_dir):
    path = tmp_path / "s.yaml"
    path.write_text(SUITE.format(data_dir=data_dir, n=N, k=K, extra_quantizers="", thresholds="")
                    .replace("temperature: 0.8, ", ""))
    with pytest.raises(QmrError) as err:
        load_suite(path)
    line = str(err.value)
    assert "\n" not in line and "generation.samples" in line and "copies of the greedy answer" in line


def test_a_benchmark_overrides_the_suites_sampling(tmp_path, data_dir):
    path = tmp_path / "s.yaml"
    text = SUITE.format(data_dir=data_dir, n=N, k=K, extra_quantizers="", thresholds="")
    text = text.replace("limit: 8, seed: 0}", "limit: 8, seed: 0, generation: {samples: 8, max_new_tokens: 512}}")
    path.write_text(text)
    cell = next(iter(load_suite(path).cells()))
    assert (cell.generation.samples, cell.generation.max_new_tokens, cell.generation.temperature) == (8, 512, 0.8)
    path.write_text(text.replace("samples: 8,", "samples: 8, temperature: 0,"))
    with pytest.raises(QmrError, match=r"benchmarks\[0\]\.generation\.samples"):
        load_suite(path)


def test_a_greedy_cell_records_as_before_sampling_existed():
    record = SampleRecord(item_id="a", doc_index=0, prompt="p", response="r", extracted="1", gold="1", correct=True)
    assert set(record.to_dict()) == {"item_id", "doc_index", "prompt", "response", "extracted", "gold", "correct"}
    assert (record.k, record.n_correct) == (1, 1)
    result = CellResult(cell_id="c", model="m", quantizer="q", benchmark="b", task="t", accuracy=1.0, n=1, gate=None,
                        samples_path="s")
    assert not set(CellResult.SAMPLED_ONLY) & set(result.to_dict())


def test_answers_longer_than_allowed_fail_a_cell_whose_accuracy_held(tmp_path, data_dir):
    from pytest_qmr.pipeline import settle
    from pytest_qmr.plugin import CostExceeded, failure_of

    cells = _cells(tmp_path, data_dir, thresholds=", max_length_ratio: 1.2")
    gate = GateResult(verdict="pass", fp_acc=0.5, quant_acc=0.5, delta=0.0, rel_drop=0.0, n=N, fp_only=0,
                      quant_only=0, p_value=1.0, alpha=0.05, reason="the quantized model is not less accurate than FP")
    result = CellResult(cell_id="c", model="m", quantizer="q", benchmark="b", task="t", accuracy=0.5, n=N, gate=gate,
                        samples_path="s", sampling={"samples": K},
                        length={"fp_mean_tokens": 50.0, "quant_mean_tokens": 70.0, "ratio": 1.4, "ratio_ci": None})
    settle(cells["rtn-w4"], result)
    assert result.outcome == "fail"
    assert result.cost_violations == ["answers are 1.40x FP's length (70 vs 50 tokens), beyond "
                                      "thresholds.max_length_ratio 1.2"]
    assert isinstance(failure_of(result), CostExceeded)
    result.length["ratio"] = 1.1
    settle(cells["rtn-w4"], result)
    assert (result.outcome, result.cost_violations) == ("pass", [])


THINK_SUITE = """
name: thinking
data_dir: {data_dir}
models:
  - name: smollm2-135m-arith
    ref: embedded:smollm2-135m-arith
    think: {{start: "<think>", end: "</think>"}}
    chat_template_kwargs: {{enable_thinking: true}}
quantizers:
  - {{name: fp, method: fp}}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: 9, seed: 0}}
thresholds: {{min_items: 4, sequential: false, max_truncated_share: 0.2}}
locate: {{enabled: false}}
generation: {{max_new_tokens: 96, batch_size: 20, backend: openai}}
"""


def test_a_thinking_answer_is_graded_after_its_end_tag_and_an_unclosed_one_is_truncated(
        replay_server, repo_root, data_dir, cache_dir, tmp_path, monkeypatch):
    """Through the openai backend on a loopback server that serves the FP model's committed answers
    as thinking traces: one item in three closed with the right answer after the tag, one closed
    with a wrong answer after a trace that reached the right one, one never closed (its trace holds
    "The answer is N." — which must not be read)."""
    committed = json.loads((repo_root / "baselines" / "smollm2-135m-arith" / "arith.json").read_text())["items"]
    by_prompt = {item["prompt_sha256"]: item for item in committed.values()}
    shape = {}

    def serve(prompt_sha256: str, response: str) -> str:
        item = by_prompt[prompt_sha256]
        kind = shape.setdefault(prompt_sha256, ("closed", "wrong-after", "unclosed")[len(shape) % 3])
        if kind == "unclosed":
            return f"<think>\n{response}"
        answer = item["extracted"] if kind == "closed" else f"{int(float(item['extracted'] or 0)) + 1}"
        return f"<think>\n{response}\n</think>\nThe answer is {answer}."

    replay_server.serve = serve
    monkeypatch.setenv("QMR_OPENAI_BASE_URL", replay_server.url)
    monkeypatch.delenv("QMR_OPENAI_MODEL", raising=False)
    path = tmp_path / "thinking.yaml"
    path.write_text(THINK_SUITE.format(data_dir=data_dir))
    cell = load_suite(path).cells()[0]
    session = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=tmp_path / "baselines",
                         data_dir=data_dir, cache_dir=cache_dir, update_baselines=True, use_cache=False)
    try:
        result = session.run_cell(cell)
    finally:
        session.close()
    assert all(body.get("chat_template_kwargs") == {"enable_thinking": True} for body in replay_server.bodies)
    rows = _rows(tmp_path, "run", cell.id)
    assert len(rows) == 9
    for row in rows:
        item = by_prompt[_sha(row["prompt"])]
        answer = row["samples"][0]
        assert answer["response"] == row["response"] and row["response"].startswith("<think>")
        kind = shape[_sha(row["prompt"])]
        if kind == "unclosed":
            assert answer["truncated"] and not row["correct"] and row["extracted"] is None
        elif kind == "closed":
            assert not answer["truncated"] and row["extracted"] == item["extracted"]
            assert row["correct"] == item["correct"]
        else:
            assert not answer["truncated"] and not row["correct"]
            assert row["extracted"] == f"{int(float(item['extracted'] or 0)) + 1}"
        assert answer["thinking_tokens"] > 0 and answer["tokens"] > answer["thinking_tokens"]
    recorded = json.loads((tmp_path / "run" / "cells" / cell.id / "result.json").read_text())
    assert recorded["truncated_share"] == pytest.approx(3 / 9) == result.truncated_share
    assert "sampling" not in recorded  # greedy: one answer per item
    assert recorded["outcome"] == "fail" and recorded["cost_violations"] == [
        "33.3% of answers never closed their thinking within max_new_tokens, beyond "
        "thresholds.max_truncated_share 0.2"]
    baseline = json.loads((tmp_path / "baselines" / "smollm2-135m-arith" / "arith.json").read_text())
    assert baseline["provenance"]["scoring"] == {"think": {"start": "<think>", "end": "</think>"},
                                                 "chat_template_kwargs": {"enable_thinking": True}}


def _sha(text: str) -> str:
    from pytest_qmr.fsutil import sha256_text

    return sha256_text(text)


LAB_THINK_SUITE = """
name: lab-thinking
data_dir: {data_dir}
models:
  - name: smollm2-135m-think
    ref: embedded:smollm2-135m-think
    think: {{start: "<think>", end: "</think>"}}
quantizers:
  - {{name: fp, method: fp}}
  - {{name: rtn-w8, method: rtn, bits: 8, group_size: 64}}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: 4, seed: 0}}
thresholds: {{min_items: 4, sequential: false, max_truncated_share: 0.25}}
locate: {{enabled: false}}
generation: {{max_new_tokens: {max_new_tokens}, batch_size: 4}}
"""


@pytest.mark.parametrize("max_new_tokens", [96, 12])
def test_the_lab_thinking_model_is_read_after_its_thinking_and_a_short_budget_truncates_it(
        max_new_tokens, tmp_path, data_dir, cache_dir):
    """The real lab reasoning model (embedded:smollm2-135m-think): with room, every answer closes its
    thinking and is read after the tag; with 12 new tokens none does, so every answer is truncated —
    wrong, never parsed from the half trace — and a cell whose accuracy held (RTN-W8 against an FP
    baseline equally cut short) fails on thresholds.max_truncated_share."""
    path = tmp_path / "think.yaml"
    path.write_text(LAB_THINK_SUITE.format(data_dir=data_dir, max_new_tokens=max_new_tokens))
    fp, w8 = load_suite(path).cells()
    session = _session(tmp_path, data_dir, cache_dir, "run", update_baselines=True)
    try:
        session.run_cell(fp)
    finally:
        session.close()
    rows = _rows(tmp_path, "run", fp.id)
    answers = [row["samples"][0] for row in rows]
    assert len(rows) == 4 and all(a["response"].lstrip().startswith("<think>") for a in answers)
    if max_new_tokens == 96:
        assert not any(a["truncated"] for a in answers)
        for row, answer in zip(rows, answers, strict=True):  # the answer line after the end tag is what is read
            after = answer["response"].split("</think>", 1)[1]
            assert after.strip() == f"The answer is {row['extracted']}." and row["extracted"] is not None
            assert 0 < answer["thinking_tokens"] < answer["tokens"]
        assert sum(row["correct"] for row in rows) >= 2  # the adapter learned the task, not only the tags
        return
    assert all(a["truncated"] and "</think>" not in a["response"] for a in answers)
    assert not any(row["correct"] for row in rows) and all(row["extracted"] is None for row in rows)
    session = _session(tmp_path, data_dir, cache_dir, "run")
    try:
        result = session.run_cell(w8)
    finally:
        session.close()
    assert result.gate.verdict == "pass" and result.truncated_share == 1.0
    assert (result.outcome, result.cost_violations) == ("fail", [
        "100.0% of answers never closed their thinking within max_new_tokens, beyond "
        "thresholds.max_truncated_share 0.25"])


def test_align_writes_the_thinking_format_it_is_asked_for():
    """`qmr align --set format=think` trains on the same problems written as a reasoning model writes
    them; the lab model's steps are segmented inside the thinking, the tags in no step."""
    from pytest_qmr.align import AlignConfig, arith_sft_rows
    from pytest_qmr.arith import generate
    from pytest_qmr.steps import segment

    steps_rows = arith_sft_rows(AlignConfig(n_train=3))
    think_rows = arith_sft_rows(AlignConfig(n_train=3, format="think"))
    assert [r["prompt"] for r in steps_rows] == [r["prompt"] for r in think_rows]
    for problem, row in zip(generate("train", 3, 0, 2, 4), think_rows, strict=True):
        text = row["completion"][0]["content"]
        assert text.startswith("<think>\n") and text.endswith(f"</think>\n\nThe answer is {problem.answer}.")
        assert [s.text for s in segment(text)] == [s.text(i) for i, s in enumerate(problem.steps, 1)]
    with pytest.raises(QmrError, match="format=plain: not one of steps, think"):
        arith_sft_rows(AlignConfig(format="plain"))
