"""`mkmerge`: merge models from a mergekit-style YAML recipe.

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

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from mksuite.common.cli import (
    AllowCrimes,
    CacheDir,
    CopyTokenizer,
    Cuda,
    Debug,
    Device,
    LoraMergeCache,
    LoraMergeDtype,
    ModelCard,
    OutPath,
    Overwrite,
    ProgressView,
    Quiet,
    Seed,
    ShardSize,
    Threads,
    build_options,
    cli_errors,
    err_console,
    human_bytes,
    parse_float_dtype,
)
from mksuite.common.errors import RecipeError

Lazy = Annotated[
    bool,
    typer.Option("--lazy/--no-lazy", help="Multi-stage: reuse a stage's output when it is complete and up to date."),
]
IntermediateDir = Annotated[
    Path | None,
    typer.Option("--intermediate-dir", help="Multi-stage: where named stages are written (default: OUT.stages)."),
]

DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Print the plan (as `mkmerge plan`) and stop: no tensor is read, OUT is not created."
    ),
]
UnsafeTruncateEmbeddings = Annotated[
    bool,
    typer.Option(
        "--unsafe-truncate-embeddings",
        help="Models of different vocabulary sizes and no tokenizer settings: cut every embedding to the "
        "smallest vocabulary instead of refusing (assumes shared token ids).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the plan as JSON (schema mkmerge-plan/1).")]

merge_app = typer.Typer(add_completion=False, rich_markup_mode="rich", help=__doc__)
methods_app = typer.Typer(add_completion=False, help="List merge methods and their parameters.")
plan_app = typer.Typer(add_completion=False, help="Show what a recipe will do, reading only headers.")


@merge_app.command(help=__doc__, no_args_is_help=True)
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format).")],
    out: OutPath,
    device: Device = "cpu",
    cuda: Cuda = False,
    threads: Threads = None,
    shard_size: ShardSize = "5G",
    seed: Seed = 0,
    allow_crimes: AllowCrimes = False,
    unsafe_truncate_embeddings: UnsafeTruncateEmbeddings = False,
    overwrite: Overwrite = False,
    copy_tokenizer: CopyTokenizer = True,
    write_model_card: ModelCard = True,
    cache_dir: CacheDir = None,
    lora_merge_dtype: LoraMergeDtype = None,
    lora_merge_cache: LoraMergeCache = None,
    lazy: Lazy = True,
    intermediate_dir: IntermediateDir = None,
    dry_run: DryRun = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    from mkmerge.run import run_merge
    from mkmerge.run_stages import run_stages
    from mkmerge.stages import load_stages

    with cli_errors(debug):
        started = time.perf_counter()
        options = build_options(
            device=device, cuda=cuda, threads=threads, shard_size=shard_size, seed=seed, overwrite=overwrite
        )
        options.unsafe_truncate_embeddings = unsafe_truncate_embeddings
        merge_dtype = parse_float_dtype(lora_merge_dtype, option="--lora-merge-dtype")
        if as_json and not dry_run:
            raise RecipeError("--json prints a plan, so it needs --dry-run", field="--json")
        stages = load_stages(recipe, out=out, intermediate_dir=intermediate_dir)
        if dry_run:
            from mkmerge.plan_view import show_stage_plans

            show_stage_plans(
                stages, options, lazy=lazy, allow_crimes=allow_crimes, cache_dir=cache_dir,
                lora_merge_dtype=merge_dtype, as_json=as_json,
            )  # fmt: skip
            return
        if len(stages) > 1:
            results = run_stages(
                stages,
                options,
                lazy=lazy,
                allow_crimes=allow_crimes,
                copy_tokenizer=copy_tokenizer,
                write_card=write_model_card,
                cache_dir=cache_dir,
                lora_merge_dtype=merge_dtype,
                progress=lambda stage: ProgressView(f"{stage.label}: {stage.recipe.merge_method}", quiet),
            )
            _stages_summary(results, time.perf_counter() - started, quiet)
            return
        parsed = stages[0].recipe
        with ProgressView(f"{parsed.merge_method}", quiet) as view:
            plan, stats = run_merge(
                parsed,
                out,
                options,
                allow_crimes=allow_crimes,
                copy_tokenizer=copy_tokenizer,
                write_card=write_model_card,
                cache_dir=cache_dir,
                lora_merge_dtype=merge_dtype,
                listener=view,
            )
        elapsed = time.perf_counter() - started
        view.summary(
            f"[green]merged[/green] {len(plan.models)} models with {plan.method.name}: "
            f"{stats.tensors} tensors, {human_bytes(stats.bytes_written)}, {plan.num_layers} layers "
            f"-> {out} in {elapsed:.1f} s"
        )


def _stages_summary(results, elapsed: float, quiet: bool) -> None:
    if quiet:
        return
    for result in results:
        done = "reused (up to date)" if result.reused else f"merged {result.stats.tensors} tensors"
        err_console.print(f"{result.stage.label}: {done} -> {result.stage.out}", highlight=False)
    err_console.print(f"[green]{len(results)} stages[/green] in {elapsed:.1f} s", highlight=False)


@methods_app.command()
def methods() -> None:
    """List every merge method with its parameters and whether it needs a base model."""
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


@plan_app.command(no_args_is_help=True)
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format).")],
    as_json: AsJson = False,
    device: Device = "cpu",
    cuda: Cuda = False,
    threads: Threads = None,
    shard_size: ShardSize = "5G",
    seed: Seed = 0,
    allow_crimes: AllowCrimes = False,
    unsafe_truncate_embeddings: UnsafeTruncateEmbeddings = False,
    cache_dir: CacheDir = None,
    lora_merge_dtype: LoraMergeDtype = None,
    debug: Debug = False,
) -> None:
    """Print what `mkmerge RECIPE OUT` would do: inputs, output tensors, files, peak memory.

    Reads config.json files and weight headers only. Takes the options of a run that shape
    the plan; a recipe error is reported exactly as the run would report it. A multi-stage
    recipe needs its output directory: plan it with `mkmerge RECIPE OUT --dry-run`.
    """
    from mkmerge.plan_view import show_plan
    from mkmerge.stages import load_stages

    with cli_errors(debug):
        options = build_options(
            device=device, cuda=cuda, threads=threads, shard_size=shard_size, seed=seed, overwrite=False
        )
        options.unsafe_truncate_embeddings = unsafe_truncate_embeddings
        merge_dtype = parse_float_dtype(lora_merge_dtype, option="--lora-merge-dtype")
        stages = load_stages(recipe, out=Path("OUT"))
        if len(stages) > 1:
            raise RecipeError(
                f"{recipe} holds {len(stages)} stages, whose inputs are found relative to the output directory",
                hint=f"plan it with `mkmerge {recipe} OUT --dry-run`",
            )
        show_plan(
            stages[0].recipe, options, allow_crimes=allow_crimes, cache_dir=cache_dir,
            lora_merge_dtype=merge_dtype, as_json=as_json,
        )  # fmt: skip


SUBCOMMANDS = {"methods": methods_app, "plan": plan_app}


def main() -> None:
    """Console entry: `mkmerge RECIPE OUT [options]`, `mkmerge plan RECIPE` or `mkmerge methods`."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        app = SUBCOMMANDS[sys.argv[1]]
        sys.argv = [f"mkmerge {sys.argv[1]}"] + sys.argv[2:]
        app(prog_name=sys.argv[0])
    else:
        merge_app(prog_name="mkmerge")
