"""What the schema cannot check field by field, each problem raised as one line (:func:`~.messages._fail`).

:func:`check_semantics` runs on every parsed suite: names unique per section and cell ids
unique; ``expect_fail_on`` / ``expect_inconclusive_on`` / ``benchmarks[i].quantizers`` /
``restore.quantizers`` / ``restore.benchmarks`` / ``generation.endpoints`` name this suite's
benchmarks and quantizers; each quantizer's fields fit its method's class in
``registry.QUANT_METHODS`` (required, unused, fixed bits, method options); built-in judges,
``locate.policy`` and error-profile thresholds are valid; ``restore.train``, ``restore.teacher``
and ``restore.variant`` are known (did-you-mean); a multiplicity ``family`` goes with
``mode: difference``; ``generation.vllm`` options are valid; ``artifact: compressed`` only for a
method that builds a checkpoint.  :func:`check_references` runs at
collection and looks outside the file: task folders, lm-eval tasks, recipes and the judge file.
The stage modules these checks consult are imported inside them, so reading a suite imports no torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from ..errors import QmrError
from ..registry import JUDGES, QUANT_METHODS
from .cells import Suite
from .messages import fail
from .schema import WEIGHT_BITS, QuantizerSpec, SuiteSpec


def _check_method_fields(source: str, key: str, q: QuantizerSpec) -> None:
    """What the quantizer's method (its QUANT_METHODS class) requires of and forbids in its fields."""
    method = QUANT_METHODS.get(q.method)
    for unused in method.unused:
        if unused in q.model_fields_set:
            fail(source, f"{key}.{unused}", f"not used by method {q.method} ({method.unused_because}); remove it",
                  getattr(q, unused))
    if method.needs_bits and q.bits is None:
        fail(source, f"{key}.bits", f"required for method {q.method}: one of 2, 3, 4, 8", "nothing", raw=True)
    if method.fixed_bits is not None and q.bits is not None and q.bits != method.fixed_bits:
        fail(source, f"{key}.bits", f"must be {method.fixed_bits} for method {q.method} ({method.scheme})", q.bits)
    if q.bits is not None and q.bits not in WEIGHT_BITS:
        fail(source, f"{key}.bits", "must be one of 2, 3, 4, 8", q.bits)
    if method.calibrated and q.calibration is None:
        fail(source, f"{key}.calibration",
              f"required for method {q.method}, e.g. {{dataset: gsm8k, samples: 64, seq_len: 512, seed: 0}}",
              "nothing", raw=True)
    if method.requires is not None and getattr(q, method.requires[0]) is None:
        fail(source, f"{key}.{method.requires[0]}", f"required for method {q.method}: {method.requires[1]}",
              "nothing", raw=True)
    if q.options:
        from ..quantize import QuantizeError, method_settings

        try:
            method_settings(q.method, q.options)
        except QuantizeError as exc:
            bad = next((k for k in q.options if repr(k) in str(exc) or f" {k} " in str(exc)), next(iter(q.options)))
            fail(source, f"{key}.options.{bad}", str(exc).split(": ", 1)[1].split(" (got ")[0], q.options[bad])
    owners: dict[str, list[str]] = {}  # a field some method requires -> the methods that take it
    for name, cls in QUANT_METHODS.items():
        if cls.requires is not None:
            owners.setdefault(cls.requires[0], []).append(name)
    for taken, names in owners.items():
        if q.method not in names and getattr(q, taken, None) is not None:
            fail(source, f"{key}.{taken}", f"only allowed for method {' or '.join(names)}, not {q.method}",
                  getattr(q, taken))


def check_semantics(source: str, spec: SuiteSpec) -> None:
    benchmark_names = [b.name for b in spec.benchmarks]
    for i, q in enumerate(spec.quantizers):
        key = f"quantizers[{i}]"
        for listed in ("expect_fail_on", "expect_inconclusive_on"):
            for j, name in enumerate(getattr(q, listed)):
                if name not in benchmark_names:
                    fail(source, f"{key}.{listed}[{j}]",
                          f"not a benchmark of this suite ({', '.join(benchmark_names)})", name)
        for j, name in enumerate(q.expect_inconclusive_on):
            if name in q.expect_fail_on:
                fail(source, f"{key}.expect_inconclusive_on[{j}]",
                      "also in expect_fail_on: a cell expects one verdict", name)
        _check_method_fields(source, key, q)

    for section in ("models", "quantizers", "benchmarks"):
        seen: dict[str, int] = {}
        for i, item in enumerate(getattr(spec, section)):
            if item.name in seen:
                fail(source, f"{section}[{i}].name", f"duplicate name, already used by {section}[{seen[item.name]}]",
                      item.name)
            seen[item.name] = i

    quantizer_names = [q.name for q in spec.quantizers]
    for i, b in enumerate(spec.benchmarks):
        for j, name in enumerate(b.quantizers or []):
            if name not in quantizer_names:
                fail(source, f"benchmarks[{i}].quantizers[{j}]",
                      f"not a quantizer of this suite ({', '.join(quantizer_names)})", name)
    _check_locate(source, spec)
    _check_restore(source, spec)
    _check_family(source, spec)
    _check_engines(source, spec)
    _check_sampling(source, spec)


