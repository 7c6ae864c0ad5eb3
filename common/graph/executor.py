"""The executor: runs a plan's tasks with a small working set, overlapping read, compute and write.

Three kinds of work run side by side:

* reader threads execute ``LoadTensor`` tasks ahead of compute, in schedule order, while the
  bytes they hold stay under a prefetch budget (the load the compute loop is waiting for is
  always admitted, so a long-lived tensor can never starve it);
* the calling thread runs every other task in schedule order and frees each result as soon as
  its last consumer has run;
* one writer thread hands finished output tensors to the sink, behind a queue bounded in bytes;
* given a ``copier``, one more thread copies the outputs that are input bytes verbatim file to
  file (:mod:`mksuite.common.graph.direct`): those never enter the task graph or process memory.

On a GPU (``ctx.device`` is CUDA) the readers read every input that only GPU-side tasks use
straight into device memory, through pinned pieces on their own streams
(:mod:`mksuite.common.loading.device_reads`), and the writer copies finished outputs back on a stream
of its own once the compute stream has produced them: transfers overlap compute both ways.

Output bytes do not depend on the number of threads: tasks are pure, randomness comes from
per-tensor generators, and compute happens in a fixed order on one thread.
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

from mksuite.common.graph.direct import split_direct_copies
from mksuite.common.graph.events import ProgressEvent, ProgressListener
from mksuite.common.graph.memory import TRIM_EVERY_BYTES, configure_allocator, trim_freed_memory
from mksuite.common.graph.schedule import Schedule, build_schedule
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


class _ByteBudget:
    """A counting gate in bytes: acquire blocks while the budget is spent, unless forced."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()
        self.wanted_index = -1  # schedule position of the load the compute loop waits for
        self.cancelled = False

    def acquire(self, nbytes: int, index: int | None = None) -> bool:
        """Take ``nbytes``; a load at schedule position ``index`` the compute loop awaits never waits."""
        with self._cond:
            while not self.cancelled:
                forced = index is not None and index <= self.wanted_index
                if self.used == 0 or self.used + nbytes <= self.limit or forced:
                    self.used += nbytes
                    return True
                self._cond.wait()
            return False

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def want(self, index: int) -> None:
        with self._cond:
            if index > self.wanted_index:
                self.wanted_index = index
                self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()


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
    ):
        self.ctx = ctx
        self.threads = threads
        self.readers = max(1, readers)
        self.prefetch_bytes = prefetch_bytes
        self.write_queue_bytes = write_queue_bytes
        self.listener = listener
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
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return _Run(self, schedule, sink, copies, copier).go()
        finally:
            torch.set_num_threads(previous_threads)


class _Run:
    """State of one execution (kept apart so an Executor can be reused)."""

    def __init__(self, executor: Executor, schedule: Schedule, sink, copies=(), copier=None):
        self.ex = executor
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
        self.futures: dict[Task, Future] = {}
        self.futures_ready = threading.Condition()
        self.budget = _ByteBudget(executor.prefetch_bytes)
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
    def _writer(self, items: queue.Queue, budget: _ByteBudget) -> None:
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
        self.remaining[task] -= 1
        if self.remaining[task] == 0:
            value = self.values.pop(task, None)
            if task.is_io and isinstance(value, torch.Tensor):
                READ_BUFFERS.give(value)  # kept for the next read of its size if nothing else sees it
            del value
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
        write_budget = _ByteBudget(self.ex.write_queue_bytes)
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
        ctx = self.ex.ctx
        since_trim = 0
        for index, task in enumerate(self.schedule.order):
            if self.failure is not None:
                raise self.failure
            if task.is_io:
                self.values[task] = self._await_load(index, task)
            else:
                deps = task.dependencies()
                value = task.execute([self.values[d] for d in deps], ctx)
                self.values[task] = value
                for dep in deps:
                    self._release(dep)
            for output in self.schedule.outputs_at.get(index, ()):
                self._finish_output(output, self.values[task], writes, write_budget)
                self._release(task)
                since_trim += output.nbytes
            if since_trim >= TRIM_EVERY_BYTES:
                trim_freed_memory()
                since_trim = 0


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
