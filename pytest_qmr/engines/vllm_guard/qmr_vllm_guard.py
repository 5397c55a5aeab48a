"""ASGI middleware for vLLM's OpenAI-compatible server: every route asks for the server's key.

vLLM's ``--api-key`` / ``VLLM_API_KEY`` guards only the paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere``; its own documentation says that ``/invocations`` (the same
inference as ``/v1``), ``/metrics``, ``/tokenize`` and the rest stay open. vLLM's extension point
for this is ``--middleware MODULE.CLASS``: a class it adds with ``app.add_middleware`` (the last
added runs first). pytest-qmr starts every ``vllm serve`` with
``--middleware qmr_vllm_guard.RequireKey`` and this folder on ``PYTHONPATH``.

:class:`RequireKey` answers any HTTP request (every method, every path) that does not carry
``Authorization: Bearer <VLLM_API_KEY>`` with 401, and closes such a WebSocket. The key is
compared by SHA-256 digest in constant time and never logged. This module runs inside vLLM's
own environment: standard library only, no import of pytest_qmr.
"""

from __future__ import annotations

import hashlib
import hmac
import os

KEY_ENV = "VLLM_API_KEY"
_BODY = b'{"error": "Unauthorized"}'


class RequireKey:
    """Pure ASGI middleware: 401 unless ``Authorization: Bearer $VLLM_API_KEY``."""

    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get(KEY_ENV, "")
        if not key:
            raise RuntimeError(f"qmr_vllm_guard: {KEY_ENV} is not set; refusing to serve without a key")
        self._digest = hashlib.sha256(key.encode("utf-8")).digest()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
                return scheme.lower() == "bearer" and hmac.compare_digest(digest, self._digest)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self._authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(_BODY)).encode("ascii"))]})
            await send({"type": "http.response.body", "body": _BODY})
