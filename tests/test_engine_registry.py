"""A generation engine is one class registered by name in ``registry.ENGINES``: a project's
``conftest.py`` registers its own (here an in-house OpenAI-compatible server the engine starts
itself, proves by its served name and stops at the session's end), and suites name it as a
``backend`` like a built-in one — checked with a did-you-mean, run through a real cell, recorded."""

from __future__ import annotations

import json

import pytest

from pytest_qmr.suite import SuiteError, parse_suite

MODEL = "smollm2-135m-arith"

# An in-house server: replays the committed FP baseline's answers (so the FP cell it answers must
# reproduce its baseline exactly), named after the checkpoint it serves, on loopback.
CONFTEST = '''
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pytest_qmr.engines import Engine
from pytest_qmr.engines.api import openai_lm, remote_model_name, served_name
from pytest_qmr.fsutil import sha256_text
from pytest_qmr.models import load_tokenizer
from pytest_qmr.registry import ENGINES

ANSWERS = {{item["prompt_sha256"]: item["response"]
           for item in json.load(open({baseline!r}))["items"].values()}}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({{"object": "list", "data": [{{"id": self.server.name, "object": "model"}}]}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = self.server.tokenizer.apply_chat_template(body["messages"], tokenize=False,
                                                          add_generation_prompt=True)
        self.server.requests += 1
        self._send({{"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
            {{"index": 0, "message": {{"role": "assistant", "content": ANSWERS[sha256_text(prompt)]}},
              "finish_reason": "stop"}}]}})


@ENGINES.register("inhouse")
class InHouse(Engine):
    """Our in-house server: the engine starts it, proves it serves the checkpoint, stops it."""

    api = True

    def __init__(self, host):
        super().__init__(host)
        self.server = None

    def identity(self, target):
        return {{"served": {{"endpoint": "inhouse", "model": served_name(target.fingerprint)}}}}

    def start(self, target):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.name, self.server.requests = served_name(target.fingerprint), 0
        self.server.tokenizer = load_tokenizer(target.path)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{{self.server.server_address[1]}}/v1/chat/completions"
        name = remote_model_name(url, {{}}, target.fingerprint, target.path)
        return openai_lm(url, name, {{}}, self.server.tokenizer.eos_token, 4, target.max_new_tokens, target.seed)

    def served(self, target):
        return {{"endpoint": "inhouse", "model": served_name(target.fingerprint), "engine": "in-house server",
                "requests": self.server.requests if self.server else 0}}

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            print("inhouse server stopped", flush=True)
'''

SUITE = """
name: engine-registry
data_dir: {data_dir}
models:
  - {{name: {model}, ref: embedded:{model}}}
quantizers:
  - {{name: fp, method: fp}}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: 8, seed: 0}}
thresholds: {{min_items: 8, sequential: false}}
locate: {{enabled: false}}
generation: {{max_new_tokens: 96, batch_size: 20, backend: {backend}}}
"""


def test_a_registered_engine_answers_a_real_cell(pytester, data_dir, cache_dir, repo_root, lab_model, tmp_path):
    pytester.makeconftest(CONFTEST.format(baseline=str(repo_root / "baselines" / MODEL / "arith.json")))
    suite = pytester.makefile(".yaml", engines=SUITE.format(data_dir=data_dir, model=MODEL, backend="inhouse"))
    run_dir = tmp_path / "run"
    result = pytester.runpytest_subprocess(str(suite), f"--qmr-baselines={repo_root / 'baselines'}",
                                           f"--qmr-run-dir={run_dir}", f"--qmr-cache-dir={cache_dir}",
                                           "--qmr-no-cache", "-p", "no:cacheprovider", "-rA", "-s")
    result.assert_outcomes(passed=1)
    cell = json.loads((run_dir / "cells" / f"{MODEL}-fp-arith" / "result.json").read_text())
    assert cell["backend"] == "inhouse" and cell["gate"]["verdict"] == "pass" and cell["n"] == 8
    assert cell["gate"]["fp_only"] == cell["gate"]["quant_only"] == 0  # the baseline's answers, exactly
    assert cell["served"] == {"endpoint": "inhouse", "model": f"qmr-{lab_model.fingerprint}",
                              "engine": "in-house server", "requests": 8}
    result.stdout.fnmatch_lines(["*inhouse server stopped*"])  # stopped by the session's end


def test_an_unregistered_engine_is_one_line_with_a_did_you_mean(data_dir):
    import yaml

    with pytest.raises(SuiteError) as err:
        parse_suite(yaml.safe_load(SUITE.format(data_dir=data_dir, model=MODEL, backend="vlm")), source="s.yaml")
    assert str(err.value) == "s.yaml: generation.backend: must be one of hf, vllm, openai, did you mean 'vllm'? " \
                             "(got 'vlm')"
