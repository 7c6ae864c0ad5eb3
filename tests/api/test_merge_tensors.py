"""mksuite.merge_tensors / merge_state_dicts: the tools' methods on tensors in memory, against independent math."""

from __future__ import annotations

import pytest
import torch

import mksuite
from mksuite.common.errors import MissingTensorError, RecipeError

from run_helpers import merged_tensors
from tiny_models import read_tensors


def _tensors(seed: int, n: int = 3, shape=(16, 24)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_linear_is_the_normalised_weighted_sum():
    a, b, c = _tensors(0)
    merged = mksuite.merge_tensors("linear", [a, b, c], weight=[0.5, 0.25, 0.25])
    # mergekit's arithmetic: acc = fma(w_i, x_i, acc) in float32, one rounding a step, then / sum(w);
    # with power-of-two weights each step is exact in float64, so rounding it to float32 is the fma
    acc = torch.zeros_like(a)
    for weight, x in ((0.5, a), (0.25, b), (0.25, c)):
        acc = (weight * x.double() + acc.double()).float()
    assert torch.equal(merged, acc / 1.0)
    halves = mksuite.merge_tensors("linear", [a, b], weight=1.0, normalize=False)
    torch.testing.assert_close(halves, a + b, rtol=0, atol=0)


def test_task_arithmetic_adds_the_weighted_deltas_to_the_base():
    base, a, b = _tensors(1)
    merged = mksuite.merge_tensors("task_arithmetic", {"a": a, "b": b}, base=base, weight={"a": 0.5, "b": 2.0})
    expected = base.double() + 0.5 * (a.double() - base.double()) + 2.0 * (b.double() - base.double())
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-6)


def test_ties_at_full_density_is_the_sign_elected_mean():
    base, a, b = _tensors(2)
    merged = mksuite.merge_tensors("ties", [a, b], base=base, weight=[1.0, 1.0], density=1.0)
    deltas = torch.stack([a - base, b - base]).double()
    sign = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    mean = (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(merged.double(), base.double() + mean, rtol=1e-6, atol=1e-6)


def test_slerp_endpoints_and_midpoint_of_orthogonal_vectors():
    x = torch.tensor([1.0, 0.0])
    y = torch.tensor([0.0, 1.0])
    assert torch.equal(mksuite.merge_tensors("slerp", [y], base=x, t=0.0), x)
    mid = mksuite.merge_tensors("slerp", [y], base=x, t=0.5)
    torch.testing.assert_close(mid, torch.tensor([2**-0.5, 2**-0.5]))


def test_random_methods_follow_the_seed():
    base, a, b = _tensors(3)
    kw = dict(base=base, weight=[1.0, 1.0], density=0.5, tensor_name="w")
    first = mksuite.merge_tensors("dare_ties", [a, b], seed=1, **kw)
    assert torch.equal(first, mksuite.merge_tensors("dare_ties", [a, b], seed=1, **kw))
    assert not torch.equal(first, mksuite.merge_tensors("dare_ties", [a, b], seed=2, **kw))


def test_merge_state_dicts_equals_the_file_merge(family, tmp_path):
    base, a, b = family
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.7}}\ndtype: float32\n"
    )
    from_files = merged_tensors(recipe, tmp_path / "out")
    in_memory = mksuite.merge_state_dicts("linear", [read_tensors(a), read_tensors(b)], weight=[0.3, 0.7])
    assert in_memory.keys() == from_files.keys()
    for name, tensor in from_files.items():
        assert torch.equal(in_memory[name].to(tensor.dtype), tensor), name


def test_bad_calls_name_the_culprit():
    base, a, b = _tensors(4)
    with pytest.raises(RecipeError, match="densty") as typo:
        mksuite.merge_tensors("ties", [a, b], base=base, weight=1.0, densty=0.5)
    assert "did you mean `density`" in typo.value.render()
    with pytest.raises(RecipeError, match="base"):
        mksuite.merge_tensors("ties", [a, b], weight=1.0)
    with pytest.raises(RecipeError, match="takes no base"):
        mksuite.merge_tensors("linear", [a, b], base=base, weight=1.0)
    with pytest.raises(RecipeError, match="needs parameter `weight`"):
        mksuite.merge_tensors("linear", [a, b])
    with pytest.raises(RecipeError, match="2 values for 3 inputs"):
        mksuite.merge_tensors("linear", [a, b, base], weight=[1, 1])
    with pytest.raises(RecipeError, match="density -0.5"):
        mksuite.merge_tensors("ties", [a], base=base, weight=1.0, density=-0.5)
    with pytest.raises(RecipeError, match="unknown merge method"):
        mksuite.merge_tensors("linaer", [a, b], weight=1.0)
    with pytest.raises(MissingTensorError, match="`x`"):
        mksuite.merge_state_dicts("linear", [{"x": a, "y": b}, {"y": b}], weight=1.0)
