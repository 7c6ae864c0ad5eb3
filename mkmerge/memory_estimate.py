"""Predict a merge's peak resident memory from its plan, before any tensor is read.

The model follows how the executor spends memory (common/graph/executor.py) and adds up, for
each compute step C in schedule order (a merge of a tensor or of one row block, a statistics
pass over a row block, a tensor copied as it is), what is resident while C runs; the
prediction is the largest such sum:

    peak = baseline + max over C of (read(C) + working(C) + write(C) + retained(C))

On the CPU, ``--threads N`` runs N compute workers, each computing one output's segment of
the schedule (common/graph/segments.py); the segments in flight stay within the compute
window in bytes (their reads plus their outputs). So while C runs, up to N - 1 following
segments may compute beside it, as many as fit in the window with C's: each adds its
heaviest step's inputs and temporaries, and the read-ahead starts after their loads.

* **baseline** — the process before any tensor moves: Python, torch and the rest imported,
  the plan made. It is measured (:func:`current_rss_bytes`), never guessed.
* **read(C)** — tensors the reader threads hold: C's own inputs as the method receives them
  (after dtype casts and row cuts), plus the loads after C that fit in the prefetch budget
  (``BuildOptions.prefetch_bytes``). Readers run ahead of compute as long as reading is
  faster than merging (true for files in the page cache and for local SSDs), so the window
  is taken as full; it is capped by the bytes actually left to read.
* **working(C)** — temporaries of the computation: the method's :class:`WorkingSet` (whole
  tensors in the compute dtype, the result included; fixed-width temporaries per element
  such as float32 copies, int32 sort keys and bool masks; a few bounded float32 buffers),
  declared by each method (``MergeMethod.working_set``) from reading its code. Passthrough
  chains cost one copy per cast, scale or cut; a different ``out_dtype`` costs one more
  output-sized tensor.
* **write(C)** — the previous output tensor, handed to the writer thread while C is
  computed. Writes go to the page cache and keep pace with compute, so the write queue
  (``DEFAULT_WRITE_QUEUE_BYTES``) holds about one tensor; on a disk slower than the merge it
  fills up to its budget, and the prediction is low by at most that budget.

* **retained(C)** — freed memory the allocator has not given back. glibc serves blocks
  under 32 MiB from per-thread heaps and keeps them when freed, so bytes that were live in
  such blocks earlier (their high-water mark) still count when a later tensor lives in
  large, separately mapped blocks — up to 64 MiB per allocating thread (readers and
  each compute worker), beyond which a heap returns its free top. The executor's periodic
  ``malloc_trim`` gives some of it back earlier; this term ignores that and leans high.

Not modelled: heap fragmentation beyond that (measured on a 0.5B model merged in row blocks,
where every buffer is a heap block: 15-30% above the prediction, 25-45% with transparent huge
pages; it holds within 5% when glibc maps those blocks, ``MALLOC_MMAP_THRESHOLD_=1048576``),
idle buffers in the read pool (common/loading/buffers.py, at most 128 MiB), thread stacks, and
CUDA (with ``--device cuda`` the temporaries live on the GPU; the host still holds read and
write buffers). Row-block merges (mkmerge/methods/chunked.py) are steps like any other:
their working sets scale with the block, and each statistics pass is a step of its own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mkmerge.methods import get_method
from mkmerge.methods.working_set import DEFAULT_WORKING_SET, WorkingSet
from mkmerge.tasks import ChunkStats, MergeTensor
from mksuite.common.build import BuildOptions
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor, ScaleTensor, SliceRows, Task, build_schedule
from mksuite.common.graph.executor import DEFAULT_PREFETCH_BYTES, DEFAULT_WRITE_QUEUE_BYTES, compute_workers
from mksuite.common.graph.segments import DEFAULT_COMPUTE_WINDOW_BYTES, split_segments
from mksuite.common.loading import TensorInfo

# glibc serves blocks below its largest mmap threshold (32 MiB on 64-bit) from its heaps and
# keeps them after they are freed; larger blocks are mapped and unmapped on their own.
HEAP_BLOCK_LIMIT = 32 * 1024**2
# A heap gives its free top back only beyond the trim threshold (twice the mmap threshold),
# so each thread that allocates tensors (readers, compute) may keep up to this much.
RETAINED_PER_THREAD = 2 * HEAP_BLOCK_LIMIT


def working_set_of(method: str) -> WorkingSet:
    """The working set ``method`` declares; the cautious default where it declares none."""
    declared = get_method(method).working_set
    return declared if declared is not None else DEFAULT_WORKING_SET


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted peak and its parts, at the output tensor where the peak falls."""

    peak_bytes: int
    baseline_bytes: int
    read_bytes: int
    working_bytes: int
    write_bytes: int
    retained_bytes: int  # freed small blocks the allocator still holds (see HEAP_BLOCK_LIMIT)
    peak_tensor: str | None
    prefetch_bytes: int
    write_queue_bytes: int
    compute_workers: int = 1  # outputs computed at once (--threads on the CPU)


