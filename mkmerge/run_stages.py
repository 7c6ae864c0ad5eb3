"""Run a multi-stage recipe: check what can be checked up front, then each stage in order.

One rule for what is already on disk, the same as a one-stage run's (docs/recipes.md):

* OUT is the user's. What a run writes to OUT (the final merge; when every stage is named,
  each stage, in ``OUT/<name>``) is never reused: an existing, non-empty OUT is refused
  before anything is read unless ``--overwrite`` is given, and with it is recomputed and
  replaced, exactly as a one-stage run into OUT.
* The intermediate directory is the run's own. Lazy runs (the default) reuse a stage's output
  there when it is complete (config.json plus weights), holds a recipe copy equal to the
  stage's recipe (when it has a copy), and no stage it uses is recomputed in this run; the
  last two conditions go beyond mergekit, which would silently keep a stage built from a
  recipe since edited. Otherwise (and with ``lazy=False``) the stage is recomputed and
  replaces its old output without asking: ``--overwrite`` has no say there.

Before the first tensor moves, every stage that will run has its output location checked,
and is planned in full (configs and headers) when all stages it uses are on disk already.
A stage that uses a stage recomputed in this run cannot be planned yet (its input does not
exist); its other inputs are opened now, and it is planned when its turn comes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from mkmerge.plan import MergePlan, plan_for_run
from mkmerge.run import RECIPE_COPY, run_merge
from mkmerge.slices import referenced_models
from mkmerge.stages import Stage
from mksuite.common.build import BuildOptions
from mksuite.common.errors import MkError, OutputError
from mksuite.common.graph import ProgressListener, RunStats
from mksuite.common.input_models import open_input_models
from mksuite.common.writing.output_dir import OutputDirectory, output_directory
from mksuite.common.writing.output_guard import RunInput, file_input, model_inputs

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage: computed (with its plan and stats) or reused."""

    stage: Stage
    plan: MergePlan | None = None
    stats: RunStats | None = None

    @property
    def reused(self) -> bool:
        return self.stats is None


def output_is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished model: config.json and a weights file or index."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def is_current(stage: Stage) -> bool:
    """Whether the stage's existing output can be reused (it was built from this recipe)."""
    if not output_is_complete(stage.out):
        return False
    copy = stage.out / RECIPE_COPY
    return not copy.is_file() or copy.read_text() == stage.recipe.text


def written_to_out(stages: list[Stage]) -> set[int]:
    """Documents whose output is OUT's: the unnamed final stage, or every stage when all are named."""
    final = {stage.document for stage in stages if stage.name is None}
    return final or {stage.document for stage in stages}


def stages_to_run(stages: list[Stage], *, lazy: bool) -> set[int]:
    """Document numbers of the stages to compute; ``stages`` must be in dependency order.

    A stage written to OUT always runs (see the module docstring); an intermediate one runs
    unless ``lazy`` and its output is current.
    """
    running: set[int] = set()
    recomputed: set[str] = set()
    at_out = written_to_out(stages)
    for stage in stages:
        reusable = lazy and stage.document not in at_out and is_current(stage)
        if not reusable or recomputed.intersection(stage.depends_on):
            running.add(stage.document)
            if stage.name is not None:
                recomputed.add(stage.name)
    return running


def run_stages(
    stages: list[Stage],
    options: BuildOptions,
    *,
    lazy: bool = True,
    allow_crimes: bool = False,
    copy_tokenizer: bool = True,
    write_card: bool = True,
    cache_dir: str | None = None,
    lora_merge_dtype: torch.dtype | None = None,
    progress: Callable[[Stage], AbstractContextManager[ProgressListener | None]] | None = None,
) -> list[StageResult]:
    """Check every stage that will run, then compute them in order; stages in dependency order.

    ``progress(stage)`` opens a progress listener for one stage's computation.
    """
    running, plans, outputs = check_stages(
        stages, options, lazy=lazy, allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=lora_merge_dtype
    )
    results = []
    for stage in stages:
        if stage.document not in running:
            results.append(StageResult(stage))
            continue
        with _within(stage), progress(stage) if progress else nullcontext() as listener:
            plan, stats = run_merge(
                stage.recipe,
                outputs[stage.document],  # checked above: run_merge checks only inputs added since
                _options(stage, stages, options),
                plan=plans.pop(stage.document, None),
                allow_crimes=allow_crimes,
                copy_tokenizer=copy_tokenizer,
                write_card=write_card,
                cache_dir=cache_dir,
                lora_merge_dtype=lora_merge_dtype,
                listener=listener,
            )
        results.append(StageResult(stage, plan, stats))
    return results


