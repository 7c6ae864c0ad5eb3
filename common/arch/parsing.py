"""JSON architecture definitions (docs/architectures.md, single-module form) -> validated definitions.

Validation is strict about what the engine relies on (names, types, placeholders,
duplicates) so a broken file fails when it is read, naming the file; unknown WeightInfo
fields are ignored as the spec requires. Unknown top-level keys are refused, because a
misspelled "post_weights" would otherwise silently drop tensors from every merge.
"""

from __future__ import annotations

from typing import Any

from mksuite.common.errors import ArchitectureError, did_you_mean

from .definition import ArchitectureDefinition, WeightInfo
from .templates import COUNT, EXPERT, KNOWN_PLACEHOLDERS, LAYER, placeholders_in, variables_in

TOP_LEVEL_KEYS = (
    "model_type",
    "architectures",
    "num_layers_config_key",
    "override_num_layers",
    "pre_weights",
    "layer_templates",
    "post_weights",
    # Our extension: where the expert count of `${expert_index}` templates comes from
    # (the first key present in config.json wins).
    "num_experts_config_keys",
    "kind",
)

# Names torch and safetensors both understand; force_dtype is used for loading and writing.
FORCE_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    }
)


class _Problem(Exception):
    """A validation failure inside one definition; turned into an ArchitectureError by the caller."""


def parse_definition(data: Any, *, name: str, source: str) -> ArchitectureDefinition:
    """Validate decoded JSON and build the definition; ArchitectureError names ``source``."""
    try:
        return _parse(data, name=name, source=source)
    except _Problem as problem:
        raise ArchitectureError(
            f"architecture definition {source} is malformed: {problem}",
            hint="fix the file; docs/architectures.md describes the format.",
        ) from None


def _parse(data: Any, *, name: str, source: str) -> ArchitectureDefinition:
    if not isinstance(data, dict):
        raise _Problem(f"the top level must be an object, not {_kind(data)}")
    _check_top_level_keys(data)
    experts_keys = _names(data, "num_experts_config_keys", "")
    if "layer_templates" not in data:
        raise _Problem("`layer_templates` is missing")
    layers = data["layer_templates"]
    if not isinstance(layers, dict):
        raise _Problem(f"`layer_templates` must be an object, not {_kind(layers)}")
    unknown = sorted(set(layers) - {"weights"})
    if unknown:
        raise _Problem(f"`layer_templates` has unknown key(s) {', '.join(map(repr, unknown))}")

    pre = _weights(data.get("pre_weights", []), "pre_weights", allowed={COUNT})
    layer = _weights(
        layers.get("weights", []),
        "layer_templates.weights",
        allowed={LAYER, COUNT} | ({EXPERT} if experts_keys else set()),
    )
    post = _weights(data.get("post_weights", []), "post_weights", allowed={COUNT})
    for index, weight in enumerate(layer):
        if LAYER not in variables_in(weight.name):
            raise _Problem(
                f"`layer_templates.weights[{index}]` name {weight.name!r} has no "
                "${layer_index} placeholder, so every layer would share one tensor"
            )
    _check_unique(pre + layer + post)

    definition = ArchitectureDefinition(
        name=name,
        model_type=_required_str(data, "model_type"),
        architectures=_architectures(data),
        num_layers_config_key=_optional_str(data, "num_layers_config_key"),
        override_num_layers=_override(data),
        inferred=False,
        pre_weight_templates=tuple(pre),
        layer_weight_templates=tuple(layer),
        post_weight_templates=tuple(post),
        num_experts_config_keys=experts_keys,
        source=source,
    )
    if definition.num_layers_config_key is None and definition.override_num_layers is None:
        raise _Problem("it needs `num_layers_config_key` or `override_num_layers`")
    return definition


def _check_top_level_keys(data: dict) -> None:
    kind = data.get("kind")
    if kind == "modular" or "modules" in data:
        raise _Problem("multi-module (`kind: modular`) definitions are not supported")
    if kind is not None:
        raise _Problem(f"unknown `kind` {kind!r}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = did_you_mean(key, TOP_LEVEL_KEYS)
            raise _Problem(f"unknown key `{key}`" + (f" ({hint})" if hint else ""))


def _weights(entries: Any, where: str, *, allowed: set[str]) -> list[WeightInfo]:
    if not isinstance(entries, list):
        raise _Problem(f"`{where}` must be a list, not {_kind(entries)}")
    return [_weight(entry, f"{where}[{i}]", allowed) for i, entry in enumerate(entries)]


def _weight(entry: Any, where: str, allowed: set[str]) -> WeightInfo:
    if not isinstance(entry, dict):
        raise _Problem(f"`{where}` must be an object, not {_kind(entry)}")
    if "name" not in entry:
        raise _Problem(f"`{where}` has no `name`")
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise _Problem(f"`{where}.name` must be a non-empty string, not {entry['name']!r}")
    weight = WeightInfo(
        name=name,
        is_embed=_flag(entry, "is_embed", where),
        optional=_flag(entry, "optional", where),
        aliases=_names(entry, "aliases", where),
        tied_names=_names(entry, "tied_names", where),
        force_dtype=_force_dtype(entry, where),
    )
    for text in (weight.name, *weight.aliases, *weight.tied_names):
        _check_placeholders(text, where, allowed)
        if EXPERT in variables_in(text) and EXPERT not in variables_in(weight.name):
            raise _Problem(f"`{where}` uses ${{expert_index}} in {text!r} but not in its name")
    return weight


def _check_placeholders(text: str, where: str, allowed: set[str]) -> None:
    for placeholder in placeholders_in(text):
        known = KNOWN_PLACEHOLDERS.get(placeholder)
        if known is None:
            hint = did_you_mean(placeholder, KNOWN_PLACEHOLDERS)
            raise _Problem(
                f"`{where}` uses unknown placeholder ${{{placeholder}}} in {text!r}" + (f" ({hint})" if hint else "")
            )
        if known[0] not in allowed:
            raise _Problem(f"`{where}` may not use ${{{placeholder}}} ({text!r}) here")


def _check_unique(weights: list[WeightInfo]) -> None:
    seen: set[str] = set()
    for weight in weights:
        if weight.name in seen:
            raise _Problem(f"weight {weight.name!r} is listed twice")
        seen.add(weight.name)


def _flag(entry: dict, key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise _Problem(f"`{where}.{key}` must be true or false, not {value!r}")
    return value


def _names(entry: dict, key: str, where: str) -> tuple[str, ...]:
    value = entry.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        path = f"{where}.{key}" if where else key
        raise _Problem(f"`{path}` must be a list of non-empty strings, not {value!r}")
    return tuple(value)


def _force_dtype(entry: dict, where: str) -> str | None:
    value = entry.get("force_dtype")
    if value is not None and value not in FORCE_DTYPES:
        hint = did_you_mean(str(value), FORCE_DTYPES)
        raise _Problem(f"`{where}.force_dtype` {value!r} is not a dtype name" + (f" ({hint})" if hint else ""))
    return value


def _required_str(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _Problem(f"`{key}` must be a non-empty string, not {value!r}")
    return value


def _optional_str(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise _Problem(f"`{key}` must be a non-empty string or null, not {value!r}")
    return value


def _architectures(data: dict) -> tuple[str, ...]:
    value = data.get("architectures")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _Problem(f"`architectures` must be a non-empty list of strings, not {value!r}")
    return tuple(value)


def _override(data: dict) -> int | None:
    value = data.get("override_num_layers")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise _Problem(f"`override_num_layers` must be a non-negative integer, not {value!r}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), repr(value))
