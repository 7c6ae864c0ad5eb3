"""mkstack's pure parts: mode -> slices, slices -> recipe text, per-layer config rebuilding."""

from __future__ import annotations

import pytest

from mkmerge.methods import METHODS
from mkmerge.recipe import parse_recipe
from mkstack.config_fixups import SourceLayout, implied_layer_types, rebuild_layer_config
from mkstack.layer_map import LayerSource
from mkstack.modes import (
    StackSlice,
    expand_slices,
    interleave_slices,
    parse_slice_arg,
    residual_write_filters,
    slices_from_args,
    upscale_slices,
)
from mkstack.recipe_text import recipe_text
from mksuite.common.arch import load_definitions
from mksuite.common.errors import ArchitectureError, RecipeError
from mksuite.common.recipe import ConditionalEntry


def ranges(slices):
    return [(s.model, s.start, s.end) for s in slices]


# --- modes ---------------------------------------------------------------------------------


def test_interleave_of_two_80_layer_models_reproduces_goliath_and_its_137_layers():
    slices = interleave_slices("A", "B", depth=80, window=16, overlap=8)
    assert ranges(slices) == [
        ("A", 0, 16), ("B", 8, 24), ("A", 17, 32), ("B", 25, 40), ("A", 33, 48),
        ("B", 41, 56), ("A", 49, 64), ("B", 57, 72), ("A", 65, 80),
    ]  # fmt: skip
    assert sum(s.length for s in slices) == 137


def test_interleave_clips_the_last_window_to_the_depth():
    assert ranges(interleave_slices("A", "B", depth=10, window=4, overlap=1)) == [
        ("A", 0, 4),
        ("B", 3, 7),
        ("A", 7, 10),
    ]


@pytest.mark.parametrize("window, overlap", [(16, 0), (16, 16), (80, 8)])
def test_interleave_refuses_overlaps_and_windows_that_leave_nothing_to_alternate(window, overlap):
    with pytest.raises(RecipeError):
        interleave_slices("A", "B", depth=80, window=window, overlap=overlap)


def test_upscale_is_solar_depth_up_scaling():
    slices = upscale_slices("A", depth=32, overlap=8)
    assert ranges(slices) == [("A", 0, 24), ("A", 8, 32)]
    assert sum(s.length for s in slices) == 48


def test_upscale_refuses_an_overlap_that_empties_a_copy():
    with pytest.raises(RecipeError, match="--overlap 32"):
        upscale_slices("A", depth=32, overlap=32)


def test_expand_inserts_a_zeroed_copy_after_every_nth_layer_like_llama_pro():
    slices = expand_slices("A", depth=32, every=4, zero_filters=("o_proj.", "down_proj."))
    assert sum(s.length for s in slices) == 40
    assert ranges(slices[:4]) == [("A", 0, 4), ("A", 3, 4), ("A", 4, 8), ("A", 7, 8)]
    zeroed = (("o_proj.", 0.0), ("down_proj.", 0.0))
    assert [s.scale for s in slices[:4]] == [(), zeroed, (), zeroed]


def test_expand_keeps_a_remainder_that_is_shorter_than_the_step():
    slices = expand_slices("A", depth=5, every=2, zero_filters=("x",))
    assert ranges(slices) == [("A", 0, 2), ("A", 1, 2), ("A", 2, 4), ("A", 3, 4), ("A", 4, 5)]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama", ("self_attn.o_proj.", "down_proj.")),
        ("qwen2", ("self_attn.o_proj.", "down_proj.")),
        ("gemma2", ("self_attn.o_proj.", "down_proj.")),
        ("phi3", ("self_attn.o_proj.", "down_proj.")),
        ("gpt2", ("attn.c_proj.", "mlp.c_proj.")),
        ("gpt_neox", ("attention.dense.", "mlp.dense_4h_to_h.")),
        ("mixtral", ("self_attn.o_proj.", ".w2.")),
        ("qwen2_moe", ("self_attn.o_proj.", "down_proj.")),
    ],
)
def test_residual_write_filters_name_each_architectures_output_projections(name, expected):
    arch = load_definitions()[name]
    assert residual_write_filters(arch) == expected
    names = [t.name for t in arch.layer_weight_templates]
    for pattern in expected:  # every filter selects something, and never an input projection
        selected = [n for n in names if pattern in n]
        assert selected and not any(("q_proj" in n or "up_proj" in n or "c_fc" in n or ".w1." in n) for n in selected)


