"""Quantization through llmcompressor on a tiny random Llama: every method for real, the dense copy
against the compressed checkpoint, the cache (hits, corruption, interruption, concurrency), bad
requests, calibration data, the CPU workaround for AWQ, and the CLI.

The tiny model has hidden size 96, so the requested group size 64 does not divide the attention
and gate/up projections: they get a fitted group of 32 (down_proj, 256 wide, keeps 64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor")

from pytest_qmr import quantize as qz  # noqa: E402
from pytest_qmr.calibration import CalibrationError, CalibrationSpec, build as build_calibration  # noqa: E402
from pytest_qmr.quantize import QuantizeError, QuantSpec, quantize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GROUP = 64
CAL = CalibrationSpec(dataset="qmr_arith", samples=8, seq_len=64, seed=0)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, cache_dir, make_tiny_llama) -> tuple[Path, str]:
    """A randomly initialised 2-layer Llama with the embedded model's tokenizer (fp32 safetensors)."""
    from pytest_qmr import models

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"),
                           models.resolve("embedded:smollm2-135m", cache_dir).path)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qcache")


def _spec(method: str, bits: int | None = 4, **kw) -> QuantSpec:
    kw.setdefault("group_size", GROUP)
    kw.setdefault("calibration", CAL)
    return QuantSpec(method=method, bits=bits, **kw)


@pytest.fixture(scope="session")
def built(tiny_model, shared_root):
    """Build (once per session) and return the result for (method, bits)."""
    results: dict = {}

    def get(method: str, bits: int | None):
        if (method, bits) not in results:
            results[method, bits] = quantize(tiny_model[0], tiny_model[1], _spec(method, bits), shared_root)
        return results[method, bits]

    return get


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update({k: v.clone() for k, v in load_file(path).items()})  # no views of a file we may rewrite
    return state


