"""The task-vector family's shared pieces: the variants table and steps 5–7 of the merge.

:func:`combine_weighted` (the (elected) sum of the weighted deltas, normalised, scaled,
added to the base) is element-wise, so the whole-tensor form
(:mod:`mkmerge.methods.task_arithmetic`) and the chunked form
(:mod:`mkmerge.methods.task_vector_chunked`) both end with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mkmerge.methods.reductions import (
    BLOCK,
    STREAMED_TERMS_MAX,
    BlockSummer,
    Term,
    blocks,
    stacked_sum,
)

# Below this L1 norm (before or after sparsifying) the rescale factor is not trusted.
RESCALE_EPS = 1e-7
# |Σ w| below this is treated as zero when normalising without consensus.
WEIGHT_SUM_EPS = 1e-8


@dataclass(frozen=True)
class TaskVectorVariant:
    """What distinguishes one member of the family (docs/methods.md table)."""

    sparsifier: str  # key of task_arithmetic.SPARSIFIERS
    consensus: bool  # TIES sign election
    normalize_default: bool
    rescale_default: bool


# Note the inconsistent normalize defaults (ties and della true, dare_ties and
# breadcrumbs_ties false): recipes rely on them.
TASK_VECTOR_VARIANTS: dict[str, TaskVectorVariant] = {
    #                                  sparsifier   consensus  normalize  rescale
    "task_arithmetic": TaskVectorVariant("none", False, False, False),
    "ties": TaskVectorVariant("magnitude", True, True, False),
    "dare_linear": TaskVectorVariant("random", False, False, True),
    "dare_ties": TaskVectorVariant("random", True, False, True),
    "breadcrumbs": TaskVectorVariant("breadcrumbs", False, False, False),
    "breadcrumbs_ties": TaskVectorVariant("breadcrumbs", True, False, False),
    "della": TaskVectorVariant("della", True, True, True),
    "della_linear": TaskVectorVariant("della", False, False, True),
}


def required_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("a random sparsifier needs a torch.Generator for every input")
    return generator


def rescale_factor(before: float, after: float, dtype: torch.dtype | None = None) -> float | None:
    """The L1 rescale factor of :func:`~mkmerge.methods.task_arithmetic.rescale_l1`, or None where it is skipped.

    ``before`` and ``after`` are the (float64) L1 norms. With ``dtype`` the factor follows
    mergekit: both norms rounded to the merge dtype and divided there, so in bfloat16 the
    factor is a bfloat16 value. With None it is the float64 ratio (``--precise``).
    """
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    if dtype is None or dtype == torch.float64:
        return before / after
    return float(torch.tensor(before, dtype=dtype) / torch.tensor(after, dtype=dtype))


def combine_weighted(
    base: torch.Tensor,
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Steps 5–7 of docs/methods.md: (elected) sum of the weighted deltas, normalise, λ, add to base.

    Element-wise throughout, so a chunk of the inputs gives that chunk of the output.
    """
    count = len(weighted)
    if count == 0:
        return base
    dtype, device = base.dtype, base.device
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=device)
    if not consensus:
        divisor = w.sum()
        if abs(divisor.item()) < WEIGHT_SUM_EPS:
            divisor = torch.ones((), dtype=dtype, device=device)
    if count > STREAMED_TERMS_MAX:  # torch's grouping of many rows: only the real stack matches
        if consensus:
            mixed, divisor = _consensus_sums(weighted, w, base.shape, dtype, device)
        else:
            mixed = stacked_sum([_part(x) for x in weighted], base.shape, dtype, device)
        return _finish(base, mixed, divisor if normalize else None, lambda_)
    out = torch.empty(base.shape, dtype=dtype, device=device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [x.reshape(-1) for x in weighted]
    summer = BlockSummer(dtype, device, min(base.numel(), BLOCK))
    for block in blocks(base.numel()):
        parts = [f[block] for f in flats]
        if consensus:
            mixed, block_divisor = _consensus_block(parts, w, summer)
        else:
            mixed, block_divisor = summer.sum_into(torch.empty_like(parts[0]), parts), divisor
        flat_out[block] = _finish(flat_base[block], mixed, block_divisor if normalize else None, lambda_)
    return out


def _finish(base: torch.Tensor, mixed: torch.Tensor, divisor: torch.Tensor | None, lambda_: float) -> torch.Tensor:
    """``base + λ·(D / S)``: divide when normalising, skip the multiply when λ = 1."""
    if divisor is not None:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)


def _consensus_block(parts: list[torch.Tensor], w: torch.Tensor, summer: BlockSummer):
    """One block of the TIES "sum" election (see :func:`_consensus_sums`)."""
    positive = summer.sum_into(torch.empty_like(parts[0]), parts) >= 0
    agrees = [torch.where(positive, x > 0, x < 0) for x in parts]
    mixed = summer.sum_into(torch.empty_like(parts[0]), [x * a for x, a in zip(parts, agrees)])
    divisor = summer.sum_into(torch.empty_like(parts[0]), [a.to(w.dtype) * w[i] for i, a in enumerate(agrees)])
    divisor.masked_fill_(divisor == 0, 1)
    return mixed, divisor


def _consensus_sums(
    weighted: list[torch.Tensor],
    w: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES "sum" election: D = Σ ω_i where sign(ω_i) = elected sign; S = Σ w_i there (0 → 1).

    The elected sign is + where the dtype-rounded Σω ≥ 0. Entries with ω_i = 0 (dropped by
    the sparsifier, or a zero weight) never agree with either sign. (Whole-tensor form, used
    with more than STREAMED_TERMS_MAX inputs; :func:`_consensus_block` is the same per block.)
    """
    positive = stacked_sum([_part(x) for x in weighted], shape, dtype, device) >= 0
    agrees = [torch.where(positive, x > 0, x < 0) for x in weighted]
    del positive
    mixed = stacked_sum([_part(x * a) for x, a in zip(weighted, agrees)], shape, dtype, device)
    divisor = stacked_sum([_part(a.to(dtype) * w[i]) for i, a in enumerate(agrees)], shape, dtype, device)
    divisor.masked_fill_(divisor == 0, 1)
    return mixed, divisor


def _part(tensor: torch.Tensor) -> Term:
    flat = tensor.reshape(-1)
    return lambda block: flat[block]
