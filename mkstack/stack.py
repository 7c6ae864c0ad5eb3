"""The stacking pipeline: mode request -> recipe; recipe -> checked plan -> run.

Both ways in (a recipe file, or a command-line mode) meet at one passthrough recipe, which
is planned, checked and executed by the engine exactly as mkmerge would; mkstack adds the
checks stacking needs and the config.json fix-ups for the new depth.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mkmerge.methods import METHODS
from mkmerge.plan import MergePlan, plan_merge
from mkmerge.recipe import MergeRecipe, parse_recipe
from mkmerge.run import load_recipe, run_merge
from mkmerge.slices import referenced_models
from mkstack.checks import check_same_shapes, check_vocabularies, open_stack_inputs
from mkstack.config_fixups import plan_config_warnings, stack_config_transform
from mkstack.layer_map import PlanRow, plan_rows
from mkstack.modes import (
    StackSlice,
    expand_slices,
    interleave_slices,
    parse_slice_arg,
    residual_write_filters,
    slices_from_args,
    upscale_slices,
)
from mkstack.recipe_text import recipe_text
from mksuite.common.build import BuildOptions
from mksuite.common.errors import RecipeError
from mksuite.common.graph import ProgressListener, RunStats
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference
from mksuite.common.writing.output_dir import OutputDirectory, output_directory

GENERATED_RECIPE = "mkstack (generated recipe)"


class StackWarning(UserWarning):
    """A per-layer config setting that the stack cannot carry over faithfully."""


# --- recipes ------------------------------------------------------------------------------


def require_passthrough(recipe: MergeRecipe) -> MergeRecipe:
    """``recipe`` itself; RecipeError for any other merge method (those belong to mkmerge)."""
    if recipe.merge_method != "passthrough":
        raise RecipeError(
            f"mkstack runs `passthrough` recipes only, and this one uses `{recipe.merge_method}`",
            field="merge_method",
            line=recipe.line_of(("merge_method",)),
            file=recipe.source_name,
            hint=f"run it with mkmerge: `mkmerge {recipe.source_name or 'RECIPE'} OUT`",
        )
    return recipe


def load_stack_recipe(path: Path) -> MergeRecipe:
    """Read and validate a recipe file for mkstack."""
    return require_passthrough(load_recipe(path))


def parse_stack_recipe(text: str) -> MergeRecipe:
    """Parse a recipe mkstack generated (the same parser mkmerge uses)."""
    return require_passthrough(parse_recipe(text, known_methods=METHODS.keys(), source_name=GENERATED_RECIPE))


# --- command-line modes -------------------------------------------------------------------


@dataclass(frozen=True)
class ModeRequest:
    """The command-line mode flags, before any model is opened.

    Model names may be ``--model NAME=REF`` aliases; :meth:`ref` resolves them.
    """

    slices: tuple[str, ...] = ()
    interleave: tuple[str, str] | None = None
    upscale: str | None = None
    expand: str | None = None
    window: int | None = None
    overlap: int | None = None
    every: int | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str | None:
        """Which mode is asked for (None: none); RecipeError if several are."""
        given = [
            name
            for name, value in (
                ("--slice", self.slices),
                ("--interleave", self.interleave),
                ("--upscale", self.upscale),
                ("--expand", self.expand),
            )  # fmt: skip
            if value
        ]
        if len(given) > 1:
            raise RecipeError(
                f"{' and '.join(given)} cannot be combined; give one mode per run",
                hint="for anything more elaborate, print a recipe with --print-recipe and edit it",
            )
        mode = given[0] if given else None
        self._check_numbers(mode)
        return mode

    def ref(self, token: str) -> str:
        return self.aliases.get(token, token)

    def model_refs(self) -> list[str]:
        """Every model the request names, resolved, in order of first mention."""
        tokens = [parse_slice_arg(text, self.aliases).model for text in self.slices]
        tokens += [self.ref(t) for t in (*(self.interleave or ()), self.upscale, self.expand) if t]
        return list(dict.fromkeys(tokens))

    def _check_numbers(self, mode: str | None) -> None:
        needs = {"--interleave": ("--window", "--overlap"), "--upscale": ("--overlap",), "--expand": ("--every",)}
        values = {"--window": self.window, "--overlap": self.overlap, "--every": self.every}
        wanted = needs.get(mode or "", ())
        for option, value in values.items():
            if value is not None and option not in wanted:
                used_by = [m for m, options in needs.items() if option in options]
                raise RecipeError(
                    f"{option} applies to {' and '.join(used_by)}, not to {mode or 'recipe mode'}",
                    field=option,
                )
        for option, value in values.items():
            if value is None and option in wanted:
                raise RecipeError(f"{mode} needs {option}", field=option, hint=_EXAMPLES[mode])


_EXAMPLES = {
    "--interleave": "e.g. --interleave A B --window 16 --overlap 8 (Goliath-120B)",
    "--upscale": "e.g. --upscale A --overlap 8 (SOLAR-10.7B: 32 layers -> 48)",
    "--expand": "e.g. --expand A --every 4 (LLaMA Pro: 32 layers -> 40)",
}


def open_request_models(
    request: ModeRequest, *, allow_crimes: bool = False, cache_dir: str | None = None
) -> dict[str, OpenedModel]:
    """The request's models opened (headers only), keyed by the reference string used in the recipe."""
    refs = {text: ModelReference.parse(text, field=request.mode or "model") for text in request.model_refs()}
    opened = open_stack_inputs(refs.values(), allow_crimes=allow_crimes, cache_dir=cache_dir)
    return {text: opened[ref] for text, ref in refs.items()}


