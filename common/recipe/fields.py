"""Field problems, unknown-key warnings and validation errors shared by every recipe schema.

A schema (pydantic models) raises :class:`FieldProblem` or :class:`SettingProblem` from its
validators; :func:`validation_error` turns pydantic's errors into one :class:`RecipeError`
naming the field in recipe notation (``slices[0].sources[1].layer_range``), its line and the
file. Keys a schema does not know are not errors (mergekit ignores them): :func:`unknown_keys`
finds them by walking the raw data alongside the models, and each becomes a
:class:`RecipeWarning` with the nearest key valid at that place.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from mksuite.common.errors import RecipeError
from mksuite.common.recipe.parameters import SettingProblem
from mksuite.common.recipe.suggest import suggestion
from mksuite.common.recipe.yaml_lines import LineTable, Path, YamlDocument, format_path

_MAX_LISTED_PROBLEMS = 5


class RecipeWarning(UserWarning):
    """Something in the recipe is suspicious but not fatal (an unknown key, a duplicate key).

    Carries the recipe ``field`` path, its ``line``, and for unknown keys the ``hint``
    naming the nearest known key ("did you mean `parameters`?") when there is one.
    """

    def __init__(self, message: str, *, field: str, line: int | None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.line = line
        self.hint = hint


class FieldProblem(ValueError):
    """A validation failure at ``subpath`` below the value being validated.

    With several ``alternatives`` (sub-paths of keys that conflict), the error is reported
    at whichever of them comes last in the file.
    """

    def __init__(
        self,
        reason: str,
        *,
        subpath: tuple[Hashable, ...] = (),
        alternatives: tuple[tuple[Hashable, ...], ...] = (),
        hint: str | None = None,
    ):
        super().__init__(reason)
        self.reason = reason
        self.subpath = subpath
        self.alternatives = alternatives
        self.hint = hint


def document_mapping(
    document: YamlDocument, *, what: str, source_name: str | None, hint: str, kind: str | None = None
) -> dict:
    """The document's top-level mapping; RecipeError when it is empty or not a mapping.

    ``what`` names the file in "the recipe is empty", ``kind`` (default ``what``) in "a
    mergekit-moe config must be a YAML mapping"; ``hint`` says what an empty file needs.
    """
    data = document.data
    if data is None:
        raise RecipeError(f"the {what} is empty", file=source_name, hint=hint)
    if not isinstance(data, dict):
        raise RecipeError(
            f"a {kind or what} must be a YAML mapping of `key: value` lines, not a {type(data).__name__}",
            line=document.start_line,
            file=source_name,
        )
    return data


# --- unknown keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class UnknownKey:
    """A key no schema field reads, with the keys valid at its place (best candidates first)."""

    path: Path
    known: tuple[str, ...]

    @property
    def name(self) -> str:
        return str(self.path[-1])

    @property
    def hint(self) -> str | None:
        return suggestion(self.name, self.known)


UnknownKeyRule = Callable[[type[BaseModel], str, Any, Path], "list[UnknownKey] | None"]
"""A schema's own rule for one field (e.g. free-form ``parameters``); None: walk it as usual."""


def unknown_keys(
    data: Any, model: type[BaseModel], path: Path = (), rule: UnknownKeyRule | None = None
) -> list[UnknownKey]:
    """Keys ``model`` ignores, found by walking the raw data alongside the model classes."""
    if not isinstance(data, Mapping):
        return []  # wrong shapes are validation errors, reported separately
    found: list[UnknownKey] = []
    known = tuple(model.model_fields)
    for key, value in data.items():
        child = path + (key,)
        if key not in model.model_fields:
            found.append(UnknownKey(child, known))
            continue
        special = rule(model, key, value, child) if rule is not None else None
        if special is not None:
            found += special
        else:
            found += _unknown_nested(value, model.model_fields[key].annotation, child, rule)
    return found


def _unknown_nested(value: Any, annotation: Any, path: Path, rule: UnknownKeyRule | None) -> list[UnknownKey]:
    """Descend into a field whose annotation holds schema models (directly, in tuples or dicts)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_keys(value, annotation, path, rule)
    if origin is tuple and isinstance(value, list):
        return [
            key for index, item in enumerate(value) for key in _unknown_nested(item, args[0], path + (index,), rule)
        ]
    if origin is dict and isinstance(value, Mapping):
        return [key for name, item in value.items() for key in _unknown_nested(item, args[1], path + (name,), rule)]
    if args and origin not in (tuple, dict):  # Optional[...], Annotated[...] and other unions
        return [key for arg in args for key in _unknown_nested(value, arg, path, rule)]
    return []


def unknown_key_warning(unknown: UnknownKey, lines: LineTable) -> RecipeWarning:
    key, parent = unknown.path[-1], unknown.path[:-1]
    where = f" in `{format_path(parent)}`" if parent else ""
    hint = unknown.hint
    message = f"unknown key `{key}`{where} is ignored" + (f"; {hint}" if hint else "")
    return RecipeWarning(message, field=format_path(unknown.path), line=lines.exact(unknown.path), hint=hint)


def duplicate_key_warnings(document: YamlDocument) -> list[RecipeWarning]:
    return [
        RecipeWarning(
            f"`{format_path(dup.path)}` is given twice (lines {dup.first_line} and {dup.second_line}); "
            "the later value is used",
            field=format_path(dup.path),
            line=dup.second_line,
        )
        for dup in document.duplicates
    ]


def emit(found: list[RecipeWarning], *, stacklevel: int) -> None:
    """Send warnings through :func:`warnings.warn` (a CLI may render ``.warnings`` itself instead)."""
    for warning in found:
        warnings.warn(warning, stacklevel=stacklevel + 1)


# --- validation errors --------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    path: Path
    line: int | None
    reason: str
    hint: str | None


def validation_error(
    exc: ValidationError, lines: LineTable, source_name: str | None, unknown: list[UnknownKey] = ()
) -> RecipeError:
    """One RecipeError for pydantic's errors: the first in file order, the others listed after it."""
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


def _misspelling_hints(path: Path, unknown: list[UnknownKey], lines: LineTable) -> list[str]:
    """Unknown keys next to the failing field, e.g. `modle` when `model` is missing."""
    near = (path, path[:-1])
    return [
        f"`{key.path[-1]}` (line {lines.exact(key.path)}) is not a known key; {key.hint}"
        for key in unknown
        if key.path[:-1] in near and key.hint
    ]
