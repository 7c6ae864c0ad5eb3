"""Recipe parsing: schema, typed values, errors with field path and line, unknown-key warnings."""

from __future__ import annotations

import warnings

import pydantic
import pytest
import torch

from mkmerge.parameters import ConditionalEntry, evaluate_setting
from mkmerge.recipe import (
    LayerRange,
    ModelTokenEmbedding,
    RecipeWarning,
    ZeroEmbedding,
    parse_recipe,
)
from mksuite.common.errors import RecipeError
from mksuite.common.loading import ModelReference

METHODS = {"linear", "slerp", "ties", "dare_ties", "task_arithmetic", "passthrough", "nuslerp"}


def parse(text: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        return parse_recipe(text, known_methods=METHODS, source_name="recipe.yml", **kwargs)


def parse_error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse(text)
    return info.value


def assert_points_at(error: RecipeError, field: str, line: int) -> None:
    assert error.field == field
    assert error.line == line
    assert f"recipe.yml:{line}" in str(error)
    assert f"`{field}`" in str(error)


# --- well-formed recipes ------------------------------------------------------------------


def test_models_recipe_parses_into_typed_values():
    recipe = parse("""\
merge_method: ties
base_model: org/base@main
models:
  - model: org/a
    parameters:
      weight: 0.5
      density: [0.2, 0.8]
  - model: org/b+org/lora
parameters:
  normalize: true
dtype: bfloat16
out_dtype: torch.float16
""")
    assert recipe.merge_method == "ties"
    assert recipe.base_model == ModelReference("org/base", "main")
    assert recipe.models[0].model == ModelReference("org/a")
    assert recipe.models[0].parameters == {"weight": 0.5, "density": (0.2, 0.8)}
    assert recipe.models[1].model.lora == ModelReference("org/lora")
    assert recipe.models[1].parameters == {}
    assert recipe.parameters == {"normalize": 1.0}
    assert recipe.dtype is torch.bfloat16 and recipe.out_dtype is torch.float16
    assert recipe.slices is None and recipe.modules is None


def test_slices_recipe_parses_layer_ranges_and_slice_fields():
    recipe = parse("""\
merge_method: slerp
slices:
  - sources:
      - model: a
        layer_range: [0, 16]
      - model: b
        layer_range: [8, 24]
    base_model: a
    parameters:
      t: 0.3
    residual_weight: 0.1
""")
    (slice_,) = recipe.slices
    assert [s.layer_range for s in slice_.sources] == [LayerRange(0, 16), LayerRange(8, 24)]
    assert slice_.num_layers == 16
    start, end = slice_.sources[1].layer_range
    assert (start, end) == (8, 24) and slice_.sources[1].layer_range.num_layers == 16
    assert slice_.base_model == ModelReference("a")
    assert slice_.parameters == {"t": 0.3}


def test_layer_range_bounds_against_model_depth_are_not_checked_here():
    recipe = parse("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 1000]}]\n")
    assert recipe.slices[0].sources[0].layer_range.end == 1000


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("int64", torch.int64),
        ("torch.bfloat16", torch.bfloat16),
        ("torch.float32", torch.float32),
    ],
)
def test_dtype_names_normalise_to_torch_dtypes(name, dtype):
    recipe = parse(f"merge_method: linear\nmodels: [{{model: a}}]\ndtype: {name}\nout_dtype: {name}\n")
    assert recipe.dtype is dtype and recipe.out_dtype is dtype


def test_unknown_dtype_is_an_error_with_suggestion():
    error = parse_error("merge_method: linear\nmodels: [{model: a}]\nout_dtype: bfloat61\n")
    assert_points_at(error, "out_dtype", 3)
    assert "bfloat16" in error.hint


def test_modules_recipe_parses_each_module():
    recipe = parse("""\
merge_method: linear
modules:
  text_decoder:
    models:
      - model: a
        parameters: {weight: 1}
  vision_tower:
    slices:
      - sources: [{model: a, layer_range: [0, 4]}]
    parameters: {weight: 0.5}
""")
    assert set(recipe.modules) == {"text_decoder", "vision_tower"}
    assert recipe.modules["text_decoder"].models[0].parameters == {"weight": 1.0}
    assert recipe.modules["vision_tower"].slices[0].num_layers == 4
    assert recipe.modules["vision_tower"].parameters == {"weight": 0.5}


