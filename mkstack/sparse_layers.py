"""Which layers of a stacked MoE model are sparse, written so transformers builds them so.

Config fields pick a layer's MLP by position: Qwen-MoE makes layer i sparse unless it is
in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``; DeepSeek-style models keep
a dense MLP in the first ``first_k_dense_replace`` layers. A stack reorders layers, so each
output layer must keep its source layer's MLP kind (its tensors are that layer's): Qwen-style
configs are rewritten to ``decoder_sparse_step: 1`` with the dense layers listed in
``mlp_only_layers``; a dense prefix gets a new ``first_k_dense_replace``; an order no field
can express is refused before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from mksuite.common.errors import RecipeError

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def rebuild_sparse_layers(
    section: dict,
    layers: Sequence,
    sections: Mapping[Hashable, dict],
) -> frozenset[str]:
    """Rewrite ``section`` (the output's layer settings) so output layer j is sparse exactly
    when its source layer is; ``sections`` holds each source model's layer settings.
    Returns the keys settled here (no warning is due for them)."""
    used = list(dict.fromkeys(s.model for s in layers))
    settled: set[str] = set()
    if any("decoder_sparse_step" in sections[m] for m in used):
        settled |= _step_layers(section, layers, sections, used)
    if any(_is_int(sections[m].get("first_k_dense_replace")) for m in used):
        settled |= _dense_prefix(section, layers, sections, used)
    return frozenset(settled)


def _step_layers(section: dict, layers: Sequence, sections: Mapping[Hashable, dict], used) -> set[str]:
    steps = {m: sections[m].get("decoder_sparse_step", 1) for m in used}
    if not all(_is_int(step) and step > 0 for step in steps.values()):
        return set()
    if all(step == 1 for step in steps.values()):
        return {"decoder_sparse_step"}  # every layer not in mlp_only_layers is sparse: the remapped list says it
    sparse = [_qwen_sparse(sections[s.model], s.layer) for s in layers]
    section["decoder_sparse_step"] = 1
    section["mlp_only_layers"] = [j for j, is_sparse in enumerate(sparse) if not is_sparse]
    return {"decoder_sparse_step", "mlp_only_layers"}


def _qwen_sparse(source: dict, layer: int) -> bool:
    """Qwen-MoE's rule for whether ``layer`` of a model with these settings has experts."""
    dense = source.get("mlp_only_layers") or []
    experts = next((source[k] for k in EXPERT_COUNT_KEYS if _is_int(source.get(k))), 1)
    step = source.get("decoder_sparse_step", 1)
    return layer not in dense and experts > 0 and (layer + 1) % step == 0


def _dense_prefix(section: dict, layers: Sequence, sections: Mapping[Hashable, dict], used) -> set[str]:
    key = "first_k_dense_replace"
    ks = {m: sections[m].get(key) for m in used}
    if not all(_is_int(k) for k in ks.values()):
        return set()
    dense = [s.layer < ks[s.model] for s in layers]
    count = sum(dense)
    if any(dense[count:]):
        late = [j for j in range(count, len(dense)) if dense[j]]
        raise RecipeError(
            f"output layer {late[0]} would be dense (source layer {layers[late[0]].layer} of "
            f"{layers[late[0]].model}) after an MoE layer, but `{key}` can only make the first "
            "layers dense; no config.json describes this layer order",
            hint=f"keep the source layers below each model's `{key}` in front of all others",
        )
    section[key] = count
    return {key}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
