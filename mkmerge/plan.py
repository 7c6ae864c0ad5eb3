"""Recipe + input headers -> a plan: one task graph per output tensor.

Planning reads config.json files and weight headers only. Every error knowable from them
(missing parameters, missing tensors, shape conflicts, layer ranges, zero weight sums) is
raised here, before any tensor data is read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mkmerge.methods import MergeMethod, PlannedInputs, get_method
from mkmerge.methods.chunked import row_chunks
from mkmerge.plan_inputs import (
    TensorInput,
    base_of,
    check_slice,
    reconcile_shapes,
    target_shape,
    too_few_for_method,
)
from mkmerge.plan_modules import PlanPart, located_in, module_parts, plan_part
from mkmerge.plan_parameters import global_parameters, per_model_parameters
from mkmerge.plan_roles import vision_mergeable, warn_vision_left_out
from mkmerge.slices import PlannedSlice, output_slices, referenced_models
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
from mksuite.common.arch.roles import TEXT_DECODER
from mksuite.common.build import DEFAULT_CHUNK_BYTES
from mksuite.common.errors import MissingTensorError, RecipeError, ShapeMismatchError
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor, SliceRows, Task
from mksuite.common.input_models import OpenedModel, open_input_models
from mksuite.common.loading import ModelReference
from mksuite.common.writing.model_files import output_config


@dataclass
class MergePlan:
    recipe: object
    method: MergeMethod
    models: dict[ModelReference, OpenedModel]
    donor: OpenedModel
    arch: ArchitectureDefinition
    num_layers: int
    outputs: list[OutputTensor]
    out_dtype: torch.dtype | None
    config_dtype: torch.dtype | None
    uses_slices: bool
    vocab_size: int | None = None  # set when it must change in config.json (docs/vocabulary.md, §2.0)
    vocabulary: OutputVocabulary | None = None  # when the recipe builds a tokenizer
    chat_template: str | None = None
    layer_recipe: object = None  # the recipe (or `modules:` entry) whose slices give the text layers
    module_depths: dict[str, int] = field(default_factory=dict)  # config key -> depth of a re-sliced module

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def config_updates(self) -> dict[str, object]:
        updates: dict[str, object] = {}
        if self.uses_slices and self.arch.num_layers_config_key:
            updates[self.arch.num_layers_config_key] = self.num_layers
        if self.vocab_size is not None:
            updates[vocab_size_key(self.arch)] = self.vocab_size
        updates.update(self.module_depths)
        return updates

    def output_config(self) -> dict:
        """The config.json a run writes: the donor's with :meth:`config_updates` and, for a
        sliced recipe, per-layer lists rebuilt for the new depth (mkstack's transform)."""
        transform = None
        if self.uses_slices:
            from mkstack.config_fixups import stack_config_transform

            transform = lambda config: stack_config_transform(self, config)
        return output_config(
            self.donor.config, dtype=self.config_dtype, updates=self.config_updates(), transform=transform
        )


def plan_merge(
    recipe,
    *,
    allow_crimes: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    lora_merge_dtype: torch.dtype | None = None,
    unsafe_truncate_embeddings: bool = False,
    precise: bool = False,
) -> MergePlan:
    """Plan every output tensor of ``recipe``; recipe errors found here name the recipe file.

    Tensors bigger than ``chunk_bytes`` (in the compute dtype) are merged in row blocks when
    the method can do that exactly (see mkmerge/methods/chunked.py); None: never.
    ``lora_merge_dtype``: the dtype `model+lora` inputs are read in (default: as stored).
    ``unsafe_truncate_embeddings``: without a tokenizer configuration, embeddings of different
    vocabulary sizes are cut to the smallest instead of refused (mergekit 0.1.5's flag).
    """
    try:
        return _plan_merge(
            recipe,
            allow_crimes=allow_crimes,
            seed=seed,
            cache_dir=cache_dir,
            chunk_bytes=chunk_bytes,
            lora_merge_dtype=lora_merge_dtype,
            unsafe_truncate_embeddings=unsafe_truncate_embeddings,
            precise=precise,
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
        unsafe_truncate_embeddings=options.unsafe_truncate_embeddings,
        precise=options.precise,
    )


def _plan_merge(
    recipe,
    *,
    allow_crimes: bool,
    seed: int,
    cache_dir: str | None,
    chunk_bytes: int | None,
    lora_merge_dtype: torch.dtype | None,
    unsafe_truncate_embeddings: bool = False,
    precise: bool = False,
) -> MergePlan:
    method = get_method(recipe.merge_method)
    models = open_input_models(
        referenced_models(recipe), allow_crimes=allow_crimes, cache_dir=cache_dir, lora_merge_dtype=lora_merge_dtype
    )
    slices = output_slices(recipe, models) if not recipe.modules else []
    donor = models[recipe.base_model] if recipe.base_model is not None else next(iter(models.values()))
    warn_vision_left_out(donor, models)
    tokenizers = TokenizerCache()
    vocabulary = plan_vocabulary(recipe, models, tokenizers, allow_crimes=allow_crimes, cache_dir=cache_dir)
    chat_template = resolve_chat_template(recipe, models, tokenizers)
    if vocabulary is not None:
        models = {**models, **vocabulary.donor_models}
    if recipe.modules:
        parts = module_parts(recipe, models, donor)
    else:
        parts = [PlanPart(None, recipe, models, donor.arch, slices)]
    planner = _TensorPlanner(recipe, method, models, seed, vocabulary, chunk_bytes)
    planner.truncate_embeddings = unsafe_truncate_embeddings
    planner.precise = precise
    for part in parts:
        with located_in(part):
            for output_slice in part.slices:
                check_slice(part.recipe, method, output_slice)
    outputs: list[OutputTensor] = []
    depths = {}
    for part in parts:
        planner.recipe, planner.models = part.recipe, part.models
        with located_in(part):
            depths[part.name] = plan_part(planner, part, outputs)
    text = next(p for p in parts if p.name in (None, TEXT_DECODER))
    side_depths = {
        p.arch.num_layers_config_key: depths[p.name]
        for p in parts
        if p is not text and p.recipe.slices and p.arch.num_layers_config_key
    }
    plan = MergePlan(
        recipe=recipe,
        method=method,
        models=models,
        donor=donor,
        arch=donor.arch,
        num_layers=depths[text.name],
        outputs=outputs,
        out_dtype=recipe.out_dtype,
        config_dtype=recipe.out_dtype or recipe.dtype,
        uses_slices=bool(text.recipe.slices),
        vocab_size=(
            vocabulary.size if vocabulary is not None else written_vocab_size(planner.embed_rows, donor, tokenizers)
        ),
        vocabulary=vocabulary,
        chat_template=chat_template,
        layer_recipe=text.recipe,
        module_depths=side_depths,
    )
    if plan.uses_slices:
        from mkstack.config_fixups import plan_config_warnings

        plan_config_warnings(plan)  # a layer order no config.json can express is refused now, before any read
    return plan


class _TensorPlanner:
    def __init__(
        self,
        recipe,
        method: MergeMethod,
        models: Mapping[ModelReference, OpenedModel],
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
        self.truncate_embeddings = False  # --unsafe-truncate-embeddings: cut vocabularies to the smallest
        # --precise: the methods' more accurate arithmetic where mergekit rounds to the merge dtype.
        self.precise = False
        self.vision_donors: set[str] = set()  # models vision tensors were copied from (warned once each)

    # -- one output tensor -------------------------------------------------------------------
    def plan_tensor(
        self, output_slice: PlannedSlice, out_weight: WeightInfo, weight_for, t: float
    ) -> list[OutputTensor]:
        """The output tensor (or its row-block parts); empty when it is left out."""
        base_ref = base_of(self.recipe, output_slice) if self.method.uses_base else None
        inputs, missing = [], []
        base_taken = False
        partial = False  # some sources are text-only twins without this (vision) tensor
        for source in output_slice.sources:
            model = self.models[source.model]
            weight = weight_for(source)
            if weight is None:
                partial = True
                continue
            name = model.locate(weight)
            is_base = source.model == base_ref and not base_taken
            base_taken = base_taken or is_base
            if name is None:
                missing.append((source, weight))
                continue
            inputs.append(TensorInput(source, model, name, is_base))
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
        if partial and (copied := self._vision_copy(output_slice, out_weight, inputs, base_ref, t)) is not None:
            return copied
        if base_ref is not None and not any(i.is_base for i in inputs):
            if any(s.model == base_ref for s, _ in missing):
                raise MissingTensorError(f"the base model {base_ref} has no tensor {out_weight.name}")
        if too_few_for_method(self.method, out_weight, inputs):
            return []
        inputs = reconcile_shapes(
            self.method, self.vocabulary, out_weight, inputs, truncate_embeddings=self.truncate_embeddings
        )
        return self._build(output_slice, out_weight, inputs, t)

    def _vision_copy(
        self,
        output_slice: PlannedSlice,
        weight: WeightInfo,
        inputs: list[TensorInput],
        base_ref: ModelReference | None,
        t: float,
    ) -> list[OutputTensor] | None:
        """A vision-tower or projector tensor only some inputs (the VLMs) have, copied from one
        of them when the method cannot merge just those: a lone VLM, the base among the
        text-only inputs, too few for the method, or weights that sum to zero. None: merge them."""
        weights = [per_model_parameters(self.recipe, self.method, i, output_slice, t).get("weight") for i in inputs]
        if vision_mergeable(self.method, [i.is_base for i in inputs], base_ref is not None, weights):
            return None
        donor = next((i for i in inputs if i.is_base), inputs[0])
        if donor.model.key not in self.vision_donors:
            self.vision_donors.add(donor.model.key)
            warnings.warn(
                f"{donor.model.ref}: vision-tower and projector tensors that the method cannot merge from "
                f"the vision-language inputs alone are copied from this model (first: {weight.name})",
                stacklevel=2,
            )
        compute = _dtype_name(weight.force_dtype) or self.recipe.dtype or donor.model.info(donor.name).dtype
        out_dtype = _dtype_name(weight.force_dtype) or self.recipe.out_dtype or compute
        self.uses[(donor.model.key, donor.name)] = self.uses.get((donor.model.key, donor.name), -1) + 1
        shape = tuple(donor.model.info(donor.name).shape)
        return [OutputTensor(weight.name, out_dtype, shape, self._load(donor, compute, None, None))]

    def _build(
        self, output_slice: PlannedSlice, weight: WeightInfo, inputs: list[TensorInput], t: float
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
            tasks, shape = self.vocabulary.align(
                weight, loaded, base_of(self.recipe, output_slice), compute, self.models
            )
        else:
            rows, cols = target_shape(self.method, weight, inputs)
            shape = tuple(inputs[0].model.info(inputs[0].name).shape)
            if rows is not None:
                shape = (rows,) + ((cols,) if cols is not None else tuple(shape[1:]))
        if weight.is_embed:
            self.embed_rows[weight.name] = shape[0]
        # A method may write another dtype than it computes in where no out_dtype is set
        # (mergekit's arcee_fusion writes float32); --precise keeps the recipe's dtype.
        method_dtype = None if self.precise else _dtype_name(self.method.default_out_dtype)
        out_dtype = _dtype_name(weight.force_dtype) or self.recipe.out_dtype or method_dtype or compute
        per_model = [per_model_parameters(self.recipe, self.method, inp, output_slice, t) for inp in inputs]
        params = global_parameters(self.recipe, self.method, output_slice, weight.name, t)
        if self.precise:
            params["precise"] = True  # read by the methods that round as mergekit does by default
        if self.method.check is not None:
            self.method.check(
                PlannedInputs(
                    tensor_name=weight.name,
                    models=tuple(str(i.source.model) for i in inputs),
                    is_base=tuple(i.is_base for i in inputs),
                    per_model=tuple(per_model),
                    params=params,
                    shape=tuple(shape),
                )
            )
        chunks, passes = self._chunking(shape, compute, inputs, per_model, params, cut=aligned or rows is not None)
        if chunks is None:
            if not aligned:
                tasks = [self._load(inp, compute, rows, cols) for inp in inputs]
            root = self._merge_task(weight.name, inputs, tasks, per_model, params)
            return [OutputTensor(weight.name, out_dtype, shape, root)]
        return self._chunked(weight.name, shape, out_dtype, compute, inputs, per_model, params, chunks, passes)

    def _load(self, inp: TensorInput, compute: torch.dtype, cut_rows: int | None, cut_cols: int | None, **part) -> Task:
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
        others = len(inputs) - self.method.uses_base  # roughly: a chunking choice, not a result
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
        if method.lone_input is not None and len(inputs) == 1:  # no merge task
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

    def _merge_task(
        self, name: str, inputs: list[TensorInput], tasks: list[Task], per_model: list[dict], params: dict
    ) -> Task:
        if self.method.lone_input is not None and len(tasks) == 1:
            return self.method.lone_input(tasks[0], per_model[0])
        return MergeTensor(inputs=tuple(tasks), **self._merge_fields(name, inputs, per_model, params))

    def _merge_fields(self, name: str, inputs: list[TensorInput], per_model: list[dict], params: dict) -> dict:
        random = self.method.random
        return dict(
            method=self.method.name,
            base_index=next((k for k, i in enumerate(inputs) if i.is_base), None),
            per_model=tuple(tuple(sorted(p.items())) for p in per_model),
            params=tuple(sorted(params.items())),
            tensor_name=name if random else "",
            seed=self.seed if random else 0,
            label=name,
        )


def _dtype_name(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    return getattr(torch, name.removeprefix("torch."))
