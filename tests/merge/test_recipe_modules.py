"""mergekit's `modules:` form: parsed into a typed structure with line-numbered errors (merging: test_modules_merge.py)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from mkmerge.methods import METHODS
from mkmerge.recipe import InputModel, ModuleRecipe, OutputSlice, RecipeWarning, parse_recipe
from mkmerge.slices import referenced_models
from mksuite.common.errors import RecipeError

MODULES = """\
merge_method: linear
modules:
  text_decoder:
    models:
      - model: a
        parameters: {weight: 1.0}
      - model: b
        parameters: {weight: 0.5}
  vision_tower:
    slices:
      - sources:
          - model: a
            layer_range: [0, 4]
    parameters:
      weight: 0.5
"""


def parse(text: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        return parse_recipe(text, known_methods=METHODS, source_name="vlm.yml")


def parse_error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse(text)
    return info.value


def test_modules_parse_into_typed_modules_in_document_order():
    recipe = parse(MODULES)
    assert list(recipe.modules) == ["text_decoder", "vision_tower"]
    text, vision = recipe.modules["text_decoder"], recipe.modules["vision_tower"]
    assert isinstance(text, ModuleRecipe) and all(isinstance(m, InputModel) for m in text.models)
    assert [str(m.model) for m in text.models] == ["a", "b"] and text.slices is None
    assert [m.parameters["weight"] for m in text.models] == [1.0, 0.5]
    assert isinstance(vision.slices[0], OutputSlice) and vision.slices[0].sources[0].layer_range == (0, 4)
    assert vision.parameters == {"weight": 0.5} and vision.models is None
    assert recipe.line_of(("modules", "vision_tower", "slices", 0, "sources", 0, "layer_range")) == 13


@pytest.mark.parametrize(
    ("edit", "field", "line", "fragment"),
    [
        (("layer_range: [0, 4]", "layer_range: [4, 0]"), "modules.vision_tower.slices[0].sources[0].layer_range", 13,
         "is empty"),
        (("    parameters:\n      weight: 0.5\n", "    models: [{model: a}]\n"), "modules.vision_tower.models", 14,
         "exactly one of `models` or `slices`"),
        (("        parameters: {weight: 0.5}", "        parameters: {weight: [{filter: x}]}"),
         "modules.text_decoder.models[1].parameters.weight[0]", 8, "no `value`"),
        (("  text_decoder:\n", "  7:\n"), "modules[7]", 3, "must be a string"),
    ],
)  # fmt: skip
def test_errors_inside_modules_name_field_and_line(edit, field, line, fragment):
    error = parse_error(MODULES.replace(*edit))
    assert (error.field, error.line) == (field, line)
    assert fragment in error.message and error.exit_code == 2


def test_modules_must_be_a_non_empty_mapping():
    assert parse_error("merge_method: linear\nmodules: []\n").field == "modules"
    assert parse_error("merge_method: linear\nmodules: {}\n").field == "modules"


def test_modules_with_models_is_refused_as_two_forms():
    error = parse_error(MODULES + "models: [{model: a}]\n")
    assert "exactly one of `models`, `slices` or `modules`" in error.message


def test_parameter_slips_inside_modules_are_caught():
    error = parse_error(MODULES.replace("      weight: 0.5\n", "      wieght: 0.5\n"))
    assert (error.field, error.line) == ("modules.vision_tower.parameters.wieght", 15)


def test_referenced_models_cover_every_module_in_document_order():
    recipe = parse(
        MODULES.replace(
            "          - model: a\n            layer_range", "          - model: c\n            layer_range"
        )
    )
    assert [str(ref) for ref in referenced_models(recipe)] == ["a", "b", "c"]


def test_cli_reports_a_missing_module_model_with_exit_3_not_a_crash(tmp_path):
    recipe = tmp_path / "vlm.yml"
    recipe.write_text(MODULES.replace("model: a", f"model: {tmp_path / 'nowhere'}"))
    result = subprocess.run(
        [sys.executable, "-m", "mkmerge", str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "nowhere" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()
