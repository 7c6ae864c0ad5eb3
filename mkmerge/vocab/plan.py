"""Plan-time vocabulary work: the output tokenizer, its chat template, and aligned embeddings.

Everything here reads tokenizer files, config.json and weight headers only. The output
tokenizer is built once per plan; then, for each vocabulary-indexed output tensor, the
planner asks :meth:`OutputVocabulary.align` for the tasks that rebuild every input model's
matrix to the output vocabulary before the merge (docs/methods.md 4).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mkmerge.recipe_schema import ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding
from mkmerge.vocab.align import AlignVocabulary
from mkmerge.vocab.build import (
    TokenizerCache,
    TokenizerInput,
    add_missing_tokens,
    union_tokenizer,
    vocabulary_below,
)
from mkmerge.vocab.chat_templates import BUILTIN_TEMPLATES, check_jinja, most_common_template
from mkmerge.vocab.rows import Member, RowSources, TokenRule, row_sources
from mkmerge.vocab.strip import strip_tokenizer
from mksuite.common.arch import ArchitectureDefinition, WeightInfo, get_config_value
from mksuite.common.errors import MissingTensorError, ModelFileError, RecipeError, ShapeMismatchError
from mksuite.common.graph import CastTensor, LoadTensor, Task
from mksuite.common.input_models import OpenedModel, open_input_models
from mksuite.common.loading import ModelReference, resolve_model_path

_LISTED = 5  # tokens named in a warning before "and N more"


def vocab_size_key(arch: ArchitectureDefinition) -> str:
    """The config key holding the vocabulary size: next to the layer-count key (``text_config.``)."""
    layers = arch.num_layers_config_key or ""
    return layers.rsplit(".", 1)[0] + ".vocab_size" if "." in layers else "vocab_size"


def config_vocab_size(model: OpenedModel) -> int | None:
    value = get_config_value(model.config, vocab_size_key(model.arch), default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _limit(model: OpenedModel, rows: int) -> int:
    """Ids below this are the model's in a matrix of ``rows`` rows: under its config vocab_size too."""
    configured = config_vocab_size(model)
    return rows if configured is None else min(rows, configured)


def _model_limit(model: OpenedModel) -> int | None:
    """Ids below this are the model's: under its config vocab_size and its input embedding's rows."""
    for weight in model.arch.pre_weights(model.num_layers):
        name = model.locate(weight) if weight.is_embed else None
        if name is not None:
            return _limit(model, model.info(name).shape[0])
    return config_vocab_size(model)


@dataclass(frozen=True)
class EmbeddingInput:
    """One merged model's copy of a vocabulary-indexed tensor, as the planner loads it."""

    model: OpenedModel
    name: str  # stored tensor name
    task: Task  # loads and casts it


