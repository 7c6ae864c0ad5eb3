"""What a merge will do, from its plan alone: inputs, output tensors, shard layout, memory.

:func:`plan_report` turns a :class:`MergePlan` (made from config.json files and weight
headers) into a :class:`PlanReport`.
Nothing here reads tensor data or touches the output directory.

Its JSON form (schema ``mkmerge-plan/1``) is in mkmerge/plan_json.py.

Input labels: ``base`` for the recipe's base model, then ``A``, ``B``, ... in recipe order.
``computed_as`` names the method and the inputs' labels; a source layer range follows a label
when it differs from the output layers (stacking), a scale factor follows as ``×0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mkmerge.memory_estimate import MemoryEstimate, estimate_peak_memory
from mkmerge.plan import MergePlan
from mkmerge.plan_unused import UnusedTensors, unused_input_tensors
from mkmerge.tasks import MergeTensor
from mksuite.common.build import BuildOptions, output_layout
from mksuite.common.graph import LoadTensor, OutputTensor, ScaleTensor, Task
from mksuite.common.input_models import OpenedModel
from mksuite.common.plan_document import architecture_name, config_changes, letters


@dataclass(frozen=True)
class InputSummary:
    label: str
    reference: str
    path: str
    architecture: str
    layers: int
    dtypes: tuple[str, ...]
    tensors: int
    nbytes: int
    is_base: bool


@dataclass(frozen=True)
class Signature:
    """How one output tensor is computed, up to which layer: what layers are grouped by."""

    method: str
    inputs: tuple[tuple[str, int], ...]  # (input label, source layer - output layer)
    scale: float | None = None

    def describe(self, first: int | None = None, last: int | None = None) -> str:
        """``ties(base, A, B)`` (base first); a source range after a label whose layers are shifted."""
        parts = []
        for label, shift in sorted(self.inputs, key=lambda item: item[0] != "base"):
            if shift and first is not None and last is not None:
                parts.append(f"{label} {_layer_span(first + shift, last + shift)}")
            else:
                parts.append(label)
        text = f"{self.method}({', '.join(parts)})"
        return text if self.scale is None else f"{text} ×{self.scale:g}"


@dataclass(frozen=True)
class TensorInput:
    label: str
    tensor: str
    layer: int | None
    dtype: str
    shape: tuple[int, ...]
    is_base: bool
    parameters: Mapping[str, object]


@dataclass(frozen=True)
class TensorPlan:
    name: str
    section: str  # "pre" | "layer" | "post"
    layer: int | None
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shard: str
    signature: Signature
    parameters: Mapping[str, object]
    inputs: tuple[TensorInput, ...]
    row_blocks: int = 1  # parts it is merged and written in (mkmerge/methods/chunked.py)
    statistics_passes: int = 0  # reads of every input before the merging read


@dataclass(frozen=True)
class LayerGroup:
    """Consecutive output layers whose tensors are computed alike."""

    first: int
    last: int
    pattern: tuple[tuple[Signature, int], ...]  # (signature, tensors per layer computed so)

    @property
    def tensors_each(self) -> int:
        return sum(count for _, count in self.pattern)


@dataclass(frozen=True)
class ShardSummary:
    file: str
    tensors: int
    nbytes: int


@dataclass(frozen=True)
class PlanReport:
    recipe: str | None
    method: str
    inputs: tuple[InputSummary, ...]
    architecture: str
    layers: int
    config_from: str
    tensors: tuple[TensorPlan, ...]
    groups: tuple[LayerGroup, ...]
    shards: tuple[ShardSummary, ...]
    memory: MemoryEstimate
    device: str
    config_changes: Mapping[str, Mapping[str, object]]  # "key": {"from": donor's, "to": written}
    unused: tuple[UnusedTensors, ...] = ()  # stored input tensors no output reads

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def output_dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({t.dtype for t in self.tensors}))

    def section(self, name: str) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.section == name)


def plan_report(plan: MergePlan, options: BuildOptions, *, baseline_bytes: int) -> PlanReport:
    """Summarise ``plan`` as executed with ``options``; ``baseline_bytes``: the process's measured RSS."""
    labels = input_labels(plan)
    models = {model.key: model for model in plan.models.values()}
    layout = output_layout(plan.outputs, options.shard_size)
    shard_of = {t.name: shard.filename for shard in layout for t in shard.tensors}
    tensors = tuple(
        _tensor_plan(plan, output, parts, section, layer, labels, models, shard_of[output.name])
        for output, parts, section, layer in _with_sections(plan)
    )
    memory = estimate_peak_memory(
        plan.outputs, lambda load: models[load.model].info(load.name), options, baseline_bytes=baseline_bytes
    )
    return PlanReport(
        recipe=getattr(plan.recipe, "source_name", None),
        method=plan.method.name,
        inputs=tuple(_input_summary(model, labels[model.key], plan) for model in plan.models.values()),
        architecture=architecture_name(plan.donor),
        layers=plan.num_layers,
        config_from=labels[plan.donor.key],
        tensors=tensors,
        groups=layer_groups(tensors),
        shards=tuple(ShardSummary(s.filename, len(s.tensors), s.file_bytes) for s in layout),
        memory=memory,
        device=str(options.device),
        config_changes=config_changes(plan.donor.config, plan.output_config()),
        unused=unused_input_tensors(plan, labels),
    )


