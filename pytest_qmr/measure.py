"""Measure: run a model on an lm-eval task through lm-eval's Python API and keep every sample.

lm-eval's own per-sample metric is the authority for correctness; we add a stable item id,
the full generation and the extracted answer, so later stages read records, not models.

Any lm-eval task can be measured, not only ours (:class:`TaskSource`: our ``tasks/``, a suite's
task folders, lm-eval's stock tasks). Our ``qmr_*`` docs carry ``qmr_id`` / ``qmr_gold``; for any
other task an item is identified by the hash of its doc (lm-eval's own ``doc_hash``), its gold is
the task's ``doc_to_target`` (for a multiple-choice task, the text of the target choice), and its
correctness is the task's own per-item 0/1 metric (:class:`Scoring`: ``exact_match`` or ``acc``
unless a benchmark names one, of the task's first filter unless it names one), or with
``metric: answer`` our own answer checker under the benchmark's ``answer_kind``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .fsutil import sha256_text
from .records import SampleRecord


@dataclass(frozen=True)
class GenerationSettings:
    """How a cell generates: greedy (``temperature`` 0, one answer per item, as always), or
    ``samples`` answers per item at ``temperature`` / ``top_p`` / ``top_k`` (0: off), sample ``j``
    of item ``i`` seeded :func:`pytest_qmr.sampling.sample_seed` ``(seed, i, j)``."""

    max_new_tokens: int = 256
    batch_size: int = 16
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def sampling(self) -> dict[str, Any] | None:
        """The sampling settings (``result.json``'s ``sampling``); None for a greedy cell."""
        if not self.sampled:
            return None
        return {"samples": self.samples, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed}

    def gen_kwargs(self) -> dict[str, Any]:
        """lm-eval's generation kwargs (each sampled request gets its ``seed`` in the generation cache's LM)."""
        if not self.sampled:
            return {"max_gen_toks": self.max_new_tokens, "do_sample": False}
        kwargs: dict[str, Any] = {"max_gen_toks": self.max_new_tokens, "do_sample": True,
                                  "temperature": self.temperature, "top_p": self.top_p}
        return {**kwargs, "top_k": self.top_k} if self.top_k else kwargs

    def to_dict(self) -> dict[str, Any]:
        """As baselines' provenance records it: a greedy cell's exactly as before sampling existed."""
        data = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size}
        return {**data, **(self.sampling() or {})}


def tasks_dir() -> Path:
    """The project's lm-eval task folder (installed as the package ``pytest_qmr.tasks``)."""
    return Path(str(resources.files("pytest_qmr.tasks")))


@dataclass(frozen=True)
class TaskSource:
    """Where a cell's lm-eval tasks are found: our ``tasks/`` always, then the suite's task
    folders (``tasks:`` and ``--qmr-tasks``; absolute paths), then, with ``include_defaults``,
    lm-eval's stock tasks (a user folder's task of the same name wins, as in lm-eval)."""

    paths: tuple[Path, ...] = ()
    include_defaults: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"paths": [str(p) for p in self.paths], "include_defaults": self.include_defaults}


def task_manager(data_dir: Path | None, extra_metadata: dict | None = None, source: TaskSource = TaskSource()):
    from lm_eval.tasks import TaskManager

    metadata = dict(extra_metadata or {})
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    return TaskManager(include_path=[str(tasks_dir()), *map(str, source.paths)],
                       include_defaults=source.include_defaults, metadata=metadata)


@lru_cache(maxsize=8)
def known_tasks(source: TaskSource = TaskSource()) -> tuple[str, ...]:
    """Names of the tasks a cell can use (what :func:`task_manager` indexes; indexing lm-eval's
    stock tasks costs seconds, so each source is indexed once per process)."""
    return tuple(task_manager(None, source=source).all_tasks)


