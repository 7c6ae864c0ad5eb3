"""Which inputs an output tensor is merged from, and whether the method can take them.

The planner's slice-level checks (base model, input counts) and its tensor-level ones
(inputs lacking an optional tensor, shapes and vocabulary sizes that differ), each read
from the method's declaration. Headers only: no tensor data is read here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from mkmerge.methods import MergeMethod
from mkmerge.slices import PlannedSlice, SliceSource
from mkmerge.vocab import OutputVocabulary
from mksuite.common.arch import WeightInfo
from mksuite.common.errors import RecipeError, ShapeMismatchError
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference


@dataclass(frozen=True)
class TensorInput:
    """One source's contribution to one output tensor."""

    source: SliceSource
    model: OpenedModel
    name: str  # stored tensor name in that model
    is_base: bool


def base_of(recipe, output_slice: PlannedSlice) -> ModelReference | None:
    """The base model of a slice: its own, else the recipe's."""
    return output_slice.base_model or recipe.base_model


def check_slice(recipe, method: MergeMethod, output_slice: PlannedSlice) -> None:
    """Refuse a slice whose base and input count the method cannot take."""
    base = base_of(recipe, output_slice)
    where = {"field": output_slice.field, "line": output_slice.line}
    if method.base_model == "required" and base is None:
        raise RecipeError(
            f"merge method `{method.name}` needs a base model",
            field="base_model",
            line=recipe.line_of(("merge_method",)),
            hint="add `base_model: <the model the others were fine-tuned from>`",
        )
    if method.base_model != "none" and base is not None:
        if base not in {s.model for s in output_slice.sources}:
            raise RecipeError(
                f"base model {base} is not one of this slice's sources",
                hint="with `slices:` list the base model as a source of every slice",
                **where,
            )
    count = len(output_slice.sources)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        expected = (
            f"exactly {method.min_inputs}"
            if method.min_inputs == method.max_inputs
            else f"at least {method.min_inputs}"
            + (f" and at most {method.max_inputs}" if method.max_inputs is not None else "")
        )
        counted = " (the base model counts as one)" if method.base_model != "none" and base else ""
        raise RecipeError(
            f"merge method `{method.name}` takes {expected} input models{counted}, "
            f"but {count} are given: {', '.join(str(s.model) for s in output_slice.sources)}",
            **where,
        )
    if method.other_inputs is not None:
        _check_other_inputs(method, output_slice, base)


def _check_other_inputs(method: MergeMethod, output_slice: PlannedSlice, base: ModelReference | None) -> None:
    """Methods that fix how many models besides the base they take (nuslerp: two)."""
    wanted = method.other_inputs
    others = [s.model for s in output_slice.sources if s.model != base]
    if len(others) == wanted:
        return
    base_is_one = base is not None and len(others) == wanted - 1
    raise RecipeError(
        f"merge method `{method.name}` takes exactly {wanted} models besides the base model, "
        f"but {len(others)} are given ({', '.join(map(str, others)) or 'none'})"
        + (f"; the base model {base} cannot be one of the {wanted}" if base_is_one else ""),
        field=output_slice.field,
        line=output_slice.line,
        hint=(
            f"make the base model a third model, or leave out `base_model` to {method.name} the two directly"
            if base_is_one
            else f"list exactly {wanted} models (and optionally a different `base_model`)"
        ),
    )


def too_few_for_method(method: MergeMethod, weight: WeightInfo, inputs: list[TensorInput]) -> bool:
    """An optional tensor that too few inputs have, for a method that cannot merge fewer.

    Only the base having it is not "too few": the method returns the base then.
    """
    if not method.needs_min_inputs_per_tensor or len(inputs) >= method.min_inputs:
        return False
    if len(inputs) == 1 and inputs[0].is_base:
        return False
    warnings.warn(
        f"{weight.name}: only {len(inputs)} input model(s) have this optional tensor "
        f"({', '.join(str(i.source.model) for i in inputs)}) and `{method.name}` needs "
        f"{method.min_inputs}, so the output leaves it out",
        stacklevel=3,
    )
    return True