def test_tokenizer_block_is_typed():
    recipe = parse("""\
merge_method: linear
models: [{model: a}]
tokenizer:
  source: base
  pad_to_multiple_of: 64
  tokens:
    "<|im_start|>":
      source: org/chat
    "<|im_end|>":
      source: {kind: model_token, model: org/chat, token: "</s>"}
      force: true
    "<pad>":
      source: {kind: zero}
    "<sep>":
      source: {kind: model_token, model: a, token_id: 2}
    "<auto>":
      force: true
""")
    block = recipe.tokenizer
    assert block.source == "base" and block.pad_to_multiple_of == 64
    assert block.tokens["<|im_start|>"].source == ModelReference("org/chat")
    assert block.tokens["<|im_end|>"].source == ModelTokenEmbedding(ModelReference("org/chat"), token="</s>")
    assert block.tokens["<|im_end|>"].force is True
    assert block.tokens["<pad>"].source == ZeroEmbedding()
    assert block.tokens["<sep>"].source == ModelTokenEmbedding(ModelReference("a"), token_id=2)
    assert block.tokens["<auto>"].source is None and block.tokens["<auto>"].force is True


def test_tokenizer_source_defaults_to_union_and_accepts_keywords_and_models():
    block = parse("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {}\n").tokenizer
    assert block.source == "union" and block.tokens == {}
    for raw, expected in (("union", "union"), ("base", "base"), ("org/m@v1", ModelReference("org/m", "v1"))):
        recipe = parse(f"merge_method: linear\nmodels: [{{model: a}}]\ntokenizer_source: {raw}\n")
        assert recipe.tokenizer_source == expected


def test_model_token_source_needs_exactly_one_of_token_and_token_id():
    error = parse_error("""\
merge_method: linear
models: [{model: a}]
tokenizer:
  tokens:
    "<x>":
      source: {kind: model_token, model: a, token: b, token_id: 1}
""")
    assert_points_at(error, "tokenizer.tokens.<x>.source", 6)
    assert "exactly one of `token` and `token_id`" in str(error)


def test_pad_to_multiple_of_must_be_positive():
    error = parse_error("merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n  pad_to_multiple_of: 0\n")
    assert_points_at(error, "tokenizer.pad_to_multiple_of", 4)


def test_chat_template_accepts_builtin_names_and_jinja_text():
    assert parse("merge_method: linear\nmodels: [{model: a}]\nchat_template: chatml\n").chat_template == "chatml"
    jinja = "{% for m in messages %}{{ m.content }}{% endfor %}"
    recipe = parse(f"merge_method: linear\nmodels: [{{model: a}}]\nchat_template: '{jinja}'\n")
    assert recipe.chat_template == jinja


def test_chat_template_that_is_neither_builtin_nor_jinja_is_an_error():
    error = parse_error("merge_method: linear\nmodels: [{model: a}]\nchat_template: chatlm\n")
    assert_points_at(error, "chat_template", 3)
    assert "chatml" in error.hint


def test_bare_filter_value_mapping_is_accepted_as_one_entry():
    recipe = parse(
        "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters:\n  t: {filter: mlp, value: 0.2}\n"
    )
    assert recipe.parameters["t"] == (ConditionalEntry("mlp", 0.2),)


def test_exponent_without_dot_is_a_number_but_quoted_number_is_not():
    recipe = parse("merge_method: ties\nmodels: [{model: a}]\nparameters:\n  epsilon: 1e-5\n  lambda: -2E+1\n")
    assert recipe.parameters == {"epsilon": 1e-5, "lambda": -20.0}
    error = parse_error("merge_method: ties\nmodels: [{model: a}]\nparameters:\n  epsilon: '1e-5'\n")
    assert_points_at(error, "parameters.epsilon", 4)


def test_null_parameters_block_is_empty():
    recipe = parse("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n")
    assert recipe.models[0].parameters == {}


def test_raw_text_source_name_and_line_table_are_kept():
    text = "merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
    recipe = parse(text)
    assert recipe.text == text
    assert recipe.source_name == "recipe.yml"
    assert recipe.line_of(("slices", 0, "sources", 0, "layer_range")) == 6
    assert recipe.line_of(("slices", 0)) == 4
    # A defaulted field falls back to its enclosing entry.
    assert recipe.line_of(("slices", 0, "sources", 0, "parameters", "t")) == 5
    assert recipe.line_of(("base_model",)) == 2


