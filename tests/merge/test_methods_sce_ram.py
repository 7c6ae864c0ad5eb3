"""SCE (docs/methods.md) and RAM / RAM+ (docs/methods.md) against plain torch computations."""

from __future__ import annotations

import math

import pytest
import torch

from mkmerge.methods.ram import ram_merge, ramplus_tl_merge
from mkmerge.methods.sce import sce_merge
from mksuite.common.errors import ShapeMismatchError

from method_helpers import bits, threads


def family(count, shape=(23, 41), dtype=torch.float32, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    tensors = [(base.float() + spread * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]
    return base, tensors


# --- plain references --------------------------------------------------------------------------


def reference_sce(base, tensors, select_topk):
    """docs/methods.md on a stack: torch.var, torch.topk (ties as it breaks them), stacked sums."""
    dtype = base.dtype
    tau = torch.stack([t.to(dtype) - base for t in tensors])
    if select_topk < 1:
        variance = torch.var(tau, dim=0, unbiased=False)
        k = math.floor(select_topk * int((variance != 0).sum()))
        keep = torch.zeros(variance.numel(), dtype=dtype)
        if k > 0:
            keep[torch.topk(variance.float().flatten(), k).indices] = 1
        tau = tau * keep.view(variance.shape)
    elected = torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0).to(dtype)
    agree = tau.sign() == elected
    # mergekit's arithmetic in the dtype: squares rounded, each mean rounded, the total as a
    # Python float. A stack small enough for torch to reduce on one thread: torch's own mean, as
    # mergekit runs it; a larger one (torch would split it across threads): the exact mean, rounded.
    if tau.numel() <= 32768:
        energies = tau.pow(2).mean(dim=list(range(1, tau.dim())))
    else:
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        exact = [math.fsum(x.pow(2).double().flatten().tolist()) / base.numel() for x in tau]
        energies = torch.tensor(exact, dtype=torch.float64).to(wide).to(dtype)
    total = energies.sum().item()
    c = torch.ones(len(tensors), dtype=dtype) / len(tensors) if abs(total) < 1e-6 else energies / total
    c = c.view(-1, *[1] * base.dim())
    numerator = (tau * c * agree).sum(dim=0)
    divisor = (agree.to(dtype) * c).sum(dim=0).clamp(min=1e-6)
    return base + numerator / divisor


def reference_ram(base, tensors, epsilon=1e-5, boost=None):
    """docs/methods.md on a stack; RAM+ boosts each model's unique entries with a scalar multiply."""
    dtype = base.dtype
    tau = torch.stack([t.to(dtype) - base for t in tensors])
    active = tau.abs() > epsilon
    count = active.sum(dim=0)
    mean = (tau * active).sum(dim=0) / count.clamp(min=1).to(dtype)
    if boost is not None:
        r, alpha = boost
        boosted = mean.clone()
        for a in active:
            alone = a & (count == 1)
            unique, shared = int(alone.sum()), int((a & (count >= 2)).sum())
            if unique:
                scale = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
                boosted = torch.where(alone, mean * scale, boosted)
        mean = boosted
    return base + mean


# --- SCE ------------------------------------------------------------------------------------------

# Base 0. τ1 = [1, 2, 0, -1], τ2 = [3, -2, 0, -1]; Σ = [4, 0, 0, -2] elects [+, +, +, -].
# Agreeing: m1 = [1, 1, 0, 1], m2 = [1, 0, 0, 1]. e = [6/4, 14/4] -> c = [0.3, 0.7].
# out = [(0.3 + 2.1)/1, 0.6/0.3, 0/1e-6, (-0.3 - 0.7)/1] = [2.4, 2, 0, -1].
SCE_HAND = [[1.0, 2.0, 0.0, -1.0], [3.0, -2.0, 0.0, -1.0]]


def test_sce_weights_agreeing_entries_by_each_models_delta_energy_on_a_hand_case():
    base = torch.zeros(4, dtype=torch.float64)
    out = sce_merge(base, [torch.tensor(x, dtype=torch.float64) for x in SCE_HAND])
    torch.testing.assert_close(out, torch.tensor([2.4, 2.0, 0.0, -1.0], dtype=torch.float64), rtol=1e-15, atol=0)


def test_sce_selects_among_positions_whose_variance_is_not_zero():
    # variances [1, 4, 0, 0]: two non-zero, so select_topk 0.5 keeps k = 1 position: index 1.
    # τ1 = [0, 2, 0, 0], τ2 = [0, -2, 0, 0]: Σ = 0 elects +, only τ1 agrees; c = [0.5, 0.5].
    base = torch.zeros(4, dtype=torch.float64)
    out = sce_merge(base, [torch.tensor(x, dtype=torch.float64) for x in SCE_HAND], select_topk=0.5)
    assert out.tolist() == [0.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("select_topk", [0.0, -1.0, 0.05])  # 0.05 × 10 positions: k = 0
def test_sce_selecting_nothing_returns_the_base_values(select_topk):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(10, generator=g)
    tensors = [base + torch.randn(10, generator=g), base + torch.randn(10, generator=g)]
    assert torch.equal(sce_merge(base, tensors, select_topk=select_topk), base)
    assert not torch.equal(sce_merge(base, tensors, select_topk=0.1), base)  # k = 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_matches_the_plain_reference_bit_for_bit(dtype, select_topk):
    for count in (1, 2, 3, 5):  # 5 inputs: the stacked (non-streamed) sums
        base, tensors = family(count, dtype=dtype, seed=count)
        out = sce_merge(base, tensors, select_topk=select_topk)
        assert out.dtype == dtype
        assert bits(out) == bits(reference_sce(base, tensors, select_topk)), count


def test_sce_uses_uniform_coefficients_when_the_deltas_carry_almost_no_energy():
    base = torch.zeros(6, dtype=torch.float64)
    tensors = [
        torch.tensor([1e-4, 0, 0, 0, 0, 0], dtype=torch.float64),
        torch.tensor([3e-4, 0, 0, 0, 0, -1e-4], dtype=torch.float64),
    ]
    out = sce_merge(base, tensors)  # Σ e = (1e-8 + 1e-7) / 6 < 1e-6: c = [0.5, 0.5]
    torch.testing.assert_close(out, torch.tensor([2e-4, 0, 0, 0, 0, -1e-4], dtype=torch.float64), rtol=1e-12, atol=0)
    assert bits(out) == bits(reference_sce(base, tensors, 1.0))


def test_sce_across_several_blocks_matches_the_reference_for_any_thread_count():
    base, tensors = family(3, shape=(1100, 1000), seed=9)  # more than one 2^20-element block
    results = []
    for n in (1, 2):
        with threads(n):
            results.append(bits(sce_merge(base, tensors, select_topk=0.3)))
    assert results[0] == results[1] == bits(reference_sce(base, tensors, 0.3))


def test_sce_with_no_other_model_returns_the_base_and_refuses_mismatched_shapes():
    base = torch.randn(3)
    assert sce_merge(base, []) is base
    with pytest.raises(ShapeMismatchError):
        sce_merge(base, [torch.randn(4)])


# --- RAM ------------------------------------------------------------------------------------------

# Base 0. Model 1 changes positions 0-9 alone and 10 with model 2; model 2 changes 10 and 11 (alone).
# RAM: [1]*10 + [(1 + 3)/2, 5]. RAM+: model 1 has ρ = 1/10 -> ×(1 + 0.1·0.1) on its unique entries,
# model 2 ρ = 1/1 capped at 0.2 -> ×(1 + 0.1·0.2) on position 11.
RAM_HAND = [[1.0] * 10 + [1.0, 0.0], [0.0] * 10 + [3.0, 5.0]]


def test_ram_averages_only_the_models_that_changed_an_entry_on_a_hand_case():
    base = torch.zeros(12, dtype=torch.float64)
    tensors = [torch.tensor(x, dtype=torch.float64) for x in RAM_HAND]
    assert ram_merge(base, tensors).tolist() == [1.0] * 10 + [2.0, 5.0]
    expected = torch.tensor([1.01] * 10 + [2.0, 5.1], dtype=torch.float64)
    torch.testing.assert_close(ramplus_tl_merge(base, tensors), expected, rtol=1e-15, atol=0)


def test_ram_ignores_changes_not_larger_than_epsilon():
    base = torch.zeros(3, dtype=torch.float64)
    tensors = [torch.tensor([1e-6, 0.5, 2.0], dtype=torch.float64), torch.tensor([0.0, 1e-5, 4.0], dtype=torch.float64)]
    assert ram_merge(base, tensors).tolist() == [0.0, 0.5, 3.0]
    assert ram_merge(base, tensors, epsilon=0.6).tolist() == [0.0, 0.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ram_and_ramplus_match_the_plain_reference_bit_for_bit(dtype):
    for count in (1, 2, 3, 5):
        base, tensors = family(count, dtype=dtype, seed=10 + count)
        # leave a third of each delta untouched so counts of 0, 1 and several all occur
        g = torch.Generator().manual_seed(count)
        tensors = [torch.where(torch.rand(base.shape, generator=g) < 0.4, base, t) for t in tensors]
        assert bits(ram_merge(base, tensors)) == bits(reference_ram(base, tensors)), count
        for r, alpha, epsilon in [(0.1, 0.2, 1e-5), (0.5, 2.0, 1e-3)]:
            out = ramplus_tl_merge(base, tensors, epsilon=epsilon, r=r, alpha=alpha)
            assert out.dtype == dtype
            assert bits(out) == bits(reference_ram(base, tensors, epsilon, boost=(r, alpha))), (count, r)


def test_ramplus_without_boost_strength_is_ram():
    base, tensors = family(3, dtype=torch.bfloat16, seed=4)
    assert bits(ramplus_tl_merge(base, tensors, r=0.0)) == bits(ram_merge(base, tensors))


def test_ram_with_no_other_model_returns_the_base():
    base = torch.randn(3)
    assert ram_merge(base, []) is base and ramplus_tl_merge(base, []) is base