@dataclass
class OutputVocabulary:
    """The output tokenizer and what is needed to rebuild embeddings for it."""

    tokenizer: object
    tokens: dict[str, int]  # output vocabulary: token -> id
    size: int  # rows of the output embedding (padding included)
    model_vocabs: dict[ModelReference, dict[str, int]]  # each model's token -> id, unfiltered
    rules: Mapping[str, TokenEmbedding]
    recipe: object
    donor_models: dict[ModelReference, OpenedModel] = field(default_factory=dict)  # `tokens:` sources outside the merge

    def align(
        self,
        weight: WeightInfo,
        inputs: Sequence[EmbeddingInput],
        base: ModelReference | None,
        compute: torch.dtype,
        models: Mapping[ModelReference, OpenedModel],
    ) -> tuple[list[Task], tuple[int, ...]]:
        """Tasks giving each input's matrix rebuilt to the output vocabulary, and the output shape.

        ``base`` is the slice's base model (its row wins the automatic default when several
        models have a token); ``models`` are all open models (``tokens:`` sources included).
        """
        members = list(inputs) + self._donor_inputs(weight, inputs, compute, models)
        _check_widths(weight, members)
        views = [_member(self.model_vocabs[m.model.ref], m) for m in members]
        participants = list(range(len(inputs)))
        base_index = next((i for i in participants if inputs[i].model.ref == base), None)
        rules = {token: self._rule(token, entry, members, views) for token, entry in self.rules.items()}
        sources, unheld = row_sources(self.tokens, self.size, views, participants, base_index, rules)
        if unheld:
            warnings.warn(
                f"{weight.name}: {len(unheld)} output tokens are in no merged model's vocabulary "
                f"({_listing(unheld)}); their rows are zeros",
                stacklevel=3,
            )
        tasks = [m.task for m in members]
        aligned = [
            tasks[i] if rows.is_identity(_rows(members[i])) else _align_task(tasks, i, rows)
            for i, rows in zip(participants, sources)
        ]
        shape = (self.size, *inputs[0].model.info(inputs[0].name).shape[1:])
        return aligned, shape

    def _donor_inputs(
        self, weight: WeightInfo, inputs: Sequence[EmbeddingInput], compute: torch.dtype, models
    ) -> list[EmbeddingInput]:
        """This tensor of every `tokens:` source model that is not among ``inputs``."""
        present = {i.model.ref for i in inputs}
        donors = []
        for ref in dict.fromkeys(_source_model(entry) for entry in self.rules.values()):
            if ref is None or ref in present:
                continue
            model = models[ref]
            name = model.locate(weight)
            if name is None:
                raise MissingTensorError(f"{ref} (a `tokenizer.tokens` source) has no tensor {weight.name}")
            info = model.info(name)
            task: Task = LoadTensor(model.key, name, info.nbytes)
            if info.dtype != compute:
                task = CastTensor(task, compute)
            donors.append(EmbeddingInput(model, name, task))
            present.add(ref)
        return donors

    def _rule(self, token: str, entry: TokenEmbedding, members: list[EmbeddingInput], views: list[Member]) -> TokenRule:
        source = entry.source
        if source is None:
            return TokenRule(None, entry.force)
        if isinstance(source, ZeroEmbedding):
            return TokenRule((), entry.force)
        where = ("tokenizer", "tokens", token, "source")
        ref = source.model if isinstance(source, ModelTokenEmbedding) else source
        index = next(i for i, m in enumerate(members) if m.model.ref == ref)
        member, view = members[index], views[index]
        if isinstance(source, ModelReference):
            row = view.vocab.get(token)
            if row is None:
                raise self._error(f"{ref} has no token {token!r} (within its {view.real_rows} rows)", where)
        elif source.token is not None:
            row = view.vocab.get(source.token)
            if row is None:
                message = f"{ref} has no token {source.token!r} (within its {view.real_rows} rows)"
                raise self._error(message, where + ("token",))
        else:
            row, rows = source.token_id, _rows(member)
            if row >= rows:
                message = f"token_id {row} is out of range: {member.name} of {ref} has {rows} rows"
                raise self._error(message, where + ("token_id",))
        return TokenRule(((index, row),), entry.force)

    def _error(self, message: str, path: tuple) -> RecipeError:
        return RecipeError(message, field=_dotted(path), line=self.recipe.line_of(path))


def _rows(embedding: EmbeddingInput) -> int:
    return embedding.model.info(embedding.name).shape[0]


def _member(vocab: Mapping[str, int], embedding: EmbeddingInput) -> Member:
    limit = _limit(embedding.model, _rows(embedding))
    return Member(vocabulary_below(vocab, limit), limit)


def _source_model(entry: TokenEmbedding) -> ModelReference | None:
    source = entry.source
    if isinstance(source, ModelTokenEmbedding):
        return source.model
    return source if isinstance(source, ModelReference) else None


def _align_task(tasks: list[Task], own: int, rows: RowSources) -> AlignVocabulary:
    """The task for one model, depending only on the tensors its rows read."""
    used = sorted({own} | {member for _, sources in rows.defaults for member, _ in sources})
    position = {member: k for k, member in enumerate(used)}
    defaults = tuple(
        (out_id, tuple((position[member], row) for member, row in sources)) for out_id, sources in rows.defaults
    )
    remapped = RowSources(rows.own, defaults, rows.real_rows, rows.size)
    return AlignVocabulary(tuple(tasks[m] for m in used), position[own], remapped)


def _check_widths(weight: WeightInfo, members: Sequence[EmbeddingInput]) -> None:
    widths = {tuple(m.model.info(m.name).shape[1:]) for m in members}
    if len(widths) > 1:
        listing = "; ".join(f"{m.model.ref}: {list(m.model.info(m.name).shape)}" for m in members)
        raise ShapeMismatchError(
            f"{weight.name} rows have different widths in the inputs ({listing}); vocabularies can be aligned, "
            "hidden sizes cannot",
            hint="merge models of one family and size",
        )


def _listing(tokens: Sequence[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:_LISTED])
    return shown + (f" and {len(tokens) - _LISTED} more" if len(tokens) > _LISTED else "")


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


# --- building the plan's vocabulary --------------------------------------------------------------