@dataclass(frozen=True)
class _Step:
    """One compute step: what it is fed, its temporaries, and the loads it reads."""

    segment: int
    fed: _Split
    working: _Split
    raw_bytes: int  # its loads as stored
    reads_through: int  # one past the schedule index of its last load

    @property
    def nbytes(self) -> int:
        return self.fed.total + self.working.total


@dataclass(frozen=True)
class _Value:
    """Size of a task's result: elements and dtype."""

    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Split:
    """Bytes in heap blocks (below HEAP_BLOCK_LIMIT) and in blocks of their own."""

    heap: int = 0
    mapped: int = 0

    @staticmethod
    def of(nbytes: int, block: int | None = None) -> _Split:
        """``nbytes`` held in blocks of ``block`` bytes (default: one block)."""
        in_heap = (nbytes if block is None else block) < HEAP_BLOCK_LIMIT
        return _Split(heap=nbytes) if in_heap else _Split(mapped=nbytes)

    def __add__(self, other: _Split) -> _Split:
        return _Split(self.heap + other.heap, self.mapped + other.mapped)

    @property
    def total(self) -> int:
        return self.heap + self.mapped


def estimate_peak_memory(
    outputs: Sequence[OutputTensor],
    tensor_info: Callable[[LoadTensor], TensorInfo],
    options: BuildOptions,
    *,
    baseline_bytes: int,
    write_queue_bytes: int = DEFAULT_WRITE_QUEUE_BYTES,
) -> MemoryEstimate:
    """Predict peak resident bytes of executing ``outputs`` (see the module docstring).

    The steps are taken in the executor's schedule order: every merge (or statistics pass
    over a row block) and every output copied without a merge. ``tensor_info(load)`` gives
    the stored dtype and shape of a load (from the headers). With several compute workers
    (``options.threads`` on the CPU), the segments that may compute beside a step count too.
    """
    prefetch = options.prefetch_bytes if options.prefetch_bytes is not None else DEFAULT_PREFETCH_BYTES
    workers = compute_workers(options.device, options.threads)
    schedule = build_schedule(outputs)
    loads = [task for _, task in schedule.loads]
    steps = _steps(schedule, outputs, tensor_info, loads)
    segments = split_segments(schedule)
    heaviest: dict[int, _Step] = {}
    for step in steps.values():
        if step.segment not in heaviest or step.nbytes > heaviest[step.segment].nbytes:
            heaviest[step.segment] = step
    window = min(DEFAULT_COMPUTE_WINDOW_BYTES, prefetch)  # as the executor bounds it
    roots = {output.task: output for output in outputs}
    best = MemoryEstimate(baseline_bytes, baseline_bytes, 0, 0, 0, 0, None, prefetch, write_queue_bytes, workers)
    write = _Split()
    heap_high_water = 0
    retain_limit = (max(1, options.readers) + workers) * RETAINED_PER_THREAD
    for position, task in enumerate(schedule.order):
        step = steps.get(position)
        if step is not None:
            beside = [heaviest[k] for k in _computing_beside(segments, step.segment, workers, window)]
            fed = sum((other.fed for other in beside), step.fed)
            working = sum((other.working for other in beside), step.working)
            raw = step.raw_bytes + sum(other.raw_bytes for other in beside)
            after = max([step.reads_through, *(other.reads_through for other in beside)])
            read = fed + _prefetched(loads, after, max(0, prefetch - raw))
            live = read + working + write
            retained = min(max(0, heap_high_water - live.heap), retain_limit)
            total = baseline_bytes + live.total + retained
            if total > best.peak_bytes:
                output = roots.get(task)
                name = output.name if output is not None else getattr(task, "label", None)
                best = MemoryEstimate(
                    total, baseline_bytes, read.total, working.total, write.total, retained,
                    name, prefetch, write_queue_bytes, workers,
                )  # fmt: skip
            heap_high_water = max(heap_high_water, live.heap)
        for finished in schedule.outputs_at.get(position, ()):
            write = _Split.of(finished.nbytes)
    return best


def _steps(schedule, outputs: Sequence[OutputTensor], tensor_info, loads: Sequence[LoadTensor]) -> dict[int, _Step]:
    """Schedule position -> the compute step there (merges, statistics passes, output roots)."""
    load_index = {task: i for i, task in enumerate(loads)}
    roots = {output.task: output for output in outputs}
    sizes: dict[Task, _Value] = {}
    steps: dict[int, _Step] = {}
    segment = 0
    for position, task in enumerate(schedule.order):
        output = roots.get(task)
        if isinstance(task, (MergeTensor, ChunkStats)) or output is not None:
            fed, working, own_loads = _step_cost(task, output, sizes, tensor_info)
            after = max((load_index[load] for load in own_loads), default=-1) + 1
            steps[position] = _Step(segment, fed, working, sum(load.nbytes for load in own_loads), after)
        if position in schedule.outputs_at:
            segment += 1  # a segment ends at each output root (common/graph/segments.py)
    return steps


