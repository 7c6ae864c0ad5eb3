"""Recipe + input headers -> a plan: one task graph per output tensor.

Planning reads config.json files and weight headers only. Every error knowable from them
(missing parameters, missing tensors, shape conflicts, layer ranges, zero weight sums) is
raised here, before any tensor data is read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mkmerge.methods import REQUIRED, MergeMethod, get_method
from mkmerge.methods.chunked import row_chunks
from mkmerge.methods.sparsifiers import check_sparsifier_parameters
from mkmerge.methods.task_arithmetic import TASK_VECTOR_VARIANTS
from mkmerge.parameters import layer_position, resolve_parameter
from mkmerge.slices import PlannedSlice, SliceSource, output_slices, referenced_models
from mkmerge.tasks import ChunkStats, CombineStats, MergeTensor
from mkmerge.vocab import (
    EmbeddingInput,
    OutputVocabulary,
    TokenizerCache,
    plan_vocabulary,
    resolve_chat_template,
    vocab_size_key,
    written_vocab_size,
)
from mksuite.common.arch import ArchitectureDefinition, WeightInfo
from mksuite.common.build import DEFAULT_CHUNK_BYTES
from mksuite.common.errors import MergeError, MissingTensorError, RecipeError, ShapeMismatchError
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor, ScaleTensor, SliceRows, Task
from mksuite.common.input_models import InputModel, open_input_models
from mksuite.common.loading import ModelReference

# How a method copes with embedding matrices of different sizes (SPEC §2.0).
COMMON_SUBMATRIX = {"linear", "slerp", "nuslerp", "model_stock", "arcee_fusion", "karcher"}
CUT_TO_BASE = {
    "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
}  # fmt: skip
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear", "arcee_fusion"}
# Methods that need their minimum number of inputs for every tensor: an optional tensor that
# fewer inputs have is left out of the output (with a warning) instead of merged (SPEC §2.8).
OMIT_WHEN_FEW_INPUTS = {"model_stock"}


@dataclass
class MergePlan:
    recipe: object
    method: MergeMethod
    models: dict[ModelReference, InputModel]
    donor: InputModel
    arch: ArchitectureDefinition
    num_layers: int
    outputs: list[OutputTensor]
    out_dtype: torch.dtype | None
    config_dtype: torch.dtype | None
    uses_slices: bool
    vocab_size: int | None = None  # set when it must change in config.json (SPEC §3.4, §2.0)
    vocabulary: OutputVocabulary | None = None  # when the recipe builds a tokenizer
    chat_template: str | None = None

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def config_updates(self) -> dict[str, object]:
        updates: dict[str, object] = {}
        if self.uses_slices and self.arch.num_layers_config_key:
            updates[self.arch.num_layers_config_key] = self.num_layers
        if self.vocab_size is not None:
            updates[vocab_size_key(self.arch)] = self.vocab_size
        return updates


@dataclass(frozen=True)
class _Input:
    """One source's contribution to one output tensor."""

    source: SliceSource
    model: InputModel
    name: str  # stored tensor name in that model
    is_base: bool


def plan_merge(
    recipe,
    *,
    allow_crimes: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    lora_merge_dtype: torch.dtype | None = None,
) -> MergePlan:
    """Plan every output tensor of ``recipe``; recipe errors found here name the recipe file.

    Tensors bigger than ``chunk_bytes`` (in the compute dtype) are merged in row blocks when
    the method can do that exactly (see mkmerge/methods/chunked.py); None: never.
    ``lora_merge_dtype``: the dtype `model+lora` inputs are read in (default: as stored).
    """
    try:
        return _plan_merge(
            recipe,
            allow_crimes=allow_crimes,
            seed=seed,
            cache_dir=cache_dir,
            chunk_bytes=chunk_bytes,
            lora_merge_dtype=lora_merge_dtype,
        )
    except RecipeError as error:
        raise error.in_file(getattr(recipe, "source_name", None)) from None


