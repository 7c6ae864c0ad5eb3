"""Tasks, the scheduler and the executor (eviction, devices, threads, progress events)."""

from mksuite.common.graph.events import ProgressEvent, ProgressListener
from mksuite.common.graph.executor import ExecutionContext, Executor, RunStats
from mksuite.common.graph.schedule import Schedule, build_schedule
from mksuite.common.graph.tasks import (
    CastTensor,
    LoadTensor,
    OutputTensor,
    ScaleTensor,
    SliceRows,
    Task,
    frozen_params,
    tensor_seed,
)

__all__ = [
    "CastTensor",
    "ExecutionContext",
    "Executor",
    "LoadTensor",
    "OutputTensor",
    "ProgressEvent",
    "ProgressListener",
    "RunStats",
    "ScaleTensor",
    "Schedule",
    "SliceRows",
    "Task",
    "build_schedule",
    "frozen_params",
    "tensor_seed",
]
