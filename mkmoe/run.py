"""Run mkmoe: config -> plan (headers only) -> gates (base forward pass) -> build -> output directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mkmoe.config import MoeConfig
from mkmoe.gates import compute_gates
from mkmoe.plan import MoePlan, plan_moe
from mkmoe.tasks import GATES_SOURCE, MemorySource
from mksuite.common.build import BuildOptions, build_model
from mksuite.common.graph import ProgressListener, RunStats
from mksuite.common.writing import copy_tokenizer_files, write_config, write_model_card
from mksuite.common.writing.output_dir import output_directory
from mksuite.common.writing.output_guard import file_input, model_inputs

RECIPE_COPY = "mergekit_moe_config.yml"


def run_moe(
    config: MoeConfig,
    out: Path,
    options: BuildOptions,
    *,
    layout: str = "classic",
    copy_tokenizer: bool = True,
    write_card: bool = True,
    cache_dir: str | None = None,
    listener: ProgressListener | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[MoePlan, RunStats]:
    """Build the MoE described by ``config`` into ``out``; nothing appears there unless it all succeeds.

    Every check that needs only configs and headers runs before the gates' forward pass,
    which is the first time tensor data is read. ``on_stage`` hears a one-line description
    of each slow stage.
    """
    output = output_directory(out, overwrite=options.overwrite).check()
    plan = plan_moe(config, layout=layout, cache_dir=cache_dir)
    inputs = model_inputs(plan.models.values(), cache_dir=cache_dir) + file_input("the config", config.source_name)
    output.inputs = inputs
    output.check()  # the inputs are known now: checked before the gates read tensors
    if on_stage is not None:
        on_stage(f"computing {config.gate_mode} gates for {plan.num_layers} layers")
    gates = compute_gates(plan, seed=options.seed, device=options.device, precise=options.precise)
    sources = {**plan.tensor_sources(), GATES_SOURCE: MemorySource(gates)}

    def finalize(directory: Path) -> None:
        write_config(directory, plan.output_config, dtype=plan.dtype)
        if copy_tokenizer:
            copy_tokenizer_files(plan.base.path, directory)
        if write_card:
            (directory / RECIPE_COPY).write_text(config.text)
            _card(plan, directory, output.final.name)

    stats = build_model(plan.outputs, sources, output, options, finalize=finalize, listener=listener, inputs=inputs)
    return plan, stats


def _card(plan: MoePlan, directory: Path, title: str) -> None:
    config = plan.config
    experts = [str(e.source_model) for e in config.experts + config.shared_experts]
    write_model_card(
        directory,
        title=title,
        tool="mkmoe",
        method_name=f"Mixture of Experts ({plan.arch.class_name}, {len(config.experts)} experts, "
        f"{config.gate_mode} gates)",
        method_url=None,
        base_model=str(config.base_model),
        models=experts,
        recipe_text=config.text,
    )
