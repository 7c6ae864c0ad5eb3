"""`linear` and `slerp` math (docs/methods.md, §2.2), against plainly written references."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from mkmerge.methods.linear import linear_merge
from mkmerge.methods.reductions import dot, stacked_sum
from mkmerge.methods.slerp import slerp_merge
from mksuite.common.errors import MergeError, ShapeMismatchError

from method_helpers import threads

HALF_AND_FULL = [torch.bfloat16, torch.float16, torch.float32]


def bits(tensor: torch.Tensor) -> bytes:
    """Raw bytes: tells -0.0 from +0.0 and compares NaN payloads, unlike torch.equal."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def spread(shape, generator, dtype=torch.float32) -> torch.Tensor:
    """Values over many binades, so rounding order matters."""
    values = torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape, generator=generator) * 3)
    return values.to(dtype)


def round_to_f32(q: Fraction) -> float:
    """The float32 value nearest the exact rational ``q`` (ties to even); +0 for zero."""
    if q == 0:
        return 0.0
    exponent = max(math.floor(math.log2(abs(q))), -126)
    while abs(q) >= Fraction(2) ** (exponent + 1):  # log2 of a rational can be off by one
        exponent += 1
    while exponent > -126 and abs(q) < Fraction(2) ** exponent:
        exponent -= 1
    step = Fraction(2) ** (exponent - 23)  # float32 spacing in q's binade (subnormal: 2^-149)
    value = round(q / step) * step  # round() of a Fraction ties to even
    return float(value) if abs(value) < 2**128 else math.copysign(math.inf, q)


def fma_linear_reference(tensors, weights, normalize):
    """mergekit's linear arithmetic in exact rationals, one element at a time: float32 weights;
    acc = +0, then acc = round32(W_i·w_i + acc) per input; / (float32 weight sum); to the dtype."""
    w = torch.tensor(weights, dtype=torch.float32)
    divisor = Fraction(float(w.sum()))
    w = [Fraction(x) for x in w.tolist()]
    flats = [t.reshape(-1).double().tolist() for t in tensors]
    out = []
    for j in range(len(flats[0])):
        acc = 0.0
        for flat, weight in zip(flats, w):
            acc = round_to_f32(Fraction(flat[j]) * weight + Fraction(acc))
        if normalize:
            acc = round_to_f32(Fraction(acc) / divisor)
        out.append(acc)
    return torch.tensor(out, dtype=torch.float32).to(tensors[0].dtype).reshape(tensors[0].shape)


# --- linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_an_exact_fused_multiply_add_chain_bit_for_bit(dtype, normalize):
    g = torch.Generator().manual_seed(3)
    for shape in [(), (1,), (7,), (3, 5), (9, 31)]:
        for count in range(1, 7):
            tensors = [spread(shape, g, dtype).nan_to_num() for _ in range(count)]  # finite: rationals
            weights = torch.randn(count, generator=g).tolist()
            out = linear_merge(tensors, weights, normalize=normalize)
            expected = fma_linear_reference(tensors, weights, normalize)
            assert out.dtype == dtype and out.shape == torch.Size(shape)
            assert bits(out) == bits(expected), (shape, count)


def test_linear_of_large_tensors_at_any_thread_count_equals_the_exact_chain():
    g = torch.Generator().manual_seed(13)
    tensors = [spread((70_001,), g, torch.bfloat16) for _ in range(3)]
    weights = [0.4, 0.3, 0.3]
    sample = torch.randint(0, 70_001, (400,), generator=g)
    expected = fma_linear_reference([t[sample] for t in tensors], weights, True)
    for n in (1, 2):
        with threads(n):
            out = linear_merge(tensors, weights)
        assert bits(out[sample]) == bits(expected), n


