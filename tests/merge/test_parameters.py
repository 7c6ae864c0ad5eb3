"""Parameter settings: parsing, gradients, filters, precedence (docs/recipes.md, §1.6)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from mksuite.common.errors import RecipeError
from mksuite.common.recipe.parameters import (
    ConditionalEntry,
    evaluate_setting,
    layer_position,
    parse_setting,
    resolve_parameter,
)


def parse(raw):
    return parse_setting(raw, field="parameters.t", line=7)


# --- parsing --------------------------------------------------------------------------------


def test_scalar_numbers_become_floats():
    assert parse(1) == 1.0 and isinstance(parse(1), float)
    assert parse(0.25) == 0.25


def test_booleans_become_one_and_zero():
    assert parse(True) == 1.0
    assert parse(False) == 0.0


def test_list_of_numbers_is_a_gradient_tuple():
    assert parse([0, 0.5, True]) == (0.0, 0.5, 1.0)


def test_list_of_mappings_is_a_conditional_list_in_order():
    setting = parse([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}])
    assert setting == (ConditionalEntry("self_attn", (0.0, 1.0)), ConditionalEntry(None, 0.5))


def test_bare_filter_value_mapping_is_a_one_element_conditional_list():
    assert parse({"filter": "mlp", "value": 0.3}) == (ConditionalEntry("mlp", 0.3),)


def test_string_value_is_rejected_naming_field_and_line():
    with pytest.raises(RecipeError) as info:
        parse("0.5")
    assert info.value.field == "parameters.t"
    assert info.value.line == 7
    assert "string" in str(info.value) and "line 7" in str(info.value)


def test_string_inside_gradient_names_the_item():
    with pytest.raises(RecipeError) as info:
        parse([0.1, "x"])
    assert info.value.field == "parameters.t[1]"


def test_string_inside_conditional_value_names_the_entry_value():
    with pytest.raises(RecipeError) as info:
        parse([{"value": 1}, {"filter": "mlp", "value": "half"}])
    assert info.value.field == "parameters.t[1].value"


def test_empty_list_is_rejected():
    with pytest.raises(RecipeError, match="empty list") as info:
        parse([])
    assert info.value.field == "parameters.t"


def test_missing_value_in_conditional_entry_is_rejected():
    with pytest.raises(RecipeError, match="no `value`") as info:
        parse([{"filter": "mlp"}])
    assert info.value.field == "parameters.t[0]"


def test_non_string_filter_is_rejected():
    with pytest.raises(RecipeError, match="filter") as info:
        parse([{"filter": 3, "value": 1}])
    assert info.value.field == "parameters.t[0].filter"


def test_mixed_numbers_and_entries_are_rejected():
    with pytest.raises(RecipeError, match="mixes"):
        parse([0.5, {"value": 1}])


def test_null_and_nested_lists_and_non_finite_values_are_rejected():
    for raw in (None, [[0, 1]], float("nan"), float("inf")):
        with pytest.raises(RecipeError):
            parse(raw)


# --- gradients ------------------------------------------------------------------------------


def test_spec_worked_example_forty_layers_layer_ten():
    values = [0, 0.5, 0.3, 0.7, 1]
    t = layer_position(10, 40)
    # Independent exact computation: p = 4*10/39 = 40/39, so i0 = 1, f = 1/39.
    p = Fraction(4 * 10, 39)
    f = p - 1
    expected = (1 - f) * Fraction(1, 2) + f * Fraction(3, 10)
    assert expected == Fraction(193, 390)
    assert evaluate_setting(tuple(float(v) for v in values), "any", t) == pytest.approx(float(expected), abs=1e-15)
    assert abs(float(expected) - 0.495) < 0.001


def test_gradient_endpoints_are_first_and_last_values():
    gradient = (0.2, 0.9, 0.4)
    assert evaluate_setting(gradient, "x", 0.0) == 0.2
    assert evaluate_setting(gradient, "x", 1.0) == 0.4


def test_gradient_hits_knots_exactly_and_interpolates_between():
    gradient = (0.0, 1.0, 3.0)
    assert evaluate_setting(gradient, "x", 0.5) == 1.0
    assert evaluate_setting(gradient, "x", 0.75) == 2.0
    assert evaluate_setting(gradient, "x", 0.25) == 0.5


def test_one_element_gradient_is_constant():
    for t in (0.0, 0.3, 1.0):
        assert evaluate_setting((0.7,), "x", t) == 0.7


def test_scalar_evaluates_to_itself():
    assert evaluate_setting(0.3, "x", 0.9) == 0.3


def test_layer_position_spreads_layers_over_zero_to_one():
    assert [layer_position(k, 5) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_one_layer_slice_sits_at_t_one():
    assert layer_position(0, 1) == 1.0
    assert evaluate_setting((0.0, 1.0), "x", layer_position(0, 1)) == 1.0


def test_layer_position_rejects_layers_outside_the_slice():
    with pytest.raises(ValueError):
        layer_position(5, 5)


def test_gradient_rejects_t_outside_unit_interval():
    with pytest.raises(ValueError):
        evaluate_setting((0.0, 1.0), "x", 1.5)


# --- filters ----------------------------------------------------------------------------------


def test_filter_is_a_plain_substring_so_layers_3_matches_layers_30():
    # docs/recipes.md says `layers.3.` "also matches `layers.30.`"; under the substring rule it is
    # the undotted `layers.3` that does. The dotted form is how a user pins one layer.
    undotted = (ConditionalEntry("layers.3", 1.0),)
    assert evaluate_setting(undotted, "model.layers.3.mlp.up_proj.weight", 0.0) == 1.0
    assert evaluate_setting(undotted, "model.layers.30.mlp.up_proj.weight", 0.0) == 1.0
    assert evaluate_setting(undotted, "model.layers.4.mlp.up_proj.weight", 0.0) is None
    dotted = (ConditionalEntry("layers.3.", 1.0),)
    assert evaluate_setting(dotted, "model.layers.3.mlp.up_proj.weight", 0.0) == 1.0
    assert evaluate_setting(dotted, "model.layers.30.mlp.up_proj.weight", 0.0) is None
    assert evaluate_setting(dotted, "model.layers.13.mlp.up_proj.weight", 0.0) is None


def test_filter_is_not_a_glob_or_regex():
    setting = (ConditionalEntry("layers.*.mlp", 1.0), ConditionalEntry("l.yers", 2.0))
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.0) is None


def test_star_and_absent_filter_match_everything():
    assert evaluate_setting((ConditionalEntry("*", 0.4),), "lm_head.weight", 0.0) == 0.4
    assert evaluate_setting((ConditionalEntry(None, 0.6),), "lm_head.weight", 0.0) == 0.6


def test_first_matching_entry_wins():
    setting = parse([{"filter": "self_attn", "value": 0.1}, {"filter": "q_proj", "value": 0.2}, {"value": 0.3}])
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.3


def test_conditional_value_may_be_a_gradient():
    setting = parse([{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}])
    assert evaluate_setting(setting, "model.layers.0.mlp.down_proj.weight", 0.25) == 0.25
    assert evaluate_setting(setting, "model.layers.0.self_attn.o_proj.weight", 0.25) == 0.5


def test_no_matching_filter_yields_unset():
    assert evaluate_setting((ConditionalEntry("mlp", 1.0),), "model.norm.weight", 0.0) is None


# --- precedence -------------------------------------------------------------------------------


def test_first_level_with_a_value_wins():
    source, slice_, module, recipe = {"weight": 0.1}, {"weight": 0.2}, {"weight": 0.3}, {"weight": 0.4}
    assert resolve_parameter("weight", [source, slice_, module, recipe], "x", 0.0) == 0.1
    assert resolve_parameter("weight", [{}, slice_, module, recipe], "x", 0.0) == 0.2
    assert resolve_parameter("weight", [None, {}, module, recipe], "x", 0.0) == 0.3
    assert resolve_parameter("weight", [None, None, None, recipe], "x", 0.0) == 0.4


def test_unmatched_filters_fall_through_to_the_next_level():
    source = {"weight": (ConditionalEntry("self_attn", 0.9),)}
    recipe = {"weight": 0.5}
    assert resolve_parameter("weight", [source, recipe], "model.layers.1.self_attn.k_proj.weight", 0.0) == 0.9
    assert resolve_parameter("weight", [source, recipe], "model.layers.1.mlp.gate_proj.weight", 0.0) == 0.5


def test_unset_everywhere_is_none():
    assert resolve_parameter("density", [None, {"weight": 1.0}, {}], "x", 0.0) is None


def test_boolean_parameters_come_back_as_floats():
    assert resolve_parameter("normalize", [{"normalize": parse(False)}], "x", 0.0) == 0.0
    assert resolve_parameter("int8_mask", [{"int8_mask": parse(True)}], "x", 0.0) == 1.0
