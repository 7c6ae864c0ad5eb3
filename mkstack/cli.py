"""`mkstack`: stack layers of models (frankenmerges, depth up-scaling, block expansion).

Two forms. With a recipe file (any mergekit `passthrough` recipe), or with a mode flag instead of a
recipe, when the only positional argument is OUT:

\b
Examples:
  mkstack RECIPE OUT
  mkstack OUT --slice A:0-16 --slice B:8-24 --slice A:16-32
  mkstack OUT --interleave A B --window 16 --overlap 8   # Goliath-style
  mkstack OUT --upscale A --overlap 8                    # SOLAR-style
  mkstack OUT --expand A --every 4                       # LLaMA Pro
  mkstack --print-recipe --upscale A --overlap 8 > solar.yml
  mkstack RECIPE OUT --dry-run

Ranges are half-open and 0-based (A:0-16 is layers 0..15). Models are local directories
or Hub ids; `--model a=/long/path/to/model` lets later flags say `a`. Every mode is
turned into a passthrough recipe first: `--print-recipe` prints it (OUT not needed) and
`mkstack RECIPE OUT` reproduces the run. The output's config.json gets the new depth and
per-layer lists (layer_types, ...) rebuilt to follow the source layers.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer

from mksuite.common.cli import (
    ProgressView,
    SharedOptions,
    ToolCommand,
    cli_errors,
    entry,
    err_console,
    explain_flags,
    human_bytes,
    shared_options,
    tool_app,
)
from mksuite.common.cli.options import OUTPUT, RUN
from mksuite.common.errors import RecipeError, did_you_mean

stack_app = tool_app("mkstack", __doc__, default="stack")

STACK_HELP = """Stack layers into OUT, from a recipe or from mode flags (what `mkstack ...` runs).

\b
Examples:
  mkstack RECIPE OUT
  mkstack OUT --upscale A --overlap 8 --model A=org/model
  mkstack --print-recipe --expand A --every 4