def _max_distinct_per_group(weight: torch.Tensor, group: int | None) -> int:
    rows, cols = weight.shape
    grouped = weight.reshape(rows, 1, cols) if group is None else weight.reshape(rows, cols // group, group)
    ordered = grouped.sort(dim=-1).values
    return int(((ordered[..., 1:] != ordered[..., :-1]).sum(-1) + 1).max())


QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_weights(state: dict) -> dict[str, torch.Tensor]:
    return {k[: -len(".weight")]: v for k, v in state.items()
            if k.endswith(".weight") and k.split(".")[-2] in QUANTIZED}


# ----------------------------------------------------------------------------- every method, for real


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("bits", [4, 3])
def test_weight_only_methods_take_at_most_2_pow_bits_values_per_group(built, tiny_model, method, bits):
    result = built(method, bits)
    info = result.info
    assert info["method"] == method and info["recipe"]["bits"] == bits
    assert info["recipe"]["symmetric"] is (method != "awq")  # AWQ: asymmetric W4A16 by default
    fitted = info["fitted_group_sizes"]
    assert fitted and set(fitted.values()) == {32}, "96-wide layers get the fitted group 32, recorded"
    assert not any("down_proj" in name for name in fitted)
    assert info["group_sizes_used"] == {"32": 12, "64": 2}

    original = _linear_weights(_tensors(tiny_model[0]))
    dense = _linear_weights(_tensors(result.path))
    assert set(dense) == set(original)
    for name, weight in dense.items():
        group = fitted.get(name, GROUP)
        assert _max_distinct_per_group(weight, group) <= 2 ** bits, name
        assert _max_distinct_per_group(original[name], group) > 2 ** bits  # the fp weights were not
        assert not torch.equal(weight, original[name])
    state = _tensors(result.path)
    assert torch.equal(state["model.embed_tokens.weight"], _tensors(tiny_model[0])["model.embed_tokens.weight"])


def test_info_records_what_was_built(built):
    info = built("gptq", 4).info
    for key in ("method", "recipe", "seconds", "peak_rss_mb", "sizes", "fitted_group_sizes", "skipped",
                "calibration", "cache_hit", "libraries", "files", "llmcompressor_recipe"):
        assert key in info, key
    assert info["seconds"]["total"] > 0 and info["seconds"]["oneshot"] > 0
    assert info["peak_rss_mb"] >= info["rss_before_mb"] > 0
    assert info["skipped"] == {"lm_head": "ignored by recipe (ignore=lm_head)"}
    assert "GPTQModifier" in info["llmcompressor_recipe"]
    cal = info["calibration"]
    assert (cal["dataset"], cal["samples"], cal["seq_len"], cal["seed"]) == ("qmr_arith", 8, 64, 0)
    assert len(cal["sha256"]) == 64 and cal["chat_template"] is True
    sizes = info["sizes"]
    assert sizes["dense_bytes"] == pytest.approx(sizes["fp_checkpoint_bytes"], rel=0.01)
    assert sizes["compressed_bytes"] < sizes["dense_bytes"]
    assert sizes["compression_ratio_vs_fp32"] > 1 and sizes["compression_ratio_vs_bf16"] > 1
    assert built("rtn", 4).info["calibration"] is None  # RTN needs no data


def test_awq_runs_on_cpu_through_the_workaround(built):
    info = built("awq", 4).info
    assert info["awq_cpu_workaround"] is (not (torch.cuda.is_available() or torch.accelerator.is_available()))
    assert "AWQModifier" in info["llmcompressor_recipe"] and "QuantizationModifier" in info["llmcompressor_recipe"]


def test_smoothquant_is_w8a8_with_dynamic_per_token_activations(built, tiny_model):
    result = built("smoothquant", None)
    info = result.info
    assert info["recipe"]["scheme"] == "W8A8" and info["recipe"]["bits"] == 8
    assert info["notes"] and "per output channel" in info["notes"][0]  # group_size 64 did not apply, said so
    assert info["activation_quantization"].startswith("simulated")

    dense = _linear_weights(_tensors(result.path))
    for name, weight in dense.items():
        assert _max_distinct_per_group(weight, None) <= 256, name  # per output channel
    original = _tensors(tiny_model[0])
    state = _tensors(result.path)
    assert not torch.equal(state["model.layers.0.input_layernorm.weight"],
                           original["model.layers.0.input_layernorm.weight"]), "smoothing rescales the norms"

    qc = json.loads((result.compressed_path / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    acts = group["input_activations"]
    assert (acts["num_bits"], acts["type"], acts["strategy"], acts["dynamic"], acts["symmetric"]) == (
        8, "int", "token", True, True)
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (8, "channel")
    assert "lm_head" in qc["ignore"]

    dense_qc = json.loads((result.path / "config.json").read_text())["quantization_config"]
    dense_group = next(iter(dense_qc["config_groups"].values()))
    assert dense_group["weights"] is None and dense_group["input_activations"]["strategy"] == "token"


def test_smoothquant_dense_copy_rounds_activations(built):
    """Loading the dense copy applies the per-token int8 input rounding; without it the logits differ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pytest_qmr.models import load

    result = built("smoothquant", None)
    dense, tokenizer = load(result.path)
    config = AutoConfig.from_pretrained(result.path)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_pretrained(result.path, config=config, dtype=torch.float32)
    ids = tokenizer("Mia has 12 apples and buys 30 more.", return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(dense(**ids).logits, plain(**ids).logits, atol=1e-4)


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("gptq", 3), ("awq", 4), ("smoothquant", None)])
def test_compressed_checkpoint_reloads_generates_and_matches_the_dense_copy(built, method, bits):
    from transformers import AutoModelForCausalLM

    from pytest_qmr.models import load

    result = built(method, bits)
    assert result.compressed_path is not None
    assert list(result.compressed_path.glob("*.safetensors"))
    dense, tokenizer = load(result.path)
    compressed = AutoModelForCausalLM.from_pretrained(result.compressed_path, dtype=torch.float32)
    ids = tokenizer("Leo has 40 coins. He loses 5 coins.", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(dense(**ids).logits, compressed(**ids).logits, atol=1e-4, rtol=1e-4)
    out = compressed.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_lm_head_is_quantized_only_when_asked(tiny_model, tmp_path):
    result = quantize(*tiny_model, _spec("rtn", 4, ignore=()), tmp_path)
    assert "lm_head" not in result.info["skipped"]
    config = json.loads((result.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # lm_head quantized, the input embedding is not
    state = _tensors(result.path)
    original = _tensors(tiny_model[0])
    assert torch.equal(state["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert _max_distinct_per_group(state["lm_head.weight"], 32) <= 16


# ----------------------------------------------------------------------------- the cache


def test_second_identical_request_hits_the_cache(built, tiny_model, shared_root, monkeypatch):
    first = built("gptq", 4)
    import llmcompressor

    def no_recompute(*args, **kwargs):
        raise AssertionError("oneshot ran on a cache hit")

    def no_load(*args, **kwargs):
        raise AssertionError("a cache hit loaded the model")

    import transformers

    monkeypatch.setattr(llmcompressor, "oneshot", no_recompute)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)  # a hit reads files only
    second = quantize(*tiny_model, _spec("gptq", 4), shared_root)
    assert second.info["cache_hit"] is True and first.info["cache_hit"] is False
    assert second.path == first.path
    assert second.info["seconds"] == first.info["seconds"]  # the build's numbers, not the lookup's


def test_key_covers_recipe_calibration_and_data(tiny_model):
    fp = tiny_model[1]
    base = qz.cache_key(fp, _spec("gptq", 4), "a" * 64)
    assert qz.cache_key(fp, _spec("gptq", 4), "a" * 64) == base
    assert qz.cache_key(fp, _spec("gptq", 4), "b" * 64) != base  # calibration data
    assert qz.cache_key(fp, _spec("gptq", 3), "a" * 64) != base
    assert qz.cache_key(fp, _spec("gptq", 4, group_size=32), "a" * 64) != base
    assert qz.cache_key(fp, _spec("gptq", 4, calibration=CalibrationSpec("qmr_arith", 16, 64)), "a" * 64) != base
    assert qz.cache_key("other-model", _spec("gptq", 4), "a" * 64) != base
    # modifier options are part of the recipe; spelling out a default changes nothing
    assert qz.cache_key(fp, _spec("gptq", 4, options=(("dampening_frac", 0.1),)), "a" * 64) != base
    assert qz.cache_key(fp, _spec("gptq", 4, options=(("dampening_frac", 0.01),)), "a" * 64) == base
    # rtn ignores calibration settings entirely
    assert qz.cache_key(fp, _spec("rtn", 4, calibration=None)) == qz.cache_key(fp, _spec("rtn", 4))


def _truncate_dense(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _garble_info(entry: Path) -> None:
    (entry / qz.INFO_FILE).write_text('{"method": "rtn", "files": ')


def _flip_byte(entry: Path) -> None:
    weights = entry / qz.COMPRESSED_DIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))


def _drop_compressed(entry: Path) -> None:
    import shutil

    shutil.rmtree(entry / qz.COMPRESSED_DIR)


@pytest.mark.parametrize("corrupt,why", [
    (_truncate_dense, "model.safetensors size"),
    (_garble_info, "does not parse"),
    (_flip_byte, "sha256 mismatch"),
    (_drop_compressed, "missing"),
])
def test_corrupted_entry_is_detected_and_rebuilt(tiny_model, tmp_path, corrupt, why):
    spec = _spec("rtn", 4)
    first = quantize(*tiny_model, spec, tmp_path)
    reference = _tensors(first.path)
    corrupt(first.path)
    assert qz.verify_entry(first.path)[0] is None
    second = quantize(*tiny_model, spec, tmp_path)
    assert second.info["cache_hit"] is False and why in second.info["rebuilt_because"]
    assert qz.verify_entry(second.path)[0] is not None
    rebuilt = _tensors(second.path)
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    assert quantize(*tiny_model, spec, tmp_path).info["cache_hit"] is True


def test_interrupted_quantization_leaves_no_entry(tiny_model, tmp_path, monkeypatch):
    spec = _spec("rtn", 4)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(qz.build, "_save_compressed", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize(*tiny_model, spec, tmp_path)
    quantized = tmp_path / "quantized"
    assert [p for p in quantized.iterdir() if p.is_dir()] == []  # neither an entry nor a scratch dir
    assert qz.cache_entries(tmp_path) == []
    monkeypatch.undo()
    result = quantize(*tiny_model, spec, tmp_path)
    assert result.info["cache_hit"] is False and result.info["rebuilt_because"] is None


CONCURRENT = """
import json, sys, time
from pathlib import Path
from pytest_qmr.quantize import QuantSpec, quantize
model, fingerprint, root, me, other = sys.argv[1:6]
Path(me).touch()
deadline = time.time() + 120
while not Path(other).exists() and time.time() < deadline:
    time.sleep(0.05)
result = quantize(Path(model), fingerprint, QuantSpec(method="rtn", bits=4, group_size=64), Path(root))
print(json.dumps({"hit": result.info["cache_hit"], "path": str(result.path)}))
"""


def test_two_processes_asking_for_one_key_build_it_once(tiny_model, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tiny_model[0]), tiny_model[1], str(tmp_path / "c"),
                          str(ready[i]), str(ready[1 - i])], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(o["hit"] for o in outputs) == [False, True]
    assert outputs[0]["path"] == outputs[1]["path"]
    assert len(qz.cache_entries(tmp_path / "c")) == 1


def test_cache_entries_and_clear(tiny_model, tmp_path):
    a = quantize(*tiny_model, _spec("rtn", 4), tmp_path)
    b = quantize(*tiny_model, _spec("rtn", 8), tmp_path)
    entries = {e["key"]: e for e in qz.cache_entries(tmp_path)}
    assert set(entries) == {a.path.name, b.path.name}
    for e in entries.values():
        assert e["method"] == "rtn" and e["size"] > 1_000_000 and e["mtime"] > 0 and e["complete"]
    old = time.time() - 10 * 86400
    os.utime(a.path, (old, old))
    assert qz.clear_cache(tmp_path, older_than_days=5) == [a.path.name]
    assert [e["key"] for e in qz.cache_entries(tmp_path)] == [b.path.name]
    assert qz.clear_cache(tmp_path, max_size_gb=100) == []
    assert qz.clear_cache(tmp_path, max_size_gb=0.001) == [b.path.name]
    quantize(*tiny_model, _spec("rtn", 4), tmp_path)
    assert len(qz.clear_cache(tmp_path)) == 1 and qz.cache_entries(tmp_path) == []


# ----------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("spec,message", [
    (QuantSpec(method="hqq", bits=4), "unknown"),
    (QuantSpec(method="smoothquant", bits=4), "W8A8: bits must be 8"),
    (QuantSpec(method="smoothquant", symmetric=False), "symmetric"),
    (QuantSpec(method="rtn", bits=5, group_size=64), "bits must be one of 2, 3, 4, 8"),
    (QuantSpec(method="awq", bits=6, group_size=64), "bits must be one of 2, 3, 4, 8"),
    (QuantSpec(method="gptq", bits=None, group_size=64), "bits must be one of"),
    (QuantSpec(method="rtn", bits=4, group_size=1), "group_size"),
    (QuantSpec(method="gptq", bits=4, calibration=CalibrationSpec(dataset="wikitext")), "wikitext"),
    (QuantSpec(method="gptq", bits=4, calibration=CalibrationSpec(samples=0)), "samples"),
    (QuantSpec(method="rtn", bits=4, ignore=("re:.*",)), "no Linear layer left"),
    (QuantSpec(method="awq", bits=4, options=(("n_grids", 10),)), "unknown option 'n_grids'"),
    (QuantSpec(method="rtn", bits=4, options=(("n_grid", 10),)), r"unknown option 'n_grid' \(known: none\)"),
])
def test_impossible_requests_fail_with_one_line(tiny_model, tmp_path, spec, message):
    with pytest.raises(QuantizeError, match=message) as excinfo:
        quantize(*tiny_model, spec, tmp_path)
    assert "\n" not in str(excinfo.value)
    assert qz.cache_entries(tmp_path) == []


def test_missing_calibration_data_names_the_path(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("QMR_DATA_DIR", raising=False)
    empty = tmp_path / "data"
    empty.mkdir()
    spec = _spec("gptq", 4, calibration=CalibrationSpec(dataset="gsm8k", samples=4, seq_len=64))
    with pytest.raises(QuantizeError) as excinfo:
        quantize(*tiny_model, spec, tmp_path, data_dir=empty)
    assert str(empty / "gsm8k" / "train.jsonl") in str(excinfo.value) and "\n" not in str(excinfo.value)
    monkeypatch.setenv("QMR_DATA_DIR", str(empty))  # the env var is a data dir as well
    with pytest.raises(QuantizeError, match="gsm8k/train.jsonl"):
        quantize(*tiny_model, spec, tmp_path)


# ----------------------------------------------------------------------------- calibration data


def _gsm8k_dir(root: Path, n: int = 12) -> Path:
    rows = [{"question": f"Tom has {i} pens and buys {i + 2} more. How many pens?",
             "answer": f"He has {i}+{i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} pens.\n#### {2 * i + 2}"}
            for i in range(n)]
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_gsm8k_calibration_is_local_chat_formatted_and_seeded(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("hub used although a data dir was given")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model[0])
    data_dir = _gsm8k_dir(tmp_path / "data")
    spec = CalibrationSpec(dataset="gsm8k", samples=5, seq_len=48, seed=3)
    first = build_calibration(spec, tokenizer, data_dir)
    assert first.source == str(data_dir / "gsm8k" / "train.jsonl") and first.chat_template
    assert len(first.input_ids) == 5 and all(len(ids) <= 48 for ids in first.input_ids)
    text = tokenizer.decode(first.input_ids[0])
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text and "<<" not in text
    assert build_calibration(spec, tokenizer, data_dir).sha256 == first.sha256
    assert build_calibration(CalibrationSpec("gsm8k", 5, 48, seed=4), tokenizer, data_dir).sha256 != first.sha256
    assert build_calibration(CalibrationSpec("gsm8k", 5, 64, seed=3), tokenizer, data_dir).sha256 != first.sha256
    monkeypatch.setenv("QMR_DATA_DIR", str(data_dir))
    assert build_calibration(spec, tokenizer).sha256 == first.sha256
    with pytest.raises(CalibrationError, match="asks for 50"):
        build_calibration(CalibrationSpec("gsm8k", 50, 48), tokenizer, data_dir)


def test_qmr_arith_calibration_uses_the_benchmark_prompt(tiny_model):
    from transformers import AutoTokenizer

    from pytest_qmr import arith

    tokenizer = AutoTokenizer.from_pretrained(tiny_model[0])
    data = build_calibration(CalibrationSpec("qmr_arith", 3, 400, 1), tokenizer)
    problem = arith.generate("train", 3, seed=1)[0]
    text = tokenizer.decode(data.input_ids[0])
    assert arith.INSTRUCTION in text and problem.question in text and problem.solution() in text
    assert data.source.startswith("generated")


def test_gptq_calibrated_on_local_gsm8k(tiny_model, tmp_path):
    data_dir = _gsm8k_dir(tmp_path / "data")
    spec = _spec("gptq", 4, calibration=CalibrationSpec("gsm8k", 6, 64, 0))
    result = quantize(*tiny_model, spec, tmp_path, data_dir=data_dir)
    assert result.info["calibration"]["source"].endswith("gsm8k/train.jsonl")
    assert result.info["calibration"]["samples"] == 6
    # the same request with other calibration data is another entry
    _gsm8k_dir(tmp_path / "data2", n=20)
    other = quantize(*tiny_model, spec, tmp_path, data_dir=tmp_path / "data2")
    assert other.path != result.path and other.info["cache_hit"] is False


# ----------------------------------------------------------------------------- AWQ workaround


def test_awq_workaround_patches_only_the_awq_module_and_restores(monkeypatch):
    from llmcompressor.modifiers.transform.awq import base as awq_base
    from llmcompressor.pipelines import cache as cache_module

    original = awq_base.IntermediatesCache
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with qz.awq_cpu_workaround() as active:
        assert active is True
        assert awq_base.IntermediatesCache is not original
        assert issubclass(awq_base.IntermediatesCache, original)
        assert cache_module.IntermediatesCache is original  # pipelines untouched
        cache = awq_base.IntermediatesCache(None, None)
        cache.append({"x": torch.ones(2)})
        cache.pin_memory(0)  # a no-op instead of "Cannot access accelerator device"
        assert not cache.batch_intermediates[0]["x"].value.is_pinned()
    assert awq_base.IntermediatesCache is original


def test_awq_workaround_stays_out_of_the_way_on_gpus(monkeypatch):
    from llmcompressor.modifiers.transform.awq import base as awq_base

    original = awq_base.IntermediatesCache
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with qz.awq_cpu_workaround() as active:
        assert active is False and awq_base.IntermediatesCache is original


@pytest.mark.skipif(torch.cuda.is_available() or torch.accelerator.is_available(), reason="CPU-only failure")
def test_upstream_awq_still_fails_on_cpu_without_the_workaround(tiny_model):
    """If this starts passing, llmcompressor fixed pinning on CPU and the workaround can go."""
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    from pytest_qmr.models import load

    model, tokenizer = load(tiny_model[0])
    recipe = qz.effective_recipe(_spec("awq", 4))
    modifiers, _ = qz.build_recipe(model, recipe)
    data = build_calibration(CAL, tokenizer)
    try:
        with pytest.raises(RuntimeError, match="accelerator"):
            oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, dataset=data.dataset(),
                    num_calibration_samples=4, max_seq_length=64, shuffle_calibration_samples=False)
    finally:
        reset_session()


# ----------------------------------------------------------------------------- helpers, CLI


def test_fit_group_size():
    assert qz.fit_group_size(576, 128) == 64
    assert qz.fit_group_size(576, 64) == 64
    assert qz.fit_group_size(1536, 128) == 128
    assert qz.fit_group_size(96, 64) == 32
    assert qz.fit_group_size(96, 48) == 48
    assert qz.fit_group_size(100, 64) == 4
    assert qz.fit_group_size(97, 64) is None  # odd width: per channel (recorded as skipped)
    assert qz.fit_group_size(96, None) is None


def test_cli_quantize_and_cache(tiny_model, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="qmr")
    from pytest_qmr.cli import quantize as cli_quantize

    cli_quantize.add_cli(parser.add_subparsers(dest="command", required=True))

    def run(*argv) -> str:
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = run("quantize", "--model", str(tiny_model[0]), "--method", "rtn", "--bits", "4", "--group-size", "64",
              "--cache-dir", str(tmp_path))
    path = Path(out.strip().splitlines()[-1])
    assert (path / qz.INFO_FILE).is_file() and path.parent == tmp_path / "quantized"
    out = run("quantize", "--model", str(tiny_model[0]), "--method", "rtn", "--bits", "4", "--group-size", "64",
              "--cache-dir", str(tmp_path), "--compressed", "--out", str(tmp_path / "export"))
    assert out.strip() == str(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]
    from pytest_qmr.cli import main

    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--area", "quantized"]) == 0
    listing = capsys.readouterr().out
    assert path.name in listing and "rtn 4" in listing
    assert main(["cache", "clear", "--cache-dir", str(tmp_path), "--area", "quantized", "--older-than-days", "0"]) == 0
    assert "removed 1 of 1 entries" in capsys.readouterr().out
    assert qz.cache_entries(tmp_path) == []

    assert main(["quantize", "--model", str(tiny_model[0]), "--method", "smoothquant", "--bits", "4",
                 "--cache-dir", str(tmp_path)]) == 2
    assert "bits must be 8" in capsys.readouterr().err
