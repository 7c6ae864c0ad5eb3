"""mergekit's ``modules:`` recipes: each module of a multi-module model merged by its own recipe.

Every entry under ``modules:`` is a recipe of its own (``models:`` or ``slices:``, and
``parameters:`` over the recipe's), applied to that module's tensors only; the method, base
model, dtypes and tokenizer settings are the recipe's. The module tree comes from each
model's description (common/arch/modules.py); layer ranges count the module's own layers
(a vision tower's blocks for ``vision_tower``). The output is one model of the base (else
first) model's architecture, so every one of its modules needs an entry.

A plain recipe is planned as a single part: :func:`plan_part` walks any part's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from mkmerge.parameters import layer_position
from mkmerge.plan_roles import POST, PRE, Counterparts
from mkmerge.slices import PlannedSlice, output_slices
from mksuite.common.arch import ArchitectureDefinition, WeightInfo
from mksuite.common.arch.modules import model_modules
from mksuite.common.arch.roles import TEXT_DECODER
from mksuite.common.errors import RecipeError
from mksuite.common.graph import OutputTensor
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference

_OWN_FIELDS = ("models", "slices", "parameters")
SINGLE_MODULE = "default"  # mergekit's name for the one module of a text-only model


class ModuleView:
    """One ``modules:`` entry seen as a whole recipe: its own models, slices and parameters
    (over the recipe's), everything else the recipe's; line numbers point into the entry."""

    def __init__(self, recipe, name: str, module):
        self._recipe = recipe
        self.module_name = name
        self.models = module.models
        self.slices = module.slices
        self.modules = None
        self.parameters = {**(recipe.parameters or {}), **(module.parameters or {})}

    def __getattr__(self, attribute):
        return getattr(self._recipe, attribute)

    def line_of(self, path: tuple) -> int | None:
        if path and path[0] in _OWN_FIELDS:
            return self._recipe.line_of(("modules", self.module_name, *path))
        return self._recipe.line_of(path)

    def located(self, error: RecipeError) -> RecipeError:
        """``error`` with its field named inside this entry (``modules.vision_tower.models[0]``)."""
        field = error.field
        if field and field.split(".")[0].split("[")[0] in _OWN_FIELDS:
            field = f"modules.{self.module_name}.{field}"
        return RecipeError(error.bare_message, field=field, line=error.line, file=error.file, hint=error.hint)


@dataclass
class PlanPart:
    """What the planner plans in one pass: the whole recipe, or one module of it."""

    name: str | None
    recipe: object
    models: Mapping[ModelReference, OpenedModel]
    arch: ArchitectureDefinition
    slices: list[PlannedSlice]


def module_parts(recipe, models: Mapping[ModelReference, OpenedModel], donor: OpenedModel) -> list[PlanPart]:
    """One part per ``modules:`` entry, each with its models cut down to that module."""
    donor_modules = model_modules(donor.arch, donor.config, donor.num_layers)
    keys = {name: _module_key(name, list(donor_modules)) for name in recipe.modules}
    _check_names(recipe, donor, list(donor_modules), keys)
    modules_of = {ref: model_modules(m.arch, m.config, m.num_layers) for ref, m in models.items()}
    parts = []
    for name, module in recipe.modules.items():
        view = ModuleView(recipe, name, module)
        key = keys[name]
        cut = {
            ref: dataclasses.replace(model, arch=modules_of[ref][key].arch, num_layers=modules_of[ref][key].num_layers)
            for ref, model in models.items()
            if key in modules_of[ref]
        }
        if recipe.base_model is not None and recipe.base_model not in cut:
            raise RecipeError(
                f"the base model {recipe.base_model} has no module `{name}`",
                field="base_model",
                line=recipe.line_of(("base_model",)),
                hint="make a model that has every listed module the base model",
            )
        for index, ref in _sources(module):
            if ref not in cut:
                has = ", ".join(f"`{n}`" for n in modules_of[ref])
                raise RecipeError(
                    f"{ref} has no module `{name}` (it has {has})",
                    field=f"modules.{name}.{index}",
                    line=view.line_of(_path(index)),
                    hint="list only models that have this module, e.g. the vision-language models for its vision parts",
                )
        try:
            slices = output_slices(view, cut)
        except RecipeError as error:
            raise view.located(error) from None
        parts.append(PlanPart(key, view, cut, donor_modules[key].arch, slices))
    return parts


def _module_key(name: str, modules: list[str]) -> str:
    """The module an entry's name means: mergekit calls a text-only model's one module `default`."""
    return TEXT_DECODER if name == SINGLE_MODULE and modules == [TEXT_DECODER] else name


def _check_names(recipe, donor: OpenedModel, names: list[str], keys: Mapping[str, str]) -> None:
    listed = ", ".join(f"`{n}`" for n in names)
    seen: dict[str, str] = {}
    for name, key in keys.items():
        if key not in names:
            raise RecipeError(
                f"the output model ({donor.ref}, {donor.arch.name}) has no module `{name}`; its modules are {listed}",
                field=f"modules.{name}",
                line=recipe.line_of(("modules", name)),
                hint="name the modules as listed"
                + (f" (`{SINGLE_MODULE}` also names a text-only model's one module)" if len(names) == 1 else ""),
            )
        if key in seen:
            raise RecipeError(
                f"`{seen[key]}` and `{name}` both name module `{key}`",
                field=f"modules.{name}",
                line=recipe.line_of(("modules", name)),
                hint="keep one entry per module",
            )
        seen[key] = name
    missing = [n for n in names if n not in seen]
    if missing:
        raise RecipeError(
            f"`modules:` has no entry for {', '.join(f'`{n}`' for n in missing)} of the output model "
            f"({donor.ref}); the output would lack those tensors and not load",
            field="modules",
            line=recipe.line_of(("modules",)),
            hint=f"add an entry for every module ({listed}); `models: [{{model: {donor.ref}}}]` keeps one model's",
        )


def _sources(module) -> list[tuple[str, ModelReference]]:
    """(field path inside the entry, model) for every model the entry names."""
    found = [(f"models[{i}]", entry.model) for i, entry in enumerate(module.models or ())]
    for i, output_slice in enumerate(module.slices or ()):
        if output_slice.base_model is not None:
            found.append((f"slices[{i}].base_model", output_slice.base_model))
        found += [(f"slices[{i}].sources[{j}]", s.model) for j, s in enumerate(output_slice.sources)]
    return found


def _path(index: str) -> tuple:
    parts: list = []
    for piece in index.replace("]", "").split("."):
        name, _, number = piece.partition("[")
        parts.append(name)
        if number:
            parts.append(int(number))
    return tuple(parts)


@contextlib.contextmanager
def located_in(part: PlanPart):
    """Recipe errors raised while planning a `modules:` entry name their field inside it."""
    try:
        yield
    except RecipeError as error:
        raise (part.recipe.located(error) if part.name else error) from None


def plan_part(planner, part: PlanPart, outputs: list[OutputTensor]) -> int:
    """Plan every output tensor of one part (the recipe, or one module) into ``outputs``; its depth.

    ``planner`` plans one output tensor (mkmerge.plan's tensor planner, set to this part's
    recipe and models). Fixed weights before the layers come from the first slice's sources,
    those after from the last slice's, as mergekit does.
    """
    arch, models, slices = part.arch, part.models, part.slices
    total_layers = sum(s.length for s in slices)

    def add(weight_for, output_slice: PlannedSlice, out_weight: WeightInfo, t: float) -> None:
        outputs.extend(planner.plan_tensor(output_slice, out_weight, weight_for, t))

    first, last = slices[0], slices[-1]
    roles = Counterparts(arch)  # a VLM's text-only twin is matched by role, not position
    for i, weight in enumerate(arch.pre_weights(total_layers)):
        add(lambda src, i=i, weight=weight: roles.fixed(models[src.model], PRE, i, weight), first, weight, 0.0)
    out_index = 0
    for output_slice in slices:
        for k in range(output_slice.length):
            t = layer_position(k, output_slice.length)
            for w, weight in enumerate(arch.layer_weights(out_index, total_layers)):
                add(lambda src, k=k, w=w: roles.layer(models[src.model], src.start + k, w), output_slice, weight, t)
            out_index += 1
    for i, weight in enumerate(arch.post_weights(total_layers)):
        add(lambda src, i=i, weight=weight: roles.fixed(models[src.model], POST, i, weight), last, weight, 0.0)
    return total_layers
