"""LLM judges: parsing and validation, retries against a fault-injecting endpoint, the real
``qmr serve`` endpoint with the embedded model, the local judge, and no API key leaks anywhere."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from pytest_qmr import cli

from pytest_qmr.locate import judges
from pytest_qmr.locate.judges import (Case, JudgeConfig, JudgeFileError, JudgeOutputError, LocalJudge,
                                      OpenAIJudge, RuleJudge, build_messages, parse_judge_settings, parse_verdict,
                                      redact)

FAKE_KEY = "sk-qmrtest-ZX9Q-distinctive-7c1e5a0b44"
KEY_ENV = "QMR_TEST_JUDGE_KEY"
REPO = Path(__file__).resolve().parents[1]

STEPS3 = "Step 1: 3 * 4 = 12\nStep 2: 12 + 5 = 18\nStep 3: 18 / 2 = 9\nThe answer is 9"


def _case(cid: str, response: str = STEPS3, **kw) -> Case:
    return Case(cid, kw.get("problem", f"CASE-{cid}: compute (3*4+5)/2"), response, kw.get("gold", "8.5"),
                kw.get("reference", "Step 1: 3 * 4 = 12\nStep 2: 12 + 5 = 17\nStep 3: 17 / 2 = 8.5\nThe answer is 8.5"))


# --------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ('{"primary_error_type": "computational_error", "error_step": 2, "explanation": "12+5 is 17", '
     '"confidence_score": 0.9}', ("computational_error", 2, 0.9)),
    ('Here is my verdict:\n```json\n{"primary_error_type": "Computational Error", "error_step": "Step 2", '
     '"explanation": "x", "confidence_score": 85}\n```\nDone.', ("computational_error", 2, 0.85)),
    ('I think {"primary_error_type": "procedural_error", "error_step": 1, "explanation": "a {brace}"} is it',
     ("procedural_error", 1, None)),
    ('```\n{"primary_error_type": "Formula/Rule Error", "error_step": 3.0, "confidence_score": "70%"}\n```',
     ("formula_rule_error", 3, 0.7)),
    ('{"primary_error_type": "no_error", "error_step": -1, "explanation": "5.5 is 11/2"}', ("no_error", -1, None)),
    ('{"primary_error_type": null, "error_step": null}', ("no_error", -1, None)),
])
def test_parse_verdict_accepts(text, expected):
    out = parse_verdict(text, n_steps=3)
    assert (out.primary_error_type, out.error_step, out.confidence_score) == expected


@pytest.mark.parametrize("text, kind, fragment", [
    ("", "malformed", "empty"),
    ("Step 2 is wrong because 12 + 5 is 17.", "malformed", "no JSON object"),
    ('```json\n{"primary_error_type": "computational_error", "error_step": 2,\n```', "malformed", "no JSON"),
    ('{"primary_error_type": "arithmetic_slip", "error_step": 2}', "schema", "primary_error_type"),
    ('{"primary_error_type": "computational_error", "error_step": 4}', "schema", "outside 1..3"),
    ('{"primary_error_type": "computational_error", "error_step": 0}', "schema", "outside 1..3"),
    ('{"primary_error_type": "computational_error"}', "schema", "error_step"),
    ('{"error_type": "computational_error", "step": 2}', "schema", "primary_error_type"),
    ('{"primary_error_type": "computational_error", "error_step": -1}', "schema", "no_error"),
    ('{"primary_error_type": "computational_error", "error_step": 2, "confidence_score": 250}', "schema",
     "confidence_score"),
    ('[1, 2, 3]', "malformed", "no JSON object"),
])
def test_parse_verdict_rejects(text, kind, fragment):
    with pytest.raises(JudgeOutputError) as err:
        parse_verdict(text, n_steps=3)
    assert err.value.kind == kind
    assert fragment in str(err.value)


def test_prompt_has_problem_gold_reference_and_numbered_steps():
    system, user = build_messages(_case("p1"))
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    for needle in ("CASE-p1", "## Gold answer\n8.5", "12 + 5 = 17", "[Step 1] 3 * 4 = 12", "[Step 3] 18 / 2 = 9",
                   "3 numbered steps", "Final answer as written: The answer is 9", "<integer 1..3>",
                   '"primary_error_type"', '"confidence_score"', "symbolic_manipulation_error (execution)"):
        assert needle in text, needle


def test_redact():
    assert FAKE_KEY not in redact(f"bad key {FAKE_KEY}!", FAKE_KEY)
    assert redact("Authorization: Bearer abc.def-123 rest") == "Authorization: Bearer [REDACTED] rest"


def test_judge_settings_parsing(tmp_path):
    cfg = tmp_path / "judges.yaml"
    cfg.write_text(
        "primary: big\n"
        "judges:\n"
        "  - {name: big, base_url: 'http://127.0.0.1:9/v1/', model: m, api_key_env: OPENAI_API_KEY, concurrency: 8}\n"
        "  - {name: small, kind: local, model: 'embedded:smollm2-135m', max_tokens: 64}\n"
        "policy: {name: majority, match_step: false}\n")
    settings = judges.load_judge_settings(cfg)
    assert list(settings.judges) == ["big", "small"] and settings.primary == "big"
    assert settings.judges["big"].endpoint == "http://127.0.0.1:9/v1/chat/completions"
    assert JudgeConfig(name="x", base_url="http://h:1", model="m").endpoint == "http://h:1/v1/chat/completions"
    assert settings.policy == {"name": "majority", "match_step": False}
    # the mapping form works too
    assert list(parse_judge_settings({"judges": {"a": {"base_url": "http://h", "model": "m"}}}).judges) == ["a"]


@pytest.mark.parametrize("data, fragment", [
    ({"judges": [{"name": "a", "base_url": "http://h", "model": "m", "api_key_env": FAKE_KEY}]},
     "NAME of an environment"),
    ({"judges": [{"name": "a", "model": "m"}]}, "needs base_url"),
    ({"judges": [{"name": "a", "base_url": "ftp://h", "model": "m"}]}, "http"),
    ({"judges": [{"name": "rule", "base_url": "http://h", "model": "m"}]}, "name"),
    ({"judges": [{"name": "a", "base_url": "http://h", "model": "m", "retries": 3}]}, "retries"),
    ({"judges": [], "primary": "zzz"}, "primary 'zzz'"),
    ({"judge": []}, "unknown key 'judge'"),
])
def test_judge_settings_errors_are_one_line_and_never_echo_a_key(data, fragment):
    with pytest.raises(JudgeFileError) as err:
        parse_judge_settings(data, "judges.yaml")
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg and FAKE_KEY not in msg


# --------------------------------------------------------------------------------- fault server


def _verdict(step: int, kind: str = "computational_error") -> str:
    return json.dumps({"primary_error_type": kind, "error_step": step, "explanation": f"step {step} is off",
                       "confidence_score": 0.8})


class _FaultHandler(BaseHTTPRequestHandler):
    """An OpenAI-ish endpoint that misbehaves by script: case id -> behaviour per attempt."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _chat(self, content: str) -> bytes:
        return json.dumps({"id": "x", "object": "chat.completion", "model": "fault",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 100, "completion_tokens": 20}}).encode()

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        auth = self.headers.get("Authorization")
        with srv.lock:
            srv.seen.append({"auth": auth, "body": body.decode()})
        match = re.search(r"CASE-(\w+)", body.decode())
        case = match.group(1) if match else "default"
        with srv.lock:
            attempt = srv.attempts.get(case, 0)
            srv.attempts[case] = attempt + 1
        script = srv.script.get(case, ["ok:2"])
        action = script[min(attempt, len(script) - 1)]
        if action.startswith("ok:"):
            return self._reply(200, self._chat(_verdict(int(action[3:]))))
        if action == "fenced":
            return self._reply(200, self._chat(f"Sure.\n```json\n{_verdict(1, 'procedural_error')}\n```"))
        if action == "no_error":
            return self._reply(200, self._chat('{"primary_error_type": "no_error", "error_step": -1, '
                                               '"explanation": "9 equals 9.0", "confidence_score": 0.6}'))
        if action == "timeout":
            time.sleep(srv.hang)
            return self._reply(200, self._chat(_verdict(2)))
        if action == "500":
            return self._reply(500, b'{"error": {"message": "overloaded"}}')
        if action == "500-echo":  # a careless server that echoes the request headers in its error
            return self._reply(500, json.dumps({"error": {"message": f"boom; got Authorization: {auth}"}}).encode())
        if action == "429":
            return self._reply(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0.05"})
        if action == "401":
            return self._reply(401, b'{"error": {"message": "invalid api key"}}')
        if action == "malformed":
            return self._reply(200, self._chat("The first error is in step 2, where 12 + 5 becomes 18."))
        if action == "wrong-schema":
            return self._reply(200, self._chat('{"error_type": "math", "step": "second"}'))
        if action == "bad-body":
            return self._reply(200, b"<html>gateway</html>")
        raise AssertionError(action)


@pytest.fixture
def fault_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FaultHandler)
    server.daemon_threads = True
    server.handle_error = lambda request, client_address: None  # a hung reply's broken pipe is the test's point
    server.lock, server.seen, server.attempts, server.script, server.hang = threading.Lock(), [], {}, {}, 1.5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def _config(url: str, **kw) -> JudgeConfig:
    base = dict(name="fault", base_url=url, model="fault-model", api_key_env=KEY_ENV, timeout=0.5, max_retries=2,
                concurrency=3, backoff=0.01, backoff_max=0.05)
    return JudgeConfig(**{**base, **kw})


