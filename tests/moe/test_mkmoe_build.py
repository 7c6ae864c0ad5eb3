"""mkmoe end to end on tiny checkpoints: equivalence with the dense base, tensor placement, configs, loading."""

from __future__ import annotations

import json

import pytest
import torch

from mksuite.common.arch import load_definitions

from mkmoe_helpers import IDS, build, moe_yaml


def _tensors(path):
    from tiny_models import read_tensors

    return read_tensors(path)


def _logits(path, ids=IDS):
    from tiny_models import load_causal_lm, logits

    return logits(load_causal_lm(path), ids)


# -- equivalence -------------------------------------------------------------------------------------
EQUIVALENCE = {
    # id: (input arch, config extras, layout, shared expert)
    "mixtral-classic": ("llama", {}, "classic", False),
    "mixtral-fused": ("llama", {}, "fused", False),
    "mixtral-from-mistral": ("mistral", {}, "classic", False),
    "qwen3-moe": ("qwen3", {}, "classic", False),
    "qwen3-moe-fused": ("qwen3", {}, "fused", False),
    "qwen2-moe-from-llama": ("llama", {"architecture": "qwen"}, "classic", True),
    "qwen2-moe-from-qwen2": ("qwen2", {}, "classic", True),
}


@pytest.mark.parametrize("case", EQUIVALENCE, ids=str)
def test_moe_whose_experts_are_all_the_base_gives_the_dense_logits(case, tiny_family, tmp_path):
    arch, extras, layout, shared = EQUIVALENCE[case]
    base, _ = tiny_family(arch)
    shared_experts = [{"model": base, "residual_scale": 0.0}] if shared else []
    text = moe_yaml(base, [base] * 4, shared=shared_experts, gate_mode="random", experts_per_token=2, **extras)
    out = build(tmp_path / "moe", text, layout=layout, acknowledge=True)
    torch.testing.assert_close(_logits(out), _logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg", "cheap_embed", "uniform_random"])
def test_equivalence_holds_whatever_the_gates(gate_mode, tiny_family, tmp_path):
    base, _ = tiny_family("llama")
    prompts = ("the quick fox", "one two three", "a river", "stone bridge")
    experts = [{"model": base, "positive_prompts": [p]} for p in prompts]
    out = build(tmp_path / "moe", moe_yaml(base, experts, gate_mode=gate_mode), acknowledge=True)
    torch.testing.assert_close(_logits(out), _logits(base), atol=1e-5, rtol=0)


# -- structure -----------------------------------------------------------------------------------------
def _noisy_mixtral(tiny_family, tmp_path, *, seed=0, layout="classic", name="moe"):
    base, (ft1, ft2) = tiny_family("llama")
    experts = [{"model": ft1, "residual_scale": 0.5}, {"model": ft2, "noise_scale": 0.01}]
    return build(tmp_path / name, moe_yaml(base, experts, gate_mode="random"), seed=seed, layout=layout)


def test_mixtral_expert_tensors_are_the_sources_same_layer_mlp(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("llama")
    out = _tensors(_noisy_mixtral(tiny_family, tmp_path))
    first, second, dense = _tensors(ft1), _tensors(ft2), _tensors(base)
    for layer in range(3):
        moe = f"model.layers.{layer}.block_sparse_moe.experts"
        mlp = f"model.layers.{layer}.mlp"
        assert torch.equal(out[f"{moe}.0.w1.weight"], first[f"{mlp}.gate_proj.weight"])
        assert torch.equal(out[f"{moe}.0.w3.weight"], first[f"{mlp}.up_proj.weight"])
        assert torch.equal(out[f"{moe}.0.w2.weight"], first[f"{mlp}.down_proj.weight"] * 0.5)
        for w, projection in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            noise = out[f"{moe}.1.{w}.weight"] - second[f"{mlp}.{projection}.weight"]
            assert 0.008 < noise.std().item() < 0.012
        for name in ("self_attn.q_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{layer}.{name}"], dense[f"model.layers.{layer}.{name}"])
        assert out[f"model.layers.{layer}.block_sparse_moe.gate.weight"].shape == (2, 32)
    assert torch.equal(out["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], dense["lm_head.weight"])


def test_noise_is_reproducible_for_a_seed_and_changes_with_it(tiny_family, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.1.w2.weight"
    one = _tensors(_noisy_mixtral(tiny_family, tmp_path, seed=3, name="a"))[name]
    again = _tensors(_noisy_mixtral(tiny_family, tmp_path, seed=3, name="b"))[name]
    other = _tensors(_noisy_mixtral(tiny_family, tmp_path, seed=4, name="c"))[name]
    assert torch.equal(one, again)
    assert not torch.equal(one, other)


def test_fused_layout_holds_the_classic_tensors_stacked(tiny_family, tmp_path):
    classic = _tensors(_noisy_mixtral(tiny_family, tmp_path, name="classic"))
    fused = _tensors(_noisy_mixtral(tiny_family, tmp_path, layout="fused", name="fused"))
    for layer in range(3):
        old, new = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        gate_up, down = fused[f"{new}.experts.gate_up_proj"], fused[f"{new}.experts.down_proj"]
        assert gate_up.shape == (2, 128, 32) and down.shape == (2, 32, 64)
        for e in range(2):
            expected = torch.cat([classic[f"{old}.experts.{e}.w1.weight"], classic[f"{old}.experts.{e}.w3.weight"]])
            assert torch.equal(gate_up[e], expected)
            assert torch.equal(down[e], classic[f"{old}.experts.{e}.w2.weight"])
        assert torch.equal(fused[f"{new}.gate.weight"], classic[f"{old}.gate.weight"])
    assert not any("block_sparse_moe" in name for name in fused)


def test_mixtral_config_from_a_sliding_window_mistral(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("mistral")
    with pytest.warns(UserWarning, match="3 experts is not a power of two"):
        out = build(tmp_path / "moe", moe_yaml(base, [ft1, ft2, base], gate_mode="random", experts_per_token=1))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (3, 1)
    assert config["sliding_window"] is None
    assert config["intermediate_size"] == 64 and config["dtype"] == "float32"


def test_qwen2_moe_from_llama_has_shared_expert_and_zero_qkv_biases(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("llama")
    text = moe_yaml(base, [ft1, ft2], shared=[{"model": base, "residual_scale": 0.25}], gate_mode="random")
    out = build(tmp_path / "moe", text)
    tensors, dense = _tensors(out), _tensors(base)
    for layer in range(3):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        assert torch.equal(tensors[f"{attn}.q_proj.bias"], torch.zeros(32))
        assert torch.equal(tensors[f"{attn}.k_proj.bias"], torch.zeros(16))
        assert torch.equal(tensors[f"{attn}.v_proj.bias"], torch.zeros(16))
        assert torch.equal(tensors[f"{mlp}.shared_expert.up_proj.weight"], dense[f"{mlp}.up_proj.weight"])
        assert torch.equal(tensors[f"{mlp}.shared_expert.down_proj.weight"], dense[f"{mlp}.down_proj.weight"] * 0.25)
        assert tensors[f"{mlp}.shared_expert_gate.weight"].shape == (1, 32)
        assert tensors[f"{mlp}.gate.weight"].shape == (2, 32)
        assert torch.equal(tensors[f"{mlp}.experts.1.gate_proj.weight"], _tensors(ft2)[f"{mlp}.gate_proj.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["decoder_sparse_step"]) == (2, 2, 1)
    assert config["moe_intermediate_size"] == config["shared_expert_intermediate_size"] == 64
    assert config["norm_topk_prob"] is True and config["use_sliding_window"] is False
    assert config["sliding_window"] is None


def test_qwen3_moe_copies_qk_norms_and_names_experts_per_module(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("qwen3")
    out = build(tmp_path / "moe", moe_yaml(base, [ft1, ft2], gate_mode="random", experts_per_token=1))
    tensors, dense = _tensors(out), _tensors(base)
    for layer in range(3):
        for norm in ("q_norm", "k_norm"):
            name = f"model.layers.{layer}.self_attn.{norm}.weight"
            assert torch.equal(tensors[name], dense[name])
        assert torch.equal(
            tensors[f"model.layers.{layer}.mlp.experts.0.down_proj.weight"],
            _tensors(ft1)[f"model.layers.{layer}.mlp.down_proj.weight"],
        )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (2, 1, 64)
    assert config["norm_topk_prob"] is True and "num_local_experts" not in config


ARCH_CASES = {"mixtral": ("llama", False), "qwen2_moe": ("qwen2", True), "qwen3_moe": ("qwen3", False)}


@pytest.mark.parametrize("definition", ARCH_CASES)
def test_classic_tensor_names_are_the_architecture_definitions(definition, tiny_family, tmp_path):
    arch, shared = ARCH_CASES[definition]
    base, (ft1, ft2) = tiny_family(arch)
    out = build(tmp_path / "moe", moe_yaml(base, [ft1, ft2], shared=[base] if shared else [], gate_mode="random"))
    config = json.loads((out / "config.json").read_text())
    weights = load_definitions()[definition].for_config(config).all_weights(3)
    names = set(_tensors(out))
    assert names <= {w.name for w in weights}
    assert {w.name for w in weights if not w.optional} <= names


LOADING = [
    ("llama", {}, "classic"),
    ("llama", {}, "fused"),
    ("llama", {"architecture": "qwen"}, "classic"),
    ("qwen2", {}, "fused"),
    ("qwen3", {}, "classic"),
]


@pytest.mark.parametrize("arch,extras,layout", LOADING, ids=lambda v: v if isinstance(v, str) else "")
def test_output_loads_into_transformers_moe_class_completely_and_generates(arch, extras, layout, tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, (ft1, ft2) = tiny_family(arch)
    shared = [base] if extras or arch == "qwen2" else []
    text = moe_yaml(base, [ft1, ft2], shared=shared, gate_mode="random", **extras)
    out = build(tmp_path / "moe", text, layout=layout)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "Moe" in type(model).__name__ or "Mixtral" in type(model).__name__
    router = next(n for n in _tensors(out) if n.startswith("model.layers.2.") and n.endswith(".gate.weight"))
    torch.testing.assert_close(model.model.layers[2].mlp.gate.weight, _tensors(out)[router], atol=0, rtol=0)
    generated = model.generate(torch.tensor([IDS[:4]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_output_has_the_base_tokenizer_byte_for_byte_and_the_config_copy(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("llama")
    experts = [{"model": ft1, "positive_prompts": ["the fox"]}, {"model": ft2, "positive_prompts": ["one two"]}]
    text = moe_yaml(base, experts, gate_mode="hidden")
    out = build(tmp_path / "moe", text)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert (out / "mergekit_moe_config.yml").read_text() == text
    card = (out / "README.md").read_text()
    assert "Mixture of Experts" in card and "hidden gates" in card and "mkmoe" in card
    assert str(base) in card and str(ft1) in card and str(ft2) in card and text.strip() in card
    assert "https://" not in card  # local models: no links, and no address invented for the tool


def test_dtype_sets_tensor_and_config_dtype(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("llama")
    out = build(tmp_path / "moe", moe_yaml(base, [ft1, ft2], gate_mode="random", dtype="bfloat16"))
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_base_keeps_its_tie_and_writes_no_lm_head(tiny_family, tmp_path):
    base, (ft1, ft2) = tiny_family("llama", tie=True)
    out = build(tmp_path / "moe", moe_yaml(base, [ft1, ft2], gate_mode="random"))
    assert "lm_head.weight" not in _tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.isfinite(_logits(out)).all()
