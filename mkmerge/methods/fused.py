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

The kernels run on the calling thread: vectorised, one pass is faster than torch's parallel
operations (measured: ~1 ns per element and input), and the other cores are left to the
reader and writer threads. (numba's own parallel loops measured slower here, their OpenMP
threads competing with torch's.) One thread also makes the bits independent of thread count
by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None

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
    counts = _histograms(_bits(base), tuple(_bits(t) for t in tensors))
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
    factors = np.array([r.factor if r.factor is not None else math.nan for r in rules], dtype=np.float32)
    masks = np.ones((count, numel if any(r.mode == MODE_MASK for r in rules) else 0), dtype=np.bool_)
    for i, rule in enumerate(rules):
        if rule.mode == MODE_MASK:
            masks[i] = rule.mask.reshape(-1)
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    _merge(
        _bits(base),
        tuple(_bits(t) for t in tensors),
        modes,
        keys,
        equal,
        factors,
        weights,
        masks.view(np.uint8),
        consensus,
        normalize,
        np.float32(lambda_),
        lambda_ != 1,
        np.float32(divisor),
        out.view(torch.int16).reshape(-1).numpy().view(np.uint16),
    )
    return out


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """:func:`~mkmerge.methods.linear.linear_merge` of bfloat16 tensors, fused (weights must not sum to 0)."""
    w_bf16 = torch.tensor([float(w) for w in weights], dtype=torch.bfloat16)
    out = torch.empty(tensors[0].shape, dtype=torch.bfloat16)
    _linear(
        tuple(_bits(t) for t in tensors),
        w_bf16.to(torch.float32).numpy(),
        normalize,
        np.float32(float(w_bf16.sum())),
        out.view(torch.int16).reshape(-1).numpy().view(np.uint16),
    )
    return out


def mix(base: torch.Tensor, other: torch.Tensor, scale_base: float, scale_other: float) -> torch.Tensor:
    """``bf16(base·sa + other·sc)`` with float32 products and sum: slerp's final step, fused."""
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    _mix(_bits(base), _bits(other), np.float32(scale_base), np.float32(scale_other), out.view(torch.int16).reshape(-1).numpy().view(np.uint16))
    return out


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

    @numba.njit(cache=True)
    def _histograms(base, inputs):
        counts = np.zeros((len(inputs), 65536), dtype=np.int64)
        i = 0
        for tensor in inputs:
            hist = counts[i]
            for j in range(base.size):
                hist[_round(_widen(tensor[j]) - _widen(base[j])) & 0x7FFF] += 1
            i += 1
        return counts

    @numba.njit(inline="always")
    def _weighted(delta, keep, factor, weight):
        """ω = (δ·mask [· rescale]) · w, each product rounded to bfloat16, as float32."""
        kept = delta if keep else np.uint16(delta & 0x8000)  # a dropped entry: zero with δ's sign
        if factor == factor:
            kept = _round(_widen(kept) * factor)
        return _widen(_round(_widen(kept) * weight))

    @numba.njit(cache=True)
    def _weigh(tensor, lo, widened, om, m, mode, key, budget, factor, weight, mask):
        """ω of one input over elements [lo, lo + m); returns the equal keys still to keep."""
        if mode == 1 and budget > 0:  # the first `budget` entries with the threshold key, in order
            for j in range(m):
                delta = _round(_widen(tensor[lo + j]) - widened[j])
                k = np.int64(delta & 0x7FFF)
                keep = k > key
                if k == key and budget > 0:
                    keep = True
                    budget -= 1
                om[j] = _weighted(delta, keep, factor, weight)
        elif mode == 1:
            keep_equal = budget < 0
            for j in range(m):
                delta = _round(_widen(tensor[lo + j]) - widened[j])
                k = np.int64(delta & 0x7FFF)
                om[j] = _weighted(delta, (k > key) | (keep_equal & (k == key)), factor, weight)
        elif mode == 2:
            for j in range(m):
                delta = _round(_widen(tensor[lo + j]) - widened[j])
                om[j] = _weighted(delta, mask[lo + j] != 0, factor, weight)
        else:
            for j in range(m):
                om[j] = _weighted(_round(_widen(tensor[lo + j]) - widened[j]), True, factor, weight)
        return budget

    @numba.njit(cache=True)
    def _combine(omega, weights, widened, m, consensus, normalize, lam, use_lam, divisor, total, positive, mixed_sum, weight_sum, out, lo):
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
                    agree = (x > 0) if positive[j] else (x < 0)
                    mixed_sum[j] += x if agree else np.float32(0.0)  # adding +0 changes none of these sums
                    weight_sum[j] += weight if agree else np.float32(0.0)
            for j in range(m):
                mixed = _round(mixed_sum[j])
                if normalize:
                    w = _widen(_round(weight_sum[j]))
                    mixed = _round(_widen(mixed) / (w if w != 0 else np.float32(1.0)))
                if use_lam:
                    mixed = _round(_widen(mixed) * lam)
                out[lo + j] = _round(widened[j] + _widen(mixed))
        else:
            for j in range(m):
                mixed = _round(total[j])
                if normalize:
                    mixed = _round(_widen(mixed) / divisor)
                if use_lam:
                    mixed = _round(_widen(mixed) * lam)
                out[lo + j] = _round(widened[j] + _widen(mixed))

    @numba.njit(cache=True)
    def _merge(base, inputs, modes, keys, equal, factors, weights, masks, consensus, normalize, lam, use_lam, divisor, out):
        # Blocks that stay in cache, each step its own simple loop, so LLVM vectorises them.
        n = base.size
        count = len(inputs)
        size = 4096
        omega = np.empty((count, size), dtype=np.float32)
        widened = np.empty(size, dtype=np.float32)
        total = np.empty(size, dtype=np.float32)
        positive = np.empty(size, dtype=np.bool_)
        mixed_sum = np.empty(size, dtype=np.float32)
        weight_sum = np.empty(size, dtype=np.float32)
        budget = equal.copy()
        for lo in range(0, n, size):
            m = min(n, lo + size) - lo
            for j in range(m):
                widened[j] = _widen(base[lo + j])
            i = 0
            for tensor in inputs:
                mask = masks[i] if modes[i] == 2 else masks[0, :0]
                budget[i] = _weigh(tensor, lo, widened, omega[i], m, modes[i], keys[i], budget[i], factors[i], weights[i], mask)
                i += 1
            _combine(omega, weights, widened, m, consensus, normalize, lam, use_lam, divisor, total, positive, mixed_sum, weight_sum, out, lo)

    @numba.njit(cache=True)
    def _accumulate(tensor, lo, m, weight, total):
        for j in range(m):
            total[j] += _widen(_round(_widen(tensor[lo + j]) * weight))

    @numba.njit(cache=True)
    def _linear(inputs, weights, normalize, divisor, out):
        n = out.size
        size = 4096
        total = np.empty(size, dtype=np.float32)
        for lo in range(0, n, size):
            m = min(n, lo + size) - lo
            for j in range(m):
                total[j] = 0.0
            i = 0
            for tensor in inputs:
                _accumulate(tensor, lo, m, weights[i], total)
                i += 1
            if normalize:
                for j in range(m):
                    out[lo + j] = _round(_widen(_round(total[j])) / divisor)
            else:
                for j in range(m):
                    out[lo + j] = _round(total[j])

    @numba.njit(cache=True)
    def _mix(base, other, scale_base, scale_other, out):
        for j in range(out.size):
            a = _widen(base[j]) * scale_base
            c = _widen(other[j]) * scale_other
            out[j] = _round(a + c)
