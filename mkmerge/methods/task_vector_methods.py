"""The task-vector family's declarations: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

One :class:`MergeMethod` per variant of mkmerge/methods/task_arithmetic.py; they share the
adapter, the parameters and the plan-time check of the sparsifier's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mkmerge.methods import fused
from mkmerge.methods.declaration import (
    MergeMethod,
    MethodCall,
    ParameterSpec,
    PlannedInputs,
    required_base,
    requiring_base,
)
from mkmerge.methods.linear import WEIGHT
from mkmerge.methods.sparsifiers import check_sparsifier_parameters
from mkmerge.methods.task_arithmetic import (
    RANDOM_SPARSIFIERS,
    TASK_VECTOR_VARIANTS,
    TaskVectorVariant,
    task_vector_chunked,
    task_vector_merge,
)
from mkmerge.methods.working_set import WorkingSet
from mksuite.common.errors import MergeError, RecipeError

DENSITY = ParameterSpec("density", per_model=True, default=1.0, help="fraction of delta entries kept")
LAMBDA = ParameterSpec("lambda", per_model=False, default=1.0, help="scale of the merged delta")
INT8_MASK = ParameterSpec(
    "int8_mask",
    per_model=False,
    default=False,
    kind=bool,
    help="store masks as int8 (memory only; no numeric effect)",
)

_CARD = {
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_linear": ("Linear DARE", "https://arxiv.org/abs/2311.03099"),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("Linear DELLA", "https://arxiv.org/abs/2406.11617"),
}
# Per-model parameters a sparsifier reads besides density (its `options`).
_SPARSIFIER_PARAMETERS = {
    "breadcrumbs": (
        ParameterSpec(
            "gamma",
            per_model=True,
            default=0.01,
            help="fraction of largest-magnitude delta entries dropped as outliers",
        ),
    ),
    "della": (
        ParameterSpec(
            "epsilon",
            per_model=True,
            default=0.15,
            help="half-width of the keep-probability range density ± epsilon (ranked by magnitude)",
        ),
    ),
}

# Counted from the code (mkmerge/methods/task_arithmetic.py, sort_order.py) and checked against
# measured peaks (bfloat16 tensors of 33-100 MB, 2 to 7 inputs: within 10% of the measured set).
_TIES_STACKED = WorkingSet(copies=1, copies_per_summand=4, bytes_per_element=6, scratch_buffers=2)
_WORKING_SETS = {
    # a weighted delta per summand and the result
    "task_arithmetic": WorkingSet(
        copies=1, copies_per_summand=1, scratch_buffers=2, stacked=WorkingSet(copies=1, copies_per_summand=2)
    ),
    # deltas so far, the current delta and its magnitudes, the result; int32 keys, two bool
    # masks, and the uint32 words of a replayed sort (mkmerge/methods/sort_order.py). Fused:
    # the result and, per input, the uint32 words of its replay (the inputs are replayed
    # side by side).
    "ties": WorkingSet(
        copies=1,
        copies_per_summand=1,
        bytes_per_element=10,
        scratch_buffers=2,
        stacked=_TIES_STACKED,
        fused=WorkingSet(copies=1, bytes_per_summand_element=4, scratch_buffers=0),
        fused_dtypes=fused.DTYPES,
    ),
    # deltas so far, the current delta, its masked and its rescaled copy; uint32 draws, a bool mask
    "dare_linear": WorkingSet(
        copies=2,
        copies_per_summand=1,
        bytes_per_element=5,
        scratch_buffers=2,
        stacked=WorkingSet(copies=1, copies_per_summand=2, bytes_per_element=5, scratch_buffers=2),
    ),
    "dare_ties": WorkingSet(
        copies=2, copies_per_summand=1, bytes_per_element=5, scratch_buffers=2, stacked=_TIES_STACKED
    ),
}  # the others take the estimate's default


def _runner(variant: TaskVectorVariant) -> Callable[[MethodCall], torch.Tensor]:
    def run(call: MethodCall) -> torch.Tensor:
        base = required_base(call)
        count = len(call.tensors)
        generators = [call.generator(i) for i in range(count)] if variant.sparsifier in RANDOM_SPARSIFIERS else None
        return task_vector_merge(
            base,
            call.tensors,
            [p["weight"] for p in call.per_model],
            [p["density"] for p in call.per_model],
            sparsifier=variant.sparsifier,
            consensus=variant.consensus,
            normalize=bool(call.params["normalize"]),
            rescale=bool(call.params["rescale"]),
            lambda_=float(call.params["lambda"]),
            generators=generators,
            sparsifier_options=call.per_model,  # gamma / epsilon, where the method declares them
            precise=bool(call.params.get("precise")),
        )

    return run


def _sparsifier_check(variant: TaskVectorVariant) -> Callable[[PlannedInputs], None]:
    """Refuse the densities, gammas and epsilons the sparsifier would refuse at run time."""

    def check(planned: PlannedInputs) -> None:
        numel = math.prod(planned.shape)
        for model, p in planned.others():
            try:
                check_sparsifier_parameters(variant.sparsifier, p["density"], numel, p)
            except MergeError as error:
                raise MergeError(f"{model}, tensor {planned.tensor_name}: {error.message}", hint=error.hint) from None
            except RecipeError as error:
                where = f"{model}, tensor {planned.tensor_name}: {error.bare_message}"
                raise RecipeError(where, field=error.field, hint=error.hint) from None

    return check


def _declaration(name: str) -> MergeMethod:
    variant = TASK_VECTOR_VARIANTS[name]
    pretty_name, url = _CARD[name]
    parameters = (
        WEIGHT,
        DENSITY,
        *_SPARSIFIER_PARAMETERS.get(variant.sparsifier, ()),
        ParameterSpec(
            "normalize",
            per_model=False,
            default=variant.normalize_default,
            kind=bool,
            help="divide the merged delta by the sum of the (agreeing) weights",
        ),
        ParameterSpec(
            "rescale",
            per_model=False,
            default=variant.rescale_default,
            kind=bool,
            help="restore each sparsified delta's L1 norm",
        ),
        LAMBDA,
        INT8_MASK,
    )
    return MergeMethod(
        name=name,
        pretty_name=pretty_name,
        reference_url=url,
        parameters=parameters,
        base_model="required",
        min_inputs=1,
        max_inputs=None,
        merge=_runner(variant),
        chunked=requiring_base(task_vector_chunked(variant)),
        embeddings="base rows",
        random=variant.sparsifier in RANDOM_SPARSIFIERS,
        working_set=_WORKING_SETS.get(name),
        check=_sparsifier_check(variant),
    )


MERGE_METHODS = tuple(_declaration(name) for name in TASK_VECTOR_VARIANTS)
