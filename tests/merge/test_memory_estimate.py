"""The peak-memory model of mkmerge/memory_estimate.py on hand-sized plans.

How close the model comes to a real run's peak is tested in test_mkmerge_plan.py; here each
term is checked against the arithmetic its docstring states.
"""

from __future__ import annotations

import pytest
import torch

import mkmerge.methods.working_set as working_set
from mkmerge.memory_estimate import HEAP_BLOCK_LIMIT, current_rss_bytes, estimate_peak_memory
from mkmerge.methods import METHODS
from mkmerge.methods.working_set import SCRATCH_ELEMENTS
from mkmerge.tasks import MergeTensor
from mksuite.common.build import BuildOptions
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor
from mksuite.common.loading import TensorInfo


@pytest.fixture(autouse=True)
def torch_form_working_sets(monkeypatch):
    """The estimator's arithmetic is checked on the torch forms' working sets (the fused
    kernels' smaller ones are their own test)."""
    monkeypatch.setattr(working_set, "_fused_kernels", lambda: False)


F32 = torch.float32


def load(name: str, numel: int, dtype: torch.dtype = F32) -> LoadTensor:
    return LoadTensor("m", name, numel * dtype.itemsize)


def info_of(loads: list[LoadTensor], dtypes: dict[str, torch.dtype] | None = None):
    table = {}
    for task in loads:
        dtype = (dtypes or {}).get(task.name, F32)
        table[task.name] = TensorInfo(task.name, dtype, (task.nbytes // dtype.itemsize,))
    return lambda task: table[task.name]


def linear(*inputs, numel: int, dtype=F32) -> OutputTensor:
    task = MergeTensor(
        "linear", tuple(inputs), None, tuple(((("weight", 1.0),),) * len(inputs)), (("normalize", True),)
    )
    return OutputTensor(f"out{id(task)}", dtype, (numel,), task)


def test_peak_is_baseline_plus_inputs_prefetched_loads_and_working_set():
    a, b, c = load("a", 1000), load("b", 1000), load("c", 500)
    outputs = [linear(a, b, numel=1000), OutputTensor("c", F32, (500,), c)]
    estimate = estimate_peak_memory(
        outputs, info_of([a, b, c]), BuildOptions(prefetch_bytes=10_000, threads=1), baseline_bytes=100
    )
    working = 1000 * 4 + 6 * 1000 * 4  # the result, six float32 scratch buffers
    assert METHODS["linear"].working_set.copies == 1 and METHODS["linear"].working_set.scratch_buffers == 6
    assert estimate.peak_tensor == outputs[0].name
    assert (estimate.read_bytes, estimate.working_bytes, estimate.write_bytes) == (8000 + 2000, working, 0)
    assert estimate.peak_bytes == 100 + 10_000 + working


def test_read_window_is_capped_by_the_prefetch_budget_and_the_bytes_left_to_read():
    a, b, c = load("a", 1000), load("b", 1000), load("c", 500)
    outputs = [linear(a, b, numel=1000), OutputTensor("c", F32, (500,), c)]
    info = info_of([a, b, c])
    tight = estimate_peak_memory(outputs, info, BuildOptions(prefetch_bytes=9_000, threads=1), baseline_bytes=0)
    roomy = estimate_peak_memory(outputs, info, BuildOptions(prefetch_bytes=10**9, threads=1), baseline_bytes=0)
    assert tight.read_bytes == 8000  # c (2000 bytes) does not fit beside a and b
    assert roomy.read_bytes == 10_000  # everything there is, no more


def test_casts_feed_the_method_in_the_compute_dtype_and_out_dtype_costs_a_conversion():
    a, b = load("a", 1000, torch.bfloat16), load("b", 1000, torch.bfloat16)
    info = info_of([a, b], {"a": torch.bfloat16, "b": torch.bfloat16})
    output = linear(CastTensor(a, F32), CastTensor(b, F32), numel=1000, dtype=torch.bfloat16)
    estimate = estimate_peak_memory([output], info, BuildOptions(prefetch_bytes=0, threads=1), baseline_bytes=0)
    assert estimate.read_bytes == 2 * 1000 * 4  # float32 copies, the bfloat16 loads are released
    assert estimate.working_bytes == 1000 * 4 + 6 * 1000 * 4 + 1000 * 2


def test_small_blocks_freed_earlier_are_counted_as_retained_by_the_allocator():
    small = [load(f"s{i}", 1000) for i in range(4)]
    big_numel = HEAP_BLOCK_LIMIT // 4 + 1  # one float32 tensor above the heap limit
    big = load("big", big_numel)
    outputs = [linear(*small, numel=1000), OutputTensor("big", F32, (big_numel,), big)]
    estimate = estimate_peak_memory(
        outputs, info_of([*small, big]), BuildOptions(prefetch_bytes=0, threads=1), baseline_bytes=0
    )
    first = 4 * 4000 + 4000 + 6 * min(1000, SCRATCH_ELEMENTS) * 4
    assert estimate.peak_tensor == "big"
    assert estimate.retained_bytes == first - 4000  # all of it but the first output, now being written
    assert estimate.peak_bytes == big.nbytes + 4000 + estimate.retained_bytes


def two_linear_merges():
    a, b, c, d = (load(name, 1000) for name in "abcd")
    return [linear(a, b, numel=1000), linear(c, d, numel=1000)], info_of([a, b, c, d])


def test_each_compute_worker_holds_a_merge_of_its_own():
    """--threads 2: the second output merges beside the first when both fit in the window."""
    outputs, info = two_linear_merges()
    one_merge = 2 * 4000 + 4000 + 6 * 1000 * 4  # its inputs, its result, six float32 scratch buffers
    serial = estimate_peak_memory(outputs, info, BuildOptions(prefetch_bytes=10**6, threads=1), baseline_bytes=0)
    parallel = estimate_peak_memory(outputs, info, BuildOptions(prefetch_bytes=10**6, threads=2), baseline_bytes=0)
    assert (serial.compute_workers, parallel.compute_workers) == (1, 2)
    assert serial.peak_bytes == one_merge + 2 * 4000  # the second merge's inputs read ahead
    assert parallel.peak_bytes == 2 * one_merge
    assert (parallel.read_bytes, parallel.working_bytes) == (4 * 4000, 2 * (4000 + 6 * 1000 * 4))


def test_workers_add_nothing_beyond_the_compute_window_or_on_a_gpu():
    outputs, info = two_linear_merges()
    # Each output's segment reads 8000 bytes and writes 4000: two do not fit in a 20 000-byte window.
    tight = [
        estimate_peak_memory(outputs, info, BuildOptions(prefetch_bytes=20_000, threads=n), baseline_bytes=0)
        for n in (1, 2, 8)
    ]
    assert tight[0].peak_bytes == tight[1].peak_bytes == tight[2].peak_bytes
    gpu = estimate_peak_memory(
        outputs, info, BuildOptions(device=torch.device("cuda"), prefetch_bytes=10**6, threads=8), baseline_bytes=0
    )
    assert gpu.compute_workers == 1


def test_current_rss_is_the_size_of_a_process_with_torch_loaded():
    assert 50 * 1024**2 < current_rss_bytes() < 64 * 1024**3


def test_a_fused_linear_needs_only_its_result(monkeypatch):
    linear_set = METHODS["linear"].working_set
    monkeypatch.setattr(working_set, "_fused_kernels", lambda: True)
    assert linear_set.nbytes(1000, 8, 3, torch.float64) == 1000 * 8 + 6 * 1000 * 4  # no fused float64 kernel
    assert linear_set.nbytes(1000, 2, 3, torch.float16) == 1000 * 2
    assert linear_set.nbytes(1000, 2, 3, torch.bfloat16) == 1000 * 2
    assert linear_set.nbytes(1000, 4, 3, torch.float32) == 1000 * 4
    monkeypatch.setattr(working_set, "_fused_kernels", lambda: False)  # numba not installed
    assert linear_set.nbytes(1000, 4, 3, torch.float32) == 1000 * 4 + 6 * 1000 * 4


def test_a_fused_ties_needs_its_result_and_the_words_of_each_inputs_replay(monkeypatch):
    ties = METHODS["ties"].working_set
    monkeypatch.setattr(working_set, "_fused_kernels", lambda: True)
    for dtype, itemsize in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)):
        assert (
            ties.nbytes(1000, itemsize, 3, dtype) == 1000 * itemsize + 3 * 1000 * 4
        )  # uint32 words, whatever the dtype
