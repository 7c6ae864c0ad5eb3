"""Hidden states entering each decoder layer, computed one layer in memory at a time.

The base model's transformers skeleton is built on the meta device (no memory). The modules
outside the decoder stack (rotary tables, final norm) are materialised up front, the input
embedding with only the rows of the prompts' tokens (the ids are renumbered to match). Inside
the decoder layers every module with weights of its own (a projection, a norm) is
materialised from the model's TensorSource just before its forward and returned to the meta
device right after. The model's own ``forward`` runs, so attention masks (causal + left
padding, sliding windows), position embeddings and embedding scaling are exactly what the
installed transformers does. Peak memory is about the largest weight matrix (in float32) plus
the activations of the prompt batch, whatever the model's depth or width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mkmoe.prompts import PromptBatch
from mksuite.common.errors import ArchitectureError, MissingTensorError
from mksuite.common.graph.memory import configure_allocator, trim_freed_memory
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import TensorSource, load_rows

REDUCTIONS = ("last", "mean")


@dataclass(frozen=True)
class ForwardSettings:
    """How the prompt forward pass runs.

    ``dtype``: the parameters' and activations' dtype. ``attention``: transformers'
    attention implementation. ``positions``: pass each prompt's own positions (counted from
    its first real token) rather than letting left padding shift them, as a plain
    ``model(input_ids, attention_mask)`` call does. ``mean_over_padding``: ``reduce="mean"``
    averages over padded positions too, in ``dtype``.
    """

    dtype: torch.dtype = torch.float32
    attention: str = "eager"
    positions: bool = True
    mean_over_padding: bool = False


# mergekit-moe's forward pass, reproduced: bfloat16 whatever the base's dtype, transformers'
# default (SDPA) attention, positions shifted by left padding, padding in hidden_avg means.
MERGEKIT_FORWARD = ForwardSettings(torch.bfloat16, "sdpa", positions=False, mean_over_padding=True)
# --precise: float32, every prompt at its own positions, means over real tokens only.
PRECISE_FORWARD = ForwardSettings()
# Stored bytes read at a time into a big parameter.
_COPY_BLOCK_BYTES = 4 * 1024**2


class _Enough(Exception):
    """Raised once the input of the last decoder layer is recorded: the rest is not needed."""


def layer_input_states(
    base: OpenedModel,
    batch: PromptBatch,
    *,
    reduce: str,
    device: torch.device | None = None,
    forward: ForwardSettings | None = None,
    cache: WeightCache | None = None,
) -> torch.Tensor:
    """``[layers, prompts, hidden]`` float32 on the CPU: each prompt's state entering each layer.

    ``reduce="last"``: the state at the last position (a real token, thanks to left padding).
    ``reduce="mean"``: the mean over the prompt's real (attention-masked) positions, or over
    every position, padding included, where ``forward.mean_over_padding`` (mergekit's rule).
    The forward pass runs as ``forward`` says (default: float32, exact positions, eager
    attention). ``cache`` keeps materialised weights for the next call (several batches).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    device = device or torch.device("cpu")
    forward = forward or PRECISE_FORWARD
    configure_allocator()
    body = _skeleton(base, forward)
    layers = _decoder_layers(body, base.num_layers)
    weights = _Weights(base.files.tensors, body.base_model_prefix, cache)
    input_ids = _materialise_outside_layers(body, layers, weights, device, batch.input_ids)
    mask = batch.attention_mask.to(device)
    recorded: list[torch.Tensor] = []

    def record(hidden: torch.Tensor) -> None:
        if reduce == "last":
            state = hidden[:, -1, :]
        elif forward.mean_over_padding:
            state = hidden.sum(dim=1) / hidden.shape[1]  # rounded sum, then the division
        else:
            weights_ = mask.unsqueeze(-1).to(hidden.dtype)
            state = (hidden * weights_).sum(dim=1) / weights_.sum(dim=1)
        recorded.append(state.float().cpu())

    handles = []
    for index, layer in enumerate(layers):
        prefix = _module_path(body, layer)
        last = index == len(layers) - 1
        before = _before_layer(body, prefix, weights, device, record, last)
        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(_after_layer))
        for path, module in layer.named_modules():
            if path and _has_own_state(module):
                load = _before_module(body, f"{prefix}.{path}", weights, device)
                handles.append(module.register_forward_pre_hook(load))
                handles.append(module.register_forward_hook(_after_module))
    try:
        positions = {"position_ids": batch.position_ids.to(device)} if forward.positions else {}
        with torch.no_grad():
            body(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False, **positions)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
        body.to_empty(device="meta")
    return torch.stack(recorded) if recorded else torch.empty(0, len(batch), 0)


