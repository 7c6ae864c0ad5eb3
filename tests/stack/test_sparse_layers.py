"""Stacked MoE models keep each layer's MLP kind: decoder_sparse_step, mlp_only_layers and
first_k_dense_replace follow the source layers, or the stack is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mkmerge.cli import merge_app
from mkstack.cli import stack_app
from mkstack.config_fixups import SourceLayout, rebuild_layer_config
from mkstack.layer_map import LayerSource
from mksuite.common.errors import RecipeError

from arch_models import model_class, tiny_type_config
from run_helpers import invoke
from tiny_models import read_tensors

TOKENS = [1, 5, 9, 17, 33, 65, 7, 3]


def layers(*pairs):
    return [LayerSource(model, layer) for model, layer in pairs]


def _build(model_type: str, out: Path, seed: int = 0, **fields) -> Path:
    config = tiny_type_config(model_type, layers=4)
    for key, value in fields.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model_class(model_type)(config).save_pretrained(out)
    return out


def _is_sparse(layer) -> bool:
    return hasattr(layer.mlp, "experts")


def _loaded(path: Path):
    config = json.loads((path / "config.json").read_text())
    model, info = model_class(config["model_type"]).from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """Two Qwen2-MoE models whose odd layers (1, 3) are sparse: decoder_sparse_step 2."""
    root = tmp_path_factory.mktemp("stepped")
    return _build("qwen2_moe", root / "a", decoder_sparse_step=2), _build(
        "qwen2_moe", root / "b", seed=1, decoder_sparse_step=2, mlp_only_layers=[3]
    )


def test_a_sparse_step_becomes_an_explicit_list_of_dense_layers():
    a = {"num_hidden_layers": 4, "num_experts": 4, "decoder_sparse_step": 2, "mlp_only_layers": []}
    b = {"num_hidden_layers": 4, "num_experts": 4, "decoder_sparse_step": 1, "mlp_only_layers": [0]}
    fixed = rebuild_layer_config(
        a,
        layer_key="num_hidden_layers",
        layers=layers(("A", 1), ("A", 0), ("B", 0), ("B", 2), ("A", 3), ("A", 2)),
        sources={"A": SourceLayout(a, 4), "B": SourceLayout(b, 4)},
    )
    # A: layers 1, 3 sparse; B: every layer but 0 sparse
    assert fixed.config["decoder_sparse_step"] == 1
    assert fixed.config["mlp_only_layers"] == [1, 2, 5]
    assert fixed.warnings == ()


def test_a_dense_layer_after_an_moe_layer_cannot_be_described_by_first_k_dense_replace():
    config = {"num_hidden_layers": 4, "first_k_dense_replace": 1}
    with pytest.raises(RecipeError, match=r"output layer 1 would be dense .*first_k_dense_replace"):
        rebuild_layer_config(
            config,
            layer_key="num_hidden_layers",
            layers=layers(("A", 3), ("A", 0)),
            sources={"A": SourceLayout(config, 4)},
        )


def test_a_stack_of_stepped_moe_layers_loads_with_each_layer_of_its_source_kind(stepped, tmp_path):
    a, b = stepped
    out = tmp_path / "out"
    # output layers <- a:1 (sparse), a:0 (dense), a:1 (sparse), b:1 (sparse), b:2 (dense), b:3 (dense: mlp_only)
    result = invoke(stack_app, out, "--slice", f"{a}:1-2", "--slice", f"{a}:0-2", "--slice", f"{b}:1-4")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == [1, 4, 5]
    model = _loaded(out)
    sources = [(a, 1), (a, 0), (a, 1), (b, 1), (b, 2), (b, 3)]
    assert [_is_sparse(layer) for layer in model.model.layers] == [True, False, True, True, False, False]
    stacked = read_tensors(out)
    files = {path: load_file(path / "model.safetensors") for path in (a, b)}
    for j, (path, layer) in enumerate(sources):
        mine = {n: t for n, t in files[path].items() if n.startswith(f"model.layers.{layer}.")}
        assert mine
        for name, tensor in mine.items():
            assert torch.equal(stacked[name.replace(f".layers.{layer}.", f".layers.{j}.", 1)], tensor)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([TOKENS])).logits).all()


def test_mkmerge_writes_the_same_sparse_layer_config_for_the_same_stack(stepped, tmp_path):
    a, b = stepped
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [1, 4]\n"
        f"  - sources:\n      - model: {b}\n        layer_range: [0, 2]\ndtype: float32\n"
    )
    assert invoke(merge_app, recipe, tmp_path / "merged").exit_code == 0
    assert invoke(stack_app, recipe, tmp_path / "stacked").exit_code == 0
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged == json.loads((tmp_path / "stacked" / "config.json").read_text())
    assert merged["mlp_only_layers"] == [1, 3]  # a:1 S, a:2 D, a:3 S, b:0 D, b:1 S
    assert [_is_sparse(layer) for layer in _loaded(tmp_path / "merged").model.layers] == [
        True, False, True, False, True
    ]  # fmt: skip


def test_deepseek_dense_prefix_is_kept_and_a_late_dense_layer_is_refused(tmp_path, no_tensor_reads):
    model = _build("deepseek_v3", tmp_path / "ds")  # first_k_dense_replace 1: layer 0 dense
    out = tmp_path / "out"
    result = invoke(stack_app, out, "--slice", f"{model}:1-4", "--slice", f"{model}:0-1")
    assert result.exit_code == 2, result.output
    assert "output layer 3 would be dense" in result.output and "Traceback" not in result.output
    assert not out.exists()
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: [1, 4]\n"
        f"  - sources:\n      - model: {model}\n        layer_range: [0, 1]\n"
    )
    result = invoke(merge_app, recipe, out)
    assert result.exit_code == 2 and "first_k_dense_replace" in result.output, result.output


def test_deepseek_stack_keeping_the_dense_prefix_loads(tmp_path):
    model = _build("deepseek_v3", tmp_path / "ds")
    out = tmp_path / "out"
    result = invoke(stack_app, out, "--slice", f"{model}:0-2", "--slice", f"{model}:1-4")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["first_k_dense_replace"] == 1 and config["num_hidden_layers"] == 5
    assert [_is_sparse(layer) for layer in _loaded(out).model.layers] == [False, True, True, True, True]