def check_task(name: str, where: str, known: Iterable[str] | None = None) -> None:
    """``TaskError`` naming ``where`` (``file: key``) unless ``name`` is one of ``known`` (default:
    :func:`known_tasks` of our own folder)."""
    import difflib

    from .errors import TaskError

    known = list(known_tasks() if known is None else known)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known[:20])}"
    raise TaskError(f"{where}: unknown lm-eval task, {hint} (got {name!r})")


ANSWER_METRIC = "answer"  # a benchmark's metric: judged by our answer checker under its answer_kind


@dataclass(frozen=True)
class Scoring:
    """How one benchmark's samples become 0/1 items: the task's per-item ``metric`` (None:
    ``exact_match``, else ``acc``, else the task's first metric; ``answer``: our answer checker,
    :func:`pytest_qmr.answers.is_equivalent`, under ``answer_kind``), the ``filter`` whose output it
    scored (None: the task's first), and an ``answer_kind`` (number | latex | choice) under which
    our answer extractor reads the response for Locate (None: the filter's output is the
    extracted answer). ``where`` names the benchmark in messages (``suite.yaml: benchmarks[0]``)."""

    metric: str | None = None
    filter: str | None = None
    answer_kind: str | None = None
    where: str = "benchmark"


def doc_item_id(doc: Any) -> str:
    """A stable item id: our ``qmr_id``, else the hash of the doc as lm-eval logs it (``doc_hash``)."""
    import json

    if isinstance(doc, dict) and "qmr_id" in doc:
        return str(doc["qmr_id"])
    from lm_eval.utils import handle_non_serializable, hash_string

    return "doc-" + hash_string(json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False))[:16]


def gold_text(target: Any, choices: list[str] | None) -> str:
    """The gold as text: a multiple-choice target index becomes the text of that choice."""
    if choices and isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
        return str(choices[target]).strip()
    if isinstance(target, list) and len(target) == 1:
        target = target[0]
    return str(target).strip()


@dataclass(frozen=True)
class ExpectedItem:
    """What a task will ask for one doc, known before any generation: the item id, the exact
    prompt text a record will carry (chat template applied) and the gold answer."""

    item_id: str
    doc_index: int
    prompt: str
    gold: str


def expected_items(task: str, indices: list[int], tokenizer, data_dir: Path | None,
                   seed: int = 0, source: TaskSource = TaskSource()) -> list[ExpectedItem]:
    """The prompts and golds lm-eval will build for ``indices`` of ``task`` (no model runs):
    the same ``build_all_requests`` path as :meth:`Evaluator.run`, with the tokenizer's chat
    template applied as lm-eval's HFLM applies it."""
    from .cache import render_chat

    def chat_template(history, add_generation_prompt: bool = True) -> str:
        return render_chat(tokenizer, history, add_generation_prompt)

    from .taskfiles import building

    manager = task_manager(data_dir, source=source)
    with building(task, manager):
        task_obj = manager.load(task)["tasks"][task]
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=seed)
        task_obj.build_all_requests(samples=sorted(set(indices)), rank=0, world_size=1, apply_chat_template=True,
                                    chat_template=chat_template, tokenizer_name="")
    multiple_choice = task_obj.get_config("output_type") == "multiple_choice"
    items: dict[int, ExpectedItem] = {}
    for inst in task_obj.instances:  # a multiple-choice doc has one instance per choice, one context
        doc, index = inst.doc, int(inst.doc_id)
        if index in items:
            continue
        if isinstance(doc, dict) and "qmr_gold" in doc:
            gold = str(doc["qmr_gold"])
        else:
            gold = gold_text(task_obj.doc_to_target(doc), task_obj.doc_to_choice(doc) if multiple_choice else None)
        items[index] = ExpectedItem(item_id=doc_item_id(doc), doc_index=index, prompt=inst.arguments[0], gold=gold)
    return [items[i] for i in sorted(items)]


