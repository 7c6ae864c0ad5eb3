"""Bad input to `mkmerge`, through the real command line.

Every refusal must: exit with the code of its MkError subclass, print one readable paragraph
(the error line and at most a hint line, no traceback) naming the culprit, leave nothing at
OUT (nor a hidden `.OUT.partial-*` sibling), and, when the recipe and the weight headers are
enough to find it, happen before a single tensor is read.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mksuite.common.errors import (
    MergeError,
    MkError,
    ModelNotFoundError,
    RecipeError,
    ShapeMismatchError,
    TensorFileError,
    UnsafePickleError,
)

from tiny_models import copy_model, read_tensors

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- fixtures and helpers ----------------------------------------------------------------------


def run_mkmerge(tmp_path: Path, recipe: str, *options: str):
    """Write `recipe` to tmp_path/recipe.yml and run `mkmerge recipe.yml tmp_path/merged --quiet`."""
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(recipe)
    out = tmp_path / "merged"
    result = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--quiet", *options])
    return result, out, recipe_path


def line_of(text: str, fragment: str) -> int:
    """1-based number of the only line of `text` containing `fragment`."""
    lines = [i for i, line in enumerate(text.splitlines(), start=1) if fragment in line]
    assert len(lines) == 1, f"{fragment!r} is on lines {lines}"
    return lines[0]


def error_paragraph(stderr: str, error: type[MkError]) -> str:
    """The error's report in stderr, checked to be one paragraph: `TITLE: message` [+ `  hint: ...`]."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"{error.title}: ")]
    assert len(starts) == 1, f"expected one `{error.title}:` line in:\n{stderr}"
    report = [line for line in lines[starts[0] :] if line.strip()]
    assert len(report) == len(lines) - starts[0], f"blank line inside the report:\n{stderr}"
    assert len(report) <= 2, f"the report is more than one paragraph:\n{stderr}"
    if len(report) == 2:
        assert report[1].startswith("  hint: "), stderr
    return "\n".join(report)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def at(line: int, field: str) -> re.Pattern:
    """`line N, field `F`` as plan-time errors print it, or `FILE:N, field `F`` should they name the file."""
    return re.compile(rf"(?:\bline |\.yml:){line}, field `{re.escape(field)}`")


def assert_refused(result, out: Path, error: type[MkError], *culprits: str | re.Pattern) -> str:
    """Exit code of `error`, no traceback, one paragraph naming every culprit, nothing written."""
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == error.exit_code, result.output
    report = error_paragraph(result.stderr, error)
    for culprit in culprits:
        found = culprit.search(report) if isinstance(culprit, re.Pattern) else culprit in report
        assert found, f"{culprit!r} not named in:\n{report}"
    assert_nothing_written(out)
    return report


def linear_recipe(*weighted: tuple[Path, float | None], extra: str = "") -> str:
    """A `linear` recipe over `(model, weight)` pairs; weight None leaves the parameter out."""
    lines = ["merge_method: linear", "models:"]
    for model, weight in weighted:
        lines.append(f"  - model: {model}")
        if weight is not None:
            lines += ["    parameters:", f"      weight: {weight}"]
    return "\n".join(lines) + "\n" + extra


# --- the recipe itself -------------------------------------------------------------------------