def test_residual_write_filters_refuse_an_architecture_without_known_projections():
    import dataclasses

    arch = dataclasses.replace(load_definitions()["llama"], name="odd", layer_weight_templates=())
    with pytest.raises(ArchitectureError, match="odd"):
        residual_write_filters(arch)


def test_slice_args_are_half_open_ranges_resolved_through_aliases():
    arg = parse_slice_arg("a:0-16", {"a": "org/model@main"})
    assert (arg.model, arg.start, arg.end) == ("org/model@main", 0, 16)
    assert parse_slice_arg("C:/models/x:3-4").model == "C:/models/x"  # the last colon separates
    assert ranges(slices_from_args([arg], {"org/model@main": 16})) == [("org/model@main", 0, 16)]


@pytest.mark.parametrize("text, depth, message", [("a:0-17", 16, "has 16 layers"), ("a:4-4", 16, "empty")])
def test_slice_args_out_of_bounds_or_empty_are_refused_naming_the_argument(text, depth, message):
    with pytest.raises(RecipeError, match=message) as caught:
        slices_from_args([parse_slice_arg(text)], {"a": depth})
    assert f"--slice {text}" in str(caught.value)


def test_malformed_slice_arg_is_a_recipe_error():
    with pytest.raises(RecipeError, match="a:0..16") as caught:
        parse_slice_arg("a:0..16")
    assert "MODEL:START-END" in caught.value.hint


# --- recipe text ---------------------------------------------------------------------------


def test_recipe_text_parses_with_mkmerges_parser_into_the_same_slices():
    slices = [
        StackSlice("org/a", 0, 16),
        StackSlice("local dir: b#1", 8, 9, (("o_proj.", 0.0), ("down_proj.", 0.0))),
    ]
    text = recipe_text(slices, dtype="bfloat16", comment="generated\nby a test")
    recipe = parse_recipe(text, known_methods=METHODS.keys())
    assert recipe.merge_method == "passthrough" and str(recipe.dtype) == "torch.bfloat16"
    got = [(str(s.sources[0].model), *s.sources[0].layer_range) for s in recipe.slices]
    assert got == [("org/a", 0, 16), ("local dir: b#1", 8, 9)]
    assert recipe.slices[0].sources[0].parameters == {}
    assert recipe.slices[1].sources[0].parameters["scale"] == (
        ConditionalEntry("o_proj.", 0.0),
        ConditionalEntry("down_proj.", 0.0),
        ConditionalEntry(None, 1.0),
    )
    assert not recipe.warnings


# --- config fix-ups ------------------------------------------------------------------------


def layers(*pairs):
    return [LayerSource(model, layer) for model, layer in pairs]


def test_per_layer_lists_follow_their_source_layers_and_depth_is_updated():
    config = {
        "num_hidden_layers": 3, "layer_types": ["s", "f", "x"], "no_rope_layers": [1, 0, 1], "eos_token_id": [1, 2, 3]
    }  # fmt: skip
    fixed = rebuild_layer_config(
        config,
        layer_key="num_hidden_layers",
        layers=layers(("A", 2), ("A", 0), ("A", 0), ("A", 1)),
        sources={"A": SourceLayout(config, 3)},
    )
    assert fixed.config["num_hidden_layers"] == 4
    assert fixed.config["layer_types"] == ["x", "s", "s", "f"]
    assert fixed.config["no_rope_layers"] == [1, 1, 1, 0]
    assert fixed.config["eos_token_id"] == [1, 2, 3]  # token ids are not per-layer, whatever their length
    assert config["layer_types"] == ["s", "f", "x"]  # the input is not modified
    assert fixed.warnings == ()


