"""``openai``: lm-eval's ``local-chat-completions`` against an OpenAI-compatible server.

- ``generation.endpoints: {<quantizer>: URL}`` (``fp``: the baseline run), else
  ``QMR_OPENAI_BASE_URL`` (comma-separated: one per pytest-xdist worker, round-robin): a server
  you run (``vllm serve``, ``qmr serve``, ...), as ``http://host:port``, ``.../v1`` or
  ``.../v1/chat/completions``; ``QMR_OPENAI_API_KEY`` goes as ``Authorization: Bearer`` (else a
  ``user:password@`` in the URL as Basic), redacted everywhere. **It must show that it serves the
  cell's checkpoint**: ``GET /v1/models`` must list ``qmr-<checkpoint fingerprint>``
  (``qmr model DIR`` prints it; ``QMR_OPENAI_MODEL`` picks among several), checked before any
  request — and before the cache is read (``eager``): a cached answer was that server's.
- Without a URL the session starts ``qmr serve`` (:mod:`pytest_qmr.engines.serve`, our fallback
  server: transformers, one request at a time) for the checkpoint on 127.0.0.1 with a per-server
  key; it is reused across the checkpoint's cells and exits with the session.

Record prompts are the task's messages rendered with the checkpoint's own chat template, the same
text the ``hf`` engine records, so prompts still match the committed baseline. The endpoint and
the served model id are recorded in the cell's ``served``.
"""

from __future__ import annotations

import os
from typing import Any

from ..registry import ENGINES
from .api import configured_base_url, openai_lm, remote_model_name, served_name
from .base import Engine, Target
from .servers import API_KEY_ENV, BASE_URL_ENV, auth_header, endpoint_auth

USER_SERVER = "user server"


@ENGINES.register("openai")
class OpenAIEngine(Engine):
    api = True
    eager = True

    def __init__(self, host) -> None:
        super().__init__(host)
        self._served: dict[str, dict[str, Any]] = {}
        self._ours = False  # the last start answered through our qmr serve (not a user's server)

    def start(self, target: Target):
        from ..models import load_tokenizer

        if (given := target.endpoint or configured_base_url()) is not None:
            where = f"{target.where}: generation.endpoints" if target.endpoint else BASE_URL_ENV
            endpoint, headers = endpoint_auth(given, os.environ.get(API_KEY_ENV) or None, where)
            concurrent, engine = target.batch_size, USER_SERVER
        else:  # our own qmr serve generates one request at a time anyway
            server = self.host.servers.server_for(target.path, served_name(target.fingerprint), target.device,
                                                  target.dtype)
            endpoint, headers, concurrent, engine = server.url, auth_header(server.api_key), 1, server.kind
        name = remote_model_name(endpoint, headers, target.fingerprint, target.path)  # ours are checked too
        eos = load_tokenizer(target.path, target.trust_remote_code).eos_token
        lm = openai_lm(endpoint, name, headers, eos, concurrent, target.max_new_tokens, target.seed)
        self._served[str(target.path)] = {"endpoint": endpoint, "model": name, "fingerprint": target.fingerprint,
                                          "engine": engine}
        self._ours = engine != USER_SERVER
        return lm

    def identity(self, target: Target) -> dict[str, Any]:
        served = self._served[str(target.path)]  # eager: started (and checked) before the cache is read
        endpoint = served["endpoint"] if served["engine"] == USER_SERVER else served["engine"]  # ours: a random port
        return {"served": {"endpoint": endpoint, "model": served["model"]}}

    def served(self, target: Target) -> dict[str, Any] | None:
        return self._served.pop(str(target.path), None)

    def died(self) -> str | None:
        return self.host.servers.died() if self._ours else None

    def close(self) -> None:
        self._served.clear()
