"""The MoE outputs beyond Mixtral / Qwen: each built from its dense type reproduces that type exactly.

For every pairing in mkmoe.outputs, a MoE whose experts are all the base's MLP must give the
base's logits (same attention, norms, multipliers, sliding windows); the experts of distinct
fine-tunes must land in the right slots; the output must load completely into the MoE class;
and prompt gates must be the base's own hidden states / embeddings (computed here with
transformers, independently of mkmoe).
"""

from __future__ import annotations

import json

import pytest
import torch

from mkmoe.layouts import router_name
from mkmoe.outputs import OUTPUT_ARCHITECTURES
from mksuite.common.arch.derived import derive_architecture

from mkmoe_helpers import build, dense_family, moe_yaml

# output key -> dense model type it is built from
PAIRINGS = {
    "flex_olmo": "olmo2",
    "granitemoe": "granite",
    "granitemoe_swa": "granite_swa",
    "ernie4_5_moe": "ernie4_5",
    "cohere2_moe": "cohere2",
    "glm4_moe": "glm",  # q/k rows reordered: GLM rotates interleaved pairs, GLM-4-MoE halves
}
# Further dense types of the Mixtral / Qwen2-MoE outputs: (output key, dense type)
MORE_BASES = [("mixtral", "internlm3"), ("mixtral", "iquestcoder"), ("qwen", "seed_oss")]
# Longer than the tiny sliding window (16), so windowed layers are exercised.
LONG_IDS = [1, 5, 9, 20, 33, 7, 100, 14, 3, 60, 70, 12, 8, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]
LAYERS = 3


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_families")
    built = {}

    def make(model_type):
        if model_type not in built:
            built[model_type] = dense_family(model_type, root / model_type, layers=LAYERS)
        return built[model_type]

    return make


def _logits(path):
    from tiny_models import load_causal_lm, logits

    return logits(load_causal_lm(path), LONG_IDS)


def _tensors(path):
    from tiny_models import read_tensors

    return read_tensors(path)


