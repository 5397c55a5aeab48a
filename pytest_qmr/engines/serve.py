"""A small, real OpenAI-compatible chat server for a transformers checkpoint.

``qmr serve --model REF --port P [--api-key-env NAME]`` loads ``REF`` (``embedded:NAME``, a
checkpoint directory or a hub id; see :mod:`pytest_qmr.models`) and serves

- ``GET /v1/models`` (and ``/v1/models/{id}``): the one model, under ``--served-name``;
- ``POST /v1/chat/completions``: ``messages`` through the tokenizer's chat template, greedy when
  ``temperature`` is 0 (the default) and sampling otherwise (``top_p``, ``seed``),
  ``max_tokens`` / ``max_completion_tokens``, ``stop`` (a string or up to 4), ``n`` = 1, no
  streaming. Errors come back in OpenAI's ``{"error": {"message", "type", "code"}}`` shape;
- ``GET /health``: ``{"status": "ok"}``, no key needed.

With ``--api-key-env NAME`` every ``/v1`` request must carry ``Authorization: Bearer <key>``,
the key being the value of the environment variable ``NAME`` (the key itself is never a
command-line argument, so it never shows in ``ps``); the server refuses to start when ``NAME``
is unset. Keys are compared in constant time and neither a sent nor the expected key is ever
logged or echoed. The access log (stderr) holds method, path, status and seconds only.

One model instance answers all requests: HTTP handling is threaded, generation is serialised
by a lock (a CPU forward pass already uses all cores). :class:`ChatModel` is also the engine of
the in-process ``kind: local`` judge (:mod:`pytest_qmr.locate.judges.local`).

It runs as ``qmr serve`` and as ``python -m pytest_qmr.engines.serve``; a session starts it with
``--child`` first (:class:`~pytest_qmr.engines.servers.ServedCheckpoint`): it then exits when the
session's end of its stdin closes, so it never outlives the session.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 8 << 20
MAX_STOP = 4


class RequestError(ValueError):
    """A request the server rejects with HTTP 400 (message goes back to the client)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class ChatModel:
    """A causal LM with its tokenizer: chat messages in, one completion out (thread-safe)."""

    def __init__(self, model, tokenizer, name: str = "model"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self._lock = threading.Lock()

    @classmethod
    def from_reference(cls, reference: str, name: str | None = None, device: str = "auto",
                       dtype: str = "auto") -> "ChatModel":
        """``device`` / ``dtype`` as ``generation.device`` / ``generation.dtype`` (auto: the GPU in
        bf16 where one is visible, else the CPU in fp32)."""
        from .. import models
        from .devices import runtime

        rt = runtime(device, dtype, where="qmr serve")
        resolved = models.resolve(reference)
        model, tokenizer = models.load(resolved.path, device=rt.device, dtype=rt.dtype)
        return cls(model, tokenizer, name or reference)

    def render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # No template: a plain transcript that ends where the assistant speaks.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> Completion:
        import torch

        stop = [s for s in (stop or []) if s]
        prompt = self.render(messages)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        finish = "length" if len(new) >= max_tokens else "stop"
        cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return Completion(text, int(enc["input_ids"].shape[1]), int(len(new)), finish)


# --------------------------------------------------------------------------------- requests


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", "messages")


def parse_chat_request(body: dict, max_tokens_limit: int) -> dict[str, Any]:
    """Validate an OpenAI chat-completions body; the generation arguments, or RequestError."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant", "developer"):
            raise RequestError(f"messages[{i}]: needs a role of system, user, assistant or developer", "messages")
        role = "system" if msg["role"] == "developer" else msg["role"]
        clean.append({"role": role, "content": _text_content(msg.get("content"), i)})
    if body.get("stream"):
        raise RequestError("streaming is not supported by qmr serve", "stream")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if max_tokens is None:
        max_tokens = 256
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"max_tokens must be an integer in 1..{max_tokens_limit}", "max_tokens")
    temperature = body.get("temperature", 0.0)
    temperature = 0.0 if temperature is None else temperature
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise RequestError("temperature must be a number in 0..2", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise RequestError("top_p must be a number in (0, 1]", "top_p")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError("seed must be an integer", "seed")
    return {"messages": clean, "max_tokens": max_tokens, "temperature": float(temperature),
            "top_p": float(top_p), "stop": stop, "seed": seed}


# --------------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ChatServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # replaced by _access_log: method, path, status, seconds; never headers

    def _access_log(self, status: int) -> None:
        if self.server.quiet:
            return
        took = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        path = self.path.split("?", 1)[0]
        sys.stderr.write(f"{self.address_string()} {self.command} {path} {status} {took:.2f}s\n")
        sys.stderr.flush()

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)
        self._access_log(status)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error",
               code: str | None = None, param: str | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": code, "param": param}})

    def _authorised(self) -> bool:
        expected = self.server.api_key
        if not expected:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
        if not ok:
            self._error(401, "missing or invalid API key", code="invalid_api_key")
        return ok

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._t0 = time.perf_counter()
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            return self._send(200, {"status": "ok", "model": self.server.served_name})
        if not path.startswith("/v1/"):
            return self._error(404, f"unknown path {path}", code="not_found")
        if not self._authorised():
            return None
        card = {"id": self.server.served_name, "object": "model", "created": self.server.created,
                "owned_by": "pytest-qmr"}
        if path == "/v1/models":
            return self._send(200, {"object": "list", "data": [card]})
        if path == f"/v1/models/{self.server.served_name}":
            return self._send(200, card)
        return self._error(404, f"unknown path {path}", code="not_found")

    def do_POST(self) -> None:  # noqa: N802
        self._t0 = time.perf_counter()
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(413 if length > MAX_BODY_BYTES else 400, "bad or oversized Content-Length")
        raw = self.rfile.read(length)
        if path != "/v1/chat/completions":
            return self._error(404, f"unknown path {path}", code="not_found")
        if not self._authorised():
            return None
        try:
            body = json.loads(raw.decode("utf-8"))
            request = parse_chat_request(body, self.server.max_tokens_limit)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(400, "request body is not valid JSON")
        except RequestError as exc:
            return self._error(400, str(exc), param=exc.param)
        try:
            result = self.server.chat_model.complete(**request)
        except Exception as exc:  # noqa: BLE001 - one bad generation must not stop the server
            return self._error(500, f"generation failed ({type(exc).__name__})", kind="server_error")
        self.server.count(result)
        return self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.server.served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        })


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], chat_model: ChatModel, served_name: str,
                 api_key: str | None = None, max_tokens_limit: int = 4096, quiet: bool = False):
        super().__init__(address, _Handler)
        self.chat_model, self.served_name, self.api_key = chat_model, served_name, api_key
        self.max_tokens_limit, self.quiet = max_tokens_limit, quiet
        self.created = int(time.time())
        self.requests = self.completion_tokens = 0
        self._stats_lock = threading.Lock()

    def count(self, result: Completion) -> None:
        with self._stats_lock:
            self.requests += 1
            self.completion_tokens += result.completion_tokens

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(chat_model: ChatModel, host: str = "127.0.0.1", port: int = 0, served_name: str | None = None,
                api_key: str | None = None, max_tokens_limit: int = 4096, quiet: bool = False) -> ChatServer:
    """A bound (not yet serving) server; call ``serve_forever()`` on it, e.g. in a thread."""
    return ChatServer((host, port), chat_model, served_name or chat_model.name, api_key, max_tokens_limit, quiet)


# --------------------------------------------------------------------------------- CLI


def _cmd_serve(args: argparse.Namespace) -> int:
    api_key = None
    if args.api_key_env:
        from ..redact import register_name

        register_name(args.api_key_env)
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            from ..errors import QmrError

            raise QmrError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    chat_model = ChatModel.from_reference(args.model, args.served_name or args.model, args.device, args.dtype)
    server = make_server(chat_model, args.host, args.port, args.served_name or args.model, api_key,
                         args.max_tokens_limit, args.quiet)
    auth = f", key from ${args.api_key_env}" if api_key else ", no API key"
    where = f"{chat_model.model.device} {str(chat_model.model.dtype).removeprefix('torch.')}"
    print(f"qmr serve: {chat_model.name} ({where}) listening on {server.url}/v1{auth}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a checkpoint on an OpenAI-compatible /v1/chat/completions endpoint")
    p.add_argument("--model", default="embedded:smollm2-135m", help="embedded:NAME, a checkpoint dir or a hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on the ready line)")
    p.add_argument("--api-key-env", default=None, metavar="NAME",
                   help="require 'Authorization: Bearer $NAME' (the NAME of an env var, never the key)")
    p.add_argument("--served-name", default=None, help="model id reported and accepted (default: --model)")
    p.add_argument("--max-tokens-limit", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: the GPU where one is visible)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=_cmd_serve)
    return p


CHILD_FLAG = "--child"  # first argument when a session starts it (engines.servers.ServedCheckpoint)


def _exit_with_parent() -> None:
    """The session that started this server holds our stdin open: once it reaches EOF, the session
    is gone (even killed with -9), so the server goes too."""
    try:
        while sys.stdin.read(1):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD_FLAG]:
        argv = argv[1:]
        threading.Thread(target=_exit_with_parent, name="qmr-parent-watch", daemon=True).start()
    parser = argparse.ArgumentParser(prog="qmr")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *argv])
    try:
        return args.func(args)
    except ValueError as exc:  # ModelError is a ValueError
        print(f"qmr serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
