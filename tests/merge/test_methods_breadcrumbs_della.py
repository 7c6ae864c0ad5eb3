"""Breadcrumbs and DELLA sparsifiers and their task-vector merges (docs/methods.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mkmerge.methods.sparsifiers import (
    breadcrumbs_mask,
    breadcrumbs_sparsify,
    check_sparsifier_parameters,
    dare_mask,
    della_mask,
    della_sparsify,
    magnitude_sparsify,
)
from mkmerge.methods.task_arithmetic import sparsify, task_vector_merge
from mksuite.common.errors import MergeError, RecipeError

from method_helpers import bits, l1_factor, threads


def fsum_l1(tensor: torch.Tensor) -> float:
    return math.fsum(tensor.double().abs().flatten().tolist())


def family(count, shape=(23, 41), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    tensors = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]
    return base, tensors


# --- plain references --------------------------------------------------------------------------


def reference_breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """docs/methods.md literally: sort |δ| ascending with torch (ties as it breaks them), keep
    positions [bot, N − top)."""
    n = delta.numel()
    keep, top = math.floor(density * n), math.floor(gamma * n)
    bot = n - keep - top
    if bot < 0:
        top += bot
        bot = 0
    ascending = torch.argsort(delta.abs().float().flatten(), stable=False)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ascending[bot : n - top]] = True
    return mask.view(delta.shape)


def reference_della_mask(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """Per row (last axis), element by element in Python floats: rank, probability, PCG64 draw."""
    width = delta.shape[-1] if delta.dim() else 1
    rows = delta.abs().double().reshape(-1, width).tolist()
    raw = np.random.PCG64(seed).random_raw((delta.numel() + 1) // 2).view(np.uint32)[: delta.numel()]
    keep = []
    for r, row in enumerate(rows):
        ranks = {j: rank for rank, j in enumerate(sorted(range(width), key=lambda j: (row[j], j)))}
        for j in range(width):
            p = density if width == 1 else (density - epsilon) + 2 * epsilon * ranks[j] / (width - 1)
            keep.append(int(raw[r * width + j]) < math.floor(p * 2**32))
    return torch.tensor(keep, dtype=torch.bool).view(delta.shape)


def reference_merge(base, tensors, weights, masks, *, consensus, normalize, rescale=False, lambda_=1.0, precise=False):
    """The family's steps 1-7 on given keep-masks, with stacked tensors and exact L1 norms."""
    dtype = base.dtype
    kept = []
    for tensor, mask in zip(tensors, masks):
        delta = tensor.to(dtype) - base
        sparse = delta * mask.to(dtype)
        if rescale and fsum_l1(delta) >= 1e-7 and fsum_l1(sparse) >= 1e-7:
            sparse = sparse * l1_factor(fsum_l1(delta), fsum_l1(sparse), dtype, precise)
        kept.append(sparse)
    w = torch.tensor(weights, dtype=dtype).view(-1, *[1] * base.dim())
    weighted = torch.stack(kept) * w
    if consensus:
        elected = (weighted.sum(dim=0) >= 0).to(dtype) * 2 - 1
        agree = weighted.sign() == elected
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(dtype)


# --- breadcrumbs --------------------------------------------------------------------------------


def test_breadcrumbs_drops_the_largest_outliers_and_the_smallest_entries_on_a_hand_case():
    # N = 10, keep = 5, top = floor(0.1 * 10) = 1, bot = 4. Ascending (torch sorts 10 entries by
    # insertion, which keeps equal ones in index order): 0.1, 0.2, 0.5, 1 (idx 2), 1 (idx 8),
    # 2 (idx 3), 2 (idx 7), 3, 4, 7. Positions 4..8 survive.
    delta = torch.tensor([0.5, -4.0, 1.0, 2.0, 3.0, 0.1, 0.2, -2.0, -1.0, 7.0])
    assert breadcrumbs_sparsify(delta, 0.5, 0.1).tolist() == [0, -4.0, 0, 2.0, 3.0, 0, 0, -2.0, -1.0, 0]


