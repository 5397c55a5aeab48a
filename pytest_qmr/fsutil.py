"""Atomic writes and cross-process locks: baselines, caches and run records must survive
interrupted runs and concurrent pytest-xdist workers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Iterator

from filelock import FileLock

from .errors import QmrError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())  # as open() would create it, not mkstemp's 0600 (baselines are shared)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask, read from
    ``/proc/self/status`` (setting the umask to read it would race other threads); 0o644 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """One JSON object per line, written atomically (a crash never leaves a truncated file)."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def read_jsonl_strict(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[dict]:
    """JSONL a user handed us: any unreadable file, bad line or non-object is ``error`` naming file:line."""
    rows = []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n}: not a JSON object")
            rows.append(row)
    return rows


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append whole lines under a lock so parallel writers never interleave records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        with open(path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSONL, ignoring a torn last line left by an interrupted writer."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch directory that is renamed to ``final`` only if the block succeeds.

    A crash or Ctrl-C leaves only a ``.tmp-*`` sibling that is never mistaken for a result.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield scratch
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an inter-process lock named after ``path`` (one builder, the others wait)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(directory: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``directory``."""
    directory, exclude = Path(directory), set(exclude)
    files = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name not in exclude:
            files[name] = {"size": path.stat().st_size, "sha256": sha256_file_cached(path)}
    return files


def manifest_problem(directory: str | os.PathLike, files: Any) -> str | None:
    """Why ``directory`` does not hold exactly the recorded ``files`` (None: every file is there
    with its size and sha256)."""
    if not isinstance(files, dict) or not files or not all(isinstance(v, dict) for v in files.values()):
        return "no file manifest"
    for name, expected in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != expected.get("size"):
            return f"{name} size {path.stat().st_size} != recorded {expected.get('size')}"
        if sha256_file_cached(path) != expected.get("sha256"):
            return f"{name} sha256 mismatch"
    return None


_VERIFIED: dict[tuple, str] = {}  # (path, device, inode, size, mtime_ns, ctime_ns) -> sha256, per process
# A file changed within this many seconds of being hashed is hashed again next time: a rewrite inside
# the filesystem's timestamp granularity can keep size, mtime and ctime (git's "racy clean" problem)
RACY_SECONDS = 2.0


def sha256_file_cached(path: Path) -> str:
    """sha256 of a file, hashed once per process while it provably stays the same: its identity,
    size, mtime and ctime are unchanged (ctime also moves when a tool restores an old mtime), and
    it was last changed more than :data:`RACY_SECONDS` before it was hashed."""
    stat = os.stat(path)
    key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    digest = sha256_file(path)
    if time.time() - max(stat.st_mtime, stat.st_ctime) > RACY_SECONDS:
        _VERIFIED[key] = digest
    return digest


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-like value, independent of key order."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def changed_keys(old: Any, new: Any, limit: int = 40) -> list[str]:
    """``"quantizer.bits 4 -> 8"`` for every dotted key whose value differs between two JSON-like values."""
    def show(value: Any) -> str:
        text = "unset" if value is _UNSET else json.dumps(value, default=str)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    a, b = _flatten(old), _flatten(new)
    return [f"{key} {show(a.get(key, _UNSET))} -> {show(b.get(key, _UNSET))}"
            for key in sorted(set(a) | set(b)) if a.get(key, _UNSET) != b.get(key, _UNSET)]


_UNSET = object()


def replace_marked(text: str, begin: str, end: str, body: str, preamble: str = "") -> str:
    """``text`` with what lies between the ``begin`` and ``end`` markers replaced by ``body`` (the
    markers kept); where they are absent, ``preamble`` and the marked block appended (a
    benchmark's README table is rewritten in place, never appended twice)."""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return (text.rstrip() + "\n\n" if text.strip() else "") + preamble + block + "\n"


def write_marked(path: str | os.PathLike, begin: str, end: str, body: str, preamble: str = "") -> None:
    """Rewrite the marked block of a text file (a README's benchmark table, :func:`replace_marked`)
    atomically."""
    path = Path(path)
    atomic_write_text(path, replace_marked(path.read_text(encoding="utf-8"), begin, end, body, preamble))


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure written as PNG atomically (a benchmark's plot is never half written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


DATA_DIR_ENV = "QMR_DATA_DIR"


def data_root(given: str | os.PathLike | None = None) -> Path | None:
    """The benchmark data directory: ``given``, else ``$QMR_DATA_DIR``, else None (the one place
    the environment is read; a suite's own ``data_dir`` comes after the environment, see
    :meth:`pytest_qmr.suite.Suite.data_dir`)."""
    if given is not None and str(given).strip():
        return Path(given).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else None


CACHE_DIR_ENV = "QMR_CACHE_DIR"


def cache_root() -> Path:
    """Where built models and quantized checkpoints live (``QMR_CACHE_DIR`` overrides); a path
    that is a file is one line (:class:`CacheDirError`), not a ``NotADirectoryError`` later."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return check_cache_dir(Path(env).expanduser(), CACHE_DIR_ENV)
    return check_cache_dir(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pytest-qmr",
                           "the cache directory (XDG_CACHE_HOME)")


def check_cache_dir(path: Path, where: str) -> Path:
    """``path`` if it is a directory or can become one, else :class:`CacheDirError` naming ``where``."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CacheDirError(f"{where}: {existing} is a file, expected a directory for the model, checkpoint and "
                            f"generation cache (got {str(path)!r})")
    return path


class CacheDirError(QmrError, ValueError):
    """A cache directory that is a file (``QMR_CACHE_DIR``, ``--qmr-cache-dir``)."""
