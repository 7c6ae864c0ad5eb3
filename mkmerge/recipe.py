"""Parse recipe YAML into a validated :class:`MergeRecipe`, with field paths and lines in errors.

``parse_recipe`` is the only edge where recipe text is trusted to nothing: YAML syntax,
shape, types, the merge method name, dtype names and layer ranges are all checked here,
before any model is looked up. Every failure becomes one :class:`RecipeError` naming the
field in recipe notation (``slices[0].sources[1].layer_range``), its line and the file.

Unknown keys do not fail the parse (mergekit ignores them); each one becomes a
:class:`RecipeWarning` naming the key, its line and the nearest known key. Warnings are both
emitted with :func:`warnings.warn` and kept on ``recipe.warnings``, so a CLI can render them
itself (and silence the standard channel) or rely on the default display.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from mkmerge.recipe_domains import refuse_out_of_domain
from mkmerge.recipe_legacy import modernize
from mkmerge.recipe_schema import (
    TOKEN_SOURCE_KEYS,
    InputModel,
    InputSlice,
    LayerRange,
    MergeRecipe,
    ModelTokenEmbedding,
    ModuleRecipe,
    OutputSlice,
    RecipeWarning,
    TokenEmbedding,
    TokenizerBlock,
    ZeroEmbedding,
)
from mksuite.common.errors import RecipeError
from mksuite.common.recipe import (
    CONDITIONAL_KEYS,
    UnknownKey,
    YamlDocument,
    document_mapping,
    duplicate_key_warnings,
    emit,
    format_path,
    is_slip_of,
    load_document,
    unknown_key_warning,
    unknown_keys,
    validation_error,
)
from mksuite.common.recipe.yaml_lines import LineTable, Path

__all__ = [
    "InputModel",
    "InputSlice",
    "LayerRange",
    "MergeRecipe",
    "ModelTokenEmbedding",
    "ModuleRecipe",
    "OutputSlice",
    "RecipeWarning",
    "TokenEmbedding",
    "TokenizerBlock",
    "ZeroEmbedding",
    "parse_recipe",
    "recipe_from_document",
]


def parse_recipe(
    text: str,
    *,
    known_methods: Collection[str],
    source_name: str | None = None,
    known_parameters: Collection[str] | None = None,
) -> MergeRecipe:
    """Parse and validate one recipe; RecipeError (field, line, file) on any problem.

    ``known_parameters``: parameter names that are not warned about as unknown; defaults to
    every name some registered method reads. Independently of it, a parameter name no method
    reads that is one slip away from a name the chosen method takes (``densty``) is an error:
    running with the default instead would silently give another model.
    """
    document = load_document(text, source_name=source_name)
    return recipe_from_document(
        document,
        text=text,
        known_methods=known_methods,
        source_name=source_name,
        known_parameters=known_parameters,
    )


def recipe_from_document(
    document: YamlDocument,
    *,
    text: str,
    known_methods: Collection[str],
    source_name: str | None = None,
    known_parameters: Collection[str] | None = None,
) -> MergeRecipe:
    """Validate one already-loaded YAML document (one stage of a multi-document file)."""
    data = document_mapping(
        document, what="recipe", source_name=source_name, hint="a recipe needs at least `merge_method` and `models`"
    )
    data, found = modernize(data, document.lines)
    taken = _method_parameters(data.get("merge_method"))
    names = _all_parameter_names() if known_parameters is None else frozenset(known_parameters)
    unknown = unknown_keys(data, MergeRecipe, rule=_schema_rule(names, taken))
    _refuse_parameter_slips(unknown, data.get("merge_method"), taken, document.lines, source_name)
    found += [unknown_key_warning(key, document.lines) for key in unknown]
    found += duplicate_key_warnings(document)
    emit(found, stacklevel=3)
    try:
        recipe = MergeRecipe.model_validate(data, context={"known_methods": frozenset(known_methods)})
    except ValidationError as exc:
        raise validation_error(exc, document.lines, source_name, unknown) from None
    refuse_out_of_domain(recipe, document.lines, source_name)
    recipe._text = text
    recipe._source_name = source_name
    recipe._lines = document.lines
    recipe._warnings = tuple(found)
    return recipe


# --- parameter names ----------------------------------------------------------------------


def _method_parameters(method: Any) -> tuple[str, ...]:
    """Names the chosen method takes, from the method registry; () for an unknown method."""
    from mkmerge.methods import method_parameters  # torch-free: the catalogue answers for built-ins

    specs = method_parameters(method) if isinstance(method, str) else None
    return tuple(spec.name for spec in specs or ())


def _all_parameter_names() -> frozenset[str]:
    from mkmerge.methods import parameter_names

    return parameter_names()


def _refuse_parameter_slips(
    unknown: list[UnknownKey], method: Any, taken: tuple[str, ...], lines: LineTable, source_name: str | None
) -> None:
    """A parameter no method reads, one slip from a name ``method`` takes: stop, do not default."""
    readers = _all_parameter_names()
    for key in unknown:
        if not _is_parameter_name(key.path) or key.name in readers:
            continue
        match = next((name for name in key.known if name in taken and is_slip_of(key.name, name)), None)
        if match is None:
            continue
        raise RecipeError(
            f"parameter `{key.name}` is not read by any merge method, but `{method}` takes `{match}`; "
            f"the merge would ignore this value and run with `{match}` unset or at its default",
            field=format_path(key.path),
            line=lines.exact(key.path),
            file=source_name,
            hint=f"did you mean `{match}`?",
        )


def _is_parameter_name(path: Path) -> bool:
    return len(path) >= 2 and path[-2] == "parameters"


def _schema_rule(names: frozenset[str], taken: tuple[str, ...]):
    """Free-form parts of the schema: parameter names and token-embedding sources."""
    # The chosen method's own names first: a hint should name what this recipe can use.
    candidates = tuple(taken) + tuple(sorted(names - set(taken)))

    def rule(model: type[BaseModel], key: str, value: Any, path: Path) -> list[UnknownKey] | None:
        if key == "parameters":
            return _unknown_parameter_keys(value, path, names, candidates)
        if model is TokenEmbedding and key == "source":
            return _unknown_token_source_keys(value, path)
        return None

    return rule


def _unknown_parameter_keys(
    value: Any, path: Path, names: frozenset[str], candidates: tuple[str, ...]
) -> list[UnknownKey]:
    if not isinstance(value, Mapping):
        return []
    found = []
    for name, setting in value.items():
        if name not in names:
            found.append(UnknownKey(path + (name,), candidates))
        entries = [(path + (name,), setting)] if isinstance(setting, Mapping) else []
        if isinstance(setting, list):
            entries = [(path + (name, index), item) for index, item in enumerate(setting) if isinstance(item, Mapping)]
        for entry_path, entry in entries:
            found += [UnknownKey(entry_path + (key,), CONDITIONAL_KEYS) for key in entry if key not in CONDITIONAL_KEYS]
    return found


def _unknown_token_source_keys(value: Any, path: Path) -> list[UnknownKey]:
    if not (isinstance(value, Mapping) and value.get("kind") in TOKEN_SOURCE_KEYS):
        return []  # model references check their own keys
    known = TOKEN_SOURCE_KEYS[value["kind"]]
    return [UnknownKey(path + (key,), known) for key in value if key not in known]