@pytest.mark.parametrize("layout", ["classic", "fused"])
@pytest.mark.parametrize("key", PAIRINGS)
def test_moe_of_identical_experts_gives_the_dense_logits(key, layout, families, tmp_path):
    base, _ = families(PAIRINGS[key])
    text = moe_yaml(base, [base] * 3, gate_mode="random", experts_per_token=2)
    out = build(tmp_path / "moe", text, layout=layout, acknowledge=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == OUTPUT_ARCHITECTURES[key].model_type
    torch.testing.assert_close(_logits(out), _logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", PAIRINGS)
def test_moe_of_one_expert_gives_the_dense_logits(key, families, tmp_path):
    from mksuite.common.errors import RecipeError

    base, _ = families(PAIRINGS[key])
    text = moe_yaml(base, [base], gate_mode="random", experts_per_token=1)
    if OUTPUT_ARCHITECTURES[key].min_experts > 1:  # GLM-4-MoE ranks two scores per expert group
        with pytest.raises(RecipeError, match="needs at least 2 experts"):
            build(tmp_path / "moe", text, acknowledge=True)
        return
    out = build(tmp_path / "moe", text, acknowledge=True)
    torch.testing.assert_close(_logits(out), _logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key,model_type", MORE_BASES, ids=str)
def test_more_dense_types_give_mixtral_or_qwen2_moe_with_the_dense_logits(key, model_type, families, tmp_path):
    base, (ft1, _) = families(model_type)
    text = moe_yaml(base, [base, base], gate_mode="random", architecture=key)
    out = build(tmp_path / "moe", text, acknowledge=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == OUTPUT_ARCHITECTURES[key].model_type
    torch.testing.assert_close(_logits(out), _logits(base), atol=1e-5, rtol=0)
    inferred = build(tmp_path / "inferred", moe_yaml(base, [base, ft1], gate_mode="random"))
    assert json.loads((inferred / "config.json").read_text())["model_type"] == (
        "qwen2_moe" if key == "qwen" else "mixtral"
    )


def test_qwen2_base_without_shared_expert_gives_a_qwen2_moe_with_the_dense_logits(tiny_family, tmp_path):
    base, _ = tiny_family("qwen2")
    out = build(tmp_path / "moe", moe_yaml(base, [base] * 2, gate_mode="random"), acknowledge=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["shared_expert_intermediate_size"] == 0
    assert _tensors(out)["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (32, 0)
    from tiny_models import load_causal_lm, logits

    ids = LONG_IDS[:12]
    torch.testing.assert_close(logits(load_causal_lm(out), ids), logits(load_causal_lm(base), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["classic", "fused"])
@pytest.mark.parametrize("key", PAIRINGS)
def test_output_loads_completely_with_each_expert_in_its_slot(key, layout, families, tmp_path):
    from transformers import AutoModelForCausalLM

    arch = OUTPUT_ARCHITECTURES[key]
    base, (ft1, ft2) = families(PAIRINGS[key])
    experts = [{"model": ft1, "residual_scale": 0.5}, {"model": ft2}]
    out = build(tmp_path / "moe", moe_yaml(base, experts, gate_mode="random"), layout=layout)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == arch.class_name
    written, first, second = _tensors(out), _tensors(ft1), _tensors(ft2)
    if layout == "classic":  # the names transformers itself saves for this class
        config = json.loads((out / "config.json").read_text())
        saved = {w.name for w in derive_architecture(config).for_config(config).all_weights(LAYERS)}
        assert set(written) <= saved and {n for n in saved if "lm_head" not in n} <= set(written)
    state = model.state_dict()
    for layer in range(LAYERS):
        block = f"model.layers.{layer}.{arch.fused.block}"
        gate_up, down = state[f"{block}.experts.gate_up_proj"], state[f"{block}.experts.down_proj"]
        for e, (source, scale) in enumerate(((first, 0.5), (second, 1.0))):
            mlp = f"model.layers.{layer}.mlp"
            expected = source.get(f"{mlp}.gate_up_proj.weight")  # GLM's dense MLP is fused already
            if expected is None:
                expected = torch.cat([source[f"{mlp}.gate_proj.weight"], source[f"{mlp}.up_proj.weight"]])
            assert torch.equal(gate_up[e], expected)
            assert torch.equal(down[e], source[f"{mlp}.down_proj.weight"] * scale)
        router = state[f"{block}.{arch.fused.router}"]
        assert torch.equal(router.float(), written[router_name(arch, layout, layer)].float())
    generated = model.generate(torch.tensor([LONG_IDS[:4]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


PROMPTS = ("the quick brown fox", "one two three four")


@pytest.mark.parametrize("key", PAIRINGS)
def test_prompt_gates_are_the_bases_states_and_random_gates_follow_the_seed(key, families, tmp_path):
    from mkmoe.prompts import load_tokenizer

    from tiny_models import load_causal_lm

    arch = OUTPUT_ARCHITECTURES[key]
    base, (ft1, ft2) = families(PAIRINGS[key])
    experts = [{"model": ft, "positive_prompts": [p]} for ft, p in zip((ft1, ft2), PROMPTS)]
    tokenizer, dense = load_tokenizer(base), load_causal_lm(base)
    ids = [torch.tensor([tokenizer(tokenizer.bos_token + p, add_special_tokens=False)["input_ids"]]) for p in PROMPTS]
    with torch.no_grad():
        states = [dense(input_ids=i, output_hidden_states=True).hidden_states for i in ids]
    embedding = dense.get_input_embeddings().weight.detach()

    def unit(v):
        return v / v.norm()

    hidden = _tensors(build(tmp_path / "hidden", moe_yaml(base, experts, gate_mode="hidden"), precise=True))
    cheap = _tensors(build(tmp_path / "cheap", moe_yaml(base, experts, gate_mode="cheap_embed")))
    random = [
        _tensors(build(tmp_path / f"r{s}", moe_yaml(base, experts, gate_mode="random"), seed=s)) for s in (1, 1, 2)
    ]
    for layer in range(LAYERS):
        name = router_name(arch, "classic", layer)
        expected = torch.stack([unit(s[layer][0, -1]) for s in states])
        torch.testing.assert_close(hidden[name].float(), expected, atol=1e-4, rtol=0)
        expected = torch.stack([unit(embedding[i[0]].sum(0)) for i in ids])
        torch.testing.assert_close(cheap[name].float(), expected, atol=1e-5, rtol=0)
        assert torch.equal(random[0][name], random[1][name]) and not torch.equal(random[0][name], random[2][name])
        assert random[0][name].shape == (2, 32) and not torch.equal(random[0][name][0], random[0][name][1])


def test_olmo3_base_is_refused_naming_the_supported_types(families, tmp_path, no_tensor_reads):
    from mksuite.common.errors import ArchitectureError

    base, (ft1, ft2) = families("olmo3")
    with pytest.raises(ArchitectureError, match="no MoE output architecture is built from olmo3 models") as caught:
        build(tmp_path / "out", moe_yaml(base, [ft1, ft2], gate_mode="random"))
    assert "olmo2" in caught.value.render() and "granite" in caught.value.render()
    assert not (tmp_path / "out").exists()


def test_reordered_rows_turn_interleaved_rope_scores_into_half_split_ones():
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as interleaved
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb as halves

    from mkmoe.layouts import pairs_to_halves_order

    heads, head_dim, rotary, positions = 2, 8, 4, 5
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, positions, head_dim, generator=generator) for _ in range(2))
    angles = torch.randn(1, positions, rotary // 2, generator=generator)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    order = torch.tensor(pairs_to_halves_order(heads * head_dim, head_dim, rotary))

    def permuted(x):  # the projection's output rows reordered, as the weight rows are
        return x.transpose(1, 2).reshape(1, positions, -1)[..., order].reshape(1, positions, heads, -1).transpose(1, 2)

    dense_q, dense_k = interleaved(q, k, cos, sin)
    moe_q, moe_k = halves(permuted(q), permuted(k), cos, sin)
    torch.testing.assert_close(moe_q @ moe_k.transpose(-1, -2), dense_q @ dense_k.transpose(-1, -2))
    assert not torch.allclose(halves(q, k, cos, sin)[0] @ halves(q, k, cos, sin)[1].transpose(-1, -2),
                              dense_q @ dense_k.transpose(-1, -2))  # fmt: skip


def test_a_moe_base_is_refused_as_already_a_moe(tiny_family, tmp_path):
    from mksuite.common.errors import ArchitectureError

    dense, (ft1, ft2) = tiny_family("llama")
    moe = build(tmp_path / "moe", moe_yaml(dense, [ft1, ft2], gate_mode="random"))
    with pytest.raises(ArchitectureError, match="already a Mixture of Experts \\(mixtral, 2 experts\\)"):
        build(tmp_path / "again", moe_yaml(moe, [moe, moe], gate_mode="random"), acknowledge=True)
    assert not (tmp_path / "again").exists()
