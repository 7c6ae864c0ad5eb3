"""Parameter values outside the domain the method's math accepts, refused when the recipe is read.

A method declares bounds on a parameter (:class:`~mkmerge.methods.catalogue.ParameterSpec`
``minimum`` / ``maximum``: a negative ``density``, a ``gamma`` outside [0, 1]). Such a value
would be refused at merge time anyway; checking it here, from the recipe alone, reports it
before any model is looked up and without importing torch. The base model's own per-model
values are not checked: methods that merge from a base never read them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from mkmerge.methods import method_parameters
from mkmerge.recipe_schema import MergeRecipe
from mksuite.common.errors import RecipeError
from mksuite.common.recipe import ConditionalEntry, format_path
from mksuite.common.recipe.yaml_lines import LineTable, Path


def refuse_out_of_domain(recipe: MergeRecipe, lines: LineTable, source_name: str | None) -> None:
    """Raise a RecipeError (field, line) for the first parameter value outside its declared bounds."""
    specs = {spec.name: spec for spec in method_parameters(recipe.merge_method) or ()}
    bounded = {name: spec for name, spec in specs.items() if spec.minimum is not None or spec.maximum is not None}
    if not bounded:
        return
    for path, parameters, model in _parameter_blocks(recipe):
        for name, setting in parameters.items():
            spec = bounded.get(name)
            if spec is None:
                continue
            for subpath, value in _numbers(setting):
                low = spec.minimum is not None and value < spec.minimum
                high = spec.maximum is not None and value > spec.maximum
                if low or high:
                    field = path + (name, *subpath)
                    whose = f"model `{model}`: " if model is not None else ""
                    raise RecipeError(
                        whose + _message(spec, value),
                        field=format_path(field),
                        line=lines.exact(field) or lines.nearest(field),
                        file=source_name,
                        hint=f"set `{name}` {_range(spec)}",
                    )


def _message(spec, value: float) -> str:
    why = f"; {spec.domain}" if spec.domain else ""
    if spec.maximum is None and spec.minimum == 0:
        return f"{spec.name} {value:g} is negative{why}"
    if (spec.minimum, spec.maximum) == (0, 1):
        return f"{spec.name} {value:g} is not a fraction between 0 and 1{why}"
    return f"{spec.name} {value:g} is not {_range(spec).removeprefix('to ')}{why}"


def _range(spec) -> str:
    if spec.maximum is None:
        return f"to {spec.minimum:g} or more"
    if spec.minimum is None:
        return f"to {spec.maximum:g} or less"
    return f"between {spec.minimum:g} and {spec.maximum:g}"


def _parameter_blocks(recipe: MergeRecipe) -> Iterator[tuple[Path, Mapping, object]]:
    """(path, parameters, model or None) of every parameters block the merge reads, less the base model's."""
    yield ("parameters",), recipe.parameters, None
    yield from _input_blocks(recipe, (), recipe.base_model)
    for name, module in (recipe.modules or {}).items():
        yield ("modules", name, "parameters"), module.parameters, None
        yield from _input_blocks(module, ("modules", name), recipe.base_model)


def _input_blocks(owner, prefix: Path, base) -> Iterator[tuple[Path, Mapping, object]]:
    for index, entry in enumerate(owner.models or ()):
        if entry.model != base:
            yield prefix + ("models", index, "parameters"), entry.parameters, entry.model
    for index, output in enumerate(owner.slices or ()):
        yield prefix + ("slices", index, "parameters"), output.parameters, None
        slice_base = output.base_model or base
        for source_index, source in enumerate(output.sources):
            if source.model != slice_base:
                path = prefix + ("slices", index, "sources", source_index, "parameters")
                yield path, source.parameters, source.model


def _numbers(setting) -> Iterator[tuple[tuple, float]]:
    """(where inside the setting, number) for a scalar, a gradient or a filtered list."""
    if isinstance(setting, int | float):
        yield (), float(setting)
        return
    for index, item in enumerate(setting):
        if isinstance(item, ConditionalEntry):
            for subpath, value in _numbers(item.value):
                yield (index, "value", *subpath), value
        else:
            yield (index,), float(item)