def record_from_sample(sample: dict, output_type: str, scoring: Scoring = Scoring(), task: str = "") -> SampleRecord:
    """One logged sample of ``simple_evaluate(..., log_samples=True)`` as a record. Our tasks'
    samples go through ``tasks.utils.read_sample``; any other task's through :class:`Scoring`."""
    doc = sample["doc"]
    from .tasks.utils import logged_prompt, read_sample

    if isinstance(doc, dict) and "qmr_id" in doc and scoring.metric in (None, "exact_match"):
        return SampleRecord(**read_sample(sample))
    arguments, resps = sample["arguments"], sample["resps"]
    prompt = logged_prompt(sample)
    if output_type == "multiple_choice":
        choices = [str(args[1]) for args in arguments]
        chosen = max(range(len(resps)), key=lambda i: float(resps[i][0][0]))
        response = extracted = choices[chosen].strip()
        gold = gold_text(sample["target"], [c.strip() for c in choices])
    else:
        response = resps[0][0] if resps and resps[0] else ""
        filtered = sample.get("filtered_resps") or [""]
        extracted = str(filtered[0]) if filtered[0] is not None else None
        gold = gold_text(sample["target"], None)
    if scoring.answer_kind is not None:
        from .answers import extract_answer

        extracted = extract_answer(response, scoring.answer_kind)
    return SampleRecord(item_id=doc_item_id(doc), doc_index=int(sample["doc_id"]), prompt=prompt, response=response,
                        extracted=extracted, gold=gold, correct=_correct(sample, output_type, scoring, task, extracted,
                                                                         gold))


def graded_record(sample: dict, output_type: str, settings: GenerationSettings, scoring: Scoring = Scoring(),
                  task: str = "", count_tokens: Callable[[str], int] | None = None,
                  think: tuple[str, str] | None = None) -> SampleRecord:
    """One logged sample of a sampled cell (lm-eval ``repeats``: its ``resps`` hold the item's ``k``
    answers in seed order) or of a thinking model, as a record with every answer graded by
    :mod:`pytest_qmr.answers`. ``think`` (start and end tag): each answer is read only after its
    end tag (:func:`pytest_qmr.sampling.split_thinking`); one whose thinking never closed is
    ``truncated`` and wrong, never parsed from the half trace."""
    from .answers import extract_answer, is_equivalent
    from .errors import TaskError
    from .sampling import sample_seed, split_thinking

    doc = sample["doc"]
    ours = isinstance(doc, dict) and "qmr_kind" in doc
    kind = doc["qmr_kind"] if ours else scoring.answer_kind
    if output_type != "generate_until" or kind is None:
        raise TaskError(f"{scoring.where}.answer_kind: sampled or thinking answers are graded by the answer checker, "
                        f"which needs a generate_until task and the benchmark's answer_kind (task {task}: "
                        f"{output_type}, answer_kind {kind})")
    gold = doc["qmr_gold"] if ours else gold_text(sample["target"], None)
    from .tasks.utils import logged_prompt

    prompt = logged_prompt(sample)
    texts = [str(t) for t in (sample["resps"][0] if sample.get("resps") else [])]
    item_id = doc_item_id(doc)
    answers = []
    for j, text in enumerate(texts):
        answer: dict[str, Any] = {"response": text}
        if think is not None:
            thought = split_thinking(text, *think)
            extracted = None if thought.truncated else extract_answer(thought.answer, kind)
            answer.update(truncated=thought.truncated,
                          thinking_tokens=count_tokens(thought.thinking) if count_tokens else None)
        else:
            extracted = extract_answer(text, kind)
        answer.update(extracted=extracted, correct=is_equivalent(extracted, gold, kind),
                      tokens=count_tokens(text) if count_tokens else None,
                      seed=sample_seed(settings.seed, item_id, j) if settings.sampled else None)
        answers.append(answer)
    first = answers[0] if answers else {"response": "", "extracted": None, "correct": False}
    return SampleRecord(item_id=item_id, doc_index=int(sample["doc_id"]), prompt=prompt, response=first["response"],
                        extracted=first["extracted"], gold=gold, correct=bool(first["correct"]), samples=answers,
                        score=sum(a["correct"] for a in answers) / len(answers) if answers else 0.0)


