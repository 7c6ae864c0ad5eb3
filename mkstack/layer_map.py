"""Which source layer each output layer is copied from, as read from a passthrough recipe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mkmerge.slices import output_slices
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference
from mksuite.common.recipe import ConditionalEntry


@dataclass(frozen=True)
class LayerSource:
    """Output layer j is layer ``layer`` of ``model``."""

    model: ModelReference
    layer: int


@dataclass(frozen=True)
class PlanRow:
    """One slice of the printed plan: output layers ``[out_start, out_end)`` <- ``model`` ``[start, end)``."""

    out_start: int
    out_end: int
    model: ModelReference
    start: int
    end: int
    note: str = ""


def plan_rows(recipe, models: Mapping[ModelReference, OpenedModel]) -> list[PlanRow]:
    """The recipe's slices as rows of a layer map, in output order (``models:`` form: one row)."""
    rows, out = [], 0
    for planned in output_slices(recipe, models):
        source = planned.sources[0]  # passthrough: the engine allows exactly one source per slice
        length = source.end - source.start
        note = _scale_note(source.parameters.get("scale"))
        rows.append(PlanRow(out, out + length, source.model, source.start, source.end, note))
        out += length
    return rows


def layer_sources(recipe, models: Mapping[ModelReference, OpenedModel]) -> list[LayerSource]:
    """One entry per output layer, in order."""
    return [LayerSource(row.model, layer) for row in plan_rows(recipe, models) for layer in range(row.start, row.end)]


def _scale_note(setting) -> str:
    if setting is None:
        return ""
    if isinstance(setting, tuple) and setting and isinstance(setting[0], ConditionalEntry):
        parts = [f"{entry.filter or '*'}={_value(entry.value)}" for entry in setting]
        return "scale " + ", ".join(parts)
    return f"scale {_value(setting)}"


def _value(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}"
