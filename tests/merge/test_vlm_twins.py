"""A vision-language model merged with its text-only twin (mergekit #618): the language-model
tensors are matched by role, the vision tower and projector come from the VLM, and the output
takes the first (or base) model's architecture and loads in transformers."""

from __future__ import annotations

import warnings

import pytest
import torch

from mksuite.common.errors import ArchitectureError, ShapeMismatchError

from run_helpers import merge_recipe
from tiny_models import read_tensors

TOKENS = [1, 5, 9, 17, 33, 65, 7, 3]
# How transformers writes a VLM's language model, spelled out here independently of the tool.
_VLM_TO_TEXT = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.text_model.", "model."),  # idefics3 / smolvlm
)


def _text_name(vlm_name: str) -> str | None:
    for prefix, text_prefix in _VLM_TO_TEXT:
        if vlm_name.startswith(prefix):
            return text_prefix + vlm_name[len(prefix) :]
    return "lm_head.weight" if vlm_name == "lm_head.weight" else None


@pytest.fixture(scope="module", params=["mistral3", "gemma3", "llama4"])
def twins(request, tmp_path_factory):
    from vlm_models import build_text_twin, build_vlm

    root = tmp_path_factory.mktemp(f"twins-{request.param}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = build_vlm(request.param, root / "vlm", seed=0)
        text = build_text_twin(vlm, root / "text", seed=1)
    return vlm, text


def _linear(first, second, w_first: float, w_second: float) -> str:
    return (
        f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: {w_first}}}\n"
        f"  - model: {second}\n    parameters: {{weight: {w_second}}}\ndtype: float32\n"
    )


def _run(recipe: str, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return merge_recipe(recipe, out)


def test_vlm_output_takes_the_text_models_language_weights_exactly(twins, tmp_path):
    from vlm_models import load_any, text_logits

    vlm, text = twins
    out = _run(_linear(vlm, text, 0.0, 1.0), tmp_path / "out")
    merged, vlm_tensors, text_tensors = read_tensors(out), read_tensors(vlm), read_tensors(text)
    assert set(merged) == set(vlm_tensors)
    language = [n for n in merged if _text_name(n) is not None]
    assert len(language) == len(text_tensors)
    for name in merged:
        expected = text_tensors[_text_name(name)] if name in language else vlm_tensors[name]
        assert torch.equal(merged[name], expected), name
    model = load_any(out)
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert torch.equal(text_logits(model, TOKENS), text_logits(load_any(text), TOKENS))


def test_text_output_takes_the_vlms_language_weights_exactly(twins, tmp_path):
    from vlm_models import load_any, text_logits

    vlm, text = twins
    with pytest.warns(UserWarning, match="vision tower and projector of .* are left out"):
        out = merge_recipe(_linear(text, vlm, 0.0, 1.0), tmp_path / "out")
    merged, vlm_tensors = read_tensors(out), read_tensors(vlm)
    assert set(merged) == set(read_tensors(text))
    from_vlm = {_text_name(n): t for n, t in vlm_tensors.items() if _text_name(n) is not None}
    assert set(merged) == set(from_vlm)
    for name, tensor in merged.items():
        assert torch.equal(tensor, from_vlm[name]), name
    model = load_any(out)
    assert type(model).__name__.endswith("ForCausalLM")
    assert torch.equal(text_logits(model, TOKENS), text_logits(load_any(vlm), TOKENS))


def test_linear_mix_of_the_language_weights_matches_an_independent_sum(twins, tmp_path):
    vlm, text = twins
    out = _run(_linear(vlm, text, 0.25, 0.75), tmp_path / "out")
    merged, vlm_tensors, text_tensors = read_tensors(out), read_tensors(vlm), read_tensors(text)
    for name, tensor in merged.items():
        if _text_name(name) is None:
            assert torch.equal(tensor, vlm_tensors[name]), name  # the lone VLM's vision part
            continue
        expected = 0.25 * vlm_tensors[name].double() + 0.75 * text_tensors[_text_name(name)].double()
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)


