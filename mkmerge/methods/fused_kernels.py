"""The numba kernels behind :mod:`mkmerge.methods.fused` (imported on first use: numba takes
~0.6 s to import, which runs that never fuse anything should not pay).

Three element formats, told apart by the type of the arrays that carry them (numba has no
float16 arithmetic, so the half formats travel as their 16-bit patterns):

* ``uint16`` arrays: bfloat16 bits;
* ``int16`` arrays: float16 bits;
* ``float32`` arrays: float32 values.

Every kernel computes in float32 and rounds to the format where torch's op would round
(:func:`_rounded`): bfloat16 and float16 to nearest even exactly as torch converts them,
float32 not at all, since each float32 operation already rounds once. The formats are
resolved when a kernel is compiled (one specialisation per format), so the generic code
costs nothing per element.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as llvm_binding
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


# --- bfloat16


@numba.njit(inline="always")
def _widen(bits):
    """bfloat16 bits -> float32 (exact)."""
    return _f32_from_bits(np.uint32(bits) << np.uint32(16))


@numba.njit(inline="always")
def _round(value):
    """float32 -> bfloat16 bits, to nearest even (NaN -> the quiet NaN 0x7FC0), as torch.
    (Branch-free, as the helpers below: selects let LLVM vectorise the loops around them.)"""
    u = np.uint32(_bits_from_f32(value))
    rounded = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return rounded if value == value else np.uint16(0x7FC0)


# --- float16
#
# Where the CPU converts float16 itself (x86's F16C: the instructions torch's own vectorised
# float16 loops use), the kernels do too; elsewhere the branch-free conversions below, which
# give the same bits for every number (the tests check both over every float16 and millions
# of float32 values).


def _host_has_f16c() -> bool:
    try:
        return bool(llvm_binding.get_host_cpu_features().get("f16c", False))
    except RuntimeError:  # LLVM cannot read this host's features: the integer conversions
        return False


_F16C = _host_has_f16c()
_HALF = np.float32(0.5)  # adding 0.5 rounds a float below 2^-14 to float16's subnormal step, 2^-24
_TWO_POW_M24 = np.float32(2.0**-24)
_SMALLEST_NORMAL = np.uint32(113 << 23)  # float16's 2^-14, as float32 bits
_OVERFLOW = np.uint32(143 << 23)  # 65536: magnitudes that round to it or above are infinite
_INFINITY = np.uint32(0x7F800000)


@intrinsic
def _f32_from_half(typingctx, bits):
    """float16 bits (int16) -> float32, by the CPU's conversion (F16C)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _half_from_f32(typingctx, value):
    """float32 -> float16 bits (int16), rounded to nearest even by the CPU's conversion (F16C)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


@numba.njit(inline="always")
def _widen_half_soft(bits):
    """float16 bits (int16) -> float32 (exact): subnormals, infinities and NaNs included."""
    h = np.uint32(np.uint16(bits))
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    magnitude = h & np.uint32(0x7FFF)
    normal = (magnitude << np.uint32(13)) + np.uint32(112 << 23)  # rebias the exponent
    special = (magnitude << np.uint32(13)) + np.uint32(224 << 23)  # infinity and NaN: exponent 255
    subnormal = _bits_from_f32(np.float32(np.int32(magnitude)) * _TWO_POW_M24)  # exact: < 2^10 steps of 2^-24
    chosen = special if magnitude >= np.uint32(0x7C00) else (normal if magnitude >= np.uint32(0x0400) else subnormal)
    return _f32_from_bits(np.uint32(chosen | sign))


@numba.njit(inline="always")
def _round_to_half_soft(value):
    """A float32 value rounded to float16's precision and range (to nearest even, overflow to
    infinity, subnormals to their 2^-24 step, NaN to the quiet NaN), as float32 bits."""
    u = np.uint32(_bits_from_f32(value))
    sign = u & np.uint32(0x80000000)
    a = u ^ sign
    normal = (a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    normal = _INFINITY if normal >= _OVERFLOW else normal
    subnormal = _bits_from_f32((_f32_from_bits(a) + _HALF) - _HALF)
    chosen = np.uint32(0x7FC00000) if a > _INFINITY else (normal if a >= _SMALLEST_NORMAL else subnormal)
    return np.uint32(chosen | sign)


@numba.njit(inline="always")
def _round_half_soft(value):
    """float32 -> float16 bits (int16), to nearest even, as torch converts (NaN -> 0x7E00 with its sign)."""
    r = _round_to_half_soft(value)
    a = r & np.uint32(0x7FFFFFFF)
    normal = (a >> np.uint32(13)) - np.uint32(112 << 10)
    special = (a >> np.uint32(13)) - np.uint32(224 << 10)
    subnormal = np.uint32(np.int32(_f32_from_bits(a) * np.float32(2.0**24)))
    bits = special if a >= _INFINITY else (normal if a >= _SMALLEST_NORMAL else subnormal)
    return np.int16(np.uint16(bits | ((r >> np.uint32(16)) & np.uint32(0x8000))))


_widen_half = _f32_from_half if _F16C else _widen_half_soft
_round_half = _half_from_f32 if _F16C else _round_half_soft


@numba.njit(inline="always")
def _rounded_half(value):
    """A float32 value rounded to float16, as float32."""
    return _widen_half(_round_half(value))


# --- generic over the three formats, resolved at compile time


def _value(element):
    """An element as float32: bfloat16 or float16 bits widened, float32 as it is."""


@overload(_value)
def _value_overload(element):
    if isinstance(element, types.Integer):
        return (lambda element: _widen_half(element)) if element.signed else (lambda element: _widen(element))
    return lambda element: element


def _stored(value, target):
    """A float32 value as ``target``'s element: bfloat16/float16 bits (rounded) or float32."""


@overload(_stored)
def _stored_overload(value, target):
    if isinstance(target.dtype, types.Integer):
        if target.dtype.signed:
            return lambda value, target: _round_half(value)
        return lambda value, target: _round(value)
    return lambda value, target: value


def _rounded(value, like):
    """A float32 value rounded to the format of ``like``'s elements, as float32 again."""


@overload(_rounded)
def _rounded_overload(value, like):
    if isinstance(like.dtype, types.Integer):
        if like.dtype.signed:
            return lambda value, like: _rounded_half(value)
        return lambda value, like: _widen(_round(value))
    return lambda value, like: value


def _split(value, like):
    """(``value`` rounded to ``like``'s format as float32, its magnitude key): see
    :func:`~mkmerge.methods.sort_order.order_keys` (the rounded bits without the sign)."""


@overload(_split)
def _split_overload(value, like):
    if isinstance(like.dtype, types.Integer):
        if like.dtype.signed:

            def split_half(value, like):
                bits = _round_half(value)
                return _widen_half(bits), np.int64(bits) & 0x7FFF

            return split_half

        def split_bfloat16(value, like):
            bits = _round(value)
            return _widen(bits), np.int64(bits) & 0x7FFF

        return split_bfloat16
    return lambda value, like: (value, np.int64(_bits_from_f32(value)) & 0x7FFFFFFF)


@numba.njit(inline="always")
def _delta(t, b, like):
    """The delta ``t − b`` of two elements, rounded, as float32, and its magnitude key."""
    return _split(_value(t) - _value(b), like)


# --- the kernels


@numba.njit(cache=True)
def _block_keys(t, b, like, keys):
    for j in range(t.size):
        keys[j] = np.int32(_delta(t[j], b[j], like)[1])


@numba.njit(cache=True, nogil=True)
def _count_equal(base, tensor, key, start, stop):
    """How many of the delta's magnitude keys over ``[start, stop)`` equal ``key``."""
    size = 4096
    keys = np.empty(size, dtype=np.int32)
    count = 0
    for lo in range(start, stop, size):
        m = min(stop, lo + size) - lo
        _block_keys(tensor[lo : lo + m], base[lo : lo + m], base, keys)
        for j in range(m):
            count += keys[j] == key
    return count


@numba.njit(cache=True, nogil=True)
def _delta_words(base, tensor, key, out):
    """:func:`_delta_keys` as the words of :mod:`sort_order_kernels`: entries on ``key``
    escaped and numbered in index order; returns how many there are. (Keys a block at a
    time in a vectorised loop, then the numbering.)"""
    size = 4096
    keys = np.empty(size, dtype=np.int32)
    count = 0
    n = base.size
    for lo in range(0, n, size):
        m = min(n, lo + size) - lo
        _block_keys(tensor[lo : lo + m], base[lo : lo + m], base, keys)
        o = out[lo : lo + m]
        for j in range(m):
            k = np.uint32(keys[j])
            if k == key:
                o[j] = ESCAPE + np.uint32(count)
                count += 1
            else:
                o[j] = k
    return count


