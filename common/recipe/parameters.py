"""Parameter settings: scalars, gradients, filtered lists, and their lookup.

A setting is parsed once, at the recipe edge, into one of three immutable shapes:

* ``float``                          a scalar;
* ``tuple[float, ...]``              a gradient, interpolated over the layer position ``t``;
* ``tuple[ConditionalEntry, ...]``   filters tried in order against the tensor name.

Every value evaluates to a float. Boolean parameters (``normalize``, ``rescale``,
``int8_mask``, ``nuslerp_flatten``, ...) are read as 1.0/0.0 and the caller converts
(nonzero -> True); integer parameters (``max_iter``) likewise come back as floats.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from mksuite.common.errors import RecipeError
from mksuite.common.recipe.yaml_lines import format_path

ParameterValue: TypeAlias = float | tuple[float, ...]


@dataclass(frozen=True)
class ConditionalEntry:
    """One ``{filter, value}`` item: applies when ``filter`` is None, ``"*"`` or a substring."""

    filter: str | None
    value: ParameterValue


ParameterSetting: TypeAlias = float | tuple[float, ...] | tuple[ConditionalEntry, ...]

CONDITIONAL_KEYS = ("filter", "value")


class SettingProblem(ValueError):
    """Why a raw setting is invalid, and where inside it (``subpath``, e.g. ``(1, "value")``).

    A ValueError so that pydantic validators can raise it unchanged; the recipe parser
    then adds the field path and line.
    """

    def __init__(self, reason: str, *, subpath: tuple[Hashable, ...] = (), hint: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.subpath = subpath
        self.hint = hint


def parse_setting(raw: Any, *, field: str, line: int | None) -> ParameterSetting:
    """Validate one raw YAML parameter value; RecipeError names ``field`` and ``line`` on failure.

    A bare ``{filter, value}`` mapping is accepted as a one-element conditional list
    (mergekit validates it and then crashes at merge time).
    """
    try:
        return setting_from_raw(raw)
    except SettingProblem as problem:
        raise RecipeError(
            problem.reason,
            field=field + _suffix(problem.subpath),
            line=line,
            hint=problem.hint,
        ) from None


def setting_from_raw(raw: Any) -> ParameterSetting:
    """As :func:`parse_setting`, raising :class:`SettingProblem` (for use inside validators)."""
    if isinstance(raw, Mapping):
        return (_conditional_entry(raw, ()),)
    if isinstance(raw, list | tuple):
        if not raw:
            raise SettingProblem(
                "the value is an empty list", hint="give a number, a list of numbers, or a list of {filter, value}"
            )
        if all(isinstance(item, Mapping) for item in raw):
            return tuple(_conditional_entry(item, (index,)) for index, item in enumerate(raw))
        if any(isinstance(item, Mapping) for item in raw):
            raise SettingProblem(
                "the list mixes numbers and {filter, value} entries",
                hint="a list is either a gradient of numbers or a list of {filter, value} entries",
            )
        return _gradient(raw, ())
    return _number(raw, ())


def _conditional_entry(raw: Mapping, subpath: tuple[Hashable, ...]) -> ConditionalEntry:
    if "value" not in raw:
        raise SettingProblem(
            "the {filter, value} entry has no `value`",
            subpath=subpath,
            hint="write e.g. `- filter: self_attn` followed by `  value: 0.5`",
        )
    filter_ = raw.get("filter")
    if filter_ is not None and not isinstance(filter_, str):
        raise SettingProblem(
            f"`filter` must be a string (a substring of tensor names), not {filter_!r}",
            subpath=subpath + ("filter",),
        )
    value = raw["value"]
    if isinstance(value, list | tuple):
        if not value:
            raise SettingProblem("the value is an empty list", subpath=subpath + ("value",))
        return ConditionalEntry(filter_, _gradient(value, subpath + ("value",)))
    return ConditionalEntry(filter_, _number(value, subpath + ("value",)))


def _gradient(raw: Sequence, subpath: tuple[Hashable, ...]) -> tuple[float, ...]:
    return tuple(_number(item, subpath + (index,)) for index, item in enumerate(raw))


def _number(raw: Any, subpath: tuple[Hashable, ...]) -> float:
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float):
        value = float(raw)
        if not math.isfinite(value):
            raise SettingProblem(f"the value must be a finite number, not {raw!r}", subpath=subpath)
        return value
    if isinstance(raw, str):
        raise SettingProblem(
            f"the value is a string ({raw!r}); parameter values must be numbers or true/false",
            subpath=subpath,
            hint="remove the quotes around the number" if _spells_number(raw) else None,
        )
    if raw is None:
        raise SettingProblem("the value is missing", subpath=subpath, hint="give a number after the colon")
    if isinstance(raw, list | tuple | Mapping):
        raise SettingProblem("nested lists are not allowed here; expected a number", subpath=subpath)
    raise SettingProblem(f"the value must be a number, not {raw!r}", subpath=subpath)


def _spells_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _suffix(subpath: tuple[Hashable, ...]) -> str:
    if not subpath:
        return ""
    text = format_path(subpath)
    return text if text.startswith("[") else "." + text


def filter_matches(filter_: str | None, tensor_name: str) -> bool:
    """Plain substring match; None and ``"*"`` match everything (no globs, no regexes)."""
    return filter_ is None or filter_ == "*" or filter_ in tensor_name


def evaluate_gradient(values: Sequence[float], t: float) -> float:
    """Piecewise-linear interpolation of ``values`` spread evenly over ``t`` in [0, 1]."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"layer position t must lie in [0, 1], got {t}")
    position = t * (len(values) - 1)
    i0 = math.floor(position)
    i1 = min(len(values) - 1, i0 + 1)
    fraction = position - i0
    return (1.0 - fraction) * values[i0] + fraction * values[i1]


def evaluate_value(value: ParameterValue, t: float) -> float:
    """A scalar, or a gradient evaluated at ``t``."""
    if isinstance(value, tuple):
        return evaluate_gradient(value, t)
    return value


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> float | None:
    """The setting's value for ``tensor_name`` at layer position ``t``; None when no filter matches."""
    if isinstance(setting, tuple) and setting and isinstance(setting[0], ConditionalEntry):
        for entry in setting:
            if filter_matches(entry.filter, tensor_name):
                return evaluate_value(entry.value, t)
        return None
    return evaluate_value(setting, t)  # type: ignore[arg-type]


def layer_position(k: int, slice_layers: int) -> float:
    """``t`` for layer ``k`` of an output slice of ``slice_layers`` layers.

    ``k/(L-1)``, and 1.0 for a one-layer slice: that slice therefore takes a gradient's
    *last* value (mergekit behaviour). Pre- and post-weights use t = 0.
    """
    if slice_layers < 1 or not 0 <= k < slice_layers:
        raise ValueError(f"layer {k} is outside a slice of {slice_layers} layers")
    if slice_layers == 1:
        return 1.0
    return k / (slice_layers - 1)


def resolve_parameter(
    name: str,
    levels: Sequence[Mapping[str, ParameterSetting] | None],
    tensor_name: str,
    t: float,
) -> float | None:
    """First value that is set across ``levels`` (most specific first); None if none is.

    A level whose filters all miss counts as unset, so lookup falls through to the next.
    Typical order: source parameters, slice, module, recipe; global parameters
    must be looked up without the source level, with the output tensor name.
    """
    for level in levels:
        if level is None or name not in level:
            continue
        value = evaluate_setting(level[name], tensor_name, t)
        if value is not None:
            return value
    return None
