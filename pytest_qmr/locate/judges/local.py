"""The local judge (``kind: local``): a transformers checkpoint in this process, asked the same
prompt through its chat template, greedy; a retry after an unusable answer samples."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .config import JudgeConfig
from .llm import LLMJudge


class LocalJudge(LLMJudge):
    """A transformers checkpoint as a judge, in this process: same prompt, its chat template,
    greedy (``temperature`` 0). A retry after an unusable answer samples (temperature 0.7,
    seeded by the attempt) so it can come out differently. One generation at a time."""

    def __init__(self, config: JudgeConfig, chat_model=None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(config.model_copy(update={"concurrency": 1, "backoff": 0.0}), sleep)
        self._chat_model = chat_model
        self._load_lock = threading.Lock()

    @property
    def chat_model(self):
        with self._load_lock:
            if self._chat_model is None:
                from ...engines.serve import ChatModel

                self._chat_model = ChatModel.from_reference(self.config.model, self.config.name)
            return self._chat_model

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> tuple[str, dict[str, int]]:
        base = self.config.temperature or 0.0
        temperature = base if attempt == 0 else max(base, 0.7)
        result = self.chat_model.complete(messages, max_tokens=self.config.max_tokens, temperature=temperature,
                                          seed=attempt if temperature > 0 else None)
        return result.text, {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
