"""Fused CPU kernels for the task-vector family, linear and slerp: one pass per element, bit for bit.

The torch form of a TIES merge is some thirty whole-array operations per tensor (deltas,
magnitude keys, masks, weighting, the sign election's three sums, the division, the final
add), each a trip through memory and most a fresh temporary. Here each output element is
computed start to finish in registers by a numba kernel, so the merge costs about one read of
its inputs. (numba: a well-kept LLVM JIT for numeric Python, the only way to fuse these loops
without shipping a C extension; kernels are compiled once and cached on disk.)

Every intermediate is rounded exactly where the torch form rounds it. For bfloat16 and
float16 (torch computes their element-wise ops in float32 and rounds each result), values
are widened to float32 (exact), each operation is done in float32 and rounded to the format
to nearest-even as torch does; float32 is float32 throughout. The sums over inputs
accumulate in float32 from +0 in input order, as ``torch.stack(...).sum(0)`` does for up to
``STREAMED_TERMS_MAX`` inputs. The tests compare both forms bit for bit; the torch form stays
the reference and serves every other case (float64, CUDA, more inputs, the other
sparsifiers).

The kernels are vectorised loops that release the GIL; a tensor's element range is split
across torch's thread count (``--threads``) on a small thread pool. Every element depends on
that element alone, so the bits do not depend on the split. (numba's own parallel loops
measured slower here, their OpenMP threads competing with torch's.)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

# numba is a dependency; a broken install without it still merges, in the torch form.
_NUMBA = importlib.util.find_spec("numba") is not None

# A range split across threads: pieces of at least this many elements, cut at multiples of _ALIGN.
_MIN_ELEMENTS_PER_THREAD = 1 << 18
_ALIGN = 4096
_NO_EQUAL, _ALL_EQUAL = 0, -1  # equal-key policies besides a positive count of firsts to keep
MODE_ALL, MODE_MAGNITUDE, MODE_MASK, MODE_LISTED = 0, 1, 2, 3
# The dtypes the kernels compute in. Half formats travel to numba as their bits: bfloat16 as
# uint16, float16 as int16 (numba has no float16 type; the view's type is the format's tag).
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    return _NUMBA


@dataclass(frozen=True)
class InputRule:
    """How one input's delta is sparsified and scaled before the combine."""

    weight: float
    mode: int = MODE_ALL
    key: int = 0  # MODE_MAGNITUDE: keep keys above this ...
    equal: int = _ALL_EQUAL  # ... and of keys equal to it: all (-1), none (0), or the first n
    mask: np.ndarray | None = None  # MODE_MASK: bool keep-mask of the (flattened) tensor
    factor: float | None = None  # L1 rescale factor, applied after the mask
    # MODE_LISTED: keep keys above ``key``; of the entries equal to it, those ``listed`` marks
    # (bool, one per equal entry of the whole tensor in index order); ``equal`` is then the
    # number in ``listed`` of the first equal entry of the tensor merged (a chunk's offset).
    listed: np.ndarray | None = None


