"""The built-in merge methods by name: the module declaring each and the parameters it reads.

This is everything recipe validation needs to know about a method (is the name known, which
parameters does it take, which values are outside their domain), and it imports no torch: a
recipe error is reported without loading the math. Each method module takes its
``parameters`` from here (one source), and the registry (``mkmerge.methods``) imports a
method's module only when the method itself is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REQUIRED: Any = object()
"""Default of a parameter that must be given (per-model ones: except for the base model)."""


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter a method reads from the recipe.

    ``minimum`` / ``maximum`` bound the values the math accepts (inclusive); a recipe value
    outside them is refused when the recipe is read, before any model is looked at.
    """

    name: str
    per_model: bool  # True: one value per input model ("tensor" parameter); False: global
    default: Any = REQUIRED  # REQUIRED: must resolve; None: optional with no value
    kind: type = float  # float | bool | int
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    domain: str = ""  # why the bounds are what they are, for the error message

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def convert(self, value: Any) -> Any:
        """A resolved value as the method reads it: ``kind`` applied, None kept."""
        if value is None:
            return None
        if self.kind is bool:
            return bool(value)
        if self.kind is int:
            return int(value)
        return float(value)


@dataclass(frozen=True)
class TaskVectorVariant:
    """What distinguishes one member of the task-vector family (docs/methods.md table)."""

    sparsifier: str  # key of task_arithmetic.SPARSIFIERS
    consensus: bool  # TIES sign election
    normalize_default: bool
    rescale_default: bool


# Note the inconsistent normalize defaults (ties and della true, dare_ties and
# breadcrumbs_ties false): recipes rely on them.
TASK_VECTOR_VARIANTS: dict[str, TaskVectorVariant] = {
    #                                  sparsifier   consensus  normalize  rescale
    "task_arithmetic": TaskVectorVariant("none", False, False, False),
    "ties": TaskVectorVariant("magnitude", True, True, False),
    "dare_linear": TaskVectorVariant("random", False, False, True),
    "dare_ties": TaskVectorVariant("random", True, False, True),
    "breadcrumbs": TaskVectorVariant("breadcrumbs", False, False, False),
    "breadcrumbs_ties": TaskVectorVariant("breadcrumbs", True, False, False),
    "della": TaskVectorVariant("della", True, True, True),
    "della_linear": TaskVectorVariant("della", False, False, True),
}

# -- parameters several methods share -----------------------------------------------------
WEIGHT = ParameterSpec("weight", per_model=True, help="mixing weight of this model")
DENSITY = ParameterSpec(
    "density",
    per_model=True,
    default=1.0,
    help="fraction of delta entries kept",
    minimum=0.0,
    domain="it is the fraction of delta entries kept",
)
LAMBDA = ParameterSpec("lambda", per_model=False, default=1.0, help="scale of the merged delta")
INT8_MASK = ParameterSpec(
    "int8_mask",
    per_model=False,
    default=False,
    kind=bool,
    help="store masks as int8 (memory only; no numeric effect)",
)
# Per-model parameters a sparsifier reads besides density (its `options`).
SPARSIFIER_PARAMETERS: dict[str, tuple[ParameterSpec, ...]] = {
    "breadcrumbs": (
        ParameterSpec(
            "gamma",
            per_model=True,
            default=0.01,
            help="fraction of largest-magnitude delta entries dropped as outliers",
            minimum=0.0,
            maximum=1.0,
            domain="it is the share of largest-magnitude delta entries dropped as outliers",
        ),
    ),
    "della": (
        ParameterSpec(
            "epsilon",
            per_model=True,
            default=0.15,
            help="half-width of the keep-probability range density ± epsilon (ranked by magnitude)",
            minimum=0.0,
            domain="it is the half-width of DELLA's keep-probability range",
        ),
    ),
}
RAM_EPSILON = ParameterSpec(
    "epsilon", per_model=False, default=1e-5, help="a delta entry counts as a change when its magnitude exceeds this"
)


def _task_vector_parameters(name: str) -> tuple[ParameterSpec, ...]:
    variant = TASK_VECTOR_VARIANTS[name]
    return (
        WEIGHT,
        DENSITY,
        *SPARSIFIER_PARAMETERS.get(variant.sparsifier, ()),
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


# method -> (declaring module under mkmerge.methods, parameters), in the order `mkmerge methods` lists them
BUILTIN: dict[str, tuple[str, tuple[ParameterSpec, ...]]] = {
    "linear": (
        "linear",
        (
            WEIGHT,
            ParameterSpec("normalize", per_model=False, default=True, kind=bool, help="divide by the sum of weights"),
        ),
    ),
    "slerp": (
        "slerp",
        (ParameterSpec("t", per_model=False, help="interpolation factor: 0 = base, 1 = other model"),),
    ),
    "nuslerp": (
        "nuslerp",
        (
            WEIGHT,
            ParameterSpec(
                "nuslerp_flatten",
                per_model=False,
                default=True,
                kind=bool,
                help="treat the whole tensor as one vector (else one vector per row or column)",
            ),
            ParameterSpec(
                "nuslerp_row_wise",
                per_model=False,
                default=False,
                kind=bool,
                help="without flatten: slerp the vectors along the first axis (matrix columns), "
                "not the last (rows), as mergekit's code does",
            ),
        ),
    ),
    "multislerp": (
        "multislerp",
        (
            WEIGHT,
            ParameterSpec(
                "normalize_weights", per_model=False, default=True, kind=bool, help="divide the weights by their sum"
            ),
            ParameterSpec("eps", per_model=False, default=1e-8, help="guards norms against division by zero"),
        ),
    ),
    "karcher": (
        "karcher",
        (
            ParameterSpec("max_iter", per_model=False, default=10, kind=int, help="most gradient steps"),
            ParameterSpec("tol", per_model=False, default=1e-5, help="convergence and zero-norm tolerance"),
        ),
    ),
    "model_stock": (
        "model_stock",
        (
            ParameterSpec(
                "filter_wise",
                per_model=False,
                default=False,
                kind=bool,
                help="one ratio per row (last axis) instead of one per tensor",
            ),
        ),
    ),
    "nearswap": (
        "nearswap",
        (ParameterSpec("t", per_model=False, help="differences up to t take the other model's value"),),
    ),
    "arcee_fusion": ("arcee_fusion", ()),
    **{name: ("task_vector_methods", _task_vector_parameters(name)) for name in TASK_VECTOR_VARIANTS},
    "sce": (
        "sce",
        (
            ParameterSpec(
                "select_topk",
                per_model=False,
                default=1.0,
                help="fraction of the positions with non-zero variance across models kept",
            ),
            INT8_MASK,
        ),
    ),
    "ram": ("ram", (RAM_EPSILON,)),
    "ramplus_tl": (
        "ram",
        (
            RAM_EPSILON,
            ParameterSpec("r", per_model=False, default=0.1, help="strength of the boost of unique changes"),
            ParameterSpec("alpha", per_model=False, default=0.2, help="cap of the shared/unique ratio"),
        ),
    ),
    "passthrough": (
        "passthrough",
        (ParameterSpec("scale", per_model=True, default=None, help="multiply the tensor by this"),),
    ),
}


def parameters(method: str) -> tuple[ParameterSpec, ...]:
    """The parameters built-in ``method`` reads (what its module declares)."""
    return BUILTIN[method][1]


def declaring_module(method: str) -> str:
    """The module (under ``mkmerge.methods``) whose ``MERGE_METHODS`` declares built-in ``method``."""
    return f"mkmerge.methods.{BUILTIN[method][0]}"