def test_recipe_is_frozen():
    recipe = parse("merge_method: linear\nmodels: [{model: a}]\n")
    with pytest.raises(pydantic.ValidationError):
        recipe.merge_method = "ties"


# --- structural errors --------------------------------------------------------------------


def test_no_models_slices_or_modules_is_an_error():
    error = parse_error("merge_method: linear\nbase_model: a\n")
    assert "exactly one of `models`, `slices` or `modules`" in str(error)
    assert error.line == 1


@pytest.mark.parametrize(
    ("text", "field", "line"),
    [
        (
            "merge_method: linear\nmodels: [{model: a}]\nslices:\n  - sources: [{model: a, layer_range: [0, 1]}]\n",
            "slices",
            3,
        ),
        ("merge_method: linear\nmodules:\n  m: {models: [{model: a}]}\nmodels: [{model: a}]\n", "models", 4),
    ],
)
def test_two_of_models_slices_modules_is_an_error_at_the_later_key(text, field, line):
    error = parse_error(text)
    assert_points_at(error, field, line)
    assert "exactly one of" in str(error)


def test_module_with_both_models_and_slices_is_an_error():
    error = parse_error("""\
merge_method: linear
modules:
  text:
    models: [{model: a}]
    slices: [{sources: [{model: a, layer_range: [0, 2]}]}]
""")
    assert_points_at(error, "modules.text.slices", 5)


def test_tokenizer_source_and_tokenizer_block_together_is_an_error():
    error = parse_error(
        "merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: base\ntokenizer:\n  source: union\n"
    )
    assert_points_at(error, "tokenizer", 4)
    assert "tokenizer_source" in str(error)


def test_empty_models_list_is_an_error():
    error = parse_error("merge_method: linear\nmodels: []\n")
    assert_points_at(error, "models", 2)
    assert "must not be empty" in str(error)


def test_missing_merge_method_is_an_error():
    error = parse_error("models:\n  - model: a\n")
    assert error.field == "merge_method"
    assert "required" in str(error)


def test_unknown_merge_method_is_rejected_at_parse_time_with_suggestion():
    error = parse_error("models: [{model: a}]\nmerge_method: tie\n")
    assert_points_at(error, "merge_method", 2)
    assert error.hint == "did you mean `ties`?"


def test_uppercase_merge_method_suggests_lowercase_name():
    assert parse_error("merge_method: TIES\nmodels: [{model: a}]\n").hint == "did you mean `ties`?"


def test_missing_model_in_models_entry_points_at_the_entry():
    error = parse_error("merge_method: linear\nmodels:\n  - model: a\n  - parameters: {weight: 1}\n")
    assert_points_at(error, "models[1].model", 4)
    assert "required" in str(error)


def test_bad_model_reference_points_at_its_field():
    error = parse_error("merge_method: linear\nmodels:\n  - model: a\n  - model: x+y+z\n")
    assert_points_at(error, "models[1].model", 4)
    assert "`+`" in str(error)


def test_unknown_key_in_model_reference_mapping_points_inside_it():
    error = parse_error("""\
merge_method: linear
models:
  - model:
      model:
        path: org/a
        revison: main
""")
    assert_points_at(error, "models[0].model.model", 4)
    assert "revision" in error.hint


@pytest.mark.parametrize(
    ("layer_range", "field", "reason"),
    [
        ("16", "slices[0].sources[1].layer_range", "two layer indices"),
        ("[0, 8, 16]", "slices[0].sources[1].layer_range", "two layer indices"),
        ("[0, 8.5]", "slices[0].sources[1].layer_range[1]", "whole numbers"),
        ("[0, true]", "slices[0].sources[1].layer_range[1]", "whole numbers"),
        ("[8, 8]", "slices[0].sources[1].layer_range", "end must be greater than start"),
        ("[-1, 8]", "slices[0].sources[1].layer_range[0]", "negative"),
    ],
)
def test_bad_layer_range_names_field_and_line(layer_range, field, reason):
    error = parse_error(f"""\
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 8]
      - model: b
        layer_range: {layer_range}
""")
    assert_points_at(error, field, 7)
    assert reason in str(error)


