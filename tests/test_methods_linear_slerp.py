"""`linear` and `slerp` math (SPEC §2.1, §2.2), against plainly written references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import MergeError, ShapeMismatchError
from mkmerge.methods.linear import linear_merge
from mkmerge.methods import reductions
from mkmerge.methods.reductions import dot, stacked_sum
from mkmerge.methods.slerp import slerp_merge
from method_helpers import threads

HALF_AND_FULL = [torch.bfloat16, torch.float16, torch.float32]


def bits(tensor: torch.Tensor) -> bytes:
    """Raw bytes: tells -0.0 from +0.0 and compares NaN payloads, unlike torch.equal."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def spread(shape, generator, dtype=torch.float32) -> torch.Tensor:
    """Values over many binades, so rounding order matters."""
    values = torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape, generator=generator) * 3)
    return values.to(dtype)


def stacked_linear_reference(tensors, weights, normalize):
    """The computation recipe authors' outputs came from: stack, weight, sum over dim 0."""
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * tensors[0].dim())
    out = (w * stacked).sum(dim=0)
    return out / w.sum(dim=0) if normalize else out


# --- linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_stacked_weighted_sum_bit_for_bit(dtype, normalize):
    g = torch.Generator().manual_seed(3)
    # odd widths and sizes above torch's parallel grain exercise every kernel path
    for shape in [(), (1,), (7,), (3, 5), (37, 1001), (40_003,)]:
        for count in range(1, 7):
            tensors = [spread(shape, g, dtype) for _ in range(count)]
            weights = torch.randn(count, generator=g).tolist()
            out = linear_merge(tensors, weights, normalize=normalize)
            expected = stacked_linear_reference(tensors, weights, normalize)
            assert out.dtype == dtype and out.shape == torch.Size(shape)
            assert bits(out) == bits(expected), (shape, count)


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
def test_streamed_sum_of_up_to_four_terms_equals_stack_sum_at_any_thread_count(dtype):
    g = torch.Generator().manual_seed(4)
    for shape in [(3,), (301, 257), (70_001,)]:
        for count in range(1, 5):
            terms = [spread(shape, g, dtype) for _ in range(count)]
            expected = torch.stack(terms).sum(dim=0)
            for n in (1, 2):
                with threads(n):
                    out = stacked_sum([lambda block, t=t: t.reshape(-1)[block] for t in terms], shape, dtype)
                assert bits(out) == bits(expected), (shape, count, n)


def test_streamed_sum_handles_any_shape_and_strided_views():
    g = torch.Generator().manual_seed(14)
    for shape in [(), (5,), (3, 4, 37), (2, 50), (0, 3)]:
        terms = [spread(shape, g, torch.bfloat16) for _ in range(3)]
        if len(shape) == 3:
            terms[1] = spread(shape[::-1], g, torch.bfloat16).permute(2, 1, 0)  # a strided view
        out = stacked_sum([lambda block, t=t: t.reshape(-1)[block] for t in terms], shape, torch.bfloat16)
        assert bits(out) == bits(torch.stack(terms).sum(dim=0)), shape


def test_streamed_sum_turns_negative_zeros_into_positive_zero_like_torch():
    zeros = torch.tensor([-0.0, -0.0], dtype=torch.bfloat16)
    out = stacked_sum([lambda block: zeros[block]] * 2, (2,), torch.bfloat16)
    assert bits(out) == bits(torch.stack([zeros, zeros]).sum(dim=0)) == bits(torch.zeros(2, dtype=torch.bfloat16))


def to_bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).item()