def test_breadcrumbs_mask_equals_torchs_sort_band_despite_many_ties():
    g = torch.Generator().manual_seed(1)
    for shape in [(10,), (37, 29), (4, 5, 6), (3000,)]:
        # small integers in bfloat16: almost every magnitude is shared by many entries
        delta = torch.randint(-4, 5, shape, generator=g).to(torch.bfloat16) * 0.25
        for density in (0.05, 0.5, 0.99):
            for gamma in (0.0, 0.01, 0.3):
                mask = breadcrumbs_mask(delta.abs(), density, gamma)
                expected = reference_breadcrumbs_mask(delta, density, gamma)
                assert torch.equal(mask, expected), (shape, density, gamma)
                assert int(mask.sum()) == math.floor(density * delta.numel())


def test_breadcrumbs_with_no_outliers_to_cut_keeps_the_largest_entries_instead_of_nothing():
    # gamma * N < 1: top = 0. mergekit keeps nothing here; we keep [bot, N), i.e. TIES' top-k.
    delta = torch.randn(50, generator=torch.Generator().manual_seed(2))
    for gamma in (0.0, 0.01):
        kept = breadcrumbs_sparsify(delta, 0.4, gamma)
        assert int((kept != 0).sum()) == 20
        assert torch.equal(kept, magnitude_sparsify(delta, 0.4))


def test_breadcrumbs_shrinks_the_outlier_cut_when_density_and_gamma_exceed_the_tensor():
    # N = 20, keep = 19, top = 2 -> bot = -1: top becomes 1, bot 0, only the single largest goes.
    delta = torch.arange(1.0, 21.0)
    kept = breadcrumbs_sparsify(delta, 0.95, 0.1)
    assert kept.tolist() == list(range(1, 20)) + [0]


def test_breadcrumbs_keeping_nothing_is_a_merge_error_and_a_gamma_outside_zero_to_one_a_recipe_error():
    with pytest.raises(MergeError, match=r"density 0\.05 .* tensor with 10 elements"):
        breadcrumbs_sparsify(torch.ones(10), 0.05, 0.01)
    for gamma in (-0.1, 1.5):
        with pytest.raises(RecipeError, match="gamma") as info:
            breadcrumbs_sparsify(torch.ones(10), 0.5, gamma)
        assert "between 0 and 1" in info.value.hint


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("consensus, normalize", [(False, False), (True, False), (True, True)])
def test_breadcrumbs_merges_match_the_plain_reference_bit_for_bit(dtype, consensus, normalize):
    for count in (1, 2, 5):  # 5 inputs: the stacked (non-streamed) sums
        base, tensors = family(count, dtype=dtype, seed=count)
        weights = [0.7, -0.3, 1.2, 0.5, 0.9][:count]
        densities = [0.3, 0.5, 1.0, 0.05, 0.8][:count]
        gammas = [0.01, 0.1, 0.05, 0.0, 0.2][:count]
        out = task_vector_merge(
            base, tensors, weights, densities,
            sparsifier="breadcrumbs", consensus=consensus, normalize=normalize, lambda_=0.9,
            sparsifier_options=[{"gamma": g} for g in gammas],
        )  # fmt: skip
        masks = [
            reference_breadcrumbs_mask(t.to(dtype) - base, d, g) if d < 1 else torch.ones(base.shape, dtype=torch.bool)
            for t, d, g in zip(tensors, densities, gammas)
        ]
        expected = reference_merge(base, tensors, weights, masks, consensus=consensus, normalize=normalize, lambda_=0.9)
        assert out.dtype == dtype and bits(out) == bits(expected), count


# --- DELLA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (50,), (3, 4, 5), (6, 1), ()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_della_mask_ranks_each_row_along_the_last_axis_and_draws_per_entry(shape, dtype):
    g = torch.Generator().manual_seed(3)
    delta = (torch.randn(shape, generator=g) * 4).round().to(dtype) / 4  # many equal magnitudes
    for density, epsilon in [(0.5, 0.2), (0.3, 0.25), (0.9, 0.05)]:
        mask = della_mask(delta.abs(), density, epsilon, torch.Generator().manual_seed(41))
        expected = reference_della_mask(delta, density, epsilon, seed=41)
        assert mask.shape == delta.shape and torch.equal(mask, expected), (density, epsilon)


def test_della_keep_probability_rises_linearly_with_the_rank_in_the_row():
    delta = torch.randn(4000, 101, generator=torch.Generator().manual_seed(4))
    mask = della_mask(delta.abs(), 0.5, 0.2, torch.Generator().manual_seed(5))
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    for rank, probability in [(0, 0.3), (50, 0.5), (100, 0.7)]:
        assert mask[ranks == rank].float().mean().item() == pytest.approx(probability, abs=0.025)
    assert mask.float().mean().item() == pytest.approx(0.5, abs=0.005)