def test_malformed_yaml_is_a_recipe_error_with_the_file_and_line(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    recipe = (
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {ft1}\n"
        "    parameters:\n"
        "      weight: 1\n"
        f"   - model: {ft2}\n"  # one space too many: not a list item of `models`
    )
    result, out, recipe_path = run_mkmerge(tmp_path, recipe)
    report = assert_refused(result, out, RecipeError, f"{recipe_path}:6: the recipe is not valid YAML")
    assert "  hint: " in report
    assert tensor_reads == []


def test_unknown_merge_method_suggests_the_nearest_one(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    recipe = linear_recipe((ft1, 1), (ft2, 1)).replace("merge_method: linear\n", "") + "merge_method: lienar\n"
    result, out, recipe_path = run_mkmerge(tmp_path, recipe)
    assert_refused(
        result,
        out,
        RecipeError,
        f"{recipe_path}:{line_of(recipe, 'lienar')}, field `merge_method`",
        "`lienar`",
        "did you mean `linear`?",
    )
    assert tensor_reads == []


def test_unknown_key_is_a_warning_naming_the_nearest_key_and_the_merge_still_runs(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    recipe = (
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {ft1}\n"
        "    paramters:\n"  # typo: ignored, so the global weight applies to both models
        "      weight: 5\n"
        f"  - model: {ft2}\n"
        "parameters:\n"
        "  weight: 1\n"
    )
    result, out, _ = run_mkmerge(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stderr.split())  # rich may wrap a long warning
    assert warning.startswith("warning: line 4: unknown key `paramters` in `models[0]`")
    assert "did you mean `parameters`?" in warning
    merged, a, b = read_tensors(out), read_tensors(ft1), read_tensors(ft2)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=0)
    assert tensor_reads, "control: a successful merge reads tensors, so the counter works"


def test_missing_model_path_names_the_path(tmp_path, family, tensor_reads):
    _, ft1, _ = family
    missing = tmp_path / "no-such-model"
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (missing, 1)))
    assert_refused(result, out, ModelNotFoundError, str(missing))
    assert tensor_reads == []


def test_layer_range_out_of_bounds_names_the_field_and_its_line(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    recipe = (
        "merge_method: passthrough\n"
        "slices:\n"
        "  - sources:\n"
        f"      - model: {ft1}\n"
        "        layer_range: [0, 2]\n"
        "  - sources:\n"
        f"      - model: {ft2}\n"
        "        layer_range: [1, 5]\n"  # the tiny models have 3 layers
    )
    result, out, _ = run_mkmerge(tmp_path, recipe)
    assert_refused(
        result,
        out,
        RecipeError,
        at(line_of(recipe, "[1, 5]"), "slices[1].sources[0].layer_range"),
        "[1, 5]",
        str(ft2),
        "3 layers",
    )
    assert tensor_reads == []


# --- parameters and weights --------------------------------------------------------------------


def test_weights_summing_to_zero_under_linear_are_a_merge_error(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (ft2, -1)))
    assert_refused(result, out, MergeError, "sum to zero", str(ft1), str(ft2), "normalize: false")
    assert tensor_reads == []


