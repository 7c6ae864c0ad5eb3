"""`passthrough`: copy one input, optionally scaled (SPEC §2.11)."""

from __future__ import annotations

import torch


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``scale·W`` in W's own dtype when a scale is given, else W itself.

    A scale of exactly 1 returns W untouched (multiplying by 1 would not change a bit, but
    would cost a copy).
    """
    if scale is None or scale == 1:
        return tensor
    return tensor * scale
