"""Reductions whose bits do not depend on torch's thread count.

Two kinds of sum appear in the merge methods:

* **whole-tensor** sums (L1 norms, dot products, squared norms) that feed a scalar decision
  or factor. torch splits a large 1-D reduction across threads and adds the partial sums in
  a thread-count-dependent order, so ``x.abs().sum()`` can differ by an ulp between
  ``-j 1`` and ``-j 8``. Here the tensor is cut into fixed-size chunks; each chunk is summed
  along its own row in float64 (one thread owns a whole row, and a single chunk is below
  torch's parallel grain) and the chunk partials are added with ``math.fsum`` (exactly
  rounded, so their order is irrelevant).
* **across-input** sums (``Σ_i term_i`` element-wise), which must reproduce the bits of
  ``torch.stack(terms).sum(dim=0)`` because that is how the outputs recipe authors already
  have were produced. See :func:`stacked_sum`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mksuite.common.errors import ShapeMismatchError

# Elements per chunk of a whole-tensor sum. Must stay below torch's parallel grain size
# (32768): a lone chunk (the tail) is then always summed by a single thread.
CHUNK = 1 << 14
# Chunks converted to float64 at a time, bounding the temporary to 32 MiB.
CHUNKS_PER_BLOCK = 256
# Up to this many elements torch's own float32 sums (measured: 2 x its 32768 grain) do not
# depend on its thread count, so results mergekit computes with them are well defined there
# and the geometric methods reproduce them exactly (slerp, multislerp, karcher).
TORCH_SUM_INVARIANT_ELEMENTS = 65536

# Up to this many summands, every CPU kernel torch uses for ``stack(...).sum(dim=0)`` adds
# them one after another into a zero-initialised float accumulator (its cascade only starts
# at 16 rows; its 4-way interleaved row sum coincides with the running sum for <= 4 rows).
# Beyond it the grouping depends on the tensor's width, so the stack itself is used.
STREAMED_TERMS_MAX = 4

Term = Callable[[slice], torch.Tensor]
"""One summand of :func:`stacked_sum`: given a slice of the flattened tensor, it returns
that block of the summand, in the result's dtype."""


def l1_norm(x: torch.Tensor) -> float:
    """``Σ|x|`` over the whole tensor, identical for any thread count.

    float64 tensors are summed in float64; narrower ones in float32 per fixed-size chunk
    (|x| of a float32/half value is exact in float32) with exactly added chunk partials:
    relative error ~1e-6, at a fraction of the cost of widening everything to float64.
    """
    return _exact_sum(l1_partials(x))


