"""Architecture definitions: shipped JSON against real tiny transformers checkpoints, the reader, inference."""

from __future__ import annotations

import json
import os
import struct
import sys
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mksuite.common.arch import (
    ArchitectureDefinition,
    WeightInfo,
    find_architecture,
    get_config_value,
    infer_architecture,
    load_definitions,
    parse_definition,
    read_definitions,
    set_config_value,
)
from mksuite.common.errors import ArchitectureError

VOCAB = 101  # odd, so no other dimension of the tiny models equals it
LAYERS = 3


# --- tiny real checkpoints ---------------------------------------------------------------


def _decoder(cls_name: str, **extra):
    def build():
        import transformers

        kwargs = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        kwargs.update(extra)
        return getattr(transformers, cls_name)(**kwargs)

    return build


def _gpt2():
    import transformers

    return transformers.GPT2Config(
        n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    )


def _gpt_neox(**extra):
    def build():
        import transformers

        return transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )

    return build


_MOE = dict(num_experts_per_tok=2)
CHECKPOINTS = {
    # case id: (expected definition, config factory)
    "llama": ("llama", _decoder("LlamaConfig")),
    "llama_tied": ("llama", _decoder("LlamaConfig", tie_word_embeddings=True)),
    "llama_biases": ("llama", _decoder("LlamaConfig", attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", _decoder("MistralConfig")),
    "qwen2": ("qwen2", _decoder("Qwen2Config")),
    "qwen2_tied": ("qwen2", _decoder("Qwen2Config", tie_word_embeddings=True)),
    "qwen3": ("qwen3", _decoder("Qwen3Config", head_dim=8)),
    "qwen3_attention_bias": ("qwen3", _decoder("Qwen3Config", head_dim=8, attention_bias=True)),
    "gemma2": ("gemma2", _decoder("Gemma2Config", head_dim=8)),
    "gemma3_text": ("gemma3", _decoder("Gemma3TextConfig", head_dim=8)),
    "gemma3_text_attention_bias": ("gemma3", _decoder("Gemma3TextConfig", head_dim=8, attention_bias=True)),
    "phi3": ("phi3", _decoder("Phi3Config")),
    "gpt2": ("gpt2", _gpt2),
    "gpt_neox": ("gpt_neox", _gpt_neox()),
    "gpt_neox_tied_no_attention_bias": ("gpt_neox", _gpt_neox(tie_word_embeddings=True, attention_bias=False)),
    "mixtral": ("mixtral", _decoder("MixtralConfig", num_local_experts=4, **_MOE)),
    "qwen2_moe": (
        "qwen2_moe",
        _decoder("Qwen2MoeConfig", num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=40, **_MOE),
    ),
    "qwen2_moe_no_qkv_bias": (
        "qwen2_moe",
        _decoder(
            "Qwen2MoeConfig",
            num_experts=3,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=40,
            qkv_bias=False,
            **_MOE,
        ),
    ),
    "qwen3_moe": ("qwen3_moe", _decoder("Qwen3MoeConfig", num_experts=4, moe_intermediate_size=48, head_dim=8, **_MOE)),
}


def _safetensors_header(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each case saved with save_pretrained: (config.json, {saved tensor name: shape})."""
    import torch
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    saved = {}
    for case, (_, make_config) in CHECKPOINTS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make_config())
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        tensors: dict[str, list[int]] = {}
        for file in folder.glob("*.safetensors"):
            tensors.update(_safetensors_header(file))
        saved[case] = (json.loads((folder / "config.json").read_text()), tensors)
    return saved


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_definition_lists_exactly_the_tensors_transformers_saves(case, checkpoints):
    config, tensors = checkpoints[case]
    definition = find_architecture(config)
    assert definition is not None and definition.name == CHECKPOINTS[case][0]
    assert definition.num_layers(config) == LAYERS

    weights = definition.all_weights(definition.num_layers(config))
    listed = {w.name for w in weights}
    required = {w.name for w in weights if not w.optional}
    assert len(listed) == len(weights), "a name is listed twice"
    assert required <= set(tensors), f"required but not saved: {sorted(required - set(tensors))}"
    assert set(tensors) <= listed, f"saved but not listed: {sorted(set(tensors) - listed)}"


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_is_embed_marks_exactly_the_vocabulary_indexed_tensors(case, checkpoints):
    config, tensors = checkpoints[case]
    definition = find_architecture(config)
    for weight in definition.all_weights(definition.num_layers(config)):
        if weight.name in tensors:
            assert weight.is_embed == (tensors[weight.name][0] == VOCAB), weight.name


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_every_absent_weight_is_optional_and_absent_tied_weights_resolve(case, checkpoints):
    config, tensors = checkpoints[case]
    definition = find_architecture(config)
    for weight in definition.all_weights(definition.num_layers(config)):
        if weight.name not in tensors:
            assert weight.optional, weight.name
            if weight.tied_names:
                assert any(t in tensors for t in weight.tied_names), weight.name


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_layer_index_of_recovers_each_saved_tensors_layer(case, checkpoints):
    config, tensors = checkpoints[case]
    definition = find_architecture(config)
    n = definition.num_layers(config)
    expected = {w.name: None for w in definition.pre_weights(n) + definition.post_weights(n)}
    for layer in range(n):
        expected.update({w.name: layer for w in definition.layer_weights(layer, n)})
    assert {name: definition.layer_index_of(name) for name in tensors} == {name: expected[name] for name in tensors}


def test_tied_llama_omits_lm_head_and_points_it_at_the_embedding(checkpoints):
    config, tensors = checkpoints["llama_tied"]
    (head,) = [w for w in find_architecture(config).post_weights(LAYERS) if w.name == "lm_head.weight"]
    assert "lm_head.weight" not in tensors
    assert head.optional and head.is_embed
    assert head.tied_names == ("model.embed_tokens.weight",)
    assert "model.embed_tokens.weight" in tensors


def test_moe_definitions_expand_one_tensor_per_expert(checkpoints):
    config, tensors = checkpoints["mixtral"]
    definition = find_architecture(config)
    assert definition.num_experts == 4
    names = [w.name for w in definition.layer_weights(2, LAYERS)]
    assert [n for n in names if ".w1." in n] == [
        f"model.layers.2.block_sparse_moe.experts.{e}.w1.weight" for e in range(4)
    ]
    assert find_architecture(checkpoints["qwen2_moe_no_qkv_bias"][0]).num_experts == 3


def test_expert_count_comes_from_the_first_config_key_present():
    # Hub Qwen3-MoE configs say num_experts; transformers 5 saves num_local_experts.
    qwen3_moe = load_definitions()["qwen3_moe"]
    assert qwen3_moe.for_config({"num_experts": 5, "num_local_experts": 7}).num_experts == 5
    assert qwen3_moe.for_config({"num_local_experts": 7}).num_experts == 7


def test_unbound_moe_definition_refuses_to_list_layer_weights():
    mixtral = load_definitions()["mixtral"]
    assert mixtral.num_experts is None
    with pytest.raises(ArchitectureError, match="no expert count") as caught:
        mixtral.layer_weights(0, 2)
    assert "for_config" in caught.value.hint
    assert mixtral.for_config({"num_local_experts": 2}).num_experts == 2
    with pytest.raises(ArchitectureError, match="num_local_experts"):
        mixtral.for_config({})


def test_gpt2_checkpoints_without_transformer_prefix_resolve_through_aliases(checkpoints):
    config, tensors = checkpoints["gpt2"]
    bare = {name.removeprefix("transformer.") for name in tensors}
    definition = find_architecture(config)
    for weight in definition.all_weights(LAYERS):
        if not weight.optional:
            assert weight.name not in bare and any(a in bare for a in weight.aliases), weight.name


# --- the shipped package ----------------------------------------------------------------


def test_shipped_definitions_include_the_supported_architectures():
    assert {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "phi3",
        "gpt2",
        "gpt_neox",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
    } <= set(load_definitions())
    assert load_definitions()["gemma3"].model_type == "gemma3_text"


def test_load_definitions_hands_out_copies_of_its_cache():
    first = load_definitions()
    first.clear()
    assert "llama" in load_definitions()


def test_definitions_are_read_through_importlib_resources_even_from_a_zip(tmp_path, monkeypatch):
    archive = tmp_path / "zipped_defs.zip"
    llama = (Path(__file__).resolve().parents[2] / "architectures" / "llama.json").read_text()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped_arch_pkg/__init__.py", "")
        zf.writestr("zipped_arch_pkg/tinyllama.json", llama)
        zf.writestr("zipped_arch_pkg/notes.txt", "not a definition")
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.chdir(tmp_path)
    definitions = read_definitions("zipped_arch_pkg")
    sys.modules.pop("zipped_arch_pkg", None)
    assert list(definitions) == ["tinyllama"]
    assert definitions["tinyllama"].source == "zipped_arch_pkg/tinyllama.json"
    assert definitions["tinyllama"].pre_weights(2) == load_definitions()["llama"].pre_weights(2)


def _package_with(tmp_path, monkeypatch, files: dict[str, str]) -> str:
    package = tmp_path / "broken_arch_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_arch_pkg", raising=False)
    return "broken_arch_pkg"


def test_invalid_json_file_is_an_architecture_error_naming_the_file(tmp_path, monkeypatch):
    package = _package_with(tmp_path, monkeypatch, {"bad.json": "{not json"})
    with pytest.raises(ArchitectureError, match=r"broken_arch_pkg/bad\.json is not valid JSON"):
        read_definitions(package)


# --- parsing ----------------------------------------------------------------------------


def _minimal(**changes) -> dict:
    data = {
        "model_type": "toy",
        "architectures": ["ToyForCausalLM"],
        "num_layers_config_key": "num_hidden_layers",
        "pre_weights": [{"name": "embed.weight", "is_embed": True}],
        "layer_templates": {"weights": [{"name": "layers.${layer_index}.w"}]},
        "post_weights": [{"name": "head.weight", "optional": True, "tied_names": ["embed.weight"]}],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": None}, "`model_type` must be a non-empty string"),
        ({"architectures": "ToyForCausalLM"}, "`architectures` must be a non-empty list"),
        ({"pre_weights": [{"is_embed": True}]}, r"`pre_weights\[0\]` has no `name`"),
        ({"pre_weights": [{"name": 3}]}, r"`pre_weights\[0\].name` must be a non-empty string"),
        ({"pre_weights": [{"name": "a", "optional": "yes"}]}, "must be true or false"),
        ({"pre_weights": [{"name": "a", "aliases": "b"}]}, "must be a list of non-empty strings"),
        ({"pre_weights": [{"name": "a", "force_dtype": "int65"}]}, "did you mean `int64`"),
        ({"post_weight": []}, r"unknown key `post_weight` \(did you mean `post_weights`\?\)"),
        ({"layer_templates": []}, "`layer_templates` must be an object"),
        ({"layer_templates": {"weights": [{"name": "layers.0.w"}]}}, "no \\$\\{layer_index\\} placeholder"),
        ({"layer_templates": {"weights": [{"name": "l.${layer_idx}.w"}]}}, "unknown placeholder"),
        ({"pre_weights": [{"name": "l.${layer_index}.w"}]}, "may not use"),
        ({"layer_templates": {"weights": [{"name": "l.${layer_index}.${expert_index}"}]}}, "may not use"),
        ({"pre_weights": [{"name": "head.weight"}]}, "listed twice"),
        ({"num_layers_config_key": None}, "needs `num_layers_config_key` or `override_num_layers`"),
        ({"override_num_layers": -1}, "non-negative integer"),
        ({"kind": "modular"}, "multi-module"),
        ({"num_experts_config_keys": "n_experts"}, "`num_experts_config_keys` must be a list"),
    ],
)
def test_malformed_definition_is_an_architecture_error_naming_the_file(changes, message):
    with pytest.raises(ArchitectureError, match=message) as caught:
        parse_definition(_minimal(**changes), name="toy", source="architectures/toy.json")
    assert "architectures/toy.json" in caught.value.message


def test_unknown_weightinfo_fields_are_ignored():
    data = _minimal(pre_weights=[{"name": "embed.weight", "input_space": "x", "is_kq": True}])
    definition = parse_definition(data, name="toy", source="toy.json")
    assert definition.pre_weights(2) == [WeightInfo("embed.weight")]


def test_templates_substitute_layer_and_count_variants_in_names_aliases_and_tied_names():
    data = _minimal(
        layer_templates={
            "weights": [
                {
                    "name": "layers.${layer_index}.to.${layer_index+1}",
                    "aliases": ["blocks.${layer_index-1}.of.${num_layers}"],
                    "tied_names": ["x.${num_layers+1}.${num_layers-1}"],
                }
            ]
        },
        post_weights=[{"name": "layers.${num_layers}.norm", "aliases": ["$layer_index.literal"]}],
    )
    definition = parse_definition(data, name="toy", source="toy.json")
    assert definition.layer_weights(2, 5) == [
        WeightInfo("layers.2.to.3", aliases=("blocks.1.of.5",), tied_names=("x.6.4",))
    ]
    assert definition.post_weights(5) == [WeightInfo("layers.5.norm", aliases=("$layer_index.literal",))]


def test_all_weights_orders_pre_then_layers_then_post():
    definition = parse_definition(_minimal(), name="toy", source="toy.json")
    assert [w.name for w in definition.all_weights(2)] == ["embed.weight", "layers.0.w", "layers.1.w", "head.weight"]
    with pytest.raises(ValueError):
        definition.layer_weights(2, 2)


def test_layer_index_of_inverts_offset_templates_and_requires_consistency():
    data = _minimal(
        layer_templates={
            "weights": [
                {"name": "layers.${layer_index}.w", "aliases": ["old.${layer_index+1}.w"]},
                {"name": "pair.${layer_index}.${layer_index+1}.w"},
            ]
        }
    )
    definition = parse_definition(data, name="toy", source="toy.json")
    assert definition.layer_index_of("layers.7.w") == 7
    assert definition.layer_index_of("old.7.w") == 6
    assert definition.layer_index_of("old.0.w") is None
    assert definition.layer_index_of("pair.3.4.w") == 3
    assert definition.layer_index_of("pair.3.5.w") is None
    assert definition.layer_index_of("embed.weight") is None


def test_override_num_layers_wins_over_the_config_key():
    definition = parse_definition(_minimal(override_num_layers=2), name="toy", source="toy.json")
    assert definition.num_layers({"num_hidden_layers": 40}) == 2


# --- lookup -----------------------------------------------------------------------------


def _claiming(name: str, model_type: str) -> ArchitectureDefinition:
    return parse_definition(_minimal(model_type=model_type), name=name, source=f"{name}.json")


def test_find_architecture_picks_by_model_type_when_two_definitions_claim_a_name():
    definitions = {"toy_a": _claiming("toy_a", "toy_a"), "toy_b": _claiming("toy_b", "toy_b")}
    config = {"architectures": ["ToyForCausalLM"], "model_type": "toy_b"}
    assert find_architecture(config, definitions).name == "toy_b"
    config["model_type"] = "toy_c"
    assert find_architecture(config, definitions) is None
    assert find_architecture(config, {"toy_a": definitions["toy_a"]}).name == "toy_a"


def test_find_architecture_returns_none_for_unknown_or_unnamed_architectures():
    assert find_architecture({"architectures": ["NoSuchModelForCausalLM"], "model_type": "x"}) is None
    assert find_architecture({"model_type": "llama"}) is None


def test_find_architecture_refuses_configs_listing_several_architectures():
    with pytest.raises(ArchitectureError, match="exactly one"):
        find_architecture({"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]})


# --- config keys ------------------------------------------------------------------------


def test_dotted_config_keys_read_and_write_nested_values():
    config = {"text_config": {"num_hidden_layers": 12}, "n_layer": 3}
    assert get_config_value(config, "text_config.num_hidden_layers") == 12
    assert get_config_value(config, "text_config.missing", default=None) is None
    with pytest.raises(KeyError):
        get_config_value(config, "n_layer.deeper")
    set_config_value(config, "text_config.num_hidden_layers", 20)
    set_config_value(config, "vision_config.depth", 4)
    assert config == {"text_config": {"num_hidden_layers": 20}, "n_layer": 3, "vision_config": {"depth": 4}}


def test_num_layers_reads_a_dotted_key_and_reports_its_absence():
    definition = parse_definition(
        _minimal(num_layers_config_key="text_config.num_hidden_layers"), name="toy", source="toy.json"
    )
    assert definition.num_layers({"text_config": {"num_hidden_layers": 6}}) == 6
    with pytest.raises(ArchitectureError, match="text_config.num_hidden_layers"):
        definition.num_layers({"num_hidden_layers": 6})
    with pytest.raises(ArchitectureError, match="non-negative integer"):
        definition.num_layers({"text_config": {"num_hidden_layers": "6"}})


# --- inference --------------------------------------------------------------------------


def _made_up_model(depth: int, *, head: bool = True, extra_bias: bool = False) -> list[str]:
    names = ["backbone.tok_embed.weight", "backbone.pos_embed.weight", "backbone.final_norm.weight"]
    for i in range(depth):
        names += [f"backbone.blocks.{i}.attn.weight", f"backbone.blocks.{i}.ffn.experts.0.weight"]
        if extra_bias and i == 0:
            names.append(f"backbone.blocks.{i}.attn.bias")
    names += [f"adapter.{i}.proj.weight" for i in range(2)]
    if head:
        names.append("lm_head.weight")
    return names


def test_infer_architecture_builds_layer_templates_from_the_first_integer_segment():
    definition = infer_architecture(
        [_made_up_model(4), _made_up_model(4, head=False, extra_bias=True)],
        {"architectures": ["MadeUpForCausalLM"], "model_type": "made_up"},
    )
    assert definition.inferred and definition.name == "inferred"
    assert definition.architectures == ("MadeUpForCausalLM",) and definition.model_type == "made_up"
    assert definition.num_layers_config_key is None
    assert definition.num_layers({}) == 4
    assert definition.layer_weight_templates == (
        WeightInfo("backbone.blocks.${layer_index}.attn.weight"),
        WeightInfo("backbone.blocks.${layer_index}.ffn.experts.0.weight"),
        WeightInfo("backbone.blocks.${layer_index}.attn.bias", optional=True),
    )
    assert definition.pre_weights(4) == [
        WeightInfo("backbone.tok_embed.weight", is_embed=True),
        WeightInfo("backbone.pos_embed.weight"),
        WeightInfo("backbone.final_norm.weight"),
        WeightInfo("adapter.0.proj.weight"),
        WeightInfo("adapter.1.proj.weight"),
        WeightInfo("lm_head.weight", is_embed=True, optional=True, tied_names=("backbone.tok_embed.weight",)),
    ]
    assert definition.post_weights(4) == []
    assert definition.layer_index_of("backbone.blocks.3.attn.weight") == 3
    assert definition.layer_index_of("adapter.1.proj.weight") is None


def test_infer_architecture_counts_the_deepest_model_and_marks_short_stacks_optional_only_per_model():
    definition = infer_architecture([_made_up_model(3), _made_up_model(5)], {})
    assert definition.override_num_layers == 5
    assert all(not w.optional for w in definition.layer_weight_templates)
    assert definition.architectures == () and definition.model_type == ""


def test_infer_architecture_without_numbered_names_has_only_pre_weights():
    definition = infer_architecture([["wte.weight", "norm.weight"]], {})
    assert definition.num_layers({}) == 0
    assert [w.name for w in definition.all_weights(0)] == ["wte.weight", "norm.weight"]
    assert [w.is_embed for w in definition.all_weights(0)] == [True, False]


def test_infer_architecture_rejects_a_flat_list_of_names():
    with pytest.raises(TypeError):
        infer_architecture(["model.layers.0.w"], {})
