"""`mkmerge plan` and `mkmerge RECIPE OUT --dry-run`: make the plan, print it, move no bytes.

The plan is made exactly as a run makes it (same recipe parser, same ``plan_merge``), so every
error a run would find before reading tensor data is raised here, with the same message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mkmerge.memory_estimate import current_rss_bytes
from mkmerge.plan import plan_for_run
from mkmerge.plan_json import SCHEMA, report_json
from mkmerge.plan_report import PlanReport, TensorPlan, plan_report
from mkmerge.run_stages import check_stages
from mkmerge.stages import Stage
from mksuite.common.build import BuildOptions
from mksuite.common.cli import human_bytes
from mksuite.common.writing import OutputDirectory


def show_plan(
    recipe,
    options: BuildOptions,
    *,
    allow_crimes: bool = False,
    cache_dir: str | None = None,
    lora_merge_dtype: torch.dtype | None = None,
    as_json: bool = False,
    console: Console | None = None,
) -> PlanReport:
    """Plan one parsed recipe from headers and print the report (rich tables, or JSON on stdout)."""
    plan = plan_for_run(
        recipe, options, allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=lora_merge_dtype
    )
    # Measured here, after planning: the imports and metadata a run holds before its first read.
    report = plan_report(plan, options, baseline_bytes=current_rss_bytes())
    if as_json:
        sys.stdout.write(json.dumps(report_json(report), indent=2) + "\n")
    else:
        render_plan(report, console or Console())
    return report


def show_stage_plans(
    stages: Sequence[Stage],
    options: BuildOptions,
    *,
    lazy: bool = True,
    allow_crimes: bool = False,
    cache_dir: str | None = None,
    lora_merge_dtype: torch.dtype | None = None,
    as_json: bool = False,
    console: Console | None = None,
) -> None:
    """The dry run of `mkmerge RECIPE OUT`: each stage's plan, after the checks the run makes first.

    A one-document recipe prints as `mkmerge plan` does. In a multi-stage recipe, a stage whose
    output is up to date is reused, and a stage that uses a stage this run recomputes can only
    be planned once that stage exists (its other inputs are checked now, as the run does).
    """
    if len(stages) == 1:
        OutputDirectory(stages[0].out, overwrite=options.overwrite).check()  # as run_merge does first
        show_plan(
            stages[0].recipe, options, allow_crimes=allow_crimes, cache_dir=cache_dir,
            lora_merge_dtype=lora_merge_dtype, as_json=as_json, console=console,
        )  # fmt: skip
        return
    running, reports = _stage_reports(stages, options, lazy, allow_crimes, cache_dir, lora_merge_dtype)
    if as_json:
        document = {"schema": SCHEMA, "stages": [_stage_json(s, running, reports) for s in stages]}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    console = console or Console()
    for stage in stages:
        console.print(
            f"[bold]{escape(stage.label)}[/bold] -> {escape(str(stage.out))}: {_status_text(stage, running, reports)}"
        )
        if stage.document in reports:
            render_plan(reports[stage.document], console)


def plan_document(
    stages: Sequence[Stage],
    options: BuildOptions,
    *,
    lazy: bool = True,
    allow_crimes: bool = False,
    cache_dir: str | None = None,
    lora_merge_dtype: torch.dtype | None = None,
) -> dict:
    """What `mkmerge RECIPE OUT --dry-run --json` prints, as a dict (the Python API's dry run)."""
    if len(stages) == 1:
        OutputDirectory(stages[0].out, overwrite=options.overwrite).check()
        plan = plan_for_run(
            stages[0].recipe, options, allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=lora_merge_dtype
        )
        return report_json(plan_report(plan, options, baseline_bytes=current_rss_bytes()))
    running, reports = _stage_reports(stages, options, lazy, allow_crimes, cache_dir, lora_merge_dtype)
    return {"schema": SCHEMA, "stages": [_stage_json(s, running, reports) for s in stages]}


def _stage_reports(stages, options, lazy, allow_crimes, cache_dir, lora_merge_dtype):
    """The checks a multi-stage run makes first: (stages to compute, reports of those planned now)."""
    running, plans, _ = check_stages(
        list(stages), options, lazy=lazy, allow_crimes=allow_crimes, cache_dir=cache_dir,
        lora_merge_dtype=lora_merge_dtype,
    )  # fmt: skip
    baseline = current_rss_bytes()
    return running, {number: plan_report(plan, options, baseline_bytes=baseline) for number, plan in plans.items()}


def _status(stage: Stage, running: set[int], reports: dict[int, PlanReport]) -> str:
    if stage.document not in running:
        return "reused"
    return "planned" if stage.document in reports else "waits"


def _status_text(stage: Stage, running: set[int], reports: dict[int, PlanReport]) -> str:
    return {
        "reused": "up to date, reused",
        "waits": f"planned once {', '.join(f'`{name}`' for name in stage.depends_on)} is built by this run",
        "planned": "will be merged",
    }[_status(stage, running, reports)]


def _stage_json(stage: Stage, running: set[int], reports: dict[int, PlanReport]) -> dict:
    return {
        "document": stage.document,
        "name": stage.name,
        "out": str(stage.out),
        "depends_on": list(stage.depends_on),
        "status": _status(stage, running, reports),
        "plan": report_json(reports[stage.document]) if stage.document in reports else None,
    }


def render_plan(report: PlanReport, console: Console) -> None:
    """The human-readable plan: inputs, output, how each tensor is computed, files, memory."""
    source = f" ({escape(report.recipe)})" if report.recipe else ""
    console.print(
        f"[bold]plan{source}[/bold]: {report.method} -> {report.architecture}, {report.layers} layers, "
        f"{', '.join(report.output_dtypes)}, {len(report.tensors)} tensors, {human_bytes(report.output_bytes)}; "
        f"config.json from {report.config_from}",
        highlight=False,
    )
    console.print(_inputs_table(report))
    console.print(_tensors_table(report))
    console.print(_shards_table(report))
    if report.config_changes:
        changes = "; ".join(
            f"{escape(key)}: {' -> '.join(json.dumps(change[side]) if side in change else '(absent)' for side in ('from', 'to'))}"
            for key, change in report.config_changes.items()
        )
        console.print(f"config.json changes from {report.config_from}'s: {escape(changes)}", highlight=False)
    if report.unused:
        console.print(_unused_table(report))
    _print_memory(report, console)


def _inputs_table(report: PlanReport) -> Table:
    resolved = any(i.reference != i.path for i in report.inputs)  # else the path column repeats the reference
    table = Table(title="inputs", title_justify="left")
    columns = ("", "reference", "local path") if resolved else ("", "model")
    for column in (*columns, "architecture", "layers", "dtype", "size"):
        table.add_column(column, overflow="fold")
    for i in report.inputs:
        where = (escape(i.reference), escape(i.path)) if resolved else (escape(i.path),)
        table.add_row(i.label, *where, i.architecture, str(i.layers), ", ".join(i.dtypes), human_bytes(i.nbytes))
    return table


def _tensors_table(report: PlanReport) -> Table:
    table = Table(title="output tensors", title_justify="left")
    for column in ("output", "computed as", "tensors"):
        table.add_column(column, overflow="fold")
    for tensor in report.section("pre"):
        table.add_row(*_weight_row(tensor))
    for group in report.groups:
        span = f"layer {group.first}" if group.first == group.last else f"layers {group.first}–{group.last}"
        what = "\n".join(
            (f"{count}: " if len(group.pattern) > 1 else "") + signature.describe(group.first, group.last)
            for signature, count in group.pattern
        )
        layers = group.last - group.first + 1
        count = f"{group.tensors_each} each" if layers > 1 else str(group.tensors_each)
        table.add_row(span, escape(what), count)
    for tensor in report.section("post"):
        table.add_row(*_weight_row(tensor))
    return table


def _weight_row(tensor: TensorPlan) -> tuple[str, str, str]:
    what = tensor.signature.describe(tensor.layer, tensor.layer)
    if tensor.row_blocks > 1:
        passes = f", {tensor.statistics_passes} statistics pass(es)" if tensor.statistics_passes else ""
        what += f" in {tensor.row_blocks} row blocks{passes}"
    return escape(tensor.name), escape(what), "1"


def _shards_table(report: PlanReport) -> Table:
    table = Table(title="output files", title_justify="left")
    for column in ("file", "tensors", "size"):
        table.add_column(column)
    for shard in report.shards:
        table.add_row(shard.file, str(shard.tensors), human_bytes(shard.nbytes))
    return table


def _unused_table(report: PlanReport) -> Table:
    table = Table(title="input tensors no output uses", title_justify="left")
    for column in ("", "tensors", "size", "which"):
        table.add_column(column, overflow="fold")
    for unused in report.unused:
        table.add_row(unused.label, str(len(unused.names)), human_bytes(unused.nbytes), escape(unused.describe()))
    return table


def _workers(count: int) -> str:
    return f"{count} outputs computed at once; " if count > 1 else ""


def _print_memory(report: PlanReport, console: Console) -> None:
    memory = report.memory
    parts = [
        ("process", memory.baseline_bytes),
        ("reading", memory.read_bytes),
        ("computing", memory.working_bytes),
        ("writing", memory.write_bytes),
        ("allocator", memory.retained_bytes),
    ]
    at = f" while computing {escape(memory.peak_tensor)}" if memory.peak_tensor else ""
    console.print(
        f"[bold]predicted peak memory[/bold]: {human_bytes(memory.peak_bytes)}{at} = "
        + " + ".join(f"{name} {human_bytes(value)}" for name, value in parts),
        highlight=False,
    )
    console.print(
        f"  ({_workers(memory.compute_workers)}reading ahead up to {human_bytes(memory.prefetch_bytes)}; "
        "a disk slower than the merge can add up to "
        f"{human_bytes(memory.write_queue_bytes)} of queued writes)",
        highlight=False,
    )
    if report.device != "cpu":
        console.print(f"  (on {report.device} the temporaries of computing live in device memory)", highlight=False)