def test_each_output_layer_takes_the_entry_of_its_own_source_models_config():
    a = {"num_hidden_layers": 2, "layer_types": ["a0", "a1"], "mlp_only_layers": [1]}
    b = {"num_hidden_layers": 2, "layer_types": ["b0", "b1"], "mlp_only_layers": [0]}
    fixed = rebuild_layer_config(
        a,
        layer_key="num_hidden_layers",
        layers=layers(("A", 0), ("B", 0), ("B", 1), ("A", 1)),
        sources={"A": SourceLayout(a, 2), "B": SourceLayout(b, 2)},
    )
    assert fixed.config["layer_types"] == ["a0", "b0", "b1", "a1"]
    assert fixed.config["mlp_only_layers"] == [1, 3]  # index lists are remapped, not re-indexed


def test_settings_under_a_dotted_layer_key_are_rebuilt_in_that_section():
    config = {"text_config": {"num_hidden_layers": 2, "layer_types": ["s", "f"]}, "vision_config": {"depth": [1, 2]}}
    fixed = rebuild_layer_config(
        config,
        layer_key="text_config.num_hidden_layers",
        layers=layers(("A", 1), ("A", 1), ("A", 0)),
        sources={"A": SourceLayout(config, 2)},
    )
    assert fixed.config["text_config"] == {"num_hidden_layers": 3, "layer_types": ["f", "f", "s"]}
    assert fixed.config["vision_config"] == {"depth": [1, 2]}


def test_a_sliding_window_pattern_is_materialised_into_explicit_layer_types():
    config = {"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window_pattern": 2}
    assert implied_layer_types(config, None, 4) == [
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"
    ]  # fmt: skip
    fixed = rebuild_layer_config(
        config,
        layer_key="num_hidden_layers",
        layers=layers(("A", 1), ("A", 2), ("A", 3)),
        sources={"A": SourceLayout(config, 4)},
    )
    assert fixed.config["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]


def test_configs_that_transformers_does_not_know_get_no_invented_layer_types():
    assert implied_layer_types({"model_type": "no-such-model"}, None, 4) is None
    assert implied_layer_types({"model_type": "llama", "num_hidden_layers": 4}, None, 4) is None
    # Mamba computes layer_types from other fields and refuses it stored: never write it out.
    assert implied_layer_types({"model_type": "mamba", "num_hidden_layers": 4}, None, 4) is None


def test_positional_thresholds_that_cannot_be_remapped_are_warned_about_by_name():
    config = {"num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 2, "first_k_dense_replace": 1}
    fixed = rebuild_layer_config(
        config, layer_key="num_hidden_layers", layers=layers(("A", 0), ("A", 3)), sources={"A": SourceLayout(config, 4)}
    )
    assert len(fixed.warnings) == 1  # first_k_dense_replace is rebuilt (tests/stack/test_sparse_layers.py)
    assert "max_window_layers" in fixed.warnings[0]
    quiet = {"num_hidden_layers": 4, "use_sliding_window": False, "max_window_layers": 28, "first_k_dense_replace": 0}
    assert (
        rebuild_layer_config(
            quiet, layer_key="num_hidden_layers", layers=layers(("A", 0)), sources={"A": SourceLayout(quiet, 4)}
        ).warnings
        == ()
    )


def test_a_per_layer_list_only_one_stacked_model_has_is_kept_with_a_warning():
    a = {"num_hidden_layers": 2, "layer_types": ["s", "f"]}
    b = {"num_hidden_layers": 2}
    fixed = rebuild_layer_config(
        a,
        layer_key="num_hidden_layers",
        layers=layers(("A", 0), ("B", 1)),
        sources={"A": SourceLayout(a, 2), "B": SourceLayout(b, 2)},
    )
    assert fixed.config["layer_types"] == ["s", "f"]
    assert len(fixed.warnings) == 1 and "layer_types" in fixed.warnings[0] and "B" in fixed.warnings[0]


def test_dense_layers_kept_in_front_get_a_new_first_k_dense_replace():
    a = {"num_hidden_layers": 4, "first_k_dense_replace": 2}
    b = {"num_hidden_layers": 4, "first_k_dense_replace": 1}
    fixed = rebuild_layer_config(
        a,
        layer_key="num_hidden_layers",
        layers=layers(("A", 0), ("A", 1), ("B", 0), ("A", 2), ("B", 1), ("B", 3)),
        sources={"A": SourceLayout(a, 4), "B": SourceLayout(b, 4)},
    )
    assert fixed.config["first_k_dense_replace"] == 3
    assert fixed.warnings == ()
