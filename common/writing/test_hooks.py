"""Deterministic fault points for tests and benchmarks, driven by environment variables.

Unset (always, in normal use) each hook is one dictionary lookup. They exist because a real
kill at "tensor 7 of 20" cannot be timed from outside without flaky sleeps.

* ``MKSUITE_TEST_KILL_AFTER=N``: SIGKILL this process right after the N-th tensor is journaled
  (journaling every tensor, so the kill point is exact).
* ``MKSUITE_TEST_PAUSE_AFTER=N:PATH``: after the N-th journaled tensor, create PATH and wait
  until a termination signal arrives (a run that is reliably "midway" for a signal test).
* ``MKSUITE_TEST_FLIP_BYTE=1``: flip one byte of the last weight file between writing and
  ``--verify`` (the verification must catch it).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_AFTER = "MKSUITE_TEST_KILL_AFTER"
PAUSE_AFTER = "MKSUITE_TEST_PAUSE_AFTER"
FLIP_BYTE = "MKSUITE_TEST_FLIP_BYTE"


def checkpoint_every_tensor() -> bool:
    return KILL_AFTER in os.environ or PAUSE_AFTER in os.environ


def after_journaled(count: int) -> None:
    """Called with the number of tensors journaled so far."""
    kill_after = os.environ.get(KILL_AFTER)
    if kill_after is not None and count >= int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_AFTER)
    if pause is not None:
        after, _, path = pause.partition(":")
        if count == int(after):
            from mksuite.common.faults import terminating

            Path(path).touch()
            while not terminating.wait(0.05):
                pass


def before_verify(directory: Path) -> None:
    if os.environ.get(FLIP_BYTE) != "1":
        return
    weights = sorted(Path(directory).glob("*.safetensors"))[-1]
    with open(weights, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0x01]))
