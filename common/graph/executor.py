"""The executor: runs a plan's tasks with a small working set, overlapping read, compute and write.

Three kinds of work run side by side:

* reader threads execute ``LoadTensor`` tasks ahead of compute, in schedule order, while the
  bytes they hold stay under a prefetch budget (the load the compute loop is waiting for is
  always admitted, so a long-lived tensor can never starve it);
* compute workers run every other task, one output's tasks (a segment,
  :mod:`mksuite.common.graph.segments`) at a time each, several outputs at once on the CPU
  with ``threads`` > 1, and free each result as soon as its last consumer has run; finished
  outputs are taken back in schedule order;
* one writer thread hands finished output tensors to the sink, behind a queue bounded in bytes;
* given a ``copier``, one more thread copies the outputs that are input bytes verbatim file to
  file (:mod:`mksuite.common.graph.direct`): those never enter the task graph or process memory.

On a GPU (``ctx.device`` is CUDA) the readers read every input that only GPU-side tasks use
straight into device memory, through pinned pieces on their own streams
(:mod:`mksuite.common.loading.device_reads`), and the writer copies finished outputs back on a stream
of its own once the compute stream has produced them: transfers overlap compute both ways.

Output bytes do not depend on the number of threads: tasks are pure, randomness comes from
per-tensor generators, every output goes to the sink in schedule order, and every reduction's
order is fixed whatever the thread count (see :mod:`mkmerge.methods.reductions`).

On the CPU, ``threads`` workers each compute one output with one thread of their own: a merge
has hundreds of outputs, and each output's serial phases (statistics, thresholds, replays,
Python between kernels) then overlap with other outputs' kernels instead of idling the other
cores. On a GPU one worker feeds the device in order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mksuite.common.graph.budget import ByteBudget
from mksuite.common.graph.direct import split_direct_copies
from mksuite.common.graph.events import ProgressEvent, ProgressListener
from mksuite.common.graph.memory import TRIM_EVERY_BYTES, configure_allocator, trim_freed_memory
from mksuite.common.graph.schedule import Schedule, build_schedule
from mksuite.common.graph.segments import DEFAULT_COMPUTE_WINDOW_BYTES, Segment, run_in_window, split_segments
from mksuite.common.graph.tasks import OutputTensor, Task
from mksuite.common.loading.buffers import READ_BUFFERS
from mksuite.common.loading.device_reads import claim, to_host
from mksuite.common.loading.source import ByteRange

DEFAULT_PREFETCH_BYTES = 320 * 1024**2
DEFAULT_WRITE_QUEUE_BYTES = 192 * 1024**2


@dataclass
class ExecutionContext:
    """What tasks may consult while running: open tensor sources, the device, the run seed,
    and where scratch files go (the output's partial directory; None: the system's temp dir)."""

    sources: Mapping[str, object]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    scratch_dir: Path | None = None


@dataclass
class RunStats:
    tensors: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def compute_workers(device: torch.device | str, threads: int | None) -> int:
    """How many outputs compute at once: ``threads`` (default: torch's) on the CPU, one on a GPU."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, threads or torch.get_num_threads())


class Executor:
    """Runs output tensors' task graphs and streams results to a sink."""

    def __init__(
        self,
        ctx: ExecutionContext,
        *,
        threads: int | None = None,
        readers: int = 2,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
        write_queue_bytes: int = DEFAULT_WRITE_QUEUE_BYTES,
        listener: ProgressListener | None = None,
        device_reads: bool | None = None,
        compute_window_bytes: int = DEFAULT_COMPUTE_WINDOW_BYTES,
    ):
        self.ctx = ctx
        self.threads = threads
        self.readers = max(1, readers)
        self.prefetch_bytes = prefetch_bytes
        self.write_queue_bytes = write_queue_bytes
        self.listener = listener
        self.compute_window_bytes = compute_window_bytes
        # Read GPU-bound inputs straight to ctx.device; None: exactly when it is a CUDA device
        # (True elsewhere runs the same path with host pieces: how it is tested without a GPU).
        self.device_reads = ctx.device.type == "cuda" if device_reads is None else device_reads

    def run(
        self,
        outputs: Sequence[OutputTensor],
        sink: Callable[[OutputTensor, torch.Tensor], None],
        copier: Callable[[OutputTensor, ByteRange], None] | None = None,
    ) -> RunStats:
        """Produce every output; ``sink`` takes computed tensors, ``copier`` verbatim byte ranges.

        Without a ``copier`` every output is computed and goes through ``sink``.
        """
        copies: list[tuple[OutputTensor, ByteRange]] = []
        if copier is not None:
            copies, outputs = split_direct_copies(outputs, self.ctx.sources)
        schedule = build_schedule(outputs)
        configure_allocator()
        previous_threads = torch.get_num_threads()
        workers = self.compute_workers()
        if workers > 1:
            torch.set_num_threads(1)  # each worker computes on its own thread (see the module doc)
        elif self.threads:
            torch.set_num_threads(self.threads)
        try:
            return _Run(self, schedule, sink, copies, copier, workers).go()
        finally:
            torch.set_num_threads(previous_threads)

    def compute_workers(self) -> int:
        """How many outputs compute at once (:func:`compute_workers`)."""
        return compute_workers(self.ctx.device, self.threads)


class _Run:
    """State of one execution (kept apart so an Executor can be reused)."""

    def __init__(self, executor: Executor, schedule: Schedule, sink, copies=(), copier=None, workers: int = 1):
        self.ex = executor
        self.workers = workers
        self.schedule = schedule
        self.sink = sink
        self.copies = list(copies)
        self.copier = copier
        # Progress counts output tensors, as the plan and the file do: a tensor computed in
        # row blocks is done when its last block is written.
        self.parts_left = Counter(o.name for o in schedule.outputs) + Counter(o.name for o, _ in self.copies)
        self.tensors_total = len(self.parts_left)
        self.bytes_total = schedule.output_bytes + sum(output.nbytes for output, _ in self.copies)
        self.stats_lock = threading.Lock()
        self.remaining = dict(schedule.consumers)
        self.values: dict[Task, torch.Tensor] = {}
        self.values_ready = threading.Condition()  # guards values and remaining
        self.since_trim = 0
        self.futures: dict[Task, Future] = {}
        self.futures_ready = threading.Condition()
        self.budget = ByteBudget(executor.prefetch_bytes)
        self.held_bytes: dict[Task, int] = {}
        self.stats = RunStats()
        self.failure: BaseException | None = None
        self.to_device = device_loads(schedule) if executor.device_reads else frozenset()

    # -- reading ---------------------------------------------------------------------------
    def _prefetch(self, pool: ThreadPoolExecutor) -> None:
        for index, task in self.schedule.loads:
            nbytes = getattr(task, "nbytes", 0)
            if not self.budget.acquire(nbytes, index):
                return
            future = pool.submit(self._read, task)
            with self.futures_ready:
                self.futures[task] = future
                self.held_bytes[task] = nbytes
                self.futures_ready.notify_all()

    def _read(self, task: Task) -> torch.Tensor:
        ctx = self.ex.ctx
        if task in self.to_device:
            return task.execute_on(ctx.device, ctx)
        return task.execute([], ctx)

    def _await_load(self, index: int, task: Task) -> torch.Tensor:
        self.budget.want(index)
        with self.futures_ready:
            while task not in self.futures:
                if self.failure is not None:
                    raise self.failure
                self.futures_ready.wait(timeout=0.5)
            future = self.futures.pop(task)
        tensor = future.result()
        with self.stats_lock:
            self.stats.bytes_read += tensor.numel() * tensor.element_size()
        return claim(tensor)

    # -- writing ---------------------------------------------------------------------------
    def _writer(self, items: queue.Queue, budget: ByteBudget) -> None:
        while True:
            item = items.get()
            if item is None:
                return
            output, tensor, nbytes, ready = item
            try:
                if self.failure is None:
                    if tensor.device.type != "cpu":
                        tensor = to_host(tensor, ready)
                    self.sink(output, tensor)
                    self._written(output, nbytes)
            except BaseException as error:  # surfaced to the compute loop
                self.failure = error
                budget.cancel()
            finally:
                del tensor
                budget.release(nbytes)

    def _copy_verbatim(self) -> None:
        for output, where in self.copies:
            if self.failure is not None:
                return
            try:
                self.copier(output, where)
                with self.stats_lock:
                    self.stats.bytes_read += where.nbytes
                self._written(output, output.nbytes)
            except BaseException as error:  # surfaced to the compute loop
                self.failure = error
                self.budget.cancel()
                return

    def _written(self, output: OutputTensor, nbytes: int) -> None:
        with self.stats_lock:
            self.parts_left[output.name] -= 1
            self.stats.tensors += self.parts_left[output.name] == 0
            self.stats.bytes_written += nbytes
            event = ProgressEvent(
                kind="tensor_written",
                name=output.name,
                tensors_done=self.stats.tensors,
                tensors_total=self.tensors_total,
                bytes_done=self.stats.bytes_written,
                bytes_total=self.bytes_total,
            )
        if self.ex.listener is not None:
            self.ex.listener(event)

    # -- compute ---------------------------------------------------------------------------
    def _release(self, task: Task) -> None:
        with self.values_ready:
            self.remaining[task] -= 1
            if self.remaining[task] != 0:
                return
            value = self.values.pop(task, None)
        if task.is_io and isinstance(value, torch.Tensor):
            READ_BUFFERS.give(value)  # kept for the next read of its size if nothing else sees it
        del value
        with self.futures_ready:
            nbytes = self.held_bytes.pop(task, 0)
        if nbytes:
            self.budget.release(nbytes)

    def _finish_output(self, output: OutputTensor, tensor: torch.Tensor, writes, write_budget) -> None:
        if tensor.dtype != output.dtype:
            tensor = tensor.to(output.dtype)
        tensor = tensor.contiguous()
        ready = None
        if tensor.is_cuda:  # the writer copies it to the host once the compute stream is past it
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(tensor.device))
        elif tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tuple(tensor.shape) != tuple(output.part_shape):
            raise RuntimeError(
                f"internal error: {output.name} planned as {list(output.part_shape)} "
                f"but computed as {list(tensor.shape)}"
            )
        nbytes = output.nbytes
        write_budget.acquire(nbytes)
        if self.failure is not None:
            raise self.failure
        writes.put((output, tensor, nbytes, ready))

    def go(self) -> RunStats:
        started = time.perf_counter()
        listener = self.ex.listener
        if listener is not None:
            listener(
                ProgressEvent(
                    kind="start",
                    tensors_total=self.tensors_total,
                    bytes_total=self.bytes_total,
                )
            )
        write_budget = ByteBudget(self.ex.write_queue_bytes)
        writes: queue.Queue = queue.Queue()
        writer = threading.Thread(target=self._writer, args=(writes, write_budget), daemon=True)
        writer.start()
        pool = ThreadPoolExecutor(max_workers=self.ex.readers, thread_name_prefix="mk-read")
        prefetcher = threading.Thread(target=self._prefetch, args=(pool,), daemon=True)
        prefetcher.start()
        copier = threading.Thread(target=self._copy_verbatim, daemon=True, name="mk-copy")
        copier.start()
        try:
            self._compute(writes, write_budget)
            copier.join()
        except BaseException as error:
            self.failure = self.failure or error
            raise
        finally:
            self.budget.cancel()
            writes.put(None)
            writer.join()
            copier.join()
            prefetcher.join()
            pool.shutdown(wait=True, cancel_futures=True)
            self.values.clear()
            READ_BUFFERS.clear()  # idle read buffers are for this run's repeating sizes only
        if self.failure is not None:
            raise self.failure
        self.stats.seconds = time.perf_counter() - started
        if listener is not None:
            listener(
                ProgressEvent(
                    kind="finish",
                    tensors_done=self.stats.tensors,
                    tensors_total=self.tensors_total,
                    bytes_done=self.stats.bytes_written,
                    bytes_total=self.bytes_total,
                )
            )
        return self.stats

    def _compute(self, writes, write_budget) -> None:
        def finish(segment: Segment, _) -> None:
            root = self.schedule.order[segment.stop - 1]
            for output in self.schedule.outputs_at[segment.stop - 1]:
                self._finish_output(output, self._value(root), writes, write_budget)
                self._release(root)
                self.since_trim += output.nbytes
            if self.since_trim >= TRIM_EVERY_BYTES:
                trim_freed_memory()
                self.since_trim = 0

        run_in_window(
            split_segments(self.schedule),
            self._run_segment,
            finish,
            workers=self.workers,
            # Segments' reads come out of the prefetch budget: a wider window would only force
            # reads past it.
            window_bytes=min(self.ex.compute_window_bytes, self.ex.prefetch_bytes),
            abort=self._abort,
        )

    def _run_segment(self, segment: Segment) -> None:
        ctx = self.ex.ctx
        for index in range(segment.start, segment.stop):
            if self.failure is not None:
                raise self.failure
            task = self.schedule.order[index]
            if task.is_io:
                value = self._await_load(index, task)
            else:
                deps = task.dependencies()
                value = task.execute([self._value(d) for d in deps], ctx)
            with self.values_ready:
                self.values[task] = value
                self.values_ready.notify_all()
            del value
            if not task.is_io:
                for dep in deps:
                    self._release(dep)

    def _value(self, task: Task) -> torch.Tensor:
        """A computed task's value; one an earlier segment computes on another worker is waited for."""
        with self.values_ready:
            while task not in self.values:
                if self.failure is not None:
                    raise self.failure
                self.values_ready.wait(timeout=0.5)
            return self.values[task]

    def _abort(self, error: BaseException) -> None:
        self.failure = self.failure or error
        self.budget.cancel()
        with self.values_ready:
            self.values_ready.notify_all()


def device_loads(schedule: Schedule) -> frozenset[Task]:
    """The reads whose every use may take a tensor in GPU memory (see ``Task.device_inputs``).

    A use by a task that moves its inputs to the device itself qualifies; a use by a task
    whose result follows its input's device qualifies if all of that task's uses do; output
    roots qualify (the writer copies results back). Anything else keeps the read on the host.
    """
    users: dict[Task, list[Task]] = {}
    for task in schedule.order:
        for dep in task.dependencies():
            users.setdefault(dep, []).append(task)
    allowed: dict[Task, bool] = {}
    for task in reversed(schedule.order):  # every user comes later in the order
        allowed[task] = all(
            user.device_inputs == "move" or (user.device_inputs == "follow" and allowed[user])
            for user in users.get(task, ())
        )
    return frozenset(task for _, task in schedule.loads if allowed[task] and hasattr(task, "execute_on"))
