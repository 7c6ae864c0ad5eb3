"""`mkmoe`: assemble a Mixture of Experts from dense models (mergekit-moe config).

Examples:

    mkmoe moe.yml ./moe
    mkmoe moe.yml ./moe --layout fused --shard-size 2G
    mkmoe moe.yml ./moe --seed 7 --device cuda
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mksuite.common.cli import (
    CacheDir,
    CopyTokenizer,
    Cuda,
    Debug,
    Device,
    ModelCard,
    OutPath,
    Overwrite,
    ProgressView,
    Quiet,
    Seed,
    ShardSize,
    Threads,
    Verify,
    build_options,
    cli_errors,
    entry,
    err_console,
    human_bytes,
)

app = typer.Typer(add_completion=False, rich_markup_mode="rich", help=__doc__)

Layout = Annotated[
    str,
    typer.Option(
        "--layout",
        help="Expert tensors: `classic` (one per expert, what llama.cpp/vLLM/Hub checkpoints use) "
        "or `fused` (transformers 5's stacked gate_up_proj/down_proj).",
    ),
]
Acknowledge = Annotated[
    bool,
    typer.Option(
        "--i-understand-this-is-not-useful-without-training",
        help="Allow every expert to be the same model (the MoE then equals the dense model until trained).",
    ),
]


@app.command(help=__doc__, no_args_is_help=True)
def moe(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="mergekit-moe config YAML.")],
    out: OutPath,
    layout: Layout = "classic",
    acknowledge: Acknowledge = False,
    device: Device = "cpu",
    cuda: Cuda = False,
    threads: Threads = None,
    shard_size: ShardSize = "5G",
    seed: Seed = 0,
    overwrite: Overwrite = False,
    verify: Verify = False,
    copy_tokenizer: CopyTokenizer = True,
    write_model_card: ModelCard = True,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    from mkmoe.config import load_moe_config
    from mkmoe.layouts import LAYOUTS
    from mkmoe.run import run_moe
    from mksuite.common.errors import RecipeError, did_you_mean

    with cli_errors(debug):
        started = time.perf_counter()
        if layout not in LAYOUTS:
            raise RecipeError(
                f"unknown layout {layout!r}", field="--layout", hint=did_you_mean(layout, LAYOUTS) or "classic or fused"
            )
        options = build_options(
            device=device,
            cuda=cuda,
            threads=threads,
            shard_size=shard_size,
            seed=seed,
            overwrite=overwrite,
            verify=verify,
        )
        config = load_moe_config(config_path, allow_identical_experts=acknowledge)
        with ProgressView("mkmoe", quiet) as view:
            plan, stats = run_moe(
                config,
                out,
                options,
                layout=layout,
                copy_tokenizer=copy_tokenizer,
                write_card=write_model_card,
                cache_dir=cache_dir,
                listener=view,
                on_stage=None if quiet else lambda text: err_console.print(text, highlight=False),
            )
        elapsed = time.perf_counter() - started
        view.summary(
            f"[green]built[/green] a {plan.arch.title} with {plan.num_experts} experts "
            f"(top-{config.experts_per_token}, {config.gate_mode} gates), {plan.num_layers} layers: "
            f"{stats.tensors} tensors, {human_bytes(stats.bytes_written)} -> {out} in {elapsed:.1f} s"
        )


main = entry(app)