def check_stages(
    stages: list[Stage],
    options: BuildOptions,
    *,
    lazy: bool = True,
    allow_crimes: bool = False,
    cache_dir: str | None = None,
    lora_merge_dtype: torch.dtype | None = None,
) -> tuple[set[int], dict[int, MergePlan], dict[int, OutputDirectory]]:
    """Every check a run makes before its first read: (stages to compute, plans made now,
    their output directories, checked).

    A stage is planned now when no stage it uses is recomputed in this run; the others have
    their own inputs opened (headers only). A dry run reports exactly what this finds. Each
    output directory is checked in full once, before planning; the inputs found by planning
    are checked against it then, and those found later (when the stage runs) as they come.
    """
    running = stages_to_run(stages, lazy=lazy)
    _check_out_folder(stages, options)
    recomputed = {s.name for s in stages if s.document in running and s.name is not None}
    stage_paths = {str(s.out) for s in stages if s.name is not None}
    plans: dict[int, MergePlan] = {}
    outputs: dict[int, OutputDirectory] = {}
    for stage in (s for s in stages if s.document in running):
        with _within(stage):
            overwrite = _options(stage, stages, options).overwrite
            output = outputs[stage.document] = OutputDirectory(stage.out, overwrite=overwrite).check()
            if recomputed.intersection(stage.depends_on):
                inputs = _open_outside_inputs(stage, stage_paths, allow_crimes, cache_dir, lora_merge_dtype)
            else:
                plans[stage.document] = plan_for_run(
                    stage.recipe,
                    options,
                    allow_crimes=allow_crimes,
                    cache_dir=cache_dir,
                    lora_merge_dtype=lora_merge_dtype,
                )
                inputs = model_inputs(plans[stage.document].models.values(), cache_dir=cache_dir)
            inputs += _other_stages(stage, stages) + file_input("the recipe", stage.recipe.source_name)
            output_directory(output, overwrite=overwrite, inputs=inputs).check()
    return running, plans, outputs


def _other_stages(stage: Stage, stages: list[Stage]) -> list[RunInput]:
    """The run's other stage outputs, and for the final output also the intermediate directory."""
    found = [RunInput(f"the intermediate stage `{s.name}`", s.out) for s in stages if s.name and s is not stage]
    if stage.name is None:
        found += [RunInput("the intermediate directory", d) for d in {s.out.parent for s in stages if s.name}]
    return found


def _options(stage: Stage, stages: list[Stage], options: BuildOptions) -> BuildOptions:
    # An intermediate stage's output is the run's own: recomputing it replaces it. What goes
    # to OUT follows the user's --overwrite.
    if stage.document in written_to_out(stages):
        return options
    return dataclasses.replace(options, overwrite=True)


def _check_out_folder(stages: list[Stage], options: BuildOptions) -> None:
    """Every stage named: OUT is the folder of their outputs, refused like a one-stage OUT when it is in use."""
    if any(stage.name is None for stage in stages) or options.overwrite:
        return
    folder = stages[0].out.parent
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputError(
            f"{folder} already exists and is not empty",
            hint="choose another output directory or pass --overwrite to recompute and replace the stages in it",
        )


def _open_outside_inputs(
    stage: Stage, stage_paths: set[str], allow_crimes: bool, cache_dir: str | None, dtype: torch.dtype | None
) -> list[RunInput]:
    """Resolve and open (headers only) the inputs of ``stage`` that are not other stages."""
    refs = [ref for ref in referenced_models(stage.recipe) if ref.path not in stage_paths]
    if not refs:
        return []
    opened = open_input_models(refs, allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=dtype)
    for model in opened.values():
        model.files.close()
    return model_inputs(opened.values(), cache_dir=cache_dir)


@contextmanager
def _within(stage: Stage) -> Iterator[None]:
    try:
        yield
    except MkError as error:
        raise error.within(stage.label) from None
