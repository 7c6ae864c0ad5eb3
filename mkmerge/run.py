"""Run a merge: recipe text -> plan -> execute -> a complete output directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mkmerge.methods import METHODS
from mkmerge.plan import MergePlan, plan_for_run
from mkmerge.recipe import parse_recipe
from mkmerge.vocab import write_tokenizer
from mksuite.common.build import BuildOptions, build_model
from mksuite.common.errors import RecipeError
from mksuite.common.graph import ProgressListener, RunStats
from mksuite.common.writing import write_config, write_model_card
from mksuite.common.writing.output_dir import OutputDirectory

RECIPE_COPY = "mergekit_config.yml"


def read_recipe_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from None


def load_recipe(path: Path):
    return parse_recipe(read_recipe_text(path), known_methods=METHODS.keys(), source_name=str(path))


def run_merge(
    recipe,
    out: Path,
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
) -> tuple[MergePlan, RunStats]:
    """Plan ``recipe`` (headers only), then compute and write the model into ``out``.

    ``config_transform(plan, config)`` lets a tool edit the output config.json beyond the
    standard updates (mkstack rebuilds per-layer lists with it). ``plan``: a plan of this
    recipe the caller already made (it is not made again). ``tool`` names the tool in the card.
    ``lora_merge_dtype``: the dtype `model+lora` inputs are read in (default: as stored).
    """
    OutputDirectory(out, overwrite=options.overwrite).check()
    if plan is None:
        plan = plan_for_run(
            recipe, options, allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=lora_merge_dtype
        )
    sources = {model.key: model.files.tensors for model in plan.models.values()}

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
            _card(plan, directory, Path(out).name, tool)

    stats = build_model(plan.outputs, sources, Path(out), options, finalize=finalize, listener=listener)
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
        base_listed_with_models=plan.method.name == "slerp",
    )