def test_sources_of_different_depth_in_one_slice_are_an_error():
    error = parse_error("""\
merge_method: slerp
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
  - sources:
      - model: a
        layer_range: [4, 8]
      - model: b
        layer_range: [0, 2]
""")
    assert_points_at(error, "slices[1].sources[1].layer_range", 10)
    assert "same number of layers" in str(error)


def test_string_parameter_value_names_parameter_and_line():
    error = parse_error('merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: "0.5"\n')
    assert_points_at(error, "models[0].parameters.weight", 5)


def test_bad_value_inside_conditional_list_points_at_the_entry_value():
    error = parse_error("""\
merge_method: slerp
slices:
  - sources: [{model: a, layer_range: [0, 2]}]
    parameters:
      t:
        - filter: self_attn
          value: [0, 1]
        - filter: mlp
          value: [0, oops]
""")
    assert_points_at(error, "slices[0].parameters.t[1].value[1]", 9)


def test_empty_parameter_list_is_an_error():
    error = parse_error("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: []\n")
    assert_points_at(error, "parameters.weight", 4)


def test_several_problems_report_the_first_line_and_list_the_rest():
    error = parse_error("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: x}\ndtype: fp8\n")
    assert_points_at(error, "models[0].parameters.weight", 4)
    assert "`dtype` (line 5)" in str(error)


def test_malformed_yaml_reports_the_line_of_the_problem():
    error = parse_error("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n")
    assert error.line == 4 and "recipe.yml:4" in str(error)
    assert "not valid YAML" in str(error)


def test_bad_indentation_reports_its_line():
    error = parse_error("merge_method: linear\nmodels:\n  - model: a\n   parameters: {}\n")
    assert error.line == 4


def test_recipe_that_is_not_a_mapping_is_an_error():
    assert "mapping" in str(parse_error("- merge_method: linear\n"))


def test_empty_recipe_is_an_error():
    assert "empty" in str(parse_error("# nothing here\n"))


def test_two_yaml_documents_are_an_error_for_a_single_recipe():
    error = parse_error("merge_method: linear\nmodels: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: b}]\n")
    assert error.line == 4


# --- warnings -----------------------------------------------------------------------------


def test_misspelled_top_level_key_warns_with_nearest_key_and_line():
    text = "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nparamters:\n  normalize: false\n"
    with pytest.warns(RecipeWarning) as record:
        recipe = parse_recipe(text, known_methods=METHODS, source_name="recipe.yml")
    (warning,) = recipe.warnings
    assert warning.field == "paramters" and warning.line == 3
    assert "did you mean `parameters`" in str(warning)
    assert [w.message for w in record] == [warning]
    assert recipe.parameters == {}  # ignored, as mergekit does


def test_misspelled_parameter_name_of_the_chosen_method_is_an_error():
    error = parse_error("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      wieght: 1\n")
    assert_points_at(error, "models[0].parameters.wieght", 5)
    assert error.exit_code == 2 and error.hint == "did you mean `weight`?"


def test_parameter_name_far_from_every_name_only_warns():
    recipe = parse("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      colour: 3\n")
    (warning,) = recipe.warnings
    assert warning.field == "models[0].parameters.colour" and warning.line == 6


def test_known_parameters_can_be_narrowed_to_the_method():
    text = "merge_method: ties\nmodels: [{model: a}]\nparameters:\n  t: 0.5\n  lambda: 1\n"
    recipe = parse(text, known_parameters={"weight", "density", "lambda", "normalize"})
    assert [w.field for w in recipe.warnings] == ["parameters.t"]


def test_unknown_keys_are_found_at_every_depth():
    recipe = parse("""\
merge_method: slerp
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        parameter: {}
    base_modle: a
    parameters:
      t: [{filter: mlp, value: 1, fliter: x}]
tokenizer:
  sorce: base
  tokens:
    "<x>": {source: {kind: zero, extra: 1}, froce: true}
""")
    found = {(w.field, w.line, w.hint) for w in recipe.warnings}
    assert found == {
        ("slices[0].sources[0].parameter", 6, "did you mean `parameters`?"),
        ("slices[0].base_modle", 7, "did you mean `base_model`?"),
        ("slices[0].parameters.t[0].fliter", 9, "did you mean `filter`?"),
        ("tokenizer.sorce", 11, "did you mean `source`?"),
        ("tokenizer.tokens.<x>.source.extra", 13, None),
        ("tokenizer.tokens.<x>.froce", 13, "did you mean `force`?"),
    }


