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
from types import EllipsisType

import torch

from common.errors import ShapeMismatchError

# Elements per chunk of a whole-tensor sum. Must stay below torch's parallel grain size
# (32768): a lone chunk (the tail) is then always summed by a single thread.
CHUNK = 1 << 14
# Chunks converted to float64 at a time, bounding the temporary to 32 MiB.
CHUNKS_PER_BLOCK = 256

# Up to this many summands, every CPU kernel torch uses for ``stack(...).sum(dim=0)`` adds
# them one after another into a zero-initialised float accumulator (its cascade only starts
# at 16 rows; its 4-way interleaved row sum coincides with the running sum for <= 4 rows).
# Beyond it the grouping depends on the tensor's width, so the stack itself is used.
STREAMED_TERMS_MAX = 4

Index = tuple[int | slice, ...] | EllipsisType
Term = Callable[[Index], torch.Tensor]
"""One summand of :func:`stacked_sum`: given a basic index (``...`` for the whole tensor),
it returns that block of the summand, in the result's dtype."""


def l1_norm(x: torch.Tensor) -> float:
    """``Σ|x|`` over the whole tensor, in float64, identical for any thread count."""
    return _fixed_order_sum(x, None, lambda a, _: a.abs_())


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
    flat_a = a.reshape(-1).to(torch.float32)
    flat_b = b.reshape(-1).to(torch.float32)
    if flat_a.numel() != flat_b.numel():
        raise ShapeMismatchError(f"tensors with {flat_a.numel()} and {flat_b.numel()} elements")
    numel = flat_a.numel()
    partials: tuple[list[float], list[float], list[float]] = ([], [], [])
    span = CHUNK * CHUNKS_PER_BLOCK
    for start in range(0, numel, span):
        stop = min(start + span, numel)
        xs, ys = flat_a[start:stop], flat_b[start:stop]
        full = (stop - start) // CHUNK * CHUNK
        for target, values in zip(partials, (xs * xs, ys * ys, xs * ys)):
            if full:
                target.extend(values[:full].view(-1, CHUNK).sum(dim=1).tolist())
            if full < stop - start:
                target.append(values[full:].sum().item())
    return tuple(_exact_sum(p) for p in partials)  # type: ignore[return-value]


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
        full = (stop - start) // CHUNK * CHUNK
        if full:
            partials.extend(values[:full].view(-1, CHUNK).sum(dim=1).tolist())
        if full < stop - start:
            partials.append(values[full:].sum().item())
    try:
        return math.fsum(partials)
    except ValueError:  # inf and -inf among the partials: the plain sum is as good (NaN)
        return sum(partials)


def stacked_sum(
    terms: Sequence[Term],
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Element-wise sum of the terms, bit-identical to ``torch.stack(terms).sum(dim=0)`` on the CPU.

    For bfloat16/float16 that means float32 accumulation, rounded to ``dtype`` once at the
    end. Up to ``STREAMED_TERMS_MAX`` terms the sum runs as whole-tensor in-place adds into
    one accumulator (no stack is built; each add is one vectorised, multi-threaded kernel);
    with more terms the stack is built, because torch's grouping of many rows cannot be
    reproduced portably.
    """
    shape = tuple(shape)
    if len(terms) > STREAMED_TERMS_MAX:
        return torch.stack([term(...) for term in terms]).sum(dim=0)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    if not terms:
        return torch.zeros(shape, dtype=dtype, device=device)
    acc = terms[0](...).to(accumulate, copy=True)
    for term in terms[1:]:
        acc.add_(term(...))
    # torch's accumulator starts at +0, so a sum that is zero comes out +0, never -0.
    acc.add_(0.0)
    return acc if acc.dtype == dtype else acc.to(dtype)


def require_same_shape(tensors: Sequence[torch.Tensor], *, what: str) -> None:
    """Refuse inputs whose shapes differ: torch would otherwise broadcast them silently."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        listed = ", ".join(str(list(s)) for s in shapes)
        raise ShapeMismatchError(
            f"{what} needs inputs of one shape, got {listed}",
            hint="inputs that disagree in shape must be cut to a common shape before merging",
        )
