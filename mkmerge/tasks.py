"""The merge tasks: one method applied to one output tensor's inputs, whole or in chunks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mkmerge.methods import MethodCall, get_method
from mksuite.common.graph import Task, tensor_seed


@dataclass(frozen=True)
class _MethodTask(Task):
    """Fields and call building shared by the merge tasks.

    ``tensor_name`` is empty for deterministic methods so that identical merges of identical
    inputs (a stacked model repeating a layer) are one task; random methods carry the
    output name because it seeds their generators. ``label`` names the tensor in errors and
    does not take part in equality.
    """

    method: str
    inputs: tuple[Task, ...]
    base_index: int | None
    per_model: tuple[tuple[tuple[str, Any], ...], ...]  # aligned with inputs
    params: tuple[tuple[str, Any], ...]
    tensor_name: str = ""
    seed: int = 0
    # Chunks (row blocks) of a big tensor; see mkmerge/methods/chunked.py.
    chunk: int = 0
    offset: int = 0
    full_shape: tuple[int, ...] | None = None
    label: str = field(default="", compare=False)

    device_inputs = "move"

    def _call(self, inputs: list[torch.Tensor], ctx) -> MethodCall:
        device = ctx.device
        tensors = [t.to(device, non_blocking=True) if t.device != device else t for t in inputs]
        ordinary = [i for i in range(len(tensors)) if i != self.base_index]
        base = tensors[self.base_index] if self.base_index is not None else None
        base_params = dict(self.per_model[self.base_index]) if self.base_index is not None else {}

        def generator(i: int) -> torch.Generator:
            # Always a CPU generator: the same bits on every device (methods draw on the CPU).
            return torch.Generator().manual_seed(tensor_seed(self.seed, self.tensor_name, ordinary[i]))

        return MethodCall(
            tensors=tuple(tensors[i] for i in ordinary),
            base=base,
            per_model=tuple(dict(self.per_model[i]) for i in ordinary),
            base_params=base_params,
            params=dict(self.params),
            generator=generator,
            tensor_name=self.tensor_name or self.label,
            offset=self.offset,
            chunk=self.chunk,
            full_shape=self.full_shape,
            scratch_dir=ctx.scratch_dir,
        )


@dataclass(frozen=True)
class MergeTensor(_MethodTask):
    """Run merge method ``method`` on ``inputs`` (the base, if any, at ``base_index``).

    With ``state`` set, the inputs are one chunk of a bigger tensor and ``state`` is the task
    whose value holds the whole-tensor statistics the method's chunked form collected.
    """

    state: Task | None = None
    chunked: bool = False

    def dependencies(self) -> tuple[Task, ...]:
        return self.inputs + ((self.state,) if self.state is not None else ())

    def execute(self, inputs: list[torch.Tensor], ctx) -> torch.Tensor:
        method = get_method(self.method)
        if not self.chunked:
            return method.run(self._call(inputs, ctx))
        tensors = inputs[: len(self.inputs)]
        state = inputs[len(self.inputs)] if self.state is not None else None
        return method.merge_chunk(self._call(tensors, ctx), state)

    def describe(self) -> str:
        return f"{self.method}({len(self.inputs)} inputs)"


def _cached_hash(task: Task) -> int:
    """A frozen dataclass's field hash, computed once. The passes of a chunked merge nest
    (each pass's chunks hold the previous state, which holds every chunk of the pass before),
    so a hash recomputed on every call grows as chunks ** passes."""
    cached = task.__dict__.get("_hash")
    if cached is None:
        cached = hash((type(task).__name__, *(getattr(task, f.name) for f in fields(task) if f.compare)))
        object.__setattr__(task, "_hash", cached)
    return cached


@dataclass(frozen=True)
class ChunkStats(_MethodTask):
    """Statistics pass ``pass_index`` of a chunked merge over one chunk: a small partial."""

    pass_index: int = 0
    state: Task | None = None  # the state after the previous pass, if any

    __hash__ = _cached_hash

    def dependencies(self) -> tuple[Task, ...]:
        return self.inputs + ((self.state,) if self.state is not None else ())

    def execute(self, inputs, ctx):
        tensors = inputs[: len(self.inputs)]
        state = inputs[len(self.inputs)] if self.state is not None else None
        return get_method(self.method).chunk_stats(self.pass_index, self._call(tensors, ctx), state)


@dataclass(frozen=True)
class CombineStats(Task):
    """The state after pass ``pass_index``: every chunk's partial folded together, in row order."""

    method: str
    pass_index: int
    parts: tuple[ChunkStats, ...]
    state: Task | None = None

    __hash__ = _cached_hash

    def dependencies(self) -> tuple[Task, ...]:
        return self.parts + ((self.state,) if self.state is not None else ())

    def execute(self, inputs, ctx):
        partials = inputs[: len(self.parts)]
        state = inputs[len(self.parts)] if self.state is not None else None
        call = _parameters_only(self.parts[0], ctx)
        return get_method(self.method).combine_stats(self.pass_index, list(partials), state, call)


def _parameters_only(task: _MethodTask, ctx) -> MethodCall:
    """A call with the parameters of ``task`` and no tensors (what ``combine`` needs)."""
    ordinary = [i for i in range(len(task.per_model)) if i != task.base_index]
    return MethodCall(
        tensors=(),
        base=None,
        per_model=tuple(dict(task.per_model[i]) for i in ordinary),
        base_params=dict(task.per_model[task.base_index]) if task.base_index is not None else {},
        params=dict(task.params),
        generator=lambda i: torch.Generator(),
        tensor_name=task.tensor_name or task.label,
        full_shape=task.full_shape,
        scratch_dir=ctx.scratch_dir,
    )
