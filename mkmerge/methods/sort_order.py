"""Which elements torch's CPU ``argsort`` and ``topk`` put first, found without sorting.

TIES keeps the k largest |δ|, breadcrumbs a band of the ascending order, SCE the k
highest variances. When several entries tie at the cut, *which* of them are kept is up to
the sort. mergekit takes them from ``torch.argsort(..., stable=False)`` and ``torch.topk``;
on the CPU those run libstdc++'s ``std::sort`` and ``std::nth_element`` /
``std::partial_sort``, which are deterministic, so the choice is reproducible, and
reproducing it is what makes our output the same bits as mergekit's.

A full sort costs O(n log n) and 12 bytes per element. Here:

1. the threshold value at each cut comes from a radix select (one or two histograms);
2. if every entry equal to it is kept, or none is, the mask follows at once (float32
   tensors, mostly);
3. otherwise the sort is replayed (:mod:`sort_order_kernels`) on one ``uint32`` word per
   element, only down the segments that contain a cut, which is O(n); only the entries
   equal to a threshold carry an identity.

Values must be non-negative (magnitudes, variances) so that their bit patterns order like
them. Without numba the same sets come from torch's own sort.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

_NUMBA = importlib.util.find_spec("numba") is not None

DESCENDING, ASCENDING, TOPK = "descending", "ascending", "topk"


def replayable() -> bool:
    """Whether the sort can be replayed (numba); otherwise torch sorts whole tensors."""
    return _NUMBA


def first_masks(values: torch.Tensor, cuts: Sequence[int], order: str) -> list[torch.Tensor]:
    """Per cut ``c``: the bool mask (``values``' shape) of the entries that
    ``torch.argsort(values.flatten(), descending=order == DESCENDING)[:c]`` holds, or
    ``torch.topk(values.flatten(), c).indices`` for ``order == TOPK`` (one cut)."""
    if order not in (DESCENDING, ASCENDING, TOPK):
        raise ValueError(f"unknown order {order!r}")
    if order == TOPK and len(cuts) != 1:
        raise ValueError("a top-k selection has exactly one cut")
    flat = values.reshape(-1)
    numel = flat.numel()
    masks: list[torch.Tensor | None] = [None] * len(cuts)
    pending: list[tuple[int, int, int, torch.Tensor]] = []  # (slot, cut, threshold key, mask so far)
    keys = order_keys(flat)
    for slot, cut in enumerate(cuts):
        if cut <= 0 or cut >= numel:
            masks[slot] = torch.full((numel,), cut > 0, dtype=torch.bool, device=flat.device)
            continue
        if keys is None or not _NUMBA:
            masks[slot] = _by_torch(flat, cut, order)
            continue
        rank = cut if order != ASCENDING else numel - cut + 1  # the threshold's rank from the top
        threshold = kth_largest_key(keys, rank)
        keep = keys < threshold if order == ASCENDING else keys > threshold
        equal = keys == threshold
        missing = cut - int(torch.count_nonzero(keep).item())
        if missing == int(torch.count_nonzero(equal).item()):
            masks[slot] = keep | equal
        elif missing == 0:
            masks[slot] = keep
        else:
            pending.append((slot, cut, threshold, keep))
    if pending:
        words, tracked_keys, positions = encode(keys.cpu().numpy(), [p[2] for p in pending])
        before = replay(words, tracked_keys, [p[1] for p in pending], order)
        for (slot, _, threshold, keep), first in zip(pending, before):
            chosen = positions[first & (tracked_keys == threshold)]
            keep[torch.from_numpy(chosen).to(keep.device)] = True
            masks[slot] = keep
    return [mask.view(values.shape) for mask in masks]


def encode(keys: np.ndarray, thresholds: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, tracked keys, tracked positions) for :func:`replay`: ``keys`` (int32 order keys
    of the whole tensor) as ``uint32`` words, the entries whose key is one of ``thresholds``
    escaped and numbered in index order."""
    from mkmerge.methods.sort_order_kernels import ESCAPE

    tracked = np.unique(np.asarray(thresholds, dtype=np.int32))
    positions = np.flatnonzero(np.isin(keys, tracked) if tracked.size > 1 else keys == tracked[0])
    tracked_keys = keys[positions].astype(np.uint32)
    words = keys.astype(np.uint32)
    words[positions] = ESCAPE + np.arange(positions.size, dtype=np.uint32)
    return words, tracked_keys, positions


def replay(words: np.ndarray, tracked_keys: np.ndarray, cuts: Sequence[int], order: str) -> list[np.ndarray]:
    """Run the sort (or top-k) on ``words`` in place as far as ``cuts`` need; per cut, a bool
    per tracked entry: whether the sort puts it before that cut."""
    from mkmerge.methods import sort_order_kernels as kernels

    ordered = np.unique(np.asarray(cuts, dtype=np.int64))
    if order == TOPK:
        kernels.select_first(words, tracked_keys, int(ordered[0]))
    else:
        kernels.sort_segments(words, tracked_keys, order == DESCENDING, ordered, -1)
    return [kernels.tracked_before(words, int(cut), tracked_keys.size) for cut in cuts]


def _by_torch(flat: torch.Tensor, cut: int, order: str) -> torch.Tensor:
    """The reference: torch's own CPU sort (float64 values, or no numba)."""
    host = flat.cpu()
    if order == TOPK:
        chosen = torch.topk(host, cut).indices
    else:
        chosen = torch.argsort(host, descending=order == DESCENDING, stable=False)[:cut]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask.to(flat.device)


def order_keys(flat: torch.Tensor) -> torch.Tensor | None:
    """int32 keys ordered like the (non-negative) values, or None where no cheap view exists."""
    if flat.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).to(torch.int32)
    if flat.dtype == torch.float32:
        return flat.view(torch.int32)
    return None


