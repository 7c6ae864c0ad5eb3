"""The Python API: what ``mkmerge``, ``mkstack`` and ``mkmoe`` do, as functions for notebooks and scripts.

Each function takes the recipe as a file path, YAML text or a dict, and the command line's
options as keyword arguments (same names, same defaults). It runs the same engine code the
command line runs, so the output directory is byte for byte what the command writes. Where
the command prints an error and exits with a code, the function raises the domain error
(:class:`~mksuite.common.errors.MkError` and its subclasses, whose ``exit_code`` is the
command's); nothing is printed unless ``progress=True``. Warnings go through :mod:`warnings`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mksuite.common.errors import RecipeError

RecipeLike = str | os.PathLike | Mapping[str, Any]
"""A recipe: a path to a YAML file, YAML text (a string with a line break) or a mapping."""

Progress = bool | Callable[[Any], None] | None
"""None/False: silent; True: the command line's progress display on stderr; a callable:
called with each :class:`~mksuite.common.graph.ProgressEvent`."""


@dataclass(frozen=True)
class StageOutcome:
    """One stage of a multi-stage merge: where it went, and whether an up-to-date output was reused."""

    name: str | None
    out: Path
    reused: bool
    tensors: int


@dataclass(frozen=True)
class BuildResult:
    """What a run produced.

    ``plan`` is the engine's plan of the (final) output: inputs, output tensors and config
    (``MergePlan`` for merge and stack, ``MoePlan`` for moe; None when a multi-stage final
    output was reused or there is no final stage).
    """

    out: Path
    tensors: int
    bytes_written: int
    seconds: float
    plan: Any = None
    stages: tuple[StageOutcome, ...] = ()

    @property
    def files(self) -> list[str]:
        """The files in the output directory, sorted."""
        return sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []


# -- options -------------------------------------------------------------------------------
# Command-line options that have no meaning for a function call, and what to do instead.
_NOT_OPTIONS = {
    "as_json": "dry_run=True returns the plan document (a dict)",
    "quiet": "the API prints nothing unless progress=True",
    "verbose": "the API prints nothing; warnings go through the warnings module",
    "debug": "the API raises the error itself, with its traceback",
}


def _shared(**given) -> Any:
    """The command line's shared options from keyword arguments (its names and defaults)."""
    from mksuite.common.cli.options import SharedOptions

    known = {field.name for field in dataclasses.fields(SharedOptions)} - set(_NOT_OPTIONS)
    for name in set(given) & set(_NOT_OPTIONS):
        raise RecipeError(f"`{name}` is a command-line option only", field=name, hint=_NOT_OPTIONS[name])
    unknown = sorted(set(given) - known)
    if unknown:
        from mksuite.common.errors import did_you_mean

        raise RecipeError(
            f"unknown option `{unknown[0]}`",
            field=unknown[0],
            hint=did_you_mean(unknown[0], sorted(known)) or "see help(mksuite.merge) for the options",
        )
    if isinstance(given.get("shard_size"), int):
        given["shard_size"] = str(given["shard_size"])
    opts = SharedOptions(**given)
    opts.validate()
    return opts


def _pushed(opts, tool: str, notify: Callable[[str], None] | None, result: BuildResult) -> BuildResult:
    """``result``, once the output is uploaded when ``push_to_hub`` asks for it (silently
    unless ``notify``)."""
    opts.push_output(result.out, tool=tool, notify=notify or (lambda line: None))
    return result


def _build_options(opts, notify: Callable[[str], None] | None):
    # The command line prints --verify's one-line result; a library hands it to the caller.
    return dataclasses.replace(opts.build(), notify=notify)


def _progress(progress: Progress, label: str):
    """(context manager, listener) for a progress argument."""
    if progress is True:
        from mksuite.common.cli import ProgressView

        view = ProgressView(label, False)
        return view, view
    if callable(progress):
        return nullcontext(), progress
    return nullcontext(), None


def _recipe_text(recipe: RecipeLike, what: str = "recipe") -> tuple[str, Path | None]:
    """(YAML text, the file it came from or None)."""
    if isinstance(recipe, Mapping):
        import yaml

        return yaml.safe_dump(dict(recipe), sort_keys=False), None
    if isinstance(recipe, str) and "\n" in recipe:
        return recipe, None
    if isinstance(recipe, str | os.PathLike):
        from mksuite.common.recipe import read_recipe_file

        path = Path(recipe)
        return read_recipe_file(path, what=what), path
    raise RecipeError(
        f"a {what} is a file path, YAML text or a dict, not {type(recipe).__name__}",
        hint=f"merge('{what}.yml', 'out') or merge({{'merge_method': 'linear', ...}}, 'out')",
    )


