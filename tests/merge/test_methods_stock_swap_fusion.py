"""`model_stock`, `nearswap`, `arcee_fusion` math (docs/methods.md), against plainly written references."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch

from mkmerge.methods.arcee_fusion import SAMPLE_LIMIT, arcee_fusion_merge, fusion_importance, fusion_threshold
from mkmerge.methods.model_stock import model_stock_merge
from mkmerge.methods.nearswap import nearswap_merge
from mksuite.common.errors import MergeError, ShapeMismatchError

from method_helpers import bits, randn, threads


def close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, atol=1e-6) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- model_stock ------------------------------------------------------------------------------


def model_stock_reference(base, tensors, filter_wise=False):
    """docs/methods.md with explicit loops over vectors and pairs, in float64."""
    b = base.double()
    rows = b.reshape(-1, b.shape[-1]) if filter_wise and b.dim() > 1 else b.reshape(1, -1)
    deltas = [(t.double() - b).reshape(rows.shape) for t in tensors]
    count = len(tensors)
    ratios = []
    for r in range(rows.shape[0]):
        cosines = []
        for i, j in combinations(range(count), 2):
            di, dj = deltas[i][r], deltas[j][r]
            cos = (di @ dj).item() / max(di.norm().item() * dj.norm().item(), 1e-6)
            cosines.append(min(1.0, max(-1.0, cos)))
        c = sum(cosines) / len(cosines)
        ratios.append(count * c / (1 + (count - 1) * c))
    t = torch.tensor(ratios, dtype=torch.float64).view(-1, 1)
    mean = sum(x.double() for x in tensors).reshape(rows.shape) / count
    out = t * mean + (1 - t) * rows
    return out.view(base.shape), t


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("shape", [(10,), (6, 8), (2, 3, 5)])
def test_model_stock_matches_the_pairwise_cosine_rule(filter_wise, count, shape):
    base = randn(*shape, seed=1)
    shared = 0.05 * randn(*shape, seed=2)  # a common direction, so the cosines are positive
    tensors = [base + shared + 0.05 * randn(*shape, seed=10 + i) for i in range(count)]
    out, t = model_stock_merge(base, tensors, filter_wise=filter_wise)
    expected, expected_t = model_stock_reference(base, tensors, filter_wise)
    assert out.dtype == torch.float32 and out.shape == base.shape
    close(t, expected_t, rtol=1e-5, atol=1e-6)
    close(out, expected)


def test_model_stock_identical_deltas_give_their_average_and_orthogonal_ones_the_base():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    same = [base + torch.tensor([1.0, 2.0, 0.0, 0.0]), base + torch.tensor([2.0, 4.0, 0.0, 0.0])]
    out, t = model_stock_merge(base, same)
    assert t.item() == pytest.approx(1.0) and torch.allclose(out, (same[0] + same[1]) / 2)
    orthogonal = [base + torch.tensor([1.0, 0.0, 0.0, 0.0]), base + torch.tensor([0.0, 3.0, 0.0, 0.0])]
    out, t = model_stock_merge(base, orthogonal)
    assert t.item() == 0.0 and torch.equal(out, base)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # row 0 agrees with a, row 1 is orthogonal to it
    out, t = model_stock_merge(base, [a, b], filter_wise=True)
    assert t.view(-1).tolist() == pytest.approx([1.0, 0.0])
    assert torch.allclose(out, torch.tensor([[1.5, 0.0], [0.0, 0.0]]))
    _, whole = model_stock_merge(base, [a, b], filter_wise=False)
    assert whole.numel() == 1 and 0 < whole.item() < 1


def test_model_stock_does_not_clamp_t_and_reports_it():
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([-1.0, 0.2, 0.0])  # cos = -0.96/1.04
    out, t = model_stock_merge(base, [a, b])
    c = (-1 + 0.04) / 1.04
    assert t.item() == pytest.approx(2 * c / (1 + c), rel=1e-6) and t.item() < 0
    close(out, t.item() * (a + b) / 2)


def test_model_stock_exactly_opposite_deltas_are_a_merge_error_not_infinities():
    base = torch.zeros(3)
    with pytest.raises(MergeError, match="infinite"):
        model_stock_merge(base, [torch.tensor([3.0, 4.0, 0.0]), torch.tensor([-3.0, -4.0, 0.0])])  # norms exactly 5


def bf16(x) -> float:
    """A float32 value (or float32 arithmetic's result) rounded to bfloat16."""
    return torch.tensor(float(x), dtype=torch.float32).to(torch.bfloat16).item()


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_in_bfloat16_rounds_every_step_to_bfloat16(filter_wise):
    """Scalar by scalar: deltas, norms, products, sums, cosines, t, mean and mix each rounded
    to bfloat16 (sums and norms accumulated exactly, then rounded)."""
    import numpy as np

    f32 = np.float32
    base = (0.02 * randn(3, 40, seed=21)).to(torch.bfloat16)
    shared = 0.004 * randn(3, 40, seed=22)
    tensors = [(base.float() + shared + 0.003 * randn(3, 40, seed=23 + i)).to(torch.bfloat16) for i in range(3)]
    out, t = model_stock_merge(base, tensors, filter_wise=filter_wise)
    rows = [base.reshape(3, 40)[r].tolist() for r in range(3)] if filter_wise else [base.reshape(-1).tolist()]
    models = [
        [x.reshape(3, 40)[r].tolist() for r in range(3)] if filter_wise else [x.reshape(-1).tolist()] for x in tensors
    ]
    expected = []
    for r, anchor in enumerate(rows):
        deltas = [[bf16(f32(v) - f32(a)) for v, a in zip(m[r], anchor)] for m in models]
        norms = [bf16(math.sqrt(math.fsum(d * d for d in delta))) for delta in deltas]
        cosines = []
        for i, j in combinations(range(3), 2):
            dot = bf16(math.fsum(bf16(f32(x) * f32(y)) for x, y in zip(deltas[i], deltas[j])))
            divisor = max(bf16(f32(norms[i]) * f32(norms[j])), bf16(1e-6))
            cosines.append(min(max(bf16(f32(dot) / f32(divisor)), -1.0), 1.0))
        c = bf16(math.fsum(cosines) / 3)
        ratio = bf16(f32(bf16(3 * f32(c))) / f32(bf16(1 + f32(bf16(2 * f32(c))))))
        assert t.reshape(-1)[r].item() == ratio
        for k, a in enumerate(anchor):
            mean = bf16(f32(bf16(f32(bf16(f32(models[0][r][k]) + f32(models[1][r][k]))) + f32(models[2][r][k]))) / 3)
            mix = bf16(f32(bf16(f32(ratio) * f32(mean))) + f32(bf16(f32(bf16(1 - f32(ratio))) * f32(a))))
            expected.append(mix)
    assert out.dtype == torch.bfloat16
    assert out.reshape(-1).tolist() == expected


def test_model_stock_needs_two_models_besides_the_base_and_equal_shapes():
    with pytest.raises(MergeError, match="at least two"):
        model_stock_merge(torch.zeros(3), [torch.ones(3)])
    with pytest.raises(ShapeMismatchError):
        model_stock_merge(torch.zeros(3), [torch.ones(3), torch.ones(4)])


def test_model_stock_keeps_the_base_dtype_and_ignores_thread_count():
    base = randn(1, 50_000, seed=3).to(torch.bfloat16)
    tensors = [(base.float() + 0.1 * randn(1, 50_000, seed=4 + i)).to(torch.bfloat16) for i in range(3)]
    results = []
    for count in (1, 2):
        with threads(count):
            out, _ = model_stock_merge(base, tensors, filter_wise=True)
            results.append(bits(out))
    assert out.dtype == torch.bfloat16 and results[0] == results[1]


# --- nearswap ---------------------------------------------------------------------------------


def nearswap_reference(t, base, other):
    b, o = base.double(), other.double()
    weight = (t / (b - o).abs().clamp_min(1e-6)).clamp(0, 1)
    return weight * o + (1 - weight) * b


@pytest.mark.parametrize("t", [0.0, 0.01, 0.3, 2.0, -1.0])
def test_nearswap_matches_the_elementwise_formula(t):
    base, other = randn(7, 9, seed=5), randn(7, 9, seed=6)
    out = nearswap_merge(t, base, other)
    assert out.dtype == torch.float32
    close(out, nearswap_reference(t, base, other))


def test_nearswap_takes_close_entries_from_the_other_model_and_far_ones_stay_near_the_base():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])
    other = torch.tensor([1.0, 1.0625, 1.125, 3.0, -5.0])
    out = nearswap_merge(0.125, base, other)
    assert out[:3].tolist() == other[:3].tolist()  # |diff| ≤ t: exactly the other model's value
    assert out[3].item() == pytest.approx(0.0625 * 3.0 + 0.9375 * 1.0)  # ω = 0.125/2
    assert out[4].item() == pytest.approx(0.0125 * -5.0 + 0.9875 * 5.0)  # ω = 0.125/10
    assert torch.equal(nearswap_merge(0.0, base, other), base)


