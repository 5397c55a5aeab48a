"""Warm reruns: a content-addressed cache of every generation, and of trained Restore adapters.

A CI gate reruns on every push, mostly on checkpoints that did not change. Each request a cell
sends to a model — a greedy ``generate_until``, a ``loglikelihood`` of a choice, a Restore mining
prompt — is stored under ``<cache dir>/generations/`` by the hash of everything its answer
depends on (:func:`request_key`):

- the **model**: the checkpoint's fingerprint (:func:`pytest_qmr.models.checkpoint_fingerprint`:
  weights, config, generation config, tokenizer, chat template, quantization config; content, not
  path) and, when a LoRA adapter is applied, the hash of the adapter's files;
- the **engine**: backend (hf | openai | vllm), the versions of lm-eval / transformers / torch
  (and vllm), device and dtype, the served model id and endpoint of an API backend, and the batch
  size (left-padded batches can change fp32 greedy output; the key keeps batches apart rather
  than assume they cannot);
- the **request**: its type and its exact arguments — the rendered prompt text (chat template
  applied) and every generation setting lm-eval passes (``until``, ``max_gen_toks``,
  ``do_sample``, ...), or the context and continuation of a log-likelihood;
- the cell's **seed**.

lm-eval's own ``use_cache`` keys a request by its arguments alone — without the model (its
issues #2715, #4063) and so a changed checkpoint would be answered from another's cache; that
cannot happen here. A hit returns the stored response and lm-eval scores it again with today's
``process_results`` / answer checker, so a grading fix applies without regenerating. A sampled
request (``do_sample: true``) is cached only with its own seed in its arguments: the LM gives the
``j``-th copy of a repeated request (lm-eval's ``repeats``) the seed ``seeder(request, j)``
(:func:`pytest_qmr.sampling.sample_seed`), so the key names the exact sample; one without a seed is
never cached.

Each entry is one JSON file written atomically (``os.replace``), carrying its key and a checksum
of its content; a file that does not verify is deleted and regenerated (counted as ``corrupt``).
Parallel xdist workers may write the same entry at once: both write the same content, the last
rename wins, a reader never sees a torn file. A hit refreshes the entry's mtime, so
``qmr cache clear --max-size-gb`` evicts the least recently used first.

Restore adapters are cached the same way under ``adapters/<key>/`` (key: base weights, the exact
preference pairs, the training config, the distillation teacher, library versions), with a file
manifest that is verified before an adapter is copied out.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .fsutil import (atomic_directory, atomic_write_json, atomic_write_text, cache_root, file_manifest,
                     manifest_problem, sha256_json)

GENERATIONS = "generations"
ADAPTERS = "adapters"
AREAS = ("generations", "adapters", "quantized", "models")  # what `qmr cache` lists and clears
ENTRY_VERSION = 1
_MISS = object()


def _plain(value: Any) -> Any:
    """A request argument as JSON: lm-eval's chat requests (``JsonChatStr``) by their text."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    prompt = getattr(value, "prompt", None)
    if isinstance(prompt, str):
        return {"chat": prompt}
    return repr(value)


def request_key(identity: dict[str, Any], request_type: str, args: Sequence[Any]) -> str:
    """The cache key of one request: sha256 of the model/engine ``identity``, the request type and
    its exact arguments (prompt text and generation settings)."""
    return sha256_json({"v": ENTRY_VERSION, "identity": identity, "type": request_type, "args": _plain(list(args))})


@dataclass
class CacheStats:
    """What one stage asked and how much of it came from the cache (``items``: lm-eval docs, a
    multiple-choice doc being several requests; an item is from cache when all its requests are)."""

    items: int = 0
    items_from_cache: int = 0
    requests: int = 0
    requests_from_cache: int = 0
    corrupt: int = 0  # entries that failed verification and were regenerated
    generated_tokens: int = 0
    generate_seconds: float = 0.0

    def add(self, other: "CacheStats") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def tok_per_s(self) -> float | None:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["generate_seconds"] = round(self.generate_seconds, 2)
        return data