def test_two_vlms_and_a_text_model_merge_the_vision_part_among_the_vlms(tmp_path):
    from vlm_models import build_finetune, build_text_twin, build_vlm, load_any, text_logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = build_vlm("mistral3", tmp_path / "vlm", seed=0)
        vlm2 = build_finetune(vlm, tmp_path / "vlm2", seed=3)
        text = build_text_twin(vlm, tmp_path / "text", seed=1)
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {vlm}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {text}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {vlm2}\n    parameters: {{weight: 2.0}}\ndtype: float32\n"
    )
    out = _run(recipe, tmp_path / "out")
    merged, a, b, t = read_tensors(out), read_tensors(vlm), read_tensors(vlm2), read_tensors(text)
    for name, tensor in merged.items():
        if _text_name(name) is None:  # the vision part: the two VLMs' weights, renormalised
            expected = (a[name].double() + 2 * b[name].double()) / 3
        else:
            expected = (a[name].double() + t[_text_name(name)].double() + 2 * b[name].double()) / 4
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(text_logits(load_any(out), TOKENS)).all()


def test_slerp_with_a_vlm_base_copies_the_vision_part_and_loads(tmp_path):
    from vlm_models import build_text_twin, build_vlm, load_any, text_logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = build_vlm("gemma3", tmp_path / "vlm", seed=0)
        text = build_text_twin(vlm, tmp_path / "text", seed=1)
    recipe = (
        f"merge_method: slerp\nbase_model: {vlm}\nmodels:\n  - model: {vlm}\n  - model: {text}\n"
        "parameters: {t: 0.5}\ndtype: float32\n"
    )
    with pytest.warns(UserWarning, match="copied from this model"):
        out = merge_recipe(recipe, tmp_path / "out")
    merged, vlm_tensors, text_tensors = read_tensors(out), read_tensors(vlm), read_tensors(text)
    assert set(merged) == set(vlm_tensors)
    for name, tensor in merged.items():
        if _text_name(name) is None:
            assert torch.equal(tensor, vlm_tensors[name]), name
        elif tensor.dim() == 2:  # a true interpolation of the two: neither end
            assert not torch.equal(tensor, vlm_tensors[name])
            assert not torch.equal(tensor, text_tensors[_text_name(name)])
    assert torch.isfinite(text_logits(load_any(out), TOKENS)).all()


def test_twin_of_another_size_is_a_shape_error_before_any_output(tmp_path):
    from vlm_models import build_text_twin, build_vlm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = build_vlm("mistral3", tmp_path / "vlm", seed=0)
        text = build_text_twin(vlm, tmp_path / "text", seed=1, intermediate_size=96)
    with pytest.raises(ShapeMismatchError) as info:
        _run(_linear(vlm, text, 0.5, 0.5), tmp_path / "out")
    assert info.value.exit_code == 6 and "mlp" in info.value.message
    assert not (tmp_path / "out").exists()


def test_a_vlm_and_an_unrelated_text_family_stay_different_architectures(tmp_path):
    from arch_models import build_type_model
    from vlm_models import build_vlm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = build_vlm("mistral3", tmp_path / "vlm", seed=0)
        other = build_type_model("gpt2", tmp_path / "gpt2", seed=1)
    with pytest.raises(ArchitectureError) as info:
        _run(_linear(vlm, other, 0.5, 0.5), tmp_path / "out")
    assert "different architectures" in info.value.message and info.value.exit_code == 5