def test_della_with_epsilon_zero_drops_exactly_what_dare_drops():
    delta = torch.randn(40, 70)
    assert torch.equal(
        della_mask(delta.abs(), 0.35, 0.0, torch.Generator().manual_seed(6)),
        dare_mask(delta.shape, 0.35, torch.Generator().manual_seed(6)),
    )


def test_della_rows_of_length_one_keep_with_probability_density():
    delta = torch.randn(20000, 1, generator=torch.Generator().manual_seed(7))
    mask = della_mask(delta.abs(), 0.3, 0.1, torch.Generator().manual_seed(8))
    assert torch.equal(mask, dare_mask(delta.shape, 0.3, torch.Generator().manual_seed(8)))
    assert mask.float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_della_density_of_zero_or_less_drops_everything_and_one_keeps_everything():
    delta = torch.randn(5, 6)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(della_sparsify(delta, 0.0, 0.15, g), torch.zeros(5, 6))
    assert sparsify(delta, 1.0, sparsifier="della", rescale=True, generator=g, options={"epsilon": 0.5}) is delta


@pytest.mark.parametrize("density, epsilon", [(0.1, 0.15), (0.15, 0.15), (0.9, 0.1), (0.95, 0.15)])
def test_della_probabilities_outside_zero_to_one_are_a_recipe_error(density, epsilon):
    with pytest.raises(RecipeError, match=r"density − epsilon to density \+ epsilon") as info:
        della_sparsify(torch.randn(4, 4), density, epsilon, torch.Generator().manual_seed(1))
    assert f"density {density:g} and epsilon {epsilon:g}" in info.value.message
    assert "0 < density − epsilon and density + epsilon < 1" in info.value.hint


def test_della_negative_epsilon_is_a_recipe_error():
    with pytest.raises(RecipeError, match="epsilon -0.1 is negative"):
        check_sparsifier_parameters("della", 0.5, 16, {"epsilon": -0.1})


def test_della_mask_does_not_depend_on_thread_count():
    delta = torch.randn(600, 500, generator=torch.Generator().manual_seed(10))
    masks = []
    for n in (1, 2):
        with threads(n):
            masks.append(della_mask(delta.abs(), 0.4, 0.15, torch.Generator().manual_seed(11)))
    assert torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("consensus, normalize", [(True, True), (False, False)])  # della, della_linear
def test_della_merges_match_the_plain_reference_bit_for_bit(consensus, normalize):
    for count in (1, 3, 5):
        base, tensors = family(count, shape=(17, 23), dtype=torch.bfloat16, seed=20 + count)
        weights = [0.5, 0.8, 0.3, 1.1, 0.4][:count]
        densities = [0.3, 0.6, 0.5, 1.0, 0.0][:count]
        epsilons = [0.1, 0.15, 0.0, 0.3, 0.15][:count]
        seeds = [31, 32, 33, 34, 35][:count]
        out = task_vector_merge(
            base, tensors, weights, densities,
            sparsifier="della", consensus=consensus, normalize=normalize, rescale=True,
            generators=[torch.Generator().manual_seed(s) for s in seeds],
            sparsifier_options=[{"epsilon": e} for e in epsilons],
        )  # fmt: skip
        masks = []
        for t, d, e, s in zip(tensors, densities, epsilons, seeds):
            delta = t - base
            if d >= 1:
                masks.append(torch.ones(delta.shape, dtype=torch.bool))
            elif d <= 0:
                masks.append(torch.zeros(delta.shape, dtype=torch.bool))
            else:
                masks.append(reference_della_mask(delta, d, e, seed=s))
        expected = reference_merge(
            base, tensors, weights, masks, consensus=consensus, normalize=normalize, rescale=True
        )
        assert bits(out) == bits(expected), count


def test_della_rescale_restores_the_l1_norm_of_the_whole_tensor():
    delta = torch.randn(30, 40, generator=torch.Generator().manual_seed(12))
    kept = sparsify(
        delta, 0.4, sparsifier="della", rescale=True,
        generator=torch.Generator().manual_seed(13), options={"epsilon": 0.2},
    )  # fmt: skip
    mask = reference_della_mask(delta, 0.4, 0.2, seed=13)
    torch.testing.assert_close(kept, delta * mask * (fsum_l1(delta) / fsum_l1(delta * mask)), rtol=1e-6, atol=0)
