"""`model+lora` inputs end to end: recipes in, merged models that transformers loads out."""

from __future__ import annotations

import hashlib

import pytest
import torch
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mksuite.common.errors import MissingTensorError

from lora_adapters import PREFIX, adapter_config, embedding_factors, linear_factors, write_adapter
from run_helpers import merged_tensors
from tiny_models import load_causal_lm, logits, read_tensors

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.v_proj", "model.embed_tokens")
ALPHA, RANK = 16, 4


@pytest.fixture
def family(tiny_family):
    base, (a, _) = tiny_family("llama")
    return base, a


@pytest.fixture(scope="module")
def adapter_tensors():
    return (
        linear_factors(MODULES[0], RANK, 32, 32, seed=1)
        | linear_factors(MODULES[1], RANK, 32, 16, seed=2)
        | embedding_factors(MODULES[2], RANK, 128, 32, seed=3)
    )


@pytest.fixture
def adapter(tmp_path, adapter_tensors):
    config = adapter_config(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "embed_tokens"])
    return write_adapter(tmp_path / "adapter", adapter_tensors, config)


def dense_merge(model_path, tensors: dict) -> dict[str, torch.Tensor]:
    """The base weights with every adapter update added, computed directly."""
    merged = dict(read_tensors(model_path))
    scale = ALPHA / RANK
    for module in MODULES:
        if module.endswith("embed_tokens"):
            a, b = tensors[f"{PREFIX}{module}.lora_embedding_A"], tensors[f"{PREFIX}{module}.lora_embedding_B"]
            delta = (b @ a).T
        else:
            a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
            delta = b @ a
        merged[f"{module}.weight"] = merged[f"{module}.weight"] + delta * scale
    return merged


merge = merged_tensors


def test_string_reference_passthrough_writes_the_adapted_model(family, adapter, adapter_tensors, tmp_path):
    base, _ = family
    merged = merge(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n", tmp_path / "out")
    expected = dense_merge(base, adapter_tensors)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)


def test_adapted_output_runs_like_the_base_with_updated_parameters_in_transformers(
    family, adapter, adapter_tensors, tmp_path
):
    base, _ = family
    out = tmp_path / "out"
    merge(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n", out)
    reference = load_causal_lm(base)
    expected = dense_merge(base, adapter_tensors)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(expected[name])
    tokens = [1, 7, 30, 2, 99, 5]
    torch.testing.assert_close(logits(load_causal_lm(out), tokens), logits(reference, tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(load_causal_lm(base), tokens), logits(reference, tokens))


def test_mapping_reference_in_a_linear_merge(family, adapter, adapter_tensors, tmp_path):
    base, a = family
    recipe = f"""\
merge_method: linear
models:
  - model:
      model: {{path: {base}}}
      lora: {{path: {adapter}}}
    parameters: {{weight: 0.5}}
  - model: {a}
    parameters: {{weight: 0.5}}
"""
    merged = merge(recipe, tmp_path / "out")
    adapted, other = dense_merge(base, adapter_tensors), read_tensors(a)
    for name in adapted:
        torch.testing.assert_close(merged[name], 0.5 * adapted[name] + 0.5 * other[name], rtol=1e-6, atol=1e-6)


def test_base_and_its_adapted_self_are_distinct_inputs(family, adapter, adapter_tensors, tmp_path):
    base, _ = family
    recipe = (
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapter}\n    parameters: {{weight: 0.5}}\n"
    )
    merged = merge(recipe, tmp_path / "out")
    original, adapted = read_tensors(base), dense_merge(base, adapter_tensors)
    for name in original:
        expected = original[name] + 0.5 * (adapted[name] - original[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_lora_merge_dtype_option_sets_the_dtype_the_adapted_model_is_read_in(
    family, adapter, adapter_tensors, tmp_path
):
    base, _ = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n")
    result = CliRunner().invoke(
        merge_app, [str(recipe), str(tmp_path / "out"), "--lora-merge-dtype", "bfloat16", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    merged = read_tensors(tmp_path / "out")
    for name, tensor in dense_merge(base, adapter_tensors).items():
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], tensor.to(torch.bfloat16)), name


def test_unknown_lora_merge_dtype_is_a_recipe_error(family, adapter, tmp_path):
    base, _ = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n")
    result = CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "o"), "--lora-merge-dtype", "bfloat61"])
    assert result.exit_code == 2
    assert "did you mean `bfloat16`" in result.output


def test_bad_adapter_fails_the_command_before_any_tensor_is_read(family, tmp_path, no_tensor_reads):
    base, _ = family
    adapter = write_adapter(
        tmp_path / "adapter", linear_factors("model.layers.9.self_attn.q_proj", 4, 32, 32, seed=4), adapter_config()
    )
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n")
    result = CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "out")])
    assert result.exit_code == MissingTensorError.exit_code
    assert "layers.9" in result.output and f"adapter {adapter}:" in result.output
    assert not (tmp_path / "out").exists()


def add_blob(repo_dir, commit: str, filename: str, data: bytes) -> None:
    """Store a file as huggingface_hub does: content in blobs/, symlinked from the snapshot."""
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f"../../blobs/{blob.name}")


def test_hub_adapter_resolves_through_the_hub_cache(family, adapter, adapter_tensors, tmp_path):
    base, _ = family
    cache, commit = tmp_path / "hub", "c" * 40
    repo = cache / "models--org--tiny-lora"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        add_blob(repo, commit, name, (adapter / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+org/tiny-lora\n")
    result = CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "out"), "--cache-dir", str(cache), "--quiet"])
    assert result.exit_code == 0, result.output
    merged = read_tensors(tmp_path / "out")
    for name, tensor in dense_merge(base, adapter_tensors).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)
