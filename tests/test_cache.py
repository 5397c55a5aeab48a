"""The generation cache: a key that changes with every part of what a response depends on, warm
evaluations that never load the model and re-score stored text, corrupt entries regenerated,
parallel workers on one cache, the adapter cache and ``qmr cache``."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from pytest_qmr.cache import (CacheStats, GenerationCache, cached_adapter, request_key, select_evictions, area_entries)

N_ITEMS = 4
SUITE = """
name: cache
data_dir: {data_dir}
models:
  - name: smollm2-135m-arith
    ref: embedded:smollm2-135m-arith
quantizers:
  - name: fp
    method: fp
benchmarks:
  - name: arith
    task: qmr_arith
    limit: {n}
generation:
  max_new_tokens: {tokens}
  batch_size: {batch}
"""


def _cell(tmp_path: Path, data_dir: Path, tokens: int = 24, batch: int = 4):
    from pytest_qmr.suite import load_suite

    path = tmp_path / f"cache-{tokens}-{batch}.yaml"
    path.write_text(SUITE.format(data_dir=data_dir, n=N_ITEMS, tokens=tokens, batch=batch))
    (cell,) = load_suite(path).cells()
    return cell


def _session(tmp_path: Path, generations: Path, use_cache: bool = True):
    from pytest_qmr.session import QmrSession

    return QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=tmp_path / "baselines",
                      cache_dir=generations, use_cache=use_cache)


def _run(session, path: Path, cell):
    """The cell's first items through the session's cached evaluator: (records, stats, model loaded?)."""
    evaluator = session.evaluator(path, cell)
    records = evaluator.run(cell.benchmark.task, indices=list(range(N_ITEMS)), seed=cell.benchmark.seed)
    return records, evaluator.lm.stats, bool(session._loaded)


# --------------------------------------------------------------------------------- the key


BASE_IDENTITY = {"backend": "hf", "weights": "a" * 16, "adapter": None, "device": "cpu", "dtype": "float32",
                 "batch_size": 20, "seed": 0, "engine": {"lm_eval": "0.4", "transformers": "5", "torch": "2.13"},
                 "served": None}
BASE_ARGS = ("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
             {"until": ["<|im_end|>"], "max_gen_toks": 96, "do_sample": False})


@pytest.mark.parametrize("part, identity, request_type, args", [
    ("weights", {"weights": "b" * 16}, None, None),
    ("adapter", {"adapter": "c" * 16}, None, None),
    ("backend", {"backend": "openai"}, None, None),
    ("dtype", {"dtype": "bfloat16"}, None, None),
    ("device", {"device": "cuda:0"}, None, None),
    ("batch size", {"batch_size": 1}, None, None),
    ("seed", {"seed": 1}, None, None),
    ("engine version", {"engine": {**BASE_IDENTITY["engine"], "torch": "2.14"}}, None, None),
    ("served model", {"served": {"endpoint": "http://h/v1", "model": "qmr-x"}}, None, None),
    ("prompt", {}, None, (BASE_ARGS[0].replace("2+3", "2+4"), BASE_ARGS[1])),
    ("max_gen_toks", {}, None, (BASE_ARGS[0], {**BASE_ARGS[1], "max_gen_toks": 97})),
    ("until", {}, None, (BASE_ARGS[0], {**BASE_ARGS[1], "until": ["<|im_end|>", "\n\n"]})),
    ("do_sample", {}, None, (BASE_ARGS[0], {**BASE_ARGS[1], "do_sample": True})),
    ("temperature", {}, None, (BASE_ARGS[0], {**BASE_ARGS[1], "temperature": 0.7})),
    ("request type", {}, "loglikelihood", None),
])
def test_the_key_changes_with_each_part_of_what_a_response_depends_on(part, identity, request_type, args):
    base = request_key(BASE_IDENTITY, "generate_until", BASE_ARGS)
    assert base == request_key(dict(BASE_IDENTITY), "generate_until", tuple(BASE_ARGS))  # stable
    changed = request_key({**BASE_IDENTITY, **identity}, request_type or "generate_until", args or BASE_ARGS)
    assert changed != base, part


def test_a_chat_request_is_keyed_by_its_messages():
    from lm_eval.models.api_models import JsonChatStr

    one = request_key(BASE_IDENTITY, "generate_until", (JsonChatStr('[{"role": "user", "content": "2+3"}]'), {}))
    two = request_key(BASE_IDENTITY, "generate_until", (JsonChatStr('[{"role": "user", "content": "2+4"}]'), {}))
    assert one != two


# --------------------------------------------------------------------------------- real evaluations


def test_a_warm_evaluation_loads_no_model_and_only_its_own_checkpoint_hits(lab_model, cache_dir, data_dir,
                                                                           tmp_path):
    """The lm-eval bug class (a cache keyed without the model or the generation settings) on real
    models: another checkpoint, another max_new_tokens or batch size never reads this one's entries."""
    from pytest_qmr import models

    generations, cell = tmp_path / "gen", _cell(tmp_path, data_dir)
    cold, stats, loaded = _run(_session(tmp_path, generations), lab_model.path, cell)
    assert (stats.items, stats.items_from_cache, stats.corrupt, loaded) == (N_ITEMS, 0, 0, True)
    assert stats.generated_tokens > 0 and stats.tok_per_s > 0

    warm, stats, loaded = _run(_session(tmp_path, generations), lab_model.path, cell)
    assert (stats.items_from_cache, stats.requests_from_cache, loaded) == (N_ITEMS, N_ITEMS, False)
    assert [r.to_dict() for r in warm] == [r.to_dict() for r in cold]

    base = models.resolve("embedded:smollm2-135m", cache_dir)  # other weights, same tokenizer and prompts
    other, stats, _ = _run(_session(tmp_path, generations), base.path, cell)
    assert stats.items_from_cache == 0
    assert [r.prompt for r in other] == [r.prompt for r in cold]
    assert [r.response for r in other] != [r.response for r in cold]  # answered by the other model

    for changed in (_cell(tmp_path, data_dir, tokens=20), _cell(tmp_path, data_dir, batch=2)):
        _, stats, _ = _run(_session(tmp_path, generations), lab_model.path, changed)
        assert stats.items_from_cache == 0

    _, stats, loaded = _run(_session(tmp_path, generations, use_cache=False), lab_model.path, cell)
    assert (stats.items_from_cache, loaded) == (0, True)  # --qmr-no-cache: nothing read