def bf16_of(x: float) -> float:
    """float32 arithmetic's result rounded to bfloat16 (a torch bfloat16 op rounds once from float32)."""
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()


def test_nearswap_in_bfloat16_rounds_every_op_to_bfloat16():
    """Element by element, each op in float32 (numpy) and rounded to bfloat16 before the next."""
    import numpy as np

    base, other = (randn(300, seed=s).mul_(0.02).to(torch.bfloat16) for s in (7, 8))
    other[:100] = base[:100] + 0.0004 * randn(100, seed=9).to(torch.bfloat16)  # some near, some far
    t = 0.001
    out = nearswap_merge(t, base, other)
    assert out.dtype == torch.bfloat16
    floor = bf16_of(1e-6)
    for j, (b, o) in enumerate(zip(base.tolist(), other.tolist())):
        distance = max(abs(bf16_of(np.float32(b) - np.float32(o))), floor)
        # torch evaluates `scalar / tensor` as tensor.reciprocal() * scalar: two roundings
        weight = min(
            max(bf16_of(np.float32(bf16_of(np.float32(1.0) / np.float32(distance))) * np.float32(t)), 0.0), 1.0
        )
        kept = bf16_of(np.float32(weight) * np.float32(o))
        rest = bf16_of(np.float32(bf16_of(np.float32(1.0) - np.float32(weight))) * np.float32(b))
        assert out[j].item() == bf16_of(np.float32(kept) + np.float32(rest)), j
    # not what float32 math rounded once gives
    assert not torch.equal(out, nearswap_reference(t, base.float(), other.float()).to(torch.bfloat16))


