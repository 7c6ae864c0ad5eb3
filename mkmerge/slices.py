"""Recipe -> output slices: the one shape every recipe is planned in (docs/recipes.md, §1.4).

``models:`` becomes a single slice spanning every model's full depth (with the base
appended when it is not listed); ``slices:`` are taken as written. Each source remembers
its recipe path and line so later errors can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mksuite.common.errors import RecipeError
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference


@dataclass(frozen=True)
class SliceSource:
    model: ModelReference
    start: int
    end: int
    parameters: Mapping = field(default_factory=dict)
    field: str = ""
    line: int | None = None
    from_layer_range: bool = True  # False when the range was implied by `models:`


@dataclass(frozen=True)
class PlannedSlice:
    sources: tuple[SliceSource, ...]
    base_model: ModelReference | None
    parameters: Mapping
    field: str
    line: int | None

    @property
    def length(self) -> int:
        first = self.sources[0]
        return first.end - first.start


def referenced_models(recipe) -> list[ModelReference]:
    """Every model the recipe names, in document order, base first (the config donor rule).

    A ``modules:`` recipe names its models module by module.
    """
    refs: list[ModelReference] = []
    if recipe.base_model is not None:
        refs.append(recipe.base_model)
    for part in recipe.modules.values() if recipe.modules else (recipe,):
        if part.models:
            refs += [entry.model for entry in part.models]
        for output_slice in part.slices or ():
            if output_slice.base_model is not None:
                refs.append(output_slice.base_model)
            refs += [source.model for source in output_slice.sources]
    return list(dict.fromkeys(refs))


def output_slices(recipe, models: Mapping[ModelReference, OpenedModel]) -> list[PlannedSlice]:
    """Normalise the recipe into output slices, checking layer ranges against model depths."""
    if recipe.modules:  # mkmerge plans these module by module (mkmerge/plan_modules.py)
        raise RecipeError(
            f"a `modules:` recipe ({', '.join(f'`{name}`' for name in recipe.modules)}) merges each module by its "
            "own entry; this tool takes one `models:` or `slices:` list for the whole model",
            field="modules",
            line=recipe.line_of(("modules",)),
            hint="run it with mkmerge, which re-slices each module (`text_decoder` layers included)",
        )
    if recipe.models:
        return [_models_slice(recipe, models)]
    if not recipe.slices:
        raise RecipeError("the recipe lists no `models:` or `slices:`", field="models", line=recipe.line_of(()))
    slices = []
    for i, raw in enumerate(recipe.slices):
        sources = []
        for j, source in enumerate(raw.sources):
            path = ("slices", i, "sources", j)
            start, end = source.layer_range
            sources.append(
                SliceSource(
                    model=source.model,
                    start=start,
                    end=end,
                    parameters=source.parameters or {},
                    field=_dotted(path),
                    line=recipe.line_of(path + ("layer_range",)) or recipe.line_of(path),
                )
            )
        slices.append(
            PlannedSlice(
                sources=tuple(sources),
                base_model=raw.base_model,
                parameters=raw.parameters or {},
                field=f"slices[{i}]",
                line=recipe.line_of(("slices", i)),
            )
        )
    for output_slice in slices:
        for source in output_slice.sources:
            _check_range(source, models[source.model])
    return slices


def _models_slice(recipe, models: Mapping[ModelReference, OpenedModel]) -> PlannedSlice:
    sources = []
    for i, entry in enumerate(recipe.models):
        layers = models[entry.model].num_layers
        sources.append(
            SliceSource(
                model=entry.model,
                start=0,
                end=layers,
                parameters=entry.parameters or {},
                field=f"models[{i}]",
                line=recipe.line_of(("models", i)),
                from_layer_range=False,
            )
        )
    listed = {entry.model for entry in recipe.models}
    if recipe.base_model is not None and recipe.base_model not in listed:
        layers = models[recipe.base_model].num_layers
        sources.append(
            SliceSource(
                model=recipe.base_model,
                start=0,
                end=layers,
                field="base_model",
                line=recipe.line_of(("base_model",)),
                from_layer_range=False,
            )
        )
    depths = {(s.model, s.end) for s in sources}
    if len({end for _, end in depths}) > 1:
        listing = ", ".join(f"{model} has {end}" for model, end in depths)
        raise RecipeError(
            f"`models:` merges need models of equal depth, but {listing} layers",
            field="models",
            line=recipe.line_of(("models",)),
            hint="use `slices:` with explicit layer_range values to merge models of different depth",
        )
    return PlannedSlice(
        sources=tuple(sources),
        base_model=recipe.base_model,
        parameters={},
        field="models",
        line=recipe.line_of(("models",)),
    )


def _check_range(source: SliceSource, model: OpenedModel) -> None:
    if source.end > model.num_layers or source.start < 0 or source.start >= source.end:
        raise RecipeError(
            f"layer_range [{source.start}, {source.end}] is out of bounds for {source.model}, "
            f"which has {model.num_layers} layers (valid ranges lie within [0, {model.num_layers}])",
            field=f"{source.field}.layer_range",
            line=source.line,
            hint="layer ranges are half-open [start, end) and 0-based",
        )


def _dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
