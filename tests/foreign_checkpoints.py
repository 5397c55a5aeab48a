"""Checkpoints made by the tools users make them with, the way a user's own script would — outside
pytest-qmr's quantize stage — for the tests and ``benchmarks/formats.py`` to gate:

``llmcompressor``
    a plain ``oneshot`` with ``GPTQModifier`` (W4A16: int4, symmetric, group 64 — the model's width
    576 takes no group of 128) and ``save_compressed=True``: a compressed-tensors checkpoint;
``gptq``
    gptqmodel's ``GPTQConfig(bits=4, group_size=64, sym=True, desc_act=False)``, GPTQ format
    (``quant_method: gptq``, what a hub ``-GPTQ-Int4`` release holds);
``awq``
    gptqmodel's ``AWQConfig(bits=4, group_size=64, sym=False)``, GEMM format (``quant_method:
    awq``, ``zero_point: true``, what a hub ``-AWQ`` release holds);
``gptq-asym``
    the GPTQ one with ``sym=False`` (a format vLLM's CPU build has no kernel for; benchmarks only).

Each runs in a subprocess of its own (as a user's script does; gptqmodel sets process-wide state),
on a few GSM8K training texts, and its output is kept content-addressed under
``<cache>/foreign/<tool>-<key>/`` (key: the source model's fingerprint, the tool, its settings and
version), built once under a file lock by whichever pytest-xdist worker asks first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOLS = ("llmcompressor", "gptq", "awq")  # what the tests gate
ALL_TOOLS = (*TOOLS, "gptq-asym")
SAMPLES, SEQ_LEN = 4, 128  # calibration: a few short texts (CI-sized; a real release uses hundreds)

SCRIPT = r'''
import json, os, sys
src, out, tool, data, samples, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), \
    int(sys.argv[6])
texts = []
with open(data, encoding="utf-8") as f:
    for line in f:
        row = json.loads(line)
        texts.append("Question: " + row["question"] + "\nAnswer: " + row["answer"])
        if len(texts) >= samples:
            break
import torch
if tool == "llmcompressor":
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(src)
    enc = tokenizer(texts, truncation=True, max_length=seq_len)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}})
    oneshot(model=model, recipe=recipe, dataset=Dataset.from_dict(dict(enc)), num_calibration_samples=samples,
            max_seq_length=seq_len)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
else:
    # gptqmodel on a 2-core machine: its default CPU worker pool (1) is smaller than its model-loader pool (2)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import AWQConfig, BACKEND, GPTQConfig, GPTQModel
    from gptqmodel.quantization import FORMAT
    if tool in ("gptq", "gptq-asym"):
        config = GPTQConfig(bits=4, group_size=64, sym=tool == "gptq", desc_act=False, format=FORMAT.GPTQ,
                            device="cpu")
        model, backend = GPTQModel.load(src, config, dtype=torch.float32), BACKEND.AUTO
    else:  # AWQ's CPU path packs with its torch kernel, in fp16 (AutoAWQ's convention)
        config = AWQConfig(bits=4, group_size=64, sym=False, format=FORMAT.GEMM, device="cpu")
        model, backend = GPTQModel.load(src, config, dtype=torch.float16), BACKEND.AWQ_TORCH
    model.quantize(texts, batch_size=1, backend=backend)
    model.save(out)
'''


def tool_version(tool: str) -> str:
    from importlib.metadata import version

    return version("llmcompressor" if tool == "llmcompressor" else "gptqmodel")


def build(tool: str, source: Path, fingerprint: str, data_dir: Path, cache_dir: Path) -> Path:
    """The checkpoint ``tool`` makes of ``source`` (built once, then reused while it is complete)."""
    from pytest_qmr.fsutil import atomic_directory, locked, sha256_json

    if tool not in ALL_TOOLS:
        raise ValueError(f"tool must be one of {ALL_TOOLS} (got {tool!r})")
    key = sha256_json({"source": fingerprint, "tool": tool, "version": tool_version(tool), "samples": SAMPLES,
                       "seq_len": SEQ_LEN, "script": SCRIPT})[:16]
    out = Path(cache_dir) / "foreign" / f"{tool}-{key}"
    with locked(out):
        if (out / "config.json").is_file():
            return out
        with atomic_directory(out) as scratch:
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(source).resolve()), str(scratch.resolve()),
                                   tool, str((Path(data_dir) / "gsm8k" / "train.jsonl").resolve()), str(SAMPLES),
                                   str(SEQ_LEN)],
                                  capture_output=True, text=True, env=env, timeout=1800,
                                  cwd=out.parent)  # gptqmodel writes a logs/ folder where it runs
            if done.returncode != 0 or not (scratch / "config.json").is_file():
                raise RuntimeError(f"{tool} did not write a checkpoint:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            json.loads((scratch / "config.json").read_text())["quantization_config"]  # it did quantize
    return out
