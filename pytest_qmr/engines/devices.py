"""Where a checkpoint runs, and which of the machine's devices each pytest-xdist worker uses.

:func:`runtime` resolves a cell's ``generation.device`` / ``generation.dtype`` on this machine
(``auto``: CUDA in bfloat16 when a GPU is visible, else the CPU in float32) into a
:class:`Runtime`, which every engine, Restore's training and ``qmr serve`` take.

Per-worker devices: under pytest-xdist (``PYTEST_XDIST_WORKER`` = ``gw0``, ``gw1``, ...) with
GPUs visible, :func:`pin_worker_device` gives each worker one GPU, round-robin, by setting
``CUDA_VISIBLE_DEVICES`` before anything initialises CUDA; it is a no-op without xdist or GPUs.
On the CPU, :func:`cpu_bind` gives each worker's vLLM engine its own share of the cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Sequence, TypeVar

from ..models import ModelError

WORKER_ENV = "PYTEST_XDIST_WORKER"
PINNED_ENV = "QMR_PINNED_DEVICE"  # set once a worker's CUDA_VISIBLE_DEVICES was chosen

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


def cpu_bind(env: Mapping[str, str]) -> str | None:
    """This xdist worker's cores for vLLM's CPU engine (``0`` for gw0 of two on two cores)."""
    worker, count = xdist_worker_index(env), int(env.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if worker is None or count < 2:
        return None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // count)
    mine = cores[(worker % count) * share: (worker % count) * share + share] or cores[-1:]
    return ",".join(str(c) for c in mine)
