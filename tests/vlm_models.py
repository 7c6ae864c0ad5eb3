"""Tiny vision-language models and their text-only twins, for tests and the sweep.

A VLM is built from its type's default config at toy size (arch_models); its twin is the
text config's own model type (mistral3 -> mistral, gemma3 -> gemma3_text, llama4 ->
llama4_text) built from that very text config, so the two hold the same language model
shapes and differ in names only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import transformers

from arch_models import _shrink, tiny_type_config

VLM_TWINS = {"mistral3": "mistral", "gemma3": "gemma3_text", "llama4": "llama4_text"}


def _class_of(config: transformers.PretrainedConfig) -> type:
    return getattr(transformers, config.architectures[0]) if config.architectures else None


def vlm_config(model_type: str, *, layers: int = 4) -> transformers.PretrainedConfig:
    """The VLM's default config at toy size (llama4's text config is shrunk as its own type)."""
    if model_type != "llama4":
        return tiny_type_config(model_type, layers=layers)
    fields = _shrink(transformers.AutoConfig.for_model("llama4").to_dict(), layers)
    fields.pop("model_type", None)
    fields["text_config"] = tiny_type_config("llama4_text", layers=layers).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Llama4Config(**fields)


def vlm_class(model_type: str) -> type:
    from transformers.models.auto import modeling_auto

    return getattr(transformers, modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])


def build_vlm(model_type: str, out_dir: Path | str, *, seed: int = 0, layers: int = 4) -> Path:
    """A saved random tiny VLM of ``model_type``."""
    torch.manual_seed(seed)
    model = vlm_class(model_type)(vlm_config(model_type, layers=layers))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def build_text_twin(vlm_dir: Path | str, out_dir: Path | str, *, seed: int = 1, **changes) -> Path:
    """A random text-only model with the language-model config (and embedding tie) of ``vlm_dir``;
    ``changes``: config fields set otherwise."""
    config = json.loads((Path(vlm_dir) / "config.json").read_text())
    text = dict(config["text_config"])
    text_type = text.pop("model_type")
    text.pop("architectures", None)
    text["tie_word_embeddings"] = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text.update(changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_config = transformers.AutoConfig.for_model(text_type, **text)
    from arch_models import model_class

    torch.manual_seed(seed)
    model_class(text_type)(text_config).save_pretrained(out_dir)
    return Path(out_dir)


def build_finetune(model_dir: Path | str, out_dir: Path | str, *, seed: int) -> Path:
    """A seeded perturbation of any saved model (VLM or text), saved with its own class."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = _class_of(config).from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator) * param.abs().mean())
    model.save_pretrained(out_dir)
    return Path(out_dir)


def load_any(path: Path | str) -> transformers.PreTrainedModel:
    """The saved model with the class its config.json names, in float32, in eval mode."""
    config = transformers.AutoConfig.from_pretrained(path)
    return _class_of(config).from_pretrained(path, dtype=torch.float32).eval()


def text_logits(model: transformers.PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """Logits for a text-only prompt (a VLM runs its language model alone)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits


def resave_in_memory_layout(vlm_dir: Path | str, out_dir: Path | str) -> Path:
    """``vlm_dir``'s weights under the names transformers uses in memory (``model.language_model.*``,
    ``model.vision_tower.*``, top-level ``lm_head``), as some published checkpoints store them."""

    def renamed(name: str) -> str:
        if name.startswith("language_model.model."):
            return "model.language_model." + name[len("language_model.model.") :]
        if name.startswith("language_model.lm_head."):
            return name[len("language_model.") :]
        return "model." + name

    return _resaved(vlm_dir, out_dir, renamed)


def resave_hub_vision_layout(vlm_dir: Path | str, out_dir: Path | str) -> Path:
    """``vlm_dir``'s weights with the vision tower under ``vision_tower.vision_model.*``, as the
    published Gemma 3 checkpoints store it (transformers 5 writes ``vision_tower.*``)."""

    def renamed(name: str) -> str:
        if name.startswith("vision_tower."):
            return "vision_tower.vision_model." + name[len("vision_tower.") :]
        return name

    return _resaved(vlm_dir, out_dir, renamed)


def _resaved(vlm_dir: Path | str, out_dir: Path | str, renamed) -> Path:
    import shutil

    from safetensors.torch import save_file

    from tiny_models import read_tensors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        if (Path(vlm_dir) / name).exists():
            shutil.copy(Path(vlm_dir) / name, out_dir / name)
    tensors = {renamed(n): t.contiguous() for n, t in read_tensors(vlm_dir).items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir
