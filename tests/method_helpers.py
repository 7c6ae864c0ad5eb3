"""Small helpers shared by the merge-method tests."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def threads(count: int):
    """Run the body with torch using ``count`` CPU threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def bits(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes: equal bits, not just equal values (tells -0 from +0, NaN payloads)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def l1_factor(before: float, after: float, dtype: torch.dtype, precise: bool = False) -> float:
    """The L1 rescale factor from exact norms: mergekit divides them rounded to the merge dtype
    (a bfloat16 factor for bfloat16 tensors); ``precise`` (``--precise``) keeps the float64 ratio."""
    if precise or dtype == torch.float64:
        return before / after
    return float(torch.tensor(before, dtype=dtype) / torch.tensor(after, dtype=dtype))