def plan_for_run(
    recipe,
    options,
    *,
    allow_crimes: bool = False,
    cache_dir: str | None = None,
    lora_merge_dtype: torch.dtype | None = None,
) -> MergePlan:
    """:func:`plan_merge` with the seed and chunk size a run with these ``BuildOptions`` uses."""
    return plan_merge(
        recipe,
        allow_crimes=allow_crimes,
        seed=options.seed,
        cache_dir=cache_dir,
        chunk_bytes=options.chunk_bytes,
        lora_merge_dtype=lora_merge_dtype,
    )


def _plan_merge(
    recipe,
    *,
    allow_crimes: bool,
    seed: int,
    cache_dir: str | None,
    chunk_bytes: int | None,
    lora_merge_dtype: torch.dtype | None,
) -> MergePlan:
    method = get_method(recipe.merge_method)
    models = open_input_models(
        referenced_models(recipe), allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=lora_merge_dtype
    )
    slices = output_slices(recipe, models)
    donor = models[recipe.base_model] if recipe.base_model is not None else next(iter(models.values()))
    arch = donor.arch
    tokenizers = TokenizerCache()
    vocabulary = plan_vocabulary(recipe, models, tokenizers, allow_crimes=allow_crimes, cache_dir=cache_dir)
    chat_template = resolve_chat_template(recipe, models, tokenizers)
    if vocabulary is not None:
        models = {**models, **vocabulary.donor_models}
    planner = _TensorPlanner(recipe, method, models, seed, vocabulary, chunk_bytes)
    for output_slice in slices:
        planner.check_slice(output_slice)
    outputs: list[OutputTensor] = []
    total_layers = sum(s.length for s in slices)

    def add(weight_for, output_slice: PlannedSlice, k: int | None, out_weight: WeightInfo, t: float) -> None:
        outputs.extend(planner.plan_tensor(output_slice, out_weight, weight_for, t))

    first, last = slices[0], slices[-1]
    for i, weight in enumerate(arch.pre_weights(total_layers)):
        add(
            lambda src, i=i: models[src.model].arch.pre_weights(models[src.model].num_layers)[i],
            first,
            None,
            weight,
            0.0,
        )
    out_index = 0
    for output_slice in slices:
        for k in range(output_slice.length):
            t = layer_position(k, output_slice.length)
            out_weights = arch.layer_weights(out_index, total_layers)
            for w, weight in enumerate(out_weights):
                add(
                    lambda src, k=k, w=w: models[src.model].arch.layer_weights(
                        src.start + k, models[src.model].num_layers
                    )[w],
                    output_slice,
                    k,
                    weight,
                    t,
                )
            out_index += 1
    for i, weight in enumerate(arch.post_weights(total_layers)):
        add(
            lambda src, i=i: models[src.model].arch.post_weights(models[src.model].num_layers)[i],
            last,
            None,
            weight,
            0.0,
        )

    return MergePlan(
        recipe=recipe,
        method=method,
        models=models,
        donor=donor,
        arch=arch,
        num_layers=total_layers,
        outputs=outputs,
        out_dtype=recipe.out_dtype,
        config_dtype=recipe.out_dtype or recipe.dtype,
        uses_slices=bool(recipe.slices),
        vocab_size=(
            vocabulary.size if vocabulary is not None else written_vocab_size(planner.embed_rows, donor, tokenizers)
        ),
        vocabulary=vocabulary,
        chat_template=chat_template,
    )