def applies(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """True when the fused kernels can merge these (CPU tensors of a fused dtype, 1 to 4 inputs)."""
    return (
        _NUMBA
        and base.dtype in DTYPES
        and base.device.type == "cpu"
        and 1 <= len(tensors) <= 4
        and all(t.device.type == "cpu" and t.shape == base.shape for t in tensors)
    )


def _bits(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """The flattened tensor, converted to ``dtype`` (default: its own), as the kernels take it."""
    dtype = dtype or tensor.dtype
    flat = tensor.to(dtype).contiguous().reshape(-1)
    if dtype == torch.float32:
        return flat.numpy()
    return flat.view(torch.int16).numpy().view(np.uint16 if dtype == torch.bfloat16 else np.int16)


def key_bits(dtype: torch.dtype) -> int:
    """Bits of a magnitude key (see :func:`sort_order.order_keys`): 15, or 31 for float32."""
    return 31 if dtype == torch.float32 else 15


def delta_histograms(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], buckets: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Per input, ``torch.bincount`` of the magnitude keys of its delta (65536 bins).

    Equal to ``bincount(order_keys((t - base).abs()))`` for each input ``t`` in the half
    formats. float32 keys have 31 bits, counted as two 16-bit digits: without ``buckets``,
    the bincount of ``keys >> 16``; with them (one per input), of ``keys & 0xFFFF`` over
    the keys whose high digit is that input's bucket.
    """
    dtype = base.dtype
    shift = 16 if dtype == torch.float32 else 0
    chosen = np.array(buckets if buckets is not None else [-1] * len(tensors), dtype=np.int64)
    args = (_bits(base), tuple(_bits(t, dtype) for t in tensors), shift, chosen)
    counts = sum(_in_parallel(lambda start, stop: _kernels()._histograms(*args, start, stop), base.numel()))
    return [torch.from_numpy(counts[i]) for i in range(len(tensors))]


def delta_keys(base: torch.Tensor, tensor: torch.Tensor) -> np.ndarray:
    """int32 magnitude keys of the delta ``tensor − base`` (flattened): equal to
    ``order_keys((tensor − base).abs())``, without the delta or its magnitude in memory."""
    keys = np.empty(base.numel(), dtype=np.int32)
    base_bits, bits = _bits(base), _bits(tensor, base.dtype)
    _in_parallel(
        lambda start, stop: _kernels()._delta_keys(base_bits, bits, start, stop, keys[start:stop]), base.numel()
    )
    return keys


def delta_words(base: torch.Tensor, tensor: torch.Tensor, key: int) -> tuple[np.ndarray, int]:
    """(words, count): the delta's magnitude keys as :func:`sort_order.encode` would encode
    them with ``key`` tracked, in one pass on the calling thread; ``count`` tracked."""
    words = np.empty(base.numel(), dtype=np.uint32)
    count = _kernels()._delta_words(_bits(base), _bits(tensor, base.dtype), np.uint32(key), words)
    return words, int(count)


def delta_l1_partials(base: torch.Tensor, tensor: torch.Tensor, mask: np.ndarray) -> tuple[list[float], list[float]]:
    """``(l1_partials(δ), l1_partials(δ·mask))`` of the delta ``tensor − base`` in the base's
    dtype, the same numbers, from one pass and two reused float32 buffers instead of the
    delta, the masked delta and their widened copies (see :func:`reductions.l1_partials`)."""
    from mkmerge.methods.reductions import CHUNK, CHUNKS_PER_BLOCK, append_chunk_sums

    numel, span = base.numel(), CHUNK * CHUNKS_PER_BLOCK
    base_bits, bits, keep = _bits(base), _bits(tensor, base.dtype), mask.reshape(-1).view(np.uint8)
    before_buffer = np.empty(min(numel, span), dtype=np.float32)
    after_buffer = np.empty_like(before_buffer)
    before: list[float] = []
    after: list[float] = []
    for start in range(0, numel, span):
        stop = min(numel, start + span)
        b, a = before_buffer[: stop - start], after_buffer[: stop - start]
        _kernels()._delta_magnitudes(base_bits[start:stop], bits[start:stop], keep[start:stop], b, a)
        append_chunk_sums(before, torch.from_numpy(b))
        append_chunk_sums(after, torch.from_numpy(a))
    return before, after


def each_on_a_thread(function, items) -> list:
    """``[function(item) for item in items]``, the items spread over torch's thread count
    (functions whose work releases the GIL, and which do not use this pool themselves)."""
    items = list(items)
    if len(items) <= 1 or torch.get_num_threads() <= 1:
        return [function(item) for item in items]
    return list(_pool(min(len(items), torch.get_num_threads())).map(function, items))


def merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    rules: Sequence[InputRule],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """The task-vector merge of :func:`~mkmerge.methods.task_arithmetic.task_vector_merge`
    (sparsify by ``rules``, weight, elect, sum, normalise, λ, add), fused, in the base's dtype."""
    count, dtype = len(tensors), base.dtype
    w = torch.tensor([float(r.weight) for r in rules], dtype=dtype)
    weights = w.to(torch.float32).numpy()
    divisor = float(w.sum())  # the dtype's sum of the dtype's weights, as the torch form
    if abs(divisor) < 1e-8:
        divisor = 1.0
    numel = base.numel()
    modes = np.array([r.mode for r in rules], dtype=np.int64)
    keys = np.array([r.key for r in rules], dtype=np.int64)
    equal = np.array([r.equal for r in rules], dtype=np.int64)
    factors = np.array([r.factor if r.factor is not None else 1.0 for r in rules], dtype=np.float32)
    masks = np.ones((count, numel if any(r.mode == MODE_MASK for r in rules) else 0), dtype=np.bool_)
    for i, rule in enumerate(rules):
        if rule.mode == MODE_MASK:
            masks[i] = rule.mask.reshape(-1)
    listed = np.zeros((count, max((r.listed.size for r in rules if r.mode == MODE_LISTED), default=0)), dtype=np.uint8)
    for i, rule in enumerate(rules):
        if rule.mode == MODE_LISTED:
            listed[i, : rule.listed.size] = rule.listed
    out = torch.empty(base.shape, dtype=dtype)
    base_bits, input_bits = _bits(base), tuple(_bits(t, dtype) for t in tensors)
    out_bits = _bits(out)  # a view: the kernels write the result through it
    rest = (factors, weights, masks.view(np.uint8), listed, consensus, normalize, np.float32(lambda_),
            np.float32(divisor if normalize else 1.0), out_bits)  # fmt: skip
    ranges = _ranges(numel)
    policies = _range_policies(base_bits, input_bits, modes, keys, equal, ranges)
    _map(
        lambda r: _kernels()._merge(base_bits, input_bits, modes, keys, policies[r], *rest, *ranges[r]),
        range(len(ranges)),
    )
    return out


def _range_policies(base_bits, input_bits, modes, keys, equal, ranges) -> list[np.ndarray]:
    """Each range's equal-key policies, where the tensor is split into ``ranges``.

    Keeping "the first n entries on the threshold key", or the listed ones, depends on a
    count along the whole tensor; the equal keys in each range (counted in parallel) tell
    every range how many of its own to keep, or where in the list its own start.
    """
    counted = [i for i, e in enumerate(equal) if e > 0 or modes[i] == MODE_LISTED]
    if len(ranges) == 1 or not counted:
        return [equal] * len(ranges)
    counts = {
        i: _map(lambda span, i=i: _kernels()._count_equal(base_bits, input_bits[i], keys[i], *span), ranges)
        for i in counted
    }
    policies = [equal.copy() for _ in ranges]
    for i in counted:
        remaining = int(equal[i])
        for r, here in enumerate(counts[i]):
            if modes[i] == MODE_LISTED:
                policies[r][i] = remaining  # the number of this range's first equal entry
                remaining += here
            else:
                policies[r][i] = -1 if remaining >= here else max(0, remaining)
                remaining = max(0, remaining - here)
    return policies


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], divisor: float | None) -> torch.Tensor:
    """:func:`~mkmerge.methods.linear.linear_merge` of tensors of one fused dtype, fused.

    ``weights`` are float32 values; ``divisor`` (float32, non-zero) is the weight sum to
    normalise by, or None for the plain weighted sum.
    """
    dtype = tensors[0].dtype
    out = torch.empty(tensors[0].shape, dtype=dtype)
    args = (
        tuple(_bits(t) for t in tensors),
        np.asarray(weights, dtype=np.float32),
        divisor is not None,
        np.float32(1.0 if divisor is None else divisor),
        _bits(out),
    )
    _in_parallel(lambda start, stop: _kernels()._linear(*args, start, stop), out.numel())
    return out


