"""Tasks, the scheduler and the executor (eviction, devices, threads, progress events)."""

from common.graph.events import ProgressEvent, ProgressListener
from common.graph.executor import ExecutionContext, Executor, RunStats
from common.graph.schedule import Schedule, build_schedule
from common.graph.tasks import (
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
