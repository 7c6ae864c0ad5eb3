"""`mkmerge`: merge models from a mergekit-style YAML recipe.

\b
Examples:
  mkmerge recipe.yml ./merged
  mkmerge recipe.yml ./merged --device cuda --shard-size 2G
  mkmerge stages.yml ./final --intermediate-dir ./work --no-lazy
  mkmerge recipe.yml ./merged --dry-run
  mkmerge plan recipe.yml --json
  mkmerge methods

A recipe file with several `---`-separated documents is a multi-stage recipe: named stages are
written to the intermediate directory (default: OUT.stages next to OUT) and used by later
documents by name; the unnamed document is the final merge, written to OUT. When every stage
is named, each is written to OUT/<name>.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mksuite.common.cli import (
    OutPath,
    ProgressView,
    RecipePath,
    SharedOptions,
    ToolCommand,
    cli_errors,
    command_app,
    entry,
    explain_flags,
    human_bytes,
    parse_float_dtype,
    print_err,
    shared_options,
    tool_app,
)
from mksuite.common.cli.options import RUN
from mksuite.common.errors import RecipeError

Lazy = Annotated[
    bool,
    typer.Option(
        "--lazy/--no-lazy",
        help="Multi-stage: reuse a stage's output when it is complete and up to date (default on).",
        rich_help_panel=RUN,
        show_default=False,
    ),
]
IntermediateDir = Annotated[
    Path | None,
    typer.Option(
        "--intermediate-dir",
        metavar="DIR",
        help="Multi-stage: where named stages are written (default: OUT.stages).",
        rich_help_panel=RUN,
    ),
]

MERGE_HELP = """Merge models from a recipe into OUT (what `mkmerge RECIPE OUT` runs).

\b
Examples:
  mkmerge recipe.yml ./merged
  mkmerge recipe.yml ./merged --device cuda --shard-size 2G -j 4
  mkmerge stages.yml ./final --intermediate-dir ./work --no-lazy
  mkmerge recipe.yml ./merged --dry-run --json
"""

PLAN_HELP = """Print what `mkmerge RECIPE OUT` would do: inputs, output tensors, files, peak memory.

Reads config.json files and weight headers only. Takes the options of a run that shape the
plan; a recipe error is reported exactly as the run would report it. A multi-stage recipe
needs its output directory: plan it with `mkmerge RECIPE OUT --dry-run`.

\b
Examples:
  mkmerge plan recipe.yml
  mkmerge plan recipe.yml --json --shard-size 2G
"""

METHODS_HELP = """List every merge method with its parameters and whether it needs a base model.

\b
Examples:
  mkmerge methods
"""

merge_app = tool_app("mkmerge", __doc__, default="merge")
# Each sub-command on its own, for callers (tests, scripts) that run one directly.
plan_app = command_app(PLAN_HELP)
methods_app = command_app(METHODS_HELP)


@shared_options(exclude=())
def merge(
    recipe: RecipePath,
    out: OutPath,
    lazy: Lazy = True,
    intermediate_dir: IntermediateDir = None,
    *,
    opts: SharedOptions,
) -> None:
    from mkmerge.run import run_merge
    from mkmerge.run_stages import run_stages
    from mkmerge.stages import load_stages

    with cli_errors(opts.debug, opts.verbose):
        started = time.perf_counter()
        opts.validate()
        if opts.as_json and not opts.dry_run:
            raise RecipeError("--json prints a plan, so it needs --dry-run", field="--json")
        stages = load_stages(recipe, out=out, intermediate_dir=intermediate_dir)
        options = opts.build()
        explain_flags(opts)
        merge_dtype = parse_float_dtype(opts.lora_merge_dtype, option="--lora-merge-dtype")
        common = dict(allow_crimes=opts.allow_crimes, cache_dir=opts.cache_dir, lora_merge_dtype=merge_dtype)
        if opts.dry_run:
            from mkmerge.plan_view import show_stage_plans

            show_stage_plans(stages, options, lazy=lazy, as_json=opts.as_json, **common)
            return
        output = dict(copy_tokenizer=opts.copy_tokenizer, write_card=opts.write_model_card)
        if len(stages) > 1:
            results = run_stages(
                stages,
                options,
                lazy=lazy,
                progress=lambda stage: ProgressView(f"{stage.label}: merging", opts.quiet),
                **common,
                **output,
            )
            _stages_summary(results, time.perf_counter() - started, opts.quiet)
            opts.push_output(out, tool="mkmerge")
            return
        with ProgressView("merging", opts.quiet) as view:
            plan, stats = run_merge(stages[0].recipe, out, options, listener=view, **common, **output)
        view.summary(
            f"[green]merged[/green] {len(plan.models)} models with {plan.method.name}: "
            f"{stats.tensors} tensors, {human_bytes(stats.bytes_written)}, {plan.num_layers} layers "
            f"-> {out} in {time.perf_counter() - started:.1f} s"
        )
        opts.push_output(out, tool="mkmerge")


def _stages_summary(results, elapsed: float, quiet: bool) -> None:
    if quiet:
        return
    for result in results:
        done = "reused (up to date)" if result.reused else f"merged {result.stats.tensors} tensors"
        print_err(f"{result.stage.label}: {done} -> {result.stage.out}")
    print_err(f"[green]{len(results)} stages[/green] in {elapsed:.1f} s")


def methods() -> None:
    from rich.console import Console
    from rich.table import Table

    from mkmerge.methods import METHODS, REQUIRED

    table = Table(title="merge methods")
    for column in ("method", "base model", "parameters"):
        table.add_column(column)
    for method in METHODS.values():
        params = []
        for spec in method.parameters:
            default = "required" if spec.default is REQUIRED else repr(spec.default)
            params.append(f"{spec.name} ({'per model' if spec.per_model else 'global'}, {default})")
        base = {"none": "ordinary input"}.get(method.base_model, method.base_model)
        table.add_row(method.name, base, "\n".join(params) or "-")
    Console().print(table)


# A plan writes nothing, so the output options have no say in it.
@shared_options(exclude=("overwrite", "copy_tokenizer", "write_model_card", "dry_run", "push_to_hub", "private"))
def plan(recipe: RecipePath, *, opts: SharedOptions) -> None:
    from mkmerge.plan_view import show_plan
    from mkmerge.stages import load_stages

    with cli_errors(opts.debug, opts.verbose):
        opts.validate()
        stages = load_stages(recipe, out=Path("OUT"))
        if len(stages) > 1:
            raise RecipeError(
                f"{recipe} holds {len(stages)} stages, whose inputs are found relative to the output directory",
                hint=f"plan it with `mkmerge {recipe} OUT --dry-run`",
            )
        options = opts.build(overwrite=False)
        explain_flags(opts)
        show_plan(
            stages[0].recipe, options, allow_crimes=opts.allow_crimes, cache_dir=opts.cache_dir,
            lora_merge_dtype=parse_float_dtype(opts.lora_merge_dtype, option="--lora-merge-dtype"),
            as_json=opts.as_json,
        )  # fmt: skip


def _register(app: typer.Typer, name: str | None, function, help: str, **kw) -> None:
    app.command(name, cls=ToolCommand, help=help, short_help=help.splitlines()[0], **kw)(function)


_register(merge_app, "merge", merge, MERGE_HELP, no_args_is_help=True)
_register(merge_app, "plan", plan, PLAN_HELP, no_args_is_help=True)
_register(merge_app, "methods", methods, METHODS_HELP)
_register(plan_app, None, plan, PLAN_HELP, no_args_is_help=True)
_register(methods_app, None, methods, METHODS_HELP)

main = entry(merge_app, "mkmerge")