def test_faults_are_retried_or_unjudged_and_never_lose_other_cases(fault_server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    fault_server.script = {
        "ok": ["ok:2"], "five": ["500", "ok:3"], "slow": ["timeout", "ok:1"], "garbled": ["malformed", "ok:2"],
        "schema": ["wrong-schema"], "fenced": ["fenced"], "denied": ["401"], "echo": ["500-echo"],
        "busy": ["429", "ok:2"], "html": ["bad-body", "ok:2"], "right": ["no_error"],
    }
    cases = [_case(c) for c in fault_server.script]
    judge = OpenAIJudge(_config(fault_server.url))
    done = []
    caplog.set_level(logging.DEBUG)
    votes = judge.judge_many(cases, on_done=lambda i, v: done.append(i))
    judge.close()
    assert sorted(done) == list(range(len(cases)))
    got = {c.id: v for c, v in zip(cases, votes, strict=True)}
    assert [v.judge for v in votes] == ["fault"] * len(cases)
    assert (got["ok"].status, got["ok"].error_step, got["ok"].attempts) == ("error", 2, 1)
    assert got["ok"].usage == {"prompt_tokens": 100, "completion_tokens": 20}
    assert (got["five"].status, got["five"].error_step, got["five"].attempts) == ("error", 3, 2)
    assert (got["slow"].status, got["slow"].error_step, got["slow"].attempts) == ("error", 1, 2)
    assert (got["garbled"].status, got["garbled"].attempts) == ("error", 2)
    assert (got["busy"].status, got["busy"].attempts) == ("error", 2)
    assert (got["html"].status, got["html"].attempts) == ("error", 2)
    assert (got["fenced"].primary_error_type, got["fenced"].error_step) == ("procedural_error", 1)
    assert (got["right"].status, got["right"].error_step, got["right"].primary_error_type) == ("no_error", -1, None)
    schema = got["schema"]
    assert (schema.status, schema.attempts) == ("unjudged", 3)
    assert "gave up after 3 attempt(s)" in schema.reason and "wrong schema" in schema.reason
    assert schema.raw and "error_type" in schema.raw
    denied = got["denied"]
    assert (denied.status, denied.attempts) == ("unjudged", 1) and "HTTP 401" in denied.reason
    echo = got["echo"]
    assert echo.status == "unjudged" and "HTTP 500" in echo.reason and "[REDACTED]" in echo.reason
    # the key went out in the Authorization header, and only there
    assert {s["auth"] for s in fault_server.seen} == {f"Bearer {FAKE_KEY}"}
    assert not any(FAKE_KEY in s["body"] for s in fault_server.seen)
    sent = json.loads(fault_server.seen[0]["body"])
    assert sent["model"] == "fault-model" and sent["max_tokens"] == 1024 and sent["temperature"] == 0.0
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    everything = json.dumps([v.to_dict() for v in votes]) + caplog.text
    assert FAKE_KEY not in everything


def test_request_body_options(fault_server):
    judge = OpenAIJudge(_config(fault_server.url, api_key_env=None, temperature=None,
                                token_param="max_completion_tokens", max_tokens=99,
                                extra_body={"response_format": {"type": "json_object"}}))
    assert judge.judge(_case("ok")).status == "error"
    judge.close()
    sent = json.loads(fault_server.seen[0]["body"])
    assert fault_server.seen[0]["auth"] is None
    assert sent["max_completion_tokens"] == 99 and "max_tokens" not in sent and "temperature" not in sent
    assert sent["response_format"] == {"type": "json_object"}
    with pytest.raises(ValueError, match="extra_body may not set model"):
        _config(fault_server.url, extra_body={"model": "other"})


def test_endpoint_down_is_unjudged(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    judge = OpenAIJudge(_config(f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=1))
    t0 = time.perf_counter()
    votes = judge.judge_many([_case("a"), _case("b")])
    judge.close()
    assert time.perf_counter() - t0 < 10
    assert [v.status for v in votes] == ["unjudged", "unjudged"]
    assert all("connection" in v.reason and v.attempts == 2 for v in votes)


def test_missing_key_env_is_unjudged_at_once(fault_server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = OpenAIJudge(_config(fault_server.url))
    vote = judge.judge(_case("ok"))
    judge.close()
    assert vote.status == "unjudged" and KEY_ENV in vote.reason and "not set" in vote.reason
    assert fault_server.seen == []  # nothing was sent without the key


def test_backoff_doubles_and_honours_retry_after(fault_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    fault_server.script = {"a": ["500", "500", "500", "ok:1"], "b": ["429", "ok:1"]}
    slept: list[float] = []
    judge = OpenAIJudge(_config(fault_server.url, max_retries=3, backoff=1.0, backoff_max=30.0), sleep=slept.append)
    assert judge.judge(_case("a")).attempts == 4
    assert len(slept) == 3 and all(b / a > 1.5 for a, b in zip(slept, slept[1:], strict=False))
    assert 1.0 <= slept[0] <= 1.25 and 4.0 <= slept[2] <= 5.0
    slept.clear()
    judge2 = OpenAIJudge(_config(fault_server.url, max_retries=3, backoff=0.01, backoff_max=30.0), sleep=slept.append)
    assert judge2.judge(_case("b")).status == "error"
    assert slept and slept[0] >= 0.05  # Retry-After
    judge.close()
    judge2.close()


def test_empty_response_is_unjudged_without_a_request(fault_server):
    judge = OpenAIJudge(_config(fault_server.url, api_key_env=None))
    vote = judge.judge(_case("x", response="   "))
    judge.close()
    assert vote.status == "unjudged" and "no steps" in vote.reason and fault_server.seen == []


def test_rule_judge_votes():
    assert RuleJudge().judge(_case("r")).to_dict() | {"latency_s": 0} == {
        "judge": "rule", "status": "error", "error_step": 2, "primary_error_type": "computational_error",
        "explanation": "step 2: 12 + 5 = 18 is false; the computation gives 17", "confidence_score": None,
        "reason": None, "attempts": 1, "latency_s": 0, "usage": {}, "raw": None}
    abstain = RuleJudge().judge(_case("r", response="Step 1: Add them.\nStep 2: Halve it.\nThe answer is 9"))
    assert abstain.status == "abstain" and abstain.reason == "no_verdict" and not abstain.has_verdict


class _StubChat:
    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def complete(self, messages, max_tokens, temperature, seed=None, **kw):
        from pytest_qmr.engines.serve import Completion

        self.calls.append((temperature, seed))
        return Completion(self.answers.pop(0), 50, 10, "stop")


def test_local_judge_retries_by_sampling():
    stub = _StubChat(["no json here", _verdict(3)])
    judge = LocalJudge(JudgeConfig(name="tiny", kind="local", model="embedded:smollm2-135m", max_retries=2),
                       chat_model=stub)
    vote = judge.judge(_case("l"))
    assert (vote.status, vote.error_step, vote.attempts) == ("error", 3, 2)
    assert stub.calls == [(0.0, None), (0.7, 1)]  # greedy first, then a seeded sample
    assert vote.usage == {"prompt_tokens": 100, "completion_tokens": 20}


# --------------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir):
    """``qmr serve`` with the embedded base model, in a subprocess on a free port."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, KEY_ENV: FAKE_KEY, "QMR_CACHE_DIR": str(cache_dir)}
    with open(log, "w") as stderr:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_qmr.engines.serve", "--model", "embedded:smollm2-135m", "--port", "0",
             "--api-key-env", KEY_ENV, "--served-name", "smol", "--threads", "1"],  # 1: fast on a shared CPU
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    url = None
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"listening on (http://\S+)/v1", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        pytest.fail(f"qmr serve did not start: {log.read_text()[-2000:]}")
    yield {"url": url, "proc": proc, "log": log}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()  # else an unclosed-file ResourceWarning when the Popen is collected


def _auth():
    return {"Authorization": f"Bearer {FAKE_KEY}"}


def test_serve_models_health_and_key_check(served):
    url = served["url"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    models = httpx.get(f"{url}/v1/models", headers=_auth()).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["smol"]
    denied = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
])
def test_serve_rejects_bad_requests(served, body, param):
    resp = httpx.post(f"{served['url']}/v1/chat/completions", json=body, headers=_auth())
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    bad_json = httpx.post(f"{served['url']}/v1/chat/completions", content=b"{nope", headers=_auth())
    assert bad_json.status_code == 400


def test_serve_chat_completion_greedy_and_stop(served):
    url = f"{served['url']}/v1/chat/completions"
    body = {"model": "smol", "messages": [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
            "max_tokens": 12}
    first = httpx.post(url, json=body, headers=_auth(), timeout=60).json()
    again = httpx.post(url, json=body, headers=_auth(), timeout=60).json()
    text = first["choices"][0]["message"]["content"]
    assert first["object"] == "chat.completion" and first["model"] == "smol"
    assert text == again["choices"][0]["message"]["content"]  # greedy is deterministic
    assert first["usage"]["completion_tokens"] <= 12 and first["usage"]["prompt_tokens"] > 5
    assert first["usage"]["total_tokens"] == first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert first["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(text.strip()) >= 6
    stop = text.strip()[3:6]
    cut = httpx.post(url, json={**body, "stop": [stop]}, headers=_auth(), timeout=60).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    sampled = httpx.post(url, json={**body, "temperature": 0.8, "seed": 1}, headers=_auth(), timeout=60)
    assert sampled.status_code == 200


def test_openai_judge_against_served_model(served, monkeypatch):
    """The tiny model answers the judge prompt with prose, not the JSON verdict (greedy: the same
    every time): the judge retries once and says unjudged, malformed — never a made-up verdict."""
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    config = JudgeConfig(name="smol", base_url=served["url"] + "/v1", model="smol", api_key_env=KEY_ENV,
                         timeout=60, max_retries=1, concurrency=2, max_tokens=16, backoff=0.01)
    judge = OpenAIJudge(config)
    cases = [_case("s1"), _case("s2", response="")]
    votes = judge.judge_many(cases)
    judge.close()
    assert len(votes) == 2 and votes[1].status == "unjudged" and votes[1].attempts == 0
    vote = votes[0]
    assert (vote.status, vote.attempts, vote.error_step, vote.primary_error_type) == ("unjudged", 2, -1, None)
    assert vote.reason == "gave up after 2 attempt(s): malformed answer: no JSON object in the answer"
    assert vote.usage["prompt_tokens"] > 200 and vote.usage["completion_tokens"] > 0  # it did ask, twice


def test_local_judge_with_embedded_model(cache_dir, monkeypatch, one_torch_thread):
    monkeypatch.setenv("QMR_CACHE_DIR", str(cache_dir))
    judge = LocalJudge(JudgeConfig(name="tiny", kind="local", model="embedded:smollm2-135m", max_tokens=8,
                                   max_retries=0))
    vote = judge.judge(_case("loc"))  # in process, greedy: the same prose every time, no JSON verdict
    assert (vote.judge, vote.status, vote.attempts) == ("tiny", "unjudged", 1)
    assert vote.reason == "gave up after 1 attempt(s): malformed answer: no JSON object in the answer"
    assert vote.usage["completion_tokens"] > 0


def test_api_key_never_written_anywhere(served, fault_server, tmp_path, monkeypatch, caplog, capsys):
    """A full `qmr judge` run (served model, an endpoint that echoes the key in its errors, the rule
    judge, review queue, profile): the key appears in no output file, record, log or report."""
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    fault_server.script = {"k1": ["500-echo"], "k2": ["ok:2"], "k3": ["401"]}
    (tmp_path / "judges.yaml").write_text(json.dumps({"judges": [
        {"name": "echo", "base_url": fault_server.url, "model": "fault", "api_key_env": KEY_ENV,
         "timeout": 5, "max_retries": 1, "backoff": 0.01},
        {"name": "smol", "base_url": served["url"] + "/v1", "model": "smol", "api_key_env": KEY_ENV,
         "timeout": 60, "max_retries": 0, "max_tokens": 8, "concurrency": 2}]}))
    rows = [{"id": cid, "problem": f"CASE-{cid}: compute (3*4+5)/2", "response": STEPS3, "gold_answer": "8.5",
             "reference_response": "Step 1: 17 / 2 = 8.5\nThe answer is 8.5"} for cid in ("k1", "k2", "k3")]
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = cli.main(["judge", "--input", str(tmp_path / "traces.jsonl"), "--judges", "rule,echo,smol",
                      "--judge-config", str(tmp_path / "judges.yaml"), "--out", str(tmp_path / "judged.jsonl"),
                      "--review-dir", str(tmp_path / "review"), "--audit-rate", "1", "--profile",
                      str(tmp_path / "profile.json"), "--no-progress"])
    assert rc == 0
    judged = [json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert [r["id"] for r in judged] == ["k1", "k2", "k3"]
    assert judged[0]["votes"]["echo"]["status"] == "unjudged" and "[REDACTED]" in judged[0]["votes"]["echo"]["reason"]
    assert judged[1]["votes"]["echo"]["status"] == "error"
    assert len(list((tmp_path / "review" / "cases").iterdir())) == 3
    out, err = capsys.readouterr()
    texts = {"stdout": out, "stderr": err, "logging": caplog.text, "server log": served["log"].read_text()}
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    assert len(texts) >= 10
    leaks = [name for name, text in texts.items() if FAKE_KEY in text]
    assert leaks == []
