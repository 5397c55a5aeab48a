"""Quantization methods come from one registry (``pytest_qmr.registry.QUANT_METHODS``).

A method registered from this file (an RTN variant that leaves the MLP at full precision) is at
once a suite method, a pytest marker and a ``qmr quantize --method`` choice, and it runs through a
real cell. ``method: recipe`` runs an llmcompressor recipe YAML as written: the same W4 g64 scheme
as a recipe file gives RTN's weights bit for bit, and the file's content (not its place) keys the
cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_qmr.quantize import QuantSpec, cache_key, effective_recipe
from pytest_qmr.quantize.methods.rtn import RTN
from pytest_qmr.registry import QUANT_METHODS
from pytest_qmr.suite import SuiteError, check_references, load_suite

NEW = "rtn-attn"

SUITE = """
name: registry
data_dir: {data_dir}
models:
  - name: smollm2-135m-arith
    ref: embedded:smollm2-135m-arith
quantizers:
  - {{name: attn-w4g64, method: {method}, bits: 4, group_size: 64}}
benchmarks:
  - {{name: arith, task: qmr_arith, limit: {limit}, seed: 0}}
thresholds: {{min_items: {limit}, sequential: false}}
locate: {{enabled: false}}
generation:
  max_new_tokens: 96      # the committed baseline's settings (its provenance is checked)
  batch_size: 20
"""

# W4 symmetric, groups of 64 (which divides SmolLM2's 576 and 1536 columns): rtn-w4g64 as a recipe
RECIPE = """\
default_stage:
  default_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""


class AttentionOnlyRTN(RTN):
    """RTN on the attention projections only: the MLP stays at full precision."""

    def recipe(self, spec: QuantSpec) -> dict:
        recipe = super().recipe(spec)
        recipe["ignore"] = [*recipe["ignore"], "re:.*mlp.*"]
        return recipe


@pytest.fixture
def new_method():
    QUANT_METHODS.register(NEW)(AttentionOnlyRTN)
    try:
        yield NEW
    finally:
        QUANT_METHODS.remove(NEW)


