"""The task-vector merge as per-input rules for the fused kernels (:mod:`mkmerge.methods.fused`).

Each input's sparsifier becomes an :class:`fused.InputRule`: keep all, a magnitude threshold
key (with how many entries on the key survive, or which ones torch's sort keeps), or a DARE
mask with its L1 rescale factor. The rules give the bits of the torch form in
:mod:`mkmerge.methods.task_arithmetic`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mkmerge.methods import fused, sort_order
from mkmerge.methods.reductions import exact_sum
from mkmerge.methods.sort_order import kth_in_histogram
from mkmerge.methods.sparsifiers import dare_mask, magnitude_sparsify
from mkmerge.methods.task_vector_core import required_generator, rescale_factor


def fusable(sparsifier: str, rescale: bool, base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether :mod:`fused` computes this merge (magnitude with rescale stays in torch: rare)."""
    wanted = sparsifier in ("none", "random") or (sparsifier == "magnitude" and not rescale)
    return wanted and fused.applies(base, tensors)


def equal_policy(kept: int, equal: int) -> int:
    """How many of the ``equal`` entries sitting on the threshold key are kept: all (-1), or the first n."""
    return -1 if kept >= equal else max(0, kept)


def fused_rules(
    base, tensors, weights, densities, sparsifier, rescale, generators, *, precise: bool = False
) -> list[fused.InputRule]:
    """Per input, what :func:`fused.merge` needs to sparsify it as :func:`sparsify` would."""
    numel = base.numel()
    magnitude = [i for i in range(len(tensors)) if sparsifier == "magnitude" and float(densities[i]) < 1]
    ks = [top_k_count(numel, float(densities[i])) for i in magnitude]
    # input -> (k, threshold key, entries above it, entries on it)
    cuts = dict(zip(magnitude, fused_cuts(base, [tensors[i] for i in magnitude], ks))) if magnitude else {}
    # Where only some of the entries on the threshold survive, the sort's choice, replayed
    # for all such inputs at once (each on one thread).
    replayed = [i for i, (k, key, above, equal) in cuts.items() if sort_decides(k - above, equal, key)]
    listed = dict(
        zip(
            replayed, fused.each_on_a_thread(lambda i: _sorted_ties(base, tensors[i], cuts[i][1], cuts[i][0]), replayed)
        )
    )
    dropped = [i for i in range(len(tensors)) if sparsifier == "random" and float(densities[i]) < 1]
    # DARE: each input's draws, mask and L1 rescale factor, the inputs side by side
    masked = dict(zip(dropped, fused.each_on_a_thread(
        lambda i: random_rule(base, tensors[i], float(weights[i]), float(densities[i]), rescale, required_generator(generators[i]), precise=precise), dropped)))  # fmt: skip
    rules = []
    for i in range(len(tensors)):
        weight = float(weights[i])
        if i in listed:
            rules.append(fused.InputRule(weight, fused.MODE_LISTED, key=cuts[i][1], equal=0, listed=listed[i]))
        elif i in cuts:
            k, key, above, equal = cuts[i]
            rules.append(fused.InputRule(weight, fused.MODE_MAGNITUDE, key=key, equal=equal_policy(k - above, equal)))
        elif i in masked:
            rules.append(masked[i])
        else:
            rules.append(fused.InputRule(weight))
    return rules


def fused_cuts(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], ks: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Per input, (k, the k-th largest magnitude key of its delta, keys above it, keys equal
    to it), by radix select over the fused histograms: one 16-bit digit for the half
    formats, two for float32."""
    histograms = fused.delta_histograms(base, tensors)
    found = [kth_in_histogram(h, k) for h, k in zip(histograms, ks)]  # (digit, above)
    if fused.key_bits(base.dtype) > 16:  # float32: the low digit inside each chosen high bucket
        histograms = fused.delta_histograms(base, tensors, [bucket for bucket, _ in found])
        low = [kth_in_histogram(h, k - above) for h, k, (_, above) in zip(histograms, ks, found)]
        found = [((bucket << 16) | digit, above + above_low) for (bucket, above), (digit, above_low) in zip(found, low)]
    return [(k, key, above, int(h[key & 0xFFFF].item())) for k, (key, above), h in zip(ks, found, histograms)]


def random_rule(
    base, tensor, weight: float, density: float, rescale: bool, generator: torch.Generator, *, precise: bool = False
) -> fused.InputRule:
    """One input's DARE drop as a fused rule: its mask and, with ``rescale``, the L1 factor."""
    mask = dare_mask(base.shape, density, generator).numpy()
    factor = None
    if rescale:
        before, after = fused.delta_l1_partials(base, tensor, mask)
        factor = rescale_factor(exact_sum(before), exact_sum(after), None if precise else base.dtype)
    return fused.InputRule(weight, fused.MODE_MASK, mask=mask, factor=factor)


def sort_decides(missing: int, equal: int, key: int) -> bool:
    """Whether the sort's choice among the ``equal`` entries on the threshold ``key``, of
    which ``missing`` survive, changes the merge. Not when all or none survive, nor when the
    threshold is zero: a zero delta masked is the same zero (δ·0 keeps δ's sign)."""
    return 0 < missing < equal and key != 0


def _sorted_ties(base: torch.Tensor, tensor: torch.Tensor, key: int, k: int) -> np.ndarray:
    """Which entries on the threshold ``key`` (in index order) torch's descending sort of
    the delta's magnitudes puts among the first ``k``."""
    words, count = fused.delta_words(base, tensor, key)
    (kept,) = sort_order.replay(words, np.full(count, key, dtype=np.uint32), [k], sort_order.DESCENDING)
    return kept


def top_k_count(numel: int, density: float) -> int:
    k = int(density * numel)
    if k <= 0:
        magnitude_sparsify(torch.empty(numel, dtype=torch.uint8), density)  # raises the k = 0 error
    return k
