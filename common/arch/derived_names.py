"""A meta-device model -> the definition of the tensors its checkpoints hold.

Names are those ``save_pretrained`` writes: transformers' own reverse conversion is applied
to the meta parameters, and parameter identity links each written name back to its module
(fused expert tensors come back split per expert and are matched by layer prefix instead).
"""

from __future__ import annotations

import re
from collections import defaultdict

from .definition import ArchitectureDefinition, WeightInfo
from .derived import EXPERT_COUNT_KEYS, LAYER_COUNT_KEYS, ModelClass
from .templates import EXPERT, LAYER

_ASIDE_STACKS = ("vision", "visual", "audio", "image", "speech", "encoder")


def describe_saved_tensors(model, config: dict, chosen: ModelClass) -> ArchitectureDefinition | None:
    """The definition of ``model``'s saved tensors; None when no text layer stack can be found."""
    internal = _state_tensors(model)
    saved = _saved_names(model, internal)
    if saved is None:
        return None
    count_key, depth = _layer_count(config)
    if count_key is None:
        return None
    stack = _text_stack(model, depth)
    if stack is None:
        return None
    origin = _origins(internal, saved)
    saved_prefix = _saved_stack_prefix(stack, origin)
    if saved_prefix is None:
        return None
    order = {name: i for i, name in enumerate(internal)}
    layer_re = re.compile(re.escape(saved_prefix) + r"\.(\d+)\.(.+)")
    buffers = _buffer_names(model)
    vocab = _text_value(config, "vocab_size")
    embeds = {n for n in (origin_to_saved(origin, m) for m in _embedding_params(model, vocab)) if n}
    ties = _ties(model, origin)
    hub_forms = _nested_prefix_names(model, origin)

    per_layer: dict[str, set[int]] = defaultdict(set)
    layer_aliases: dict[str, str] = {}  # rest of a layer name -> its in-memory template, where they differ
    experts: set[int] = set()
    pre: list[str] = []
    post: list[str] = []
    position: dict[str, int] = {}
    first_layer_at = min((order[i] for i in internal if i.startswith(stack + ".")), default=0)
    for name in saved:
        match = layer_re.fullmatch(name)
        if match and int(match.group(1)) < depth:
            rest = match.group(2)
            expert = _EXPERT.search(rest)
            if expert:
                experts.add(int(expert.group(3)))
            per_layer[rest].add(int(match.group(1)))
            own = origin_to_saved_inverse(origin, name)
            marker = f"{stack}.{match.group(1)}."
            # same parameter, other module path (not a fused MoE tensor, which has its own
            # conversion in common/arch/stored_layout.py)
            if not expert and own and own != name and own.startswith(marker) and _same_leaf(own, name):
                layer_aliases.setdefault(rest, f"{stack}.${{{LAYER}}}.{own[len(marker) :]}")
            continue
        own = origin_to_saved_inverse(origin, name)
        at = order[own] if own is not None else -1
        position[name] = at
        (pre if at < first_layer_at else post).append(name)

    expert_key = _expert_key(config, experts)
    templates: dict[str, set[int]] = defaultdict(set)
    for rest, layers in per_layer.items():
        if expert_key is not None:
            rest = _EXPERT.sub(lambda m: f"{m.group(1)}{m.group(2)}${{{EXPERT}}}.", rest, count=1)
        templates[rest] |= layers
    layer_weights = tuple(
        WeightInfo(
            name=f"{saved_prefix}.${{{LAYER}}}.{rest}",
            optional=len(layers) < depth or _is_buffer(rest, buffers),
            aliases=(layer_aliases[rest],) if rest in layer_aliases else (),
        )
        for rest, layers in templates.items()
    )

    def fixed(name: str) -> WeightInfo:
        tied = ties.get(name, ())
        own = origin_to_saved_inverse(origin, name)
        return WeightInfo(
            name=name,
            is_embed=name in embeds,
            optional=bool(tied) or name in buffers or any(o in buffers for o in origin.get(name, ())),
            # checkpoints saved in the in-memory layout (a VLM's `model.language_model.*`) name it so
            aliases=tuple(a for a in (own, hub_forms.get(name)) if a and a != name),
            tied_names=tied,
        )

    return ArchitectureDefinition(
        name=chosen.name,
        model_type=str(config.get("model_type")),
        architectures=(chosen.name,),
        num_layers_config_key=count_key,
        override_num_layers=None,
        pre_weight_templates=tuple(fixed(n) for n in pre),
        layer_weight_templates=layer_weights,
        post_weight_templates=tuple(fixed(n) for n in post),
        num_experts_config_keys=(expert_key,) if expert_key else (),
        source=f"derived from transformers' {chosen.name}",
        module_order=tuple(sorted(position, key=position.__getitem__)),
    )


_EXPERT = re.compile(r"(^|\.)(experts\.)(\d+)\.")


def _same_leaf(first: str, second: str) -> bool:
    return first.rsplit(".", 1)[-1] == second.rsplit(".", 1)[-1]