def input_labels(plan: MergePlan) -> dict[str, str]:
    """Model key -> ``base`` for the recipe's base model, ``A``, ``B``, ... for the others in order."""
    base = plan.recipe.base_model
    labels: dict[str, str] = {}
    others = iter(letters())
    for ref, model in plan.models.items():
        labels[model.key] = "base" if base is not None and ref == base else next(others)
    return labels


def _input_summary(model: OpenedModel, label: str, plan: MergePlan) -> InputSummary:
    infos = [model.files.tensors.info(name) for name in model.files.tensors.names()]
    return InputSummary(
        label=label,
        reference=str(model.ref),
        path=str(model.path),
        architecture=architecture_name(model),
        layers=model.num_layers,
        dtypes=tuple(sorted({_dtype_name(info.dtype) for info in infos})),
        tensors=len(infos),
        nbytes=sum(info.nbytes for info in infos),
        is_base=plan.recipe.base_model is not None and model.ref == plan.recipe.base_model,
    )


def _with_sections(plan: MergePlan):
    """(first part, number of parts, section, layer) per output tensor, in plan order.

    Tensors before the first layer are "pre", after it "post".
    """
    parts: dict[str, list[OutputTensor]] = {}
    for output in plan.outputs:
        parts.setdefault(output.name, []).append(output)
    seen_layer = False
    for name, outputs in parts.items():
        output = outputs[0]
        layer = plan.arch.layer_index_of(name)
        seen_layer = seen_layer or layer is not None
        section = "layer" if layer is not None else ("post" if seen_layer else "pre")
        yield output, len(outputs), section, layer


def _tensor_plan(
    plan: MergePlan,
    output: OutputTensor,
    parts: int,
    section: str,
    layer: int | None,
    labels: Mapping[str, str],
    models: Mapping[str, OpenedModel],
    shard: str,
) -> TensorPlan:
    root, scale = _merge_root(output.task)
    if isinstance(root, MergeTensor):
        method, branches = root.method, root.inputs
        per_model = [dict(p) for p in root.per_model]
        params, base_index = dict(root.params), root.base_index
    else:  # a tensor taken as it is (passthrough of one input)
        method, branches, per_model, params, base_index = plan.method.name, (root,), [{}], {}, None
        if scale is not None:
            per_model = [{"scale": scale}]
    inputs = []
    for index, branch in enumerate(branches):
        load = _first_load(branch)
        if load is None:  # computed from no stored tensor
            continue
        model = models[load.model]
        info = model.info(load.name)
        inputs.append(
            TensorInput(
                label=labels[load.model],
                tensor=load.name,
                layer=model.arch.layer_index_of(load.name),
                dtype=_dtype_name(info.dtype),
                shape=tuple(info.shape),
                is_base=index == base_index,
                parameters=per_model[index],
            )
        )
    shifts = tuple((i.label, i.layer - layer if i.layer is not None and layer is not None else 0) for i in inputs)
    return TensorPlan(
        name=output.name,
        section=section,
        layer=layer,
        dtype=_dtype_name(output.dtype),
        shape=tuple(output.shape),
        nbytes=math.prod(output.shape) * output.dtype.itemsize,
        shard=shard,
        signature=Signature(method, shifts, scale),
        parameters=params,
        inputs=tuple(inputs),
        row_blocks=parts,
        statistics_passes=_statistics_passes(root),
    )


def _statistics_passes(root: Task) -> int:
    """How many statistics passes a chunked merge makes before merging (0 for a plain one)."""
    state = getattr(root, "state", None)
    return getattr(state, "pass_index", -1) + 1


def _merge_root(task: Task) -> tuple[Task, float | None]:
    """The merge under any single-input wrappers (or the whole chain of a copied tensor), and a scale."""
    scale = task.factor if isinstance(task, ScaleTensor) else None
    probe = task
    while not isinstance(probe, (MergeTensor, LoadTensor)) and len(probe.dependencies()) == 1:
        probe = probe.dependencies()[0]
    return (probe if isinstance(probe, MergeTensor) else task), scale


def _first_load(task: Task) -> LoadTensor | None:
    """The first stored tensor a branch reads (through casts, cuts and other tasks)."""
    stack = [task]
    while stack:
        task = stack.pop()
        if isinstance(task, LoadTensor):
            return task
        stack.extend(reversed(task.dependencies()))
    return None


def layer_groups(tensors: Sequence[TensorPlan]) -> tuple[LayerGroup, ...]:
    """Runs of consecutive output layers with the same computation pattern."""
    per_layer: dict[int, dict[Signature, int]] = {}
    for tensor in tensors:
        if tensor.layer is not None:
            counts = per_layer.setdefault(tensor.layer, {})
            counts[tensor.signature] = counts.get(tensor.signature, 0) + 1
    groups: list[LayerGroup] = []
    for layer in sorted(per_layer):
        pattern = tuple(per_layer[layer].items())
        last = groups[-1] if groups else None
        if last is not None and last.last == layer - 1 and last.pattern == pattern:
            groups[-1] = LayerGroup(last.first, layer, pattern)
        else:
            groups.append(LayerGroup(layer, layer, pattern))
    return tuple(groups)


def _layer_span(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}–{last}"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
