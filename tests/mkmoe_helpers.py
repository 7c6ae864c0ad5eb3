"""Shared helpers of the mkmoe tests: configs from dicts, one-call builds, reading outputs back."""

from __future__ import annotations

from pathlib import Path

import yaml

from mkmoe.config import parse_moe_config
from mkmoe.run import run_moe
from mksuite.common.build import BuildOptions

IDS = [1, 5, 9, 20, 33, 7, 100, 14]


def moe_yaml(base, experts, *, shared=(), **top) -> str:
    """Config text: ``experts`` are paths or dicts (``source_model`` filled from ``model``)."""

    def entry(expert):
        if isinstance(expert, dict):
            expert = dict(expert)
            expert["source_model"] = str(expert.pop("model"))
            return expert
        return {"source_model": str(expert)}

    data = {"base_model": str(base), **top, "experts": [entry(e) for e in experts]}
    if shared:
        data["shared_experts"] = [entry(e) for e in shared]
    return yaml.safe_dump(data, sort_keys=False)


def build(out: Path, text: str, *, layout="classic", seed=0, acknowledge=False, **options) -> Path:
    config = parse_moe_config(text, allow_identical_experts=acknowledge)
    run_moe(config, out, BuildOptions(seed=seed, overwrite=True, **options), layout=layout)
    return out


def topics(n_prompts: int, words: list[str], seed: int) -> list[str]:
    """Prompts of five words drawn (seeded) from ``words``."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(5)) for _ in range(n_prompts)]


# Non-default values for the fields that change a type's math, so an output that ignored one
# of them could not reproduce the dense logits by accident.
DENSE_OVERRIDES = {
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    "granite_swa": dict(
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0
    ),
    "cohere2": dict(logit_scale=0.5, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def dense_family(model_type: str, root: Path, *, n_finetunes: int = 2, layers: int = 3) -> tuple[Path, list[Path]]:
    """A tiny random ``model_type`` base (every weight perturbed, norms included) and perturbed fine-tunes.

    Built from the type's own default config (tests/arch_models.py) with DENSE_OVERRIDES, saved
    with save_pretrained and the tiny tokenizer, so gates of every mode can be computed.
    """
    import torch

    from arch_models import model_class, tiny_type_config
    from tiny_models import tiny_tokenizer

    config = tiny_type_config(model_type, layers=layers)
    for key, value in DENSE_OVERRIDES.get(model_type, {}).items():
        setattr(config, key, value)
    cls = model_class(model_type)
    paths = []
    for index in range(n_finetunes + 1):
        torch.manual_seed(0)
        model = cls(config).eval()
        base_noise, generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for param in model.parameters():
                # Norm weights start at 1 (or 0): perturb everything, so a misplaced norm shows.
                param.add_(0.1 * torch.randn(param.shape, generator=base_noise) * (param.abs().mean() + 0.1))
                if index:
                    param.add_(0.02 * torch.randn(param.shape, generator=generator) * param.abs().mean())
        out = root / ("base" if index == 0 else f"ft{index}")
        model.save_pretrained(out)
        tiny_tokenizer(config.vocab_size).save_pretrained(out)
        paths.append(out)
    return paths[0], paths[1:]
