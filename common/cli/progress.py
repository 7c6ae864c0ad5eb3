"""The progress view: engine events in, a labelled bar (terminal) or steady plain lines (log) out.

On a terminal: ``merging ━━━━━━━╸━━━ 120/219 tensors · 1.20/2.10 GB · 85 MB/s · elapsed 0:00:14 ·
remaining 0:00:10``, its first word the phase (planning, computing gates, merging, writing,
verifying). Elsewhere (a log file, CI, a notebook) one plain line per phase and one every 10%
of the bytes or every 30 s, whichever comes first.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mksuite.common.cli.running import err_console, print_err

if TYPE_CHECKING:
    from mksuite.common.graph.events import ProgressEvent

PLAIN_EVERY_FRACTION = 0.10
PLAIN_EVERY_SECONDS = 30.0


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count} B"


def _tenth(fraction: float) -> int:
    # the small epsilon keeps 0.3 in the third step, where 0.3 / 0.1 alone gives 2.999...
    return int(fraction / PLAIN_EVERY_FRACTION + 1e-9)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressView:
    """Subscribes to engine events; ``phase()`` names what the tool is doing; silent when quiet.

    ``label`` is the phase the computation runs under (``merging``, ``stacking``, ...); the
    view starts in ``planning`` and moves to ``writing`` once every tensor is written.
    """

    def __init__(self, label: str, quiet: bool, *, terminal: bool | None = None):
        self.quiet = quiet
        self.label = label
        self.terminal = err_console().is_terminal if terminal is None else terminal
        self.started = time.perf_counter()
        self.progress = None
        self.task_id = None
        self.current = "planning"
        self.totals = (0, 0)  # tensors, bytes
        self.last_line = (self.started, 0.0)  # time, fraction of the last plain line

    def __enter__(self) -> ProgressView:
        if not self.quiet and self.terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.fields[phase]}"),
                BarColumn(),
                TextColumn("{task.fields[tensors]} tensors · {task.fields[size]} · {task.fields[speed]} · elapsed"),
                TimeElapsedColumn(),
                TextColumn("· remaining"),
                TimeRemainingColumn(),
                console=err_console(),
                transient=False,
            )
            self.progress.__enter__()
            self.task_id = self.progress.add_task(
                self.current, total=None, phase=self.current, tensors="-", size="-", speed="-"
            )
        self._plain(f"{self.current}...")
        return self

    # -- events -----------------------------------------------------------------------------
    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        if event.kind == "phase":
            self.phase(event.name or "")
        elif event.kind == "start":
            self.totals = (event.tensors_total, event.bytes_total)
            self.started_computing = time.perf_counter()
            self.last_line = (self.started_computing, 0.0)  # the phase line just said 0%
            self.phase(self.label)
            self._update(event)
        elif event.kind in ("tensor_written", "finish"):
            self._update(event)
            if event.tensors_done >= event.tensors_total:
                self.phase("writing")

    def phase(self, name: str) -> None:
        """Show that the tool has moved on to ``name`` (e.g. ``computing gates``, ``verifying``)."""
        if self.quiet or name == self.current:
            return
        self.current = name
        if self.progress is not None:
            self.progress.update(self.task_id, phase=name)
        self._plain(f"{name}...")

    def _update(self, event: ProgressEvent) -> None:
        tensors = f"{event.tensors_done}/{event.tensors_total}"
        size = f"{human_bytes(event.bytes_done)} of {human_bytes(event.bytes_total)}"
        elapsed = time.perf_counter() - getattr(self, "started_computing", self.started)
        speed = f"{human_bytes(event.bytes_done / elapsed)}/s" if elapsed > 0 and event.bytes_done else "-"
        if self.progress is not None:
            self.progress.update(
                self.task_id,
                total=max(event.bytes_total, 1),
                completed=event.bytes_done,
                tensors=tensors,
                size=size,
                speed=speed,
            )
            return
        fraction = event.bytes_done / event.bytes_total if event.bytes_total else 1.0
        now = time.perf_counter()
        last_time, last_fraction = self.last_line
        step = _tenth(fraction) > _tenth(last_fraction)
        if step or now - last_time >= PLAIN_EVERY_SECONDS or (fraction >= 1.0 > last_fraction):
            remaining = elapsed * (1 - fraction) / fraction if fraction > 0 else None
            left = _clock(remaining) if remaining is not None else "?"
            self._plain(
                f"{self.current}: {fraction:.0%}, {tensors} tensors, {size}, "
                f"elapsed {_clock(elapsed)}, remaining {left}"
            )
            self.last_line = (now, fraction)

    def _plain(self, text: str) -> None:
        if not self.quiet and self.progress is None:
            print_err(text)

    # -- closing ----------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        if self.progress is None:
            return
        if exc_type is not None:
            # The interrupted bar is cleared, not left behind: ^C echoed onto its line would
            # otherwise make rich draw it a second time below.
            self.progress.live.transient = True
        self.progress.__exit__(exc_type, exc, tb)
        self.progress = None

    def summary(self, text: str) -> None:
        if not self.quiet:
            print_err(text)