def _suite(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_registered_method_is_a_suite_method_a_marker_and_a_cli_choice(new_method, tmp_path, data_dir, pytestconfig):
    from pytest_qmr.cli import build_parser
    from pytest_qmr.plugin import register_method_markers

    suite = load_suite(_suite(tmp_path, SUITE.format(data_dir=data_dir, method=new_method, limit=8)))
    assert [c.quantizer.method for c in suite.cells()] == [new_method]
    no_bits = _suite(tmp_path, SUITE.format(data_dir=data_dir, method=new_method, limit=8).replace("bits: 4, ", ""),
                     "no-bits.yaml")
    with pytest.raises(SuiteError) as excinfo:  # needs_bits is inherited from RTN
        load_suite(no_bits)
    assert _one_line(excinfo).endswith(f"quantizers[0].bits: required for method {new_method}: one of 2, 3, 4, 8 "
                                       "(got nothing)")
    typo = _suite(tmp_path, SUITE.format(data_dir=data_dir, method="rtn-atn", limit=8), "typo.yaml")
    with pytest.raises(SuiteError) as excinfo:
        load_suite(typo)
    assert f"{new_method}, did you mean '{new_method}'? (got 'rtn-atn')" in _one_line(excinfo)

    register_method_markers(pytestconfig)
    assert f"{new_method}: qmr cells quantized with method {new_method}" in pytestconfig.getini("markers")
    args = build_parser().parse_args(["quantize", "--method", new_method])
    assert args.method == new_method

    recipe = effective_recipe(QuantSpec(method=new_method, bits=4, group_size=64))
    assert recipe["method"] == new_method and recipe["ignore"] == ["lm_head", "re:.*mlp.*"]
    QUANT_METHODS.remove(new_method)
    with pytest.raises(SuiteError) as excinfo:  # gone with its registration
        load_suite(_suite(tmp_path, SUITE.format(data_dir=data_dir, method=new_method, limit=8), "gone.yaml"))
    assert _one_line(excinfo).endswith("must be one of fp, rtn, gptq, awq, smoothquant, checkpoint, recipe "
                                       f"(got '{new_method}')")


def test_recipe_method_suite_checks(tmp_path, data_dir):
    base = SUITE.format(data_dir=data_dir, method="rtn", limit=8)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "w4g64.yaml").write_text(RECIPE)
    cases = {
        "{name: r, method: recipe}": "quantizers[0].recipe: required for method recipe: an llmcompressor recipe "
                                     "YAML file, relative to the suite file (got nothing)",
        "{name: r, method: recipe, recipe: recipes/w4g64.yaml, bits: 4}":
            "quantizers[0].bits: not used by method recipe (the recipe file sets it); remove it (got 4)",
        "{name: r, method: rtn, bits: 4, recipe: recipes/w4g64.yaml}":
            "quantizers[0].recipe: only allowed for method recipe, not rtn (got 'recipes/w4g64.yaml')",
    }
    for quantizer, message in cases.items():
        path = _suite(tmp_path, base.replace("{name: attn-w4g64, method: rtn, bits: 4, group_size: 64}", quantizer))
        with pytest.raises(SuiteError) as excinfo:
            load_suite(path)
        assert _one_line(excinfo) == f"{path}: {message}"

    good = _suite(tmp_path, base.replace("{name: attn-w4g64, method: rtn, bits: 4, group_size: 64}",
                                         "{name: r, method: recipe, recipe: recipes/w4g64.yaml}"))
    cell = load_suite(good).cells()[0]
    assert cell.recipe_file == tmp_path / "recipes" / "w4g64.yaml"  # relative to the suite file
    missing = _suite(tmp_path, good.read_text().replace("w4g64.yaml", "w4g32.yaml"), "missing.yaml")
    with pytest.raises(SuiteError) as excinfo:
        check_references(load_suite(missing))
    assert _one_line(excinfo) == (f"{missing}: quantizers[0].recipe: no such file "
                                  f"({tmp_path / 'recipes' / 'w4g32.yaml'}) (got 'recipes/w4g32.yaml')")


def test_recipe_content_keys_the_cache(tmp_path):
    first, moved, edited = tmp_path / "a.yaml", tmp_path / "b" / "a.yaml", tmp_path / "c.yaml"
    moved.parent.mkdir()
    first.write_text(RECIPE)
    moved.write_text(RECIPE)
    edited.write_text(RECIPE.replace("group_size: 64", "group_size: 32"))
    keys = [cache_key("fp", QuantSpec(method="recipe", recipe=str(p))) for p in (first, moved, edited)]
    assert keys[0] == keys[1] != keys[2]
    recipe = effective_recipe(QuantSpec(method="recipe", recipe=str(first)))
    from pytest_qmr.fsutil import sha256_text

    assert recipe["recipe_sha256"] == sha256_text(RECIPE) and recipe["calibration"] is None
    from pytest_qmr.calibration import CalibrationSpec
    from pytest_qmr.quantize import QuantizeError

    calibrated = effective_recipe(QuantSpec(method="recipe", recipe=str(first), calibration=CalibrationSpec()))
    assert calibrated["calibration"] == CalibrationSpec().as_dict()  # calibration: given -> used
    with pytest.raises(QuantizeError, match="cannot read recipe file"):
        effective_recipe(QuantSpec(method="recipe", recipe=str(tmp_path / "none.yaml")))


