"""numba kernels behind :mod:`mkmerge.methods.sort_order`: torch's CPU sort and top-k, replayed.

torch sorts a CPU tensor with ``std::sort`` (``stable=False``) and picks ``topk`` with
``std::nth_element`` or ``std::partial_sort``, all from libstdc++, comparing values only. The
functions here run the same algorithms step for step (median-of-three pivot, unguarded Hoare
partition, heap fallback at depth 2·⌊log₂ n⌋, insertion sort below 16 or 3 elements), but
only down the segments that hold a boundary of interest, which makes them selections: O(n).

The array holds ``uint32`` words: an ordinary word is its key; a word ≥ :data:`ESCAPE` is the
``(word − ESCAPE)``-th *tracked* element, whose key is ``tracked_keys[word − ESCAPE]``. Only
tracked elements (those equal to a threshold) need an identity, so one word per element
carries both.
"""

from __future__ import annotations

import numba
import numpy as np

ESCAPE = np.uint32(1 << 31)
SORT_THRESHOLD = 16  # libstdc++ _S_threshold: introsort leaves smaller segments to insertion sort
SELECT_THRESHOLD = 3  # std::nth_element's insertion-sort size
_BLOCK = 128  # entries a partition examines per side before pairing its stoppers


@numba.njit(inline="always")
def _key(words, tracked_keys, position):
    word = words[position]
    if word >= ESCAPE:
        return np.int64(tracked_keys[word - ESCAPE])
    return np.int64(word)


@numba.njit(inline="always")
def _before(a, b, descending):
    """The comparator: ``a`` sorts strictly before ``b``."""
    return a > b if descending else a < b


@numba.njit(inline="always")
def _swap(words, i, j):
    words[i], words[j] = words[j], words[i]


@numba.njit(cache=True)
def _floor_log2(n):
    result = 0
    while n > 1:
        n >>= 1
        result += 1
    return result


@numba.njit(cache=True)
def _median_to_first(words, keys, descending, result, a, b, c):
    """``std::__move_median_to_first``: swap the median of a, b, c into ``result``."""
    ka, kb, kc = _key(words, keys, a), _key(words, keys, b), _key(words, keys, c)
    if _before(ka, kb, descending):
        if _before(kb, kc, descending):
            _swap(words, result, b)
        elif _before(ka, kc, descending):
            _swap(words, result, c)
        else:
            _swap(words, result, a)
    elif _before(ka, kc, descending):
        _swap(words, result, a)
    elif _before(kb, kc, descending):
        _swap(words, result, c)
    else:
        _swap(words, result, b)


@numba.njit(cache=True)
def median_to_first(four, keys, descending):
    """:func:`_median_to_first` on the words at (first, first+1, middle, last−1), gathered."""
    _median_to_first(four, keys, descending, 0, 1, 2, 3)