def l1_partials(x: torch.Tensor) -> list[float]:
    """The per-CHUNK partial sums behind :func:`l1_norm`.

    Partials of consecutive pieces of a tensor, each cut at a multiple of CHUNK elements,
    concatenate to the partials of the whole; their exact sum is then the same number.
    """
    if x.dtype == torch.float64:
        return _fixed_order_partials(x, None, lambda a, _: a.abs_())
    flat = x.reshape(-1)
    partials: list[float] = []
    span = CHUNK * CHUNKS_PER_BLOCK
    for start in range(0, flat.numel(), span):
        stop = min(start + span, flat.numel())
        values = flat[start:stop].to(torch.float32).abs_() if flat.dtype != torch.float32 else flat[start:stop].abs()
        append_chunk_sums(partials, values)
    return partials


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``Σ a⊙b`` over the whole (flattened) tensors, in float64, identical for any thread count.

    Products of float32/bfloat16/float16 values are exact in float64.
    """
    if a.numel() != b.numel():
        raise ShapeMismatchError(
            f"dot product of tensors with {a.numel()} and {b.numel()} elements",
            hint="both tensors must have the same number of elements",
        )
    return _fixed_order_sum(a, b, lambda x, y: x.mul_(y))


def squared_norm(x: torch.Tensor) -> float:
    """``Σ x²`` over the whole tensor, in float64, identical for any thread count."""
    return _fixed_order_sum(x, None, lambda a, _: a.mul_(a))


def gram_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """``(Σa², Σb², Σa⊙b)`` in one pass over both tensors, identical for any thread count.

    Products are formed and summed in float32 (as the float32 slerp math itself is) per
    fixed-size chunk, one thread per chunk, then the chunk partials are added exactly
    (fsum). One float32 pass instead of three float64 conversions: ~10x faster, and the
    cosine is still good to ~1e-6, far inside slerp's 0.9995 parallel threshold.
    """
    return tuple(_exact_sum(p) for p in gram_partials(a, b))  # type: ignore[return-value]


def gram_partials(a: torch.Tensor, b: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """The per-CHUNK partials behind :func:`gram_sums` (they concatenate like ``l1_partials``)."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)  # widened to float32 span by span: small temporaries
    if flat_a.numel() != flat_b.numel():
        raise ShapeMismatchError(f"tensors with {flat_a.numel()} and {flat_b.numel()} elements")
    numel = flat_a.numel()
    partials: tuple[list[float], list[float], list[float]] = ([], [], [])
    span = CHUNK * CHUNKS_PER_BLOCK
    for start in range(0, numel, span):
        stop = min(start + span, numel)
        xs, ys = flat_a[start:stop].to(torch.float32), flat_b[start:stop].to(torch.float32)
        for target, values in zip(partials, (xs * xs, ys * ys, xs * ys)):
            append_chunk_sums(target, values)
    return partials


# torch reduces at most this many elements on one thread (at::internal::GRAIN_SIZE).
TORCH_GRAIN = 32768


def split_by_torch(values: torch.Tensor, dim: int) -> bool:
    """True when torch would sum ``values`` (a [rows, n] tensor) along ``dim`` as one vector
    split across threads, in a thread-count-dependent order: a single row longer than its grain.
    Any other sum along an axis runs one vector per thread, in a fixed order."""
    return values.shape[0] == 1 and dim in (-1, 1) and values.shape[-1] > TORCH_GRAIN


def plain_partials(x: torch.Tensor) -> list[float]:
    """Per-CHUNK float64 partial sums of ``x``'s elements, to add with :func:`exact_sum`."""
    return _fixed_order_partials(x, None, lambda a, _: a)


def exact_sum(partials: list[float]) -> float:
    """The exactly rounded sum of partials (see :func:`l1_partials`)."""
    return _exact_sum(partials)


def append_chunk_sums(partials: list[float], values: torch.Tensor) -> None:
    """Append the sum of each CHUNK of ``values`` (the last one may be shorter), one thread each."""
    full = values.numel() // CHUNK * CHUNK
    if full:
        partials.extend(values[:full].view(-1, CHUNK).sum(dim=1).tolist())
    if full < values.numel():
        partials.append(values[full:].sum().item())


def _exact_sum(partials: list[float]) -> float:
    try:
        return math.fsum(partials)
    except ValueError:  # inf and -inf among the partials: the plain sum is as good (NaN)
        return sum(partials)