"""

# Options mergekit takes that stacking has no use for, and why.
UNUSED = {"lora_merge_dtype": "no effect: mkstack copies layers in their stored dtype"}

Paths = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[RECIPE] OUT",
        help="RECIPE OUT in recipe mode; only OUT with a mode flag (none with --print-recipe).",
        show_default=False,
    ),
]
SliceOpt = Annotated[
    list[str] | None,
    typer.Option("--slice", metavar="MODEL:START-END", help="Append layers [START, END) of MODEL (repeatable)."),
]
InterleaveOpt = Annotated[
    tuple[str, str] | None,
    typer.Option(
        "--interleave", metavar="A B", help="Alternate overlapping windows of A and B (needs --window, --overlap)."
    ),
]
UpscaleOpt = Annotated[
    str | None, typer.Option("--upscale", metavar="MODEL", help="MODEL[0, L-O) then MODEL[O, L) (needs --overlap).")
]
ExpandOpt = Annotated[
    str | None,
    typer.Option("--expand", metavar="MODEL", help="Insert an identity copy after every N-th layer (needs --every)."),
]
WindowOpt = Annotated[int | None, typer.Option("--window", metavar="N", help="Interleave: layers per window.")]
OverlapOpt = Annotated[
    int | None,
    typer.Option(
        "--overlap",
        metavar="N",
        help="Interleave: layers shared by neighbouring windows; upscale: layers dropped at the seam.",
    ),
]
EveryOpt = Annotated[int | None, typer.Option("--every", metavar="N", help="Expand: insert after every N-th layer.")]
ModelAlias = Annotated[
    list[str] | None,
    typer.Option("--model", metavar="NAME=REF", help="Name a model for the mode flags (repeatable)."),
]
PrintRecipe = Annotated[
    bool,
    typer.Option("--print-recipe", help="Print the recipe the run would execute, and exit.", rich_help_panel=OUTPUT),
]
DTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype", metavar="DTYPE", help="Mode flags: the dtype tensors are computed in.", rich_help_panel=RUN
    ),
]
OutDTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--out-dtype", metavar="DTYPE", help="Mode flags: the dtype tensors are written in.", rich_help_panel=RUN
    ),
]


@shared_options(exclude=("as_json", "lora_merge_cache", "unsafe_truncate_embeddings", "precise"))
def stack(
    paths: Paths = None,
    slices: SliceOpt = None,
    interleave: InterleaveOpt = None,
    upscale: UpscaleOpt = None,
    expand: ExpandOpt = None,
    window: WindowOpt = None,
    overlap: OverlapOpt = None,
    every: EveryOpt = None,
    model: ModelAlias = None,
    print_recipe: PrintRecipe = False,
    dtype: DTypeOpt = None,
    out_dtype: OutDTypeOpt = None,
    *,
    opts: SharedOptions,
) -> None:
    from mkstack.stack import (
        ModeRequest,
        StackWarning,
        load_stack_recipe,
        parse_stack_recipe,
        plan_stack,
        request_recipe_text,
        run_stack,
    )
    from mksuite.common.writing.output_dir import OutputDirectory

    with cli_errors(opts.debug, opts.verbose):
        started = time.perf_counter()
        opts.validate()
        request = ModeRequest(
            slices=tuple(slices or ()),
            interleave=interleave,
            upscale=upscale,
            expand=expand,
            window=window,
            overlap=overlap,
            every=every,
            aliases=_aliases(model or []),
        )
        mode = request.mode
        recipe_path, out = _positionals(list(paths or []), mode, print_recipe)
        output = None
        if out is not None and not print_recipe:
            output = OutputDirectory(out, overwrite=opts.overwrite).check()
        if mode is None:
            if dtype or out_dtype:
                raise RecipeError(
                    "--dtype and --out-dtype go with the mode flags; in recipe mode the recipe sets them",
                    field="--dtype" if dtype else "--out-dtype",
                    hint="write `dtype:` / `out_dtype:` in the recipe",
                )
            recipe = load_stack_recipe(Path(recipe_path))
        else:
            text = request_recipe_text(
                request,
                dtype=_dtype(dtype, "--dtype"),
                out_dtype=_dtype(out_dtype, "--out-dtype"),
                allow_crimes=opts.allow_crimes,
                cache_dir=opts.cache_dir,
            )
            recipe = parse_stack_recipe(text)
        checked = plan_stack(recipe, allow_crimes=opts.allow_crimes, seed=opts.seed, cache_dir=opts.cache_dir)
        for note in checked.config_warnings:
            warnings.warn(StackWarning(note), stacklevel=1)
        if print_recipe:
            sys.stdout.write(recipe.text)
            return
        options = opts.build()
        explain_flags(opts, UNUSED)
        if opts.dry_run:  # the layer map is the plan: every check above read headers only
            from rich.console import Console

            _show_plan(checked, Console())  # the plan is what was asked for: stdout
            return
        if not opts.quiet:
            _show_plan(checked)
        with ProgressView("stacking", opts.quiet) as view:
            plan, stats = run_stack(
                recipe,
                output,
                options,
                allow_crimes=opts.allow_crimes,
                copy_tokenizer=opts.copy_tokenizer,
                write_card=opts.write_model_card,
                cache_dir=opts.cache_dir,
                listener=view,
                checked=checked,
            )
        view.summary(
            f"[green]stacked[/green] {len(checked.rows)} slices of {len(plan.models)} model(s): "
            f"{plan.num_layers} layers, {stats.tensors} tensors, {human_bytes(stats.bytes_written)} "
            f"-> {out} in {time.perf_counter() - started:.1f} s"
        )
        opts.push_output(out, tool="mkstack")


def _positionals(paths: list[str], mode: str | None, print_recipe: bool) -> tuple[str | None, str | None]:
    """(RECIPE, OUT) from the positional arguments; which form depends on whether a mode flag is given."""
    if mode is not None:
        if len(paths) > 1:
            raise RecipeError(
                f"with {mode} the only positional argument is OUT, but {len(paths)} were given: {' '.join(paths)}",
                hint="a recipe file and a mode flag cannot be combined; use one or the other",
            )
        if not paths and not print_recipe:
            raise RecipeError("missing OUT, the output directory", hint=f"mkstack OUT {mode} ...")
        return None, (paths[0] if paths else None)
    if not paths:
        raise RecipeError(
            "nothing to stack: give a recipe file, or a mode flag",
            hint="mkstack RECIPE OUT, or mkstack OUT --slice/--interleave/--upscale/--expand ...",
        )
    if len(paths) > 2:
        raise RecipeError(f"expected RECIPE OUT, got {len(paths)} arguments: {' '.join(paths)}")
    if len(paths) == 1 and not print_recipe:
        raise RecipeError(
            f"missing OUT after the recipe {paths[0]}",
            hint="mkstack RECIPE OUT; to stack from flags instead: mkstack OUT --slice MODEL:0-16 ...",
        )
    return paths[0], (paths[1] if len(paths) == 2 else None)


def _aliases(entries: list[str]) -> dict[str, str]:
    aliases = {}
    for item in entries:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref or ":" in name:
            raise RecipeError(
                f"cannot read `--model {item}`", field="--model", hint="write NAME=REF, e.g. --model a=org/model-a"
            )
        aliases[name] = ref
    return aliases


def _dtype(name: str | None, option: str) -> str | None:
    from mksuite.common.recipe import DTYPES

    if name is None:
        return None
    if name.removeprefix("torch.") not in DTYPES:
        hint = did_you_mean(name.removeprefix("torch."), DTYPES) or f"accepted: {', '.join(DTYPES)}"
        raise RecipeError(f"unknown dtype {name!r}", field=option, hint=hint)
    return name.removeprefix("torch.")


def _show_plan(checked, console=None) -> None:
    from rich.table import Table

    table = Table(title=f"layer map: {checked.plan.num_layers} output layers", title_justify="left")
    for column in ("output layers", "model", "source layers", "note"):
        table.add_column(column)
    for row in checked.rows:
        table.add_row(f"[{row.out_start}, {row.out_end})", str(row.model), f"[{row.start}, {row.end})", row.note)
    (console or err_console()).print(table)


stack_app.command("stack", cls=ToolCommand, help=STACK_HELP, short_help=STACK_HELP.splitlines()[0])(stack)

main = entry(stack_app, "mkstack")