def _nested_prefix_names(model, origin: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Saved name -> the name checkpoints give it when they keep a nested vision model's own
    ``base_model_prefix`` (Gemma 3's published ``vision_tower.vision_model.*``, which transformers
    loads into ``vision_tower.*``). Vision parts only: the language model has its own forms."""
    from transformers import PreTrainedModel

    from .roles import TEXT_DECODER, module_of

    forms: dict[str, str] = {}
    for module_name, module in model.named_modules():
        prefix = getattr(module, "base_model_prefix", "") if isinstance(module, PreTrainedModel) else ""
        if not module_name or not prefix or prefix in module._modules:
            continue
        inner = module_name + "."
        for saved in origin:
            own = origin_to_saved_inverse(origin, saved)
            if own is None or not own.startswith(inner) or module_of(saved) == TEXT_DECODER:
                continue
            rest = own[len(inner) :]
            if saved.endswith("." + rest):
                forms.setdefault(saved, f"{saved[: -len(rest)]}{prefix}.{rest}")
    return forms


def _state_tensors(model) -> dict:
    """Parameters (tied ones under every name) and persistent buffers, in module order."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[f"{module_name}.{name}" if module_name else name] = buffer
    ignored = getattr(model, "_keys_to_ignore_on_save", None) or ()
    return {n: t for n, t in tensors.items() if not any(re.search(p, n) for p in ignored)}


def _buffer_names(model) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def _is_buffer(rest: str, buffers: set[str]) -> bool:
    return any(b.endswith("." + rest) for b in buffers)


def _saved_names(model, internal: dict) -> dict | None:
    from transformers.core_model_loading import revert_weight_conversion

    try:
        return revert_weight_conversion(model, dict(internal))
    except Exception:  # a conversion that needs real data: describe the model as it names its modules
        return dict(internal)


def _origins(internal: dict, saved: dict) -> dict[str, tuple[str, ...]]:
    """Saved name -> the internal names whose tensor it is (several when tied)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, tensor in internal.items():
        by_id[id(tensor)].append(name)
    return {name: tuple(by_id.get(id(tensor), ())) for name, tensor in saved.items()}


def origin_to_saved(origin: dict[str, tuple[str, ...]], internal_name: str) -> str | None:
    """The saved name of one internal parameter; tied groups resolve by matching names."""
    candidates = [s for s, names in origin.items() if internal_name in names]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    tail = internal_name.split(".")[-2:]
    for saved in candidates:
        if saved == internal_name or saved.split(".")[-2:] == tail:
            return saved
    return candidates[0]


def origin_to_saved_inverse(origin: dict[str, tuple[str, ...]], saved: str) -> str | None:
    """The internal name a saved name was written from; for tied groups the one named alike."""
    names = origin.get(saved, ())
    if saved in names or len(names) <= 1:
        return saved if saved in names else (names[0] if names else None)
    tail = saved.split(".")[-2:]
    return next((n for n in names if n.split(".")[-2:] == tail), names[0])


def _layer_count(config: dict) -> tuple[str | None, int]:
    text = config.get("text_config")
    if isinstance(text, dict):
        for key in LAYER_COUNT_KEYS:
            if _is_count(text.get(key)):
                return f"text_config.{key}", text[key]
    for key in LAYER_COUNT_KEYS:
        if _is_count(config.get(key)):
            return key, config[key]
    return None, 0


def _text_value(config: dict, key: str):
    text = config.get("text_config")
    if isinstance(text, dict) and key in text:
        return text[key]
    return config.get(key)


def _text_stack(model, depth: int) -> str | None:
    """The module path of the text decoder's layer list (``model.layers``, ``transformer.h``)."""
    import torch

    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth and depth > 0
        and any(True for _ in module.parameters())
    ]  # fmt: skip
    if not lists:
        return None
    decoder = _decoder_path(model)
    if decoder is not None:
        inside = [n for n in lists if n == decoder or n.startswith(decoder + ".") or not decoder]
        if inside:
            return min(inside, key=len)
    plain = [n for n in lists if not any(word in n for word in _ASIDE_STACKS)]
    return min(plain or lists, key=len)


def _decoder_path(model) -> str | None:
    try:
        decoder = model.get_decoder()
    except Exception:
        return None
    if decoder is None or decoder is model:
        return "" if decoder is model else None
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return None


def _saved_stack_prefix(stack: str, origin: dict[str, tuple[str, ...]]) -> str | None:
    """Where the stack's layer 0 is written: the saved name's text before its first ``.0.``."""
    marker = stack + ".0."
    for saved, names in origin.items():
        if any(n.startswith(marker) for n in names) and ".0." in saved:
            return saved[: saved.index(".0.")]
    return None


def _embedding_params(model, vocab) -> list[str]:
    """Internal names of vocabulary-indexed tensors: token embeddings and output heads.

    Only the modules the class itself names as input and output embeddings: patch
    embeddings and position tables are not, even when a tiny config gives a position table
    as many rows as the vocabulary.
    """
    chosen = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except Exception:
            module = None
        if module is not None and getattr(module, "weight", None) is not None and module.weight.shape[0] == vocab:
            chosen.append(module)
    return [f"{name}.weight" for name, module in model.named_modules() if any(module is c for c in chosen)]


def _ties(model, origin: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Saved name -> the saved names it may be read from when the checkpoint ties it away.

    The class's declared ties count even when this config unties them: a checkpoint of the
    same class with tied embeddings must still be described.
    """
    declared = {}
    for module_name, module in model.named_modules():
        for target, source in (getattr(type(module), "_tied_weights_keys", None) or {}).items():
            if isinstance(target, str) and isinstance(source, str) and "*" not in target and "(" not in target:
                prefix = f"{module_name}." if module_name else ""
                declared[prefix + target] = prefix + source
    ties = {}
    for target, source in declared.items():
        saved_target, saved_source = origin_to_saved(origin, target), origin_to_saved(origin, source)
        if saved_target and saved_source and saved_target != saved_source:
            ties[saved_target] = (saved_source,)
    return ties


def _expert_key(config: dict, experts: set[int]) -> str | None:
    if not experts or experts != set(range(len(experts))):
        return None
    for section, prefix in ((config.get("text_config"), "text_config."), (config, "")):
        if isinstance(section, dict):
            for key in EXPERT_COUNT_KEYS:
                if section.get(key) == len(experts):
                    return prefix + key
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
