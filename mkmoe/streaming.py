"""Hidden states entering each decoder layer, computed one layer in memory at a time.

The base model's transformers skeleton is built on the meta device (no memory). Only the
modules outside the decoder stack (embeddings, rotary tables, final norm) are materialised up
front; each decoder layer is materialised from the model's TensorSource just before it runs
and returned to the meta device right after. The model's own ``forward`` runs, so attention
masks (causal + left padding, sliding windows), position embeddings and embedding scaling are
exactly what the installed transformers does. Peak memory is about one layer plus the
activations of the prompt batch, whatever the model's depth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.errors import ArchitectureError, MissingTensorError
from common.input_models import InputModel
from common.loading import TensorSource
from mkmoe.prompts import PromptBatch

REDUCTIONS = ("last", "mean")


class _Enough(Exception):
    """Raised once the input of the last decoder layer is recorded: the rest is not needed."""


def layer_input_states(
    base: InputModel, batch: PromptBatch, *, reduce: str, device: torch.device | None = None
) -> torch.Tensor:
    """``[layers, prompts, hidden]`` float32 on the CPU: each prompt's state entering each layer.

    ``reduce="last"``: the state at the last position (a real token, thanks to left padding).
    ``reduce="mean"``: the mean over the prompt's real (attention-masked) positions.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    device = device or torch.device("cpu")
    body = _skeleton(base)
    layers = _decoder_layers(body, base.num_layers)
    weights = _Weights(base.files.tensors, body.base_model_prefix)
    _materialise_outside_layers(body, layers, weights, device)
    mask = batch.attention_mask.to(device)
    recorded: list[torch.Tensor] = []

    def record(hidden: torch.Tensor) -> None:
        if reduce == "last":
            state = hidden[:, -1, :]
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
    try:
        with torch.no_grad():
            body(
                input_ids=batch.input_ids.to(device),
                attention_mask=mask,
                position_ids=batch.position_ids.to(device),
                use_cache=False,
            )
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
        body.to_empty(device="meta")
    return torch.stack(recorded) if recorded else torch.empty(0, len(batch), 0)


def _skeleton(base: InputModel) -> nn.Module:
    """The base model's decoder (no LM head) on the meta device, float32, eager attention."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(base.path))
        with torch.device("meta"):
            return transformers.AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32)
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


class _Weights:
    """Reads a module parameter from the checkpoint by its name there (``model.`` prefix or not)."""

    def __init__(self, source: TensorSource, prefix: str):
        self.source = source
        self.prefixes = (f"{prefix}." if prefix else "", "")

    def load(self, name: str) -> torch.Tensor:
        for prefix in self.prefixes:
            if prefix + name in self.source:
                return self.source.load(prefix + name)
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
                param.copy_(weights.load(f"{path}.{name}" if path else name))


def _materialise_outside_layers(body: nn.Module, layers: nn.ModuleList, weights: _Weights, device) -> None:
    inside = {id(module) for module in layers.modules()}
    outside = [(path, module) for path, module in body.named_modules() if id(module) not in inside]
    _materialise(body, outside, weights, device)


def _module_path(body: nn.Module, target: nn.Module) -> str:
    return next(path for path, module in body.named_modules() if module is target)


def _before_layer(body, prefix: str, weights: _Weights, device, record: Callable, last: bool):
    def hook(layer: nn.Module, args, kwargs):
        record(args[0] if args else kwargs["hidden_states"])
        if last:
            raise _Enough
        modules = [(f"{prefix}.{path}" if path else prefix, module) for path, module in layer.named_modules()]
        _materialise(body, modules, weights, device)

    return hook


def _after_layer(layer: nn.Module, args, output) -> None:
    layer.to_empty(device="meta")  # frees the layer's weights before the next one loads
