"""The mergekit-moe config: typed schema, validation with field paths and lines .

``parse_moe_config`` is the edge where config text is trusted to nothing. Everything that can
be decided from the text alone is checked here, before any model is opened: gate mode,
``experts_per_token`` against the number of experts, prompts a prompt-based gate mode needs,
experts that could never be told apart (identical prompt sets), experts that are all the
same model (refused unless acknowledged), and the output architecture name. Problems that
need the models' configs (depth, hidden size, input architectures) are checked in
:mod:`mkmoe.architectures`, still before any tensor data moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mkmoe.outputs import OUTPUT_ARCHITECTURES
from mksuite.common.errors import RecipeError, did_you_mean
from mksuite.common.recipe import (
    DType,
    FieldProblem,
    LineTable,
    ModelReferenceField,
    UnknownKey,
    document_mapping,
    emit,
    format_path,
    load_document,
    read_recipe_file,
    unknown_key_warning,
    unknown_keys,
    validation_error,
)

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
GATE_MODE_ALIASES = {"hidden_last": "hidden"}
RANDOM_GATE_MODES = frozenset({"random", "uniform_random"})
# mergekit matches `architecture` as a case-insensitive prefix of these names, in this order.
ARCHITECTURE_NAMES = {"mixtral": "Mixtral", "deepseek": "DeepSeek MoE", "qwen": "Qwen MoE", "qwen3": "Qwen3 MoE"}
ARCHITECTURE_ALIASES = {"qwen2": "qwen", "qwen2_moe": "qwen", "qwen3_moe": "qwen3"}
OUTPUT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
ACKNOWLEDGE_FLAG = "--i-understand-this-is-not-useful-without-training"


def _none_to_empty(value: Any) -> Any:
    return () if value is None else value


Prompts = Annotated[tuple[StrictStr, ...], BeforeValidator(_none_to_empty)]


class ExpertConfig(BaseModel):
    """One entry of ``experts`` or ``shared_experts``."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    source_model: ModelReferenceField
    positive_prompts: Prompts = ()
    negative_prompts: Prompts = ()
    noise_scale: float | None = None
    residual_scale: float | None = None

    @field_validator("noise_scale")
    @classmethod
    def _non_negative(cls, value: float | None) -> float | None:
        if value is not None and value < 0:
            raise FieldProblem(f"must be zero or positive (a standard deviation), got {value}")
        return value

    @property
    def prompt_set(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(self.positive_prompts), frozenset(self.negative_prompts)


class MoeConfig(BaseModel):
    """A validated mergekit-moe config. Built by :func:`parse_moe_config`."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    base_model: ModelReferenceField
    experts: tuple[ExpertConfig, ...] = Field(min_length=1)
    shared_experts: Annotated[tuple[ExpertConfig, ...], BeforeValidator(_none_to_empty)] = ()
    gate_mode: StrictStr = "hidden"
    experts_per_token: StrictInt = 2
    dtype: DType | None = None
    architecture: StrictStr | None = None

    _text: str = PrivateAttr(default="")
    _source_name: str | None = PrivateAttr(default=None)
    _lines: LineTable = PrivateAttr(default_factory=LineTable)

    @property
    def text(self) -> str:
        """The config exactly as read (written verbatim into the output's recipe copy)."""
        return self._text

    @property
    def source_name(self) -> str | None:
        return self._source_name

    @property
    def uses_prompts(self) -> bool:
        return self.gate_mode not in RANDOM_GATE_MODES

    def line_of(self, path: tuple) -> int | None:
        """Line of a config path such as ``("experts", 1, "source_model")`` (nearest ancestor if absent)."""
        return self._lines.nearest(path)

    def error(self, message: str, path: tuple, *, hint: str | None = None) -> RecipeError:
        """A RecipeError pointing at ``path`` in this config (used by later validation stages)."""
        return RecipeError(
            message, field=format_path(path) or None, line=self.line_of(path), file=self.source_name, hint=hint
        )

    def describe_expert(self, index: int, *, shared: bool = False) -> str:
        """``experts[1] (models/ft-b, line 7)``: how errors and warnings name an expert."""
        group = "shared_experts" if shared else "experts"
        line = self.line_of((group, index)) if self._lines.lines else None
        where = f", line {line}" if line else ""
        return f"{group}[{index}] ({getattr(self, group)[index].source_model}{where})"

    @field_validator("gate_mode")
    @classmethod
    def _known_gate_mode(cls, value: str) -> str:
        value = GATE_MODE_ALIASES.get(value, value)
        if value not in GATE_MODES:
            hint = did_you_mean(value, GATE_MODES) or "choose one of " + ", ".join(GATE_MODES)
            raise FieldProblem(f"unknown gate mode `{value}`", hint=hint)
        return value

    @field_validator("experts_per_token")
    @classmethod
    def _positive_top_k(cls, value: int) -> int:
        if value < 1:
            raise FieldProblem(f"must be at least 1, got {value}", hint="each token is routed to this many experts")
        return value

    @field_validator("dtype")
    @classmethod
    def _float_dtype(cls, value: Any) -> Any:
        if value is not None and str(value).removeprefix("torch.") not in OUTPUT_DTYPE_NAMES:
            raise FieldProblem(f"{value} is not a floating-point dtype", hint="use float32, float16 or bfloat16")
        return value

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str | None) -> str | None:
        if value is None:
            return None
        key = canonical_architecture(value)
        if key is None:
            raise FieldProblem(
                f"unknown output architecture `{value}`",
                hint="choose mixtral, qwen (Qwen2-MoE), qwen3 (Qwen3-MoE), "
                + ", ".join(key for key in OUTPUT_ARCHITECTURES if key not in ARCHITECTURE_NAMES)
                + ", or leave it out to infer it",
            )
        if key == "deepseek":
            raise FieldProblem(
                "DeepSeek-MoE output is not supported: transformers has no class for it, so the result "
                "would only load with remote code",
                hint="use `architecture: qwen` for a gated shared expert (give it positive_prompts)",
            )
        return key

    @model_validator(mode="after")
    def _experts_agree(self, info: ValidationInfo) -> MoeConfig:
        count = len(self.experts)
        if self.experts_per_token > count:
            raise FieldProblem(
                f"is {self.experts_per_token}, but only {count} expert{'s are' if count > 1 else ' is'} listed",
                subpath=("experts_per_token",),
                hint=f"add experts or set experts_per_token to at most {count}",
            )
        if self.uses_prompts:
            self._check_prompts()
        acknowledged = (info.context or {}).get("allow_identical_experts", False)
        # mergekit-moe 0.1.5 lets `random` gates through (random routing already tells the
        # copies apart), but not `uniform_random`, `hidden` or `cheap_embed`.
        exempt = self.gate_mode == "random"
        if len({expert.source_model for expert in self.experts}) == 1 and not acknowledged and not exempt:
            raise FieldProblem(
                f"every expert is the same model ({self.experts[0].source_model}), so the experts start "
                "identical and only differ after training",
                subpath=("experts",),
                hint=f"pass {ACKNOWLEDGE_FLAG} if that is what you want",
            )
        return self

    def _check_prompts(self) -> None:
        for index, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise FieldProblem(
                    f"experts[{index}] ({expert.source_model}) has no positive_prompts, which "
                    f"gate_mode `{self.gate_mode}` needs to compute its router vector",
                    subpath=("experts", index, "positive_prompts"),
                    hint="add a few prompts typical of what this expert should handle, or use gate_mode: random",
                )
        seen: dict[tuple[frozenset[str], frozenset[str]], int] = {}
        for index, expert in enumerate(self.experts):
            other = seen.setdefault(expert.prompt_set, index)
            if other != index:
                raise FieldProblem(
                    f"experts[{index}] ({expert.source_model}) has the same prompts as experts[{other}] "
                    f"({self.experts[other].source_model}), so the router could never tell them apart",
                    subpath=("experts", index, "positive_prompts"),
                    hint="give each expert prompts of its own speciality",
                )
        with_prompts = [bool(shared.positive_prompts) for shared in self.shared_experts]
        if any(with_prompts) and not all(with_prompts):
            index = with_prompts.index(False)
            raise FieldProblem(
                "either every shared expert has positive_prompts or none has",
                subpath=("shared_experts", index, "positive_prompts"),
            )


def canonical_architecture(name: str) -> str | None:
    """``"Qwen"`` -> ``"qwen"``: mergekit's case-insensitive prefix match, first hit in order.

    The outputs mergekit does not have are matched exactly, by key or model_type (``granitemoe``).
    """
    lowered = name.strip().lower()
    if lowered in ARCHITECTURE_ALIASES:
        return ARCHITECTURE_ALIASES[lowered]
    for key, arch in OUTPUT_ARCHITECTURES.items():
        if lowered in (key, arch.model_type):
            return key
    if not lowered:
        return None
    return next((key for key, full in ARCHITECTURE_NAMES.items() if full.lower().startswith(lowered)), None)


def parse_moe_config(text: str, *, source_name: str | None = None, allow_identical_experts: bool = False) -> MoeConfig:
    """Parse and validate one mergekit-moe config; RecipeError (field, line, file) on any problem."""
    document = load_document(text, source_name=source_name)
    data = document_mapping(
        document,
        what="config",
        kind="mergekit-moe config",
        source_name=source_name,
        hint="it needs at least `base_model` and `experts`",
    )
    emit([unknown_key_warning(key, document.lines) for key in _unknown_keys(data)], stacklevel=2)
    try:
        config = MoeConfig.model_validate(data, context={"allow_identical_experts": allow_identical_experts})
    except ValidationError as exc:
        raise validation_error(exc, document.lines, source_name) from None
    config._text = text
    config._source_name = source_name
    config._lines = document.lines
    return config


def load_moe_config(path: Path | str, *, allow_identical_experts: bool = False) -> MoeConfig:
    """Read and parse a config file."""
    text = read_recipe_file(path, what="config")
    return parse_moe_config(text, source_name=str(path), allow_identical_experts=allow_identical_experts)


def _unknown_keys(data: dict) -> list[UnknownKey]:
    """mergekit ignores unknown keys; we warn, naming the key, its line and the nearest known one."""
    return unknown_keys(data, MoeConfig)


__all__ = [
    "ACKNOWLEDGE_FLAG",
    "ExpertConfig",
    "GATE_MODES",
    "MoeConfig",
    "RANDOM_GATE_MODES",
    "canonical_architecture",
    "load_moe_config",
    "parse_moe_config",
]