def _entry_of(generations: Path, response: str) -> Path:
    (path,) = [p for p in (generations / "generations").glob("*/*.json")
               if json.loads(p.read_text())["value"] == response]
    return path


def test_a_hit_is_rescored_and_a_corrupt_entry_is_regenerated(lab_model, data_dir, tmp_path):
    from pytest_qmr.answers import extract_answer, is_equivalent
    from pytest_qmr.fsutil import sha256_json

    generations, cell = tmp_path / "gen", _cell(tmp_path, data_dir)
    cold, _, _ = _run(_session(tmp_path, generations), lab_model.path, cell)

    # a stored response is scored again by today's checker: rewrite one entry (validly) to the gold
    entry = _entry_of(generations, cold[0].response)
    data = json.loads(entry.read_text())
    data["value"] = f"Step 1: the answer is {cold[0].gold}.\nFinal answer: {cold[0].gold}"
    data["check"] = sha256_json({"key": data["key"], "value": data["value"]})
    entry.write_text(json.dumps(data))
    rescored, stats, loaded = _run(_session(tmp_path, generations), lab_model.path, cell)
    assert (stats.items_from_cache, loaded) == (N_ITEMS, False)
    assert rescored[0].response == data["value"]
    assert rescored[0].correct is True is is_equivalent(extract_answer(data["value"], "number"), cold[0].gold,
                                                       "number")

    # a torn or edited entry does not verify: it is counted, deleted and regenerated
    torn, edited = _entry_of(generations, cold[1].response), _entry_of(generations, cold[2].response)
    torn.write_text(torn.read_text()[:40])
    edited.write_text(edited.read_text().replace(json.dumps(cold[2].response)[1:-1][:5], "XXXXX", 1))
    again, stats, loaded = _run(_session(tmp_path, generations), lab_model.path, cell)
    assert (stats.corrupt, stats.items_from_cache, loaded) == (2, N_ITEMS - 2, True)
    assert [r.response for r in again[1:3]] == [r.response for r in cold[1:3]]  # greedy: the same text again
    cache = GenerationCache(generations)
    for path in (torn, edited):
        assert cache.get(json.loads(path.read_text())["key"])[1] is False  # rewritten, verifies


# --------------------------------------------------------------------------------- parallel workers


WORKERS = """
import json
from pathlib import Path

import pytest

from pytest_qmr.cache import GenerationCache

ROOT = Path({root!r})
IDENTITY = {{"weights": "w", "seed": 0}}


@pytest.mark.parametrize("worker", range(4))
def test_hammer(worker):
    cache = GenerationCache(ROOT)
    args = [(f"prompt {{i}}", {{"max_gen_toks": 8}}) for i in range(300)]
    for _ in range(3):
        values, stats = cache.map(IDENTITY, "generate_until", args,
                                  lambda missing: [f"answer {{i}} " * 20 for i in missing])
        assert values == [f"answer {{i}} " * 20 for i in range(300)]
        assert stats.corrupt == 0
"""


