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

from mksuite.common.loading.device_reads import read_to_device, to_device
from mksuite.common.loading.source import byte_range, load_rows

if TYPE_CHECKING:
    from mksuite.common.graph.executor import ExecutionContext


class Task:
    """Base of all tasks. Subclasses are frozen dataclasses.

    ``device_inputs`` says where the task's inputs may live when the run computes on a GPU:
    ``"move"``: anywhere (the task moves them to the run's device itself); ``"follow"``:
    anywhere, and the result lives where the input did; ``""``: host memory only. The
    executor reads an input straight into GPU memory only when every use of it allows that.
    """

    device_inputs = ""

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
    rows: tuple[int, int] | None = None  # [start, stop) of the first axis; None: all of it
    # Which read of these bytes this is. A method that passes over a big tensor twice (once
    # for whole-tensor statistics, once to merge) reads it twice rather than keeping it.
    pass_index: int = 0
    # Which use of these bytes by different output tensors this is (a stacked model repeating
    # a layer): each use reads again, so a tensor is never held from one use to a far later one.
    occurrence: int = 0

    @property
    def is_io(self) -> bool:
        return True

    def execute(self, inputs, ctx):
        source = ctx.sources[self.model]
        if self.rows is None:
            return source.load(self.name)
        return load_rows(source, self.name, *self.rows)

    def execute_on(self, device: torch.device, ctx: ExecutionContext) -> torch.Tensor:
        """The tensor in ``device``'s memory: read there through pinned pieces where the
        file stores it as plain bytes, else loaded on the host and copied."""
        source = ctx.sources[self.model]
        where = byte_range(source, self.name, self.rows)
        if where is None:
            return to_device(self.execute([], ctx), device)
        info = source.info(self.name)
        shape = info.shape if self.rows is None else (self.rows[1] - self.rows[0], *info.shape[1:])
        return read_to_device(where, info.dtype, shape, device, name=self.name)

    def describe(self) -> str:
        where = f"[{self.rows[0]}:{self.rows[1]}]" if self.rows is not None else ""
        return f"{self.model}:{self.name}{where}"


@dataclass(frozen=True)
class CastTensor(Task):
    """Convert an input to a dtype (a no-op when it already has it)."""

    device_inputs = "follow"

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

    device_inputs = "follow"

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

    device_inputs = "follow"

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
    shape: tuple[int, ...]  # of the whole tensor
    task: Task
    # A part of the tensor: rows [start, stop) of the first axis. A big tensor may be
    # produced as several parts (row blocks), each written at its own offset.
    rows: tuple[int, int] | None = None

    @property
    def part_shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0], *self.shape[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of this output (of this part, for a part)."""
        count = 1
        for dim in self.part_shape:
            count *= dim
        return count * self.dtype.itemsize

    @property
    def key(self) -> tuple[str, tuple[int, int] | None]:
        return (self.name, self.rows)


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