def test_linear_in_bfloat16_matches_an_element_by_element_hand_computation():
    g = torch.Generator().manual_seed(5)
    tensors = [spread((4,), g, torch.bfloat16) for _ in range(3)]
    weights = [0.3, 0.45, 0.61]
    out = linear_merge(tensors, weights, normalize=True)

    w = [to_bf16(x) for x in weights]  # weights rounded to the dtype
    w_sum = np.float32(0)
    for x in w:
        w_sum = np.float32(w_sum + np.float32(x))  # float32 accumulation
    w_sum = to_bf16(float(w_sum))
    for j in range(4):
        acc = np.float32(0)
        for i in range(3):
            product = to_bf16(w[i] * tensors[i][j].item())  # exact in float64, then rounded
            acc = np.float32(acc + np.float32(product))
        total = to_bf16(float(acc))
        expected = to_bf16(float(np.float32(total) / np.float32(w_sum)))
        assert out[j].item() == expected


def test_linear_computes_in_the_dtype_it_is_given():
    g = torch.Generator().manual_seed(6)
    full = [spread((2000,), g) for _ in range(3)]
    half = [t.to(torch.bfloat16) for t in full]
    weights = [0.3, 0.3, 0.4]
    in_bf16 = linear_merge(half, weights)
    in_fp32 = linear_merge(full, weights)
    assert in_bf16.dtype == torch.bfloat16 and in_fp32.dtype == torch.float32
    assert bits(in_bf16) == bits(stacked_linear_reference(half, weights, True))
    # rounding every product to bfloat16 gives a different answer from rounding once at the end
    assert not torch.equal(in_bf16, linear_merge([t.float() for t in half], weights).to(torch.bfloat16))
    reference = sum(w * t.double() for w, t in zip(weights, full)) / sum(weights)
    torch.testing.assert_close(in_fp32.double(), reference, rtol=1e-6, atol=1e-6)


def test_linear_without_normalize_is_the_plain_weighted_sum():
    a = torch.tensor([1.0, 2.0, -3.0])
    b = torch.tensor([0.5, 0.0, 4.0])
    assert torch.equal(linear_merge([a, b], [2.0, 4.0], normalize=False), torch.tensor([4.0, 4.0, 10.0]))
    assert torch.equal(linear_merge([a, b], [2.0, 4.0], normalize=True), torch.tensor([4.0, 4.0, 10.0]) / 6)


def test_linear_with_weights_summing_to_zero_is_a_merge_error():
    a, b = torch.ones(3), torch.zeros(3)
    with pytest.raises(MergeError, match="weights sum to zero"):
        linear_merge([a, b], [0.5, -0.5])
    assert torch.equal(linear_merge([a, b], [0.5, -0.5], normalize=False), torch.full((3,), 0.5))


def test_linear_refuses_inputs_of_different_shapes_instead_of_broadcasting():
    with pytest.raises(ShapeMismatchError):
        linear_merge([torch.ones(1, 4), torch.ones(3, 4)], [1.0, 1.0])


# --- slerp ------------------------------------------------------------------------------------


def slerp_reference(t, a, c):
    """SPEC §2.2 in float64 on flat vectors."""
    a64, c64 = a.double().flatten(), c.double().flatten()
    na, nc = a64.norm().item(), c64.norm().item()
    ua = a64 / na if na > 1e-8 else a64
    uc = c64 / nc if nc > 1e-8 else c64
    d = (ua * uc).sum().item()
    if abs(d) > 0.9995:
        out = (1 - t) * a64 + t * c64
    else:
        theta = math.acos(d)
        out = math.sin((1 - t) * theta) / math.sin(theta) * a64 + math.sin(t * theta) / math.sin(theta) * c64
    return out.view(a.shape)


