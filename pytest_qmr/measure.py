"""Measure: run a model on an lm-eval task through lm-eval's Python API and keep every sample.

lm-eval's own per-sample metric is the authority for correctness; we add a stable item id,
the full generation and the extracted answer, so later stages read records, not models.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from .fsutil import sha256_text
from .records import SampleRecord

@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tasks_dir() -> Path:
    """The project's lm-eval task folder (installed as the package ``pytest_qmr.tasks``)."""
    return Path(str(resources.files("pytest_qmr.tasks")))


def task_manager(data_dir: Path | None, extra_metadata: dict | None = None):
    from lm_eval.tasks import TaskManager

    metadata = dict(extra_metadata or {})
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    return TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata)


def known_tasks() -> list[str]:
    """Names of the tasks a cell can use (what :func:`task_manager` indexes)."""
    return list(task_manager(None).all_tasks)


def check_task(name: str, where: str, known: list[str] | None = None) -> None:
    """``TaskError`` naming ``where`` (``file: key``) unless ``name`` is one of ``known`` (default:
    :func:`known_tasks`; pass it when checking many names, indexing the tasks costs ~1 s)."""
    import difflib

    from .errors import TaskError

    known = known_tasks() if known is None else known
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    raise TaskError(f"{where}: unknown lm-eval task, {hint} (got {name!r})")


@dataclass(frozen=True)
class ExpectedItem:
    """What a task will ask for one doc, known before any generation: the item id, the exact
    prompt text a record will carry (chat template applied) and the gold answer."""

    item_id: str
    doc_index: int
    prompt: str
    gold: str


def expected_items(task: str, indices: list[int], tokenizer, data_dir: Path | None,
                   seed: int = 0) -> list[ExpectedItem]:
    """The prompts and golds lm-eval will build for ``indices`` of ``task`` (no model runs):
    the same ``build_all_requests`` path as :meth:`Evaluator.run`, with the tokenizer's chat
    template applied as lm-eval's HFLM applies it."""
    from lm_eval.tasks import get_task_dict

    def chat_template(history, add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt)

    task_obj = get_task_dict([task], task_manager(data_dir))[task]
    if task_obj.get_config("num_fewshot") is None:
        task_obj.set_config(key="num_fewshot", value=0)
    task_obj.set_fewshot_seed(seed=seed)
    task_obj.build_all_requests(samples=sorted(set(indices)), rank=0, world_size=1, apply_chat_template=True,
                                chat_template=chat_template, tokenizer_name="")
    items = [ExpectedItem(item_id=inst.doc["qmr_id"], doc_index=int(inst.doc_id), prompt=inst.arguments[0],
                          gold=str(inst.doc["qmr_gold"])) for inst in task_obj.instances]
    return sorted(items, key=lambda item: item.doc_index)


def _to_record(sample: dict) -> SampleRecord:
    from .tasks.utils import read_sample

    return SampleRecord(**read_sample(sample))


@contextmanager
def _remote_failures_as_one_line(endpoint: str | None) -> Iterator[None]:
    """A request to an API backend that failed for good (refused, 4xx/5xx after lm-eval's
    retries, timed out) is a :class:`ModelError` line naming the endpoint, not a traceback."""
    if endpoint is None:
        yield
        return
    import asyncio

    import aiohttp
    import requests
    from tenacity import RetryError

    from .models import ModelError

    try:
        yield
    except (aiohttp.ClientError, asyncio.TimeoutError, RetryError, requests.RequestException, ConnectionError) as exc:
        detail = " ".join(str(exc).split())[:200] or "no detail"
        raise ModelError(f"backend openai: generation at {endpoint} failed ({type(exc).__name__}: {detail})") from None


class Evaluator:
    """One lm-eval harness around a model; reused across chunks of one cell.

    By default the model is an in-memory transformers model (lm-eval ``HFLM``, the ``hf``
    backend); ``lm`` passes any other lm-eval model instead (see :mod:`pytest_qmr.backends`),
    with ``render_prompt`` turning its logged prompts into the text the hf backend records.
    """

    def __init__(self, model, tokenizer, generation: GenerationSettings, data_dir: Path | None,
                 task_metadata: dict | None = None, *, lm=None,
                 render_prompt: Callable[[Any], str] | None = None) -> None:
        self.generation = generation
        if lm is None:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=generation.batch_size, device="cpu",
                      dtype="float32")
        self.lm = lm
        self.render_prompt = render_prompt
        self.manager = task_manager(data_dir, task_metadata)

    def run(self, task: str, indices: list[int] | None = None, limit: int | None = None,
            seed: int = 0) -> list[SampleRecord]:
        """Generate for the given doc indices (or the first ``limit`` docs), greedy, chat-formatted."""
        from lm_eval import simple_evaluate

        kwargs: dict[str, Any] = {"samples": {task: list(indices)}} if indices is not None else {"limit": limit}
        with _remote_failures_as_one_line(getattr(self.lm, "base_url", None)):
            output = simple_evaluate(
                model=self.lm,
                tasks=[task],
                task_manager=self.manager,
                apply_chat_template=True,
                gen_kwargs={"max_gen_toks": self.generation.max_new_tokens, "do_sample": False},
                log_samples=True,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                verbosity="WARNING",
                **kwargs,
            )
        records = [_to_record(s) for s in output["samples"][task]]
        if self.render_prompt is not None:
            for record in records:
                record.prompt = self.render_prompt(record.prompt)
        return sorted(records, key=lambda r: r.doc_index)

    def run_sequential(self, task: str, indices: list[int], chunk: int, seed: int,
                       should_stop: Callable[[list[SampleRecord]], bool]) -> list[SampleRecord]:
        """Evaluate in chunks, asking ``should_stop`` after each whether the verdict is settled."""
        records: list[SampleRecord] = []
        for start in range(0, len(indices), chunk):
            records += self.run(task, indices[start:start + chunk], seed=seed)
            if should_stop(records):
                break
        return records


def items_fingerprint(records: Iterable[SampleRecord | ExpectedItem]) -> dict[str, str]:
    """Hashes of what was asked (prompts) and what counts as right (gold), per item id."""
    rows = sorted(records, key=lambda r: r.item_id)
    return {
        "data_sha256": sha256_text("\n".join(f"{r.item_id}\t{r.gold}" for r in rows)),
        "prompt_sha256": sha256_text("\n".join(f"{r.item_id}\t{r.prompt}" for r in rows)),
    }