def mix(base: torch.Tensor, other: torch.Tensor, scale_base: float, scale_other: float) -> torch.Tensor:
    """``base·sa + other·sc`` with float32 products and sum, rounded once to the base's
    dtype: slerp's final step, fused."""
    out = torch.empty(base.shape, dtype=base.dtype)
    args = (_bits(base), _bits(other, base.dtype), np.float32(scale_base), np.float32(scale_other), _bits(out))
    _in_parallel(lambda start, stop: _kernels()._mix(*args, start, stop), out.numel())
    return out


def _in_parallel(kernel, numel: int) -> list:
    """Run ``kernel(start, stop)`` over ``[0, numel)`` split across torch's thread count.

    The kernels release the GIL, and every element's result depends on that element alone,
    so the bits are the same however the range is split (histogram counts just add).
    """
    return _map(lambda span: kernel(*span), _ranges(numel))


def _ranges(numel: int) -> list[tuple[int, int]]:
    """``[0, numel)`` in one piece per thread (at most), cut at multiples of _ALIGN."""
    threads = min(torch.get_num_threads(), numel // _MIN_ELEMENTS_PER_THREAD)
    if threads <= 1:
        return [(0, numel)]
    step = -(-numel // threads // _ALIGN) * _ALIGN
    return [(start, min(numel, start + step)) for start in range(0, numel, step)]


def _map(function, items) -> list:
    items = list(items)
    if len(items) == 1:
        return [function(items[0])]
    return list(_pool(len(items)).map(function, items))


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mk-fused")


def linear_applies(tensors: Sequence[torch.Tensor]) -> bool:
    """True when :func:`linear` takes these: CPU tensors of one fused dtype and shape."""
    dtype = tensors[0].dtype if tensors else None
    return (
        _NUMBA
        and dtype in DTYPES
        and all(t.dtype == dtype and t.device.type == "cpu" and t.shape == tensors[0].shape for t in tensors)
    )


def mix_applies(tensors: Sequence[torch.Tensor]) -> bool:
    """True when :func:`mix` takes these: CPU tensors of one fused dtype and shape."""
    return linear_applies(tensors)


def _kernels():
    from mkmerge.methods import fused_kernels  # numba takes ~0.6 s to import: only when needed

    return fused_kernels
