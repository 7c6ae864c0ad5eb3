"""`modules:` recipes carried out: each module's entry merges that module's tensors; one output.

The rules here were found by running mergekit 0.1.5 (black box) on the same tiny models:
module names `text_decoder`, `vision_tower`, `multi_modal_projector`; an entry's
`parameters:` override the recipe's; layer ranges count the module's own layers, and a
re-sliced vision tower's depth is written to `vision_config`. Numbers matched it bit for bit.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mksuite.common.errors import RecipeError

from run_helpers import merge_recipe
from tiny_models import read_tensors

TOKENS = [1, 5, 9, 17, 33, 65, 7, 3]


def _module(name: str) -> str:
    """The module of a stored mistral3 name, spelled out independently of the tool."""
    if name.startswith("language_model."):
        return "text_decoder"
    return name.split(".")[0]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    from vlm_models import build_finetune, build_text_twin, build_vlm

    root = tmp_path_factory.mktemp("modules")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = build_vlm("mistral3", root / "a", seed=0)
        b = build_finetune(a, root / "b", seed=5)
        text = build_text_twin(a, root / "text", seed=2)
    return a, b, text


def _run(recipe: str, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return merge_recipe(recipe, out)


def test_each_module_is_merged_by_its_own_entry(vlms, tmp_path):
    a, b, _ = vlms
    recipe = f"""\
merge_method: linear
parameters: {{normalize: false}}
modules:
  text_decoder:
    models:
      - model: {a}
        parameters: {{weight: 0.75}}
      - model: {b}
        parameters: {{weight: 0.25}}
  vision_tower:
    parameters: {{normalize: true}}
    models:
      - model: {a}
        parameters: {{weight: 1.0}}
      - model: {b}
        parameters: {{weight: 3.0}}
  multi_modal_projector:
    models:
      - model: {b}
        parameters: {{weight: 2.0}}
dtype: float32
"""
    out = _run(recipe, tmp_path / "out")
    merged, ta, tb = read_tensors(out), read_tensors(a), read_tensors(b)
    assert set(merged) == set(ta)
    seen = set()
    for name, tensor in merged.items():
        module = _module(name)
        seen.add(module)
        x, y = ta[name].double(), tb[name].double()
        expected = {
            "text_decoder": 0.75 * x + 0.25 * y,
            "vision_tower": (x + 3 * y) / 4,
            "multi_modal_projector": 2 * y,
        }[module]
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)
    assert seen == {"text_decoder", "vision_tower", "multi_modal_projector"}
    from vlm_models import load_any, text_logits

    assert torch.isfinite(text_logits(load_any(out), TOKENS)).all()


def test_slices_count_each_modules_own_layers_and_depths_follow(vlms, tmp_path):
    a, b, _ = vlms
    recipe = f"""\
merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 3]}}]
      - sources: [{{model: {b}, layer_range: [1, 4]}}]
  vision_tower:
    slices:
      - sources: [{{model: {b}, layer_range: [0, 2]}}]
      - sources: [{{model: {a}, layer_range: [1, 2]}}]
  multi_modal_projector:
    models: [{{model: {b}}}]
dtype: float32
"""
    out = _run(recipe, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6 and config["vision_config"]["num_hidden_layers"] == 3
    merged, ta, tb = read_tensors(out), read_tensors(a), read_tensors(b)
    text_from = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    vision_from = [(b, 0), (b, 1), (a, 1)]
    stacks = {"language_model.model.layers.": text_from, "vision_tower.transformer.layers.": vision_from}
    for name, tensor in merged.items():
        stack = next((s for s in stacks if name.startswith(s)), None)
        if stack is None:  # fixed weights: before the stack from the first slice, after it from the last
            first = name == "language_model.model.embed_tokens.weight"
            assert torch.equal(tensor, (ta if first else tb)[name]), name
            continue
        index, rest = name[len(stack) :].split(".", 1)
        model, layer = stacks[stack][int(index)]
        assert torch.equal(tensor, (ta if model == a else tb)[f"{stack}{layer}.{rest}"]), name
    from vlm_models import load_any, text_logits

    model = load_any(out)
    assert len(model.model.vision_tower.transformer.layers) == 3
    assert torch.isfinite(text_logits(model, TOKENS)).all()


def test_text_decoder_entry_may_take_the_text_only_twin(vlms, tmp_path):
    a, _, text = vlms
    recipe = f"""\
