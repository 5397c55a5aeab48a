"""The engine interface: what one generation backend does for a cell.

An engine is one class registered in :data:`pytest_qmr.registry.ENGINES` under its name (the
suite's ``generation.backend`` or a quantizer's ``backend:``). The session makes one instance per
name and hands it a :class:`Target` per evaluation — one checkpoint, as this cell runs it —
and asks it, in this order:

``dtype(target_settings)``
    the precision it runs the checkpoint in (``generation.dtype``, or what the engine needs);
``identity(target)``
    what its answers depend on besides the request, known **before** anything starts: it keys the
    generation cache (with the checkpoint fingerprint, adapter hash, versions, dtype, batch size,
    seed, the session adds) — for a server, the served name it will prove;
``start(target)``
    the lm-eval ``LM`` that answers (a server is started, or a model loaded, here: only on a cache
    miss, unless :attr:`Engine.eager`);
``served(target)``
    what it records of who answered (``{"endpoint", "model", "engine", ...}``; None in process);
``died()``
    why the server it started is gone (one line), or None;
``close()``
    stops what it started (at the session's end).

Class attributes say what the engine is: ``options_key`` (the ``generation`` field that holds
its own arguments, e.g. ``vllm``), ``api`` (its LM takes the chat messages as JSON and the
server renders them), ``adapters`` (it can serve a Restore LoRA adapter), ``default_artifact``
(what a quantizer's build it evaluates: ``dense`` fake-quant copy or ``compressed`` checkpoint),
``eager`` (it must be started even when every answer is cached: a user's server is checked first).

An engine reaches the session only through :class:`EngineHost` (the loaded-model store, the
server pool, the cache directory): engines never import the session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol


class EngineHost(Protocol):
    """What an engine may use of the session that owns it."""

    cache_dir: Path | None

    def load(self, path: Path, trust_remote_code: bool, adapter: Path | None = None, rt: Any = None) -> tuple:
        """(model, tokenizer) of a checkpoint, kept loaded across consecutive cells."""

    @property
    def servers(self) -> Any:
        """The session's :class:`~pytest_qmr.engines.servers.ServerPool`."""


@dataclass(frozen=True)
class Target:
    """One checkpoint as one engine runs it for one evaluation of a cell."""

    path: Path
    fingerprint: str  # models.checkpoint_fingerprint(path)
    device: str
    dtype: str
    batch_size: int
    max_new_tokens: int
    seed: int
    adapter: Path | None = None  # a Restore LoRA adapter on the checkpoint
    adapter_sha: str | None = None
    trust_remote_code: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # the engine's own arguments (generation.vllm), sorted
    endpoint: str | None = None  # a user's URL for this checkpoint (generation.endpoints)
    python: str | None = None  # the interpreter of the engine's own environment (vLLM)
    where: str = "generation"  # the suite file, for messages


@dataclass(frozen=True)
class CellSettings:
    """What an engine's dtype rule may read of a cell (see :meth:`Engine.dtype`)."""

    device: str  # resolved
    dtype: str  # as the suite gives it: auto | float32 | bfloat16 | float16
    resolved_dtype: str  # auto resolved on this machine
    artifact: str  # fp | checkpoint | dense | compressed
    # what the evaluated checkpoint is (pytest_qmr.quantize.formats.checkpoint_format: format, scheme, bits,
    # group size, symmetric, activation bits, packed); None for a dense one
    quantization: dict[str, Any] | None = None


class Engine:
    """One generation backend (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    options_key: ClassVar[str | None] = None  # the Generation field holding this engine's own arguments
    api: ClassVar[bool] = False
    adapters: ClassVar[bool] = False
    default_artifact: ClassVar[str] = "dense"
    eager: ClassVar[bool] = False

    def __init__(self, host: EngineHost) -> None:
        self.host = host

    def dtype(self, settings: CellSettings) -> str:
        """The dtype it runs a checkpoint in: ``generation.dtype`` resolved on this machine."""
        return settings.resolved_dtype

    def check(self, target: Target) -> None:
        """One line (a :class:`~pytest_qmr.errors.QmrError`) for settings this engine cannot take,
        before anything is answered from the cache or started."""

    def identity(self, target: Target) -> dict[str, Any]:
        raise NotImplementedError

    def start(self, target: Target):
        raise NotImplementedError

    def served(self, target: Target) -> dict[str, Any] | None:
        return None

    def died(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def prompt_renderer(self, tokenizer) -> Callable[[Any], str] | None:
        """How the records' prompts are rendered from what its LM logs (API engines log the chat
        messages as JSON; the record keeps the text the chat template makes of them)."""
        if not self.api:
            return None
        from .api import chat_prompt_renderer

        return chat_prompt_renderer(tokenizer)
