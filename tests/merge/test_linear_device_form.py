"""The torch form of linear (what `--device cuda` runs) rounds as the fused CPU kernel does, also
under CUDA's arithmetic, emulated here on the CPU.

CUDA's division by a host scalar (a Python number) is a multiplication by the scalar's float32
reciprocal: one more rounding than the CPU's division. Dividing by a tensor on the operand's
device is a correctly rounded division on both. The emulation below rewrites every division
by a Python number as CUDA performs it; a 0-dim tensor stands for one created on the
accumulator's device, as the torch form creates it.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mkmerge.methods import fused
from mkmerge.methods.linear import linear_merge

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")

_DIVISIONS = {torch.Tensor.div, torch.Tensor.div_, torch.div, torch.Tensor.__truediv__, torch.Tensor.__itruediv__}


class CudaScalarDivision(TorchFunctionMode):
    """Divisions of a float32 tensor by a Python number become ``x * float32(1 / b)``."""

    def __init__(self):
        super().__init__()
        self.rewritten = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DIVISIONS and len(args) == 2 and isinstance(args[1], (int, float)) and not kwargs:
            x, b = args
            if x.dtype == torch.float32:
                self.rewritten += 1
                inverse = (torch.tensor(1.0) / torch.tensor(float(b))).item()
                if func in (torch.Tensor.div_, torch.Tensor.__itruediv__):
                    return x.mul_(inverse)
                return x * inverse
        return func(*args, **kwargs)


def _inputs(count: int, dtype: torch.dtype, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(60_001, generator=g) * torch.exp(torch.randn(60_001, generator=g))).to(dtype)
            for _ in range(count)]  # fmt: skip


def _torch_form(tensors, weights, normalize, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(fused, "linear_applies", lambda tensors: False)
        return linear_merge(tensors, weights, normalize)


def test_the_emulation_rounds_differently_from_a_division():
    x = _inputs(1, torch.float32)[0]
    with CudaScalarDivision() as mode:
        emulated = x / 1.8
    assert mode.rewritten == 1
    assert not torch.equal(emulated, x / torch.tensor(1.8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [1, 3, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_torch_form_under_cuda_arithmetic_has_the_fused_kernels_bits(monkeypatch, dtype, count, normalize):
    tensors = _inputs(count, dtype)
    weights = [0.6, 0.35, -0.2, 0.9][:count]
    with CudaScalarDivision():
        device_form = _torch_form(tensors, weights, normalize, monkeypatch)
    assert fused.linear_applies(tensors)
    fused_form = linear_merge(tensors, weights, normalize)
    assert torch.equal(device_form.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       fused_form.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip
