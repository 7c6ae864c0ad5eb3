"""Text roles and modules of tensor names (common/arch/roles.py, common/arch/modules.py)."""

from __future__ import annotations

import pytest

from mksuite.common.arch import ArchitectureDefinition, WeightInfo
from mksuite.common.arch.modules import model_modules
from mksuite.common.arch.roles import are_twins, module_of, text_role


@pytest.mark.parametrize(
    ("name", "nested", "role"),
    [
        ("language_model.model.layers.3.mlp.up_proj.weight", True, "model.layers.3.mlp.up_proj.weight"),
        ("language_model.lm_head.weight", True, "lm_head.weight"),
        ("model.language_model.embed_tokens.weight", True, "model.embed_tokens.weight"),
        ("model.text_model.norm.weight", True, "model.norm.weight"),
        ("lm_head.weight", True, "lm_head.weight"),
        ("model.layers.0.self_attn.q_proj.bias", False, "model.layers.0.self_attn.q_proj.bias"),
        ("vision_tower.encoder.layers.0.mlp.fc1.weight", True, None),
        ("model.vision_tower.patch_conv.weight", True, None),
        ("visual.blocks.0.attn.qkv.weight", False, None),
        ("multi_modal_projector.linear_1.weight", True, None),
        ("image_newline", True, None),  # beside a nested language model: the vision side
        ("image_newline", False, "image_newline"),
    ],
)
def test_text_roles(name, nested, role):
    assert text_role(name, nested) == role


@pytest.mark.parametrize(
    ("name", "nested", "module"),
    [
        ("language_model.model.layers.0.mlp.up_proj.weight", True, "text_decoder"),
        ("lm_head.weight", True, "text_decoder"),
        ("vision_tower.transformer.layers.0.ffn_norm.weight", True, "vision_tower"),
        ("vision_model.class_embedding", True, "vision_model"),
        ("model.connector.modality_projection.proj.weight", True, "multi_modal_projector"),
        ("image_newline", True, "multi_modal_projector"),
        ("model.norm.weight", False, "text_decoder"),
    ],
)
def test_modules_of_names(name, nested, module):
    assert module_of(name, nested) == module


def _arch(name, pre, layers, post=(), **extra) -> ArchitectureDefinition:
    return ArchitectureDefinition(
        name=name,
        model_type=name.lower(),
        architectures=(name,),
        num_layers_config_key="num_hidden_layers",
        override_num_layers=None,
        pre_weight_templates=tuple(WeightInfo(n) for n in pre),
        layer_weight_templates=tuple(WeightInfo(n) for n in layers),
        post_weight_templates=tuple(WeightInfo(n) for n in post),
        **extra,
    )


TEXT = _arch(
    "TextLM",
    ["model.embed_tokens.weight"],
    ["model.layers.${layer_index}.mlp.up_proj.weight"],
    ["model.norm.weight"],
)
VLM = _arch(
    "VLM",
    [
        "language_model.model.embed_tokens.weight",
        "vision_tower.ln_pre.weight",
        "vision_tower.blocks.0.fc.weight",
        "vision_tower.blocks.1.fc.weight",
        "vision_tower.ln_post.weight",
        "multi_modal_projector.linear.weight",
    ],
    ["language_model.model.layers.${layer_index}.mlp.up_proj.weight"],
    ["language_model.model.norm.weight"],
    module_order=(
        "vision_tower.ln_pre.weight",
        "vision_tower.blocks.0.fc.weight",
        "vision_tower.blocks.1.fc.weight",
        "vision_tower.ln_post.weight",
        "multi_modal_projector.linear.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
    ),
)


def test_a_vlm_and_its_text_model_are_twins_but_two_text_families_are_not():
    assert are_twins(VLM, TEXT) and are_twins(TEXT, VLM)
    other_text = _arch("OtherLM", ["model.embed_tokens.weight"], ["model.layers.${layer_index}.mlp.up_proj.weight"])
    assert not are_twins(TEXT, other_text)  # same names, no vision part: still different families
    wider = _arch("Wider", ["model.embed_tokens.weight"], ["model.layers.${layer_index}.mlp.gate_proj.weight"])
    assert not are_twins(VLM, wider)


def test_a_vlm_is_cut_into_modules_with_a_vision_stack_of_its_own():
    config = {"num_hidden_layers": 3, "vision_config": {"num_hidden_layers": 2}}
    modules = model_modules(VLM, config, 3)
    assert list(modules) == ["text_decoder", "vision_tower", "multi_modal_projector"]
    text, vision, projector = modules.values()
    assert [w.name for w in text.arch.pre_weight_templates] == ["language_model.model.embed_tokens.weight"]
    assert [w.name for w in text.arch.post_weight_templates] == ["language_model.model.norm.weight"]
    assert text.num_layers == 3
    assert [w.name for w in vision.arch.layer_weight_templates] == ["vision_tower.blocks.${layer_index}.fc.weight"]
    assert [w.name for w in vision.arch.pre_weight_templates] == ["vision_tower.ln_pre.weight"]
    assert [w.name for w in vision.arch.post_weight_templates] == ["vision_tower.ln_post.weight"]
    assert (vision.num_layers, vision.arch.num_layers_config_key) == (2, "vision_config.num_hidden_layers")
    assert projector.num_layers == 0 and [w.name for w in projector.arch.all_weights(0)] == [
        "multi_modal_projector.linear.weight"
    ]


def test_a_text_model_is_one_module():
    assert list(model_modules(TEXT, {"num_hidden_layers": 2}, 2)) == ["text_decoder"]