def _computing_beside(segments, first: int, workers: int, window: int) -> range:
    """The segments after ``first`` that may compute while it does: up to ``workers - 1``,
    as long as all of them with ``first`` fit in the window (run_in_window's rule)."""
    in_flight = segments[first].nbytes if first < len(segments) else 0
    last = first
    while last + 1 < len(segments) and last + 1 < first + workers:
        if in_flight + segments[last + 1].nbytes > window:
            break
        in_flight += segments[last + 1].nbytes
        last += 1
    return range(first + 1, last + 1)


def _loads_of(root: Task) -> list[LoadTensor]:
    """The distinct loads under ``root``, in the order the scheduler reaches them."""
    found: dict[LoadTensor, None] = {}
    stack = [root]
    while stack:
        task = stack.pop()
        if isinstance(task, LoadTensor):
            found[task] = None
        stack.extend(reversed(task.dependencies()))
    return list(found)


def _prefetched(loads: Sequence[LoadTensor], start: int, budget: int) -> _Split:
    """Bytes of the loads from ``start`` on the readers take ahead, until the next does not fit."""
    held = _Split()
    for index in range(start, len(loads)):
        load = loads[index]
        if held.total + load.nbytes > budget:
            break
        held += _Split.of(load.nbytes)
    return held


def _step_cost(
    task: Task, output: OutputTensor | None, sizes: dict[Task, _Value], tensor_info
) -> tuple[_Split, _Split, list[LoadTensor]]:
    """(the inputs as the step receives them, its temporaries, the loads it reads)."""
    if isinstance(task, (MergeTensor, ChunkStats)):
        fed = [_size(branch, sizes, tensor_info) for branch in task.inputs]
        own_loads = [load for branch in task.inputs for load in _loads_of(branch)]
        result = fed[task.base_index if task.base_index is not None else 0]
        summands = len(fed) - (task.base_index is not None)
        working = working_set_of(task.method).nbytes(result.numel, result.dtype.itemsize, summands, result.dtype)
        block = result.nbytes
    else:
        own_loads = _loads_of(task)
        fed = [_size(load, sizes, tensor_info) for load in own_loads]
        result = _size(task, sizes, tensor_info)
        working, block = _chain_copies(task, sizes, tensor_info), result.nbytes
    if output is not None and result.dtype != output.dtype:
        working += output.nbytes  # the executor converts the result before handing it over
    inputs = sum((_Split.of(value.nbytes) for value in fed), _Split())
    return inputs, _Split.of(working, block), own_loads


def _chain_copies(task: Task, sizes: dict[Task, _Value], tensor_info) -> int:
    """Bytes of the new tensors a chain of casts, scales and cuts makes (a cast to the same dtype is free)."""
    total = 0
    while not isinstance(task, LoadTensor) and task.dependencies():
        source = task.dependencies()[0]
        produced, consumed = _size(task, sizes, tensor_info), _size(source, sizes, tensor_info)
        if not (isinstance(task, CastTensor) and produced.dtype == consumed.dtype):
            total += produced.nbytes
        task = source
    return total


def _size(task: Task, sizes: dict[Task, _Value], tensor_info) -> _Value:
    """Elements and dtype of ``task``'s result, from the headers (memoised in ``sizes``)."""
    if task in sizes:
        return sizes[task]
    if isinstance(task, LoadTensor):
        info = tensor_info(task)
        numel = info.numel
        if task.rows is not None:  # a row block
            numel = numel // info.shape[0] * (task.rows[1] - task.rows[0])
        value = _Value(numel, info.dtype)
    elif isinstance(task, CastTensor):
        value = _Value(_size(task.input, sizes, tensor_info).numel, task.dtype)
    elif isinstance(task, SliceRows):
        source = _size(task.input, sizes, tensor_info)
        rows = _leaf_rows(task.input, tensor_info)
        width = task.cols if task.cols is not None else (source.numel // rows if rows else 0)
        value = _Value(task.rows * width, source.dtype)
    elif isinstance(task, ScaleTensor):
        value = _size(task.input, sizes, tensor_info)
    else:  # a task kind this model does not know: as large as its largest input
        deps = [_size(dep, sizes, tensor_info) for dep in task.dependencies()]
        value = max(deps, key=lambda v: v.nbytes) if deps else _Value(0, torch.float32)
    sizes[task] = value
    return value


def _leaf_rows(task: Task, tensor_info) -> int:
    """Rows of the stored tensor under a chain of single-input tasks (0 when there is none)."""
    while not isinstance(task, LoadTensor):
        deps = task.dependencies()
        if not deps:
            return 0
        task = deps[0]
    shape = tensor_info(task).shape
    return shape[0] if shape else 0


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux /proc), else its peak so far (getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # Unix only; Linux takes the branch above

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
