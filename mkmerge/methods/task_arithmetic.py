"""Task-vector family: task_arithmetic, ties, dare_linear, dare_ties (SPEC §2.6).

Every member is the same pipeline over deltas ``δ_i = W_i − W_b``: sparsify each delta,
weight it, optionally keep only the entries that agree with the elected sign, sum, optionally
normalise, scale by lambda, add back to the base. Members differ only in the sparsifier, the
sign consensus and two defaults (:data:`TASK_VECTOR_VARIANTS`); a new member (breadcrumbs,
della) is a new entry in :data:`SPARSIFIERS` plus a row in that table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from common.errors import MergeError
from mkmerge.methods.reductions import Index, Term, l1_norm, require_same_shape, stacked_sum

# Below this L1 norm (before or after sparsifying) the rescale factor is not trusted.
RESCALE_EPS = 1e-7
# |Σ w| below this is treated as zero when normalising without consensus.
WEIGHT_SUM_EPS = 1e-8


@dataclass(frozen=True)
class TaskVectorVariant:
    """What distinguishes one member of the family (SPEC §2.6 table)."""

    sparsifier: str  # key of SPARSIFIERS
    consensus: bool  # TIES sign election
    normalize_default: bool
    rescale_default: bool


# Note the inconsistent normalize defaults (ties true, dare_ties false): recipes rely on them.
TASK_VECTOR_VARIANTS: dict[str, TaskVectorVariant] = {
    #                                  sparsifier   consensus  normalize  rescale
    "task_arithmetic": TaskVectorVariant("none", False, False, False),
    "ties": TaskVectorVariant("magnitude", True, True, False),
    "dare_linear": TaskVectorVariant("random", False, False, True),
    "dare_ties": TaskVectorVariant("random", True, False, True),
}


# --- sparsifiers: (delta, density, generator, options) -> delta with dropped entries zeroed


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries; among equal values the lowest indices win.

    The same set as ``torch.argsort(magnitudes.flatten(), descending=True, stable=True)[:k]``
    but found by selection (``kthvalue``) instead of a full sort. Because the order is total
    (value, then index), masks for different k are nested.
    """
    flat = magnitudes.reshape(-1)
    numel = flat.numel()
    if k >= numel:
        return torch.ones(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)
    if k <= 0:
        return torch.zeros(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)
    threshold = torch.kthvalue(flat, numel - k + 1).values  # the k-th largest value
    keep = flat > threshold
    missing = k - int(keep.sum().item())
    equal = flat == threshold
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    keep |= equal & (torch.cumsum(equal, dim=0, dtype=index_dtype) <= missing)
    return keep.view(magnitudes.shape)


def magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``floor(density·numel)`` entries of largest |δ| (TIES trim); zero the rest.

    Magnitudes are compared in float32 and ties broken by lowest index. ``k = 0`` is an error
    rather than a silently vanished delta.
    """
    numel = delta.numel()
    k = int(density * numel)
    if k <= 0:
        raise MergeError(
            f"density {density:g} keeps floor({density:g} × {numel}) = 0 entries of a tensor "
            f"with {numel} elements, so its whole delta would vanish",
            hint=f"raise `density` to at least {1 / numel:.3g} for this tensor "
            "(a filter can set it for this tensor alone)",
        )
    return delta * top_k_mask(delta.abs().float(), k)


def random_sparsify(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE drop).

    The mask is ``torch.rand(shape, generator=generator) < density``, drawn in float32 on
    the CPU in row-major order (torch's CPU uniform sampler is serial), so it is the same
    for any thread count and for tensors on any device.
    """
    draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu")
    return delta * (draws < density).to(delta.device)


Sparsifier = Callable[[torch.Tensor, float, torch.Generator | None, Mapping[str, float]], torch.Tensor]
"""(delta, density, generator, per-model options such as gamma/epsilon) -> sparsified delta."""


def _keep_all(delta, density, generator, options):
    return delta


def _by_magnitude(delta, density, generator, options):
    return magnitude_sparsify(delta, density)


def _at_random(delta, density, generator, options):
    if generator is None:
        raise ValueError("a random sparsifier needs a torch.Generator for every input")
    return random_sparsify(delta, density, generator)


SPARSIFIERS: dict[str, Sparsifier] = {
    "none": _keep_all,
    "magnitude": _by_magnitude,
    "random": _at_random,
}


