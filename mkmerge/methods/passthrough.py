"""`passthrough`: copy one input, optionally scaled (docs/methods.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.chunked import elementwise
from mkmerge.methods.declaration import MergeMethod, MethodCall
from mkmerge.methods.working_set import WorkingSet
from mksuite.common.errors import MergeError
from mksuite.common.graph import ScaleTensor, Task


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``scale·W`` in W's own dtype when a scale is given, else W itself.

    A scale of exactly 1 returns W untouched (multiplying by 1 would not change a bit, but
    would cost a copy).
    """
    if scale is None or scale == 1:
        return tensor
    return tensor * scale


# --- declaration


def _run_passthrough(call: MethodCall) -> torch.Tensor:
    inputs = list(call.tensors) + ([call.base] if call.base is not None else [])
    if len(inputs) != 1:
        raise MergeError(
            f"passthrough copies exactly one input per tensor, but {len(inputs)} inputs have it",
            hint="list a single model (and no different `base_model`), or use `mkstack` for stacking",
        )
    params = call.per_model[0] if call.tensors else call.base_params
    return passthrough(inputs[0], params.get("scale"))


def _lone_input(load: Task, params: Mapping[str, Any]) -> Task:
    """The copy needs no merge task: the load itself, scaled when a scale other than 1 is set."""
    scale = params.get("scale")
    return load if scale is None or scale == 1.0 else ScaleTensor(load, float(scale))


MERGE_METHODS = (
    MergeMethod(
        name="passthrough",
        pretty_name="Passthrough",
        reference_url=None,
        parameters=catalogue.parameters("passthrough"),
        base_model="none",
        min_inputs=1,
        max_inputs=1,
        merge=_run_passthrough,
        chunked=elementwise(_run_passthrough),
        working_set=WorkingSet(copies=1, scratch_buffers=0),
        lone_input=_lone_input,
    ),
)