@pytest.mark.parametrize("t", [0.1, 0.25, 0.5, 0.9, -0.2, 1.3])
def test_slerp_follows_the_great_circle_formula(t):
    g = torch.Generator().manual_seed(7)
    a, c = torch.randn(64, 33, generator=g), torch.randn(64, 33, generator=g)
    out = slerp_merge(t, a, c)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), slerp_reference(t, a, c), rtol=1e-5, atol=1e-6)
    # not a straight line: the midpoint of two near-orthogonal vectors keeps its length
    if t == 0.5:
        assert not torch.allclose(out, 0.5 * a + 0.5 * c, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_endpoints_return_the_inputs_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(8)
    a = torch.randn(5, 6, generator=g).to(dtype)
    c = torch.randn(5, 6, generator=g).to(dtype)
    a[0, 0], c[0, 0] = -0.0, 3.0  # -0.0 + 0·3 would come out as +0.0
    c[1, 1], a[1, 1] = -0.0, 2.0
    assert bits(slerp_merge(0.0, a, c)) == bits(a)
    assert bits(slerp_merge(1.0, a, c)) == bits(c)
    parallel = a * 2
    assert bits(slerp_merge(0.0, a, parallel)) == bits(a)
    assert bits(slerp_merge(1.0, a, parallel)) == bits(parallel)


def test_slerp_of_nearly_parallel_inputs_is_linear_interpolation():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(1000, generator=g)
    c = 2 * a + 0.001 * torch.randn(1000, generator=g)
    assert torch.nn.functional.cosine_similarity(a, c, dim=0) > 0.9995
    assert torch.equal(slerp_merge(0.3, a, c), a * 0.7 + c * 0.3)


def test_slerp_of_anti_parallel_inputs_is_linear_interpolation_too():
    g = torch.Generator().manual_seed(10)
    a = torch.randn(1000, generator=g)
    c = -3 * a
    out = slerp_merge(0.25, a, c)
    assert torch.equal(out, a * 0.75 + c * 0.25)
    torch.testing.assert_close(out, a * 0.0, atol=1e-6, rtol=0)  # 0.75·a − 0.75·a


def test_slerp_just_inside_the_threshold_follows_the_arc():
    theta = math.acos(0.999)  # cos below 0.9995: not treated as parallel
    a = torch.tensor([1.0, 0.0])
    c = torch.tensor([math.cos(theta), math.sin(theta)])
    out = slerp_merge(0.5, a, c)
    torch.testing.assert_close(out, torch.tensor([math.cos(theta / 2), math.sin(theta / 2)]), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(out, 0.5 * a + 0.5 * c, rtol=1e-6, atol=1e-7)


def test_slerp_from_a_zero_base_scales_the_other_by_sin_of_t_quarter_turns():
    g = torch.Generator().manual_seed(11)
    c = torch.randn(50, generator=g)
    zero = torch.zeros(50)
    assert torch.equal(slerp_merge(0.3, zero, c), c * math.sin(0.3 * math.acos(0.0)))
    assert torch.equal(slerp_merge(0.3, zero, zero), zero)
    tiny = torch.full((50,), 1e-12)  # norm below 1e-8: used unnormalised
    torch.testing.assert_close(slerp_merge(0.4, tiny, c).double(), slerp_reference(0.4, tiny, c))


def test_slerp_returns_the_base_dtype_after_float32_math():
    g = torch.Generator().manual_seed(12)
    a32, c32 = torch.randn(300, generator=g), torch.randn(300, generator=g)
    a, c = a32.to(torch.bfloat16), c32.to(torch.bfloat16)
    out = slerp_merge(0.4, a, c)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, slerp_merge(0.4, a.float(), c.float()).to(torch.bfloat16))
    assert slerp_merge(0.4, a, c32).dtype == torch.bfloat16


def test_slerp_and_its_dot_products_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(13)
    a, c = spread((700, 300), g), spread((700, 300), g)
    results = []
    for n in (1, 2):
        with threads(n):
            results.append((bits(slerp_merge(0.37, a, c)), dot(a, c)))
    assert results[0] == results[1]
    assert results[0][1] == pytest.approx(math.fsum((a.double() * c.double()).flatten().tolist()), rel=1e-12)


def test_slerp_refuses_inputs_of_different_shapes():
    with pytest.raises(ShapeMismatchError):
        slerp_merge(0.5, torch.ones(4), torch.ones(5))