def test_two_xdist_workers_on_one_cache_corrupt_nothing(pytester, tmp_path):
    pytest.importorskip("xdist")
    root = tmp_path / "shared-cache"
    pytester.makepyfile(test_workers=WORKERS.format(root=str(root)))
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    files = list((root / "generations").glob("*/*"))
    assert len(files) == 300 and all(f.suffix == ".json" for f in files)  # no temporary file left behind
    cache = GenerationCache(root)
    values, stats = cache.map({"weights": "w", "seed": 0}, "generate_until",
                              [(f"prompt {i}", {"max_gen_toks": 8}) for i in range(300)],
                              lambda missing: pytest.fail(f"{len(missing)} entries missing"))
    assert stats.requests_from_cache == 300 and stats.corrupt == 0


# --------------------------------------------------------------------------------- adapters


def test_an_adapter_is_reused_only_while_its_inputs_and_files_are_unchanged(tmp_path):
    trained = []

    def train(out: Path):
        def run() -> dict:
            trained.append(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "adapter_model.safetensors").write_bytes(os.urandom(64))
            card = {"steps": 4, "adapter_path": str(out)}
            (out / "qmr_card.json").write_text(json.dumps(card))
            return card
        return run

    inputs = {"base": "q" * 16, "pairs_sha256": "p" * 64, "config": {"learning_rate": 1e-3}}
    first = cached_adapter(tmp_path / "c", inputs, tmp_path / "a1", train(tmp_path / "a1"))
    second = cached_adapter(tmp_path / "c", inputs, tmp_path / "a2", train(tmp_path / "a2"))
    assert (first["cache_hit"], second["cache_hit"], len(trained)) == (False, True, 1)
    assert second["adapter_path"] == str(tmp_path / "a2")
    weights = "adapter_model.safetensors"
    assert (tmp_path / "a2" / weights).read_bytes() == (tmp_path / "a1" / weights).read_bytes()

    other = cached_adapter(tmp_path / "c", {**inputs, "config": {"learning_rate": 2e-3}}, tmp_path / "a3",
                           train(tmp_path / "a3"))
    assert other["cache_hit"] is False and len(trained) == 2

    (entry,) = [p for p in (tmp_path / "c" / "adapters").glob("[!.]*")
                if json.loads((p / "qmr_manifest.json").read_text())["inputs"] == inputs]
    (entry / weights).write_bytes(os.urandom(64))  # tampered: not trusted
    again = cached_adapter(tmp_path / "c", inputs, tmp_path / "a4", train(tmp_path / "a4"))
    assert again["cache_hit"] is False and len(trained) == 3
    off = cached_adapter(tmp_path / "c", inputs, tmp_path / "a5", train(tmp_path / "a5"), enabled=False)
    assert off["cache_hit"] is False and len(trained) == 4


# --------------------------------------------------------------------------------- qmr cache


def _fill(root: Path, n: int, age_days: float) -> list[Path]:
    cache, paths = GenerationCache(root), []
    for i in range(n):
        key = request_key({"age": age_days}, "generate_until", (f"p{i}", {}))
        cache.put(key, "x" * 1000, {})
        paths.append(cache.path(key))
        stamp = time.time() - age_days * 86400 - i
        os.utime(paths[-1], (stamp, stamp))
    return paths


