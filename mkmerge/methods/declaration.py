"""What a merge method declares: everything the planner, the memory estimate, recipe
validation and the model card need to know about it, beside its adapter to the math.

A method module (linear.py, slerp.py, ...) ends with its :class:`MergeMethod` values in
``MERGE_METHODS``; the registry (``mkmerge.methods``) collects them. Nothing outside the
method's module compares method names.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mkmerge.methods.chunked import ChunkedForm, ChunkState
from mkmerge.methods.working_set import WorkingSet
from mksuite.common.errors import MergeError

REQUIRED: Any = object()
"""Default of a parameter that must be given (per-model ones: except for the base model)."""


BaseModel = Literal["required", "optional", "none"]
"""How a method treats the recipe's ``base_model``: it merges from it (a recipe without one is
refused), it uses one when there is one, or the base, if named, is an ordinary input."""

Embeddings = Literal["common rows", "base rows", "same"]
"""How a method copes with inputs whose vocabulary-indexed tensors differ in rows: cut every
input to the fewest rows; cut to the base's rows (and leave out inputs whose other tensors
differ from the base's shape); or refuse (unless a `tokenizer:` block aligns the vocabularies)."""


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
    # Where scratch files go: the output's partial directory during a run (the disk that must
    # hold the model anyway); None: the system's temporary directory.
    scratch_dir: Path | None = None


@dataclass(frozen=True)
class PlannedInputs:
    """What a method's plan-time check sees for one output tensor: parameters and shapes, no data."""

    tensor_name: str
    models: tuple[str, ...]  # each input's model, as the recipe names it
    is_base: tuple[bool, ...]
    per_model: tuple[Mapping[str, Any], ...]  # aligned with models
    params: Mapping[str, Any]
    shape: tuple[int, ...]  # the output tensor's shape

    def others(self) -> list[tuple[str, Mapping[str, Any]]]:
        """(model, its parameters) for the inputs other than the base."""
        return [(m, p) for m, b, p in zip(self.models, self.is_base, self.per_model) if not b]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its declaration and its adapter to the math.

    ``merge`` is the adapter (a :class:`MethodCall` to a pure function's result); call it
    through :meth:`run`, which names the output tensor in the errors the math raises.
    """

    name: str
    pretty_name: str  # for the model card
    reference_url: str | None  # the paper (or page) the card links
    parameters: tuple[ParameterSpec, ...]
    base_model: BaseModel
    min_inputs: int  # counting the base where it is an input
    max_inputs: int | None  # None: no limit
    merge: Callable[[MethodCall], torch.Tensor]
    chunked: ChunkedForm | None = None  # how to merge row blocks of big tensors exactly
    other_inputs: int | None = None  # exact number of inputs besides the base, where the method fixes it
    embeddings: Embeddings = "same"
    random: bool = False  # draws: its tasks are seeded from (seed, tensor name, input)
    # Temporaries beside the inputs, for the memory estimate; None: the estimate's cautious default.
    working_set: WorkingSet | None = None
    # An optional tensor fewer than min_inputs models have is left out of the output, not merged.
    needs_min_inputs_per_tensor: bool = False
    # The task giving a lone input's output without a merge task (passthrough: load, maybe scale).
    lone_input: Callable[[Any, Mapping[str, Any]], Any] | None = None
    # Refuses, at plan time, parameters the math would refuse for this tensor (MergeError).
    check: Callable[[PlannedInputs], None] | None = None
    # The model card lists the base model among the merged models (mergekit's slerp card does).
    card_lists_base: bool = False
    # The dtype written where the recipe sets no out_dtype, when it is not the merge dtype
    # (mergekit's arcee_fusion writes float32); None: the merge dtype.
    default_out_dtype: str | None = None

    def global_parameters(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if not p.per_model)

    def per_model_parameters(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if p.per_model)

    def parameter(self, name: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.name == name), None)

    @property
    def uses_base(self) -> bool:
        return self.base_model != "none"

    def run(self, call: MethodCall) -> torch.Tensor:
        with naming_tensor(call.tensor_name):
            return self.merge(call)

    def chunk_stats(self, index: int, call: MethodCall, state: ChunkState) -> Any:
        with naming_tensor(call.tensor_name):
            return self.chunked.stats(index, call, state)

    def combine_stats(self, index: int, partials: list, state: ChunkState, call: MethodCall) -> ChunkState:
        with naming_tensor(call.tensor_name):
            return self.chunked.combine(index, partials, state, call)

    def merge_chunk(self, call: MethodCall, state: ChunkState) -> torch.Tensor:
        with naming_tensor(call.tensor_name):
            return self.chunked.apply(call, state)


@contextlib.contextmanager
def naming_tensor(name: str) -> Iterator[None]:
    """Prefix math errors with the output tensor's name: the pure functions do not know it."""
    try:
        yield
    except MergeError as error:
        if not name:
            raise
        raise MergeError(f"tensor `{name}`: {error.message}", hint=error.hint) from error


def required_base(call: MethodCall) -> torch.Tensor:
    """The base tensor of a method that merges deltas from it; a MergeError without one."""
    if call.base is None:
        raise MergeError(
            "this method merges deltas from the base model, but no base tensor was given",
            hint="set `base_model` in the recipe",
        )
    return call.base


def base_and_one_other(call: MethodCall, method: str) -> torch.Tensor | None:
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


def requiring_base(form: ChunkedForm) -> ChunkedForm:
    """``form``, refusing a chunk without a base tensor as the whole-tensor adapter does."""

    def apply(call: MethodCall, state: ChunkState) -> torch.Tensor:
        required_base(call)
        return form.apply(call, state)

    return dataclasses.replace(form, apply=apply)
