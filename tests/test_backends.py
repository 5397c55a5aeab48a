"""Generation backends: the openai backend (a real ``qmr serve`` on loopback, started by the session)
against the in-process hf backend on the same qmr_arith items; the vllm error; per-worker devices
and endpoints under pytest-xdist."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pytest_qmr.engines import api, devices
from pytest_qmr.engines.api import configured_base_url
from pytest_qmr.engines.devices import for_worker, pin_worker_device, visible_gpus, worker_device, xdist_worker_index
from pytest_qmr.engines.servers import chat_completions_url
from pytest_qmr.models import ModelError

N_ITEMS = 8
SUITE = """
name: backends
data_dir: {data_dir}
models:
  - name: smollm2-135m-arith
    ref: embedded:smollm2-135m-arith
quantizers:
  - name: fp
    method: fp
benchmarks:
  - name: arith
    task: qmr_arith
    limit: {limit}
    seed: 0
thresholds:
  min_items: {limit}
  sequential: false
locate:
  enabled: false
generation:
  max_new_tokens: 96      # the committed baseline's settings (its provenance is checked)
  batch_size: 20
  backend: openai
"""


# --------------------------------------------------------------------------------- workers


@pytest.mark.parametrize("value, index", [("gw0", 0), ("gw7", 7), ("gw12", 12), ("", None), ("master", None),
                                          ("gwx", None)])
def test_xdist_worker_index(value, index):
    assert xdist_worker_index({"PYTEST_XDIST_WORKER": value}) == index
    assert xdist_worker_index({}) is None


def test_devices_round_robin_over_visible_gpus():
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5,7"})
    assert gpus == ["2", "5", "7"]
    assert [worker_device(gpus, w) for w in range(5)] == ["2", "5", "7", "2", "5"]
    assert worker_device(gpus, None) is None  # not under xdist: leave the devices alone
    assert worker_device([], 3) is None  # no GPU: nothing to pin
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] == visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"})


def test_visible_gpus_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    assert visible_gpus({}) == []


def test_pin_worker_device_sets_cuda_visible_devices_once():
    env = {"PYTEST_XDIST_WORKER": "gw3", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert pin_worker_device(env) == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert pin_worker_device(env) == "1" and env["CUDA_VISIBLE_DEVICES"] == "1"  # not re-split to "1" of ["1"]
    controller = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert pin_worker_device(controller) is None and controller == {"CUDA_VISIBLE_DEVICES": "0,1"}


def test_base_url_per_worker_and_normalised():
    urls = "http://a:8000, http://b:8001/v1/ ,http://c:8002/v1/chat/completions"
    assert configured_base_url({"QMR_OPENAI_BASE_URL": urls}) == "http://a:8000/v1/chat/completions"
    picked = [configured_base_url({"QMR_OPENAI_BASE_URL": urls, "PYTEST_XDIST_WORKER": f"gw{w}"}) for w in range(4)]
    assert picked == ["http://a:8000/v1/chat/completions", "http://b:8001/v1/chat/completions",
                      "http://c:8002/v1/chat/completions", "http://a:8000/v1/chat/completions"]
    assert configured_base_url({}) is None and configured_base_url({"QMR_OPENAI_BASE_URL": " , "}) is None
    assert chat_completions_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert for_worker(["x"], 9) == "x"


def test_vllm_backend_without_vllm_is_one_line(monkeypatch, tmp_path):
    import importlib.util

    from pytest_qmr.engines.servers import VLLM_PYTHON_ENV, vllm_python
    from pytest_qmr.registry import ENGINES

    real = importlib.util.find_spec
    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ModelError, match=r"^backend vllm needs a vLLM install in its own environment: run `qmr "
                                         r"vllm-env` here") as err:
        vllm_python()  # what the vllm engine asks first
    assert "\n" not in str(err.value)
    monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(ModelError, match=r"^QMR_VLLM_PYTHON: no Python interpreter at '.*nowhere/python'"):
        vllm_python()
    with pytest.raises(ValueError, match="unknown generation backend"):
        ENGINES.get("tgi")


# --------------------------------------------------------------------------------- hf vs openai


def _generated_tokens(tokenizer, records) -> int:
    return sum(len(tokenizer(r.response, add_special_tokens=False)["input_ids"]) for r in records)


@pytest.mark.slow  # ~90 s on 2 shared cores: a server start + 8 items served + 8 items in process
def test_openai_backend_matches_hf_item_by_item(lab_model, data_dir, cache_dir, repo_root, tmp_path, monkeypatch,
                                                capsys, one_torch_thread):
    import torch

    from pytest_qmr import models
    from pytest_qmr.fsutil import sha256_text
    from pytest_qmr.measure import Evaluator, GenerationSettings
    from pytest_qmr.records import SampleRecord
    from pytest_qmr.session import QmrSession
    from pytest_qmr.suite import load_suite

    assert torch.get_num_threads() == 1  # the server gets the same single thread (ServedCheckpoint copies it)
    monkeypatch.delenv("QMR_OPENAI_BASE_URL", raising=False)
    suite_file = tmp_path / "backends.yaml"
    suite_file.write_text(SUITE.format(data_dir=data_dir, limit=N_ITEMS))
    (cell,) = load_suite(suite_file).cells()
    session = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=repo_root / "baselines",
                         data_dir=data_dir, cache_dir=cache_dir, use_cache=False)  # every item through the server

    # openai: the session starts qmr serve for the checkpoint and goes through lm-eval's local-chat-completions
    result = session.run_cell(cell)
    served = [SampleRecord.from_dict(json.loads(line)) for line in Path(result.samples_path).read_text().splitlines()]
    pool = session._servers
    server = pool.current
    openai_s = result.seconds["evaluate"] - server.startup_seconds  # generation only, not the server's start
    assert pool.started == 1 and server is not None and server.proc.poll() is None
    assert server.spec()["dtype"] == "float32" and any("(cpu float32) listening on" in line for line in server._log)

    # hf: the same items in process, batched as the suite says
    model, tokenizer = models.load(lab_model.path)
    generation = GenerationSettings(max_new_tokens=96, batch_size=20)
    started = time.monotonic()
    local = Evaluator(model, tokenizer, generation, data_dir).run("qmr_arith", indices=[r.doc_index for r in served])
    hf_s = time.monotonic() - started

    assert [r.item_id for r in served] == [r.item_id for r in local] and len(served) == N_ITEMS
    # same prompt text (the server's chat template = the one HFLM applies), so the baseline's hashes hold
    baseline = json.loads((repo_root / "baselines" / "smollm2-135m-arith" / "arith.json").read_text())["items"]
    assert all(sha256_text(r.prompt) == baseline[r.item_id]["prompt_sha256"] for r in served)
    assert [r.prompt for r in served] == [r.prompt for r in local]
    assert [(r.extracted, r.correct) for r in served] == [(r.extracted, r.correct) for r in local]
    # Greedy text: hf runs the 8 prompts as one left-padded batch, the server one unpadded prompt at a
    # time, so fp32 logits differ in the last bits (padding changes the matmul shapes / summation order)
    # and a near-tie between two tokens could flip. On this model and these items all texts agree;
    # we require >= 7 of 8 so that a single tie flip is not a failure, while answers must agree exactly.
    same_text = sum(a.response == b.response for a, b in zip(served, local, strict=True))
    assert same_text >= N_ITEMS - 1, [(a.response, b.response) for a, b in zip(served, local, strict=True)
                                      if a.response != b.response]
    assert result.accuracy == sum(r.correct for r in local) / N_ITEMS

    # consecutive cells of the same checkpoint reuse the server
    session.evaluator(lab_model.path, cell)
    assert pool.started == 1 and pool.current is server

    # the per-server key is required and never on the command line
    import httpx

    models_url = server.url.replace("/chat/completions", "/models")
    assert httpx.get(models_url).status_code == 401
    headers = {"Authorization": f"Bearer {server.api_key}"}
    assert api.remote_model_name(server.url, headers, lab_model.fingerprint, env={}) == \
        f"qmr-{lab_model.fingerprint}" == result.served["model"]
    cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert server.api_key not in cmdline

    # a user-given endpoint (QMR_OPENAI_BASE_URL / QMR_OPENAI_API_KEY) is used as is: no new server
    monkeypatch.setenv("QMR_OPENAI_BASE_URL", server.url.replace("/v1/chat/completions", ""))
    monkeypatch.setenv("QMR_OPENAI_API_KEY", server.api_key)
    again = session.evaluator(lab_model.path, cell).run("qmr_arith", indices=[served[0].doc_index])
    assert pool.started == 1 and again[0].response == served[0].response

    assert not [f for f in (tmp_path / "run").rglob("*") if f.is_file() and server.api_key in f.read_text()]

    tokens = _generated_tokens(tokenizer, local)
    with capsys.disabled():
        print(f"\n[backends] {N_ITEMS} qmr_arith items, max_new_tokens 96, 1 CPU thread, {tokens} generated tokens: "
              f"hf {hf_s:.1f}s = {tokens / hf_s:.2f} tok/s (batch 20); openai {openai_s:.1f}s = "
              f"{tokens / openai_s:.2f} tok/s one request at a time (+{server.startup_seconds:.1f}s server start); "
              f"identical texts {same_text}/{N_ITEMS}")

    proc = server.proc
    pool.close()
    assert server.proc is None and pool.current is None and proc.poll() is not None


ORPHAN = """
import os, sys
from pathlib import Path
from pytest_qmr.engines.servers import ServedCheckpoint
server = ServedCheckpoint(Path(sys.argv[1]), threads=1).start()
print(server.proc.pid, flush=True)
os._exit(0)  # dies without closing the server, as a killed pytest would
"""


def test_started_server_does_not_outlive_a_dead_session(lab_model, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", ORPHAN, str(lab_model.path)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    pid = int(out.stdout.split()[-1])
    deadline = time.time() + 30
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid), f"qmr serve {pid} outlived its session"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


BUILDING = """
import sys, time
sys.path.insert(0, sys.argv[1])
import vllm_env
with vllm_env.building(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def test_the_vllm_engine_waits_for_a_build_in_progress(tmp_path):
    """`qmr vllm-env --background` holds the build lock while it installs: asked for vLLM's
    environment meanwhile, the engine waits for the build instead of failing (and stops waiting
    at its limit)."""
    import subprocess
    import sys

    from pytest_qmr.engines import vllm_env

    env_dir = tmp_path / ".venv-vllm"
    assert vllm_env.wait_for_build(env_dir, 0.1) and not vllm_env.building_now(env_dir)  # no build: at once
    engines = str(Path(vllm_env.__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", BUILDING, engines, str(env_dir), "3"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert vllm_env.building_now(env_dir)
        assert vllm_env.wait_for_build(env_dir, 0.5) is False  # still building at the limit
        started = time.monotonic()
        assert vllm_env.wait_for_build(env_dir, 30) is True
        assert 1.0 < time.monotonic() - started < 10 and proc.wait(10) == 0 and not vllm_env.building_now(env_dir)
    finally:
        proc.kill()
        proc.stdout.close()
