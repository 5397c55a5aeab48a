"""Shared fixtures: real data from the configured data dir, one model cache for the whole run."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set, as ``.ci/run`` runs) a skip is a failure: a missing data file, browser
    or package must not quietly turn a test into a skip that counts as nothing."""
    report = yield
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {reason}"
    return report

REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config) -> list[str]:
    """The machine the tests ran on, at the top of the output (CI shows its head): the numerics of
    the engines depend on the CPU's vector extensions, and a full disk or tight memory fails many
    tests at once."""
    import shutil

    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    model = ""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "bf16") if f in flags]
    memory = ""
    if Path("/proc/meminfo").is_file():
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        memory = f", memory {int(info['MemAvailable'].split()[0]) / 2**20:.1f} GiB available"
    basetemp = Path(os.environ.get("TMPDIR", "/tmp"))
    free = {str(where): f"{shutil.disk_usage(where).free / 2**30:.1f}" for where in (REPO, basetemp)}
    disk = ", ".join(f"{where} {gib} GiB free" for where, gib in free.items())
    return [f"machine: {model or 'unknown CPU'}, {os.cpu_count()} cores ({' '.join(isa) or 'no listed ISA'})"
            f"{memory}; disk: {disk}"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("QMR_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"benchmark data not found at {path} (set QMR_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The real model cache (built models are reused across tests and the smoke suite)."""
    path = Path(os.environ.get("QMR_CACHE_DIR", REPO / ".qmr-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def lab_model(cache_dir):
    """The embedded lab model (SmolLM2-135M + committed arith adapter), built once."""
    from pytest_qmr import models

    return models.resolve("embedded:smollm2-135m-arith", cache_dir)


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test that runs a model beside a server or other processes; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_tiny_llama(out: Path, tokenizer_dir: Path, *, hidden: int = 96, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 256, seed: int = 0) -> tuple[Path, str]:
    """A random Llama small enough to quantize or train in seconds, with the embedded model's
    tokenizer, saved as fp32 safetensors; returns (directory, weights fingerprint)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pytest_qmr import models

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out, models.checkpoint_fingerprint(out)


@pytest.fixture(scope="session")
def make_tiny_llama():
    """:func:`build_tiny_llama` for fixtures of other modules (conftest is not imported directly)."""
    return build_tiny_llama


class _Replay(BaseHTTPRequestHandler):
    """OpenAI-compatible chat completions that replay the FP baseline's response per prompt."""

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/").endswith("/v1/models"):
            listed = [{"id": name, "object": "model"} for name in self.server.names]
            return self._send(200, {"object": "list", "data": listed})
        return self._send(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body["model"])
        self.server.bodies.append(body)
        self.server.authorizations.append(self.headers.get("Authorization"))
        if self.server.fail:
            return self._send(500, {"error": {"message": "internal error"}})
        prompt = self.server.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        text = self.server.responses.get(_sha256(prompt), "I do not know.")
        text = self.server.serve(_sha256(prompt), text)
        return self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


@pytest.fixture
def replay_server(repo_root, lab_model):
    """A user's OpenAI-compatible server on loopback, named after the lab model, that replays the
    committed FP baseline's response to each prompt (so a cell it answers is the FP model's,
    exactly); ``fail`` makes every generation a 500, ``requests`` / ``authorizations`` / ``bodies`` are
    what came; ``serve(prompt_sha256, response)`` may rewrite what is served (a thinking model's trace)."""
    from pytest_qmr.models import load_tokenizer

    items = json.loads((repo_root / "baselines" / "smollm2-135m-arith" / "arith.json").read_text())["items"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    server.tokenizer = load_tokenizer(lab_model.path)
    server.responses = {item["prompt_sha256"]: item["response"] for item in items.values()}
    server.names, server.requests, server.authorizations, server.fail = [f"qmr-{lab_model.fingerprint}"], [], [], False
    server.bodies, server.serve = [], lambda prompt_sha256, response: response
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def _sha256(text: str) -> str:
    from pytest_qmr.fsutil import sha256_text

    return sha256_text(text)