def test_stacking_a_vlm_with_its_twin_keeps_the_vlm_and_maps_layers_by_role(twins, tmp_path):
    import json

    from mkstack.cli import stack_app

    from run_helpers import invoke
    from vlm_models import load_any, text_logits

    vlm, text = twins
    recipe = tmp_path / "stack.yml"
    recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {vlm}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {text}\n        layer_range: [1, 4]\ndtype: float32\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = invoke(stack_app, recipe, tmp_path / "stack")
    assert result.exit_code == 0, result.output
    out = tmp_path / "stack"
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 6
    merged, vlm_tensors, text_tensors = read_tensors(out), read_tensors(vlm), read_tensors(text)
    prefix = "language_model.model.layers."
    for name, tensor in merged.items():
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            index = int(index)
            expected = (
                vlm_tensors[f"{prefix}{index}.{rest}"]
                if index < 3
                else text_tensors[f"model.layers.{index - 2}.{rest}"]
            )
        elif _text_name(name) in ("model.norm.weight", "lm_head.weight"):
            expected = text_tensors[_text_name(name)]  # after the layers: the last slice's model
        else:
            expected = vlm_tensors[name]
        assert torch.equal(tensor, expected), name
    assert torch.isfinite(text_logits(load_any(out), TOKENS)).all()


def test_a_vlm_stored_in_the_in_memory_layout_merges_and_is_written_in_the_saved_layout(twins, tmp_path):
    from vlm_models import load_any, resave_in_memory_layout, text_logits

    vlm, text = twins
    if "llama4" in vlm.parent.name:
        pytest.skip("Llama 4 keeps its language model under language_model.model.* in memory too")
    in_memory = resave_in_memory_layout(vlm, tmp_path / "in_memory")
    assert any(n.startswith("model.language_model.") for n in read_tensors(in_memory))
    out = _run(_linear(in_memory, text, 1.0, 0.0), tmp_path / "out")
    merged = read_tensors(out)
    assert set(merged) == set(read_tensors(vlm))  # the names save_pretrained writes
    assert all(torch.equal(t, read_tensors(vlm)[n]) for n, t in merged.items())
    assert torch.equal(text_logits(load_any(out), TOKENS), text_logits(load_any(vlm), TOKENS))


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "idefics3", "paligemma", "aya_vision"])
def test_other_vlm_families_take_their_twins_language_weights_exactly(model_type, tmp_path):
    """llava_next has a learned `image_newline` beside its language model; idefics3 nests it as
    `model.text_model`; paligemma's language model is gemma."""
    from vlm_models import build_text_twin, build_vlm, load_any

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = build_vlm(model_type, tmp_path / "vlm", seed=0)
        text = build_text_twin(vlm, tmp_path / "text", seed=1)
    out = _run(_linear(vlm, text, 0.0, 1.0), tmp_path / "out")
    merged, vlm_tensors, text_tensors = read_tensors(out), read_tensors(vlm), read_tensors(text)
    assert set(merged) == set(vlm_tensors)
    assert sum(_text_name(n) is not None for n in merged) == len(text_tensors)
    for name, tensor in merged.items():
        expected = text_tensors[_text_name(name)] if _text_name(name) is not None else vlm_tensors[name]
        assert torch.equal(tensor, expected), name
    assert type(load_any(out)).__name__ == type(load_any(vlm)).__name__


def test_gemma3_in_its_published_vision_layout_merges_with_its_twin(tmp_path):
    from vlm_models import build_text_twin, build_vlm, load_any, resave_hub_vision_layout, text_logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = build_vlm("gemma3", tmp_path / "vlm", seed=0)
        text = build_text_twin(vlm, tmp_path / "text", seed=1)
    published = resave_hub_vision_layout(vlm, tmp_path / "published")
    assert any(n.startswith("vision_tower.vision_model.") for n in read_tensors(published))
    out = _run(_linear(published, text, 0.5, 0.5), tmp_path / "out")
    merged, vlm_tensors, text_tensors = read_tensors(out), read_tensors(vlm), read_tensors(text)
    assert set(merged) == set(vlm_tensors)  # written as transformers 5 writes them
    for name, tensor in merged.items():
        if _text_name(name) is None:
            assert torch.equal(tensor, vlm_tensors[name]), name
        else:
            expected = 0.5 * vlm_tensors[name].double() + 0.5 * text_tensors[_text_name(name)].double()
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(text_logits(load_any(out), TOKENS)).all()
