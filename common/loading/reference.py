"""Model references: the `path@revision+lora@revision` strings and mappings of recipes (docs/recipes.md).

A reference only names a model; nothing here touches the disk or the network. Identity is
structural: two references are the same model iff path, revision, LoRA and architecture
override are equal as strings (no path normalisation), so the dataclass equality and hash
are exactly the rule the spec asks for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mksuite.common.errors import RecipeError, did_you_mean

_MAPPING_KEYS = ("model", "lora", "override_architecture")
_PATH_KEYS = ("path", "revision")


@dataclass(frozen=True)
class ModelReference:
    """One model to read: a local directory or Hub repo id, an optional revision and LoRA."""

    path: str
    revision: str | None = None
    lora: ModelReference | None = None
    override_architecture: str | None = None

    @classmethod
    def parse(cls, value: str | Mapping, *, field: str = "model") -> ModelReference:
        """Parse the string or mapping form; `field` names the recipe field in errors.

        String: `path`, `path@rev`, `path+lora`, `path@rev+lora@rev` (split on `+` first,
        then each side on `@`). Mapping: `{model: {path, revision?}, lora?: {path,
        revision?}, override_architecture?}`; `model`/`lora` may also be `path[@rev]`
        strings. In the mapping's `{path: ...}` form `@` and `+` are literal characters,
        which is the only way to name a local path containing them.
        """
        if isinstance(value, ModelReference):
            return value
        if isinstance(value, str):
            return _parse_string(value, field)
        if isinstance(value, Mapping):
            return _parse_mapping(value, field)
        raise RecipeError(
            f"a model reference must be a string or a mapping, got {type(value).__name__} ({value!r})",
            field=field,
            hint="write `org/name`, `org/name@revision`, `model+lora`, or {model: {path: ...}}",
        )

    def __str__(self) -> str:
        """Canonical string form; parses back to an equal reference.

        Not representable (so not round-tripped): `override_architecture`, and paths that
        themselves contain `@` or `+`.
        """
        text = self.path if self.revision is None else f"{self.path}@{self.revision}"
        if self.lora is not None:
            text += f"+{self.lora}"
        return text


def _parse_string(text: str, field: str) -> ModelReference:
    text = text.strip()
    if not text:
        raise RecipeError("the model reference is empty", field=field, hint="name a local directory or a Hub repo id")
    parts = text.split("+")
    if len(parts) > 2:
        raise RecipeError(
            f"model reference `{text}` has {len(parts) - 1} `+` signs; at most one is allowed (model+lora)",
            field=field,
            hint="a local path containing `+` must be written in the mapping form {model: {path: ...}}",
        )
    model = _parse_path_string(parts[0], text, field, role="model")
    lora = _parse_path_string(parts[1], text, field, role="LoRA") if len(parts) == 2 else None
    return ModelReference(model.path, model.revision, lora=lora)


def _parse_path_string(text: str, whole: str, field: str, *, role: str) -> ModelReference:
    """`path` or `path@revision`, no `+` handling (the caller already split on it)."""
    text = text.strip()
    pieces = text.split("@")
    if len(pieces) > 2:
        raise RecipeError(
            f"the {role} part `{text}` of reference `{whole}` has {len(pieces) - 1} `@` signs; "
            "at most one is allowed (path@revision)",
            field=field,
            hint="a local path containing `@` must be written in the mapping form {model: {path: ...}}",
        )
    path = pieces[0].strip()
    if not path:
        raise RecipeError(f"the {role} path is empty in reference `{whole}`", field=field)
    revision = None
    if len(pieces) == 2:
        revision = pieces[1].strip()
        if not revision:
            raise RecipeError(
                f"the {role} revision after `@` is empty in reference `{whole}`",
                field=field,
                hint="drop the `@` to use the default branch, or name a branch, tag or commit",
            )
    return ModelReference(path, revision)


def _parse_mapping(value: Mapping, field: str) -> ModelReference:
    _reject_unknown_keys(value, _MAPPING_KEYS, field)
    if "model" not in value:
        raise RecipeError(
            "a model reference mapping needs a `model` key",
            field=field,
            hint="write {model: {path: org/name, revision: main}} or just the string `org/name`",
        )
    model = _parse_path_value(value["model"], f"{field}.model", role="model")
    lora = None
    if value.get("lora") is not None:
        lora = _parse_path_value(value["lora"], f"{field}.lora", role="LoRA")
    override = value.get("override_architecture")
    if override is not None and (not isinstance(override, str) or not override.strip()):
        raise RecipeError(
            f"override_architecture must be a non-empty string such as `LlamaForCausalLM`, got {override!r}",
            field=f"{field}.override_architecture",
        )
    return ModelReference(
        model.path, model.revision, lora=lora, override_architecture=override.strip() if override else None
    )


def _parse_path_value(value: object, field: str, *, role: str) -> ModelReference:
    """The `{path, revision?}` mapping, or a `path[@revision]` string."""
    if isinstance(value, str):
        return _parse_path_string(value, value, field, role=role)
    if not isinstance(value, Mapping):
        raise RecipeError(
            f"expected {{path: ..., revision: ...}} or a string, got {type(value).__name__} ({value!r})",
            field=field,
        )
    _reject_unknown_keys(value, _PATH_KEYS, field)
    path = value.get("path")
    if not isinstance(path, str) or not path.strip():
        raise RecipeError(f"`path` must be a non-empty string, got {path!r}", field=f"{field}.path")
    revision = value.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise RecipeError(
            f"`revision` must be a non-empty string, got {revision!r}",
            field=f"{field}.revision",
            hint='quote revisions that YAML would read as a number, e.g. revision: "0123abc"',
        )
    return ModelReference(path.strip(), revision.strip() if revision else None)


def _reject_unknown_keys(value: Mapping, known: tuple[str, ...], field: str) -> None:
    # A typo here (e.g. `revison`) would otherwise silently load a different model.
    for key in value:
        if key not in known:
            raise RecipeError(
                f"unknown key `{key}` in model reference; expected {', '.join(known)}",
                field=field,
                hint=did_you_mean(str(key), known),
            )
