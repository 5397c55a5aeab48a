"""Generation engines: what answers a cell, one registered class per backend.

A cell is answered by the engine its quantizer names (``backend:``), else the suite's
``generation.backend``; the FP baseline run always takes the suite's. Each engine is one module
with one class registered in :data:`pytest_qmr.registry.ENGINES` (the lm-eval rule: a model
backend is one registered class, its optional imports inside), behind one interface
(:class:`~.base.Engine`: what it needs started, the lm-eval ``LM`` it hands back, the served
identity it proves, what it records, how it stops):

``hf`` (:mod:`.hf`)
    transformers in this process (lm-eval's ``HFLM``), on the dense fake-quant copy by default.
``vllm`` (:mod:`.vllm`)
    ``vllm serve`` from vLLM's own environment, on the compressed checkpoint a user deploys.
``openai`` (:mod:`.openai`)
    a user's OpenAI-compatible server (``generation.endpoints``, ``QMR_OPENAI_BASE_URL``), else our
    fallback ``qmr serve``.

A project adds its own (an in-house server, another runtime) by registering an
:class:`~.base.Engine` subclass, from a ``conftest.py`` or an entry point
``pytest_qmr.engines``; suites can then name it as a ``backend``.

The rest of the package is what the engines share: :mod:`.devices` (device and dtype resolution,
xdist worker pinning), :mod:`.servers` (the server pool, ``vllm serve`` and ``qmr serve``
processes, their health checks, process groups, argument checks and failure reasons),
:mod:`.serve` (our fallback server, its own ``__main__``), :mod:`.api` (lm-eval's chat-completions
client and the served-name check), :mod:`.vllm_env` (building vLLM's own environment) and
``vllm_guard/`` (the ASGI route guard vLLM loads). Engines reach the session only through
:class:`~.base.EngineHost`; nothing here imports the session.
"""

from .base import CellSettings, Engine, EngineHost, Target
from .devices import Runtime, runtime
from .servers import NotServable

__all__ = ["CellSettings", "Engine", "EngineHost", "NotServable", "Runtime", "Target", "runtime"]