def _correct(sample: dict, output_type: str, scoring: Scoring, task: str, extracted: str | None, gold: str) -> bool:
    """The item's 0/1: the task's own per-item metric, or (``metric: answer``) our answer checker."""
    from .errors import TaskError

    if scoring.metric == ANSWER_METRIC:
        if scoring.answer_kind is None or output_type == "multiple_choice":
            raise TaskError(f"{scoring.where}.metric: 'answer' needs a generate_until task and the benchmark's "
                            f"answer_kind (task {task}: {output_type}, answer_kind {scoring.answer_kind})")
        from .answers import is_equivalent

        return is_equivalent(extracted, gold, scoring.answer_kind)
    metrics = [m for m in sample.get("metrics", []) if m in sample]
    metric = scoring.metric or next((m for m in ("exact_match", "acc") if m in metrics),
                                    metrics[0] if metrics else None)
    if metric not in sample:
        raise TaskError(f"{scoring.where}.metric: task {task} has no per-item metric {metric!r} "
                        f"(it has: {', '.join(metrics) or 'none'})")
    value = sample[metric]
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise TaskError(f"{scoring.where}.metric: task {task}'s {metric!r} is not a per-item 0/1 score, the gate "
                    f"pairs items by correctness (got {value!r})")


def select_filter(samples: list[dict], scoring: Scoring, task: str) -> list[dict]:
    """The samples of one filter (a task logs each doc once per filter in its ``filter_list``)."""
    from .errors import TaskError

    filters = list(dict.fromkeys(s.get("filter", "none") for s in samples))
    chosen = scoring.filter or (filters[0] if filters else None)
    if filters and chosen not in filters:
        raise TaskError(f"{scoring.where}.filter: task {task} has no filter {chosen!r} (it has: {', '.join(filters)})")
    return [s for s in samples if s.get("filter", "none") == chosen]


@contextmanager
def remote_failures_as_one_line(lm) -> Iterator[None]:
    """A request to an API backend that failed for good (refused, 4xx/5xx after lm-eval's
    retries, timed out) is a :class:`ModelError` line naming the backend and the endpoint, not a
    traceback; when the server we started died meanwhile (``lm.diagnose()``), the line says so."""
    if getattr(lm, "base_url", None) is None:  # in process: nothing remote can fail
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
        endpoint = lm.base_url  # now: the live server's URL once it started
        backend = getattr(lm, "backend", None) or "openai"
        diagnose = getattr(lm, "diagnose", None)
        died = diagnose() if callable(diagnose) else None
        cause = f"{died}; " if died else ""
        raise ModelError(f"backend {backend}: {cause}generation at {endpoint} failed "
                         f"({type(exc).__name__}: {detail})") from None


@lru_cache(maxsize=1)
def _environment_info() -> tuple[tuple[str, Any], ...]:
    from lm_eval.loggers.utils import add_env_info

    info: dict[str, Any] = {}
    add_env_info(info)
    return tuple(info.items())


@contextmanager
def _environment_described_once() -> Iterator[None]:
    """lm-eval's ``simple_evaluate`` describes the environment on every call (torch's
    ``collect_env``: ``pip list`` and other subprocesses, ~0.6 s here, more than a fully cached
    chunk takes); the description is the same for the whole process, so it is made once."""
    import lm_eval.evaluator as evaluator

    real = evaluator.add_env_info
    evaluator.add_env_info = lambda storage: storage.update(_environment_info())
    try:
        yield
    finally:
        evaluator.add_env_info = real


