"""The MoE architectures mkmoe writes: which dense model types each is built from, its tensor
names and how its config.json is made from the base's (docs/moe.md).

A pairing is listed only when the MoE class has exactly the dense type's attention, norms and
residual structure, so that a MoE whose experts all equal the base's MLP reproduces the base's
logits (tests/moe/test_mkmoe_outputs.py checks this for every pairing). Pure data and config
arithmetic: nothing here reads a tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class BlockNames:
    """Where one layer's MoE block keeps its tensors, relative to ``model.layers.{l}``.

    ``experts`` holds either three per-expert templates (gate, up, down; ``{e}`` is the expert)
    or two fused names: ``[E, 2I, H]`` gate rows then up rows of each expert, and ``[E, H, I]``.
    """

    block: str
    router: str
    experts: tuple[str, ...]

    @property
    def per_expert(self) -> bool:
        return len(self.experts) == 3


@dataclass(frozen=True)
class MoeShape:
    """The sizes a MoE config needs, known from the mkmoe config and the inputs' headers."""

    layers: int
    experts: int
    experts_per_token: int
    intermediate_size: int
    shared_intermediate_size: int | None  # None: no shared expert


# transformers 5's in-memory layout, which every MoE class here also loads.
FUSED = BlockNames("mlp", "gate.weight", ("experts.gate_up_proj", "experts.down_proj"))
_PER_EXPERT = BlockNames(
    "mlp", "gate.weight", ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight")
)


@dataclass(frozen=True)
class OutputArchitecture:
    """One MoE architecture mkmoe writes."""

    key: str  # the config's `architecture` value
    title: str
    model_type: str
    class_name: str
    inputs: tuple[str, ...]  # model_type values of the dense models it is built from
    experts_key: str  # config key holding the number of experts
    classic: BlockNames  # names save_pretrained writes (the default layout)
    configure: Callable[[dict, MoeShape], None]  # turns the base's config dict into this one's, in place
    fused: BlockNames = FUSED
    definition: str | None = None  # architectures/<definition>.json; None: derived from transformers
    # Qwen2-MoE: at most one shared expert, behind a sigmoid gate (none: a zero-width one).
    gated_shared_expert: bool = False
    # Per-layer tensors of the block that are zero in a fresh MoE: (name under the block, shape from E, H).
    zero_tensors: tuple[tuple[str, Callable[[int, int], tuple[int, ...]]], ...] = ()
    # The dense type rotates interleaved pairs (GLM), the MoE class rotates halves: q/k rows are
    # reordered within each head so that both compute the same attention scores.
    rope_pairs_to_halves: bool = False
    min_experts: int = 1
    dropped_keys: tuple[str, ...] = ("layer_types", "use_sliding_window", "max_window_layers")
    top_k_key: str = "num_experts_per_tok"

    def names(self, layout: str) -> BlockNames:
        return self.classic if layout == "classic" else self.fused


# -- config builders: each sets the MoE fields and clears what the MoE class would misread ------------
def _mixtral(config: dict, shape: MoeShape) -> None:
    # mergekit converts to Mistral first, which clears the sliding window.
    config.update(sliding_window=None, intermediate_size=shape.intermediate_size)


def _qwen_moe(config: dict, shape: MoeShape) -> None:
    config.update(decoder_sparse_step=1, norm_topk_prob=True, moe_intermediate_size=shape.intermediate_size)
    config.pop("mlp_only_layers", None)


def _qwen2_moe(config: dict, shape: MoeShape) -> None:
    _qwen_moe(config, shape)
    config.update(
        sliding_window=None,
        use_sliding_window=False,
        qkv_bias=True,  # zero biases are written for Llama/Mistral bases
        # No shared expert: a zero-width one, whose output is exactly zero.
        shared_expert_intermediate_size=shape.shared_intermediate_size or 0,
        layer_types=["full_attention"] * shape.layers,
    )


def _qwen3_moe(config: dict, shape: MoeShape) -> None:
    _qwen_moe(config, shape)


def _flex_olmo(config: dict, shape: MoeShape) -> None:
    # Routing weights renormalised over the chosen experts, as every other output here.
    config.update(intermediate_size=shape.intermediate_size, norm_topk_prob=True)


def _granitemoe(config: dict, shape: MoeShape) -> None:
    config.update(intermediate_size=shape.intermediate_size)


def _granitemoe_swa(config: dict, shape: MoeShape) -> None:
    config.update(intermediate_size=shape.intermediate_size, shared_intermediate_size=0)


def _ernie4_5_moe(config: dict, shape: MoeShape) -> None:
    config.update(
        moe_intermediate_size=shape.intermediate_size,
        moe_num_shared_experts=0,
        moe_layer_start_index=0,
        moe_layer_end_index=shape.layers - 1,
        moe_layer_interval=1,
    )


