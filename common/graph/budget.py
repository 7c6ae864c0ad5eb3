"""A counting gate in bytes, for the executor's prefetch and write queue."""

from __future__ import annotations

import threading


class ByteBudget:
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
