"""The values of a method's parameters for one output tensor, from the recipe's levels."""

from __future__ import annotations

from mkmerge.methods import REQUIRED, MergeMethod
from mkmerge.parameters import resolve_parameter
from mkmerge.plan_inputs import TensorInput
from mkmerge.slices import PlannedSlice
from mksuite.common.errors import RecipeError


def per_model_parameters(recipe, method: MergeMethod, inp: TensorInput, output_slice: PlannedSlice, t: float) -> dict:
    """The method's per-model parameters for one input, resolved at layer position ``t``."""
    levels = [inp.source.parameters, output_slice.parameters, recipe.parameters]
    values = {}
    for spec in method.parameters:
        if not spec.per_model:
            continue
        value = resolve_parameter(spec.name, levels, inp.name, t)
        if value is None:
            if spec.default is REQUIRED:
                if inp.is_base and method.uses_base:
                    continue
                role = "base model" if inp.source.model == recipe.base_model else "model"
                raise RecipeError(
                    f"merge method `{method.name}` needs parameter `{spec.name}` for {role} "
                    f"{inp.source.model} (tensor {inp.name})",
                    field=f"{inp.source.field}.parameters.{spec.name}",
                    line=inp.source.line,
                    hint=f"set `{spec.name}` for that model, or once under the recipe's `parameters:`",
                )
            value = spec.default
        values[spec.name] = spec.convert(value)
    return values


def global_parameters(recipe, method: MergeMethod, output_slice: PlannedSlice, name: str, t: float) -> dict:
    """The method's global parameters for tensor ``name``, resolved at layer position ``t``."""
    levels = [output_slice.parameters, recipe.parameters]
    values = {}
    for spec in method.parameters:
        if spec.per_model:
            continue
        value = resolve_parameter(spec.name, levels, name, t)
        if value is None:
            if spec.default is REQUIRED:
                raise RecipeError(
                    f"merge method `{method.name}` needs parameter `{spec.name}` (tensor {name})",
                    field=f"parameters.{spec.name}",
                    line=recipe.line_of(("parameters",)) or recipe.line_of(("merge_method",)),
                )
            value = spec.default
        values[spec.name] = spec.convert(value)
    return values
