"""RAM and RAM+ (``ram``, ``ramplus_tl``): average only the changes that happened (docs/methods.md).

An entry of a model's delta ``τ_i = W_i − W_b`` is *active* when ``|τ_i| > epsilon``. Each
entry takes the mean of its active changes (a change made by a single model is taken whole,
one made by nobody leaves the base), instead of diluting a change with the models that left
the entry alone. RAM+ (``ramplus_tl``) also boosts each model's unique changes by how much of
its activity it shares with others. There are no per-model weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.declaration import MergeMethod, MethodCall, required_base
from mkmerge.methods.reductions import require_same_shape, stacked_sum


def ram_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """``W_b + Σ_i a_i⊙τ_i / max(c, 1)`` with ``a_i = |τ_i| > epsilon`` and ``c = Σ_i a_i``.

    Computed in the base dtype; the sum across models rounds like ``torch.stack(...).sum(0)``,
    then one division by the count. No ordinary inputs: the base itself.
    """
    return _ram(base, tensors, epsilon, boost=None)


def ramplus_tl_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    r: float = 0.1,
    alpha: float = 0.2,
) -> torch.Tensor:
    """RAM with model i's unique changes (``c = 1``) multiplied by ``1 + r·clamp(ρ_i, 0, alpha)``.

    ``ρ_i`` = (entries where model i is active together with others) / (entries where it
    alone is active, floored at epsilon), counted over the whole tensor. A model without
    unique changes has nothing to boost. The boost multiplies in float32 (float64 for
    float64 tensors), rounding once to the base dtype, as a scalar multiply would.
    """
    return _ram(base, tensors, epsilon, boost=(r, alpha))


def _ram(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    epsilon: float,
    boost: tuple[float, float] | None,
) -> torch.Tensor:
    if not tensors:
        return base
    require_same_shape([base, *tensors], what="ram merge")
    dtype, device, shape = base.dtype, base.device, base.shape
    deltas = [tensor.to(dtype) - base for tensor in tensors]
    active = [delta.abs() > epsilon for delta in deltas]
    count = torch.zeros(shape, dtype=torch.int32, device=device)
    for mask in active:
        count += mask
    flats = [(delta.reshape(-1), mask.reshape(-1)) for delta, mask in zip(deltas, active)]
    total = stacked_sum([lambda b, d=d, a=a: d[b] * a[b] for d, a in flats], shape, dtype, device)
    mean = total / count.clamp_min(1).to(dtype)
    if boost is not None:
        mean = _boost_unique(mean, active, count, epsilon, *boost)
    return base + mean


def _boost_unique(
    mean: torch.Tensor,
    active: Sequence[torch.Tensor],
    count: torch.Tensor,
    epsilon: float,
    r: float,
    alpha: float,
) -> torch.Tensor:
    unique, shared = count == 1, count >= 2
    wide = torch.float64 if mean.dtype == torch.float64 else torch.float32
    factor = torch.ones(mean.shape, dtype=wide, device=mean.device)
    for mask in active:
        alone = mask & unique
        unique_count = int(torch.count_nonzero(alone).item())
        if unique_count == 0:
            continue
        shared_count = int(torch.count_nonzero(mask & shared).item())
        ratio = shared_count / max(unique_count, epsilon)
        factor.masked_fill_(alone, 1 + r * min(max(ratio, 0.0), alpha))
    return (mean * factor).to(mean.dtype)


# --- declaration


def _run_ram(call: MethodCall) -> torch.Tensor:
    return ram_merge(required_base(call), call.tensors, epsilon=float(call.params["epsilon"]))


def _run_ramplus_tl(call: MethodCall) -> torch.Tensor:
    return ramplus_tl_merge(
        required_base(call),
        call.tensors,
        epsilon=float(call.params["epsilon"]),
        r=float(call.params["r"]),
        alpha=float(call.params["alpha"]),
    )


MERGE_METHODS = (
    MergeMethod(
        name="ram",
        pretty_name="RAM",
        reference_url=None,
        parameters=catalogue.parameters("ram"),
        base_model="required",
        min_inputs=1,
        max_inputs=None,
        merge=_run_ram,
    ),
    MergeMethod(
        name="ramplus_tl",
        pretty_name="RAM+",
        reference_url=None,
        parameters=catalogue.parameters("ramplus_tl"),
        base_model="required",
        min_inputs=1,
        max_inputs=None,
        merge=_run_ramplus_tl,
    ),
)
