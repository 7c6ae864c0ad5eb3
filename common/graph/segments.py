"""Segments: a schedule cut after each output's root, so several outputs can compute at once.

A segment is the run of tasks the schedule lays out for one output (or for the outputs that
share a root): the tasks after the previous segment's root up to its own. Its tasks depend
only on tasks of its own or of earlier segments, so segments started in schedule order on a
first-in-first-out pool always make progress, and results taken back in that order keep the
output files' order and bytes whatever the number of workers.

The window of segments in flight is bounded in bytes (inputs read for them plus the outputs
they produce), not in count: a few big row blocks or many small norm vectors, the memory in
flight stays about the same.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from mksuite.common.graph.schedule import Schedule

# Inputs plus outputs of the segments computing at once (always at least one segment).
DEFAULT_COMPUTE_WINDOW_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class Segment:
    start: int  # first position in the schedule's order
    stop: int  # one past the root: outputs_at[stop - 1] are this segment's outputs
    nbytes: int  # bytes it reads plus bytes it outputs


def split_segments(schedule: Schedule) -> list[Segment]:
    """The schedule's order cut after every position that roots an output."""
    segments = []
    start = 0
    load_bytes = dict.fromkeys(range(len(schedule.order)), 0)
    for index, task in schedule.loads:
        load_bytes[index] = getattr(task, "nbytes", 0)
    for index in sorted(schedule.outputs_at):
        reads = sum(load_bytes[i] for i in range(start, index + 1))
        writes = sum(output.nbytes for output in schedule.outputs_at[index])
        segments.append(Segment(start, index + 1, reads + writes))
        start = index + 1
    return segments


def run_in_window(
    segments: list[Segment],
    compute: Callable[[Segment], object],
    finish: Callable[[Segment, object], None],
    *,
    workers: int,
    window_bytes: int,
    abort: Callable[[BaseException], None],
) -> None:
    """``finish(segment, compute(segment))`` for every segment, in order; up to ``workers``
    computing at once while the segments started and not yet finished stay within
    ``window_bytes``. ``finish`` runs on the calling thread. On an error, ``abort(error)``
    tells the segments already started to stop; the error is raised once they have."""
    if workers <= 1:
        for segment in segments:
            finish(segment, compute(segment))
        return
    pending: deque[tuple[Segment, Future]] = deque()
    in_flight = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mk-compute")
    try:
        for segment in segments:
            while pending and in_flight + segment.nbytes > window_bytes:
                done, future = pending.popleft()
                finish(done, future.result())
                in_flight -= done.nbytes
            pending.append((segment, pool.submit(compute, segment)))
            in_flight += segment.nbytes
        while pending:
            done, future = pending.popleft()
            finish(done, future.result())
    except BaseException as error:
        abort(error)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