def _check_sampling(source: str, spec: SuiteSpec) -> None:
    """k answers per item need a temperature: at 0 they are k copies of the greedy answer."""
    sections = [("generation", spec.generation, None)]
    sections += [(f"benchmarks[{i}].generation", b.generation, b) for i, b in enumerate(spec.benchmarks)
                 if b.generation is not None]
    for key, section, benchmark in sections:
        merged = section if benchmark is None else section.merged_on(spec.generation)
        if merged.samples > 1 and merged.temperature == 0:
            field = "samples" if "samples" in section.model_fields_set or benchmark is None else "temperature"
            fail(source, f"{key}.{field}", f"{merged.samples} samples per item at temperature 0 are "
                 f"{merged.samples} copies of the greedy answer; set a temperature (e.g. 0.6)",
                 getattr(merged, field))

    seen_ids: dict[str, str] = {}
    for mi, m in enumerate(spec.models):
        for qi, q in enumerate(spec.quantizers):
            for bi, b in enumerate(spec.benchmarks):
                cell_id = f"{m.name}-{q.name}-{b.name}"
                where = f"models[{mi}] x quantizers[{qi}] x benchmarks[{bi}]"
                if cell_id in seen_ids:
                    fail(source, f"models[{mi}].name",
                          f"cell id {cell_id!r} of {where} collides with {seen_ids[cell_id]}; rename one", m.name)
                seen_ids[cell_id] = where


def _check_engines(source: str, spec: SuiteSpec) -> None:
    """generation.vllm options, generation.endpoints names, and artifacts that exist."""
    from ..models import ModelError
    from ..engines.servers import check_vllm_options

    try:
        check_vllm_options(spec.generation.vllm)
    except ModelError as exc:
        key, _, problem = str(exc).partition(": ")
        fail(source, key, problem.split(" (got ")[0], spec.generation.vllm[key.rsplit(".", 1)[1]])
    from ..redact import register_url

    names = [q.name for q in spec.quantizers]
    for name, url in spec.generation.endpoints.items():
        register_url(url)  # a user:password in it is a secret from the moment the suite is read
        if name not in names:
            fail(source, f"generation.endpoints.{name}", f"not a quantizer of this suite ({', '.join(names)})", url)
    for i, q in enumerate(spec.quantizers):
        if q.artifact == "compressed" and not QUANT_METHODS.get(q.method).builds:
            fail(source, f"quantizers[{i}].artifact", f"method {q.method} builds no compressed checkpoint "
                  "(its checkpoint is evaluated as it is); remove it", q.artifact)


def _check_family(source: str, spec: SuiteSpec) -> None:
    """A multiplicity family adjusts p-values, which only the difference mode decides on."""
    sections = [("thresholds", spec.thresholds)]
    sections += [(f"benchmarks[{i}].thresholds", b.thresholds.merged_on(spec.thresholds))
                 for i, b in enumerate(spec.benchmarks) if b.thresholds is not None]
    for key, thresholds in sections:
        if thresholds.family != "none" and thresholds.mode == "noninferiority":
            fail(source, f"{key}.family", "adjusts p-values, so it needs mode: difference (noninferiority judges "
                  "each cell's interval)", thresholds.family)


def _check_restore(source: str, spec: SuiteSpec) -> None:
    from dataclasses import fields

    from ..registry import RESTORE_VARIANTS
    from ..restore import RestoreConfig, RestoreError, spec_problem

    r = spec.restore
    for section, names in (("quantizers", [q.name for q in spec.quantizers]),
                           ("benchmarks", [b.name for b in spec.benchmarks])):
        for j, name in enumerate(getattr(r, section) or []):
            if name not in names:
                fail(source, f"restore.{section}[{j}]",
                      f"not one of this suite's {section} ({', '.join(names)})", name)
    known = [f.name for f in fields(RestoreConfig)]
    for key, value in r.train.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            fail(source, f"restore.train.{key}", f"unknown setting, {hint}", value)
    try:
        RestoreConfig(**r.train)
    except (RestoreError, TypeError, ValueError) as exc:
        fail(source, "restore.train", str(exc), r.train)
    if (problem := spec_problem(r.teacher, spec.locate.judge_config)) is not None:
        fail(source, "restore.teacher", problem, r.teacher)
    if r.variant not in RESTORE_VARIANTS:
        fail(source, "restore.variant", RESTORE_VARIANTS.unknown(r.variant), r.variant)