def _fixed_order_sum(
    x: torch.Tensor,
    y: torch.Tensor | None,
    term: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> float:
    return _exact_sum(_fixed_order_partials(x, y, term))


def _fixed_order_partials(
    x: torch.Tensor,
    y: torch.Tensor | None,
    term: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> list[float]:
    flat_x = x.reshape(-1)
    flat_y = y.reshape(-1) if y is not None else None
    numel = flat_x.numel()
    partials: list[float] = []
    span = CHUNK * CHUNKS_PER_BLOCK
    for start in range(0, numel, span):
        stop = min(start + span, numel)
        xs = flat_x[start:stop].to(torch.float64, copy=True)
        ys = flat_y[start:stop].to(torch.float64) if flat_y is not None else None
        values = term(xs, ys)
        append_chunk_sums(partials, values)
    return partials


def stacked_sum(
    terms: Sequence[Term],
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Element-wise sum of the terms, bit-identical to ``torch.stack(terms).sum(dim=0)`` on the CPU.

    Each term is called with a slice of the *flattened* tensor and returns that block of
    the summand. For bfloat16/float16 the sum has float32 accumulation, rounded to ``dtype``
    once at the end. Up to ``STREAMED_TERMS_MAX`` terms it runs block by block through two
    small reused buffers (see :class:`BlockSummer`); with more terms the stack is built,
    because torch's grouping of many rows cannot be reproduced portably.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if len(terms) > STREAMED_TERMS_MAX:
        whole = slice(0, numel)
        return torch.stack([term(whole).reshape(shape) for term in terms]).sum(dim=0)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    summer = BlockSummer(dtype, device, min(numel, BLOCK))
    for block in blocks(numel):
        summer.sum_into(flat[block], [term(block) for term in terms])
    return out


# Elements per block of block-wise element work. Whole-tensor temporaries cost a fresh
# allocation (and a page fault per 4 KiB) each; small reused buffers stay in cache and in
# the allocator. Mixed-dtype in-place ops (float32 += bfloat16) take a ~10x slower path in
# torch, so blocks are converted into a float32 buffer first.
BLOCK = 1 << 20


def blocks(numel: int):
    """Slices covering ``range(numel)`` in BLOCK-sized pieces (one empty slice for numel 0)."""
    if numel == 0:
        yield slice(0, 0)
    for start in range(0, numel, BLOCK):
        yield slice(start, min(start + BLOCK, numel))


class BlockSummer:
    """Sums same-size blocks exactly as ``torch.stack(blocks).sum(0)`` does, into a target."""

    def __init__(self, dtype: torch.dtype, device, size: int):
        self.dtype = dtype
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        self.acc = torch.empty(size, dtype=accumulate, device=device)
        self.widened = torch.empty(size, dtype=accumulate, device=device) if accumulate != dtype else None

    def sum_into(self, target: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        n = target.numel()
        acc = self.acc[:n]
        acc.zero_()  # torch's accumulator starts at +0: a zero sum comes out +0, never -0
        for part in parts:
            if self.widened is None:
                acc.add_(part)
            else:
                widened = self.widened[:n]
                widened.copy_(part)
                acc.add_(widened)
        target.copy_(acc)
        return target


def fused_multiply_add(x: torch.Tensor, weight: float, acc: torch.Tensor) -> torch.Tensor:
    """``x·weight + acc`` rounded once to ``acc``'s dtype: a fused multiply-add, element-wise.

    For a float32 accumulator (``x`` of at most 24 significant bits, ``weight`` a float32
    value) the product is exact in float64; the sum is formed in float64 and its rounding
    error recovered exactly (TwoSum), then the float64 sum is rounded to odd, from which one
    rounding to float32 is the correctly rounded fused result (53 >= 24 + 2). A float64
    accumulator gets ``acc + x·weight`` with two roundings (no exact float64 FMA in torch).
    """
    if acc.dtype == torch.float64:
        return acc.add_(x.to(torch.float64), alpha=weight)
    product = x.to(torch.float64).mul_(weight)
    addend = acc.to(torch.float64)
    total = product + addend
    part = total - addend
    error = product.sub_(part).add_(addend.sub_(part.neg_().add_(total)))  # TwoSum: exact
    del addend, part
    inexact = (error != 0) & ((total.view(torch.int64) & 1) == 0) & torch.isfinite(total)
    if bool(inexact.any()):
        toward = torch.where(error > 0, torch.inf, -torch.inf).to(torch.float64)
        total = torch.where(inexact, torch.nextafter(total, toward), total)
    return total.to(acc.dtype)


def require_same_shape(tensors: Sequence[torch.Tensor], *, what: str) -> None:
    """Refuse inputs whose shapes differ: torch would otherwise broadcast them silently."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        listed = ", ".join(str(list(s)) for s in shapes)
        raise ShapeMismatchError(
            f"{what} needs inputs of one shape, got {listed}",
            hint="inputs that disagree in shape must be cut to a common shape before merging",
        )