merge_method: linear
modules:
  text_decoder:
    models:
      - model: {a}
        parameters: {{weight: 0.0}}
      - model: {text}
        parameters: {{weight: 1.0}}
  vision_tower:
    models: [{{model: {a}, parameters: {{weight: 1.0}}}}]
  multi_modal_projector:
    models: [{{model: {a}, parameters: {{weight: 1.0}}}}]
dtype: float32
"""
    merged, ta, tt = read_tensors(_run(recipe, tmp_path / "out")), read_tensors(a), read_tensors(text)
    for name, tensor in merged.items():
        if name.startswith("language_model.model."):
            expected = tt["model." + name[len("language_model.model.") :]]
        else:
            expected = ta[name]
        assert torch.equal(tensor, expected), name


def _modules_recipe(a, b, *, vision: str = "vision_tower", projector: bool = True, vision_model=None) -> str:
    text = f"""\
merge_method: linear
modules:
  text_decoder:
    models: [{{model: {a}, parameters: {{weight: 1.0}}}}, {{model: {b}, parameters: {{weight: 1.0}}}}]
  {vision}:
    models: [{{model: {vision_model or a}, parameters: {{weight: 1.0}}}}]
"""
    if projector:
        text += f"  multi_modal_projector:\n    models: [{{model: {a}, parameters: {{weight: 1.0}}}}]\n"
    return text


@pytest.mark.parametrize(
    ("kind", "field", "line", "fragment"),
    [
        ("unknown", "modules.vision_encoder", 5, "has no module `vision_encoder`"),
        ("missing", "modules", 2, "no entry for `multi_modal_projector`"),
        ("text-only", "modules.vision_tower.models[0]", 6, "has no module `vision_tower`"),
    ],
)
def test_module_errors_name_field_and_line_before_any_tensor_is_read(
    vlms, tmp_path, no_tensor_reads, kind, field, line, fragment
):
    a, b, text = vlms
    recipe = {
        "unknown": _modules_recipe(a, b, vision="vision_encoder"),
        "missing": _modules_recipe(a, b, projector=False),
        "text-only": _modules_recipe(a, b, vision_model=text),
    }[kind]
    with pytest.raises(RecipeError) as info:
        _run(recipe, tmp_path / "out")
    error = info.value
    assert (error.field, error.line, error.exit_code) == (field, line, 2)
    assert fragment in error.message
    assert not (tmp_path / "out").exists()


def test_layer_range_beyond_a_modules_depth_names_the_entry(vlms, tmp_path):
    a, _, _ = vlms
    recipe = _modules_recipe(a, a).replace(
        f"  vision_tower:\n    models: [{{model: {a}, parameters: {{weight: 1.0}}}}]\n",
        f"  vision_tower:\n    slices:\n      - sources: [{{model: {a}, layer_range: [0, 3]}}]\n",
    )
    with pytest.raises(RecipeError) as info:
        _run(recipe, tmp_path / "out")
    error = info.value
    assert error.field == "modules.vision_tower.slices[0].sources[0].layer_range" and error.line == 7
    assert "which has 2 layers" in error.message


VISION_STACKS = {
    "mistral3": ("vision_tower", "vision_tower.transformer.layers."),
    "gemma3": ("vision_tower", "vision_tower.encoder.layers."),
    "llama4": ("vision_model", "vision_model.model.layers."),
}


@pytest.mark.parametrize("model_type", [*sorted(VISION_STACKS), "gemma3-published"])
def test_vision_stack_is_resliced_in_each_family_and_the_output_loads(model_type, tmp_path):
    from vlm_models import build_finetune, build_vlm, load_any, resave_hub_vision_layout, text_logits

    published = model_type.endswith("-published")  # read as vision_tower.vision_model.*, written as saved
    model_type = model_type.removesuffix("-published")
    module, stack = VISION_STACKS[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = build_vlm(model_type, tmp_path / "a", seed=0)
        b = build_finetune(a, tmp_path / "b", seed=5)
    ra, rb = (resave_hub_vision_layout(m, tmp_path / f"{m.name}_pub") for m in (a, b)) if published else (a, b)
    recipe = f"""\
merge_method: passthrough
modules:
  text_decoder:
    models: [{{model: {ra}}}]
  {module}:
    slices:
      - sources: [{{model: {rb}, layer_range: [0, 2]}}]
      - sources: [{{model: {ra}, layer_range: [1, 2]}}]
  multi_modal_projector:
    models: [{{model: {rb}}}]