def _glm4_moe(config: dict, shape: MoeShape) -> None:
    config.update(
        moe_intermediate_size=shape.intermediate_size,
        n_shared_experts=0,  # a zero-width shared expert: exactly zero
        first_k_dense_replace=0,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        attention_bias=True,  # GLM has q/k/v biases
        use_qk_norm=False,
        num_nextn_predict_layers=0,  # no multi-token-prediction layers are written
    )


def _cohere2_moe(config: dict, shape: MoeShape) -> None:
    config.update(
        intermediate_size=shape.intermediate_size,
        num_shared_experts=0,
        mlp_layer_types=["sparse"] * shape.layers,
        expert_selection_fn="softmax",
        norm_topk_prob=True,
    )


# Types whose decoder layer is Llama's exactly (no biases, RMSNorm before attention and MLP, plain RoPE).
_LLAMA_LIKE = ("llama", "mistral", "internlm3", "iquestcoder")
MIXTRAL = OutputArchitecture(
    "mixtral", "Mixtral", "mixtral", "MixtralForCausalLM", _LLAMA_LIKE, "num_local_experts",
    BlockNames("block_sparse_moe", "gate.weight", ("experts.{e}.w1.weight", "experts.{e}.w3.weight",
                                                   "experts.{e}.w2.weight")),
    _mixtral, definition="mixtral",
)  # fmt: skip
QWEN2_MOE = OutputArchitecture(
    "qwen", "Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", (*_LLAMA_LIKE, "qwen2", "seed_oss"), "num_experts",
    _PER_EXPERT, _qwen2_moe, definition="qwen2_moe", gated_shared_expert=True,
)  # fmt: skip
QWEN3_MOE = OutputArchitecture(
    "qwen3", "Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "num_experts", _PER_EXPERT, _qwen3_moe,
    definition="qwen3_moe",
)  # fmt: skip
FLEX_OLMO = OutputArchitecture(
    "flex_olmo", "FlexOlmo", "flex_olmo", "FlexOlmoForCausalLM", ("olmo2",), "num_experts", _PER_EXPERT, _flex_olmo
)
GRANITEMOE = OutputArchitecture(
    "granitemoe", "GraniteMoe", "granitemoe", "GraniteMoeForCausalLM", ("granite",), "num_local_experts",
    BlockNames("block_sparse_moe", "router.layer.weight", ("input_linear.weight", "output_linear.weight")),
    _granitemoe, fused=BlockNames("block_sparse_moe", "router.weight", FUSED.experts),
)  # fmt: skip
_GRANITE_SWA_BLOCK = BlockNames("block_sparse_moe", "router.weight", FUSED.experts)
GRANITEMOE_SWA = OutputArchitecture(
    "granitemoe_swa", "GraniteMoe-SWA", "granitemoe_swa", "GraniteMoeSWAForCausalLM", ("granite_swa",),
    "num_local_experts", _GRANITE_SWA_BLOCK, _granitemoe_swa, fused=_GRANITE_SWA_BLOCK, dropped_keys=(),
)  # fmt: skip
ERNIE4_5_MOE = OutputArchitecture(
    "ernie4_5_moe", "ERNIE-4.5-MoE", "ernie4_5_moe", "Ernie4_5_MoeForCausalLM", ("ernie4_5",), "moe_num_experts",
    _PER_EXPERT, _ernie4_5_moe, zero_tensors=(("moe_statics.e_score_correction_bias", lambda e, h: (1, e)),),
    top_k_key="moe_k",
)  # fmt: skip
COHERE2_MOE = OutputArchitecture(
    "cohere2_moe", "Cohere2-MoE", "cohere2_moe", "Cohere2MoeForCausalLM", ("cohere2",), "num_experts", _PER_EXPERT,
    _cohere2_moe, dropped_keys=(),
)  # fmt: skip

GLM4_MOE = OutputArchitecture(
    "glm4_moe", "GLM-4-MoE", "glm4_moe", "Glm4MoeForCausalLM", ("glm",), "n_routed_experts", _PER_EXPERT, _glm4_moe,
    zero_tensors=(
        ("gate.e_score_correction_bias", lambda e, h: (e,)),
        ("shared_experts.gate_proj.weight", lambda e, h: (0, h)),
        ("shared_experts.up_proj.weight", lambda e, h: (0, h)),
        ("shared_experts.down_proj.weight", lambda e, h: (h, 0)),
    ),
    rope_pairs_to_halves=True,
    min_experts=2,  # its router sums the top two scores of each expert group
)  # fmt: skip

OUTPUT_ARCHITECTURES = {
    arch.key: arch
    for arch in (
        MIXTRAL, QWEN2_MOE, QWEN3_MOE, FLEX_OLMO, GRANITEMOE, GRANITEMOE_SWA, ERNIE4_5_MOE, COHERE2_MOE, GLM4_MOE
    )
}  # fmt: skip


def supported_bases() -> list[str]:
    """Every dense model type some output accepts, in table order."""
    return list(dict.fromkeys(t for arch in OUTPUT_ARCHITECTURES.values() for t in arch.inputs))