def plan_vocabulary(
    recipe,
    models: Mapping[ModelReference, OpenedModel],
    cache: TokenizerCache,
    *,
    allow_crimes: bool,
    cache_dir: str | None,
) -> OutputVocabulary | None:
    """The output vocabulary when the recipe configures a tokenizer (docs/vocabulary.md), else None.

    The base tokenizer is the base model's, else the first referenced model's. Models named
    only as ``tokens:`` sources are opened too (their rows are read) and returned as donors.
    """
    block = recipe.tokenizer
    source = block.source if block is not None else recipe.tokenizer_source
    if source is None:
        return None
    base_ref = recipe.base_model or next(iter(models))
    rules = dict(block.tokens) if block is not None else {}
    tokenizer = _output_tokenizer(source, base_ref, models, cache, cache_dir)
    add_missing_tokens(tokenizer, rules)
    tokens = dict(tokenizer.get_vocab())
    size = max(tokens.values()) + 1
    multiple = block.pad_to_multiple_of if block is not None else None
    if multiple:
        size = -(-size // multiple) * multiple
    donors = _open_donors(rules, models, allow_crimes=allow_crimes, cache_dir=cache_dir)
    base_vocab = cache.get(models[base_ref].path, model=str(base_ref), required=True).get_vocab()
    model_vocabs = {}
    for ref, model in {**models, **donors}.items():
        loaded = cache.get(model.path, model=str(ref))
        model_vocabs[ref] = loaded.get_vocab() if loaded is not None else base_vocab
    return OutputVocabulary(tokenizer, tokens, size, model_vocabs, rules, recipe, donors)


def _output_tokenizer(source, base_ref: ModelReference, models, cache: TokenizerCache, cache_dir: str | None):
    """A new tokenizer object for ``source``: `base`, `union` or a model reference (docs/vocabulary.md)."""
    base = models[base_ref]
    if source == "base":
        return strip_tokenizer(cache.copy(base.path, model=str(base_ref)), _model_limit(base), model=str(base_ref))
    if source == "union":
        inputs = [
            TokenizerInput(str(ref), cache.get(m.path, model=str(ref)), _model_limit(m)) for ref, m in models.items()
        ]
        base_copy = cache.copy(base.path, model=str(base_ref))
        return union_tokenizer(base_copy, _model_limit(base), inputs, base_model=str(base_ref))
    path = models[source].path if source in models else resolve_model_path(source, cache_dir=cache_dir)
    return cache.copy(path, model=str(source))


def _open_donors(rules, models, *, allow_crimes: bool, cache_dir: str | None) -> dict[ModelReference, OpenedModel]:
    refs = [ref for ref in dict.fromkeys(map(_source_model, rules.values())) if ref is not None and ref not in models]
    return open_input_models(refs, allow_crimes=allow_crimes, cache_dir=cache_dir) if refs else {}


def resolve_chat_template(recipe, models: Mapping[ModelReference, OpenedModel], cache: TokenizerCache) -> str | None:
    """The template to set on the output tokenizer: built-in, `auto`'s choice, or the literal text."""
    name = recipe.chat_template
    if name is None:
        return None
    if name == "auto":
        return most_common_template(cache.get(m.path, model=str(ref)) for ref, m in models.items())
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    return check_jinja(name, line=recipe.line_of(("chat_template",)))


def written_vocab_size(embed_rows: Mapping[str, int], donor: OpenedModel, cache: TokenizerCache) -> int | None:
    """Without a built tokenizer: the vocab_size config.json must get, when not the donor's.

    Embeddings of different vocabulary sizes are cut (docs/methods.md) or, with slices, may come
    from models of different sizes; config.json then states the rows actually written, so the
    output loads. Vocabulary tensors that disagree among themselves cannot be reconciled.
    """
    rows = set(embed_rows.values())
    if len(rows) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in embed_rows.items())
        raise ShapeMismatchError(
            f"the output's vocabulary-indexed tensors would have different row counts ({listing})",
            hint="add a `tokenizer:` block (e.g. `tokenizer: {source: base}`) so every model is aligned to one vocabulary",
        )
    configured = config_vocab_size(donor)
    if not rows or configured is None or configured in rows:
        return None
    (written,) = rows
    try:
        vocab = cache.get(donor.path, model=str(donor.ref), required=True).get_vocab()
    except ModelFileError:
        vocab = {}  # no tokenizer to copy, nothing to warn about
    beyond = [token for token, index in vocab.items() if index >= written]
    past = f". Its tokenizer, copied to the output, has {len(beyond)} tokens past that ({_listing(beyond)})"
    warnings.warn(
        f"the output has {written} vocabulary rows but the config donor {donor.ref} says vocab_size {configured}; "
        f"config.json gets vocab_size {written}" + (past if beyond else "") + ". A `tokenizer:` block aligns "
        "vocabularies instead",
        stacklevel=3,
    )
    return written
