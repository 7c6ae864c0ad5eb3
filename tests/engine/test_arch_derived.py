"""Architecture descriptions derived from transformers' own classes on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mksuite.common.arch import load_definitions
from mksuite.common.arch.derived import derive_architecture
from mksuite.common.arch.registry import choose_architecture
from mksuite.common.errors import ArchitectureError
from mksuite.common.input_models import open_input_models
from mksuite.common.loading import ModelReference

LAYERS = 3
_MOE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def _json_cases():
    from tiny_models import ARCHS, tiny_config

    cases = {arch: tiny_config(arch, layers=LAYERS) for arch in ARCHS}
    cases["mixtral"] = transformers.MixtralConfig(**_MOE, num_local_experts=3)
    cases["qwen2_moe"] = transformers.Qwen2MoeConfig(
        **_MOE, num_experts=3, moe_intermediate_size=16, shared_expert_intermediate_size=16
    )
    cases["qwen3_moe"] = transformers.Qwen3MoeConfig(**_MOE, num_experts=3, moe_intermediate_size=16)
    return cases


def _as_file_config(config: transformers.PretrainedConfig, cls_name: str) -> dict:
    data = config.to_dict()
    data["architectures"] = [cls_name]
    return data


def _entries(definition, config: dict) -> dict[str, tuple]:
    bound = definition.for_config(config)
    return {w.name: (w.is_embed, w.optional, w.tied_names) for w in bound.all_weights(bound.num_layers(config))}


@pytest.mark.parametrize("stem", sorted(load_definitions()))
def test_derived_description_agrees_with_the_shipped_json(stem):
    definition = load_definitions()[stem]
    config = _as_file_config(_json_cases()[stem], definition.architectures[0])
    derived = derive_architecture(config)
    assert derived is not None and not derived.inferred
    assert derived.num_layers_config_key == definition.num_layers_config_key
    ours, theirs = _entries(derived, config), _entries(definition, config)
    # The JSONs list optional biases a given config may not have; every name the derived
    # description has is in the JSON, and every tensor the JSON requires is derived.
    assert set(ours) <= set(theirs)
    assert {n for n, (_, optional, _) in theirs.items() if not optional} <= set(ours)
    for name, (is_embed, optional, tied) in ours.items():
        assert is_embed == theirs[name][0], name
        assert set(tied) <= set(theirs[name][2]), name
        if tied:
            assert optional and theirs[name][1], name


def _saved_names(model: transformers.PreTrainedModel, tmp_path) -> set[str]:
    model.save_pretrained(tmp_path)
    return set(load_file(tmp_path / "model.safetensors"))


def _required_and_all(definition, config: dict) -> tuple[set[str], set[str]]:
    entries = _entries(definition, config)
    return {n for n, (_, optional, _) in entries.items() if not optional}, set(entries)


def _tiny_gemma3_vlm() -> transformers.Gemma3Config:
    text = dict(_MOE, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)


@pytest.mark.parametrize(
    "config, cls",
    [
        (transformers.Qwen3MoeConfig(**_MOE, num_experts=3, moe_intermediate_size=16), "Qwen3MoeForCausalLM"),
        (_tiny_gemma3_vlm(), "Gemma3ForConditionalGeneration"),
    ],
    ids=["qwen3_moe-fused-in-memory", "gemma3-vlm-legacy-prefixes"],
)
def test_derived_names_are_the_names_save_pretrained_writes(config, cls, tmp_path):
    torch.manual_seed(0)
    saved = _saved_names(getattr(transformers, cls)(config), tmp_path)
    file_config = _as_file_config(config, cls)
    required, every = _required_and_all(derive_architecture(file_config), file_config)
    assert required <= saved <= every


def test_vision_patch_embeddings_are_not_vocabulary_indexed():
    config = _as_file_config(_tiny_gemma3_vlm(), "Gemma3ForConditionalGeneration")
    derived = derive_architecture(config)
    embeds = {w.name for w in derived.pre_weights(LAYERS) + derived.post_weights(LAYERS) if w.is_embed}
    assert embeds == {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
    assert derived.num_layers_config_key == "text_config.num_hidden_layers"
    # The vision tower's own layers are fixed tensors, outside the text layer stack.
    assert any("vision_tower" in w.name for w in derived.pre_weights(LAYERS))
    assert all("vision_tower" not in w.name for w in derived.layer_weights(0, LAYERS))


def test_a_class_name_borrowed_from_another_family_falls_back_to_the_model_types_own_class():
    exaone = transformers.AutoConfig.for_model(
        "exaone", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=LAYERS, num_attention_heads=4
    )
    config = _as_file_config(exaone, "LlamaForCausalLM")  # how EXAONE 3 checkpoints ship
    stored = _entries(derive_architecture({**config, "architectures": ["ExaoneForCausalLM"]}), config)
    chosen = choose_architecture(config, [n for n, (_, optional, _) in stored.items() if not optional])
    assert chosen is not None and chosen.model_type == "exaone"
    assert chosen.layer_weights(0, LAYERS)[0].name.startswith("transformer.h.0.")


def test_the_derivation_is_cached_per_config():
    config = _as_file_config(_json_cases()["llama"], "LlamaForCausalLM")
    assert derive_architecture(dict(config)) is derive_architecture(dict(config, _name_or_path="elsewhere"))
    assert derive_architecture(config) is not derive_architecture(dict(config, num_hidden_layers=LAYERS + 1))


def test_a_stored_tensor_no_description_names_is_refused_not_dropped(tiny_model, tmp_path):
    from tiny_models import copy_model

    model = copy_model(tiny_model("llama"), tmp_path / "extra")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.self_attn.linear_attn.weight"] = torch.zeros(2, 2)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArchitectureError) as caught:
        open_input_models([ModelReference.parse(str(model))])
    assert "model.layers.0.self_attn.linear_attn.weight" in caught.value.message
    assert caught.value.exit_code == 5


def test_a_model_type_transformers_does_not_know_still_gets_an_inferred_description(tiny_model, tmp_path):
    from tiny_models import copy_model

    model = copy_model(tiny_model("llama"), tmp_path / "odd")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "odd", "architectures": ["OddLM"]}))
    with pytest.warns(UserWarning, match="inferred"):
        opened = open_input_models([ModelReference.parse(str(model))])
    assert next(iter(opened.values())).arch.inferred