def reconcile_shapes(
    method: MergeMethod,
    vocabulary: OutputVocabulary | None,
    weight: WeightInfo,
    inputs: list[TensorInput],
    *,
    truncate_embeddings: bool = False,
) -> list[TensorInput]:
    """The inputs whose shapes the method can merge; a ShapeMismatchError when they cannot be.

    Vocabulary-indexed tensors whose row counts differ are aligned by the recipe's tokenizer
    settings; without them they are refused, as mergekit 0.1.5 does, unless
    ``truncate_embeddings`` (``--unsafe-truncate-embeddings``) cuts them to the fewest rows.
    """
    shapes = {i.model.info(i.name).shape for i in inputs}
    if len(shapes) == 1:
        return inputs
    only_rows_differ = len({shape[1:] for shape in shapes}) == 1
    if weight.is_embed and only_rows_differ:
        if vocabulary is None and not truncate_embeddings:
            raise vocabulary_sizes_differ(weight, inputs)
        return inputs  # vocabulary sizes differ: rows are aligned (or cut) when the tasks are built
    if method.embeddings == "base rows":
        base = next((i for i in inputs if i.is_base), None)
        if base is not None:
            base_shape = base.model.info(base.name).shape
            kept = []
            for i in inputs:
                if i.model.info(i.name).shape == base_shape:
                    kept.append(i)
                else:
                    warnings.warn(
                        f"{i.model.ref}: {i.name} has shape {list(i.model.info(i.name).shape)}, "
                        f"the base has {list(base_shape)}; leaving this model out of that tensor",
                        stacklevel=2,
                    )
            return kept
    listing = "; ".join(f"{i.model.ref}: {list(i.model.info(i.name).shape)}" for i in inputs)
    raise ShapeMismatchError(
        f"tensor {weight.name} has different shapes in the inputs ({listing})",
        hint="merged models must share an architecture and size (same hidden size, heads, layers)",
    )


def vocabulary_sizes_differ(weight: WeightInfo, inputs: list[TensorInput]) -> ShapeMismatchError:
    """Embeddings of different vocabulary sizes and no tokenizer settings (mergekit 0.1.5 refuses them)."""
    sizes: dict[int, list[str]] = {}
    for i in inputs:
        shape = i.model.info(i.name).shape
        sizes.setdefault(shape[0], []).append(f"{i.model.ref}: {list(shape)}")
    listing = "; ".join(entry for rows in sorted(sizes) for entry in sizes[rows])
    return ShapeMismatchError(
        f"the input models have different vocabulary sizes ({', '.join(map(str, sorted(sizes)))} rows) and the "
        f"recipe has no tokenizer settings: tensor {weight.name} is {listing}",
        hint="add `tokenizer_source: base` (or a `tokenizer:` block) to align the vocabularies, or pass "
        f"--unsafe-truncate-embeddings to cut every embedding to the smallest vocabulary ({min(sizes)} rows; "
        "only right when the models share token ids up to there)",
    )


def target_shape(method: MergeMethod, weight: WeightInfo, inputs: list[TensorInput]) -> tuple[int | None, int | None]:
    """(rows, cols) an embedding is cut to when the inputs' vocabulary sizes differ, else (None, None)."""
    shapes = [i.model.info(i.name).shape for i in inputs]
    if len(set(shapes)) == 1 or not weight.is_embed:
        return None, None
    # --unsafe-truncate-embeddings: every method, the task-vector family included, keeps the
    # smallest vocabulary's rows (mergekit 0.1.5 does, whichever model is the base).
    rows = min(s[0] for s in shapes)
    warnings.warn(
        f"{weight.name}: inputs have different vocabulary sizes ({sorted({s[0] for s in shapes})} rows); "
        f"UNSAFE: cutting to {rows} rows (tokens past them lose their embedding). "
        "A `tokenizer:` block aligns vocabularies instead",
        stacklevel=2,
    )
    return rows, None