def test_qmr_cache_lists_and_clears_by_age_and_size(tmp_path, capsys):
    from pytest_qmr.cli import main

    root = tmp_path / "cache"
    old, new = _fill(root, 3, age_days=10), _fill(root, 2, age_days=0)
    adapter = root / "adapters" / "k1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"0" * 10)

    assert main(["cache", "ls", "--cache-dir", str(root)]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"generations +5 entries", listing) and re.search(r"adapters +1 entries", listing)

    assert main(["cache", "clear", "--cache-dir", str(root), "--area", "generations", "--older-than-days", "5"]) == 0
    assert "removed 3 of 5 entries" in capsys.readouterr().out
    assert not any(p.exists() for p in old) and all(p.exists() for p in new) and adapter.is_dir()

    assert main(["cache", "clear", "--cache-dir", str(root), "--max-size-gb", "0.0000015"]) == 0  # 1.5 KB
    assert "removed 1 of 3 entries" in capsys.readouterr().out  # the least recently used; 1.2 KB + 10 B fit
    assert [p.exists() for p in new] == [True, False] and adapter.is_dir()

    assert main(["cache", "clear", "--cache-dir", str(root), "--older-than-days", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "qmr cache: clear --older-than-days: must be >= 0 (got -1.0)"
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert area_entries(root, "generations") == [] == area_entries(root, "adapters")


def test_evictions_keep_the_most_recently_used():
    from pytest_qmr.cache import Entry

    entries = [Entry("generations", Path(f"/c/{i}"), size=400_000_000, mtime=1000.0 + i) for i in range(5)]
    doomed = select_evictions(entries, None, max_size_gb=1.0, now=2000.0)
    assert [e.path.name for e in doomed] == ["0", "1", "2"]
    assert select_evictions(entries, older_than_days=0.01, max_size_gb=None, now=1000.0 + 864.5) == entries[:1]


def test_stats_add_up():
    total = CacheStats()
    total.add(CacheStats(items=4, items_from_cache=3, requests=4, requests_from_cache=3, generated_tokens=10,
                         generate_seconds=2.0))
    total.add(CacheStats(items=2, items_from_cache=2, requests=2, requests_from_cache=2))
    assert (total.items, total.items_from_cache, total.tok_per_s) == (6, 5, 5.0)


# --------------------------------------------------------------------------------- device and dtype


def test_auto_device_and_dtype_resolve_to_what_this_machine_has():
    import torch

    from pytest_qmr.engines.devices import Runtime, runtime
    from pytest_qmr.models import ModelError

    if torch.cuda.is_available():
        assert runtime() == Runtime("cuda", "bfloat16")
    else:
        assert runtime() == Runtime("cpu", "float32") == runtime("cpu", "auto")
        with pytest.raises(ModelError) as excinfo:
            runtime("cuda:1", "auto", "smoke.yaml: generation")
        assert str(excinfo.value) == ("smoke.yaml: generation.device: 'cuda:1' asked for, but no CUDA device is "
                                      "visible here (torch.cuda.is_available() is False); use auto or cpu")
    assert runtime("cpu", "bfloat16") == Runtime("cpu", "bfloat16")


def test_training_runs_on_the_runtime_device_in_its_precision():
    """Restore's DPO and qmr align: TrainingArguments on the CPU in fp32, or on the GPU in mixed precision."""
    from transformers import TrainingArguments

    from pytest_qmr.engines.devices import Runtime, runtime, trainer_device_args

    assert trainer_device_args(Runtime("cpu", "float32")) == {"use_cpu": True, "bf16": False, "fp16": False}
    assert trainer_device_args(Runtime("cuda", "bfloat16")) == {"use_cpu": False, "bf16": True, "fp16": False}
    assert trainer_device_args(Runtime("cuda:1", "float16")) == {"use_cpu": False, "bf16": False, "fp16": True}
    assert trainer_device_args() == trainer_device_args(runtime())
    args = TrainingArguments(output_dir="/tmp/x", report_to=[], **trainer_device_args(runtime()))
    assert args.device.type == runtime().device.split(":")[0]


def test_a_bfloat16_cell_runs_in_bfloat16_and_an_fp32_baseline_refuses_to_gate_it(lab_model, repo_root, data_dir,
                                                                                   tmp_path):
    """generation.dtype is honoured by the hf backend, keys the cache apart, is recorded, and a
    baseline made in fp32 (every committed one) does not silently gate a bf16 run."""
    import torch

    from pytest_qmr import baselines as bl
    from pytest_qmr.session import QmrSession
    from pytest_qmr.suite import load_suite

    generations = tmp_path / "gen"
    fp32 = _cell(tmp_path, data_dir)
    _, stats, _ = _run(_session(tmp_path, generations), lab_model.path, fp32)
    assert stats.items_from_cache == 0
    path = tmp_path / "bf16.yaml"
    path.write_text(SUITE.format(data_dir=data_dir, n=N_ITEMS, tokens=24, batch=4) + "  dtype: bfloat16\n")
    (bf16,) = load_suite(path).cells()
    session = _session(tmp_path, generations)
    records, stats, loaded = _run(session, lab_model.path, bf16)
    (model, _), = session._loaded.values()
    assert loaded and next(model.parameters()).dtype == torch.bfloat16
    assert stats.items_from_cache == 0 and len(records) == N_ITEMS  # fp32 entries are not bf16 answers

    # the committed baseline's settings (96 tokens, batch 20): only the dtype differs
    path.write_text(SUITE.format(data_dir=data_dir, n=N_ITEMS, tokens=96, batch=20) + "  dtype: bfloat16\n")
    (bf16,) = load_suite(path).cells()
    gate = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=repo_root / "baselines",
                      data_dir=data_dir, cache_dir=generations)
    with pytest.raises(bl.BaselineError) as excinfo:
        gate.run_cell(bf16)  # refused before any generation
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(str(repo_root / "baselines" / "smollm2-135m-arith"))
    assert ("dtype: baseline 'float32', current run 'bfloat16' (the model's dtype changed: a baseline gates runs "
            "in its own precision)") in message and "regenerate it with: pytest " in message
    assert not gate._loaded
    assert gate.run_cell(_cell(tmp_path, data_dir, tokens=96, batch=20)).runtime == {"device": "cpu",
                                                                                     "dtype": "float32"}