@numba.njit(cache=True)
def _partition_pivot(words, keys, descending, first, last):
    """``std::__unguarded_partition_pivot``: median of (first+1, middle, last−1) to ``first``,
    then Hoare's partition of ``[first+1, last)`` around it; returns the cut.

    Hoare's loop swaps the i-th entry from the left that may not stay left (a "left
    stopper") with the i-th from the right that may not stay right, until they cross at
    pair t; the cut is then the t-th left stopper, or the (t−1)-th right one if that comes
    first (the loop's own stop, on the entry swapped there). Both lists depend only on the
    entries before the crossing, so they are gathered a block at a time, branch-free, as in
    BlockQuicksort (Edelkamp & Weiß, 2016): the same swaps and cut, without a mispredicted
    branch per entry.
    """
    _median_to_first(words, keys, descending, first, first + 1, first + (last - first) // 2, last - 1)
    pivot = _key(words, keys, first)
    state = np.zeros(8, dtype=np.int64)
    state[NEXT_LEFT], state[NEXT_RIGHT], state[PREVIOUS_RIGHT] = first + 1, last - 1, -1
    stops = np.empty((2, _BLOCK), dtype=np.int64)
    partition_windows(
        words, 0, words, 0, pivot, keys, descending, first, last, state, stops[0], stops[1]
    )  # one window: done
    return state[CUT]


@numba.njit(cache=True)
def _insertion_sort(words, keys, descending, first, last):
    """``std::__insertion_sort`` (stable)."""
    for i in range(first + 1, last):
        word = words[i]
        key = _key(words, keys, i)
        if _before(key, _key(words, keys, first), descending):
            for j in range(i, first, -1):
                words[j] = words[j - 1]
            words[first] = word
        else:
            j = i
            while _before(key, _key(words, keys, j - 1), descending):
                words[j] = words[j - 1]
                j -= 1
            words[j] = word


@numba.njit(cache=True)
def _adjust_heap(words, keys, descending, first, hole, length, word):
    """``std::__adjust_heap`` then ``std::__push_heap``, on the heap at ``first``."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _before(_key(words, keys, first + child), _key(words, keys, first + child - 1), descending):
            child -= 1
        words[first + hole] = words[first + child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        words[first + hole] = words[first + child - 1]
        hole = child - 1
    key = np.int64(keys[word - ESCAPE]) if word >= ESCAPE else np.int64(word)
    parent = (hole - 1) // 2
    while hole > top and _before(_key(words, keys, first + parent), key, descending):
        words[first + hole] = words[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    words[first + hole] = word


@numba.njit(cache=True)
def _make_heap(words, keys, descending, first, last):
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(words, keys, descending, first, parent, length, words[first + parent])
        if parent == 0:
            return
        parent -= 1


@numba.njit(cache=True)
def _pop_heap(words, keys, descending, first, last, result):
    word = words[result]
    words[result] = words[first]
    _adjust_heap(words, keys, descending, first, 0, last - first, word)


@numba.njit(cache=True)
def _heap_select(words, keys, descending, first, middle, last):
    """``std::__heap_select``: ``[first, middle)`` ends up holding the ``middle − first`` first."""
    _make_heap(words, keys, descending, first, middle)
    for i in range(middle, last):
        if _before(_key(words, keys, i), _key(words, keys, first), descending):
            _pop_heap(words, keys, descending, first, middle, i)


@numba.njit(cache=True)
def _heap_sort(words, keys, descending, first, last):
    """``std::__partial_sort(first, last, last)``: make_heap, then sort_heap."""
    _heap_select(words, keys, descending, first, last, last)
    while last - first > 1:
        last -= 1
        _pop_heap(words, keys, descending, first, last, last)


@numba.njit(cache=True)
def _splits(boundaries, first, last):
    """Whether some boundary falls strictly inside ``[first, last)``."""
    for b in boundaries:
        if first < b < last:
            return True
    return False


@numba.njit(cache=True, nogil=True)
def sort_segments(words, keys, descending, boundaries, depth):
    """``std::sort`` of ``words``, carried out only where its result decides which elements
    land before each of ``boundaries`` (sorted positions). Segments that no boundary splits
    are left unsorted: their elements are all on one side either way. ``depth``: the
    introsort depth budget left (−1: a whole sort's, 2·⌊log₂ n⌋)."""
    n = words.size
    if n < 2:
        return
    stack = np.empty((boundaries.size + 1, 3), dtype=np.int64)  # disjoint segments, each split by a boundary
    stack[0, 0], stack[0, 1], stack[0, 2] = 0, n, 2 * _floor_log2(n) if depth < 0 else depth
    size = 1
    while size > 0:
        size -= 1
        first, last, depth = stack[size, 0], stack[size, 1], stack[size, 2]
        if not _splits(boundaries, first, last):
            continue
        while True:
            if last - first <= SORT_THRESHOLD:
                _insertion_sort(words, keys, descending, first, last)
                break
            if depth == 0:
                _heap_sort(words, keys, descending, first, last)
                break
            depth -= 1
            cut = _partition_pivot(words, keys, descending, first, last)
            if _splits(boundaries, cut, last):
                stack[size, 0], stack[size, 1], stack[size, 2] = cut, last, depth
                size += 1
            if not _splits(boundaries, first, cut):
                break
            last = cut


@numba.njit(cache=True, nogil=True)
def select_first(words, keys, k):
    """What ``torch.topk(largest=True)`` leaves in ``words[:k]``: ``std::partial_sort`` when
    ``64·k ≤ n``, else ``std::nth_element`` at ``k − 1`` (the order inside the first k does
    not change which elements they are)."""
    n = words.size
    if k <= 0 or k >= n:
        return
    if k * 64 <= n:
        _heap_select(words, keys, True, 0, k, n)
        return
    nth, first, last = k - 1, 0, n
    depth = 2 * _floor_log2(n)
    while last - first > SELECT_THRESHOLD:
        if depth == 0:
            _heap_select(words, keys, True, first, nth + 1, last)
            _swap(words, first, nth)
            return
        depth -= 1
        cut = _partition_pivot(words, keys, True, first, last)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(words, keys, True, first, last)


# partition_windows' state: where each side scans next, its gathered stoppers (count, used),
# the last right position swapped, and (when done) the cut.
NEXT_LEFT, NEXT_RIGHT, LEFT_COUNT, LEFT_USED, RIGHT_COUNT, RIGHT_USED, PREVIOUS_RIGHT, CUT = range(8)


@numba.njit(cache=True, nogil=True)
def partition_windows(
    left, left_base, right, right_base, pivot, keys, descending, first, last, state, left_stops, right_stops
):
    """:func:`_partition_pivot`'s partition (after the median step), resumable, on two windows
    of a bigger array: ``left`` holds positions from ``left_base``, ``right`` from
    ``right_base`` (they may be one array). ``state`` (see NEXT_LEFT…CUT) and the stopper
    buffers carry over between calls. Returns 0 when done (the cut in ``state[CUT]``), 1 when
    the left side needs a window holding ``[state[NEXT_LEFT], +_BLOCK)``, 2 when the right
    side needs one holding ``(state[NEXT_RIGHT] − _BLOCK, state[NEXT_RIGHT]]``."""
    next_left, next_right = state[NEXT_LEFT], state[NEXT_RIGHT]
    left_count, left_used = state[LEFT_COUNT], state[LEFT_USED]
    right_count, right_used = state[RIGHT_COUNT], state[RIGHT_USED]
    previous_right = state[PREVIOUS_RIGHT]
    status = 0
    while True:
        if left_used == left_count:
            left_count = left_used = 0
            while left_count == 0 and next_left < last:
                stop = min(next_left + _BLOCK, last)
                if next_left < left_base or stop > left_base + left.size:
                    status = 1
                    break
                for p in range(next_left, stop):
                    left_stops[left_count] = p
                    left_count += 0 if _before(_key(left, keys, p - left_base), pivot, descending) else 1
                next_left = stop
            if status:
                break
        if right_used == right_count:
            right_count = right_used = 0
            while right_count == 0 and next_right >= first:
                stop = max(next_right - _BLOCK, first - 1)
                if stop + 1 < right_base or next_right >= right_base + right.size:
                    status = 2
                    break
                for p in range(next_right, stop, -1):
                    right_stops[right_count] = p
                    right_count += 0 if _before(pivot, _key(right, keys, p - right_base), descending) else 1
                next_right = stop
            if status:
                break
        lo = left_stops[left_used] if left_used < left_count else last
        hi = right_stops[right_used]
        if lo >= hi:
            state[CUT] = lo if previous_right < 0 else min(lo, previous_right)
            break
        a, b = lo - left_base, hi - right_base
        left[a], right[b] = right[b], left[a]
        previous_right = hi
        left_used += 1
        right_used += 1
    state[NEXT_LEFT], state[NEXT_RIGHT] = next_left, next_right
    state[LEFT_COUNT], state[LEFT_USED] = left_count, left_used
    state[RIGHT_COUNT], state[RIGHT_USED] = right_count, right_used
    state[PREVIOUS_RIGHT] = previous_right
    return status


@numba.njit(cache=True, nogil=True)
def tracked_before(words, boundary, count):
    """Per tracked element (by number), whether it sits before ``boundary``."""
    before = np.zeros(count, dtype=np.bool_)
    for i in range(boundary):
        word = words[i]
        if word >= ESCAPE:
            before[word - ESCAPE] = True
    return before