class Evaluator:
    """One lm-eval harness around a model; reused across chunks of one cell.

    By default the model is an in-memory transformers model (lm-eval ``HFLM``, the ``hf``
    engine); ``lm`` passes any other lm-eval model instead (see :mod:`pytest_qmr.engines`),
    with ``render_prompt`` turning its logged prompts into the text the hf engine records and
    ``served`` saying what answered.
    """

    def __init__(self, model, tokenizer, generation: GenerationSettings, data_dir: Path | None,
                 task_metadata: dict | None = None, *, lm=None,
                 render_prompt: Callable[[Any], str] | None = None, source: TaskSource = TaskSource(),
                 served: Callable[[], dict | None] | None = None,
                 count_tokens: Callable[[str], int] | None = None, think: tuple[str, str] | None = None) -> None:
        self.generation = generation
        self.output_types: dict[str, str] = {}  # task -> lm-eval output_type, once it has run
        if lm is None:
            from .engines.hf import hf_lm

            lm = hf_lm(model, tokenizer, generation.batch_size)
        self.lm = lm
        self.render_prompt = render_prompt
        self.manager = task_manager(data_dir, task_metadata, source)
        self._served = served
        self.count_tokens = count_tokens  # a sampled answer's length in tokens
        self.think = think  # a thinking model's (start, end) tags: answers are read after the end tag

    def served(self) -> dict | None:
        """What answered (the engine's record: endpoint, served model, engine), None in process."""
        return self._served() if self._served is not None else None

    def run(self, task: str, indices: list[int] | None = None, limit: int | None = None,
            seed: int = 0, scoring: Scoring = Scoring()) -> list[SampleRecord]:
        """Generate for the given doc indices (or the first ``limit`` docs), chat-formatted, greedy
        or ``samples`` seeded answers per item (lm-eval's ``repeats``; a multiple-choice task: the
        log-likelihood of each choice)."""
        from lm_eval import simple_evaluate

        from .errors import TaskError
        from .taskfiles import building

        kwargs: dict[str, Any] = {"samples": {task: list(indices)}} if indices is not None else {"limit": limit}
        with (remote_failures_as_one_line(self.lm), _environment_described_once(),
              building(task, self.manager)):
            output = simple_evaluate(
                model=self.lm,
                tasks=[self._repeated(task)] if self.generation.sampled else [task],
                task_manager=self.manager,
                apply_chat_template=True,
                gen_kwargs=self.generation.gen_kwargs(),
                log_samples=True,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                verbosity="WARNING",
                **kwargs,
            )
        if task not in output["samples"]:
            subtasks = ", ".join(sorted(output["samples"])[:5])
            raise TaskError(f"{scoring.where}.task: {task!r} is a group of lm-eval tasks; a cell gates one task "
                            f"(e.g. {subtasks})")
        output_type = output["configs"][task].get("output_type", "generate_until")
        self.output_types[task] = output_type
        samples = select_filter(output["samples"][task], scoring, task)
        if self.generation.sampled or self.think is not None:
            records = [graded_record(s, output_type, self.generation, scoring, task, self.count_tokens, self.think)
                       for s in samples]
        else:
            records = [record_from_sample(s, output_type, scoring, task) for s in samples]
        if self.render_prompt is not None:
            for record in records:
                record.prompt = self.render_prompt(record.prompt)
        return sorted(records, key=lambda r: r.doc_index)

    def _repeated(self, task: str):
        """The task asking ``samples`` answers per doc (lm-eval's ``repeats``: each request k times,
        in a row, the ``j``-th seeded as sample ``j`` by the generation cache's LM)."""
        loaded = self.manager.load(task)["tasks"]
        if task not in loaded:  # a group: simple_evaluate's samples say so in one line below
            return task
        loaded[task].set_config(key="repeats", value=self.generation.samples)
        return loaded[task]

    def run_sequential(self, task: str, indices: list[int], chunk: int, seed: int,
                       should_stop: Callable[[list[SampleRecord]], bool],
                       scoring: Scoring = Scoring()) -> list[SampleRecord]:
        """Evaluate in chunks, asking ``should_stop`` after each whether the verdict is settled."""
        records: list[SampleRecord] = []
        for start in range(0, len(indices), chunk):
            records += self.run(task, indices[start:start + chunk], seed=seed, scoring=scoring)
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

