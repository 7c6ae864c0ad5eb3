"""The typed, frozen shape of a mergekit-yaml recipe.

Validators here raise :class:`FieldProblem` (a ValueError carrying a sub-path and a hint);
:mod:`mksuite.common.recipe.fields` turns pydantic's errors into one RecipeError with field path and line.
Unknown keys are ignored by the models (``extra="ignore"``) and reported as warnings by the
parser, as mergekit ignores them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mksuite.common.errors import did_you_mean
from mksuite.common.loading import ModelReference
from mksuite.common.recipe import (
    DType,
    FieldProblem,
    LineTable,
    ModelReferenceField,
    ParameterSetting,
    RecipeWarning,
    model_reference,
    setting_from_raw,
)

TOKENIZER_SOURCE_KEYWORDS = ("union", "base")
BUILTIN_CHAT_TEMPLATES = ("auto", "alpaca", "chatml", "llama3", "mistral", "exaone")


def _setting(value: Any) -> ParameterSetting:
    return setting_from_raw(value)  # SettingProblem is a ValueError carrying its own sub-path


def _none_to_empty(value: Any) -> Any:
    return {} if value is None else value


class LayerRange(NamedTuple):
    """Half-open ``[start, end)`` range of 0-based layer indices (unpacks as ``start, end``)."""

    start: int
    end: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start


def _layer_range(value: Any) -> LayerRange:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise FieldProblem(
            f"must be a list of two layer indices [start, end], got {value!r}",
            hint="e.g. `layer_range: [0, 16]` (end is exclusive)",
        )
    for index, bound in enumerate(value):
        if not isinstance(bound, int) or isinstance(bound, bool):
            raise FieldProblem(f"layer indices must be whole numbers, got {bound!r}", subpath=(index,))
    start, end = value
    if start < 0:
        raise FieldProblem(f"start {start} is negative; layers are numbered from 0", subpath=(0,))
    if end <= start:
        raise FieldProblem(
            f"[{start}, {end}) is empty: end must be greater than start",
            hint="the range is half-open: [0, 16] selects layers 0..15",
        )
    return LayerRange(start, end)


def _tokenizer_source(value: Any) -> str | ModelReference:
    if isinstance(value, str) and value in TOKENIZER_SOURCE_KEYWORDS:
        return value
    return model_reference(value)


@dataclass(frozen=True)
class ZeroEmbedding:
    """``{kind: zero}``: the token's default embedding is all zeros."""


@dataclass(frozen=True)
class ModelTokenEmbedding:
    """``{kind: model_token}``: copy the row of ``token`` / ``token_id`` from ``model``."""

    model: ModelReference
    token: str | None = None
    token_id: int | None = None


TokenEmbeddingSource: TypeAlias = ModelReference | ZeroEmbedding | ModelTokenEmbedding
TOKEN_SOURCE_KEYS = {"zero": ("kind",), "model_token": ("kind", "model", "token", "token_id")}


def _token_embedding_source(value: Any) -> TokenEmbeddingSource:
    if not (isinstance(value, Mapping) and "kind" in value):
        return model_reference(value)
    kind = value["kind"]
    if kind == "zero":
        return ZeroEmbedding()
    if kind != "model_token":
        raise FieldProblem(
            f"unknown embedding kind {kind!r}; expected `zero` or `model_token`",
            subpath=("kind",),
            hint=did_you_mean(str(kind), TOKEN_SOURCE_KEYS),
        )
    if "model" not in value:
        raise FieldProblem("a `model_token` source needs a `model`", subpath=("model",))
    try:
        model = model_reference(value["model"])
    except FieldProblem as problem:
        raise FieldProblem(problem.reason, subpath=("model",) + problem.subpath, hint=problem.hint) from None
    token, token_id = value.get("token"), value.get("token_id")
    if (token is None) == (token_id is None):
        raise FieldProblem("a `model_token` source needs exactly one of `token` and `token_id`")
    if token is not None and not isinstance(token, str):
        raise FieldProblem(f"`token` must be a string, got {token!r}", subpath=("token",))
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        raise FieldProblem(f"`token_id` must be a non-negative integer, got {token_id!r}", subpath=("token_id",))
    return ModelTokenEmbedding(model, token, token_id)


Setting = Annotated[ParameterSetting, PlainValidator(_setting)]
Parameters = Annotated[dict[StrictStr, Setting], BeforeValidator(_none_to_empty)]
LayerRangeField = Annotated[LayerRange, PlainValidator(_layer_range)]
TokenizerSource = Annotated[str | ModelReference, PlainValidator(_tokenizer_source)]
TokenSourceField = Annotated[TokenEmbeddingSource, PlainValidator(_token_embedding_source)]