def kth_in_histogram(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest element, number of elements in higher bins)."""
    if counts.device.type == "cpu":  # numpy: ~30x faster than torch's flip on 65536 bins
        from_top = counts.numpy()[::-1].cumsum()
        position = int(np.searchsorted(from_top, k))
        above = int(from_top[position - 1]) if position else 0
        return counts.numel() - 1 - position, above
    from_top = counts.flip(0).cumsum(0)
    target = torch.tensor([k], dtype=from_top.dtype, device=from_top.device)  # same device: CUDA refuses a mix
    position = int(torch.searchsorted(from_top, target).item())
    above = int(from_top[position - 1].item()) if position else 0
    return counts.numel() - 1 - position, above


def kth_largest_key(keys: torch.Tensor, k: int) -> int:
    """The k-th largest of non-negative int32 keys by radix select on 16-bit digits."""
    if int(keys.max().item()) < 1 << 16:
        key, _ = kth_in_histogram(torch.bincount(keys, minlength=1 << 16), k)
        return key
    high = keys >> 16
    bucket, above = kth_in_histogram(torch.bincount(high, minlength=1 << 15), k)
    low = keys[high == bucket] & 0xFFFF
    digit, _ = kth_in_histogram(torch.bincount(low, minlength=1 << 16), k - above)
    return (bucket << 16) | digit


# --- tensors too big to hold their words: the same replay on disk


RESIDENT_WORDS = 1 << 23  # a segment this small (32 MiB of words) is replayed in memory
WINDOW_WORDS = 1 << 20  # each of the two windows a partition on disk works through


class Spill:
    """The words of one whole tensor (see :func:`encode`), in an unnamed scratch file, for
    :func:`replay_spilled`: a chunked tensor's are written chunk by chunk, from any thread
    (:meth:`write_keys`). Memory stays at a few windows whatever the tensor's size.
    ``directory``: where the file goes (None: the system's temporary directory)."""

    def __init__(self, numel: int, directory: Path | None = None):
        self.numel = numel
        self.file = tempfile.TemporaryFile(dir=directory)
        self.fd = self.file.fileno()

    def write(self, offset: int, keys: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(keys, dtype=np.int32)).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], (offset * 4) + done)

    def write_keys(self, offset: int, keys: np.ndarray, threshold: int, first_tracked: int) -> None:
        """One chunk's int32 order keys, from element ``offset``, as words: those equal to
        ``threshold`` escaped and numbered from ``first_tracked`` (how many the chunks
        before hold). ``keys`` is overwritten."""
        from mkmerge.methods.sort_order_kernels import ESCAPE

        words = keys.view(np.uint32)
        hits = np.flatnonzero(keys == threshold)
        words[hits] = ESCAPE + np.arange(first_tracked, first_tracked + hits.size, dtype=np.uint32)
        self.write(offset, words.view(np.int32))

    def read(self, start: int, stop: int) -> np.ndarray:
        words = np.empty(stop - start, dtype=np.uint32)
        view = memoryview(words).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], start * 4 + done)
            if got <= 0:
                raise OSError(f"scratch file ended at word {start + done // 4} of {self.numel}")
            done += got
        return words

    def close(self) -> None:
        self.file.close()


