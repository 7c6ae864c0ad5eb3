"""SCE: select, calculate, erase (docs/methods.md).

Deltas from the base are cut to the positions where the models disagree most (highest
variance across models), each model gets a coefficient from its delta's mean square, and
only entries agreeing with the elected sign are averaged with those coefficients. There
are no per-model weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.declaration import MergeMethod, MethodCall, required_base
from mkmerge.methods.reductions import TORCH_GRAIN, blocks, exact_sum, plain_partials, require_same_shape, stacked_sum
from mkmerge.methods.sort_order import TOPK, first_masks

# Σ e_j below this: the coefficients are uniform instead of energy-proportional.
ENERGY_EPS = 1e-6
# Floor of the per-entry coefficient sum Σ c_i·m_i (entries no model agrees on stay at base).
DIVISOR_FLOOR = 1e-6


def sce_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """``W_b + Σ c_i·m_i⊙τ_i / max(Σ c_i·m_i, 1e-6)`` over the selected deltas τ_i, in the base dtype.

    Select (``select_topk < 1``): population variance of the τ_i across models per position;
    ``k = floor(select_topk × positions with non-zero variance)`` highest-variance positions
    are kept in every τ_i (the set ``torch.topk`` picks, ties included:
    :mod:`sort_order`), all others zeroed;
    ``k ≤ 0`` zeroes everything, so the base comes back. Erase: ``m_i`` = sign of τ_i agrees
    with the sign of Σ τ_i (``+`` where the sum is ≥ 0; zero entries never agree). Calculate:
    ``e_i = mean(τ_i²)``, ``c_i = e_i/Σ e_j``, uniform 1/M when ``Σ e_j < 1e-6``, in the
    dtype (:func:`energy_coefficients`). Sums across models round like ``torch.stack(...).sum(0)``.
    """
    if not tensors:
        return base
    require_same_shape([base, *tensors], what="sce merge")
    dtype, device, shape = base.dtype, base.device, base.shape
    deltas = [tensor.to(dtype) - base for tensor in tensors]
    if select_topk < 1:
        keep = top_variance_mask(deltas, select_topk)
        for delta in deltas:
            delta.mul_(keep)
    flats = [delta.reshape(-1) for delta in deltas]
    positive = stacked_sum([_term(f) for f in flats], shape, dtype, device).reshape(-1) >= 0
    agrees = [torch.where(positive, f > 0, f < 0) for f in flats]
    del positive
    coefficients = energy_coefficients(deltas)
    terms = list(zip(flats, agrees, coefficients))
    numerator = stacked_sum([lambda b, f=f, a=a, w=w: f[b] * w * a[b] for f, a, w in terms], shape, dtype, device)
    divisor = stacked_sum([lambda b, a=a, w=w: a[b].to(dtype) * w for _, a, w in terms], shape, dtype, device)
    return base + numerator / divisor.clamp_min_(DIVISOR_FLOOR)


def top_variance_mask(deltas: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Keep-mask of the ``floor(select_topk × non-zero-variance count)`` highest-variance positions.

    The population variance across models is a float64 two-pass ``mean((τ − mean τ)²)`` per
    block of positions, rounded to the deltas' dtype. ``torch.var(stack, dim=0,
    unbiased=False)`` on the CPU accumulates in float64 too, so the two agree but for rare
    last-bit double roundings; this is 2-3x faster than torch's Welford loop over a
    non-contiguous dim, and unlike ``torch.var`` on a GPU (float32 accumulation) it selects
    the same positions on any device.
    """
    variance = torch.empty(deltas[0].shape, dtype=deltas[0].dtype, device=deltas[0].device)
    flat_variance = variance.view(-1)
    flats = [delta.reshape(-1) for delta in deltas]
    for block in blocks(variance.numel()):
        stack = torch.stack([f[block].to(torch.float64) for f in flats])
        stack.sub_(stack.mean(dim=0)).square_()
        flat_variance[block] = stack.mean(dim=0)
    k = int(select_topk * int(torch.count_nonzero(variance).item()))
    return first_masks(variance, [k], TOPK)[0]


def energy_coefficients(deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``c_i = mean(τ_i²) / Σ_j mean(τ_j²)``, uniform ``1/M`` when the total is below 1e-6.

    In the deltas' dtype, one torch op at a time as mergekit 0.1.5 computes it (bit for bit
    on bfloat16 models): the squares, each mean, the total (as a Python float) and each
    quotient are rounded to the dtype. A mean that torch would split across threads (a delta
    longer than its grain) is accumulated exactly and rounded once, which keeps it the same
    for any thread count. Returns 0-dim tensors.
    """
    dtype, device = deltas[0].dtype, deltas[0].device
    numel = deltas[0].numel()
    if numel * len(deltas) <= TORCH_GRAIN:
        energies = torch.stack(list(deltas)).pow(2).mean(dim=list(range(1, deltas[0].dim() + 1)))
    else:
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        means = [exact_sum(plain_partials(delta.pow(2))) / max(numel, 1) for delta in deltas]
        energies = torch.tensor(means, dtype=wide, device=device).to(dtype)
    total = energies.sum().item()
    if abs(total) < ENERGY_EPS:
        return list(torch.ones(len(deltas), dtype=dtype, device=device) / len(deltas))
    return list(energies / total)


def _term(flat: torch.Tensor):
    return lambda block: flat[block]


# --- declaration


def _run_sce(call: MethodCall) -> torch.Tensor:
    return sce_merge(required_base(call), call.tensors, select_topk=float(call.params["select_topk"]))


MERGE_METHODS = (
    MergeMethod(
        name="sce",
        pretty_name="SCE",
        reference_url="https://arxiv.org/abs/2408.07990",
        parameters=catalogue.parameters("sce"),
        base_model="required",
        min_inputs=1,
        max_inputs=None,
        merge=_run_sce,
    ),
)
