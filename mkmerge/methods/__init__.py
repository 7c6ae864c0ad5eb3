"""Merge methods: declared by their parameters, registered by name.

Each method is a :class:`MergeMethod`: its parameters (global or per-model, with defaults),
how it treats the base model, how many inputs it takes, and ``run``, an adapter from a
:class:`MethodCall` (everything the engine resolved for one output tensor) to a pure math
function in a sibling module. The engine validates recipes against these declarations and
never needs to know a method's math.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mkmerge.methods.arcee_fusion import arcee_fusion_merge
from mkmerge.methods.chunked import ChunkedForm, elementwise
from mkmerge.methods.karcher import karcher_merge
from mkmerge.methods.linear import linear_merge
from mkmerge.methods.model_stock import model_stock_merge
from mkmerge.methods.multislerp import multislerp_merge
from mkmerge.methods.nearswap import nearswap_merge
from mkmerge.methods.nuslerp import nuslerp_fraction, nuslerp_merge
from mkmerge.methods.passthrough import passthrough
from mkmerge.methods.ram import ram_merge, ramplus_tl_merge
from mkmerge.methods.sce import sce_merge
from mkmerge.methods.slerp import slerp_chunked, slerp_merge
from mkmerge.methods.task_arithmetic import (
    RANDOM_SPARSIFIERS,
    TASK_VECTOR_VARIANTS,
    TaskVectorVariant,
    task_vector_chunked,
    task_vector_merge,
)
from mksuite.common.errors import MergeError, RecipeError, did_you_mean

REQUIRED: Any = object()
"""Default of a parameter that must be given (per-model ones: except for the base model)."""


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter a method reads from the recipe."""

    name: str
    per_model: bool  # True: one value per input model ("tensor" parameter); False: global
    default: Any = REQUIRED  # REQUIRED: must resolve; None: optional with no value
    kind: type = float  # float | bool | int
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodCall:
    """Everything a method sees for one output tensor."""

    tensors: tuple[torch.Tensor, ...]  # ordinary (non-base) inputs present, in input order
    base: torch.Tensor | None  # the base input, if the method uses one and it is present
    per_model: tuple[Mapping[str, Any], ...]  # resolved per-model params, aligned with tensors
    base_params: Mapping[str, Any]  # resolved per-model params of the base model
    params: Mapping[str, Any]  # resolved global params
    generator: Callable[[int], torch.Generator]  # generator(i): seeded for tensors[i]
    tensor_name: str
    # Set when the tensors are one chunk (row block) of a bigger tensor (see chunked.py).
    offset: int = 0  # the chunk's first element in the flattened whole tensor
    chunk: int = 0  # the chunk's position among the tensor's chunks
    full_shape: tuple[int, ...] | None = None  # the whole tensor's shape


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its declaration and its adapter to the math."""

    name: str
    pretty_name: str
    reference_url: str | None
    parameters: tuple[ParameterSpec, ...]
    base_model: str  # "required" | "optional" | "none" (the base is an ordinary input)
    min_inputs: int  # counting the base where it is an input
    max_inputs: int | None  # None: no limit
    run: Callable[[MethodCall], torch.Tensor]
    chunked: ChunkedForm | None = None  # how to merge row blocks of big tensors exactly
    other_inputs: int | None = None  # exact number of inputs besides the base, where the method fixes it

    def global_parameters(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if not p.per_model)

    def per_model_parameters(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if p.per_model)

    def parameter(self, name: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.name == name), None)


# --- adapters: MethodCall -> pure function


def _naming_tensor(run: Callable[[MethodCall], torch.Tensor]) -> Callable[[MethodCall], torch.Tensor]:
    """Prefix math errors with the output tensor's name: the pure functions do not know it."""

    @functools.wraps(run)
    def named(call: MethodCall) -> torch.Tensor:
        try:
            return run(call)
        except MergeError as error:
            raise MergeError(f"tensor `{call.tensor_name}`: {error.message}", hint=error.hint) from error

    return named


@_naming_tensor
def _run_linear(call: MethodCall) -> torch.Tensor:
    tensors, params = list(call.tensors), list(call.per_model)
    if call.base is not None:  # the engine passes it as an ordinary input; accept it either way
        tensors.append(call.base)
        params.append(call.base_params)
    weights = [p["weight"] for p in params]
    return linear_merge(tensors, weights, normalize=bool(call.params["normalize"]))


