"""MoE inputs in either expert layout: per expert (as save_pretrained writes) or fused (as
transformers v5 holds them), merged and stacked alike; output in save_pretrained's layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mkmerge.cli import merge_app, plan_app
from mkmerge.methods import METHODS
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mkstack.cli import stack_app
from mksuite.common.build import BuildOptions
from mksuite.common.input_models import open_input_models
from mksuite.common.loading import ModelReference

from arch_models import build_type_model, model_class
from moe_layouts import MOE_TYPES, save_fused
from run_helpers import invoke
from tiny_models import read_tensors

TOKENS = [1, 5, 9, 17, 33, 65, 7, 3]
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yml"))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Per model type: {"base", "ft-a", "ft-b"} saved per expert, and the same three fused."""
    root = tmp_path_factory.mktemp("moe_layouts")
    built = {}

    def make(model_type: str) -> tuple[dict[str, Path], dict[str, Path]]:
        if model_type not in built:
            saved = root / model_type / "saved" / "models"
            fused = root / model_type / "fused" / "models"
            base = build_type_model(model_type, saved / "base", layers=4)
            paths = {"base": base}
            for seed, name in ((1, "ft-a"), (2, "ft-b")):
                paths[name] = build_type_model(model_type, saved / name, seed=seed, base=base)
            built[model_type] = (paths, {name: save_fused(path, fused / name) for name, path in paths.items()})
        return built[model_type]

    return make


