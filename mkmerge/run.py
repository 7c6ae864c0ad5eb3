"""Run a merge: recipe text -> plan -> execute -> a complete output directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from mkmerge.methods import METHODS
from mkmerge.plan import MergePlan, plan_for_run
from mkmerge.recipe import parse_recipe
from mkmerge.vocab import write_tokenizer
from mksuite.common.build import BuildOptions, build_model
from mksuite.common.graph import ProgressListener, RunStats
from mksuite.common.recipe import read_recipe_file
from mksuite.common.writing import write_config, write_model_card
from mksuite.common.writing.output_dir import OutputDirectory, output_directory
from mksuite.common.writing.output_guard import file_input, model_inputs

RECIPE_COPY = "mergekit_config.yml"


def read_recipe_text(path: Path) -> str:
    return read_recipe_file(path)


def load_recipe(path: Path):
    return parse_recipe(read_recipe_text(path), known_methods=METHODS.keys(), source_name=str(path))


def run_merge(
    recipe,
    out: Path | OutputDirectory,
    options: BuildOptions,
    *,
    allow_crimes: bool = False,
    copy_tokenizer: bool = True,
    write_card: bool = True,
    cache_dir: str | None = None,
    listener: ProgressListener | None = None,
    config_transform: Callable[[MergePlan, dict], dict] | None = None,
    plan: MergePlan | None = None,
    tool: str = "mkmerge",
    lora_merge_dtype: torch.dtype | None = None,
    unsafe_truncate_embeddings: bool | None = None,
) -> tuple[MergePlan, RunStats]:
    """Plan ``recipe`` (headers only), then compute and write the model into ``out``.

    ``config_transform(plan, config)`` lets a tool edit the output config.json beyond the
    standard updates (mkstack rebuilds per-layer lists with it). ``plan``: a plan of this
    recipe the caller already made (it is not made again). ``tool`` names the tool in the card.
    ``lora_merge_dtype``: the dtype `model+lora` inputs are read in (default: as stored).
    ``unsafe_truncate_embeddings``: overrides ``options.unsafe_truncate_embeddings``: cut
    embeddings of different vocabulary sizes to the smallest when the recipe has no tokenizer
    settings, instead of refusing them.
    """
    if unsafe_truncate_embeddings is not None:
        options = dataclasses.replace(options, unsafe_truncate_embeddings=unsafe_truncate_embeddings)
    output = output_directory(out, overwrite=options.overwrite).check()
    if plan is None:
        plan = plan_for_run(
            recipe, options, allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=lora_merge_dtype
        )
    if config_transform is None and plan.uses_slices:
        # A sliced recipe changes the depth: per-layer config lists must follow, as mkstack does.
        from mkstack.config_fixups import stack_config_transform as config_transform
    sources = {model.key: model.files.tensors for model in plan.models.values()}
    inputs = model_inputs(plan.models.values(), cache_dir=cache_dir) + file_input("the recipe", recipe.source_name)

    def finalize(directory: Path) -> None:
        transform = (lambda config: config_transform(plan, config)) if config_transform else None
        write_config(
            directory,
            plan.donor.config,
            dtype=plan.config_dtype,
            updates=plan.config_updates(),
            transform=transform,
            code_from=plan.donor.path,
        )
        write_tokenizer(
            directory,
            built=plan.vocabulary.tokenizer if plan.vocabulary is not None else None,
            donor=plan.donor.path,
            chat_template=plan.chat_template,
            copy_files=copy_tokenizer,
        )
        if write_card:
            (directory / RECIPE_COPY).write_text(recipe.text)
            _card(plan, directory, output.final.name, tool)

    stats = build_model(plan.outputs, sources, output, options, finalize=finalize, listener=listener, inputs=inputs)
    return plan, stats


def _card(plan: MergePlan, directory: Path, title: str, tool: str) -> None:
    base = str(plan.recipe.base_model) if plan.recipe.base_model is not None else None
    models = [str(ref) for ref in plan.models if str(ref) != base]
    write_model_card(
        directory,
        title=title,
        tool=tool,
        method_name=plan.method.pretty_name,
        method_url=plan.method.reference_url,
        base_model=base,
        models=models,
        recipe_text=plan.recipe.text,
        base_listed_with_models=plan.method.card_lists_base,
    )