def request_slices(request: ModeRequest, models: Mapping[str, OpenedModel]) -> list[StackSlice]:
    """The slices a mode request stands for, given its opened models."""
    mode = request.mode
    if mode == "--slice":
        args = [parse_slice_arg(text, request.aliases) for text in request.slices]
        return slices_from_args(args, {name: model.num_layers for name, model in models.items()})
    if mode == "--interleave":
        a, b = (request.ref(t) for t in request.interleave)
        if models[a].num_layers != models[b].num_layers:
            raise RecipeError(
                f"--interleave needs two models of equal depth, but {a} has {models[a].num_layers} layers "
                f"and {b} has {models[b].num_layers}",
                field="--interleave",
                hint="use --slice to lay out layers of models of different depth by hand",
            )
        return interleave_slices(a, b, depth=models[a].num_layers, window=request.window, overlap=request.overlap)
    if mode == "--upscale":
        name = request.ref(request.upscale)
        return upscale_slices(name, depth=models[name].num_layers, overlap=request.overlap)
    if mode == "--expand":
        name = request.ref(request.expand)
        filters = residual_write_filters(models[name].arch)
        return expand_slices(name, depth=models[name].num_layers, every=request.every, zero_filters=filters)
    raise RecipeError(
        "no stacking mode given", hint="give a recipe file, or one of --slice, --interleave, --upscale, --expand"
    )


def describe_request(request: ModeRequest) -> str:
    """The mode as a command line (aliases resolved), for the generated recipe's header comment."""
    mode = request.mode
    if mode == "--slice":
        args = [parse_slice_arg(text, request.aliases) for text in request.slices]
        body = " ".join(f"--slice {arg.model}:{arg.start}-{arg.end}" for arg in args)
    elif mode == "--interleave":
        a, b = (request.ref(t) for t in request.interleave)
        body = f"--interleave {a} {b} --window {request.window} --overlap {request.overlap}"
    elif mode == "--upscale":
        body = f"--upscale {request.ref(request.upscale)} --overlap {request.overlap}"
    else:
        body = f"--expand {request.ref(request.expand)} --every {request.every}"
    return f"generated by: mkstack OUT {body}"


def request_recipe_text(
    request: ModeRequest,
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
    allow_crimes: bool = False,
    cache_dir: str | None = None,
) -> str:
    """Open the request's models (headers only) and write the recipe it stands for."""
    models = open_request_models(request, allow_crimes=allow_crimes, cache_dir=cache_dir)
    slices = request_slices(request, models)
    return recipe_text(slices, dtype=dtype, out_dtype=out_dtype, comment=describe_request(request))


# --- planning and running -----------------------------------------------------------------


@dataclass
class StackPlan:
    """A checked plan: the engine's plan, its layer map, and config settings that cannot be remapped."""

    recipe: MergeRecipe
    plan: MergePlan
    rows: list[PlanRow]
    config_warnings: tuple[str, ...]


def plan_stack(
    recipe: MergeRecipe, *, allow_crimes: bool = False, seed: int = 0, cache_dir: str | None = None
) -> StackPlan:
    """Check and plan a passthrough recipe for stacking; reads configs and headers only."""
    require_passthrough(recipe)
    try:
        models = open_stack_inputs(referenced_models(recipe), allow_crimes=allow_crimes, cache_dir=cache_dir)
        check_same_shapes(models)
        plan = plan_merge(recipe, allow_crimes=allow_crimes, seed=seed, cache_dir=cache_dir)
    except RecipeError as error:
        raise error.in_file(recipe.source_name) from None
    rows = plan_rows(recipe, plan.models)
    check_vocabularies(plan.models[rows[0].model], plan.models[rows[-1].model])
    return StackPlan(recipe, plan, rows, plan_config_warnings(plan))


def stack_plan_document(checked: StackPlan, options: BuildOptions) -> dict:
    """What `mkstack ... --dry-run --json` prints: mkmerge's plan document and the layer map (inclusive ranges)."""
    from mkmerge.memory_estimate import current_rss_bytes
    from mkmerge.plan_json import report_json
    from mkmerge.plan_report import plan_report

    document = report_json(plan_report(checked.plan, options, baseline_bytes=current_rss_bytes()), tool="mkstack")
    document["layer_map"] = [
        {
            "output_layers": [row.out_start, row.out_end - 1],
            "model": str(row.model),
            "source_layers": [row.start, row.end - 1],
            "note": row.note,
        }
        for row in checked.rows
    ]
    return document


def run_stack(
    recipe: MergeRecipe,
    out: Path | OutputDirectory,
    options: BuildOptions,
    *,
    allow_crimes: bool = False,
    copy_tokenizer: bool = True,
    write_card: bool = True,
    cache_dir: str | None = None,
    listener: ProgressListener | None = None,
    checked: StackPlan | None = None,
) -> tuple[MergePlan, RunStats]:
    """Check, plan and write the stacked model into ``out`` (atomically).

    ``checked``: the result of :func:`plan_stack` for this recipe, when the caller already
    has it (its config warnings are then not repeated).
    """
    output = output_directory(out, overwrite=options.overwrite).check()
    if checked is None:
        checked = plan_stack(recipe, allow_crimes=allow_crimes, seed=options.seed, cache_dir=cache_dir)
        for note in checked.config_warnings:
            warnings.warn(StackWarning(note), stacklevel=2)
    return run_merge(
        recipe,
        output,
        options,
        plan=checked.plan,
        tool="mkstack",
        allow_crimes=allow_crimes,
        copy_tokenizer=copy_tokenizer,
        write_card=write_card,
        cache_dir=cache_dir,
        listener=listener,
        config_transform=stack_config_transform,
    )
