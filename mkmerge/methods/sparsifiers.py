"""Sparsifiers of the task-vector family: which entries of a delta survive (docs/methods.md).

Each takes a delta and its model's density (plus gamma or epsilon) and returns the delta
with the dropped entries zeroed. Deterministic ones select by magnitude without a full sort
(:func:`top_k_mask`); random ones draw from NumPy's PCG64 seeded with the input's
generator seed, on the CPU, so the mask is the same for any thread count and device.
:func:`check_sparsifier_parameters` is the one place that decides which parameters are
refused, so a plan can refuse them before any tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from mkmerge.methods.reductions import BLOCK
from mkmerge.methods.sort_order import ASCENDING, DESCENDING, first_masks
from mksuite.common.errors import MergeError, RecipeError

# --- parameter checks (no tensor data needed)


def check_sparsifier_parameters(sparsifier: str, density: float, numel: int, options: Mapping[str, float]) -> None:
    """Raise the error sparsifier ``sparsifier`` would raise on a delta of ``numel`` entries.

    ``options`` holds the model's other per-model parameters (``gamma``, ``epsilon``). A value
    outside its domain is the recipe's fault (RecipeError, exit 2); a valid density that keeps
    nothing of this particular tensor is a MergeError (exit 7). Density ≥ 1 keeps everything,
    so nothing else is checked then.
    """
    if density >= 1:
        return
    if density < 0:
        raise RecipeError(
            f"density {density:g} is negative; it is the fraction of delta entries kept",
            field="density",
            hint="set `density` between 0 and 1",
        )
    if sparsifier == "magnitude":
        _require_kept(density, numel)
    elif sparsifier == "breadcrumbs":
        gamma = float(options["gamma"])
        if not 0 <= gamma <= 1:
            raise RecipeError(
                f"gamma {gamma:g} is not a fraction between 0 and 1 "
                "(it is the share of largest-magnitude delta entries dropped as outliers)",
                field="gamma",
                hint="set `gamma` between 0 and 1 (default 0.01)",
            )
        _require_kept(density, numel)
    elif sparsifier == "della":
        epsilon = float(options["epsilon"])
        if epsilon < 0:
            raise RecipeError(
                f"epsilon {epsilon:g} is negative; it is the half-width of DELLA's keep-probability range",
                field="epsilon",
                hint="set `epsilon` to 0 or more (default 0.15)",
            )
        if density > 0 and not (density - epsilon > 0 and density + epsilon < 1):
            raise RecipeError(
                f"DELLA keeps entries with probabilities from density − epsilon to density + epsilon, "
                f"which must lie strictly between 0 and 1; density {density:g} and epsilon {epsilon:g} "
                f"give {density - epsilon:g} to {density + epsilon:g}",
                field="epsilon",
                hint="lower `epsilon` or move `density` away from 0 and 1 "
                "so that 0 < density − epsilon and density + epsilon < 1",
            )


def _require_kept(density: float, numel: int) -> None:
    if int(density * numel) <= 0:
        raise MergeError(
            f"density {density:g} keeps floor({density:g} × {numel}) = 0 entries of a tensor "
            f"with {numel} elements, so its whole delta would vanish",
            hint=f"raise `density` to at least {1 / numel:.3g} for this tensor "
            "(a filter can set it for this tensor alone)",
        )


# --- selection by magnitude


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries: the set ``torch.argsort(magnitudes.flatten(),
    descending=True)[:k]`` holds on the CPU, ties included (:mod:`sort_order`), found by
    selection instead of a full sort. ``magnitudes`` must be non-negative."""
    return first_masks(magnitudes, [k], DESCENDING)[0]


def magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``floor(density·numel)`` entries of largest |δ| (TIES trim); zero the rest.

    Among equal magnitudes at the cut, the ones torch's CPU sort puts first. ``k = 0`` is an error
    rather than a silently vanished delta.
    """
    _require_kept(density, delta.numel())
    return delta * top_k_mask(delta.abs(), int(density * delta.numel()))


def breadcrumbs_sparsify(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest outliers and the smallest entries of |δ|.

    See :func:`breadcrumbs_mask`. Keeping nothing (``floor(density·numel) = 0``) and a gamma
    outside [0, 1] are errors, as for TIES.
    """
    check_sparsifier_parameters("breadcrumbs", density, delta.numel(), {"gamma": gamma})
    return delta * breadcrumbs_mask(delta.abs(), density, gamma)