# 32 elements of a 3-model bfloat16 merge (weights 0.4/0.3/0.3, normalize) and the bits
# mergekit 0.1.5 wrote for them. The first 24 are ones where rounding each step, or summing
# float32 products without fusing, or an exact float64 sum, would each come out one ulp off.
MERGEKIT_INPUTS = [
    "3bbc 3c2b 3c4e bb7a 3ba7 3cdf bc81 bc80 3c8b 3cec 3cd5 bc72 3c60 3be9 3bf2 3cc6 bcb4 bcac bc3f bc4f 3d23 3bdd 3d19 bcab bbc6 bc27 3cc0 bbeb bb0d 3bbc bc9c 3cad",
    "3b9f 3c6c 3c4c bb55 3b14 3cde bc8d bc6f 3c87 3ce2 3cd7 bc5d 3c6b 3bc7 3bd9 3cde bcc0 bcb0 bc53 bc5e 3d23 3bf0 3d14 bc9f bbe2 bc3f 3cc4 bbd9 ba06 3b9f bc9e 3cb6",
    "3b84 3c03 3c5f bb72 3b43 3cbd bc51 bc78 3c94 3cdd 3cc4 bc81 3c3c 3b98 3c0d 3cbd bccb bca3 bc8a bc1d 3d28 3be3 3d0f bcbc bbbe bc21 3cc8 bc16 baef 3b84 bc8b 3ca2",
]
MERGEKIT_OUTPUT = "3ba3 3c32 3c53 bb6d 3b6d 3cd4 bc7a bc79 3c8d 3ce4 3cd1 bc71 3c59 3bc7 3bf7 3cca bcbf bcab bc5e bc45 3d25 3be5 3d15 bcad bbcc bc2c 3cc4 bbf9 bacd 3ba3 bc98 3cac"


def from_hex(words: str) -> torch.Tensor:
    return torch.tensor([int(w, 16) for w in words.split()], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("fused_kernel", [True, False])
def test_linear_reproduces_the_bits_mergekit_wrote(monkeypatch, fused_kernel):
    from mkmerge.methods import fused

    if not fused_kernel:
        monkeypatch.setattr(fused, "linear_applies", lambda tensors: False)
    tensors = [from_hex(words) for words in MERGEKIT_INPUTS]
    out = linear_merge(tensors, [0.4, 0.3, 0.3])
    assert bits(out) == bits(from_hex(MERGEKIT_OUTPUT))
    # and each simpler arithmetic misses some of them: the test can tell them apart
    stacked = torch.stack(tensors)
    per_op_bf16 = (torch.tensor([0.4, 0.3, 0.3], dtype=torch.bfloat16).view(3, 1) * stacked).sum(0) / torch.tensor(
        1.0, dtype=torch.bfloat16
    )
    unfused_f32 = (torch.tensor([0.4, 0.3, 0.3]).view(3, 1) * stacked.float()).sum(0).to(torch.bfloat16)
    exact = (torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64).view(3, 1) * stacked.double()).sum(0).to(torch.bfloat16)
    for other in (per_op_bf16, unfused_f32, exact):
        assert bits(other) != bits(out)


@pytest.mark.parametrize("fused_kernel", [True, False])
def test_linear_rounds_each_step_once_even_where_float64_would_round_twice(monkeypatch, fused_kernel):
    """acc = 2^-60, then + 1.515625 · (172961·2^-18) = 1 + 2^-24 exactly: the exact sum is just
    above the float32 midpoint 1 + 2^-24, but float64 rounds it onto the midpoint, from where
    a second rounding goes down to 1. A third input of 2^-8 carries the difference into bf16."""
    from mkmerge.methods import fused

    if not fused_kernel:
        monkeypatch.setattr(fused, "linear_applies", lambda tensors: False)
    weights = [1.0, 172961 * 2.0**-18, 1.0]
    values = [2.0**-60, 1.515625, 2.0**-8]
    full = [torch.tensor([v], dtype=torch.float32) for v in values[:2]]
    assert float(full[0].double() + full[1].double() * weights[1]) == 1 + 2.0**-24  # float64 lands on the midpoint
    assert linear_merge(full, weights[:2], normalize=False).item() == 1 + 2.0**-23
    half = [torch.tensor([v], dtype=torch.bfloat16) for v in values]
    assert linear_merge(half, weights, normalize=False).item() == 1 + 2.0**-7
    assert fma_linear_reference(half, weights, False).item() == 1 + 2.0**-7


