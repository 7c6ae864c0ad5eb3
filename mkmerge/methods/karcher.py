"""`karcher`: the Riemannian (Karcher) mean of the inputs' directions on the sphere (docs/methods.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.declaration import MergeMethod, MethodCall
from mkmerge.methods.reductions import TORCH_SUM_INVARIANT_ELEMENTS, require_same_shape
from mkmerge.methods.vectors import combine, gram_matrix, quadratic_norm


def karcher_merge(
    tensors: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5, precise: bool = False
) -> torch.Tensor:
    """Equal-weight Karcher mean of the unit directions, scaled by the mean norm.

    Tensors of at most TORCH_SUM_INVARIANT_ELEMENTS entries are computed as mergekit does
    (:func:`stepwise_karcher`) unless ``precise``; the rest as follows.

    Each tensor is one flat vector ``W_i = n_i·u_i``. Inputs with ``n_i ≤ tol`` get no say in
    the direction but still count (as 0) in the mean norm ``Σ n_i / N``. The gradient
    iteration starts at the normalised mean of the kept ``u_i`` and stops after ``max_iter``
    steps or when the step is shorter than ``tol``; angles below ``tol`` are skipped.

    Every iterate is a combination ``Σ β_k u_k`` of the kept directions, so the iteration runs
    on the coefficients β with the (float64, thread-invariant) Gram matrix of the inputs, and
    the tensor is formed once at the end, in float32, cast to the inputs' dtype. All norms are
    zero (≤ tol): zeros. One input: returned as is.
    """
    if len(tensors) == 1:
        return tensors[0]
    require_same_shape(tensors, what="karcher")
    if not precise and tensors[0].numel() <= TORCH_SUM_INVARIANT_ELEMENTS:
        return stepwise_karcher(tensors, max_iter=max_iter, tol=tol)
    count = len(tensors)
    dtype = tensors[0].dtype
    vectors = [t.to(torch.float32) for t in tensors]
    gram = gram_matrix(vectors)
    norms = gram.diagonal().sqrt()
    kept = [i for i in range(count) if norms[i] > tol]
    if not kept:
        return torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    scale = float(norms.sum()) / count
    directions = gram[kept][:, kept] / torch.outer(norms[kept], norms[kept])  # Gram of the kept u_k
    beta = karcher_coefficients(directions, max_iter=max_iter, tol=tol)
    coefficients = [scale * float(beta[k]) / float(norms[i]) for k, i in enumerate(kept)]
    return combine([vectors[i] for i in kept], coefficients, dtype=dtype)


def stepwise_karcher(tensors: Sequence[torch.Tensor], *, max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean as mergekit computes it: each step a float32 (float64 for float64
    inputs) tensor operation on the flat vectors, so float32 merges give its numbers bit for
    bit; the result is cast to the inputs' dtype."""
    dtype = tensors[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    vectors = [t.reshape(-1).to(work) for t in tensors]
    count = len(vectors)
    norms = [v.norm() for v in vectors]
    units = [v / n if n > 0 else torch.zeros_like(v) for v, n in zip(vectors, norms)]
    kept = [i for i in range(count) if norms[i] > tol]
    if not kept:
        return torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    weights = [1.0 / count] * count  # equal weights, renormalised over the kept inputs
    alpha = [weights[i] / sum(weights[j] for j in kept) for i in kept]
    directions = [units[i] for i in kept]
    mean = sum(a * u for a, u in zip(alpha, directions))
    length = mean.norm()
    point = mean / length if length >= tol else directions[0].clone()
    for _ in range(max_iter):
        tangent = torch.zeros_like(point)
        for a, u in zip(alpha, directions):
            cosine = torch.clamp((point * u).sum(), -1, 1)
            theta = torch.arccos(cosine)
            if theta < tol:
                continue
            tangent = tangent + a * (theta / torch.sin(theta)) * (u - cosine * point)
        step = tangent.norm()
        if step < tol:
            break
        point = torch.cos(step) * point + torch.sin(step) * (tangent / step)
        point = point / point.norm()
    scale = sum(w * n for w, n in zip(weights, norms))
    return (scale * point).reshape(tensors[0].shape).to(dtype)


def karcher_coefficients(directions: torch.Tensor, *, max_iter: int, tol: float) -> torch.Tensor:
    """β with ``u = Σ β_k u_k`` the Karcher mean of unit vectors whose Gram matrix is ``directions``.

    Plain Riemannian gradient descent with step 1 and equal weights, as docs/methods.md states it:
    ``T = Σ α_k (θ_k / sin θ_k)(u_k − cos θ_k·u)``, ``u ← cos‖T‖·u + sin‖T‖·T/‖T‖``.
    """
    count = directions.shape[0]
    alpha = torch.full((count,), 1.0 / count, dtype=torch.float64)
    beta = alpha.clone()
    start_norm = quadratic_norm(directions, beta)
    if start_norm < tol:
        beta = torch.zeros(count, dtype=torch.float64)
        beta[0] = 1.0
    else:
        beta = beta / start_norm
    identity = torch.eye(count, dtype=torch.float64)
    for _ in range(max_iter):
        cosines = (directions @ beta).clamp(-1.0, 1.0)  # u · u_k
        tangent = torch.zeros(count, dtype=torch.float64)
        for k in range(count):
            theta = math.acos(float(cosines[k]))
            if theta < tol:
                continue
            tangent += alpha[k] * (theta / math.sin(theta)) * (identity[k] - cosines[k] * beta)
        step = quadratic_norm(directions, tangent)
        if step < tol:
            break
        beta = math.cos(step) * beta + (math.sin(step) / step) * tangent
        beta = beta / quadratic_norm(directions, beta)
    return beta


# --- declaration


def _run_karcher(call: MethodCall) -> torch.Tensor:
    tensors = list(call.tensors) + ([call.base] if call.base is not None else [])
    return karcher_merge(
        tensors,
        max_iter=int(call.params["max_iter"]),
        tol=float(call.params["tol"]),
        precise=bool(call.params.get("precise")),
    )


MERGE_METHODS = (
    MergeMethod(
        name="karcher",
        pretty_name="Karcher Mean",
        reference_url="https://en.wikipedia.org/wiki/Karcher_mean",
        parameters=catalogue.parameters("karcher"),
        base_model="none",
        min_inputs=1,
        max_inputs=None,
        merge=_run_karcher,
        embeddings="common rows",
    ),
)
