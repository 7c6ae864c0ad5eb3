"""The few task types MoE assembly adds to the engine, and an in-memory tensor source.

Gate matrices are computed before the build (they need a forward pass of the base model), so
they reach the engine through :class:`MemorySource`, registered under :data:`GATES_SOURCE`:
plain ``LoadTensor`` tasks read them like any checkpoint tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mksuite.common.graph import Task, tensor_seed
from mksuite.common.loading import TensorInfo

GATES_SOURCE = "@gates"


@dataclass(frozen=True)
class AddNoise(Task):
    """Add N(0, std²) noise drawn from a generator seeded by (run seed, ``seed_name``, ``index``).

    The noise is drawn in float32 on the CPU, so the bytes do not depend on the device or on
    the order in which tensors are computed.
    """

    input: Task
    std: float
    seed_name: str
    index: int

    def dependencies(self):
        return (self.input,)

    def execute(self, inputs, ctx):
        (tensor,) = inputs
        generator = torch.Generator().manual_seed(tensor_seed(ctx.seed, self.seed_name, self.index))
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        return (tensor.float() + noise.to(tensor.device) * self.std).to(tensor.dtype)


@dataclass(frozen=True)
class ConcatRows(Task):
    """Concatenate matrices along their first dimension (gate rows, then up rows)."""

    parts: tuple[Task, ...]

    def dependencies(self):
        return self.parts

    def execute(self, inputs, ctx):
        return torch.cat(inputs, dim=0)


@dataclass(frozen=True)
class StackTensors(Task):
    """Stack same-shaped tensors along a new first dimension (one slice per expert)."""

    parts: tuple[Task, ...]

    def dependencies(self):
        return self.parts

    def execute(self, inputs, ctx):
        return torch.stack(inputs, dim=0)


@dataclass(frozen=True)
class PermuteRows(Task):
    """Reorder the first dimension: row i of the result is row ``order[i]`` of the input."""

    device_inputs = "follow"

    input: Task
    order: tuple[int, ...]

    def dependencies(self):
        return (self.input,)

    def execute(self, inputs, ctx):
        (tensor,) = inputs
        return tensor[torch.tensor(self.order, device=tensor.device)].contiguous()


@dataclass(frozen=True)
class ZerosTensor(Task):
    """A tensor of zeros (attention biases a Qwen2-MoE needs and a Llama base lacks)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def execute(self, inputs, ctx):
        return torch.zeros(self.shape, dtype=self.dtype)


class MemorySource:
    """A TensorSource over tensors already in memory (computed gate matrices)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors[name]
        return TensorInfo(name, tensor.dtype, tuple(tensor.shape))

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()  # callers own what they load

    def close(self) -> None:
        self._tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
