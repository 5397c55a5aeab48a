"""OpenAI-compatible servers as lm-eval sees them: the names that prove what a server serves, the
check on ``GET /v1/models``, lm-eval's ``local-chat-completions`` client, and the prompt text a
record keeps (shared by the ``vllm`` and ``openai`` engines).

A server shows that it serves a cell's checkpoint by listing a model named after the checkpoint's
fingerprint, ``qmr-<fingerprint>`` (:func:`served_name`; a LoRA adapter served beside it:
``qmr-<fingerprint>-lora-<adapter hash>``). :func:`remote_model_name` asks the server and refuses
in one line when nothing it lists names the checkpoint: another model must never answer a cell.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..models import ModelError
from .servers import BASE_URL_ENV, chat_completions_url, models_url

MODEL_ENV = "QMR_OPENAI_MODEL"  # picks one of several listed models (it must name the fingerprint too)
REQUEST_TIMEOUT_SECONDS = 1800
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices


def served_name(fingerprint: str) -> str:
    """The model name that shows a server serves the checkpoint with this fingerprint."""
    return f"qmr-{fingerprint}"


def lora_served_name(fingerprint: str, adapter_key: str) -> str:
    """The name of a LoRA adapter (content key ``adapter_key``) served on that checkpoint."""
    return f"{served_name(fingerprint)}-lora-{adapter_key}"


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

    from .servers import API_KEY_ENV

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


def configured_base_url(env: Mapping[str, str] | None = None) -> str | None:
    """This worker's endpoint from ``QMR_OPENAI_BASE_URL`` (comma-separated: one per worker); its
    userinfo, if any, is taken apart by :func:`~pytest_qmr.engines.servers.endpoint_auth`."""
    from .devices import for_worker, xdist_worker_index

    env = os.environ if env is None else env
    urls = [u.strip() for u in env.get(BASE_URL_ENV, "").split(",") if u.strip()]
    if not urls:
        return None
    return chat_completions_url(for_worker(urls, xdist_worker_index(env)))
