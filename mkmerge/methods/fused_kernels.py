"""The numba kernels behind :mod:`mkmerge.methods.fused` (imported on first use: numba takes
~0.6 s to import, which runs that never fuse anything should not pay).

bfloat16 values travel as their uint16 bits; :func:`_widen` and :func:`_round` convert to and
from float32 exactly as torch does (round to nearest even, NaN to the quiet NaN).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from mkmerge.methods.sort_order_kernels import ESCAPE


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


@intrinsic
def _fma(typingctx, a, b, c):
    """``a·b + c`` in float32 with one rounding (llvm.fma: one instruction where the CPU has FMA)."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


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
def _delta_words(base, tensor, key, out):
    """:func:`_delta_keys` as the words of :mod:`sort_order_kernels`: entries on ``key``
    escaped and numbered in index order; returns how many there are."""
    count = 0
    for j in range(base.size):
        k = np.uint32(_round(_widen(tensor[j]) - _widen(base[j])) & 0x7FFF)
        if k == key:
            out[j] = ESCAPE + np.uint32(count)
            count += 1
        else:
            out[j] = k
    return count


@numba.njit(cache=True, nogil=True)
def _delta_keys(base, tensor, start, stop, out):
    """The magnitude keys of the bfloat16 delta ``tensor − base`` over ``[start, stop)``, into ``out``."""
    b, t = base[start:stop], tensor[start:stop]
    for j in range(b.size):
        out[j] = np.int32(_round(_widen(t[j]) - _widen(b[j])) & 0x7FFF)


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
def _weigh(tensor, widened, om, mode, key, budget, factor, weight, mask, listed):
    """ω of one input over one block (``tensor``, ``mask`` sliced to it); returns the equal
    keys still to keep (mode 1) or the number of the next equal key in ``listed`` (mode 3).
    (Loops index slices from 0: an index with an offset gets numba's negative-index check,
    which stops LLVM from vectorising.)"""
    m = tensor.size
    if mode == 3:  # keys above `key`; of the equal ones, those `listed` marks, in order
        for j in range(m):
            delta = _round(_widen(tensor[j]) - widened[j])
            k = np.int64(delta & 0x7FFF)
            keep = k > key
            if k == key:
                keep = listed[budget] != 0
                budget += 1
            om[j] = _weighted(delta, keep, factor, weight)
        return budget
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
def _merge(base, inputs, modes, keys, equal, factors, weights, masks, listed, consensus, normalize, lam, divisor, out, start, stop):
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
            budget[i] = _weigh(tensor[lo : lo + m], widened, omega[i], modes[i], keys[i], budget[i], factors[i], weights[i], mask, listed[i])
            i += 1
        _combine(omega, weights, widened, m, consensus, normalize, lam, divisor, total, positive, mixed_sum, weight_sum, out[lo : lo + m])


def _value(element):
    """An array element as float32: bfloat16 bits widened, float32 as it is."""


@overload(_value)
def _value_overload(element):
    if isinstance(element, types.Integer):
        return lambda element: _widen(element)
    return lambda element: element


def _stored(value, target):
    """A float32 value as ``target``'s element type: bfloat16 bits (rounded) or float32."""


@overload(_stored)
def _stored_overload(value, target):
    if isinstance(target.dtype, types.Integer):
        return lambda value, target: _round(value)
    return lambda value, target: value


@numba.njit(cache=True)
def _accumulate(tensor, weight, total):
    for j in range(tensor.size):
        total[j] = _fma(_value(tensor[j]), weight, total[j])


@numba.njit(cache=True, nogil=True)
def _linear(inputs, weights, normalize, divisor, out, start, stop):
    """acc = +0, then acc = fma(W_i, w_i, acc) per input in float32; / divisor; to the
    output's type (bfloat16 bits, rounded once, or float32). Compiled per input type."""
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
                o[j] = _stored(total[j] / divisor, o)
        else:
            for j in range(m):
                o[j] = _stored(total[j], o)


@numba.njit(cache=True, nogil=True)
def _mix(base, other, scale_base, scale_other, out, start, stop):
    b, c, o = base[start:stop], other[start:stop], out[start:stop]
    for j in range(o.size):
        o[j] = _round(_widen(b[j]) * scale_base + _widen(c[j]) * scale_other)