class GenerationCache:
    """The on-disk store of responses (``root/generations/ab/<key>.json``); ``enabled=False``
    (``--qmr-no-cache``) reads and writes nothing."""

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = (Path(root) if root is not None else cache_root()) / GENERATIONS
        self.enabled = enabled
        # why an entry could not be stored (a read-only cache): answers are kept, not stored; None: all stored
        self.write_error: str | None = None

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[Any, bool]:
        """(the stored value or the miss marker, whether an entry was there but did not verify)."""
        if not self.enabled:
            return _MISS, False
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _MISS, False
        except (OSError, ValueError):
            entry = None
        if (not isinstance(entry, dict) or entry.get("key") != key or "value" not in entry
                or entry.get("check") != sha256_json({"key": key, "value": entry["value"]})):
            path.unlink(missing_ok=True)
            return _MISS, True
        try:
            os.utime(path)  # recently used: kept longest by --max-size-gb
        except OSError:
            pass
        return entry["value"], False

    def put(self, key: str, value: Any, meta: dict[str, Any]) -> None:
        if not self.enabled:
            return
        entry = {"key": key, "value": value, "check": sha256_json({"key": key, "value": value}), "meta": meta}
        try:
            atomic_write_text(self.path(key), json.dumps(entry, sort_keys=True, ensure_ascii=False))
        except OSError as exc:  # a cache that cannot be written never costs the answer itself
            self.write_error = f"{self.root} is not writable ({type(exc).__name__}: {exc.strerror or exc})"

    def map(self, identity: dict[str, Any], request_type: str, args: Sequence[Sequence[Any]],
            compute: Callable[[list[int]], list[Any]], *, item_of: Sequence[Any] | None = None,
            cacheable: Sequence[bool] | None = None,
            count_tokens: Callable[[Any], int] | None = None) -> tuple[list[Any], CacheStats]:
        """The response to each of ``args``: from the cache where an entry verifies, else from
        ``compute(indices of the misses)`` (called once, with the misses in order), stored.
        ``item_of`` groups requests into items; ``count_tokens`` measures a generated response."""
        keys = [request_key(identity, request_type, a) for a in args]
        values: list[Any] = []
        stats = CacheStats(requests=len(args))
        for i, key in enumerate(keys):
            value, corrupt = self.get(key) if cacheable is None or cacheable[i] else (_MISS, False)
            stats.corrupt += corrupt
            values.append(value)
        missing = [i for i, v in enumerate(values) if v is _MISS]
        stats.requests_from_cache = len(args) - len(missing)
        if missing:
            started = time.monotonic()
            computed = compute(missing)
            stats.generate_seconds = time.monotonic() - started
            if len(computed) != len(missing):
                raise RuntimeError(f"{request_type}: {len(computed)} responses for {len(missing)} requests")
            meta = {"type": request_type, "identity": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
            for i, value in zip(missing, computed, strict=True):
                value = list(value) if isinstance(value, tuple) else value
                if cacheable is None or cacheable[i]:
                    self.put(keys[i], value, meta)
                values[i] = value
            if count_tokens is not None:
                stats.generated_tokens = sum(count_tokens(v) for v in computed)
        items = list(range(len(args))) if item_of is None else list(item_of)
        missed_items = {items[i] for i in missing}
        stats.items = len(set(items))
        stats.items_from_cache = stats.items - len(missed_items)
        return values, stats


# --------------------------------------------------------------------------------- lm-eval


def token_counter(tokenizer) -> Callable[[str], int]:
    """How many tokens a generated text is (no special tokens added): the one count of an answer's
    length, for the cache's statistics and a sampled answer's ``tokens`` alike."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def render_chat(tokenizer, history: list[dict[str, str]], add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """A chat rendered as lm-eval's HFLM renders it (the prompt text a request carries);
    ``template_kwargs`` go to the chat template (HFLM's ``chat_template_args``: ``enable_thinking``)."""
    import jinja2

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt,
                                             **(template_kwargs or {}))
    try:
        return render(history)
    except jinja2.exceptions.TemplateError:  # as HFLM: a template without a system role
        return render([m for m in history if m["role"] != "system"])


def _lm_base():
    from lm_eval.api.model import LM

    return LM


class _Front:
    """Chat templating from a tokenizer alone, so a fully cached cell never loads its weights."""

    def __init__(self, tokenizer, template_kwargs: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.template_kwargs = template_kwargs

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt, self.template_kwargs)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None


class _ApiFront:
    """Chat requests as lm-eval's API models make them (the messages as JSON), before any server runs."""

    tokenizer_name = ""

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True):
        from lm_eval.models.api_models import JsonChatStr

        return JsonChatStr(json.dumps(chat_history, ensure_ascii=False))

    def chat_template(self, chat_template: bool | str = False) -> str:
        return ""


