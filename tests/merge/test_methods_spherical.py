"""`nuslerp`, `multislerp`, `karcher` math (docs/methods.md), against plainly written float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from mkmerge.methods.karcher import karcher_merge
from mkmerge.methods.multislerp import multislerp_merge
from mkmerge.methods.nuslerp import nuslerp_fraction, nuslerp_merge
from mksuite.common.errors import MergeError, ShapeMismatchError

from method_helpers import bits, randn, threads


def close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, atol=1e-6) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# --- nuslerp ----------------------------------------------------------------------------------


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """docs/methods.md for one pair of 1-D float64 vectors."""
    u0 = v0 / max(v0.norm().item(), 1e-7)
    u1 = v1 / max(v1.norm().item(), 1e-7)
    theta = math.acos(min(1.0, max(-1.0, (u0 * u1).sum().item())))
    if abs(math.sin(theta)) < 1e-8:
        return (1 - t) * v0 + t * v1
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def nuslerp_reference(t, a, b, *, base=None, flatten=True, row_wise=False) -> torch.Tensor:
    """Vector by vector with explicit loops: rows W[r, :] by default, columns W[:, c] with row_wise."""
    v0, v1 = a.double(), b.double()
    if base is not None:
        v0, v1 = v0 - base.double(), v1 - base.double()
    if flatten or v0.dim() == 1:
        out = slerp_vectors(t, v0.flatten(), v1.flatten()).view(v0.shape)
    else:
        axis = 0 if row_wise else v0.dim() - 1
        m0, m1 = v0.movedim(axis, -1), v1.movedim(axis, -1)  # vectors now along the last axis
        rows0, rows1 = m0.reshape(-1, m0.shape[-1]), m1.reshape(-1, m1.shape[-1])
        out = torch.stack([slerp_vectors(t, r0, r1) for r0, r1 in zip(rows0, rows1)])
        out = out.view(m0.shape).movedim(-1, axis)
    return out + base.double() if base is not None else out


@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("shape", [(7,), (6, 9), (3, 4, 5)])
def test_nuslerp_slerps_each_vector_as_the_spec_lays_them_out(flatten, row_wise, shape):
    a, b = randn(*shape, seed=1), randn(*shape, seed=2)
    out = nuslerp_merge(0.3, a, b, flatten=flatten, row_wise=row_wise)
    assert out.dtype == torch.float32 and out.shape == a.shape
    close(out, nuslerp_reference(0.3, a, b, flatten=flatten, row_wise=row_wise))


def test_nuslerp_row_wise_slerps_columns_and_the_default_slerps_rows():
    """Rows of `a` and `b` are parallel, columns orthogonal: the two layouts must differ."""
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    b = torch.tensor([[2.0, 4.0], [6.0, 3.0]])
    by_row = nuslerp_merge(0.5, a, b, flatten=False, row_wise=False)
    assert torch.allclose(by_row, 0.5 * a + 0.5 * b)  # |sin θ| ≈ 0 in both rows: linear
    by_column = nuslerp_merge(0.5, a, b, flatten=False, row_wise=True)
    reference = nuslerp_reference(0.5, a, b, flatten=False, row_wise=True)
    close(by_column, reference)
    assert not torch.allclose(by_column, by_row, atol=1e-3)


def test_nuslerp_task_vector_mode_slerps_deltas_and_adds_the_base_back():
    base = randn(5, 8, seed=3)
    a, b = base + 0.1 * randn(5, 8, seed=4), base + 0.1 * randn(5, 8, seed=5)
    out = nuslerp_merge(0.6, a, b, base=base, flatten=False)
    close(out, nuslerp_reference(0.6, a, b, base=base, flatten=False))
    assert not torch.allclose(out, nuslerp_merge(0.6, a, b, flatten=False), atol=1e-4)


def bf16(x) -> float:
    """float32 arithmetic's result rounded to bfloat16 (a torch bfloat16 op rounds once from float32)."""
    return torch.tensor(float(x), dtype=torch.float32).to(torch.bfloat16).item()


