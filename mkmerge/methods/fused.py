"""Fused CPU kernels for the task-vector family on bfloat16: one pass per element, bit for bit.

The torch form of a TIES merge is some thirty whole-array operations per tensor (deltas,
magnitude keys, masks, weighting, the sign election's three sums, the division, the final
add), each a trip through memory and most a fresh temporary. Here each output element is
computed start to finish in registers by a numba kernel, so the merge costs about one read of
its inputs. (numba: a well-kept LLVM JIT for numeric Python, the only way to fuse these loops
without shipping a C extension; kernels are compiled once and cached on disk.)

Every intermediate is rounded exactly where the torch form rounds it: bfloat16 values are
widened to float32 (exact), each operation is done in float32 and rounded to bfloat16 to
nearest-even as torch does, and the sums over inputs accumulate in float32 from +0 in input
order, as ``torch.stack(...).sum(0)`` does for up to ``STREAMED_TERMS_MAX`` inputs. The tests
compare both forms bit for bit; the torch form stays the reference and serves every other
case (other dtypes, CUDA, more inputs, the other sparsifiers).

The kernels are vectorised loops that release the GIL; a tensor's element range is split
across torch's thread count (``--threads``) on a small thread pool. Every element depends on
that element alone, so the bits do not depend on the split. (numba's own parallel loops
measured slower here, their OpenMP threads competing with torch's.)
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None

# A range split across threads: pieces of at least this many elements, cut at multiples of _ALIGN.
_MIN_ELEMENTS_PER_THREAD = 1 << 18
_ALIGN = 4096
_NO_EQUAL, _ALL_EQUAL = 0, -1  # equal-key policies besides a positive count of firsts to keep
MODE_ALL, MODE_MAGNITUDE, MODE_MASK = 0, 1, 2


def available() -> bool:
    return numba is not None


@dataclass(frozen=True)
class InputRule:
    """How one input's delta is sparsified and scaled before the combine."""

    weight: float
    mode: int = MODE_ALL
    key: int = 0  # MODE_MAGNITUDE: keep keys above this ...
    equal: int = _ALL_EQUAL  # ... and of keys equal to it: all (-1), none (0), or the first n
    mask: np.ndarray | None = None  # MODE_MASK: bool keep-mask of the (flattened) tensor
    factor: float | None = None  # L1 rescale factor, applied after the mask


def applies(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """True when the fused kernels can merge these (bfloat16 CPU tensors, 1 to 4 inputs)."""
    return (
        numba is not None
        and base.dtype == torch.bfloat16
        and base.device.type == "cpu"
        and 1 <= len(tensors) <= 4
        and all(t.device.type == "cpu" and t.shape == base.shape for t in tensors)
    )


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).reshape(-1).numpy().view(np.uint16)


def delta_histograms(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per input, ``torch.bincount`` of the magnitude keys of its bfloat16 delta (65536 bins).

    Equal to ``bincount(_order_keys((t - base).abs()))`` for each input ``t``.
    """
    args = (_bits(base), tuple(_bits(t) for t in tensors))
    counts = sum(_in_parallel(lambda start, stop: _histograms(*args, start, stop), base.numel()))
    return [torch.from_numpy(counts[i]) for i in range(len(tensors))]


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
    (sparsify by ``rules``, weight, elect, sum, normalise, λ, add), fused, in bfloat16."""
    count = len(tensors)
    w_bf16 = torch.tensor([float(r.weight) for r in rules], dtype=torch.bfloat16)
    weights = w_bf16.to(torch.float32).numpy()
    divisor = float(w_bf16.sum())  # bfloat16 sum of bfloat16 weights, as the torch form
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
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    base_bits, input_bits = _bits(base), tuple(_bits(t) for t in tensors)
    out_bits = out.view(torch.int16).reshape(-1).numpy().view(np.uint16)
    rest = (factors, weights, masks.view(np.uint8), consensus, normalize, np.float32(lambda_),
            np.float32(divisor if normalize else 1.0), out_bits)  # fmt: skip
    ranges = _ranges(numel)
    policies = _range_policies(base_bits, input_bits, keys, equal, ranges)
    _map(lambda r: _merge(base_bits, input_bits, modes, keys, policies[r], *rest, *ranges[r]), range(len(ranges)))
    return out


def _range_policies(base_bits, input_bits, keys, equal, ranges) -> list[np.ndarray]:
    """Each range's equal-key policies, where the tensor is split into ``ranges``.

    Keeping "the first n entries on the threshold key" is a count along the whole tensor; the
    equal keys in each range (counted in parallel) tell every range how many of its own to keep.
    """
    partial = [i for i, e in enumerate(equal) if e > 0]
    if len(ranges) == 1 or not partial:
        return [equal] * len(ranges)
    counts = {i: _map(lambda span, i=i: _count_equal(base_bits, input_bits[i], keys[i], *span), ranges) for i in partial}
    policies = [equal.copy() for _ in ranges]
    for i in partial:
        remaining = int(equal[i])
        for r, here in enumerate(counts[i]):
            policies[r][i] = -1 if remaining >= here else max(0, remaining)
            remaining = max(0, remaining - here)
    return policies


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """:func:`~mkmerge.methods.linear.linear_merge` of bfloat16 tensors, fused (weights must not sum to 0)."""
    w_bf16 = torch.tensor([float(w) for w in weights], dtype=torch.bfloat16)
    out = torch.empty(tensors[0].shape, dtype=torch.bfloat16)
    args = (
        tuple(_bits(t) for t in tensors),
        w_bf16.to(torch.float32).numpy(),
        normalize,
        np.float32(float(w_bf16.sum())),
        out.view(torch.int16).reshape(-1).numpy().view(np.uint16),
    )
    _in_parallel(lambda start, stop: _linear(*args, start, stop), out.numel())
    return out


def mix(base: torch.Tensor, other: torch.Tensor, scale_base: float, scale_other: float) -> torch.Tensor:
    """``bf16(base·sa + other·sc)`` with float32 products and sum: slerp's final step, fused."""
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    args = (_bits(base), _bits(other), np.float32(scale_base), np.float32(scale_other), out.view(torch.int16).reshape(-1).numpy().view(np.uint16))
    _in_parallel(lambda start, stop: _mix(*args, start, stop), out.numel())
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
    """True when :func:`linear` and :func:`mix` take these: bfloat16 CPU tensors of one shape, at most 4."""
    return (
        numba is not None
        and 1 <= len(tensors) <= 4
        and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.shape == tensors[0].shape for t in tensors)
    )


