"""Tasks: small immutable values describing how one tensor is produced.

A task is a frozen dataclass, so two tasks with the same fields are equal and hash alike:
the scheduler computes each distinct task once, however many output tensors use it (a
stacked model that repeats a layer reads that layer once; a tied embedding is loaded once
for both names).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from common.graph.executor import ExecutionContext


class Task:
    """Base of all tasks. Subclasses are frozen dataclasses."""

    def dependencies(self) -> tuple[Task, ...]:
        return ()

    def execute(self, inputs: list[torch.Tensor], ctx: ExecutionContext) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define execute()")

    @property
    def is_io(self) -> bool:
        """True for tasks that only read files: they run on reader threads, ahead of compute."""
        return False

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class LoadTensor(Task):
    """Read one tensor from one model's files (by the name the file stores it under)."""

    model: str  # key into ExecutionContext.sources
    name: str
    nbytes: int = 0  # from the header; lets the reader budget memory before reading

    @property
    def is_io(self) -> bool:
        return True

    def execute(self, inputs, ctx):
        return ctx.sources[self.model].load(self.name)

    def describe(self) -> str:
        return f"{self.model}:{self.name}"


@dataclass(frozen=True)
class CastTensor(Task):
    """Convert an input to a dtype (a no-op when it already has it)."""

    input: Task
    dtype: torch.dtype

    def dependencies(self):
        return (self.input,)

    def execute(self, inputs, ctx):
        (tensor,) = inputs
        return tensor if tensor.dtype == self.dtype else tensor.to(self.dtype)


@dataclass(frozen=True)
class SliceRows(Task):
    """Keep the leading ``rows`` x ``cols`` block of a matrix (embedding sub-matrix rule)."""

    input: Task
    rows: int
    cols: int | None = None

    def dependencies(self):
        return (self.input,)

    def execute(self, inputs, ctx):
        (tensor,) = inputs
        view = tensor[: self.rows] if self.cols is None else tensor[: self.rows, : self.cols]
        return view.contiguous()


@dataclass(frozen=True)
class ScaleTensor(Task):
    """Multiply by a scalar in the tensor's own dtype."""

    input: Task
    factor: float

    def dependencies(self):
        return (self.input,)

    def execute(self, inputs, ctx):
        (tensor,) = inputs
        return tensor * self.factor


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output model: what it is called, what it looks like, what makes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    task: Task

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def tensor_seed(seed: int, tensor_name: str, input_index: int) -> int:
    """A 63-bit seed from (run seed, output tensor name, input index).

    Randomness drawn from a generator seeded this way does not depend on the order in which
    tensors are computed, the number of threads, or the device.
    """
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{input_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def frozen_params(params: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """A hashable, order-independent form of a parameter mapping (for task equality)."""
    return tuple(sorted((params or {}).items()))