def test_nuslerp_in_bfloat16_rounds_every_op_to_bfloat16():
    """Row by row, scalar by scalar: each op in float32 (numpy), rounded to bfloat16 before the next."""
    import numpy as np

    f32 = np.float32
    a, b = randn(16, 32, seed=6).to(torch.bfloat16), randn(16, 32, seed=7).to(torch.bfloat16)
    t = 0.25
    out = nuslerp_merge(t, a, b, flatten=False)
    assert out.dtype == torch.bfloat16
    for r in range(16):
        v0, v1 = a[r].tolist(), b[r].tolist()
        n0 = max(bf16(math.sqrt(math.fsum(x * x for x in v0))), 1e-7)
        n1 = max(bf16(math.sqrt(math.fsum(x * x for x in v1))), 1e-7)
        u0 = [bf16(f32(x) / f32(n0)) for x in v0]
        u1 = [bf16(f32(x) / f32(n1)) for x in v1]
        cosine = min(max(bf16(math.fsum(bf16(f32(x) * f32(y)) for x, y in zip(u0, u1))), -1.0), 1.0)
        theta = bf16(np.arccos(f32(cosine)))
        sin_theta = bf16(np.sin(f32(theta)))
        s0 = bf16(np.sin(f32(bf16(f32(1 - t) * f32(theta)))))
        s1 = bf16(np.sin(f32(bf16(f32(t) * f32(theta)))))
        for j in range(32):
            mixed = bf16(f32(bf16(f32(s0) * f32(v0[j]))) + f32(bf16(f32(s1) * f32(v1[j]))))
            assert out[r, j].item() == bf16(f32(mixed) / f32(sin_theta)), (r, j)
    # not what float32 math rounded once gives
    assert not torch.equal(out, nuslerp_reference(t, a.float(), b.float(), flatten=False).to(torch.bfloat16))


def test_nuslerp_edge_vectors_parallel_antiparallel_and_zero():
    v = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    w = torch.tensor([[2.0, 4.0, 6.0], [-3.0, -4.0, 0.0], [0.0, 5.0, 0.0]])
    out = nuslerp_merge(0.25, v, w, flatten=False)
    assert torch.allclose(out[0], 0.75 * v[0] + 0.25 * w[0])  # parallel: cos rounds to 1, θ = 0: linear
    # anti-parallel: θ = float32(π), whose sine (-8.7e-8) is not below 1e-8, so the curved
    # formula runs (here its numerator cancels to 0), exactly as mergekit's float arithmetic does
    assert not torch.allclose(out[1], 0.75 * v[1] + 0.25 * w[1])
    # a zero vector is "orthogonal" to anything (cos = 0): out = sin(tπ/2)·w
    assert torch.allclose(out[2], math.sin(0.25 * math.pi / 2) * w[2])


def test_nuslerp_fraction_is_the_second_weights_share_and_half_when_weights_cancel():
    assert nuslerp_fraction(0.75, 0.25) == 0.25
    assert nuslerp_fraction(2.0, 6.0) == 0.75
    assert nuslerp_fraction(1.0, -1.0) == 0.5
    a, b = randn(4, 4, seed=8), randn(4, 4, seed=9)
    # order of the two models is irrelevant: slerp(t, a, b) = slerp(1 − t, b, a)
    close(nuslerp_merge(nuslerp_fraction(0.3, 0.7), a, b), nuslerp_merge(nuslerp_fraction(0.7, 0.3), b, a))


def test_nuslerp_endpoints_give_the_inputs():
    a, b = randn(6, 3, seed=10), randn(6, 3, seed=11)
    close(nuslerp_merge(0.0, a, b, flatten=False), a, rtol=1e-6, atol=1e-7)
    close(nuslerp_merge(1.0, a, b, flatten=False), b, rtol=1e-6, atol=1e-7)


def test_nuslerp_refuses_inputs_of_different_shapes():
    with pytest.raises(ShapeMismatchError):
        nuslerp_merge(0.5, torch.ones(2, 3), torch.ones(3, 3))


@pytest.mark.parametrize(
    "flatten, row_wise, shape",
    [(True, False, (90_000,)), (False, False, (3, 70_000)), (False, True, (70_000, 3)), (False, False, (1, 70_000))],
)
def test_nuslerp_is_the_same_for_any_thread_count(flatten, row_wise, shape):
    a, b, base = randn(*shape, seed=12), randn(*shape, seed=13), randn(*shape, seed=14)
    results = []
    for count in (1, 2):
        with threads(count):
            results.append(bits(nuslerp_merge(0.4, a, b, base=base, flatten=flatten, row_wise=row_wise)))
    assert results[0] == results[1]


# --- multislerp -------------------------------------------------------------------------------