class RecipeModel(BaseModel):
    """Base of every schema node: immutable, unknown keys ignored (the parser warns)."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)


class InputModel(RecipeModel):
    """An entry of ``models:``."""

    model: ModelReferenceField
    parameters: Parameters = Field(default_factory=dict)


class InputSlice(RecipeModel):
    """A source of an output slice: layers ``layer_range`` of ``model``."""

    model: ModelReferenceField
    layer_range: LayerRangeField
    parameters: Parameters = Field(default_factory=dict)


class OutputSlice(RecipeModel):
    """An entry of ``slices:``; every source spans the same number of layers."""

    sources: tuple[InputSlice, ...] = Field(min_length=1)
    base_model: ModelReferenceField | None = None
    parameters: Parameters = Field(default_factory=dict)
    residual_weight: Any = None  # accepted for mergekit compatibility; has no effect

    @model_validator(mode="after")
    def _sources_agree_in_depth(self) -> OutputSlice:
        first = self.sources[0].layer_range
        for index, source in enumerate(self.sources[1:], start=1):
            other = source.layer_range
            if other.num_layers != first.num_layers:
                raise FieldProblem(
                    "every source of a slice must span the same number of layers: "
                    f"sources[0] spans {first.num_layers} ([{first.start}, {first.end})) "
                    f"but sources[{index}] spans {other.num_layers} ([{other.start}, {other.end}))",
                    subpath=("sources", index, "layer_range"),
                    hint="output layer k is built from layer start+k of every source, so the ranges must have equal length",
                )
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range.num_layers


def _exactly_one(owner: BaseModel, names: tuple[str, ...], where: str) -> None:
    present = tuple((name,) for name in names if getattr(owner, name) is not None)
    if len(present) == 1:
        return
    listing = ", ".join(f"`{name}`" for name in names[:-1]) + f" or `{names[-1]}`"
    if not present:
        raise FieldProblem(f"{where} must have exactly one of {listing}; it has none")
    raise FieldProblem(
        f"{where} must have exactly one of {listing}; it has " + " and ".join(f"`{path[0]}`" for path in present),
        alternatives=present,
    )


class ModuleRecipe(RecipeModel):
    """An entry of ``modules:`` for multi-module architectures."""

    models: tuple[InputModel, ...] | None = Field(default=None, min_length=1)
    slices: tuple[OutputSlice, ...] | None = Field(default=None, min_length=1)
    parameters: Parameters = Field(default_factory=dict)

    @model_validator(mode="after")
    def _models_or_slices(self) -> ModuleRecipe:
        _exactly_one(self, ("models", "slices"), "a module")
        return self


class TokenEmbedding(RecipeModel):
    """An entry of ``tokenizer.tokens``: where the token's default embedding comes from.

    ``source`` None means the automatic rule (``force`` alone is allowed).
    """

    source: TokenSourceField | None = None
    force: StrictBool = False


class TokenizerBlock(RecipeModel):
    """The ``tokenizer:`` block."""

    source: TokenizerSource = "union"
    tokens: Annotated[dict[StrictStr, TokenEmbedding], BeforeValidator(_none_to_empty)] = Field(default_factory=dict)
    pad_to_multiple_of: Annotated[StrictInt, Field(ge=1)] | None = None


class MergeRecipe(RecipeModel):
    """A validated recipe; exactly one of ``models``, ``slices`` and ``modules`` is set.

    Built by :func:`mkmerge.recipe.parse_recipe`, which also attaches the original text
    (for the model-card copy), the file name, the warnings it raised, and the line table
    behind :meth:`line_of`.
    """

    merge_method: StrictStr
    models: tuple[InputModel, ...] | None = Field(default=None, min_length=1)
    slices: tuple[OutputSlice, ...] | None = Field(default=None, min_length=1)
    modules: dict[StrictStr, ModuleRecipe] | None = Field(default=None, min_length=1)
    base_model: ModelReferenceField | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: TokenizerSource | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: StrictStr | None = None
    name: StrictStr | None = None

    _text: str = PrivateAttr(default="")
    _source_name: str | None = PrivateAttr(default=None)
    _lines: LineTable = PrivateAttr(default_factory=LineTable)
    _warnings: tuple[RecipeWarning, ...] = PrivateAttr(default=())

    @property
    def text(self) -> str:
        """The recipe exactly as read (written verbatim into the output's recipe copy)."""
        return self._text

    @property
    def source_name(self) -> str | None:
        return self._source_name

    @property
    def warnings(self) -> tuple[RecipeWarning, ...]:
        """Warnings found while parsing (also emitted through :func:`warnings.warn`)."""
        return self._warnings

    def line_of(self, path: tuple) -> int | None:
        """Line of a recipe path such as ``("slices", 0, "sources", 1, "layer_range")``.

        Falls back to the nearest ancestor present in the file (so a defaulted field
        points at its enclosing entry); None only for recipes not parsed from text.
        """
        return self._lines.nearest(path)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        known = (info.context or {}).get("known_methods")
        if known is not None and value not in known:
            hint = did_you_mean(value.lower(), known) or "known methods: " + ", ".join(sorted(known))
            raise FieldProblem(f"unknown merge method `{value}`", hint=hint)
        return value

    @field_validator("chat_template")
    @classmethod
    def _plausible_template(cls, value: str) -> str:
        if value in BUILTIN_CHAT_TEMPLATES or (len(value) >= 20 and "{" in value):
            return value
        raise FieldProblem(
            f"`{value}` is neither a built-in template ({', '.join(BUILTIN_CHAT_TEMPLATES)}) "
            "nor a Jinja template (at least 20 characters containing `{`)",
            hint=did_you_mean(value, BUILTIN_CHAT_TEMPLATES),
        )

    @model_validator(mode="after")
    def _one_form_one_tokenizer(self) -> MergeRecipe:
        _exactly_one(self, ("models", "slices", "modules"), "a recipe")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise FieldProblem(
                "`tokenizer_source` and `tokenizer` cannot both be set",
                alternatives=(("tokenizer_source",), ("tokenizer",)),
                hint="move the source into the block: `tokenizer: {source: ...}`",
            )
        return self