# -- the three tools -----------------------------------------------------------------------
def merge(
    recipe: RecipeLike,
    out: str | os.PathLike,
    *,
    lazy: bool = True,
    intermediate_dir: str | os.PathLike | None = None,
    progress: Progress = None,
    notify: Callable[[str], None] | None = None,
    **options,
) -> BuildResult | dict:
    """Merge models from a mergekit-style recipe into ``out``: what ``mkmerge RECIPE OUT`` does.

    ``options`` are the command line's, by their Python names: ``device`` ("cpu", "cuda",
    "cuda:N", "auto"), ``threads``, ``seed``, ``shard_size`` ("5G" or a number of bytes),
    ``overwrite``, ``verify``, ``copy_tokenizer``, ``write_model_card``,
    ``allow_crimes``, ``cache_dir``, ``lora_merge_dtype``, ``unsafe_truncate_embeddings``,
    ``read_to_gpu``. A multi-stage recipe (several ``---`` documents) runs its stages
    (``lazy``, ``intermediate_dir`` as ``--lazy`` and ``--intermediate-dir``). ``notify``
    receives the engine's one-line reports (``verify``'s result, a removed stale partial).
    ``dry_run=True`` writes nothing and returns the plan document ``--dry-run --json`` prints
    (a dict), after the same checks.

    Raises :class:`~mksuite.common.errors.MkError` subclasses (``exit_code`` as the command's).
    """
    from mkmerge.methods import METHODS
    from mkmerge.stages import parse_stages

    started = time.perf_counter()
    opts = _shared(**options)
    out = Path(out)
    text, path = _recipe_text(recipe)
    stages = parse_stages(
        text,
        out=out,
        known_methods=METHODS.keys(),
        source_name=str(path) if path is not None else None,
        intermediate_dir=Path(intermediate_dir) if intermediate_dir is not None else None,
    )
    build = _build_options(opts, notify)
    from mksuite.common.cli.options import parse_float_dtype

    checks = dict(
        allow_crimes=opts.allow_crimes,
        cache_dir=opts.cache_dir,
        lora_merge_dtype=parse_float_dtype(opts.lora_merge_dtype, option="lora_merge_dtype"),
    )
    if opts.dry_run:
        from mkmerge.plan_view import plan_document

        return plan_document(stages, build, lazy=lazy, **checks)
    from mkmerge.run import run_merge
    from mkmerge.run_stages import run_stages

    common = dict(**checks, copy_tokenizer=opts.copy_tokenizer, write_card=opts.write_model_card)
    if len(stages) > 1:

        def stage_progress(stage):  # entered by run_stages; what it yields is the stage's listener
            context, listener = _progress(progress, f"{stage.label}: merging")
            return context if progress is True else nullcontext(listener)

        results = run_stages(stages, build, lazy=lazy, progress=stage_progress, **common)
        outcomes = tuple(
            StageOutcome(r.stage.name, r.stage.out, r.reused, 0 if r.reused else r.stats.tensors) for r in results
        )
        final = next((r for r in results if r.stage.name is None), None)
        computed = [r for r in results if not r.reused]
        return _pushed(
            opts,
            "mkmerge",
            notify,
            BuildResult(
                out=out,
                tensors=final.stats.tensors
                if final is not None and final.stats
                else sum(r.stats.tensors for r in computed),
                bytes_written=sum(r.stats.bytes_written for r in computed),
                seconds=time.perf_counter() - started,
                plan=final.plan if final is not None else None,
                stages=outcomes,
            ),
        )
    context, listener = _progress(progress, "merging")
    with context:
        plan, stats = run_merge(stages[0].recipe, out, build, listener=listener, **common)
    return _pushed(
        opts,
        "mkmerge",
        notify,
        BuildResult(out, stats.tensors, stats.bytes_written, time.perf_counter() - started, plan),
    )