def test_linear_model_without_weight_names_the_model_field_and_line(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    recipe = linear_recipe((ft1, 1), (ft2, None))
    result, out, _ = run_mkmerge(tmp_path, recipe)
    assert_refused(
        result,
        out,
        RecipeError,
        at(line_of(recipe, str(ft2)), "models[1].parameters.weight"),
        str(ft2),
    )
    assert tensor_reads == []


def test_linear_base_model_without_weight_names_the_base_model(tmp_path, family, tensor_reads):
    base, ft1, ft2 = family
    recipe = f"base_model: {base}\n" + linear_recipe((ft1, 1), (ft2, 1))
    result, out, _ = run_mkmerge(tmp_path, recipe)
    assert_refused(
        result,
        out,
        RecipeError,
        at(line_of(recipe, "base_model:"), "base_model.parameters.weight"),
        f"base model {base}",
    )
    assert tensor_reads == []


def test_slerp_without_t_names_the_missing_parameter(tmp_path, family, tensor_reads):
    base, ft1, _ = family
    recipe = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
    result, out, _ = run_mkmerge(tmp_path, recipe)
    assert_refused(result, out, RecipeError, at(1, "parameters.t"), "`slerp`")
    assert tensor_reads == []


def test_ties_without_base_model_says_a_base_is_needed(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    recipe = linear_recipe((ft1, 1), (ft2, 1)).replace("merge_method: linear", "merge_method: ties")
    result, out, _ = run_mkmerge(tmp_path, recipe)
    report = assert_refused(result, out, RecipeError, at(1, "base_model"), "`ties`", "needs a base model")
    assert "hint: add `base_model:" in report
    assert tensor_reads == []


def task_vector_recipe(method: str, base: Path, *models: tuple[Path, str]) -> str:
    """`method` over `(model, flow-style parameters)` pairs with `base` as the base model."""
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for model, parameters in models:
        lines += [f"  - model: {model}", f"    parameters: {{{parameters}}}"]
    return "\n".join(lines) + "\n"


def test_della_probabilities_outside_zero_to_one_are_refused_before_reading(tmp_path, family, tensor_reads):
    base, ft1, ft2 = family
    recipe = task_vector_recipe(
        "della", base, (ft1, "weight: 0.5, density: 0.5"), (ft2, "weight: 0.5, density: 0.8, epsilon: 0.25")
    )
    result, out, _ = run_mkmerge(tmp_path, recipe)
    report = assert_refused(
        result, out, RecipeError, str(ft2), "tensor model.embed_tokens.weight", "density 0.8 and epsilon 0.25"
    )
    assert "density + epsilon < 1" in report
    assert tensor_reads == []


def test_breadcrumbs_gamma_outside_zero_to_one_is_refused_before_reading(tmp_path, family, tensor_reads):
    base, ft1, _ = family
    recipe = task_vector_recipe("breadcrumbs_ties", base, (ft1, "weight: 1, density: 0.5, gamma: -0.1"))
    result, out, _ = run_mkmerge(tmp_path, recipe)
    assert_refused(result, out, RecipeError, str(ft1), "gamma -0.1 is not a fraction between 0 and 1")
    assert tensor_reads == []


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_a_density_keeping_no_entry_of_a_small_tensor_is_refused_before_reading(tmp_path, family, tensor_reads, method):
    base, ft1, _ = family
    recipe = task_vector_recipe(method, base, (ft1, "weight: 1, density: 0.02"))
    result, out, _ = run_mkmerge(tmp_path, recipe)
    # the embedding (128 x 32) keeps 81 entries; the first layer norm (32 values) keeps none
    assert_refused(
        result,
        out,
        MergeError,
        str(ft1),
        "tensor model.layers.0.input_layernorm.weight",
        "= 0 entries",
        "raise `density`",
    )
    assert tensor_reads == []


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl"])
def test_methods_without_vocabulary_handling_refuse_embeddings_of_another_size(
    tmp_path, family, tiny_model, tensor_reads, method
):
    base, ft1, _ = family
    bigger = tiny_model("llama", vocab=160, seed=6)
    recipe = f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {bigger}\n"
    result, out, _ = run_mkmerge(tmp_path, recipe)
    assert_refused(result, out, ShapeMismatchError, "model.embed_tokens.weight", "[160, 32]", "[128, 32]")
    assert tensor_reads == []


# --- the models ---------------------------------------------------------------------------------


def test_models_of_different_hidden_size_are_a_shape_mismatch(tmp_path, family, tiny_model, tensor_reads):
    _, ft1, _ = family
    wide = tiny_model("llama", hidden=64, seed=5)
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (wide, 1)))
    assert_refused(result, out, ShapeMismatchError, str(ft1), str(wide), "[128, 32]", "[128, 64]", "tensor model.")
    assert tensor_reads == []


def test_different_hidden_sizes_are_not_reported_as_a_vocabulary_cut(tmp_path, family, tiny_model):
    """Both embeddings have 128 rows; only their width differs, which no cut can reconcile.

    docs/methods.md cuts embeddings to a common sub-matrix only when row counts differ, so the first
    mismatched tensor (model.embed_tokens.weight) is the one the error must name.
    """
    _, ft1, _ = family
    wide = tiny_model("llama", hidden=64, seed=5)
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (wide, 1)))
    assert "vocabulary sizes" not in result.stderr, result.stderr
    assert_refused(result, out, ShapeMismatchError, "tensor model.embed_tokens.weight")


