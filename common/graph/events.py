"""Progress events: the engine reports, a view (rich, a test, nothing) subscribes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    # "start" | "tensor_written" | "finish", or "phase": the tool moves on to the phase ``name``
    # ("computing gates", "verifying", ...). Tensors are the output's tensors, as the plan
    # counts them (a tensor written in row blocks counts once).
    kind: str
    name: str | None = None
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressListener = Callable[[ProgressEvent], None]
