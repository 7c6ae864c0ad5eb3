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

import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from mkmerge.methods import parameter_names
from mkmerge.parameters import CONDITIONAL_KEYS, SettingProblem
from mkmerge.recipe_schema import (
    TOKEN_SOURCE_KEYS,
    FieldProblem,
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
from mkmerge.yaml_lines import LineTable, Path, YamlDocument, format_path, load_document
from mksuite.common.errors import RecipeError, did_you_mean

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

_MAX_LISTED_PROBLEMS = 5


def parse_recipe(
    text: str,
    *,
    known_methods: Collection[str],
    source_name: str | None = None,
    known_parameters: Collection[str] | None = None,
) -> MergeRecipe:
    """Parse and validate one recipe; RecipeError (field, line, file) on any problem.

    ``known_parameters``: parameter names that are not warned about as unknown; defaults to
    every name a registered method reads (pass the chosen method's names for sharper warnings).
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
    data = document.data
    if data is None:
        raise RecipeError(
            "the recipe is empty", file=source_name, hint="a recipe needs at least `merge_method` and `models`"
        )
    if not isinstance(data, dict):
        raise RecipeError(
            f"a recipe must be a YAML mapping of `key: value` lines, not a {type(data).__name__}",
            line=document.start_line,
            file=source_name,
        )
    names = parameter_names() if known_parameters is None else frozenset(known_parameters)
    unknown = _unknown_keys(data, MergeRecipe, (), names)
    found = [_unknown_key_warning(key, document.lines) for key in unknown]
    found += [
        RecipeWarning(
            f"`{format_path(dup.path)}` is given twice (lines {dup.first_line} and {dup.second_line}); "
            "the later value is used",
            field=format_path(dup.path),
            line=dup.second_line,
        )
        for dup in document.duplicates
    ]
    for warning in found:
        warnings.warn(warning, stacklevel=3)
    try:
        recipe = MergeRecipe.model_validate(data, context={"known_methods": frozenset(known_methods)})
    except ValidationError as exc:
        raise _recipe_error(exc, document.lines, source_name, unknown) from None
    recipe._text = text
    recipe._source_name = source_name
    recipe._lines = document.lines
    recipe._warnings = tuple(found)
    return recipe


# --- unknown keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class _UnknownKey:
    path: Path
    known: tuple[str, ...]

    @property
    def hint(self) -> str | None:
        return did_you_mean(str(self.path[-1]), self.known)


def _unknown_keys(data: Any, model: type[BaseModel], path: Path, parameter_names: frozenset[str]) -> list[_UnknownKey]:
    """Keys the schema ignores, found by walking the raw data alongside the model classes."""
    if not isinstance(data, Mapping):
        return []  # wrong shapes are validation errors, reported separately
    found: list[_UnknownKey] = []
    known = tuple(model.model_fields)
    for key, value in data.items():
        child = path + (key,)
        if key not in model.model_fields:
            found.append(_UnknownKey(child, known))
        elif key == "parameters":
            found += _unknown_parameter_keys(value, child, parameter_names)
        elif model is TokenEmbedding and key == "source":
            found += _unknown_token_source_keys(value, child)
        else:
            found += _unknown_nested(value, model.model_fields[key].annotation, child, parameter_names)
    return found


def _unknown_nested(value: Any, annotation: Any, path: Path, parameter_names: frozenset[str]) -> list[_UnknownKey]:
    """Descend into a field whose annotation holds schema models (directly, in tuples or dicts)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _unknown_keys(value, annotation, path, parameter_names)
    if origin is tuple and isinstance(value, list):
        return [
            key
            for index, item in enumerate(value)
            for key in _unknown_nested(item, args[0], path + (index,), parameter_names)
        ]
    if origin is dict and isinstance(value, Mapping):
        return [
            key
            for name, item in value.items()
            for key in _unknown_nested(item, args[1], path + (name,), parameter_names)
        ]
    if args and origin not in (tuple, dict):  # Optional[...] and other unions
        return [key for arg in args for key in _unknown_nested(value, arg, path, parameter_names)]
    return []


def _unknown_parameter_keys(value: Any, path: Path, parameter_names: frozenset[str]) -> list[_UnknownKey]:
    if not isinstance(value, Mapping):
        return []
    found = []
    for name, setting in value.items():
        if name not in parameter_names:
            found.append(_UnknownKey(path + (name,), tuple(sorted(parameter_names))))
        entries = [(path + (name,), setting)] if isinstance(setting, Mapping) else []
        if isinstance(setting, list):
            entries = [(path + (name, index), item) for index, item in enumerate(setting) if isinstance(item, Mapping)]
        for entry_path, entry in entries:
            found += [
                _UnknownKey(entry_path + (key,), CONDITIONAL_KEYS) for key in entry if key not in CONDITIONAL_KEYS
            ]
    return found


def _unknown_token_source_keys(value: Any, path: Path) -> list[_UnknownKey]:
    if not (isinstance(value, Mapping) and value.get("kind") in TOKEN_SOURCE_KEYS):
        return []  # model references check their own keys
    known = TOKEN_SOURCE_KEYS[value["kind"]]
    return [_UnknownKey(path + (key,), known) for key in value if key not in known]


def _unknown_key_warning(unknown: _UnknownKey, lines: LineTable) -> RecipeWarning:
    key, parent = unknown.path[-1], unknown.path[:-1]
    where = f" in `{format_path(parent)}`" if parent else ""
    hint = unknown.hint
    message = f"unknown key `{key}`{where} is ignored" + (f"; {hint}" if hint else "")
    return RecipeWarning(message, field=format_path(unknown.path), line=lines.exact(unknown.path), hint=hint)


# --- validation errors --------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    path: Path
    line: int | None
    reason: str
    hint: str | None


def _recipe_error(
    exc: ValidationError, lines: LineTable, source_name: str | None, unknown: list[_UnknownKey]
) -> RecipeError:
    problems = sorted(
        (_problem(error, lines) for error in exc.errors() if not _spurious(error)),
        key=lambda problem: (problem.line is None, problem.line or 0),
    )
    first = problems[0]
    message = first.reason
    if len(problems) > 1:
        others = [f"`{format_path(p.path) or '(top level)'}` (line {p.line}): {p.reason}" for p in problems[1:]]
        shown = others[:_MAX_LISTED_PROBLEMS]
        more = f"; and {len(others) - len(shown)} more" if len(others) > len(shown) else ""
        message += f". Also: {'; '.join(shown)}{more}"
    hints = [first.hint] if first.hint else []
    hints += _misspelling_hints(first.path, unknown, lines)
    return RecipeError(
        message,
        field=format_path(first.path) or None,
        line=first.line,
        file=source_name,
        hint="; ".join(hints) or None,
    )


def _spurious(error: Mapping[str, Any]) -> bool:
    """pydantic adds `too_short` to a non-empty list whose items all failed; those are reported already."""
    if error["type"] != "too_short":
        return False
    minimum = (error.get("ctx") or {}).get("min_length", 1)
    return isinstance(error["input"], list | dict) and len(error["input"]) >= minimum


def _problem(error: Mapping[str, Any], lines: LineTable) -> _Problem:
    loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        candidates = [loc + alt for alt in cause.alternatives] or [loc + cause.subpath]
        path = max(candidates, key=lambda p: lines.nearest(p) or 0)
        return _Problem(path, lines.nearest(path), cause.reason, cause.hint)
    if isinstance(cause, SettingProblem):
        path = loc + cause.subpath
        return _Problem(path, lines.nearest(path), cause.reason, cause.hint)
    if loc and loc[-1] == "[key]":
        # pydantic reports the key as an int position; use the key itself.
        path = loc[:-2] + (error["input"],)
        return _Problem(
            path,
            lines.nearest(path),
            f"key {error['input']!r} must be a string",
            "quote it: YAML reads unquoted numbers, yes/no, on/off and null as other types",
        )
    hint = None
    if error["type"] in ("model_type", "model_attributes_type") and isinstance(error["input"], str):
        hint = f"list entries are mappings: write `- model: {error['input']}`"
    return _Problem(loc, lines.nearest(loc), _reason(error), hint)


_REASONS = {
    "missing": "is required but missing",
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "bool_type": "must be true or false",
    "tuple_type": "must be a list (`- item` lines or `[a, b]`)",
    "list_type": "must be a list (`- item` lines or `[a, b]`)",
    "dict_type": "must be a mapping (`key: value` lines)",
    "model_type": "must be a mapping (`key: value` lines)",
    "model_attributes_type": "must be a mapping (`key: value` lines)",
    "too_short": "must not be empty",
}


def _reason(error: Mapping[str, Any]) -> str:
    reason = _REASONS.get(error["type"])
    if reason is None:
        return error["msg"]
    value = error["input"]
    if error["type"] != "missing" and not isinstance(value, list | dict):
        reason += f", got {value!r}"
    return reason


def _misspelling_hints(path: Path, unknown: list[_UnknownKey], lines: LineTable) -> list[str]:
    """Unknown keys next to the failing field, e.g. `modle` when `model` is missing."""
    near = (path, path[:-1])
    return [
        f"`{key.path[-1]}` (line {lines.exact(key.path)}) is not a known key; {key.hint}"
        for key in unknown
        if key.path[:-1] in near and key.hint
    ]
