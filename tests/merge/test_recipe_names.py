"""Misspelt names in recipes: parameter slips stop the run, hints rank the keys valid where the typo sits."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from mkmerge.methods import METHODS
from mkmerge.recipe import RecipeWarning, parse_recipe
from mksuite.common.errors import RecipeError, did_you_mean
from mksuite.common.recipe.suggest import closest, edit_distance, is_slip_of


def parse(text: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        return parse_recipe(text, known_methods=METHODS, source_name="recipe.yml")


def parse_error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse(text)
    return info.value


TIES = "merge_method: ties\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n    parameters:\n      weight: 1\n"


@pytest.mark.parametrize(
    ("written", "meant", "where"),
    [
        ("densty", "density", "models[1].parameters"),
        ("desnity", "density", "models[1].parameters"),
        ("wieght", "weight", "models[1].parameters"),
        ("lamda", "lambda", "parameters"),
        ("normalise", "normalize", "parameters"),
    ],
)
def test_slip_of_a_parameter_the_method_takes_is_a_recipe_error(written, meant, where):
    if where == "parameters":
        text = TIES + f"parameters:\n  {written}: 0.5\n"
        line = 9
    else:
        text = TIES + f"      {written}: 0.5\n"
        line = 8
    error = parse_error(text)
    assert error.exit_code == 2
    assert error.field == f"{where}.{written}" and error.line == line
    assert error.hint == f"did you mean `{meant}`?"
    assert f"`ties` takes `{meant}`" in error.message


SLICES = """\
merge_method: ties
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
        parameters:
          {source}: 0.5
    base_model: a
    parameters:
      {slice}: 1
"""


@pytest.mark.parametrize(
    ("source", "slice_", "field", "line"),
    [
        ("densty", "weight", "slices[0].sources[1].parameters.densty", 9),
        ("density", "wieght", "slices[0].parameters.wieght", 12),
    ],
)
def test_slips_are_caught_in_slices_and_sources(source, slice_, field, line):
    error = parse_error(SLICES.format(source=source, slice=slice_))
    assert (error.field, error.line) == (field, line)


def test_one_letter_parameter_names_are_never_called_slips():
    text = "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5, tt: 1}\n"
    (warning,) = parse(text).warnings
    assert warning.field == "parameters.tt" and warning.hint == "did you mean `t`?"


def test_name_close_to_another_methods_parameter_only_warns():
    # `select_topk` belongs to sce; ties does not take it, so `select_topkk` is no slip of a ties parameter.
    with pytest.warns(RecipeWarning) as record:
        recipe = parse_recipe(TIES + "parameters:\n  select_topkk: 0.5\n", known_methods=METHODS)
    assert recipe.merge_method == "ties"
    assert [w.message.field for w in record] == ["parameters.select_topkk"]


def test_names_far_from_every_parameter_stay_warnings():
    recipe = parse(TIES + "      author_note: 3\n      colour: 1\n")
    assert sorted(w.field for w in recipe.warnings) == [
        "models[1].parameters.author_note",
        "models[1].parameters.colour",
    ]


def test_parameter_another_method_reads_is_no_error():
    recipe = parse(TIES + "parameters:\n  t: 0.5\n")  # slerp's `t`, as recipes switched from slerp carry
    assert recipe.parameters["t"] == 0.5


@pytest.mark.parametrize(
    ("text", "field", "meant"),
    [
        ("merge_method: linear\nmodles:\n  - model: a\n", "modles", "models"),
        ("merge_method: passthrough\nslices:\n  - sources:\n      - modles: a\n        layer_range: [0, 2]\n",
         "slices[0].sources[0].modles", "model"),
        ("merge_method: linear\nmodels: [{model: a}]\nbase_modle: a\n", "base_modle", "base_model"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n  sorce: base\n", "tokenizer.sorce", "source"),
    ],
)  # fmt: skip
def test_hint_ranks_the_keys_valid_where_the_typo_sits(text, field, meant):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            parse_recipe(text, known_methods=METHODS, source_name="recipe.yml")
            hints = [w.message.hint for w in record if w.message.field == field]
        except RecipeError as error:
            hints = [error.hint]
    assert hints and f"did you mean `{meant}`?" in hints[0]


def test_edit_distance_counts_a_swapped_pair_as_one_slip():
    assert edit_distance("modles", "models") == 1
    assert edit_distance("modles", "modules") == 1
    assert edit_distance("densty", "density") == 1
    assert edit_distance("abc", "xyz") == 3
    assert closest("modles", ["merge_method", "models", "slices", "modules"]) == "models"
    assert closest("xyz", ["models"]) is None


def test_every_hint_ranks_slips_the_same_way():
    """Hints outside recipes (methods, tensors, options) share the recipe keys' ranking."""
    assert did_you_mean("modle", ["modules", "model"]) == "did you mean `model`?"  # difflib: modules
    assert did_you_mean("TIES", ["linear", "ties"]) == "did you mean `ties`?"
    assert did_you_mean("xyz", ["models"]) is None


def test_slips_are_one_or_two_edits_of_a_word_of_some_length():
    assert is_slip_of("densty", "density") and is_slip_of("lamda", "lambda")
    assert not is_slip_of("tt", "t")  # one-letter names: anything is one edit away
    assert not is_slip_of("gamma", "lambda")  # two edits, but different words
    assert not is_slip_of("weight", "weight")


def test_cli_stops_on_a_parameter_slip_with_exit_2(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(TIES + "      densty: 0.5\n")
    result = subprocess.run(
        [sys.executable, "-m", "mkmerge", str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "did you mean `density`?" in output and "recipe.yml:8" in output
    assert not (tmp_path / "out").exists()