def test_missing_field_error_hints_at_a_misspelled_sibling():
    error = parse_error(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_rang: [0, 2]\n"
    )
    assert_points_at(error, "slices[0].sources[0].layer_range", 4)
    assert "`layer_rang` (line 5)" in error.hint and "layer_range" in error.hint


def test_misspelled_value_key_in_conditional_entry_is_hinted():
    error = parse_error(
        "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight:\n    - {filter: mlp, valeu: 1}\n"
    )
    assert_points_at(error, "parameters.weight[0]", 5)
    assert "`valeu`" in error.hint and "`value`" in error.hint


def test_duplicate_key_warns_and_later_value_wins():
    recipe = parse("merge_method: linear\nmodels: [{model: a}]\ndtype: float16\ndtype: bfloat16\n")
    assert recipe.dtype is torch.bfloat16
    (warning,) = recipe.warnings
    assert warning.field == "dtype" and warning.line == 4 and "lines 3 and 4" in str(warning)


# --- community-style recipes --------------------------------------------------------------

COMMUNITY_RECIPES = {
    "slerp_gradient_filters": """\
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "ties_per_model": """\
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: OpenPipe/mistral-ft-optimized-1227
    parameters:
      density: 0.5
      weight: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "dare_ties_bf16": """\
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
  - model: EmbeddedLLM/Mistral-7B-Merge-14-v0.2
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
tokenizer_source: union
""",
    "passthrough_scale_filters": """\
merge_method: passthrough
slices:
  - sources:
      - model: upstage/SOLAR-10.7B-v1.0
        layer_range: [0, 24]
  - sources:
      - model: upstage/SOLAR-10.7B-v1.0
        layer_range: [8, 32]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: 0.5
            - value: 1
dtype: float16
""",
    "task_arithmetic_lora_and_template": """\
base_model: meta-llama/Meta-Llama-3-8B
merge_method: task_arithmetic
models:
  - model: meta-llama/Meta-Llama-3-8B-Instruct+some/lora-adapter
    parameters:
      weight: 1.0
  - model:
      model: {path: ./local@model, revision: main}
      override_architecture: LlamaForCausalLM
    parameters:
      weight: -0.5
parameters:
  lambda: 1e-1
chat_template: llama3
out_dtype: torch.bfloat16
tokenizer:
  source: base
  tokens:
    <|eot_id|>:
      source: meta-llama/Meta-Llama-3-8B-Instruct
      force: true
""",
}


@pytest.mark.parametrize("name", sorted(COMMUNITY_RECIPES))
def test_community_recipe_parses_without_errors_or_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        recipe = parse_recipe(COMMUNITY_RECIPES[name], known_methods=METHODS, source_name=f"{name}.yml")
    assert recipe.warnings == ()


def test_community_slerp_gradients_evaluate_per_filter():
    recipe = parse(COMMUNITY_RECIPES["slerp_gradient_filters"])
    t = recipe.parameters["t"]
    assert evaluate_setting(t, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.0
    assert evaluate_setting(t, "model.layers.31.mlp.up_proj.weight", 1.0) == 0.0
    assert evaluate_setting(t, "model.norm.weight", 0.0) == 0.5


def test_community_passthrough_stacks_two_slices():
    recipe = parse(COMMUNITY_RECIPES["passthrough_scale_filters"])
    assert [s.num_layers for s in recipe.slices] == [24, 24]
    scale = recipe.slices[1].sources[0].parameters["scale"]
    assert evaluate_setting(scale, "model.layers.3.mlp.down_proj.weight", 0.0) == 0.5
    assert evaluate_setting(scale, "model.layers.3.mlp.up_proj.weight", 0.0) == 1.0


def test_community_mapping_reference_keeps_at_sign_and_override():
    recipe = parse(COMMUNITY_RECIPES["task_arithmetic_lora_and_template"])
    assert recipe.models[1].model == ModelReference("./local@model", "main", override_architecture="LlamaForCausalLM")
    assert recipe.parameters["lambda"] == pytest.approx(0.1)
