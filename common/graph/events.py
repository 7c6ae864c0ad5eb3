"""Progress events: the engine reports, a view (rich, a test, nothing) subscribes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # "start" | "tensor_written" | "finish"
    name: str | None = None
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressListener = Callable[[ProgressEvent], None]
