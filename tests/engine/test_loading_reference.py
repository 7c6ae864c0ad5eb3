"""Model references: string and mapping forms, canonical strings, identity (docs/recipes.md)."""

import pytest

from mksuite.common.errors import RecipeError
from mksuite.common.loading import ModelReference


@pytest.mark.parametrize(
    "text, expected",
    [
        ("org/name", ModelReference("org/name")),
        ("org/name@dev", ModelReference("org/name", "dev")),
        ("./local/model", ModelReference("./local/model")),
        ("org/base+org/adapter", ModelReference("org/base", lora=ModelReference("org/adapter"))),
        (
            "org/base@v1+org/adapter@abc123",
            ModelReference("org/base", "v1", lora=ModelReference("org/adapter", "abc123")),
        ),
        ("org/base+org/adapter@r2", ModelReference("org/base", lora=ModelReference("org/adapter", "r2"))),
        ("  org/name@main  ", ModelReference("org/name", "main")),
    ],
)
def test_string_forms_parse_into_path_revision_and_lora(text, expected):
    assert ModelReference.parse(text) == expected


def test_mapping_form_reads_model_lora_and_architecture_override():
    ref = ModelReference.parse(
        {
            "model": {"path": "org/base", "revision": "v2"},
            "lora": {"path": "org/adapter"},
            "override_architecture": "MistralForCausalLM",
        }
    )
    assert ref == ModelReference(
        "org/base", "v2", lora=ModelReference("org/adapter"), override_architecture="MistralForCausalLM"
    )


def test_mapping_form_keeps_at_and_plus_literal_in_paths():
    ref = ModelReference.parse({"model": {"path": "/data/run@3+final"}})
    assert ref == ModelReference("/data/run@3+final")


def test_mapping_form_accepts_path_strings_for_model_and_lora():
    ref = ModelReference.parse({"model": "org/base@v1", "lora": "org/adapter"})
    assert ref == ModelReference("org/base", "v1", lora=ModelReference("org/adapter"))


def test_parse_returns_an_existing_reference_unchanged():
    ref = ModelReference("org/name", "dev")
    assert ModelReference.parse(ref) is ref


@pytest.mark.parametrize(
    "text",
    ["org/name", "org/name@dev", "org/base+org/adapter", "org/base@v1+org/adapter@abc", "/abs/path"],
)
def test_str_is_canonical_and_round_trips(text):
    ref = ModelReference.parse(text)
    assert str(ref) == text
    assert ModelReference.parse(str(ref)) == ref


def test_identity_compares_every_field_as_strings():
    plain = ModelReference.parse("org/name")
    assert plain == ModelReference.parse({"model": {"path": "org/name"}})
    assert hash(plain) == hash(ModelReference("org/name"))
    assert plain != ModelReference.parse("org/name@main")  # no revision normalisation
    assert plain != ModelReference.parse("org/name+org/lora")
    assert plain != ModelReference.parse({"model": {"path": "org/name"}, "override_architecture": "X"})
    assert len({plain, ModelReference("org/name"), ModelReference("org/name", "main")}) == 2


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("a+b+c", "2 `+` signs"),
        ("a@r1@r2", "2 `@` signs"),
        ("a+b@r1@r2", "2 `@` signs"),
        ("", "empty"),
        ("   ", "empty"),
        ("@main", "path is empty"),
        ("org/name@", "revision after `@` is empty"),
        ("org/name+", "LoRA path is empty"),
        ("+org/lora", "model path is empty"),
        (42, "string or a mapping"),
        ({"lora": {"path": "x"}}, "needs a `model` key"),
        ({"model": {"path": ""}}, "non-empty string"),
        ({"model": {"path": "x", "revision": 123}}, "`revision` must be a non-empty string"),
        ({"model": ["x"]}, "expected {path"),
        ({"model": {"path": "x"}, "override_architecture": ""}, "override_architecture"),
    ],
)
def test_malformed_references_raise_recipe_errors(value, fragment):
    with pytest.raises(RecipeError) as caught:
        ModelReference.parse(value)
    assert fragment in caught.value.message


def test_errors_name_the_recipe_field_given_by_the_caller():
    with pytest.raises(RecipeError) as caught:
        ModelReference.parse("a@b@c", field="models[1].model")
    assert caught.value.field == "models[1].model"
    assert "field `models[1].model`" in caught.value.message


def test_nested_mapping_errors_name_the_nested_field():
    with pytest.raises(RecipeError) as caught:
        ModelReference.parse({"model": {"path": "x"}, "lora": {"path": 5}}, field="base_model")
    assert caught.value.field == "base_model.lora.path"


def test_misspelled_mapping_key_is_refused_with_a_suggestion():
    with pytest.raises(RecipeError) as caught:
        ModelReference.parse({"model": {"path": "x", "revison": "dev"}})
    assert "unknown key `revison`" in caught.value.message
    assert caught.value.hint == "did you mean `revision`?"