@_naming_tensor
def _run_slerp(call: MethodCall) -> torch.Tensor:
    present = ([call.base] if call.base is not None else []) + list(call.tensors)
    if len(present) == 1:
        return present[0]
    if call.base is None or len(call.tensors) != 1:
        raise MergeError(
            f"slerp merges the base model with exactly one other model; this tensor has "
            f"{len(call.tensors)} other input(s) and {'a' if call.base is not None else 'no'} base",
            hint="list exactly two models, one of them the `base_model`",
        )
    return slerp_merge(float(call.params["t"]), call.base, call.tensors[0])


def _required_base(call: MethodCall) -> torch.Tensor:
    if call.base is None:
        raise MergeError(
            "this method merges deltas from the base model, but no base tensor was given",
            hint="set `base_model` in the recipe",
        )
    return call.base


def _task_vector_runner(variant: TaskVectorVariant) -> Callable[[MethodCall], torch.Tensor]:
    @_naming_tensor
    def run(call: MethodCall) -> torch.Tensor:
        base = _required_base(call)
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
        )

    return run


@_naming_tensor
def _run_sce(call: MethodCall) -> torch.Tensor:
    return sce_merge(_required_base(call), call.tensors, select_topk=float(call.params["select_topk"]))


@_naming_tensor
def _run_ram(call: MethodCall) -> torch.Tensor:
    return ram_merge(_required_base(call), call.tensors, epsilon=float(call.params["epsilon"]))


@_naming_tensor
def _run_ramplus_tl(call: MethodCall) -> torch.Tensor:
    return ramplus_tl_merge(
        _required_base(call),
        call.tensors,
        epsilon=float(call.params["epsilon"]),
        r=float(call.params["r"]),
        alpha=float(call.params["alpha"]),
    )


@_naming_tensor
def _run_passthrough(call: MethodCall) -> torch.Tensor:
    inputs = list(call.tensors) + ([call.base] if call.base is not None else [])
    if len(inputs) != 1:
        raise MergeError(
            f"passthrough copies exactly one input per tensor, but {len(inputs)} inputs have it",
            hint="list a single model (and no different `base_model`), or use `mkstack` for stacking",
        )
    params = call.per_model[0] if call.tensors else call.base_params
    return passthrough(inputs[0], params.get("scale"))


# geometric methods: nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion


def _base_and_one_other(call: MethodCall, method: str) -> torch.Tensor | None:
    """For base + exactly one other: the base when it is alone, None when the pair is there."""
    if not call.tensors and call.base is not None:
        return call.base
    if call.base is None or len(call.tensors) != 1:
        raise MergeError(
            f"{method} merges the base model with exactly one other model; this tensor has "
            f"{len(call.tensors)} other input(s) and {'a' if call.base is not None else 'no'} base",
            hint="list exactly two models, one of them the `base_model`",
        )
    return None


@_naming_tensor
def _run_nuslerp(call: MethodCall) -> torch.Tensor:
    if len(call.tensors) > 2:
        raise MergeError(
            f"nuslerp interpolates between exactly two models, but this tensor has {len(call.tensors)}",
            hint="list two models (plus, optionally, a third as `base_model`)",
        )
    if len(call.tensors) < 2:  # one of the two lacks this (optional) tensor: keep what is there
        return call.tensors[0] if call.tensors else call.base
    t = nuslerp_fraction(call.per_model[0]["weight"], call.per_model[1]["weight"])
    return nuslerp_merge(
        t,
        *call.tensors,
        base=call.base,
        flatten=bool(call.params["nuslerp_flatten"]),
        row_wise=bool(call.params["nuslerp_row_wise"]),
    )


@_naming_tensor
def _run_multislerp(call: MethodCall) -> torch.Tensor:
    if not call.tensors:
        return call.base
    return multislerp_merge(
        call.tensors,
        [p["weight"] for p in call.per_model],
        base=call.base,
        normalize_weights=bool(call.params["normalize_weights"]),
        eps=float(call.params["eps"]),
    )


@_naming_tensor
def _run_karcher(call: MethodCall) -> torch.Tensor:
    tensors = list(call.tensors) + ([call.base] if call.base is not None else [])
    return karcher_merge(tensors, max_iter=int(call.params["max_iter"]), tol=float(call.params["tol"]))


