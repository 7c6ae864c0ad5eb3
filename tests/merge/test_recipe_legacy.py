"""Recipe forms older mergekit accepted (and published models were built with) run, with a warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from mkmerge.methods import METHODS
from mkmerge.recipe import RecipeWarning, parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.loading import ModelReference


def parse_with_warnings(text: str):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        recipe = parse_recipe(text, known_methods=METHODS, source_name="old.yml")
    return recipe, [w.message for w in record if isinstance(w.message, RecipeWarning)]


SLERP = """\
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
      - model: {b}
        layer_range: [0, 2]
parameters:
  t: [0, 0.3, 1]
dtype: float32
"""


def test_tokenizer_source_with_the_model_prefix_reads_as_the_model():
    recipe, found = parse_with_warnings("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: model:org/tok\n")
    assert recipe.tokenizer_source == ModelReference.parse("org/tok")
    (warning,) = found
    assert (warning.field, warning.line) == ("tokenizer_source", 3)
    assert warning.hint == "write `tokenizer_source: org/tok`" and "older mergekit" in warning.message


@pytest.mark.parametrize("value", ["union", "base", "org/model", "models/model-a"])
def test_modern_tokenizer_sources_are_left_alone(value):
    recipe, found = parse_with_warnings(f"merge_method: linear\nmodels: [{{model: a}}]\ntokenizer_source: {value}\n")
    assert found == []
    assert recipe.tokenizer_source == (value if value in ("union", "base") else ModelReference.parse(value))


def test_slerp_base_outside_the_slice_becomes_its_first_source_with_a_warning():
    recipe, found = parse_with_warnings(SLERP.format(base="c", a="a", b="b"))
    assert recipe.slices[0].base_model == ModelReference.parse("a")
    assert recipe.base_model == ModelReference.parse("c")  # still the config and tokenizer donor
    (warning,) = found
    assert (warning.field, warning.line) == ("base_model", 2)
    assert warning.hint == "write `base_model: a` in slices[0]"


def test_slerp_base_inside_the_slice_or_other_methods_are_untouched():
    recipe, found = parse_with_warnings(SLERP.format(base="b", a="a", b="b"))
    assert recipe.slices[0].base_model is None and found == []
    text = SLERP.format(base="c", a="a", b="b").replace("slerp", "nuslerp").replace("t: [0, 0.3, 1]", "weight: 1")
    recipe, found = parse_with_warnings(text)
    assert recipe.slices[0].base_model is None and found == []


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from tiny_models import read_tensors

    return read_tensors(path)


def test_legacy_slerp_gives_the_weights_of_the_explicit_first_source_base(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("llama")
    legacy, _ = parse_with_warnings(SLERP.format(base=base, a=ft1, b=ft2))
    explicit, found = parse_with_warnings(SLERP.format(base=ft1, a=ft1, b=ft2))
    assert found == []
    run_merge(legacy, tmp_path / "legacy", BuildOptions())
    run_merge(explicit, tmp_path / "explicit", BuildOptions())
    got, want = _tensors(tmp_path / "legacy"), _tensors(tmp_path / "explicit")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # t = 0 at the first layer: that layer is the first source's, exactly.
    source = _tensors(ft1)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[name], source[name].to(got[name].dtype))