# --- arcee_fusion -----------------------------------------------------------------------------


def importance_reference(base, other):
    """|B − A| ⊙ KL(softmax(B_row) ‖ softmax(A_row)), rows along the last axis, float64."""
    a, b = base.double(), other.double()
    rows_a = a.reshape(-1, a.shape[-1]) if a.dim() > 1 else a.reshape(1, -1)
    rows_b = b.reshape(rows_a.shape)
    kl = []
    for ra, rb in zip(rows_a, rows_b):
        p = torch.exp(rb) / torch.exp(rb).sum() + 1e-8
        q = torch.exp(ra) / torch.exp(ra).sum() + 1e-8
        kl.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist())))
    return ((rows_b - rows_a).abs() * torch.tensor(kl, dtype=torch.float64).view(-1, 1)).view(base.shape)


def threshold_reference(values):
    ordered = sorted(values.reshape(-1).tolist())
    n = len(ordered)
    q25, median, q75 = (ordered[math.floor(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q75 - q25)


@pytest.mark.parametrize("shape", [(40,), (12, 10), (3, 4, 6)])
def test_fusion_importance_is_the_change_times_the_rows_kl_divergence(shape):
    base, other = randn(*shape, seed=9), randn(*shape, seed=10)
    close(fusion_importance(base, other), importance_reference(base, other), rtol=1e-4, atol=1e-7)


def test_fusion_threshold_is_the_median_plus_one_and_a_half_iqr_at_floor_indices():
    assert fusion_threshold(torch.arange(9.0), generator(0)).item() == 4 + 1.5 * (6 - 2)
    assert fusion_threshold(torch.arange(10.0).flip(0), generator(0)).item() == 4 + 1.5 * (6 - 2)
    values = randn(101, seed=11).abs()
    assert fusion_threshold(values, generator(0)).item() == pytest.approx(threshold_reference(values))


@pytest.mark.parametrize("shape", [(300,), (30, 20)])
def test_arcee_fusion_takes_the_other_models_entries_at_or_above_the_threshold(shape):
    base = randn(*shape, seed=12)
    other = base + 0.3 * randn(*shape, seed=13) * randn(*shape, seed=14).exp()
    importance = importance_reference(base, other)
    threshold = threshold_reference(importance)
    # keep the test decisive: no importance sits within rounding distance of the threshold
    assert ((importance - threshold).abs() > 1e-6 * abs(threshold)).all()
    chosen = importance >= threshold
    assert 0 < int(chosen.sum()) < chosen.numel()
    # default: mergekit's A + mask·(B − A); --precise: the chosen entries copied bit for bit
    assert torch.equal(arcee_fusion_merge(base, other, generator(0)), base + chosen * (other - base))
    assert torch.equal(arcee_fusion_merge(base, other, generator(0), precise=True), torch.where(chosen, other, base))


def test_arcee_fusion_of_equal_models_is_that_model_in_float32_or_the_base_dtype_when_precise():
    base = randn(8, 8, seed=15).to(torch.bfloat16)
    assert torch.equal(arcee_fusion_merge(base, base.clone(), generator(0)), base.float())
    assert torch.equal(arcee_fusion_merge(base, base.clone(), generator(0), precise=True), base)
    other = (base.float() + 1).to(torch.bfloat16)
    assert arcee_fusion_merge(base, other, generator(0)).dtype == torch.float32
    assert arcee_fusion_merge(base, other, generator(0), precise=True).dtype == torch.bfloat16


def mergekit_fusion_reference(a, b):
    """arcee_fusion as mergekit 0.1.5 computes it (found by running it on bfloat16 models): every
    step in the inputs' dtype, rows along the last axis, the masked delta added in float32."""
    rows_a, rows_b = (a[None], b[None]) if a.dim() == 1 else (a, b)
    p = torch.softmax(rows_b, -1) + 1e-8
    q = torch.softmax(rows_a, -1) + 1e-8
    kl = (p * (p / q).log()).sum(-1, keepdim=True)
    importance = ((rows_b - rows_a).abs() * kl).reshape(a.shape)
    ordered = importance.reshape(-1).sort().values
    last = ordered.numel() - 1
    q25, median, q75 = (ordered[int(x * last)] for x in (0.25, 0.5, 0.75))
    mask = importance >= median + 1.5 * (q75 - q25)
    return a.float() + (mask.to(a.dtype) * (b - a)).float()


@pytest.mark.parametrize("shape", [(64,), (40, 64), (3, 5, 32)])
def test_arcee_fusion_in_bfloat16_picks_and_rounds_as_mergekit(shape):
    base = randn(*shape, seed=21).to(torch.bfloat16)
    other = (base.float() + 0.2 * randn(*shape, seed=22) * randn(*shape, seed=23).exp()).to(torch.bfloat16)
    out = arcee_fusion_merge(base, other, generator(0))
    assert out.dtype == torch.float32 and bits(out) == bits(mergekit_fusion_reference(base, other))


def test_fusion_threshold_of_a_large_tensor_comes_from_a_seeded_sample_independent_of_threads():
    values = randn(SAMPLE_LIMIT + 200_001, seed=16).abs()
    full = threshold_reference(values)
    results = []
    for count in (1, 2):
        with threads(count):
            results.append(fusion_threshold(values, generator(7)).item())
    assert results[0] == results[1]
    other_seed = fusion_threshold(values, generator(8)).item()
    assert other_seed != results[0]  # the sample, hence the estimate, depends on the seed
    assert results[0] == pytest.approx(full, rel=5e-3) and other_seed == pytest.approx(full, rel=5e-3)
    small = randn(SAMPLE_LIMIT, seed=17).abs()  # at the limit every entry is used: no seed dependence
    assert fusion_threshold(small, generator(1)).item() == fusion_threshold(small, generator(2)).item()


def test_arcee_fusion_is_the_same_for_any_thread_count():
    base, other = randn(1, 60_000, seed=18), randn(1, 60_000, seed=19)
    results = []
    for count in (1, 2):
        with threads(count):
            results.append(bits(arcee_fusion_merge(base, other, generator(3))))
    assert results[0] == results[1]