@_naming_tensor
def _run_model_stock(call: MethodCall) -> torch.Tensor:
    if call.base is None:
        raise MergeError("model_stock moves from the base model, but no base tensor was given", hint="set `base_model`")
    if not call.tensors:
        return call.base
    merged, t = model_stock_merge(call.base, call.tensors, filter_wise=bool(call.params["filter_wise"]))
    outside = (t < 0) | (t > 1)
    if bool(outside.any()):
        where = (
            f"t = {float(t.reshape(-1)[0]):.4g}"
            if t.numel() == 1
            else (
                f"t outside [0, 1] in {int(outside.sum())} of {t.numel()} rows "
                f"(range {float(t.min()):.4g} to {float(t.max()):.4g})"
            )
        )
        warnings.warn(
            f"model_stock, tensor {call.tensor_name}: {where}, so the merge extrapolates beyond the "
            "base and the models' average (their deltas disagree in direction)",
            stacklevel=2,
        )
    return merged


@_naming_tensor
def _run_nearswap(call: MethodCall) -> torch.Tensor:
    alone = _base_and_one_other(call, "nearswap")
    return alone if alone is not None else nearswap_merge(float(call.params["t"]), call.base, call.tensors[0])


@_naming_tensor
def _run_arcee_fusion(call: MethodCall) -> torch.Tensor:
    alone = _base_and_one_other(call, "arcee_fusion")
    return alone if alone is not None else arcee_fusion_merge(call.base, call.tensors[0], call.generator(0))


# --- declarations

_WEIGHT = ParameterSpec("weight", per_model=True, help="mixing weight of this model")
_DENSITY = ParameterSpec("density", per_model=True, default=1.0, help="fraction of delta entries kept")
_LAMBDA = ParameterSpec("lambda", per_model=False, default=1.0, help="scale of the merged delta")
_INT8_MASK = ParameterSpec(
    "int8_mask",
    per_model=False,
    default=False,
    kind=bool,
    help="store masks as int8 (memory only; no numeric effect)",
)

_RAM_EPSILON = ParameterSpec(
    "epsilon", per_model=False, default=1e-5, help="a delta entry counts as a change when its magnitude exceeds this"
)