def _skeleton(base: OpenedModel, forward: ForwardSettings) -> nn.Module:
    """The base model's decoder (no LM head) on the meta device, in the forward pass's dtype and attention."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(base.path))
        with torch.device("meta"):
            return transformers.AutoModel.from_config(
                config, attn_implementation=forward.attention, dtype=forward.dtype
            )
    except (ValueError, KeyError, OSError) as error:
        raise ArchitectureError(
            f"the installed transformers cannot build the base model {base.ref} to compute hidden-state gates: {error}",
            hint="use gate_mode: cheap_embed or random, which need no forward pass",
        ) from None


def _decoder_layers(body: nn.Module, count: int) -> nn.ModuleList:
    layers = getattr(body, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == count:
        return layers
    for child in body.children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return child
    raise ArchitectureError(f"cannot find the {count} decoder layers in {type(body).__name__}")


@dataclass
class WeightCache:
    """Materialised parameters kept between forward passes over the same base, up to ``budget`` bytes.

    Several prompt batches (mergekit's one batch per expert) then read and convert each
    weight once while the model fits in the budget; past it, the rest is read again per
    pass, so memory stays bounded whatever the model's size.
    """

    budget: int = 1024**3
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    used: int = 0

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def keep(self, name: str, param: torch.Tensor) -> None:
        size = param.numel() * param.element_size()
        if self.used + size <= self.budget:
            self.tensors[name] = param.detach().clone()
            self.used += size


class _Weights:
    """Reads a module parameter from the checkpoint by its name there (``model.`` prefix or not)."""

    def __init__(self, source: TensorSource, prefix: str, cache: WeightCache | None = None):
        self.source = source
        self.prefixes = (f"{prefix}." if prefix else "", "")
        self.cache = cache

    def load_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of a matrix, each read alone (a few prompt tokens of a big embedding)."""
        stored = self.stored_name(name)
        return torch.cat([load_rows(self.source, stored, row, row + 1) for row in rows])

    def copy_into(self, param: torch.Tensor, name: str) -> None:
        """Fill ``param`` from the checkpoint, a block of rows at a time for a big matrix (so the
        stored copy and the float32 parameter are not both whole in memory)."""
        stored = self.stored_name(name)
        kept = self.cache.get(stored) if self.cache is not None else None
        if kept is not None and kept.shape == param.shape:
            param.copy_(kept)
            return
        self._read_into(param, stored)
        if self.cache is not None:
            self.cache.keep(stored, param)

    def _read_into(self, param: torch.Tensor, stored: str) -> None:
        info = self.source.info(stored)
        rows = info.shape[0] if len(info.shape) >= 2 and tuple(info.shape) == tuple(param.shape) else 0
        step = max(1, _COPY_BLOCK_BYTES // max(1, info.nbytes // rows)) if rows else 0
        if not rows or step >= rows:
            param.copy_(self.source.load(stored))
            return
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            param[start:stop].copy_(load_rows(self.source, stored, start, stop))

    def stored_name(self, name: str) -> str:
        for prefix in self.prefixes:
            if prefix + name in self.source:
                return prefix + name
        raise MissingTensorError(
            f"the base model has no tensor {self.prefixes[0]}{name}, which its transformers class needs",
            hint="the checkpoint and its config.json disagree; check the base model",
        )


def _materialise(body: nn.Module, modules: list[tuple[str, nn.Module]], weights: _Weights, device) -> None:
    """Give ``modules`` real storage: computed buffers from transformers' init, parameters from the checkpoint."""
    for _, module in modules:
        module.to_empty(device=device, recurse=False)
    for _, module in modules:
        if any(True for _ in module.buffers(recurse=False)):
            body._init_weights(module)  # rotary tables, embedding scales: not stored in checkpoints
    with torch.no_grad():
        for path, module in modules:
            for name, param in module.named_parameters(recurse=False):
                weights.copy_into(param, f"{path}.{name}" if path else name)


def _materialise_outside_layers(
    body: nn.Module, layers: nn.ModuleList, weights: _Weights, device, input_ids: torch.Tensor
) -> torch.Tensor:
    """Materialise what lies outside the decoder layers; returns the input ids to run with.

    A plain ``nn.Embedding`` gets only the rows of the tokens in ``input_ids`` (the ids are
    renumbered into those rows), so a 32000-row embedding costs a few rows, not the matrix.
    """
    inside = {id(module) for module in layers.modules()}
    embedding = body.get_input_embeddings()
    compact = isinstance(embedding, nn.Embedding) and embedding.max_norm is None
    outside = [
        (path, module)
        for path, module in body.named_modules()
        if id(module) not in inside and not (compact and module is embedding)
    ]
    _materialise(body, outside, weights, device)
    if not compact:
        return input_ids
    path = _module_path(body, embedding)
    tokens, renumbered = torch.unique(input_ids, return_inverse=True)
    dtype = embedding.weight.dtype
    # Shrink the (meta) weight first: materialising the full matrix, even briefly, is what this avoids.
    embedding.weight = nn.Parameter(torch.empty(len(tokens), embedding.embedding_dim, dtype=dtype, device="meta"))
    embedding.to_empty(device=device, recurse=False)
    if any(True for _ in embedding.buffers(recurse=False)):
        body._init_weights(embedding)  # e.g. Gemma3's embedding scale
    with torch.no_grad():
        embedding.weight.copy_(weights.load_rows(f"{path}.weight", tokens.tolist()))
    embedding.padding_idx = None  # a row index of the full matrix; only gradients use it
    return renumbered


def _module_path(body: nn.Module, target: nn.Module) -> str:
    return next(path for path, module in body.named_modules() if module is target)


def _has_own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _before_layer(body, prefix: str, weights: _Weights, device, record: Callable, last: bool):
    """Record the layer's input; materialise what the layer holds itself (its modules load their own)."""

    def hook(layer: nn.Module, args, kwargs):
        record(args[0] if args else kwargs["hidden_states"])
        if last:
            raise _Enough
        if _has_own_state(layer):
            _materialise(body, [(prefix, layer)], weights, device)

    return hook


def _before_module(body, path: str, weights: _Weights, device):
    def hook(module: nn.Module, args):
        _materialise(body, [(path, module)], weights, device)

    return hook


def _after_module(module: nn.Module, args, output) -> None:
    module.to_empty(device="meta", recurse=False)  # frees its weights before the next module loads


def _after_layer(layer: nn.Module, args, output) -> None:
    _after_module(layer, args, output)
    # Freed weights of alternating sizes fragment the heap: hand the free pages back each
    # layer, or RSS creeps up layer after layer (measured: ~30 MB a layer at 1.1B).
    trim_freed_memory()