def test_linear_of_negative_zeros_is_positive_zero():
    zeros = [torch.tensor([-0.0, -0.0], dtype=torch.bfloat16)] * 3
    for normalize in (True, False):
        assert bits(linear_merge(zeros, [0.2, 0.3, 0.5], normalize)) == bits(torch.zeros(2, dtype=torch.bfloat16))


def test_linear_rounds_to_the_dtype_once_at_the_end():
    g = torch.Generator().manual_seed(6)
    full = [spread((2000,), g) for _ in range(3)]
    half = [t.to(torch.bfloat16) for t in full]
    weights = [0.3, 0.3, 0.4]
    in_bf16 = linear_merge(half, weights)
    in_fp32 = linear_merge([t.float() for t in half], weights)
    assert in_bf16.dtype == torch.bfloat16 and in_fp32.dtype == torch.float32
    assert bits(in_bf16) == bits(in_fp32.to(torch.bfloat16))
    reference = sum(w * t.double() for w, t in zip(weights, full)) / sum(weights)
    torch.testing.assert_close(linear_merge(full, weights).double(), reference, rtol=1e-6, atol=1e-6)


# --- the stack sum task arithmetic uses ------------------------------------------------------


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
    """docs/methods.md in float64 on flat vectors."""
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
    assert torch.equal(slerp_merge(0.3, zero, c, precise=True), c * math.sin(0.3 * math.acos(0.0)))
    # mergekit's float32 steps: acos(0) and the sine rounded to float32
    scale = torch.sin(0.3 * torch.arccos(torch.tensor(0.0))) / torch.sin(torch.arccos(torch.tensor(0.0)))
    assert torch.equal(slerp_merge(0.3, zero, c), c * float(scale))
    assert torch.equal(slerp_merge(0.3, zero, zero), zero)
    tiny = torch.full((50,), 1e-12)  # norm below 1e-8: used unnormalised
    torch.testing.assert_close(slerp_merge(0.4, tiny, c).double(), slerp_reference(0.4, tiny, c))


def mergekit_slerp_reference(t, a, c):
    """slerp as mergekit 0.1.5 computes it (found by running it on float32 models): whole
    tensors, every step a float32 tensor operation, the coefficients applied to the inputs."""
    norm_a, norm_c = a.norm(), c.norm()
    unit_a = a / norm_a if norm_a > 1e-8 else a
    unit_c = c / norm_c if norm_c > 1e-8 else c
    dot_ac = (unit_a * unit_c).sum()
    theta = torch.arccos(dot_ac)
    return torch.sin((1 - t) * theta) / torch.sin(theta) * a + torch.sin(t * theta) / torch.sin(theta) * c


def test_float32_slerp_of_small_tensors_rounds_as_mergekit_and_large_ones_as_precise():
    g = torch.Generator().manual_seed(13)
    differs = 0
    for shape in [(64,), (96, 64), (256, 256)]:
        a, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        out = slerp_merge(0.3, a, c)
        precise = slerp_merge(0.3, a, c, precise=True)
        torch.testing.assert_close(precise.double(), slerp_reference(0.3, a, c), rtol=1e-6, atol=1e-6)
        assert torch.equal(out, mergekit_slerp_reference(0.3, a, c))
        differs += not torch.equal(out, precise)
    assert differs  # the two roundings are not the same
    # past 65536 entries torch's own float32 sums depend on its thread count, so mergekit's
    # numbers are not defined there: the thread-invariant (precise) coefficients are used
    a, c = torch.randn(300, 300, generator=g), torch.randn(300, 300, generator=g)
    assert torch.equal(slerp_merge(0.3, a, c), slerp_merge(0.3, a, c, precise=True))


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