@pytest.fixture
def private_quant_cache(tmp_path, cache_dir) -> Path:
    """A cache whose models are the real cache's (built once) and whose quantized entries are this test's."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(Path(cache_dir) / "models", target_is_directory=True)
    return root


def test_new_method_runs_through_a_real_cell(new_method, lab_model, data_dir, repo_root, private_quant_cache, tmp_path,
                                             one_torch_thread):
    from pytest_qmr.session import QmrSession

    suite_file = _suite(tmp_path, SUITE.format(data_dir=data_dir, method=new_method, limit=8))
    cell = load_suite(suite_file).cells()[0]
    session = QmrSession(rootdir=tmp_path, run_dir=tmp_path / "run", baselines_dir=repo_root / "baselines",
                         data_dir=data_dir, cache_dir=private_quant_cache, use_cache=False)
    try:
        result = session.run_cell(cell)
    finally:
        session.close()
    assert result.quantization["method"] == new_method and result.quantization["cache_hit"] is False
    assert result.n == 8 and result.gate is not None
    skipped = result.quantization["skipped"]
    assert "model.layers.0.mlp.down_proj" in skipped and "model.layers.0.self_attn.q_proj" not in skipped
    assert result.quantization["group_sizes_used"] == {"64": 4 * 30}  # q, k, v, o in each of 30 layers


def test_recipe_file_builds_what_rtn_builds(lab_model, cache_dir, private_quant_cache, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from pytest_qmr.quantize import quantize

    path = tmp_path / "w4g64.yaml"
    path.write_text(RECIPE)
    built = quantize(lab_model.path, lab_model.fingerprint, QuantSpec(method="recipe", recipe=str(path)),
                     private_quant_cache)
    info = built.info
    assert info["method"] == "recipe" and info["recipe"]["recipe_sha256"] and info["cache_hit"] is False
    assert info["group_sizes_used"] == {"64": 7 * 30} and list(info["skipped"]) == ["lm_head"]
    assert json.loads((built.compressed_path / "config.json").read_text())["quantization_config"]
    # the smoke suite's rtn-w4g64 (in the shared cache after a smoke run): the same weights, bit for bit
    rtn = quantize(lab_model.path, lab_model.fingerprint, QuantSpec(method="rtn", bits=4, group_size=64), cache_dir)
    ours, theirs = load_file(built.path / "model.safetensors"), load_file(rtn.path / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all((ours[k] == theirs[k]).all() for k in ours)
    again = quantize(lab_model.path, lab_model.fingerprint, QuantSpec(method="recipe", recipe=str(path)),
                     private_quant_cache)
    assert again.info["cache_hit"] is True and again.path == built.path


def test_cli_quantizes_with_a_recipe_file(tmp_path, cache_dir, make_tiny_llama, capsys, one_torch_thread):
    pytest.importorskip("llmcompressor")
    from pytest_qmr import models
    from pytest_qmr.cli import main
    from pytest_qmr.quantize import INFO_FILE

    model, _ = make_tiny_llama(tmp_path / "tiny", models.resolve("embedded:smollm2-135m", cache_dir).path)
    recipe = tmp_path / "w4g32.yaml"
    recipe.write_text(RECIPE.replace("group_size: 64", "group_size: 32"))  # the tiny Llama is 96 and 256 wide
    assert main(["quantize", "--model", str(model), "--method", "recipe", "--recipe", str(recipe),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    entry = Path(capsys.readouterr().out.strip().splitlines()[-1])
    info = json.loads((entry / INFO_FILE).read_text())
    assert info["method"] == "recipe" and info["calibration"] is None and info["group_sizes_used"] == {"32": 14}
    assert main(["quantize", "--model", str(model), "--method", "recipe", "--recipe", str(tmp_path / "none.yaml"),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "cannot read recipe file" in capsys.readouterr().err


def test_a_recipe_quantizing_activations_is_refused(tmp_path, cache_dir, make_tiny_llama, one_torch_thread):
    pytest.importorskip("llmcompressor")
    from pytest_qmr import models
    from pytest_qmr.quantize import QuantizeError, cache_entries, quantize

    model, fingerprint = make_tiny_llama(tmp_path / "tiny", models.resolve("embedded:smollm2-135m", cache_dir).path)
    recipe = tmp_path / "w8a8.yaml"
    recipe.write_text("default_stage:\n  default_modifiers:\n    QuantizationModifier:\n"
                      "      targets: [Linear]\n      ignore: [lm_head]\n      scheme: W8A8\n")
    with pytest.raises(QuantizeError, match="quantizes activations .* which the dense copy cannot simulate") as excinfo:
        quantize(model, fingerprint, QuantSpec(method="recipe", recipe=str(recipe)), tmp_path / "cache")
    assert "\n" not in str(excinfo.value) and cache_entries(tmp_path / "cache") == []