def breadcrumbs_mask(magnitudes: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep-mask of positions ``[bot, N − top)`` of |δ| in ascending order (docs/methods.md).

    ``keep = floor(density·N)``, ``top = floor(gamma·N)``, ``bot = N − keep − top``; when
    ``bot < 0`` the outlier cut shrinks (``top += bot``, ``bot = 0``), so exactly ``keep``
    entries survive. The order is that of ``torch.argsort(|δ|.flatten())`` on the CPU (its
    choice among equal magnitudes included, :mod:`sort_order`); the band is the first
    ``N − top`` entries minus the first ``bot``, found by selection, without a sort.
    With ``top = 0`` (``gamma·N < 1``: gamma 0, or a small tensor at the default gamma) the
    band is ``[bot, N)``, the ``keep`` largest entries; mergekit's negative slice end keeps
    nothing there and wipes the whole delta (docs/methods.md).
    """
    numel = magnitudes.numel()
    keep, top = int(density * numel), int(gamma * numel)
    bot = numel - keep - top
    if bot < 0:
        top, bot = top + bot, 0
    below_band, through_band = first_masks(magnitudes, [bot, numel - top], ASCENDING)
    return through_band & ~below_band


# --- random drops


def uniform_draws(numel: int, generator: torch.Generator, offset: int = 0) -> np.ndarray:
    """``numel`` uniform 32-bit integers, one per entry in row-major order.

    NumPy's PCG64 seeded with the generator's seed (``generator.initial_seed()``): it runs
    serially on the CPU, so the draws are the same for any thread count and for tensors on
    any device, and it is several times faster than torch's CPU ``rand``. DARE and DELLA
    draw the same stream, so DELLA with epsilon 0 drops exactly what DARE drops.

    ``offset``: the draws of a chunk starting at that (even: each 64-bit PCG64 output gives
    two draws) entry, equal to that slice of the whole tensor's draws.
    """
    return _draws_from(generator, offset).random_raw((numel + 1) // 2).view(np.uint32)[:numel]


def _draws_from(generator: torch.Generator, offset: int) -> np.random.PCG64:
    """The PCG64 stream of :func:`uniform_draws`, advanced to entry ``offset`` (even)."""
    if offset % 2:
        raise ValueError(f"draws for a chunk must start at an even entry, not {offset}")
    bits = np.random.PCG64(generator.initial_seed())
    if offset:
        bits.advance(offset // 2)
    return bits


def random_sparsify(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE drop).

    An entry is kept where its draw ``u < floor(density·2³²)`` (:func:`uniform_draws`).
    """
    return delta * dare_mask(delta.shape, density, generator).to(delta.device)


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator, offset: int = 0) -> torch.Tensor:
    """The boolean keep-mask of :func:`random_sparsify` (of a chunk starting at ``offset``)."""
    numel = math.prod(shape)
    if density >= 1:
        return torch.ones(tuple(shape), dtype=torch.bool)
    threshold = np.uint32(min(int(density * 2**32), 2**32 - 1))
    # uniform_draws' stream, drawn a block at a time: the blocks' draws are small and reused
    # by the allocator, where the whole stream would be a fresh 4 bytes per entry.
    bits = _draws_from(generator, offset)
    keep = np.empty(numel, dtype=bool)
    for start in range(0, numel, DRAW_BLOCK):
        stop = min(numel, start + DRAW_BLOCK)
        np.less(
            bits.random_raw((stop - start + 1) // 2).view(np.uint32)[: stop - start], threshold, out=keep[start:stop]
        )
    return torch.from_numpy(keep).view(tuple(shape))


DRAW_BLOCK = 1 << 20  # even: each 64-bit output is two draws


def della_sparsify(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with a probability that rises with its rank in its row.

    See :func:`della_mask`. ``density ≤ 0`` drops everything; otherwise the probabilities
    ``density ± epsilon`` must lie strictly inside (0, 1), else a MergeError. (The caller
    returns the delta untouched for density ≥ 1.)
    """
    check_sparsifier_parameters("della", density, delta.numel(), {"epsilon": epsilon})
    if density <= 0:
        return torch.zeros_like(delta)
    return delta * della_mask(delta.abs(), density, epsilon, generator).to(delta.device)


def della_mask(magnitudes: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Keep-mask of DELLA: per row, ``p = (density − ε) + 2ε·rank/(n − 1)``, Bernoulli(p).

    Rows run along the last axis: each ``W[r, :]`` of a matrix, each ``W[e, r, :]`` of a 3-D
    fused-expert tensor (one expert's rows, like the 2-D case; mergekit ranks 3-D tensors
    along axis 1, mixing an expert's output rows, which has no meaning for the expert);
    a 1-D tensor (or a scalar) is one row. ``rank`` is 0 for the smallest |δ| of the row and
    n − 1 for the largest, ties ordered by index (stable sort); ``p`` is evaluated in float64
    exactly as written. A row of length 1 has no spread (mergekit divides 0/0) and uses
    ``p = density``. The entry is kept where its draw ``u < floor(p·2³²)`` (draws of
    :func:`uniform_draws`, row-major), so with ε = 0 this is DARE's mask.
    """
    numel = magnitudes.numel()
    if numel == 0:
        return torch.zeros(magnitudes.shape, dtype=torch.bool)
    width = magnitudes.shape[-1] if magnitudes.dim() else 1
    rows = magnitudes.reshape(-1, width)
    draws = uniform_draws(numel, generator)
    keep = torch.empty(numel, dtype=torch.bool)
    low, span = density - epsilon, 2 * epsilon
    step = max(1, BLOCK // width)  # rows per chunk: bounds the int64 rank temporaries
    positions = torch.arange(width, dtype=torch.int64)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].cpu()
        if width == 1:
            probability = torch.full(chunk.shape, density, dtype=torch.float64)
        else:
            order = torch.argsort(chunk, dim=1, stable=True)
            ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
            probability = low + span * ranks.to(torch.float64) / (width - 1)
        first, stop = start * width, (start + chunk.shape[0]) * width
        u = torch.from_numpy(draws[first:stop].astype(np.int64)).view(chunk.shape)
        keep[first:stop] = (u < torch.floor(probability * 2**32)).view(-1)
    return keep.view(magnitudes.shape)