dtype: float32
"""
    out = _run(recipe, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 3
    merged, ta, tb = read_tensors(out), read_tensors(a), read_tensors(b)
    layers = [n for n in merged if n.startswith(stack)]
    assert {int(n[len(stack) :].split(".")[0]) for n in layers} == {0, 1, 2}
    for name in layers:
        index, rest = name[len(stack) :].split(".", 1)
        model, layer = [(tb, 0), (tb, 1), (ta, 1)][int(index)]
        assert torch.equal(merged[name], model[f"{stack}{layer}.{rest}"]), name
    for name, tensor in merged.items():
        if name.startswith("multi_modal_projector."):
            assert torch.equal(tensor, tb[name]), name
        elif name.startswith("language_model."):
            assert torch.equal(tensor, ta[name]), name
    assert set(merged) - set(layers) == set(ta) - {n for n in ta if n.startswith(stack)}
    assert torch.isfinite(text_logits(load_any(out), TOKENS)).all()


def test_mkstack_sends_a_modules_recipe_to_mkmerge_with_exit_2(vlms, tmp_path, no_tensor_reads):
    from mkstack.cli import stack_app

    from run_helpers import invoke

    a, b, _ = vlms
    recipe = tmp_path / "vlm.yml"
    recipe.write_text(
        f"merge_method: passthrough\nmodules:\n  text_decoder:\n    slices:\n"
        f"      - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
        f"      - sources: [{{model: {b}, layer_range: [1, 4]}}]\n"
        f"  vision_tower:\n    models: [{{model: {a}}}]\n  multi_modal_projector:\n    models: [{{model: {b}}}]\n"
    )
    result = invoke(stack_app, recipe, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "`modules:` recipe" in result.output and "mkmerge" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_method_input_count_errors_name_the_entry(vlms, tmp_path, no_tensor_reads):
    a, b, _ = vlms
    recipe = _modules_recipe(a, b).replace(
        "merge_method: linear", f"merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}"
    )
    with pytest.raises(RecipeError) as info:
        _run(recipe, tmp_path / "out")
    error = info.value
    lines = recipe.splitlines()
    vision_models = lines.index("  vision_tower:") + 2  # 1-based line of its `models:`
    assert error.field == "modules.vision_tower.models" and error.line == vision_models
    assert "takes exactly 2 input models" in error.message


def test_a_text_only_models_one_module_is_called_default_as_in_mergekit(family, tmp_path):
    base, a, b = family
    entry = (
        f"    slices:\n      - sources:\n          - {{model: {a}, layer_range: [0, 3], parameters: {{weight: 0.3}}}}\n"
        f"          - {{model: {b}, layer_range: [0, 3], parameters: {{weight: 0.6}}}}\n"
    )
    recipe = f"merge_method: linear\nmodules:\n  default:\n{entry}dtype: float32\n"
    merged, ta, tb = read_tensors(_run(recipe, tmp_path / "out")), read_tensors(a), read_tensors(b)
    assert set(merged) == set(ta)
    for name, tensor in merged.items():
        expected = (0.3 * ta[name].double() + 0.6 * tb[name].double()) / 0.9
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(RecipeError) as info:
        _run(recipe.replace("dtype:", f"  text_decoder:\n{entry}dtype:"), tmp_path / "twice")
    assert info.value.field == "modules.text_decoder" and "both name module `text_decoder`" in info.value.message


def test_a_resliced_text_decoder_rebuilds_per_layer_settings(tmp_path):
    from vlm_models import build_finetune, build_vlm, load_any, text_logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = build_vlm("gemma3", tmp_path / "a", seed=0)
        b = build_finetune(a, tmp_path / "b", seed=5)
    layer_types = json.loads((a / "config.json").read_text())["text_config"]["layer_types"]
    recipe = f"""\
merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 3]}}]
      - sources: [{{model: {b}, layer_range: [1, 4]}}]
  vision_tower:
    models: [{{model: {a}}}]
  multi_modal_projector:
    models: [{{model: {b}}}]
dtype: float32
"""
    out = _run(recipe, tmp_path / "out")
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 6
    assert text["layer_types"] == layer_types[0:3] + layer_types[1:4]
    assert torch.isfinite(text_logits(load_any(out), TOKENS)).all()