class _TensorPlanner:
    def __init__(
        self,
        recipe,
        method: MergeMethod,
        models: Mapping[ModelReference, InputModel],
        seed: int,
        vocabulary: OutputVocabulary | None = None,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    ):
        self.recipe = recipe
        self.method = method
        self.models = models
        self.seed = seed
        self.vocabulary = vocabulary
        self.embed_rows: dict[str, int] = {}  # output name -> rows, for vocabulary-indexed tensors
        self.chunk_bytes = chunk_bytes
        self.uses: dict[tuple[str, str], int] = {}  # (model, tensor) -> index of its latest use

    # -- slice-level checks ------------------------------------------------------------------
    def base_of(self, output_slice: PlannedSlice) -> ModelReference | None:
        return output_slice.base_model or self.recipe.base_model

    def check_slice(self, output_slice: PlannedSlice) -> None:
        method, base = self.method, self.base_of(output_slice)
        where = {"field": output_slice.field, "line": output_slice.line}
        if method.base_model == "required" and base is None:
            raise RecipeError(
                f"merge method `{method.name}` needs a base model",
                field="base_model",
                line=self.recipe.line_of(("merge_method",)),
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
            self.check_other_inputs(output_slice, base)

    def check_other_inputs(self, output_slice: PlannedSlice, base: ModelReference | None) -> None:
        """Methods that fix how many models besides the base they take (nuslerp: two)."""
        method, wanted = self.method, self.method.other_inputs
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

    # -- one output tensor -------------------------------------------------------------------
    def plan_tensor(
        self, output_slice: PlannedSlice, out_weight: WeightInfo, weight_for, t: float
    ) -> list[OutputTensor]:
        """The output tensor (or its row-block parts); empty when it is left out."""
        base_ref = self.base_of(output_slice) if self.method.base_model != "none" else None
        inputs, missing = [], []
        base_taken = False
        for source in output_slice.sources:
            model = self.models[source.model]
            weight = weight_for(source)
            name = model.locate(weight)
            is_base = source.model == base_ref and not base_taken
            base_taken = base_taken or is_base
            if name is None:
                missing.append((source, weight))
                continue
            inputs.append(_Input(source, model, name, is_base))
        if missing and not out_weight.optional:
            source, weight = missing[0]
            raise MissingTensorError(
                f"{source.model} has no tensor {weight.name}"
                + (
                    f" (nor {', '.join(weight.aliases + weight.tied_names)})"
                    if weight.aliases or weight.tied_names
                    else ""
                ),
                hint="is it the same architecture as the other models? check its weight files",
            )
        if not inputs:
            return []
        if out_weight.optional and not any(i.model.has_own(weight_for(i.source)) for i in inputs):
            return []  # only reachable through a tie (e.g. lm_head -> embed_tokens): the output stays tied
        if base_ref is not None and not any(i.is_base for i in inputs):
            if any(s.model == base_ref for s, _ in missing):
                raise MissingTensorError(f"the base model {base_ref} has no tensor {out_weight.name}")
        if self._too_few_for_method(out_weight, inputs):
            return []
        inputs = self._reconcile_shapes(out_weight, inputs)
        return self._build(output_slice, out_weight, inputs, t)

    def _too_few_for_method(self, weight: WeightInfo, inputs: list[_Input]) -> bool:
        """An optional tensor that too few inputs have, for a method that cannot merge fewer.

        Only the base having it is not "too few": the method returns the base then.
        """
        method = self.method
        if method.name not in OMIT_WHEN_FEW_INPUTS or len(inputs) >= method.min_inputs:
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

    def _reconcile_shapes(self, weight: WeightInfo, inputs: list[_Input]) -> list[_Input]:
        shapes = {i.model.info(i.name).shape for i in inputs}
        if len(shapes) == 1:
            return inputs
        name = self.method.name
        only_rows_differ = len({shape[1:] for shape in shapes}) == 1
        aligned = self.vocabulary is not None or name in COMMON_SUBMATRIX or name in CUT_TO_BASE
        if weight.is_embed and only_rows_differ and aligned:
            return inputs  # vocabulary sizes differ: rows are aligned (or cut) in _build
        if name in CUT_TO_BASE:
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
        if weight.is_embed and only_rows_differ:
            raise ShapeMismatchError(
                f"tensor {weight.name} has different vocabulary sizes in the inputs ({listing}), and merge "
                f"method `{name}` cannot cut embeddings to a common size",
                hint="merge models with the same vocabulary size, or use a method that cuts embeddings: "
                + ", ".join(sorted(COMMON_SUBMATRIX | CUT_TO_BASE)),
            )
        raise ShapeMismatchError(
            f"tensor {weight.name} has different shapes in the inputs ({listing})",
            hint="merged models must share an architecture and size (same hidden size, heads, layers)",
        )

    def _params_for(self, inp: _Input, output_slice: PlannedSlice, t: float) -> dict:
        levels = [inp.source.parameters, output_slice.parameters, self.recipe.parameters]
        values = {}
        for spec in self.method.parameters:
            if not spec.per_model:
                continue
            value = resolve_parameter(spec.name, levels, inp.name, t)
            if value is None:
                if spec.default is REQUIRED:
                    if inp.is_base and self.method.base_model != "none":
                        continue
                    role = "base model" if inp.source.model == self.recipe.base_model else "model"
                    raise RecipeError(
                        f"merge method `{self.method.name}` needs parameter `{spec.name}` for {role} "
                        f"{inp.source.model} (tensor {inp.name})",
                        field=f"{inp.source.field}.parameters.{spec.name}",
                        line=inp.source.line,
                        hint=f"set `{spec.name}` for that model, or once under the recipe's `parameters:`",
                    )
                value = spec.default
            values[spec.name] = _convert(spec.kind, value)
        return values

    def _globals(self, output_slice: PlannedSlice, name: str, t: float) -> dict:
        levels = [output_slice.parameters, self.recipe.parameters]
        values = {}
        for spec in self.method.parameters:
            if spec.per_model:
                continue
            value = resolve_parameter(spec.name, levels, name, t)
            if value is None:
                if spec.default is REQUIRED:
                    raise RecipeError(
                        f"merge method `{self.method.name}` needs parameter `{spec.name}` (tensor {name})",
                        field=f"parameters.{spec.name}",
                        line=self.recipe.line_of(("parameters",)) or self.recipe.line_of(("merge_method",)),
                    )
                value = spec.default
            values[spec.name] = _convert(spec.kind, value)
        return values

    def _build(
        self, output_slice: PlannedSlice, weight: WeightInfo, inputs: list[_Input], t: float
    ) -> list[OutputTensor]:
        compute = _dtype_name(weight.force_dtype) or self.recipe.dtype
        if compute is None:
            reference = next((i for i in inputs if i.is_base), inputs[0])
            compute = reference.model.info(reference.name).dtype
        for inp in inputs:  # re-read, not held, when an earlier output tensor read it too
            self.uses[(inp.model.key, inp.name)] = self.uses.get((inp.model.key, inp.name), -1) + 1
        aligned = weight.is_embed and self.vocabulary is not None
        rows = cols = None
        if aligned:
            loaded = [EmbeddingInput(i.model, i.name, self._load(i, compute, None, None)) for i in inputs]
            tasks, shape = self.vocabulary.align(weight, loaded, self.base_of(output_slice), compute, self.models)
        else:
            rows, cols = self._target_shape(weight, inputs)
            shape = tuple(inputs[0].model.info(inputs[0].name).shape)
            if rows is not None:
                shape = (rows,) + ((cols,) if cols is not None else tuple(shape[1:]))
        if weight.is_embed:
            self.embed_rows[weight.name] = shape[0]
        out_dtype = _dtype_name(weight.force_dtype) or self.recipe.out_dtype or compute
        per_model = [self._params_for(inp, output_slice, t) for inp in inputs]
        params = self._globals(output_slice, weight.name, t)
        if self.method.name != "passthrough" or len(inputs) != 1:
            self._check_weights(weight.name, inputs, per_model, params)
            self._check_sparsifier(weight.name, inputs, per_model, shape)
        chunks, passes = self._chunking(shape, compute, inputs, per_model, params, cut=aligned or rows is not None)
        if chunks is None:
            if not aligned:
                tasks = [self._load(inp, compute, rows, cols) for inp in inputs]
            root = self._merge_task(weight.name, inputs, tasks, per_model, params)
            return [OutputTensor(weight.name, out_dtype, shape, root)]
        return self._chunked(weight.name, shape, out_dtype, compute, inputs, per_model, params, chunks, passes)

    def _load(self, inp: _Input, compute: torch.dtype, cut_rows: int | None, cut_cols: int | None, **part) -> Task:
        """Load (a row block of) one input in the compute dtype, cut to the common rows if needed."""
        info = inp.model.info(inp.name)
        nbytes = info.nbytes
        if part.get("rows") is not None:
            start, stop = part["rows"]
            nbytes = nbytes // info.shape[0] * (stop - start)
        occurrence = self.uses.get((inp.model.key, inp.name), 0)
        task: Task = LoadTensor(inp.model.key, inp.name, nbytes, occurrence=occurrence, **part)
        if info.dtype != compute:
            task = CastTensor(task, compute)
        if cut_rows is not None and (info.shape[0] != cut_rows or (cut_cols is not None and info.shape[1] != cut_cols)):
            if info.shape[0] < cut_rows:
                raise ShapeMismatchError(
                    f"{inp.model.ref}: {inp.name} has {info.shape[0]} rows, fewer than the base's {cut_rows}",
                    hint="configure a `tokenizer:` block so vocabularies are aligned instead of cut",
                )
            task = SliceRows(task, cut_rows, cut_cols if len(info.shape) > 1 else None)
        return task

    def _chunking(self, shape, compute, inputs, per_model, params, *, cut: bool):
        """(row chunks, statistics passes) when this tensor is merged in row blocks, else (None, 0)."""
        form = self.method.chunked
        if self.chunk_bytes is None or form is None or cut:
            return None, 0
        if any(tuple(i.model.info(i.name).shape) != tuple(shape) for i in inputs):
            return None, 0
        itemsize = max([compute.itemsize] + [i.model.info(i.name).dtype.itemsize for i in inputs])
        chunks = row_chunks(shape, itemsize, self.chunk_bytes)
        if chunks is None:
            return None, 0
        passes = form.passes(params, per_model, compute)
        if passes is None:
            return None, 0
        others = len(inputs) - (
            0 if self.method.base_model == "none" else 1
        )  # roughly: a chunking choice, not a result
        if passes and form.fused is not None and form.fused(compute, others):
            chunks = row_chunks(shape, itemsize, self.chunk_bytes * form.fused_chunk_factor)
            if chunks is None:
                return None, 0
        return chunks, passes

    def _chunked(
        self, name, shape, out_dtype, compute, inputs, per_model, params, chunks, passes
    ) -> list[OutputTensor]:
        """The row-block parts of one output: statistics passes, then one merge per chunk."""
        row_elements = math.prod(shape[1:])
        method = self.method
        if method.name == "passthrough" and len(inputs) == 1:  # no merge task: load, maybe scale
            outputs = []
            for rows in chunks:
                task = self._merge_task(
                    name, inputs, [self._load(inputs[0], compute, None, None, rows=rows)], per_model, params
                )
                outputs.append(OutputTensor(name, out_dtype, shape, task, rows=rows))
            return outputs
        common = self._merge_fields(name, inputs, per_model, params)
        state: Task | None = None
        for pass_index in range(passes):
            parts = tuple(
                ChunkStats(
                    inputs=tuple(
                        self._load(inp, compute, None, None, rows=rows, pass_index=pass_index) for inp in inputs
                    ),
                    chunk=c,
                    offset=rows[0] * row_elements,
                    full_shape=tuple(shape),
                    pass_index=pass_index,
                    state=state,
                    **common,
                )
                for c, rows in enumerate(chunks)
            )
            state = CombineStats(method=method.name, pass_index=pass_index, parts=parts, state=state)
        outputs = []
        for c, rows in enumerate(chunks):
            task = MergeTensor(
                inputs=tuple(self._load(inp, compute, None, None, rows=rows, pass_index=passes) for inp in inputs),
                chunk=c,
                offset=rows[0] * row_elements,
                full_shape=tuple(shape),
                state=state,
                chunked=True,
                **common,
            )
            outputs.append(OutputTensor(name, out_dtype, shape, task, rows=rows))
        return outputs

    def _target_shape(self, weight: WeightInfo, inputs: list[_Input]) -> tuple[int | None, int | None]:
        shapes = [i.model.info(i.name).shape for i in inputs]
        if len(set(shapes)) == 1 or not weight.is_embed:
            return None, None
        cols = None  # only row counts (vocabulary sizes) may differ here
        if self.method.name in CUT_TO_BASE:
            base = next(i for i in inputs if i.is_base)
            rows = base.model.info(base.name).shape[0]
        else:
            rows = min(s[0] for s in shapes)
        warnings.warn(
            f"{weight.name}: inputs have different vocabulary sizes ({sorted({s[0] for s in shapes})} rows); "
            f"cutting to {rows} rows (tokens past them lose their embedding). "
            "A `tokenizer:` block aligns vocabularies instead",
            stacklevel=2,
        )
        return rows, cols

    def _merge_task(
        self, name: str, inputs: list[_Input], tasks: list[Task], per_model: list[dict], params: dict
    ) -> Task:
        if self.method.name == "passthrough" and len(tasks) == 1:
            scale = per_model[0].get("scale")
            return tasks[0] if scale is None or scale == 1.0 else ScaleTensor(tasks[0], float(scale))
        return MergeTensor(inputs=tuple(tasks), **self._merge_fields(name, inputs, per_model, params))

    def _merge_fields(self, name: str, inputs: list[_Input], per_model: list[dict], params: dict) -> dict:
        random = self.method.name in RANDOM_METHODS
        return dict(
            method=self.method.name,
            base_index=next((k for k, i in enumerate(inputs) if i.is_base), None),
            per_model=tuple(tuple(sorted(p.items())) for p in per_model),
            params=tuple(sorted(params.items())),
            tensor_name=name if random else "",
            seed=self.seed if random else 0,
            label=name,
        )

    def _check_weights(self, name: str, inputs: Sequence[_Input], per_model: list[dict], params: dict) -> None:
        if self.method.name == "linear" and params.get("normalize", True):
            total = sum(p.get("weight", 0.0) for p in per_model)
            if total == 0:
                listing = ", ".join(f"{i.source.model}: {p.get('weight')}" for i, p in zip(inputs, per_model))
                raise MergeError(
                    f"the `weight` values of tensor {name} sum to zero, so normalising divides by zero ({listing})",
                    hint="change the weights, or set `normalize: false`",
                )
        if self.method.name == "multislerp" and params.get("normalize_weights", True):
            others = [(i, p) for i, p in zip(inputs, per_model) if not i.is_base]
            if len(others) > 1 and sum(p["weight"] for _, p in others) == 0:
                listing = ", ".join(f"{i.source.model}: {p['weight']}" for i, p in others)
                raise MergeError(
                    f"the `weight` values of tensor {name} sum to zero, so normalising them divides by zero "
                    f"({listing})",
                    hint="change the weights, or set `normalize_weights: false`",
                )

    def _check_sparsifier(
        self, name: str, inputs: Sequence[_Input], per_model: list[dict], shape: tuple[int, ...]
    ) -> None:
        """Refuse the densities, gammas and epsilons a task-vector sparsifier would refuse at run time."""
        variant = TASK_VECTOR_VARIANTS.get(self.method.name)
        if variant is None:
            return
        numel = math.prod(shape)
        for inp, p in zip(inputs, per_model):
            if inp.is_base:
                continue
            try:
                check_sparsifier_parameters(variant.sparsifier, p["density"], numel, p)
            except MergeError as error:
                raise MergeError(f"{inp.source.model}, tensor {name}: {error.message}", hint=error.hint) from None
            except RecipeError as error:
                where = f"{inp.source.model}, tensor {name}: {error.bare_message}"
                raise RecipeError(where, field=error.field, hint=error.hint) from None


def _convert(kind: type, value):
    if value is None:
        return None
    if kind is bool:
        return bool(value)
    if kind is int:
        return int(value)
    return float(value)


def _dtype_name(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    return getattr(torch, name.removeprefix("torch."))
