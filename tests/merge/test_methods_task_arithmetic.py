"""Task-vector family math: task_arithmetic, ties, dare_linear, dare_ties (docs/methods.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mkmerge.methods.reductions import l1_norm
from mkmerge.methods.sparsifiers import magnitude_sparsify, random_sparsify, top_k_mask
from mkmerge.methods.task_arithmetic import rescale_l1, sparsify, task_vector_merge
from mksuite.common.errors import MergeError

from method_helpers import bits, l1_factor, threads


def fsum_l1(tensor: torch.Tensor) -> float:
    return math.fsum(tensor.double().abs().flatten().tolist())


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def reference_merge(
    base,
    tensors,
    weights,
    densities,
    *,
    sparsifier,
    consensus,
    normalize,
    rescale=False,
    lambda_=1.0,
    seeds=(),
    precise=False,
):
    """docs/methods.md written the plain way: torch's full sort for top-k (ties as it breaks them),
    stacked tensors, float64 L1 norms."""
    dtype = base.dtype
    kept = []
    for i, tensor in enumerate(tensors):
        delta = tensor.to(dtype) - base
        density = densities[i]
        if sparsifier == "none" or density >= 1:
            kept.append(delta)
            continue
        if sparsifier == "magnitude":
            k = int(density * delta.numel())
            order = torch.argsort(delta.abs().float().flatten(), descending=True, stable=False)[:k]
            mask = torch.zeros(delta.numel(), dtype=dtype)
            mask[order] = 1
            mask = mask.view(delta.shape)
        else:
            # PCG64 seeded with the input's seed: one uint32 per entry, kept below density * 2^32
            raw = np.random.Generator(np.random.PCG64(seeds[i])).bit_generator.random_raw((delta.numel() + 1) // 2)
            draws = torch.from_numpy(raw.view(np.uint32)[: delta.numel()].astype(np.float64) / 2**32)
            mask = (draws < density).to(dtype).view(delta.shape)
        sparse = delta * mask
        if rescale and fsum_l1(delta) >= 1e-7 and fsum_l1(sparse) >= 1e-7:
            sparse = sparse * l1_factor(fsum_l1(delta), fsum_l1(sparse), dtype, precise)
        kept.append(sparse)
    deltas = torch.stack(kept)
    w = torch.tensor(weights, dtype=dtype).view(-1, *[1] * base.dim())
    weighted = deltas * w
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


def family(count, shape=(23, 41), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    tensors = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]
    return base, tensors


# --- magnitude top-k ----------------------------------------------------------------------------


def test_top_k_mask_picks_the_same_entries_as_torchs_descending_argsort_despite_many_ties():
    g = torch.Generator().manual_seed(1)
    for shape in [(11,), (40, 37), (5000,)]:
        # small integers in bfloat16: almost every magnitude is shared by many entries
        values = torch.randint(-4, 5, shape, generator=g).to(torch.bfloat16) * 0.25
        magnitudes = values.abs().float()
        numel = values.numel()
        for k in sorted({1, 2, numel // 7, numel // 2, numel - 1, numel}):
            expected = torch.zeros(numel, dtype=torch.bool)
            expected[torch.argsort(magnitudes.flatten(), descending=True, stable=False)[:k]] = True
            mask = top_k_mask(magnitudes, k)
            assert mask.shape == magnitudes.shape and int(mask.sum()) == k
            assert torch.equal(mask.flatten(), expected), (shape, k)


def test_top_k_masks_are_nested_as_k_grows():
    magnitudes = torch.tensor([1.0, 3.0, 1.0, 3.0, 2.0, 1.0])
    assert top_k_mask(magnitudes, 1).tolist() == [False, True, False, False, False, False]
    assert top_k_mask(magnitudes, 3).tolist() == [False, True, False, True, True, False]
    assert top_k_mask(magnitudes, 4).tolist() == [True, True, False, True, True, False]


def test_magnitude_sparsify_keeps_floor_of_density_times_size_entries():
    delta = torch.tensor([0.5, -4.0, 1.0, -2.0, 3.0, 0.1, 0.2])
    assert magnitude_sparsify(delta, 0.5).tolist() == [0.0, -4.0, 0.0, -2.0, 3.0, 0.0, 0.0]  # k = 3


def test_magnitude_sparsify_keeping_nothing_is_a_merge_error_naming_density_and_size():
    with pytest.raises(MergeError, match=r"density 0\.1 .* tensor with 7 elements") as info:
        magnitude_sparsify(torch.ones(7), 0.1)
    assert "raise `density`" in info.value.hint


def test_density_of_one_or_more_returns_the_delta_untouched():
    delta = torch.randn(10)
    for kind in ("none", "magnitude", "random"):
        assert sparsify(delta, 1.0, sparsifier=kind, rescale=True) is delta


# --- TIES -------------------------------------------------------------------------------------

# A hand-computed case. Trim with density 0.6 keeps 3 of 5 entries (ties: lower index first):
#   δ1 = [ 1, -2,  0.5, 0,  3] -> [ 1, -2,  0, 0,  3]
#   δ2 = [ 2,  1, -1,   0, -1] -> [ 2,  1, -1, 0,  0]   (|1| ties at 1,2,4: 1 and 2 win)
#   δ3 = [-4, 1.5, 0.25, 0, -1] -> [-4, 1.5, 0, 0, -1]
# Weights 1, 0.5, 2:  ω1 = [1,-2,0,0,3]  ω2 = [1,0.5,-0.5,0,0]  ω3 = [-8,3,0,0,-2]
# Σω = [-6, 1.5, -0.5, 0, 1] elects signs [-, +, -, +, +]; agreeing entries:
#   D = [-8, 0.5+3, -0.5, 0, 3],  S = [2, 0.5+2, 0.5, 0 -> 1, 1]
HAND_DELTAS = [
    [1.0, -2.0, 0.5, 0.0, 3.0],
    [2.0, 1.0, -1.0, 0.0, -1.0],
    [-4.0, 1.5, 0.25, 0.0, -1.0],
]
HAND_WEIGHTS = [1.0, 0.5, 2.0]


@pytest.mark.parametrize(
    "normalize, merged_delta",
    [(True, [-4.0, 1.4, -1.0, 0.0, 3.0]), (False, [-8.0, 3.5, -0.5, 0.0, 3.0])],
)
def test_ties_trims_elects_signs_and_merges_disjointly_on_a_hand_computed_case(normalize, merged_delta):
    base = torch.full((5,), 10.0)
    tensors = [base + torch.tensor(d) for d in HAND_DELTAS]
    out = task_vector_merge(
        base, tensors, HAND_WEIGHTS, [0.6] * 3, sparsifier="magnitude", consensus=True, normalize=normalize
    )
    assert torch.equal(out, base + torch.tensor(merged_delta))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_the_plain_reference_bit_for_bit(dtype, normalize):
    for count in (1, 2, 4, 5):  # 5 inputs: the stacked (non-streamed) sums
        base, tensors = family(count, dtype=dtype, seed=count)
        weights = [0.7, -0.3, 1.2, 0.5, 0.9][:count]
        densities = [0.3, 0.5, 1.0, 0.05, 0.8][:count]
        kw = dict(sparsifier="magnitude", consensus=True, normalize=normalize)
        out = task_vector_merge(base, tensors, weights, densities, **kw)
        assert out.dtype == dtype
        assert bits(out) == bits(reference_merge(base, tensors, weights, densities, **kw)), count


def test_ties_k_of_zero_is_a_merge_error():
    base, tensors = family(2, shape=(9,))
    with pytest.raises(MergeError, match="density"):
        task_vector_merge(base, tensors, [1.0, 1.0], [0.1, 0.5], sparsifier="magnitude", consensus=True)


# --- task arithmetic, lambda, dtype -------------------------------------------------------------


@pytest.mark.parametrize("lambda_", [1.0, 0.5, 1.7])
@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic_matches_the_plain_reference(lambda_, normalize):
    base, tensors = family(3, dtype=torch.bfloat16, seed=2)
    weights = [0.4, 0.35, 0.5]
    kw = dict(sparsifier="none", consensus=False, normalize=normalize, lambda_=lambda_)
    out = task_vector_merge(base, tensors, weights, [1.0] * 3, **kw)
    assert bits(out) == bits(reference_merge(base, tensors, weights, [1.0] * 3, **kw))


def test_lambda_scales_the_merged_delta_and_one_leaves_it_alone():
    base = torch.tensor([1.0, 2.0])
    tensors = [torch.tensor([3.0, 2.0]), torch.tensor([1.0, 6.0])]
    one = task_vector_merge(base, tensors, [1.0, 1.0], [1.0, 1.0])
    half = task_vector_merge(base, tensors, [1.0, 1.0], [1.0, 1.0], lambda_=0.5)
    assert one.tolist() == [3.0, 6.0] and half.tolist() == [2.0, 4.0]


def test_weights_summing_to_zero_leave_the_delta_undivided():
    base = torch.zeros(2)
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])]
    out = task_vector_merge(base, tensors, [1.0, -1.0], [1.0, 1.0], normalize=True)
    assert out.tolist() == [-2.0, 1.0]


def test_task_vector_merge_computes_in_the_base_dtype():
    base32, tensors32 = family(3, shape=(2000,), seed=3)
    base, tensors = base32.to(torch.bfloat16), [t.to(torch.bfloat16) for t in tensors32]
    weights = [0.3, 0.3, 0.4]
    kw = dict(sparsifier="magnitude", consensus=True, normalize=True)
    in_bf16 = task_vector_merge(base, tensors, weights, [0.5] * 3, **kw)
    in_fp32 = task_vector_merge(base.float(), [t.float() for t in tensors], weights, [0.5] * 3, **kw)
    assert in_bf16.dtype == torch.bfloat16 and in_fp32.dtype == torch.float32
    assert bits(in_bf16) == bits(reference_merge(base, tensors, weights, [0.5] * 3, **kw))
    assert not torch.equal(in_bf16, in_fp32.to(torch.bfloat16))


def test_no_ordinary_inputs_returns_the_base_itself():
    base = torch.randn(4)
    assert task_vector_merge(base, [], [], [], sparsifier="magnitude", consensus=True) is base


# --- DARE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("precise", [False, True])
def test_dare_matches_the_plain_reference_with_the_same_seeds(consensus, precise):
    base, tensors = family(3, dtype=torch.bfloat16, seed=4)
    weights, densities = [0.5, 0.8, 0.3], [0.3, 0.6, 0.9]
    kw = dict(sparsifier="random", consensus=consensus, normalize=False, rescale=True, precise=precise)
    out = task_vector_merge(base, tensors, weights, densities, generators=generators(11, 12, 13), **kw)
    expected = reference_merge(base, tensors, weights, densities, seeds=(11, 12, 13), **kw)
    assert bits(out) == bits(expected)


def test_bfloat16_rescale_factor_is_rounded_as_mergekit_rounds_it_unless_precise():
    # One input, weight 1, no normalisation: the output is base + factor * kept delta, so the
    # two factors show directly. In bfloat16 the ratio of the norms rounded to bfloat16 is
    # itself a bfloat16 number; the precise one is the float64 ratio.
    base, (tensor,) = family(1, shape=(64, 64), dtype=torch.bfloat16, seed=9)
    delta = tensor - base
    kept = delta * (delta.abs() >= delta.abs().flatten().kthvalue(delta.numel() // 2).values)
    before, after = fsum_l1(delta), fsum_l1(kept)
    rounded = float(torch.tensor(before, dtype=torch.bfloat16) / torch.tensor(after, dtype=torch.bfloat16))
    assert rounded == float(torch.tensor(rounded, dtype=torch.bfloat16)) and rounded != before / after
    for precise, factor in ((False, rounded), (True, before / after)):
        out = rescale_l1(delta, kept, precise=precise)
        assert bits(out) == bits(kept * factor)


def test_dare_masks_are_reproducible_for_a_seed_and_differ_between_generators():
    delta = torch.randn(64, 64)
    first = random_sparsify(delta, 0.5, torch.Generator().manual_seed(7))
    again = random_sparsify(delta, 0.5, torch.Generator().manual_seed(7))
    other = random_sparsify(delta, 0.5, torch.Generator().manual_seed(8))
    assert bits(first) == bits(again)
    assert not torch.equal(first != 0, other != 0)
    assert abs((first != 0).float().mean().item() - 0.5) < 0.05


def test_dare_does_not_depend_on_thread_count():
    base, tensors = family(2, shape=(300, 300), seed=5)
    results = []
    for n in (1, 2):
        with threads(n):
            results.append(
                bits(
                    task_vector_merge(
                        base,
                        tensors,
                        [0.6, 0.4],
                        [0.4, 0.7],
                        sparsifier="random",
                        consensus=True,
                        rescale=True,
                        generators=generators(1, 2),
                    )
                )
            )
    assert results[0] == results[1]


def test_rescale_restores_the_l1_norm_of_the_dropped_delta():
    delta = torch.randn(50, 40)
    kept = random_sparsify(delta, 0.3, torch.Generator().manual_seed(3))
    rescaled = rescale_l1(delta, kept)
    torch.testing.assert_close(rescaled, kept * (fsum_l1(delta) / fsum_l1(kept)), rtol=1e-6, atol=0)
    assert fsum_l1(rescaled) == pytest.approx(fsum_l1(delta), rel=1e-6)
    unscaled = sparsify(delta, 0.3, sparsifier="random", rescale=False, generator=torch.Generator().manual_seed(3))
    assert bits(unscaled) == bits(kept)


def test_rescale_is_skipped_when_everything_was_dropped():
    base = torch.zeros(100)
    tensors = [torch.randn(100)]
    out = task_vector_merge(base, tensors, [1.0], [0.0], sparsifier="random", rescale=True, generators=generators(1))
    assert bits(out) == bits(torch.zeros(100))


def test_random_sparsifier_without_a_generator_is_a_programming_error():
    with pytest.raises(ValueError, match="Generator"):
        task_vector_merge(torch.zeros(3), [torch.ones(3)], [1.0], [0.5], sparsifier="random")


# --- whole-tensor reductions --------------------------------------------------------------------


def test_l1_norm_is_the_same_for_any_thread_count_and_matches_an_exact_sum():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1_000_003, generator=g) * torch.exp(torch.randn(1_000_003, generator=g) * 4)
    norms = []
    for n in (1, 2):
        with threads(n):
            norms.append(l1_norm(x))
    assert norms[0] == norms[1]
    assert norms[0] == pytest.approx(fsum_l1(x), rel=1e-6)  # float32 chunk sums, exactly added
    assert l1_norm(x.to(torch.bfloat16)) == pytest.approx(fsum_l1(x.to(torch.bfloat16)), rel=1e-6)
    assert l1_norm(x.double()) == pytest.approx(fsum_l1(x), rel=1e-13)