def _judge_hint(name: str, configured: Sequence[str] = ()) -> str:
    """Did-you-mean over the registered judges (``registry.JUDGES``) and ``configured``, else them all."""
    close = JUDGES.closest(name, configured)
    return f"did you mean {close!r}?" if close else ", ".join((*JUDGES.names(), *configured))


def _check_locate(source: str, spec: SuiteSpec) -> None:
    from ..locate import LocateError, Policy, validate_thresholds

    for j, name in enumerate(spec.locate.judges):
        if name not in JUDGES and spec.locate.judge_config is None:
            fail(source, f"locate.judges[{j}]", f"not a built-in judge ({_judge_hint(name)}); "
                  "LLM judges need locate.judge_config", name)
    try:
        Policy.from_dict(spec.locate.policy)
    except (LocateError, TypeError) as exc:
        fail(source, "locate.policy", str(exc), spec.locate.policy)
    profiles = [("thresholds.error_profile", spec.thresholds.error_profile)]
    profiles += [(f"benchmarks[{i}].thresholds.error_profile", b.thresholds.error_profile)
                 for i, b in enumerate(spec.benchmarks) if b.thresholds is not None and b.thresholds.error_profile]
    for key, thresholds in profiles:
        try:
            validate_thresholds(thresholds)
        except ValueError as exc:
            bad = next(k for k in thresholds if str(k) in str(exc))
            fail(source, f"{key}.{bad}", str(exc).split(": ", 1)[1].split(", got ")[0], thresholds[bad])


def check_references(suite: Suite) -> None:
    """What the schema cannot see but collection must: every benchmark's ``task`` is a known
    lm-eval task (did-you-mean), every quantizer's ``recipe`` is a file, and
    ``locate.judge_config`` is a readable, valid judge file that configures every
    ``locate.judges`` name no judge is registered under (did-you-mean).
    Found here, a typo costs one line at collection instead of a traceback after evaluation."""
    from ..locate.judges import load_judge_settings
    from ..measure import check_task, known_tasks, tasks_dir
    from ..taskfiles import broken_files, definitions

    for key, given, folder in suite.task_folders():
        if not folder.is_dir():
            fail(suite.source, key, f"no such lm-eval task folder ({folder})", given)
    for i, quantizer in enumerate(suite.quantizers):
        recipe = suite.recipe_file(quantizer)
        if recipe is not None and not recipe.is_file():
            fail(suite.source, f"quantizers[{i}].recipe", f"no such file ({recipe})", quantizer.recipe)
    known = known_tasks(suite.task_source())
    folders = [tasks_dir(), *suite.task_source().paths]
    for i, benchmark in enumerate(suite.benchmarks):
        key = f"benchmarks[{i}].task"
        if benchmark.task not in known and (broken := broken_files(benchmark.task, folders)):
            path, why = broken[0]
            fail(suite.source, key, f"unknown lm-eval task: {path} names it but {why}", benchmark.task)
        check_task(benchmark.task, f"{suite.source}: {key}", known)
        defined = definitions(benchmark.task, folders)
        if len(defined) > 1:
            fail(suite.source, key, f"defined in {len(defined)} task folders ({', '.join(map(str, defined))}); "
                  "lm-eval would silently take the last one, rename one of them", benchmark.task)
    judge_config = suite.judge_config()
    if judge_config is not None:
        given = suite.spec.locate.judge_config
        if not judge_config.is_file():
            fail(suite.source, "locate.judge_config", f"no such file ({judge_config})", given)
        try:
            settings = load_judge_settings(judge_config)
        except QmrError as exc:
            fail(suite.source, "locate.judge_config", str(exc), given)
        for j, name in enumerate(suite.spec.locate.judges):
            if name not in JUDGES and name not in settings.judges:
                fail(suite.source, f"locate.judges[{j}]", f"neither a built-in judge nor one of {given} "
                      f"({_judge_hint(name, tuple(settings.judges))})", name)
