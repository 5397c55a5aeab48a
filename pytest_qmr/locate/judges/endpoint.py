"""The endpoint judge (``kind: openai``): any OpenAI-compatible ``/v1/chat/completions``
endpoint (a hosted API, vLLM, llama.cpp, ``qmr serve``), configured by a
:class:`~.config.JudgeConfig` (``base_url``, ``model``, ``api_key_env``, ``timeout``,
``max_retries``, ``concurrency``, the request's settings). One attempt is one POST; HTTP
408/409/425/429 and 5xx are retried (``Retry-After`` honoured up to ``backoff_max``), any other
4xx and a missing key are not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .config import JudgeConfig
from .llm import LLMJudge, FatalAttempt, RetryableAttempt


class OpenAIJudge(LLMJudge):
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        super().__init__(config, sleep)
        import httpx

        from ...redact import register_name

        register_name(config.api_key_env)  # its value is masked in every log line from now on
        self._httpx = httpx
        self._client = httpx.Client(timeout=config.timeout,
                                    limits=httpx.Limits(max_connections=config.concurrency))

    def _secret(self) -> str | None:
        env = self.config.api_key_env
        return os.environ.get(env) if env else None

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> tuple[str, dict[str, int]]:
        httpx, cfg = self._httpx, self.config
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise FatalAttempt(f"environment variable {cfg.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        body = {**cfg.extra_body, "model": cfg.model, "messages": messages, cfg.token_param: cfg.max_tokens}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        try:
            resp = self._client.post(cfg.endpoint, json=body, headers=headers)
        except httpx.TimeoutException:
            raise RetryableAttempt(f"timeout after {cfg.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise RetryableAttempt(f"connection to {cfg.endpoint} failed ({type(exc).__name__})") from None
        if resp.status_code != 200:
            detail = _error_message(resp)
            msg = f"HTTP {resp.status_code} from {cfg.endpoint}" + (f": {detail}" if detail else "")
            if resp.status_code in (408, 409, 425, 429) or resp.status_code >= 500:
                raise RetryableAttempt(msg, _retry_after(resp.headers.get("Retry-After")))
            raise FatalAttempt(msg)
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RetryableAttempt("the endpoint's reply is not a chat completion") from None
        if not isinstance(content, str):
            raise RetryableAttempt("the endpoint's reply has no text content")
        usage = data.get("usage") or {}
        return content, {"prompt_tokens": usage.get("prompt_tokens") or 0,
                         "completion_tokens": usage.get("completion_tokens") or 0}

    def close(self) -> None:
        super().close()
        self._client.close()


def _error_message(resp) -> str:
    try:
        data = resp.json()
        msg = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        text = str(msg or "")
    except Exception:  # noqa: BLE001
        text = resp.text
    return " ".join(text.split())[:200]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