@numba.njit(cache=True, nogil=True)
def _delta_keys(base, tensor, start, stop, out):
    """The magnitude keys of the delta ``tensor − base`` over ``[start, stop)``, into ``out``."""
    b, t = base[start:stop], tensor[start:stop]
    for j in range(b.size):
        out[j] = np.int32(_delta(t[j], b[j], base)[1])


@numba.njit(cache=True, nogil=True)
def _histograms(base, inputs, shift, buckets, start, stop):
    """Per input, counts of its delta's magnitude keys over ``[start, stop)`` in 65536 bins:
    of ``key >> shift``, or where ``buckets[i] ≥ 0``, of the low 16 bits of the keys whose
    high bits are that bucket (the second digit of a float32 radix select).

    Keys are computed a block at a time in their own (vectorised) loop, then counted into
    two interleaved histograms, so that runs of one key do not wait on each other's counts."""
    size = 4096
    counts = np.zeros((len(inputs), 2, 65536), dtype=np.int64)
    keys = np.empty(size, dtype=np.int32)
    i = 0
    for tensor in inputs:
        even, odd = counts[i, 0], counts[i, 1]
        bucket = buckets[i]
        for lo in range(start, stop, size):
            m = min(stop, lo + size) - lo
            _block_keys(tensor[lo : lo + m], base[lo : lo + m], base, keys)
            if bucket < 0:
                for j in range(0, m - 1, 2):
                    even[keys[j] >> shift] += 1
                    odd[keys[j + 1] >> shift] += 1
                if m % 2:
                    even[keys[m - 1] >> shift] += 1
            else:
                for j in range(m):
                    k = keys[j]
                    if (k >> 16) == bucket:
                        even[k & 0xFFFF] += 1
        i += 1
    return counts.sum(axis=1)


@numba.njit(cache=True, nogil=True)
def _delta_magnitudes(base, tensor, mask, before, after):
    """|δ| and |δ·mask| of the rounded delta ``tensor − base``, as float32, into ``before``
    and ``after`` (a dropped entry is |δ·0|: zero, or NaN where δ is infinite or NaN)."""
    for j in range(base.size):
        delta = _delta(tensor[j], base[j], base)[0]
        before[j] = abs(delta)
        after[j] = abs(delta * np.float32(mask[j]))  # δ·1 is δ; δ·0 the zero (or NaN) dropped: no branch


@numba.njit(inline="always")
def _weighted(delta, keep, factor, weight, like):
    """ω = (δ·mask · rescale) · w, each product rounded to the format, as float32.

    A dropped entry is δ·0, as torch's multiply by a bool mask gives (a zero with δ's sign).
    Without a rescale ``factor`` is 1, which changes no bits: one branch-free loop serves both."""
    kept = delta if keep else delta * np.float32(0.0)
    return _rounded(_rounded(kept * factor, like) * weight, like)


@numba.njit(cache=True)
def _weigh_threshold(tensor, widened, om, key, keep_equal, factor, weight, flags):
    """ω keeping the keys above ``key`` (and the equal ones with ``keep_equal``); ``flags``
    marks the entries on ``key``."""
    for j in range(tensor.size):
        delta, k = _split(_value(tensor[j]) - widened[j], tensor)
        flags[j] = k == key
        om[j] = _weighted(delta, (k > key) | (keep_equal & (k == key)), factor, weight, tensor)


@numba.njit(cache=True)
def _keep_flagged(tensor, widened, om, factor, weight, flags, budget, listed, counted):
    """Keep, after all, some of the entries ``flags`` marks, in index order: with ``counted``
    the first ``budget`` of them; otherwise those whose entry in ``listed``, numbered from
    ``budget``, is set. Returns the budget left, or the next number.

    A scalar loop (each decision depends on the count so far), but it only branches on the
    few flagged entries; the vectorised pass before it did the rest."""
    m = tensor.size
    words = flags[: m - m % 8].view(np.uint64)  # eight flags at a time: most words hold none
    j = 0
    while j < m:
        if j % 8 == 0 and j // 8 < words.size and words[j // 8] == 0:
            j += 8
            continue
        if flags[j]:
            if (budget > 0) if counted else (listed[budget] != 0):
                delta = _split(_value(tensor[j]) - widened[j], tensor)[0]
                om[j] = _weighted(delta, True, factor, weight, tensor)
            budget += -1 if counted else 1
            if counted and budget == 0:
                break
        j += 1
    return budget


