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