def rescale_l1(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm matches ``original``'s (skipped when either is ~0).

    The factor is a float64 ratio of thread-invariant float64 norms, applied as a scalar
    (float32 arithmetic for bfloat16/float16 tensors), so the rounding happens once.
    """
    before = l1_norm(original)
    after = l1_norm(kept)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def sparsify(
    delta: torch.Tensor,
    density: float,
    *,
    sparsifier: str,
    rescale: bool,
    generator: torch.Generator | None = None,
    options: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """One delta through its sparsifier and the optional L1 rescale; density ≥ 1 keeps all."""
    if sparsifier == "none" or density >= 1:
        return delta
    kept = SPARSIFIERS[sparsifier](delta, density, generator, options or {})
    return rescale_l1(delta, kept) if rescale else kept


# --- the merge


def task_vector_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    sparsifier: str = "none",
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    generators: Sequence[torch.Generator | None] | None = None,
    sparsifier_options: Sequence[Mapping[str, float]] | None = None,
) -> torch.Tensor:
    """``W_b + λ·merge(sparsify(W_i − W_b))``, computed in the base's dtype (SPEC §2.6).

    Rounding follows the structure of mergekit's computation in that dtype: deltas, the
    weighted deltas ``ω_i = w_i·δ̃_i`` (w rounded to the dtype), the sign-election sum Σω,
    the masked sums D and S (float32 accumulation for half types, as torch sums a stacked
    dim 0), the division, the lambda scaling (skipped when λ = 1), the final addition.
    With no ordinary inputs the base is returned as it is.
    """
    count = len(tensors)
    if not (len(weights) == len(densities) == count):
        raise ValueError(f"{count} tensors, {len(weights)} weights, {len(densities)} densities")
    if sparsifier not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {sparsifier!r}; known: {', '.join(SPARSIFIERS)}")
    if count == 0:
        return base
    require_same_shape([base, *tensors], what="task-vector merge")
    generators = list(generators) if generators is not None else [None] * count
    options = list(sparsifier_options) if sparsifier_options is not None else [{}] * count
    dtype, device = base.dtype, base.device

    weighted: list[torch.Tensor] = []
    for i, tensor in enumerate(tensors):
        delta = tensor.to(dtype) - base
        kept = sparsify(
            delta,
            float(densities[i]),
            sparsifier=sparsifier,
            rescale=rescale,
            generator=generators[i],
            options=options[i],
        )
        # kept is always a fresh tensor here (at worst the delta itself), so scale in place.
        weighted.append(kept.mul_(torch.tensor(float(weights[i]), dtype=dtype, device=device)))
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=device)

    if consensus:
        mixed, divisor = _consensus_sums(weighted, w, base.shape, dtype, device)
    else:
        mixed = stacked_sum([_part(x) for x in weighted], base.shape, dtype, device)
        divisor = w.sum()
        if abs(divisor.item()) < WEIGHT_SUM_EPS:
            divisor = torch.ones((), dtype=dtype, device=device)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(dtype)


def _consensus_sums(
    weighted: list[torch.Tensor],
    w: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES "sum" election: D = Σ ω_i where sign(ω_i) = elected sign; S = Σ w_i there (0 → 1).

    The elected sign is + where the dtype-rounded Σω ≥ 0. Entries with ω_i = 0 (dropped by
    the sparsifier, or a zero weight) never agree with either sign.
    """
    positive = stacked_sum([_part(x) for x in weighted], shape, dtype, device) >= 0

    def agrees(i: int, block: Index) -> torch.Tensor:
        x = weighted[i][block]
        return torch.where(positive[block], x > 0, x < 0)

    def masked_delta(i: int) -> Term:
        return lambda block: weighted[i][block] * agrees(i, block)

    def masked_weight(i: int) -> Term:
        return lambda block: agrees(i, block).to(dtype) * w[i]

    indices = range(len(weighted))
    mixed = stacked_sum([masked_delta(i) for i in indices], shape, dtype, device)
    divisor = stacked_sum([masked_weight(i) for i in indices], shape, dtype, device)
    divisor.masked_fill_(divisor == 0, 1)
    return mixed, divisor


def _part(tensor: torch.Tensor) -> Term:
    return lambda block: tensor[block]
