"""Input tensors that no output reads, so the plan accounts for every stored tensor.

A stored tensor either feeds some output, is listed here (layers a slice leaves out, an LM
head the output ties away, a model whose tensor another input supplies), or fits no
description, which opening the model already refused. Layer tensors are summarised per run
of consecutive layers with the same unused tensors, so a 40-layer cut is one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mkmerge.plan import MergePlan
from mksuite.common.graph import LoadTensor, Task


@dataclass(frozen=True)
class UnusedLayers:
    """Layers ``first``..``last`` of one input, each with the same unused tensors.

    ``templates`` name them with the layer index as ``*``; ``complete``: no tensor of these
    layers is read at all.
    """

    first: int
    last: int
    templates: tuple[str, ...]
    complete: bool

    def describe(self) -> str:
        span = f"layer {self.first}" if self.first == self.last else f"layers {self.first}–{self.last}"
        each = "" if self.first == self.last else " each"
        if self.complete:
            return f"{span} (all {len(self.templates)} tensors{each})"
        shown = ", ".join(self.templates[:3]) + (
            f" and {len(self.templates) - 3} more" if len(self.templates) > 3 else ""
        )
        return f"{span}: {len(self.templates)} tensor(s){each} ({shown})"


@dataclass(frozen=True)
class UnusedTensors:
    """The stored tensors of one input that no output reads."""

    label: str
    names: tuple[str, ...]  # in stored order
    nbytes: int
    layers: tuple[UnusedLayers, ...]
    others: tuple[str, ...]  # outside the layer stack

    def describe(self) -> str:
        return "; ".join([*(run.describe() for run in self.layers), *self.others])


def unused_input_tensors(plan: MergePlan, labels: Mapping[str, str]) -> tuple[UnusedTensors, ...]:
    """Per input (plan order), its stored tensors that no output task loads; inputs using all are left out."""
    read = _loaded(plan)
    found = []
    for model in plan.models.values():
        stored = model.files.tensors.names()
        names = tuple(n for n in stored if (model.key, n) not in read)
        if not names:
            continue
        found.append(
            UnusedTensors(
                label=labels[model.key],
                names=names,
                nbytes=sum(model.info(n).nbytes for n in names),
                layers=_layer_runs(model.arch, stored, set(names)),
                others=tuple(n for n in names if model.arch.layer_index_of(n) is None),
            )
        )
    return tuple(found)


def _loaded(plan: MergePlan) -> set[tuple[str, str]]:
    """(model key, stored name) of every tensor some output task reads."""
    seen: set[int] = set()
    read: set[tuple[str, str]] = set()
    stack: list[Task] = [output.task for output in plan.outputs]
    while stack:
        task = stack.pop()
        if id(task) in seen:
            continue
        seen.add(id(task))
        if isinstance(task, LoadTensor):
            read.add((task.model, task.name))
        stack.extend(task.dependencies())
    return read


def _layer_runs(arch, stored, unused: set[str]) -> tuple[UnusedLayers, ...]:
    per_layer: dict[int, list[str]] = {}
    totals: dict[int, int] = {}
    for name in stored:
        layer = arch.layer_index_of(name)
        if layer is None:
            continue
        totals[layer] = totals.get(layer, 0) + 1
        if name in unused:
            per_layer.setdefault(layer, []).append(_template(name, layer))
    runs: list[UnusedLayers] = []
    for layer in sorted(per_layer):
        templates = tuple(per_layer[layer])
        complete = len(templates) == totals[layer]
        last = runs[-1] if runs else None
        if last is not None and last.last == layer - 1 and (last.templates, last.complete) == (templates, complete):
            runs[-1] = UnusedLayers(last.first, layer, templates, complete)
        else:
            runs.append(UnusedLayers(layer, layer, templates, complete))
    return tuple(runs)


def _template(name: str, layer: int) -> str:
    """``name`` with its layer index (the first ``.N.`` segment equal to it) as ``*``."""
    return re.sub(rf"(^|\.){layer}(\.|$)", r"\1*\2", name, count=1)