if numba is not None:

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _bits_from_f32(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @numba.njit(inline="always")
    def _widen(bits):
        """bfloat16 bits -> float32 (exact)."""
        return _f32_from_bits(np.uint32(bits) << np.uint32(16))

    @numba.njit(inline="always")
    def _round(value):
        """float32 -> bfloat16 bits, to nearest even (NaN -> the quiet NaN 0x7FC0), as torch."""
        if value != value:
            return np.uint16(0x7FC0)
        u = np.int64(_bits_from_f32(value))
        return np.uint16(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)

    @numba.njit(cache=True, nogil=True)
    def _count_equal(base, tensor, key, start, stop):
        b, t = base[start:stop], tensor[start:stop]
        count = 0
        for j in range(b.size):
            count += np.int64(_round(_widen(t[j]) - _widen(b[j])) & 0x7FFF) == key
        return count

    @numba.njit(cache=True, nogil=True)
    def _histograms(base, inputs, start, stop):
        counts = np.zeros((len(inputs), 65536), dtype=np.int64)
        b = base[start:stop]
        i = 0
        for tensor in inputs:
            hist = counts[i]
            t = tensor[start:stop]
            for j in range(b.size):
                hist[_round(_widen(t[j]) - _widen(b[j])) & 0x7FFF] += 1
            i += 1
        return counts

    @numba.njit(inline="always")
    def _weighted(delta, keep, factor, weight):
        """ω = (δ·mask · rescale) · w, each product rounded to bfloat16, as float32.

        Without a rescale ``factor`` is 1, which changes no bits (a bfloat16 value times 1 is
        itself): one branch-free loop serves both cases."""
        kept = delta if keep else np.uint16(delta & 0x8000)  # a dropped entry: zero with δ's sign
        return _widen(_round(_widen(_round(_widen(kept) * factor)) * weight))

    @numba.njit(cache=True)
    def _weigh_threshold(tensor, widened, om, key, keep_equal, factor, weight):
        for j in range(tensor.size):
            delta = _round(_widen(tensor[j]) - widened[j])
            k = np.int64(delta & 0x7FFF)
            om[j] = _weighted(delta, (k > key) | (keep_equal & (k == key)), factor, weight)

    @numba.njit(cache=True)
    def _weigh(tensor, widened, om, mode, key, budget, factor, weight, mask):
        """ω of one input over one block (``tensor``, ``mask`` sliced to it); returns the equal
        keys still to keep. (Loops index slices from 0: an index with an offset gets numba's
        negative-index check, which stops LLVM from vectorising.)"""
        m = tensor.size
        if mode == 1 and budget > 0:  # the first `budget` entries with the threshold key, in order
            equal_here = 0
            for j in range(m):
                equal_here += np.int64(_round(_widen(tensor[j]) - widened[j]) & 0x7FFF) == key
            if equal_here <= budget:  # all of this block's are kept: no counting along it
                _weigh_threshold(tensor, widened, om, key, True, factor, weight)
                return budget - equal_here
            for j in range(m):
                delta = _round(_widen(tensor[j]) - widened[j])
                k = np.int64(delta & 0x7FFF)
                keep = k > key
                if k == key and budget > 0:
                    keep = True
                    budget -= 1
                om[j] = _weighted(delta, keep, factor, weight)
        elif mode == 1:
            _weigh_threshold(tensor, widened, om, key, budget < 0, factor, weight)
        elif mode == 2:
            for j in range(m):
                delta = _round(_widen(tensor[j]) - widened[j])
                om[j] = _weighted(delta, mask[j] != 0, factor, weight)
        else:
            for j in range(m):
                om[j] = _weighted(_round(_widen(tensor[j]) - widened[j]), True, factor, weight)
        return budget

    @numba.njit(cache=True)
    def _combine(omega, weights, widened, m, consensus, normalize, lam, divisor, total, positive, mixed_sum, weight_sum, out):
        count = omega.shape[0]
        for j in range(m):
            total[j] = 0.0
        for i in range(count):  # Σω from +0 in input order: torch's float32 accumulation of a stack sum
            for j in range(m):
                total[j] += omega[i, j]
        if consensus:
            for j in range(m):
                positive[j] = _widen(_round(total[j])) >= 0
                mixed_sum[j] = 0.0
                weight_sum[j] = 0.0
            for i in range(count):
                weight = weights[i]
                for j in range(m):
                    x = omega[i, j]
                    agree = (positive[j] & (x > 0)) | ((not positive[j]) & (x < 0))
                    mixed_sum[j] += x if agree else np.float32(0.0)  # adding +0 changes none of these sums
                    weight_sum[j] += weight if agree else np.float32(0.0)
            for j in range(m):
                # Unused steps divide or multiply by 1, which changes no bits: no branches.
                w = _widen(_round(weight_sum[j]))
                w = w if (normalize and w != 0) else np.float32(1.0)
                mixed = _widen(_round(_widen(_round(mixed_sum[j])) / w))
                out[j] = _round(widened[j] + _widen(_round(mixed * lam)))
        else:
            for j in range(m):
                mixed = _widen(_round(_widen(_round(total[j])) / divisor))
                out[j] = _round(widened[j] + _widen(_round(mixed * lam)))

    @numba.njit(cache=True, nogil=True)
    def _merge(base, inputs, modes, keys, equal, factors, weights, masks, consensus, normalize, lam, divisor, out, start, stop):
        # Blocks that stay in cache, each step its own simple loop, so LLVM vectorises them.
        n = stop
        count = len(inputs)
        size = 4096
        omega = np.empty((count, size), dtype=np.float32)
        widened = np.empty(size, dtype=np.float32)
        total = np.empty(size, dtype=np.float32)
        positive = np.empty(size, dtype=np.bool_)
        mixed_sum = np.empty(size, dtype=np.float32)
        weight_sum = np.empty(size, dtype=np.float32)
        budget = equal.copy()
        for lo in range(start, n, size):
            m = min(n, lo + size) - lo
            b = base[lo : lo + m]
            for j in range(m):
                widened[j] = _widen(b[j])
            i = 0
            for tensor in inputs:
                mask = masks[i, lo : lo + m] if modes[i] == 2 else masks[0, :0]
                budget[i] = _weigh(tensor[lo : lo + m], widened, omega[i], modes[i], keys[i], budget[i], factors[i], weights[i], mask)
                i += 1
            _combine(omega, weights, widened, m, consensus, normalize, lam, divisor, total, positive, mixed_sum, weight_sum, out[lo : lo + m])

    @numba.njit(cache=True)
    def _accumulate(tensor, weight, total):
        for j in range(tensor.size):
            total[j] += _widen(_round(_widen(tensor[j]) * weight))

    @numba.njit(cache=True, nogil=True)
    def _linear(inputs, weights, normalize, divisor, out, start, stop):
        n = stop
        size = 4096
        total = np.empty(size, dtype=np.float32)
        for lo in range(start, n, size):
            m = min(n, lo + size) - lo
            for j in range(m):
                total[j] = 0.0
            i = 0
            for tensor in inputs:
                _accumulate(tensor[lo : lo + m], weights[i], total)
                i += 1
            o = out[lo : lo + m]
            if normalize:
                for j in range(m):
                    o[j] = _round(_widen(_round(total[j])) / divisor)
            else:
                for j in range(m):
                    o[j] = _round(total[j])

    @numba.njit(cache=True, nogil=True)
    def _mix(base, other, scale_base, scale_other, out, start, stop):
        b, c, o = base[start:stop], other[start:stop], out[start:stop]
        for j in range(o.size):
            o[j] = _round(_widen(b[j]) * scale_base + _widen(c[j]) * scale_other)
