"""`mkmoe`: assemble a Mixture of Experts from dense models (mergekit-moe config).

\b
Examples:
  mkmoe moe.yml ./moe
  mkmoe moe.yml ./moe --layout fused --shard-size 2G
  mkmoe moe.yml ./moe --seed 7 --device cuda
  mkmoe moe.yml ./moe --dry-run
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mksuite.common.cli import (
    OutPath,
    ProgressView,
    SharedOptions,
    ToolCommand,
    cli_errors,
    entry,
    explain_flags,
    human_bytes,
    print_err,
    shared_options,
    tool_app,
)
from mksuite.common.cli.options import MERGEKIT, OUTPUT

Layout = Annotated[
    str,
    typer.Option(
        "--layout",
        metavar="LAYOUT",
        help="Expert tensors: classic (one per expert, as llama.cpp, vLLM and Hub checkpoints have them) "
        "or fused (transformers 5's stacked gate_up_proj/down_proj). Default classic.",
        rich_help_panel=OUTPUT,
    ),
]
Acknowledge = Annotated[
    bool,
    typer.Option(
        "--i-understand-this-is-not-useful-without-training",
        help="Allow every expert to be the same model (the MoE then equals the dense model until trained).",
        rich_help_panel=OUTPUT,
    ),
]
LoadIn4Bit = Annotated[bool, typer.Option("--load-in-4bit", help="No effect.", rich_help_panel=MERGEKIT)]
LoadIn8Bit = Annotated[bool, typer.Option("--load-in-8bit", help="No effect.", rich_help_panel=MERGEKIT)]

BUILD_HELP = """Build the MoE a mergekit-moe config describes into OUT (what `mkmoe CONFIG OUT` runs).

\b
Examples:
  mkmoe moe.yml ./moe
  mkmoe moe.yml ./moe --layout fused --shard-size 2G
  mkmoe moe.yml ./moe --dry-run
"""

# Options mergekit-moe takes that an MoE built here has no use for, and why.
UNUSED = {
    "allow_crimes": "no effect: every expert must have the base model's architecture",
    "lora_merge_dtype": "no effect: mkmoe reads model+lora inputs in their stored dtype",
}

app = tool_app("mkmoe", __doc__, default="build")


@shared_options(exclude=("as_json", "unsafe_truncate_embeddings"))
def build(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="mergekit-moe config YAML.")],
    out: OutPath,
    layout: Layout = "classic",
    acknowledge: Acknowledge = False,
    load_in_4bit: LoadIn4Bit = False,
    load_in_8bit: LoadIn8Bit = False,
    *,
    opts: SharedOptions,
) -> None:
    from mkmoe.config import load_moe_config
    from mkmoe.layouts import LAYOUTS
    from mksuite.common.errors import RecipeError, did_you_mean

    with cli_errors(opts.debug, opts.verbose):
        started = time.perf_counter()
        opts.validate()
        if layout not in LAYOUTS:
            raise RecipeError(
                f"unknown layout {layout!r}", field="--layout", hint=did_you_mean(layout, LAYOUTS) or "classic or fused"
            )
        config = load_moe_config(config_path, allow_identical_experts=acknowledge)
        options = opts.build()
        bits = {"--load-in-4bit": load_in_4bit, "--load-in-8bit": load_in_8bit}
        explain_flags(opts, UNUSED)
        if opts.verbose and not opts.quiet:
            for flag in (flag for flag, given in bits.items() if given):
                print_err(f"note: {flag}: no effect: gates are computed from the unquantized base model")
        if opts.dry_run:
            _dry_run(config, out, options, layout=layout, cache_dir=opts.cache_dir)
            return
        from mkmoe.run import run_moe

        with ProgressView("merging experts", opts.quiet) as view:
            plan, stats = run_moe(
                config,
                out,
                options,
                layout=layout,
                copy_tokenizer=opts.copy_tokenizer,
                write_card=opts.write_model_card,
                cache_dir=opts.cache_dir,
                listener=view,
                on_stage=lambda text: view.phase(text),
            )
        view.summary(
            f"[green]built[/green] a {plan.arch.title} with {plan.num_experts} experts "
            f"(top-{config.experts_per_token}, {config.gate_mode} gates), {plan.num_layers} layers: "
            f"{stats.tensors} tensors, {human_bytes(stats.bytes_written)} -> {out} "
            f"in {time.perf_counter() - started:.1f} s"
        )
        opts.push_output(out, tool="mkmoe")


def _dry_run(config, out: Path, options, *, layout: str, cache_dir: str | None) -> None:
    """What a build would make, from configs and headers: the checks a run makes before any read."""
    from mkmoe.plan import plan_moe
    from mksuite.common.build import output_layout
    from mksuite.common.writing import OutputDirectory

    OutputDirectory(out, overwrite=options.overwrite).check()
    plan = plan_moe(config, layout=layout, cache_dir=cache_dir)
    names = {output.name for output in plan.outputs}
    shards = output_layout(plan.outputs, options.shard_size)
    total = sum(output.nbytes for output in plan.outputs)
    print(
        f"{plan.arch.title}: {plan.num_experts} experts (top-{config.experts_per_token}, "
        f"{config.gate_mode} gates), {plan.num_layers} layers, {layout} layout\n"
        f"{len(names)} tensors, {human_bytes(total)} -> {out}"
    )
    for shard in shards:
        print(f"  {shard.filename}: {len(shard.tensors)} tensors")


app.command("build", cls=ToolCommand, help=BUILD_HELP, short_help=BUILD_HELP.splitlines()[0], no_args_is_help=True)(
    build
)

main = entry(app, "mkmoe")