def multislerp_reference(tensors, weights, *, base=None, normalize=True, eps=1e-8) -> torch.Tensor:
    """docs/methods.md as written, tangent step included, in float64 on flat vectors."""
    shape = tensors[0].shape
    x = [t.double().flatten() - (base.double().flatten() if base is not None else 0) for t in tensors]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = [v.norm() for v in x]
    units = [v / (n + eps) for v, n in zip(x, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    if m.norm() < eps:
        out = sum(wi * v for wi, v in zip(w, x))
    else:
        m_hat = m / m.norm()
        tangent = sum(wi * (u - (u @ m_hat) * m_hat) for wi, u in zip(w, units))
        length = tangent.norm() + eps
        r = m_hat * torch.cos(length) + tangent * torch.sin(length) / length
        out = r * sum(wi * n for wi, n in zip(w, norms))
    out = out.view(shape)
    return out + base.double() if base is not None else out


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_closed_form_equals_the_spec_tangent_step(count, with_base):
    tensors = [randn(12, 7, seed=20 + i) for i in range(count)]
    weights = [0.5 + 0.3 * i for i in range(count)]
    base = randn(12, 7, seed=30) if with_base else None
    out = multislerp_merge(tensors, weights, base=base)
    assert out.dtype == torch.float32
    close(out, multislerp_reference(tensors, weights, base=base))


def test_multislerp_keeps_the_weighted_mean_norm_and_the_mean_direction():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    out = multislerp_merge([a, b], [1.0, 1.0])
    # direction (u_a + u_b)/2 normalised = (1, 1)/√2; length (3 + 1)/2 = 2
    close(out, torch.tensor([2 / math.sqrt(2), 2 / math.sqrt(2)]))


def test_multislerp_without_normalizing_scales_by_the_raw_weights():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = multislerp_merge([a, b], [1.0, 1.0], normalize_weights=False)
    close(out, torch.tensor([2 / math.sqrt(2), 2 / math.sqrt(2)]))  # |m̂|·(1 + 1)
    close(out, multislerp_reference([a, b], [1.0, 1.0], normalize=False))


def test_multislerp_two_antipodal_inputs_fall_back_to_the_weighted_sum():
    a = torch.tensor([1.0, -2.0, 0.5])
    out = multislerp_merge([a, -a], [0.5, 0.5])
    assert torch.equal(out, torch.zeros(3))
    base = torch.tensor([1.0, 1.0, 1.0])
    out = multislerp_merge([base + a, base - a], [0.5, 0.5], base=base)
    close(out, base)


def test_multislerp_more_than_two_inputs_that_cancel_is_a_merge_error():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    with pytest.raises(MergeError, match="cancel out"):
        multislerp_merge([e1, -e1, e2], [0.5, 0.5, 0.0])
    with pytest.raises(MergeError, match="cancel out"):
        multislerp_merge([e1, e2, -e1, -e2], [1.0, 1.0, 1.0, 1.0])


def test_multislerp_with_one_input_returns_it_and_zero_weight_sum_is_an_error():
    x = randn(4, seed=31)
    assert multislerp_merge([x], [0.3]) is x
    with pytest.raises(MergeError, match="sum to zero"):
        multislerp_merge([x, 2 * x], [1.0, -1.0])


def test_multislerp_returns_the_dtype_it_is_given():
    tensors = [randn(8, 8, seed=32 + i).to(torch.bfloat16) for i in range(3)]
    out = multislerp_merge(tensors, [1.0, 2.0, 3.0], precise=True)
    assert out.dtype == torch.bfloat16
    expected = multislerp_reference([t.float() for t in tensors], [1.0, 2.0, 3.0]).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def mergekit_multislerp_reference(tensors, weights, *, base=None, normalize=True, eps=1e-8):
    """multislerp as mergekit 0.1.5 computes it (found by running it): the spec's steps as
    tensor operations in the inputs' dtype, the tangent step's scalar factor taken first."""
    shape, dtype = tensors[0].shape, tensors[0].dtype
    x = torch.stack([t.flatten() for t in tensors])
    if base is not None:
        x = x - base.flatten()
    w = torch.tensor(weights, dtype=dtype)
    w = (w / w.sum() if normalize else w).unsqueeze(1)
    norms = x.norm(dim=-1, keepdim=True)
    units = x / (norms + eps)
    m = (w * units).sum(0)
    m_hat = m / m.norm()
    tangent = (w * (units - (units * m_hat).sum(-1, keepdim=True) * m_hat)).sum(0)
    length = tangent.norm()
    r = m_hat * torch.cos(length + eps) + tangent * (torch.sin(length + eps) / (length + eps))
    out = (r * (w * norms).sum(0)).view(shape)
    return out + base if base is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_rounds_as_mergekit_in_the_merge_dtype(dtype, with_base):
    tensors = [randn(48, 64, seed=50 + i).to(dtype) for i in range(3)]
    base = randn(48, 64, seed=60).to(dtype) if with_base else None
    out = multislerp_merge(tensors, [0.5, 0.3, 0.2], base=base)
    assert out.dtype == dtype
    assert torch.equal(out, mergekit_multislerp_reference(tensors, [0.5, 0.3, 0.2], base=base))
    if dtype == torch.bfloat16:  # --precise: float32 math, one rounding at the end
        precise = multislerp_merge(tensors, [0.5, 0.3, 0.2], base=base, precise=True)
        assert not torch.equal(precise, out)


def test_multislerp_is_the_same_for_any_thread_count():
    tensors = [randn(70_001, seed=40 + i) for i in range(3)]
    with threads(1):
        one = multislerp_merge(tensors, [0.2, 0.3, 0.5], base=randn(70_001, seed=44))
    with threads(2):
        two = multislerp_merge(tensors, [0.2, 0.3, 0.5], base=randn(70_001, seed=44))
    assert bits(one) == bits(two)


# --- karcher ----------------------------------------------------------------------------------


def karcher_reference(tensors, max_iter=10, tol=1e-5) -> torch.Tensor:
    """docs/methods.md as written, on full float64 vectors."""
    shape, count = tensors[0].shape, len(tensors)
    x = [t.double().flatten() for t in tensors]
    norms = [v.norm().item() for v in x]
    units = [v / n if n > 0 else torch.zeros_like(v) for v, n in zip(x, norms)]
    kept = [u for u, n in zip(units, norms) if n > tol]
    if not kept:
        return torch.zeros(shape, dtype=torch.float64)
    alpha = 1.0 / len(kept)
    u = sum(alpha * k for k in kept)
    u = u / u.norm() if u.norm() >= tol else kept[0]
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for k in kept:
            c = min(1.0, max(-1.0, (u @ k).item()))
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent += alpha * theta / math.sin(theta) * (k - c * u)
        step = tangent.norm().item()
        if step < tol:
            break
        u = math.cos(step) * u + math.sin(step) * tangent / step
        u = u / u.norm()
    return (sum(norms) / count * u).view(shape)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_karcher_equals_the_spec_iteration(count):
    tensors = [randn(9, 11, seed=50 + i) + 0.5 for i in range(count)]
    out = karcher_merge(tensors)
    assert out.dtype == torch.float32
    close(out, karcher_reference(tensors))


def mergekit_karcher_reference(tensors, max_iter=10, tol=1e-5):
    """The Karcher iteration as mergekit 0.1.5 runs it on float32 tensors (found by running
    it): every step a float32 tensor operation, the angles and step from 0-dim tensors."""
    xs = [t.flatten() for t in tensors]
    norms = [x.norm() for x in xs]
    units = [x / n for x, n in zip(xs, norms)]
    alpha = 1.0 / len(xs)
    u = sum(alpha * x for x in units)
    u = u / u.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for x in units:
            c = torch.clamp((u * x).sum(), -1, 1)
            theta = torch.arccos(c)
            if theta < tol:
                continue
            tangent = tangent + alpha * (theta / torch.sin(theta)) * (x - c * u)
        step = tangent.norm()
        if step < tol:
            break
        u = torch.cos(step) * u + torch.sin(step) * (tangent / step)
        u = u / u.norm()
    return (sum(alpha * n for n in norms) * u).view(tensors[0].shape)


def test_float32_karcher_of_small_tensors_is_mergekits_bit_for_bit():
    tensors = [randn(40, 64, seed=70 + i) + 0.3 for i in range(3)]
    out = karcher_merge(tensors)
    assert torch.equal(out, mergekit_karcher_reference(tensors))
    precise = karcher_merge(tensors, precise=True)
    close(precise, karcher_reference(tensors))
    assert not torch.equal(precise, out)


@pytest.mark.parametrize("max_iter, tol", [(0, 1e-5), (1, 1e-5), (3, 1e-3), (50, 1e-9)])
def test_karcher_honours_max_iter_and_tol(max_iter, tol):
    tensors = [randn(20, seed=60 + i) for i in range(3)]
    out = karcher_merge(tensors, max_iter=max_iter, tol=tol)
    close(out, karcher_reference(tensors, max_iter=max_iter, tol=tol))
    if max_iter == 0:  # the start point: the normalised mean direction, at the mean norm
        units = [t / t.norm() for t in tensors]
        mean = sum(units)
        close(out, mean / mean.norm() * sum(t.norm() for t in tensors) / 3)


def test_karcher_of_two_vectors_is_the_angle_bisector_at_the_mean_norm():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    out = karcher_merge([a, b])
    close(out, torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2), 0.0]))


def test_karcher_zero_inputs_count_in_the_norm_but_not_the_direction():
    a, b, zero = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), torch.zeros(2)
    out = karcher_merge([a, b, zero])
    close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2) * (4 / 3))
    close(out, karcher_reference([a, b, zero]))
    assert torch.equal(karcher_merge([zero, zero.clone()]), torch.zeros(2))


def test_karcher_with_one_input_returns_it_and_keeps_the_dtype():
    x = randn(5, seed=70).to(torch.bfloat16)
    assert karcher_merge([x]) is x
    out = karcher_merge([x, randn(5, seed=71).to(torch.bfloat16)])
    assert out.dtype == torch.bfloat16


def test_karcher_is_the_same_for_any_thread_count():
    tensors = [randn(3, 40_000, seed=80 + i) for i in range(3)]
    with threads(1):
        one = karcher_merge(tensors)
    with threads(2):
        two = karcher_merge(tensors)
    assert bits(one) == bits(two)