_TASK_VECTOR_INFO = {
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


def _task_vector_method(name: str) -> MergeMethod:
    variant = TASK_VECTOR_VARIANTS[name]
    pretty_name, url = _TASK_VECTOR_INFO[name]
    parameters = (
        _WEIGHT,
        _DENSITY,
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
        _LAMBDA,
        _INT8_MASK,
    )
    return MergeMethod(
        name=name,
        pretty_name=pretty_name,
        reference_url=url,
        parameters=parameters,
        base_model="required",
        min_inputs=1,
        max_inputs=None,
        run=_task_vector_runner(variant),
        chunked=_requiring_base(task_vector_chunked(variant)),
    )


def _requiring_base(form: ChunkedForm) -> ChunkedForm:
    """The task-vector family's chunked form, refusing a call without a base like ``run`` does."""

    def apply(call: MethodCall, state):
        if call.base is None:
            raise MergeError(
                "this method merges deltas from the base model, but no base tensor was given",
                hint="set `base_model` in the recipe",
            )
        return form.apply(call, state)

    return dataclasses.replace(form, apply=apply)


def _build_registry() -> dict[str, MergeMethod]:
    methods = [
        MergeMethod(
            name="linear",
            pretty_name="Linear",
            reference_url="https://arxiv.org/abs/2203.05482",
            parameters=(
                _WEIGHT,
                ParameterSpec(
                    "normalize", per_model=False, default=True, kind=bool, help="divide by the sum of weights"
                ),
            ),
            base_model="none",
            min_inputs=1,
            max_inputs=None,
            run=_run_linear,
            chunked=elementwise(_run_linear),  # a per-element FMA chain: any number of inputs
        ),
        MergeMethod(
            name="slerp",
            pretty_name="SLERP",
            reference_url="https://en.wikipedia.org/wiki/Slerp",
            parameters=(ParameterSpec("t", per_model=False, help="interpolation factor: 0 = base, 1 = other model"),),
            base_model="required",
            min_inputs=2,
            max_inputs=2,
            run=_run_slerp,
            chunked=slerp_chunked(),
        ),
        # geometric methods
        MergeMethod(
            name="nuslerp",
            pretty_name="NuSLERP",
            reference_url=None,
            parameters=(
                _WEIGHT,
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
            base_model="optional",
            min_inputs=2,
            max_inputs=3,
            other_inputs=2,
            run=_run_nuslerp,
        ),
        MergeMethod(
            name="multislerp",
            pretty_name="Multi-SLERP",
            reference_url=None,
            parameters=(
                _WEIGHT,
                ParameterSpec(
                    "normalize_weights",
                    per_model=False,
                    default=True,
                    kind=bool,
                    help="divide the weights by their sum",
                ),
                ParameterSpec("eps", per_model=False, default=1e-8, help="guards norms against division by zero"),
            ),
            base_model="optional",
            min_inputs=1,
            max_inputs=None,
            run=_run_multislerp,
        ),
        MergeMethod(
            name="karcher",
            pretty_name="Karcher Mean",
            reference_url="https://en.wikipedia.org/wiki/Karcher_mean",
            parameters=(
                ParameterSpec("max_iter", per_model=False, default=10, kind=int, help="most gradient steps"),
                ParameterSpec("tol", per_model=False, default=1e-5, help="convergence and zero-norm tolerance"),
            ),
            base_model="none",
            min_inputs=1,
            max_inputs=None,
            run=_run_karcher,
        ),
        MergeMethod(
            name="model_stock",
            pretty_name="Model Stock",
            reference_url="https://arxiv.org/abs/2403.19522",
            parameters=(
                ParameterSpec(
                    "filter_wise",
                    per_model=False,
                    default=False,
                    kind=bool,
                    help="one ratio per row (last axis) instead of one per tensor",
                ),
            ),
            base_model="required",
            min_inputs=3,
            max_inputs=None,
            run=_run_model_stock,
        ),
        MergeMethod(
            name="nearswap",
            pretty_name="NearSwap",
            reference_url=None,
            parameters=(ParameterSpec("t", per_model=False, help="differences up to t take the other model's value"),),
            base_model="required",
            min_inputs=2,
            max_inputs=2,
            run=_run_nearswap,
        ),
        MergeMethod(
            name="arcee_fusion",
            pretty_name="Arcee Fusion",
            reference_url=None,
            parameters=(),
            base_model="required",
            min_inputs=2,
            max_inputs=2,
            run=_run_arcee_fusion,
        ),
        *(_task_vector_method(name) for name in TASK_VECTOR_VARIANTS),
        MergeMethod(
            name="sce",
            pretty_name="SCE",
            reference_url="https://arxiv.org/abs/2408.07990",
            parameters=(
                ParameterSpec(
                    "select_topk",
                    per_model=False,
                    default=1.0,
                    help="fraction of the positions with non-zero variance across models kept",
                ),
                _INT8_MASK,
            ),
            base_model="required",
            min_inputs=1,
            max_inputs=None,
            run=_run_sce,
        ),
        MergeMethod(
            name="ram",
            pretty_name="RAM",
            reference_url=None,
            parameters=(_RAM_EPSILON,),
            base_model="required",
            min_inputs=1,
            max_inputs=None,
            run=_run_ram,
        ),
        MergeMethod(
            name="ramplus_tl",
            pretty_name="RAM+",
            reference_url=None,
            parameters=(
                _RAM_EPSILON,
                ParameterSpec("r", per_model=False, default=0.1, help="strength of the boost of unique changes"),
                ParameterSpec("alpha", per_model=False, default=0.2, help="cap of the shared/unique ratio"),
            ),
            base_model="required",
            min_inputs=1,
            max_inputs=None,
            run=_run_ramplus_tl,
        ),
        MergeMethod(
            name="passthrough",
            pretty_name="Passthrough",
            reference_url=None,
            parameters=(ParameterSpec("scale", per_model=True, default=None, help="multiply the tensor by this"),),
            base_model="none",
            min_inputs=1,
            max_inputs=1,
            run=_run_passthrough,
            chunked=elementwise(_run_passthrough),
        ),
    ]
    return {method.name: method for method in methods}


METHODS: dict[str, MergeMethod] = _build_registry()


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; a recipe error naming the field otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(
            f"unknown merge method `{name}`; known methods: {', '.join(sorted(METHODS))}",
            field="merge_method",
            hint=did_you_mean(name, METHODS),
        ) from None