def replay_spilled(spill: Spill, threshold: int, cut: int, count: int) -> np.ndarray:
    """:func:`replay` of a descending sort with one cut, on the spilled words: per entry with
    the ``threshold`` key (``count`` of them, in index order), whether the sort puts it
    before ``cut``.

    Segments bigger than :data:`RESIDENT_WORDS` are partitioned on disk through two windows
    (:func:`sort_order_kernels.partition_windows`), exactly as in memory; the rest, and a
    segment that exhausts the depth budget (heap sort needs random access), in memory."""
    from mkmerge.methods import sort_order_kernels as kernels

    tracked_keys = np.full(count, threshold, dtype=np.uint32)
    first, last, depth = 0, spill.numel, 2 * (spill.numel.bit_length() - 1)
    before = np.zeros(count, dtype=np.bool_)
    while first < cut < last:
        if last - first <= RESIDENT_WORDS or depth == 0:
            words = spill.read(first, last)
            kernels.sort_segments(words, tracked_keys, True, np.array([cut - first], dtype=np.int64), depth)
            before |= kernels.tracked_before(words, cut - first, count)
            break
        depth -= 1
        middle = _partition_spilled(spill, first, last, tracked_keys)
        if cut < middle:
            last = middle
        else:
            first = middle
    for start in range(0, first, WINDOW_WORDS):  # everything left of the final segment
        before |= kernels.tracked_before(
            spill.read(start, min(first, start + WINDOW_WORDS)), min(first, start + WINDOW_WORDS) - start, count
        )
    return before


def _partition_spilled(spill: Spill, first: int, last: int, tracked_keys: np.ndarray) -> int:
    """``_partition_pivot`` of ``[first, last)`` in the file (descending); returns the cut.

    Two windows, one following each side's scan; when they would overlap, one window over
    everything still to be touched, grown if a scan runs past it. Each window is written
    back when it is replaced."""
    from mkmerge.methods import sort_order_kernels as kernels

    spots = [first, first + 1, first + (last - first) // 2, last - 1]
    four = np.array([spill.read(p, p + 1)[0] for p in spots], dtype=np.uint32)
    kernels.median_to_first(four, tracked_keys, True)
    for p, word in zip(spots, four):
        spill.write(p, np.array([word]).view(np.int32))
    pivot = int(tracked_keys[four[0] - kernels.ESCAPE]) if four[0] >= kernels.ESCAPE else int(four[0])
    state = np.zeros(8, dtype=np.int64)
    state[kernels.NEXT_LEFT], state[kernels.NEXT_RIGHT], state[kernels.PREVIOUS_RIGHT] = first + 1, last - 1, -1
    left_stops, right_stops = np.empty(kernels._BLOCK, dtype=np.int64), np.empty(kernels._BLOCK, dtype=np.int64)
    window = max(WINDOW_WORDS, 2 * kernels._BLOCK)  # a window holds a scan's whole block
    if last - first > 2 * window:
        left_base, left = first, spill.read(first, first + window)
        right_base, right = last - window, spill.read(last - window, last)
    else:
        left_base = right_base = first
        left = right = spill.read(first, last)
    while True:
        status = kernels.partition_windows(
            left, left_base, right, right_base, pivot, tracked_keys, True, first, last, state, left_stops, right_stops
        )
        if status == 0:
            break
        next_left, next_right = int(state[kernels.NEXT_LEFT]), int(state[kernels.NEXT_RIGHT])
        if right is not left and status == 1 and next_left + window <= right_base:
            spill.write(left_base, left.view(np.int32))
            left_base, left = next_left, spill.read(next_left, next_left + window)
            continue
        if right is not left and status == 2 and next_right + 1 - window >= left_base + left.size:
            spill.write(right_base, right.view(np.int32))
            right_base, right = next_right + 1 - window, spill.read(next_right + 1 - window, next_right + 1)
            continue
        # One window: from the lowest position still to be touched to the highest.
        pending = [next_left, next_right + 1 - kernels._BLOCK, next_right + 1, next_left + kernels._BLOCK]
        used, count = int(state[kernels.LEFT_USED]), int(state[kernels.LEFT_COUNT])
        if used < count:
            pending.append(int(left_stops[used]))
        used, count = int(state[kernels.RIGHT_USED]), int(state[kernels.RIGHT_COUNT])
        if used < count:
            pending.append(int(right_stops[used]) + 1)
        low, high = max(first, min(pending)), min(last, max(pending))
        if right is left:  # grow the one window
            low, high = min(low, left_base), max(high, left_base + left.size)
        spill.write(left_base, left.view(np.int32))
        if right is not left:
            spill.write(right_base, right.view(np.int32))
        left_base = right_base = low
        left = right = spill.read(low, high)
    spill.write(left_base, left.view(np.int32))
    if right is not left:
        spill.write(right_base, right.view(np.int32))
    return int(state[kernels.CUT])
