"""Every quantization method on the embedded SmolLM2-135M lab model (the base model when the lab
adapter is not built yet): builds, records its numbers, and the compressed checkpoint reloads
through transformers and generates the same text as the dense copy the gate evaluates.

Slow (minutes on a 2-core CPU): ``pytest -m slow tests/test_quantize_embedded.py -s`` prints a
table of quantization time, peak RSS and checkpoint sizes.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor")

from pytest_qmr.calibration import CalibrationSpec  # noqa: E402
from pytest_qmr.quantize import QuantSpec, quantize  # noqa: E402

pytestmark = pytest.mark.slow

CALIBRATION = CalibrationSpec(dataset="gsm8k", samples=int(os.environ.get("QMR_TEST_CAL_SAMPLES", "32")),
                              seq_len=int(os.environ.get("QMR_TEST_CAL_SEQ_LEN", "256")), seed=0)
SPECS = {
    "rtn-w4g128": QuantSpec(method="rtn", bits=4, group_size=128),
    "gptq-w4g128": QuantSpec(method="gptq", bits=4, group_size=128, calibration=CALIBRATION),
    "awq-w4g128": QuantSpec(method="awq", bits=4, group_size=128, calibration=CALIBRATION),
    "smoothquant-w8a8": QuantSpec(method="smoothquant", calibration=CALIBRATION),
}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def model(cache_dir):
    from pytest_qmr import models

    try:
        return models.resolve("embedded:smollm2-135m-arith", cache_dir)
    except models.ModelError:
        return models.resolve("embedded:smollm2-135m", cache_dir)


@pytest.mark.parametrize("name", list(SPECS))
def test_method_on_the_embedded_model(model, cache_dir, data_dir, name):
    from transformers import AutoModelForCausalLM

    from pytest_qmr.models import load

    spec = SPECS[name]
    result = quantize(model.path, model.fingerprint, spec, cache_dir, data_dir=data_dir)
    info = result.info
    if spec.method != "smoothquant":
        # hidden size 576: group 128 does not divide q/k/v/o/gate/up (fitted to 64); down_proj (1536) keeps 128
        assert set(info["fitted_group_sizes"].values()) == {64}
        assert len(info["fitted_group_sizes"]) == 30 * 6
        assert info["group_sizes_used"] == {"64": 180, "128": 30}
    assert "lm_head" in info["skipped"]

    dense, tokenizer = load(result.path)
    compressed = AutoModelForCausalLM.from_pretrained(result.compressed_path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(dense(**ids).logits, compressed(**ids).logits, atol=2e-3, rtol=1e-3)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text_dense = tokenizer.decode(dense.generate(**ids, **kwargs)[0, ids["input_ids"].shape[1]:])
    text_compressed = tokenizer.decode(compressed.generate(**ids, **kwargs)[0, ids["input_ids"].shape[1]:])
    assert text_compressed.strip() and text_compressed == text_dense

    sizes = info["sizes"]
    RESULTS[name] = {
        "model": model.reference,
        "cache_hit": info["cache_hit"],
        "seconds": info["seconds"],
        "peak_rss_mb": info["peak_rss_mb"],
        "dense_mb": round(sizes["dense_bytes"] / 1e6, 1),
        "compressed_mb": round(sizes["compressed_bytes"] / 1e6, 1),
        "compressed_if_bf16_mb": round(sizes["compressed_bytes_if_bf16"] / 1e6, 1),
        "ratio_vs_fp32": sizes["compression_ratio_vs_fp32"],
        "ratio_vs_bf16": sizes["compression_ratio_vs_bf16"],
        "calibration": info["calibration"] and {k: info["calibration"][k] for k in ("dataset", "samples", "seq_len")},
        "generated": text_compressed,
    }
    print(f"\n{name}: {json.dumps(RESULTS[name])}")
