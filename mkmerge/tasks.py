"""The merge task: one method applied to one output tensor's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from common.graph import Task, tensor_seed
from mkmerge.methods import MethodCall, get_method


@dataclass(frozen=True)
class MergeTensor(Task):
    """Run merge method ``method`` on ``inputs`` (the base, if any, at ``base_index``).

    ``tensor_name`` is empty for deterministic methods so that identical merges of identical
    inputs (a stacked model repeating a layer) are one task; random methods carry the
    output name because it seeds their generators. ``label`` names the output tensor in
    messages and takes no part in equality, so it does not stop that sharing.
    """

    method: str
    inputs: tuple[Task, ...]
    base_index: int | None
    per_model: tuple[tuple[tuple[str, Any], ...], ...]  # aligned with inputs
    params: tuple[tuple[str, Any], ...]
    tensor_name: str = ""
    seed: int = 0
    label: str = field(default="", compare=False)

    def dependencies(self) -> tuple[Task, ...]:
        return self.inputs

    def execute(self, inputs: list[torch.Tensor], ctx) -> torch.Tensor:
        device = ctx.device
        tensors = [t.to(device, non_blocking=True) if t.device != device else t for t in inputs]
        ordinary = [i for i in range(len(tensors)) if i != self.base_index]
        base = tensors[self.base_index] if self.base_index is not None else None
        base_params = dict(self.per_model[self.base_index]) if self.base_index is not None else {}

        def generator(i: int) -> torch.Generator:
            # Always a CPU generator: the same bits on every device (methods draw on the CPU).
            return torch.Generator().manual_seed(tensor_seed(self.seed, self.tensor_name, ordinary[i]))

        call = MethodCall(
            tensors=tuple(tensors[i] for i in ordinary),
            base=base,
            per_model=tuple(dict(self.per_model[i]) for i in ordinary),
            base_params=base_params,
            params=dict(self.params),
            generator=generator,
            tensor_name=self.label or self.tensor_name,
        )
        return get_method(self.method).run(call)

    def describe(self) -> str:
        return f"{self.method}({len(self.inputs)} inputs)"