def with_sample_seeds(requests: Sequence[Any], seeder: Callable[[Any, int], int]) -> list[Any]:
    """``requests`` with each sampled one's ``seed`` set: the ``j``-th occurrence of one lm-eval
    ``Instance`` (``repeats`` puts the same object k times) gets ``seeder(instance, j)``."""
    seen: dict[int, int] = {}
    out = []
    for request in requests:
        kwargs = request.args[1] if len(request.args) > 1 and isinstance(request.args[1], dict) else None
        if not kwargs or not kwargs.get("do_sample"):
            out.append(request)
            continue
        j = seen.get(id(request), 0)
        seen[id(request)] = j + 1
        out.append(with_kwargs(request, {"seed": seeder(request, j)}))
    return out


def with_kwargs(request: Any, extra: dict[str, Any]) -> Any:
    """A copy of a ``generate_until`` request with ``extra`` added to its generation kwargs."""
    import dataclasses

    return dataclasses.replace(request, arguments=(request.args[0], {**request.args[1], **extra}))


def caching_lm(make_lm: Callable[[], Any], identity: dict[str, Any], cache: GenerationCache, *,
               tokenizer=None, eager: Any = None, api: bool = False,
               diagnose: Callable[[], str | None] | None = None, seeder: Callable[[Any, int], int] | None = None,
               template_kwargs: dict[str, Any] | None = None):
    """An lm-eval ``LM`` answering from ``cache`` and asking the model only for the misses.

    ``make_lm`` builds the real lm-eval model on the first miss (for hf: after loading the
    weights; for a server backend: after starting the server); ``tokenizer`` renders chat prompts
    meanwhile (``api``: as the messages an API model sends) and counts generated tokens. ``eager``
    is an already-built model (API backends render chat messages themselves). ``diagnose`` says
    why the server behind an API model is gone (None: it is not), for the line a failed request
    becomes (:func:`pytest_qmr.measure.remote_failures_as_one_line`). ``seeder`` seeds sampled
    requests (:func:`with_sample_seeds`). ``template_kwargs`` go to the chat template: rendered here
    for an in-process model, sent in each request (``chat_template_kwargs``) to an API model."""

    class CachingLM(_lm_base()):
        def __init__(self) -> None:
            super().__init__()
            self._lm = eager
            self.identity = identity
            self.stats = CacheStats()
            self.front = eager if eager is not None else _ApiFront() if api else _Front(tokenizer, template_kwargs)
            self.backend = identity.get("backend")
            self.diagnose = diagnose

        @property
        def base_url(self) -> str | None:
            """The API model's endpoint, for its error lines: the live server's URL once started,
            before that what the identity names (our server: its engine); None in process."""
            live = getattr(self._lm, "base_url", None)
            return live or ((identity.get("served") or {}).get("endpoint") if api else None)

        @property
        def inner(self):
            if self._lm is None:
                self._lm = make_lm()
            return self._lm

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True):
            return self.front.apply_chat_template(chat_history, add_generation_prompt)

        @property
        def tokenizer_name(self) -> str:
            return self.front.tokenizer_name

        def chat_template(self, chat_template: bool | str = False):
            return self.front.chat_template(chat_template)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._answer("generate_until", requests)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [tuple(v) for v in self._answer("loglikelihood", requests)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._answer("loglikelihood_rolling", requests)

        def _answer(self, kind: str, requests) -> list[Any]:
            requests = list(requests)
            if kind == "generate_until" and seeder is not None:
                requests = with_sample_seeds(requests, seeder)
            if kind == "generate_until" and api and template_kwargs:
                requests = [with_kwargs(r, {"chat_template_kwargs": dict(template_kwargs)}) for r in requests]
            cacheable = [not (kind == "generate_until" and len(r.args) > 1 and isinstance(r.args[1], dict)
                              and r.args[1].get("do_sample") and "seed" not in r.args[1]) for r in requests]

            def compute(missing: list[int]) -> list[Any]:
                return list(getattr(self.inner, kind)([requests[i] for i in missing]))

            items = [(getattr(r, "task_name", None), getattr(r, "doc_id", i)) for i, r in enumerate(requests)]
            count = token_counter(tokenizer) if kind == "generate_until" and tokenizer is not None else None
            values, stats = cache.map(self.identity, kind, [r.args for r in requests], compute, item_of=items,
                                      cacheable=cacheable, count_tokens=count)
            self.stats.add(stats)
            return values

    return CachingLM()


# --------------------------------------------------------------------------------- adapters


def adapter_sha(adapter_dir: Path) -> str:
    """Content hash of a LoRA adapter (its weights and config; not its card or timestamps)."""
    manifest = file_manifest(adapter_dir, exclude=("qmr_card.json", "qmr_manifest.json"))
    return sha256_json(manifest)[:16]


def cached_adapter(root: Path | None, key_inputs: dict[str, Any], out_dir: Path, train: Callable[[], dict],
                   enabled: bool = True) -> dict:
    """The card of an adapter in ``out_dir``: copied from ``adapters/<key>`` when an entry with
    these exact inputs verifies against its manifest, else trained by ``train()`` (which writes
    ``out_dir``) and stored. The card says ``cache_hit``."""
    key = sha256_json(key_inputs)[:24]
    entry = (Path(root) if root is not None else cache_root()) / ADAPTERS / key
    if not enabled:
        return {**train(), "cache_hit": False}
    from filelock import FileLock

    lock = FileLock(str(entry.parent / ".locks" / key) + ".lock")  # one trainer per key; the others wait and reuse
    try:
        (entry.parent / ".locks").mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:  # a read-only cache: train, keep the adapter in out_dir, store nothing
        return {**train(), "cache_hit": False, "cache_error": f"{entry.parent} is not writable ({type(exc).__name__})"}
    try:
        return _cached_adapter_locked(entry, key_inputs, out_dir, train)
    finally:
        lock.release()


def _cached_adapter_locked(entry: Path, key_inputs: dict[str, Any], out_dir: Path, train: Callable[[], dict]) -> dict:
    """:func:`cached_adapter` under the entry's lock: copied out when it verifies, else trained and stored."""
    manifest = entry / "qmr_manifest.json"
    problem = "no entry"
    if manifest.is_file():
        try:
            problem = manifest_problem(entry, json.loads(manifest.read_text(encoding="utf-8")).get("files"))
        except (OSError, ValueError):
            problem = "unreadable manifest"
    if problem is None:
        os.utime(entry)  # last use, for qmr cache clear --max-size-gb
        with atomic_directory(out_dir) as scratch:
            for f in entry.iterdir():
                if f.name != "qmr_manifest.json":
                    shutil.copy2(f, scratch / f.name)
        card = json.loads((out_dir / "qmr_card.json").read_text(encoding="utf-8"))
        return {**card, "adapter_path": str(out_dir), "cache_hit": True}
    card = train()
    try:
        with atomic_directory(entry) as scratch:
            for f in Path(out_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, scratch / f.name)
            atomic_write_json(scratch / "qmr_manifest.json", {"inputs": key_inputs, "files": file_manifest(scratch)})
    except OSError as exc:  # the adapter is in out_dir either way
        return {**card, "cache_hit": False, "cache_error": f"{entry.parent} is not writable ({type(exc).__name__})"}
    return {**card, "cache_hit": False}


# --------------------------------------------------------------------------------- qmr cache


@dataclass(frozen=True)
class Entry:
    area: str
    path: Path
    size: int
    mtime: float


def area_entries(root: Path, area: str) -> list[Entry]:
    """The evictable units of one area: a response file, an adapter, a checkpoint, a built model."""
    base = root / area
    if not base.is_dir():
        return []
    units = base.glob("*/*.json") if area == GENERATIONS else (p for p in base.iterdir() if p.is_dir())
    out = []
    for unit in units:
        if unit.name.startswith((".tmp-", ".")):
            continue
        try:
            files = [unit] if unit.is_file() else [f for f in unit.rglob("*") if f.is_file()]
            stats = [f.stat() for f in files]
        except OSError:
            continue  # removed meanwhile by another process
        try:
            used = unit.stat().st_mtime  # a directory's own mtime is touched on every use
        except OSError:
            continue
        out.append(Entry(area, unit, sum(s.st_size for s in stats), used))
    return sorted(out, key=lambda e: e.path.name)


def _remove(entry: Entry) -> None:
    """Gone at once for readers: a response file unlinked, a directory renamed aside under the
    lock its builder holds (never in the middle of a build), then deleted."""
    from .fsutil import locked

    if entry.path.is_file():
        entry.path.unlink(missing_ok=True)
        return
    aside = entry.path.with_name(f".tmp-removed-{entry.path.name}-{os.getpid()}")
    with locked(entry.path):
        try:
            os.replace(entry.path, aside)
        except OSError:
            return
    shutil.rmtree(aside, ignore_errors=True)


def clear(root: Path | None, areas: Sequence[str] = AREAS, older_than_days: float | None = None,
          max_size_gb: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """Remove what :func:`select_evictions` picks among the ``areas``; (removed, all entries)."""
    root = Path(root) if root is not None else cache_root()
    entries = [e for area in areas for e in area_entries(root, area)]
    doomed = select_evictions(entries, older_than_days, max_size_gb)
    for entry in doomed:
        _remove(entry)
    for area in areas:  # scratch of interrupted builds: a live build may own one younger than a day
        for scratch in (root / area).glob(".tmp-*") if (root / area).is_dir() else ():
            try:
                if time.time() - scratch.stat().st_mtime > 86400:
                    shutil.rmtree(scratch, ignore_errors=True) if scratch.is_dir() else scratch.unlink()
            except OSError:
                continue
    return doomed, entries


def select_evictions(entries: Sequence[Entry], older_than_days: float | None, max_size_gb: float | None,
                     now: float | None = None) -> list[Entry]:
    """What ``clear`` removes: entries older than the age limit, then the least recently used
    until the rest fit in ``max_size_gb``; with neither limit, everything."""
    now = time.time() if now is None else now
    if older_than_days is None and max_size_gb is None:
        return list(entries)
    doomed = [e for e in entries if older_than_days is not None and now - e.mtime > older_than_days * 86400]
    if max_size_gb is not None:
        kept = sorted((e for e in entries if e not in doomed), key=lambda e: e.mtime)
        size = sum(e.size for e in kept)
        while kept and size > max_size_gb * 1e9:
            oldest = kept.pop(0)
            doomed.append(oldest)
            size -= oldest.size
    return doomed


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"
