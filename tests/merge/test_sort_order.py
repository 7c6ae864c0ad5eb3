"""Selections that keep exactly the entries torch's CPU sort and top-k keep, ties included
(mkmerge/methods/sort_order.py). The reference is torch itself: argsort / topk on the values."""

import numpy as np
import pytest
import torch

from mkmerge.methods import sort_order
from mkmerge.methods.sort_order import ASCENDING, DESCENDING, TOPK, first_masks

pytestmark = pytest.mark.skipif(not sort_order.replayable(), reason="numba is not installed")


def torch_first(values: torch.Tensor, cut: int, order: str) -> torch.Tensor:
    flat = values.reshape(-1)
    if order == TOPK:
        chosen = torch.topk(flat, cut).indices
    else:
        chosen = torch.argsort(flat, descending=order == DESCENDING, stable=False)[:cut]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask.view(values.shape)


def tied_values(shape, levels: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Non-negative values from a handful of levels: nearly every cut falls among equal ones."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, levels, shape, generator=g).to(torch.float32) * 0.125).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("order", [DESCENDING, ASCENDING, TOPK])
def test_the_same_entries_as_torch_among_many_ties(dtype, order):
    for seed, (shape, levels) in enumerate([((5,), 2), ((17,), 3), ((40, 37), 5), ((5000,), 4), ((300, 700), 50)]):
        values = tied_values(shape, levels, dtype, seed)
        numel = values.numel()
        for cut in sorted({0, 1, 2, numel // 100, numel // 64, numel // 7, numel // 2, numel - 1, numel}):
            mask = first_masks(values, [cut], order)[0]
            assert mask.shape == values.shape and int(mask.sum()) == cut
            assert torch.equal(mask, torch_first(values, cut, order)), (shape, cut)


def test_a_cut_among_ties_is_not_simply_the_lowest_indices():
    values = tied_values((5000,), 3, torch.float32, 7)
    mask = first_masks(values, [2500], DESCENDING)[0]
    stable = torch.zeros(5000, dtype=torch.bool)
    stable[torch.argsort(values, descending=True, stable=True)[:2500]] = True
    assert torch.equal(mask, torch_first(values, 2500, DESCENDING))
    assert not torch.equal(mask, stable)  # the case the replay exists for


def test_two_cuts_of_one_sort_are_replayed_together():
    values = tied_values((200, 150), 6, torch.bfloat16, 3)
    for cuts in ([1000, 25000], [7000, 7001], [12345, 29000]):
        masks = first_masks(values, cuts, ASCENDING)
        for cut, mask in zip(cuts, masks):
            assert torch.equal(mask, torch_first(values, cut, ASCENDING)), cut


def test_float64_and_distinct_values_give_torchs_sets_too():
    g = torch.Generator().manual_seed(4)
    for values in (tied_values((3000,), 4, torch.float64, 1), torch.rand(3000, generator=g)):
        for order in (DESCENDING, ASCENDING, TOPK):
            assert torch.equal(first_masks(values, [1234], order)[0], torch_first(values, 1234, order))


# --- the depth budget: inputs built to exhaust it, so the heap fallbacks run on ties


def _introsort(less, n, nth=None, on_spent=lambda: None):
    """libstdc++'s std::sort (or std::nth_element at ``nth``) on the items 0..n-1 with the
    comparator ``less(x, y)``: only to drive the adversary below."""
    a = list(range(n))

    def lt(i, j):
        return less(a[i], a[j])

    def swap(i, j):
        a[i], a[j] = a[j], a[i]

    def partition(first, last):
        x, y, z = first + 1, first + (last - first) // 2, last - 1
        if lt(x, y):
            swap(first, y if lt(y, z) else z if lt(x, z) else x)
        else:
            swap(first, x if lt(x, z) else z if lt(y, z) else y)
        lo, hi = first + 1, last
        while True:
            while lt(lo, first):
                lo += 1
            hi -= 1
            while lt(first, hi):
                hi -= 1
            if lo >= hi:
                return lo
            swap(lo, hi)
            lo += 1

    def adjust(first, hole, length, item):
        top = child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if lt(first + child, first + child - 1):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and less(a[first + parent], item):
            a[first + hole] = a[first + parent]
            hole, parent = parent, (parent - 1) // 2
        a[first + hole] = item

    def heap_select(first, middle, last):
        for parent in range((middle - first - 2) // 2, -1, -1):
            adjust(first, parent, middle - first, a[first + parent])
        for i in range(middle, last):
            if lt(i, first):
                item, a[i] = a[i], a[first]
                adjust(first, 0, middle - first, item)

    depth = 2 * (n.bit_length() - 1)
    if nth is None:
        stack = [(0, n, depth)]
        while stack:
            first, last, depth = stack.pop()
            while last - first > 16:
                if depth == 0:
                    on_spent()
                    heap_select(first, last, last)
                    break
                depth -= 1
                cut = partition(first, last)
                stack.append((cut, last, depth))
                last = cut
    else:
        first, last = 0, n
        while last - first > 3:
            if depth == 0:
                on_spent()
                heap_select(first, nth + 1, last)
                return
            depth -= 1
            cut = partition(first, last)
            first, last = (cut, last) if cut <= nth else (first, cut)


def adversarial_values(n: int, nth: int | None = None) -> tuple[np.ndarray, bool]:
    """McIlroy's adversary ("A killer adversary for quicksort", 1999): values decided lazily
    as the sort compares them, so that median-of-three partitions keep degenerating. Once the
    depth budget is spent the undecided entries stay equal, so the heap phase sorts ties."""
    gas = n
    value = [gas] * n
    state = {"frozen": 0, "candidate": 0, "spent": False}

    def less(x, y):
        if not state["spent"]:
            if value[x] == gas and value[y] == gas:
                z = x if x == state["candidate"] else y
                value[z] = state["frozen"]
                state["frozen"] += 1
            if value[x] == gas:
                state["candidate"] = x
            elif value[y] == gas:
                state["candidate"] = y
        return value[x] < value[y]

    _introsort(less, n, nth, on_spent=lambda: state.update(spent=True))
    return np.array(value, dtype=np.float32), state["spent"]


@pytest.mark.parametrize("n", [300, 2000])
def test_the_heap_fallback_of_an_exhausted_depth_budget_breaks_ties_as_torch(n):
    values, spent = adversarial_values(n)
    assert spent and (values == n).sum() > n // 2  # the heap phase had many ties to order
    ascending = torch.from_numpy(values)
    descending = torch.from_numpy(n - values)  # the same comparisons, with the greater-than order
    for cut in (n // 3, n // 2, n - 5):
        assert torch.equal(first_masks(ascending, [cut], ASCENDING)[0], torch_first(ascending, cut, ASCENDING))
        assert torch.equal(first_masks(descending, [cut], DESCENDING)[0], torch_first(descending, cut, DESCENDING))


@pytest.mark.parametrize("n", [300, 2000])
def test_the_heap_fallback_of_nth_element_picks_torchs_top_k(n):
    for k in (n // 2, n // 3):
        values, spent = adversarial_values(n, nth=k - 1)
        assert spent and (values == n).sum() > n // 2
        largest = torch.from_numpy(n - values)  # topk takes the largest: reflect the order
        assert torch.equal(first_masks(largest, [k], TOPK)[0], torch_first(largest, k, TOPK))


# --- replay on disk (chunked tensors)


def test_the_replay_on_disk_keeps_the_same_entries_as_in_memory(monkeypatch):
    rng = np.random.default_rng(5)
    for trial in range(60):
        monkeypatch.setattr(sort_order, "RESIDENT_WORDS", int(rng.choice([20, 50, 200])))
        monkeypatch.setattr(sort_order, "WINDOW_WORDS", int(rng.choice([1, 2, 3, 7, 16])))
        n = int(rng.integers(30, 4000))
        values = torch.from_numpy(rng.integers(0, int(rng.choice([2, 4, 30])), n).astype(np.float32))
        cut = int(rng.integers(1, n))
        keys = sort_order.order_keys(values).numpy()
        threshold = sort_order.kth_largest_key(torch.from_numpy(keys), cut)
        spill = sort_order.Spill(n)
        head, tail = keys[: n // 3].copy(), keys[n // 3 :].copy()
        try:
            # chunks may arrive in any order; each numbers its tracked entries after those before it
            spill.write_keys(n // 3, tail, threshold, int((head == threshold).sum()))
            spill.write_keys(0, head, threshold, 0)
            kept = sort_order.replay_spilled(spill, threshold, cut, int((keys == threshold).sum()))
        finally:
            spill.close()
        mask = torch.from_numpy(keys > threshold)
        mask[torch.from_numpy(np.flatnonzero(keys == threshold)[kept])] = True
        assert torch.equal(mask, torch_first(values, cut, DESCENDING)), (trial, n, cut)