@numba.njit(cache=True)
def _weigh(tensor, widened, om, mode, key, budget, factor, weight, mask, listed, flags):
    """ω of one input over one block (``tensor``, ``mask`` sliced to it); returns the equal
    keys still to keep (mode 1) or the number of the next equal key in ``listed`` (mode 3).
    ``flags`` is scratch of the block's size.
    (Loops index slices from 0: an index with an offset gets numba's negative-index check,
    which stops LLVM from vectorising.)"""
    m = tensor.size
    # Keys above `key`; of the equal ones, those `listed` marks (mode 3) or the first `budget`
    # (mode 1), in order: decided after a pass that drops them all.
    if mode == 3 or (mode == 1 and budget > 0):
        _weigh_threshold(tensor, widened, om, key, False, factor, weight, flags)
        return _keep_flagged(tensor, widened, om, factor, weight, flags, budget, listed, mode == 1)
    if mode == 1:
        _weigh_threshold(tensor, widened, om, key, budget < 0, factor, weight, flags)
    elif mode == 2:
        for j in range(m):
            delta = _rounded(_value(tensor[j]) - widened[j], tensor)
            om[j] = _weighted(delta, mask[j] != 0, factor, weight, tensor)
    else:
        for j in range(m):
            om[j] = _weighted(_rounded(_value(tensor[j]) - widened[j], tensor), True, factor, weight, tensor)
    return budget


@numba.njit(cache=True)
def _combine(
    omega, weights, widened, m, consensus, normalize, lam, divisor, total, positive, mixed_sum, weight_sum, out
):
    count = omega.shape[0]
    for j in range(m):
        total[j] = 0.0
    for i in range(count):  # Σω from +0 in input order: torch's float32 accumulation of a stack sum
        for j in range(m):
            total[j] += omega[i, j]
    if consensus:
        for j in range(m):
            positive[j] = _rounded(total[j], out) >= 0
            mixed_sum[j] = 0.0
            weight_sum[j] = 0.0
        for i in range(count):
            weight = weights[i]
            for j in range(m):
                x = omega[i, j]
                agree = (positive[j] & (x > 0)) | ((not positive[j]) & (x < 0))
                # x·0 where it disagrees, as the torch form's multiply by the mask: a zero
                # (which changes no sum that starts at +0), or NaN where ω is infinite or NaN
                mixed_sum[j] += x if agree else x * np.float32(0.0)
                weight_sum[j] += weight if agree else np.float32(0.0)
        for j in range(m):
            # Unused steps divide or multiply by 1, which changes no bits: no branches.
            w = _rounded(weight_sum[j], out)
            w = w if (normalize and w != 0) else np.float32(1.0)
            mixed = _rounded(_rounded(mixed_sum[j], out) / w, out)
            out[j] = _stored(widened[j] + _rounded(mixed * lam, out), out)
    else:
        for j in range(m):
            mixed = _rounded(_rounded(total[j], out) / divisor, out)
            out[j] = _stored(widened[j] + _rounded(mixed * lam, out), out)


@numba.njit(cache=True, nogil=True)
def _merge(
    base,
    inputs,
    modes,
    keys,
    equal,
    factors,
    weights,
    masks,
    listed,
    consensus,
    normalize,
    lam,
    divisor,
    out,
    start,
    stop,
):
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
    flags = np.empty(size, dtype=np.bool_)
    budget = equal.copy()
    for lo in range(start, n, size):
        m = min(n, lo + size) - lo
        b = base[lo : lo + m]
        for j in range(m):
            widened[j] = _value(b[j])
        i = 0
        for tensor in inputs:
            mask = masks[i, lo : lo + m] if modes[i] == 2 else masks[0, :0]
            budget[i] = _weigh(
                tensor[lo : lo + m],
                widened,
                omega[i],
                modes[i],
                keys[i],
                budget[i],
                factors[i],
                weights[i],
                mask,
                listed[i],
                flags,
            )
            i += 1
        _combine(
            omega,
            weights,
            widened,
            m,
            consensus,
            normalize,
            lam,
            divisor,
            total,
            positive,
            mixed_sum,
            weight_sum,
            out[lo : lo + m],
        )


@numba.njit(cache=True)
def _accumulate(tensor, weight, total):
    for j in range(tensor.size):
        total[j] = _fma(_value(tensor[j]), weight, total[j])


@numba.njit(cache=True, nogil=True)
def _linear(inputs, weights, normalize, divisor, out, start, stop):
    """acc = +0, then acc = fma(W_i, w_i, acc) per input in float32; / divisor; to the
    output's format, rounded once. Compiled per format."""
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
        o[j] = _stored(_value(b[j]) * scale_base + _value(c[j]) * scale_other, o)
