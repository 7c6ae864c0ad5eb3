"""Dot products over a tensor's vectors, for the geometric methods, independent of thread count.

The geometric methods (nuslerp, multislerp, karcher, model_stock, arcee_fusion) treat a tensor
either as one flat vector or as many vectors along one axis. torch reduces along an axis
with one thread per output element, so per-vector sums are the same for any thread count,
*except* when there is a single output: then it splits the vector across threads. That case
goes through the fixed-order whole-tensor sums of :mod:`reductions` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mkmerge.methods.reductions import dot, exact_sum, plain_partials, split_by_torch, squared_norm


def as_vectors(tensor: torch.Tensor, *, flatten: bool) -> torch.Tensor:
    """A 2-D view whose rows are the vectors along the last axis (one row if flattened or 1-D)."""
    if flatten or tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(-1, tensor.shape[-1])


def _single_vector(x: torch.Tensor, dim: int) -> bool:
    return x.numel() == x.shape[dim] or x.numel() == 0


def vector_dots(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``Σ a⊙b`` along ``dim`` (kept as size 1), in float64, for float32 ``a`` and ``b``.

    Many vectors: float32 sums, one thread per vector. A single vector: float64 sum of exact
    products in fixed-size chunks (``reductions.dot``).
    """
    if _single_vector(a, dim):
        shape = [1] * a.dim()
        return torch.tensor(dot(a, b), dtype=torch.float64, device=a.device).reshape(shape)
    return (a * b).sum(dim, keepdim=True).to(torch.float64)


def gram_matrix(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``G[i, j] = x_i · x_j`` over whole (flattened) tensors: a float64 [N, N] matrix.

    Each entry is a fixed-order float64 sum of exact products, so G is symmetric and the same
    for any thread count.
    """
    count = len(vectors)
    gram = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            gram[i, j] = gram[j, i] = dot(vectors[i], vectors[j])
    return gram


def quadratic_norm(gram: torch.Tensor, coefficients: torch.Tensor) -> float:
    """‖Σ c_i x_i‖ from the Gram matrix of the x_i (rounding below zero is read as zero)."""
    return math.sqrt(max(float(coefficients @ gram @ coefficients), 0.0))


def combine(
    tensors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    dtype: torch.dtype,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + Σ c_i·x_i`` in float32 (``x_i`` float32 tensors), cast to ``dtype``.

    The coefficients are applied in float32, one product at a time, in input order.
    """
    out = base.to(torch.float32, copy=True) if base is not None else torch.zeros_like(tensors[0])
    for tensor, coefficient in zip(tensors, coefficients):
        out.add_(tensor, alpha=float(coefficient))
    return out.to(dtype)


def norms_in_dtype(vectors: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Each vector's norm along ``dim`` of a 2-D tensor (kept), as torch computes it in the
    tensor's dtype. A single vector torch would split across threads (longer than its grain)
    gets its exact norm rounded once instead, the same for any thread count."""
    if split_by_torch(vectors, dim):
        return _scalar_like(math.sqrt(squared_norm(vectors)), vectors)
    return torch.linalg.vector_norm(vectors, dim=dim, keepdim=True)


def sums_in_dtype(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Each vector's element sum along ``dim`` of a 2-D tensor (kept), in its dtype; a single
    long vector as in :func:`norms_in_dtype`."""
    if split_by_torch(values, dim):
        return _scalar_like(exact_sum(plain_partials(values)), values)
    return values.sum(dim=dim, keepdim=True)


def _scalar_like(value: float, like: torch.Tensor) -> torch.Tensor:
    """A [1, 1] tensor of ``like``'s dtype holding ``value`` (via float32 for 16-bit dtypes, as
    torch rounds a 16-bit reduction)."""
    wide = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor([[value]], dtype=wide, device=like.device).to(like.dtype)