def _logits(path: Path) -> torch.Tensor:
    config = json.loads((path / "config.json").read_text())
    model = model_class(config["model_type"]).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_a_fused_checkpoint_reads_as_exactly_the_tensors_save_pretrained_writes(moe_models, model_type):
    saved, fused = moe_models(model_type)
    expected = load_file(saved["ft-a"] / "model.safetensors")  # independent: the per-expert file itself
    ref = ModelReference.parse(str(fused["ft-a"]))
    opened = open_input_models([ref])[ref]
    source = opened.files.tensors
    assert set(source.names()) == set(expected)
    assert not any(name.endswith("gate_up_proj") for name in source.names())
    for name, tensor in expected.items():
        assert torch.equal(source.load(name), tensor), name
        assert source.info(name).shape == tuple(tensor.shape)
        if tensor.dim() == 2 and tensor.shape[0] >= 3:
            assert torch.equal(source.load_rows(name, 1, 3), tensor[1:3]), name


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_linear_one_zero_of_mixed_layouts_reproduces_the_first_input_exactly(moe_models, tmp_path, model_type):
    saved, fused = moe_models(model_type)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {fused['ft-a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {saved['ft-b']}\n    parameters: {{weight: 0.0}}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    result = invoke(merge_app, recipe, out)
    assert result.exit_code == 0, result.output
    # Written per expert, as save_pretrained writes: the same names and bytes as ft-a saved that way.
    expected = load_file(saved["ft-a"] / "model.safetensors")
    merged = read_tensors(out)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    assert torch.equal(_logits(out), _logits(saved["ft-a"]))
    # transformers computes a fused checkpoint from differently laid-out memory: equal to rounding
    torch.testing.assert_close(_logits(out), _logits(fused["ft-a"]), rtol=0, atol=1e-6)


# Every method has an example; those naming models/ft-chat or a tokenizer need the llama demo's vocabularies.
MOE_EXAMPLES = [e for e in EXAMPLES if "ft-chat" not in e.read_text() and "tokenizer" not in e.read_text()]


def test_the_examples_run_on_moe_models_cover_every_method():
    methods = {parse_recipe(e.read_text(), known_methods=METHODS.keys()).merge_method for e in MOE_EXAMPLES}
    assert methods == set(METHODS)


@pytest.mark.parametrize("example", MOE_EXAMPLES, ids=lambda p: p.stem)
def test_every_method_merges_mixed_layouts_exactly_as_it_merges_saved_ones(moe_models, tmp_path, example):
    saved, fused = moe_models("qwen3_moe")  # qwen2_moe's zero biases leave multislerp no direction
    mixed = tmp_path / "mixed" / "models"
    mixed.mkdir(parents=True)
    for name, source in (("base", fused["base"]), ("ft-a", fused["ft-a"]), ("ft-b", saved["ft-b"])):
        (mixed / name).symlink_to(source, target_is_directory=True)
    recipe = parse_recipe(example.read_text(), known_methods=METHODS.keys())
    outputs = {}
    for label, root in (("saved", saved["base"].parent.parent), ("mixed", mixed.parent)):
        out = tmp_path / f"out-{label}"
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            run_merge(recipe, out, BuildOptions(seed=7))
        outputs[label] = read_tensors(out)
    assert outputs["mixed"].keys() == outputs["saved"].keys()
    assert not any("gate_up_proj" in name for name in outputs["mixed"])
    for name, tensor in outputs["saved"].items():
        assert torch.equal(outputs["mixed"][name], tensor), name
    assert torch.isfinite(_logits(tmp_path / "out-mixed")).all()


def test_linear_half_half_of_mixed_layouts_is_the_mean_of_the_experts(moe_models, tmp_path):
    saved, fused = moe_models("mixtral")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {saved['ft-a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {fused['ft-b']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    assert invoke(merge_app, recipe, out).exit_code == 0
    a, b = load_file(saved["ft-a"] / "model.safetensors"), load_file(saved["ft-b"] / "model.safetensors")
    merged = read_tensors(out)
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_stacking_mixed_layouts_copies_each_layer_from_its_source(moe_models, tmp_path, model_type):
    saved, fused = moe_models(model_type)
    out = tmp_path / "stack"
    result = invoke(stack_app, out, "--slice", f"{fused['ft-a']}:0-2", "--slice", f"{saved['ft-b']}:1-2")
    assert result.exit_code == 0, result.output
    a, b = load_file(saved["ft-a"] / "model.safetensors"), load_file(saved["ft-b"] / "model.safetensors")
    stacked = read_tensors(out)
    for name, tensor in a.items():
        if ".layers.1." in name:
            assert torch.equal(stacked[name], tensor), name
            top = name.replace(".layers.1.", ".layers.2.")
            assert torch.equal(stacked[top], b[name]), top
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.isfinite(_logits(out)).all()


def test_a_fused_tensor_holding_more_experts_than_the_config_names_is_refused(moe_models, tmp_path, no_tensor_reads):
    _, fused = moe_models("qwen3_moe")
    wrong = Path(shutil.copytree(fused["ft-a"], tmp_path / "wrong"))
    config = json.loads((wrong / "config.json").read_text())
    key = "num_experts" if "num_experts" in config else "num_local_experts"
    config[key] = 3
    config["num_experts_per_tok"] = 2
    (wrong / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {wrong}\n    parameters: {{weight: 1.0}}\n")
    result = invoke(merge_app, recipe, tmp_path / "out")
    assert result.exit_code == 6, result.output
    assert "stacks 4 experts" in result.output and "describes 3" in result.output
    assert "Traceback" not in result.output


def test_an_mkmoe_output_in_the_fused_layout_merges_like_its_classic_twin(tiny_family, tmp_path):
    from mkmoe_helpers import build, moe_yaml

    base, (ft1, ft2) = tiny_family("llama")
    config = moe_yaml(base, [ft1, ft2], gate_mode="random")
    classic = build(tmp_path / "classic", config, seed=3)
    fused = build(tmp_path / "fused", config, seed=3, layout="fused")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {fused}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {classic}\n    parameters: {{weight: 0.0}}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    result = invoke(merge_app, recipe, out)
    assert result.exit_code == 0, result.output
    expected, merged = read_tensors(classic), read_tensors(out)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], expected[name].float()) for name in expected)


def test_a_fused_tensor_holding_fewer_experts_than_the_config_names_is_refused(moe_models, tmp_path, no_tensor_reads):
    _, fused = moe_models("mixtral")
    wrong = Path(shutil.copytree(fused["ft-a"], tmp_path / "wrong"))
    config = json.loads((wrong / "config.json").read_text())
    config["num_local_experts"] = 5
    (wrong / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {wrong}\n    parameters: {{weight: 1.0}}\n")
    result = invoke(plan_app, recipe)
    assert result.exit_code == 6, result.output
    assert "experts.gate_up_proj` has shape [4, 128, 32], which cannot hold" in " ".join(result.output.split())
    assert "expert 4" in result.output and "Traceback" not in result.output