def test_truncated_safetensors_file_names_the_file(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    broken = copy_model(ft2, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (broken, 1)))
    assert_refused(result, out, TensorFileError, str(weights), "truncated")
    assert tensor_reads == []


def test_corrupt_safetensors_header_names_the_file(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    broken = copy_model(ft2, tmp_path / "corrupt")
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(8)  # just past the length field: the JSON header starts here
        f.write(b"\xff\x00 not json \x00\xff")
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (broken, 1)))
    assert_refused(result, out, TensorFileError, f"corrupt header in {weights}")
    assert tensor_reads == []


def test_model_directory_without_weights_names_the_directory(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family
    empty = copy_model(ft2, tmp_path / "no-weights")
    (empty / "model.safetensors").unlink()
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (empty, 1)))
    assert_refused(result, out, ModelNotFoundError, f"no weights in {empty}")
    assert tensor_reads == []


class _Reduce:
    """Pickles as a call of `func(*args)`: the classic code-execution gadget."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_malicious_pytorch_model_bin_is_refused_without_running_code(tmp_path, family, tensor_reads):
    _, ft1, ft2 = family

    def payload(marker: Path) -> bytes:
        return pickle.dumps({"model.embed_tokens.weight": _Reduce(os.system, (f"touch {marker}",))}, protocol=2)

    control, marker = tmp_path / "control", tmp_path / "pwned"
    pickle.loads(payload(control))
    assert control.exists(), "control: the payload runs code under plain pickle"

    evil = copy_model(ft2, tmp_path / "evil")
    (evil / "model.safetensors").unlink()
    weights = evil / "pytorch_model.bin"
    with zipfile.ZipFile(weights, "w") as archive:
        archive.writestr("archive/data.pkl", payload(marker))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    result, out, _ = run_mkmerge(tmp_path, linear_recipe((ft1, 1), (evil, 1)))
    assert_refused(result, out, UnsafePickleError, str(weights), "system`", "refusing")
    assert not marker.exists()
    assert tensor_reads == []


# --- how errors are shown -----------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path, family):
    _, ft1, ft2 = family
    recipe = linear_recipe((ft1, 1), (ft2, 1)).replace("merge_method: linear", "merge_method: lienar")
    result, out, _ = run_mkmerge(tmp_path, recipe, "--debug")
    assert result.exit_code == RecipeError.exit_code, result.output
    assert "Traceback" in result.stderr
    assert "did you mean `linear`?" in result.stderr
    assert_nothing_written(out)


def run_module(tmp_path: Path, recipe: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m mkmerge recipe.yml merged` in a fresh process: the real exit status and streams."""
    (tmp_path / "recipe.yml").write_text(recipe)
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "mkmerge", str(tmp_path / "recipe.yml"), str(out), "--quiet"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return process, out


def test_process_exit_status_for_a_recipe_error_is_2_without_traceback(tmp_path):
    process, out = run_module(tmp_path, "merge_method: linear\nmodels: [a, b\n")
    assert process.returncode == RecipeError.exit_code, process.stderr
    assert "Traceback" not in process.stderr
    assert process.stdout == ""
    error_paragraph(process.stderr, RecipeError)
    assert_nothing_written(out)


def test_process_exit_status_for_a_truncated_file_is_4_without_traceback(tmp_path, family):
    _, ft1, ft2 = family
    broken = copy_model(ft2, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    os.truncate(weights, 100)
    process, out = run_module(tmp_path, linear_recipe((ft1, 1), (broken, 1)))
    assert process.returncode == TensorFileError.exit_code, process.stderr
    assert "Traceback" not in process.stderr
    assert str(weights) in error_paragraph(process.stderr, TensorFileError)
    assert_nothing_written(out)