def stack(
    recipe: RecipeLike | None,
    out: str | os.PathLike,
    *,
    slices: list[str] | tuple[str, ...] = (),
    interleave: tuple[str, str] | None = None,
    upscale: str | None = None,
    expand: str | None = None,
    window: int | None = None,
    overlap: int | None = None,
    every: int | None = None,
    models: Mapping[str, str] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    progress: Progress = None,
    notify: Callable[[str], None] | None = None,
    **options,
) -> BuildResult | dict:
    """Stack layers into ``out``: what ``mkstack RECIPE OUT`` (or ``mkstack OUT --upscale A ...``) does.

    Give a passthrough ``recipe``, or ``recipe=None`` and one mode: ``slices=["A:0-16",
    "B:8-24"]``, ``interleave=("A", "B")`` with ``window`` and ``overlap``, ``upscale="A"``
    with ``overlap``, ``expand="A"`` with ``every``; ``models`` names models for the modes
    (``--model NAME=REF``), ``dtype``/``out_dtype`` go with a mode. Other ``options`` (and
    ``dry_run``) as :func:`merge`'s.
    """
    from mkstack.stack import (
        ModeRequest,
        StackWarning,
        parse_stack_recipe,
        plan_stack,
        request_recipe_text,
        require_passthrough,
        run_stack,
        stack_plan_document,
    )
    from mksuite.common.writing.output_dir import OutputDirectory

    started = time.perf_counter()
    opts = _shared(**options)
    request = ModeRequest(
        slices=tuple(slices),
        interleave=tuple(interleave) if interleave is not None else None,
        upscale=upscale,
        expand=expand,
        window=window,
        overlap=overlap,
        every=every,
        aliases=dict(models or {}),
    )
    if (request.mode is None) == (recipe is None):
        raise RecipeError(
            "give a recipe or one mode (slices, interleave, upscale, expand), not both and not neither",
            hint="stack('recipe.yml', 'out') or stack(None, 'out', upscale='org/model', overlap=8)",
        )
    output = OutputDirectory(Path(out), overwrite=opts.overwrite).check()
    if recipe is not None:
        if dtype or out_dtype:
            raise RecipeError("dtype and out_dtype go with a mode; a recipe sets them itself", field="dtype")
        text, path = _recipe_text(recipe)
        from mkmerge.methods import METHODS
        from mkmerge.recipe import parse_recipe

        parsed = require_passthrough(
            parse_recipe(text, known_methods=METHODS.keys(), source_name=str(path) if path else None)
        )
    else:
        from mkstack.cli import _dtype

        text = request_recipe_text(
            request,
            dtype=_dtype(dtype, "dtype"),
            out_dtype=_dtype(out_dtype, "out_dtype"),
            allow_crimes=opts.allow_crimes,
            cache_dir=opts.cache_dir,
        )
        parsed = parse_stack_recipe(text)
    checked = plan_stack(parsed, allow_crimes=opts.allow_crimes, seed=opts.seed, cache_dir=opts.cache_dir)
    import warnings

    for note in checked.config_warnings:
        warnings.warn(StackWarning(note), stacklevel=2)
    build = _build_options(opts, notify)
    if opts.dry_run:
        return stack_plan_document(checked, build)
    context, listener = _progress(progress, "stacking")
    with context:
        plan, stats = run_stack(
            parsed,
            output,
            build,
            allow_crimes=opts.allow_crimes,
            copy_tokenizer=opts.copy_tokenizer,
            write_card=opts.write_model_card,
            cache_dir=opts.cache_dir,
            listener=listener,
            checked=checked,
        )
    return _pushed(
        opts,
        "mkstack",
        notify,
        BuildResult(Path(out), stats.tensors, stats.bytes_written, time.perf_counter() - started, plan),
    )


def moe(
    config: RecipeLike,
    out: str | os.PathLike,
    *,
    layout: str = "classic",
    allow_identical_experts: bool = False,
    progress: Progress = None,
    notify: Callable[[str], None] | None = None,
    **options,
) -> BuildResult | dict:
    """Build the Mixture of Experts a mergekit-moe ``config`` describes: what ``mkmoe CONFIG OUT`` does.

    ``layout``: "classic" (one tensor per expert) or "fused"; ``allow_identical_experts`` is
    ``--i-understand-this-is-not-useful-without-training``. Other ``options`` (and ``dry_run``)
    as :func:`merge`'s.
    """
    from mkmoe.config import LAYOUTS, parse_moe_config
    from mkmoe.run import run_moe
    from mksuite.common.errors import did_you_mean
    from mksuite.common.graph import ProgressEvent

    started = time.perf_counter()
    opts = _shared(**options)
    if layout not in LAYOUTS:
        raise RecipeError(
            f"unknown layout {layout!r}", field="layout", hint=did_you_mean(layout, LAYOUTS) or "classic or fused"
        )
    text, path = _recipe_text(config, what="config")
    parsed = parse_moe_config(
        text, source_name=str(path) if path else None, allow_identical_experts=allow_identical_experts
    )
    build = _build_options(opts, notify)
    if opts.dry_run:
        from mkmoe.plan import plan_moe
        from mkmoe.plan_json import moe_plan_json
        from mksuite.common.writing.output_dir import OutputDirectory

        OutputDirectory(Path(out), overwrite=opts.overwrite).check()
        return moe_plan_json(plan_moe(parsed, layout=layout, cache_dir=opts.cache_dir), build, out=str(out))
    context, listener = _progress(progress, "merging experts")
    with context:
        on_stage = (lambda text: listener(ProgressEvent("phase", name=text))) if listener else None
        plan, stats = run_moe(
            parsed,
            Path(out),
            build,
            layout=layout,
            copy_tokenizer=opts.copy_tokenizer,
            write_card=opts.write_model_card,
            cache_dir=opts.cache_dir,
            listener=listener,
            on_stage=on_stage,
        )
    return _pushed(
        opts,
        "mkmoe",
        notify,
        BuildResult(Path(out), stats.tensors, stats.bytes_written, time.perf_counter() - started, plan),
    )
